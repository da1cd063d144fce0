//! A real S3-compatible server for the remote-cache tests: the `moto`
//! server from PyPI (`scripts/setup.sh` installs it), started on a free
//! 127.0.0.1 port per test and killed when the value drops.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `$KTSTR_MOTO_SERVER`, else `moto_server` on PATH.
fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KTSTR_MOTO_SERVER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("moto_server")).find(|p| p.is_file())
}

pub struct Moto {
    child: Child,
    pub endpoint: String,
    port: u16,
}

impl Moto {
    /// A running server, or `None` after the premise report (a failure
    /// under KTSTR_NO_SKIP_MODE=1) when moto is not installed.
    pub fn start() -> Option<Moto> {
        let bin = moto_binary();
        if !ktstr_runtime::testing::premise(bin.is_some(), "the moto S3 server (moto_server)", "source scripts/setup.sh, or pip install 'moto[server]'") {
            return None;
        }
        let bin = bin.unwrap();
        for _ in 0..5 {
            // A free port: bind :0, read it, release it for moto. Another
            // test's server may take it first: ours then exits, and we retry.
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut m = Moto { child, endpoint: format!("http://127.0.0.1:{port}"), port };
            let t0 = Instant::now();
            // Until it listens; a server that lost the port to another exits.
            let exited = loop {
                if let Some(st) = m.child.try_wait().unwrap() {
                    break Some(st);
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break m.child.try_wait().unwrap();
                }
                assert!(t0.elapsed() < Duration::from_secs(30), "moto_server did not listen on {port} within 30s");
                std::thread::sleep(Duration::from_millis(100));
            };
            match exited {
                None => return Some(m),
                Some(st) => eprintln!("moto_server on port {port} exited ({st}); retrying on another port"),
            }
        }
        panic!("moto_server exited right after starting, five times ({}); run it by hand to see why", bin.display())
    }

    /// Creates `bucket` (moto takes an unsigned `PUT /bucket`).
    pub fn bucket(&self, bucket: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"), "creating bucket {bucket}: {resp}");
    }

    /// The remote-cache environment for `s3://{bucket}/{prefix}` on this server.
    pub fn env(&self, url: &str) -> Vec<(&'static str, String)> {
        vec![
            ("KTSTR_REMOTE_CACHE", url.to_string()),
            ("KTSTR_REMOTE_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    pub fn apply(&self, c: &mut Command, url: &str) {
        for (k, v) in self.env(url) {
            c.env(k, v);
        }
        for k in ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"] {
            c.env_remove(k);
        }
    }

    /// A client of the library's own, for looking at and tampering with
    /// objects; its store is configured here, not from the process env.
    pub fn remote(&self, url: &str) -> kernel_build::remote::Remote {
        let cfg = kernel_build::remote::Config::parse(url, Some(&self.endpoint), false).unwrap();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .unwrap();
        kernel_build::remote::Remote::with_store(cfg, std::sync::Arc::new(store)).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
