//! Real kernel builds through the real binary. Slow (minutes each, ccache
//! helps): run only with KTSTR_SLOW_TESTS=1. Entries that are worth
//! reusing across runs live in the suite's own cache
//! (`fixture::test_cache()`, `~/.cache/ktstr/test-cache`), never the user's.

mod fixture;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

const TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";

/// The slow gate (fails instead of skipping under KTSTR_NO_SKIP_MODE=1).
fn slow_enabled(name: &str) -> Option<kernel_build::EntryLock> {
    if !ktstr_runtime::testing::slow_tests_enabled() {
        return None;
    }
    assert!(Path::new(TARBALL).is_file(), "{name}: KTSTR_SLOW_TESTS=1 but {TARBALL} is missing (apt-get install linux-source-6.12)");
    Some(fixture::serial())
}

fn ktstr(cache: &Path, args: &[&str]) -> Output {
    fixture::cargo_ktstr(cache).args(args).output().expect("run cargo-ktstr")
}

#[track_caller]
fn ok(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprint!("{stderr}");
    assert!(out.status.success(), "cargo-ktstr failed: {stderr}");
    (stdout, stderr)
}

/// The image path from stdout's `label=path` line, and the entry dir.
fn image_of(stdout: &str) -> (String, PathBuf) {
    let line = stdout.lines().last().expect("a label=image line");
    let (label, path) = line.split_once('=').unwrap();
    (label.to_string(), PathBuf::from(path))
}

fn assert_config(entry: &Path) {
    let cfg = std::fs::read_to_string(entry.join(".config")).unwrap();
    for want in ["CONFIG_SCHED_CLASS_EXT=y", "CONFIG_DEBUG_INFO_BTF=y"] {
        assert!(cfg.lines().any(|l| l == want), "{want} missing in {}", entry.display());
    }
    for f in ["bzImage", "vmlinux", "metadata.json"] {
        assert!(entry.join(f).is_file(), "{f} missing in {}", entry.display());
    }
}

/// Acceptance 1: the Debian tarball builds into a cache; again is a hit.
/// (The suite's persistent cache: built once per machine, shared with
/// the end-to-end test.)
#[test]
fn tarball_builds_then_hits() {
    let Some(_serial) = slow_enabled("tarball_builds_then_hits") else { return };
    let cache = fixture::test_cache();
    let (stdout, _) = ok(&ktstr(&cache, &["kernel", "build", TARBALL]));
    let (label, image) = image_of(&stdout);
    let entry = image.parent().unwrap();
    assert_config(entry);
    let key = entry.file_name().unwrap().to_string_lossy().into_owned();
    assert!(key.contains("-tarball-") && key.starts_with(&label), "{key} / {label}");
    let t = Instant::now();
    let (stdout2, stderr2) = ok(&ktstr(&cache, &["kernel", "build", TARBALL]));
    let hit = t.elapsed();
    eprintln!("cache hit took {hit:?}");
    assert_eq!(stdout, stdout2);
    assert!(!stderr2.lines().any(|l| l.starts_with("ktstr: [") || l.starts_with("ktstr: cached ")), "a hit is quiet: {stderr2}");
    assert!(hit.as_secs_f64() < 2.0, "cache hit took {hit:?}");
    // The key spec names the same entry.
    let (stdout3, _) = ok(&ktstr(&cache, &["kernel", "build", &key]));
    assert_eq!(image_of(&stdout3).1, image);
}

/// A tiny HTTP/1.1 server: kernel.org layout with a directory listing.
fn serve_mirror(version: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let version = version.clone();
            std::thread::spawn(move || handle(s, &version));
        }
    });
    format!("http://{addr}/")
}

fn handle(mut s: TcpStream, version: &str) {
    let Some(path) = fixture::request_path(&s) else { return };
    let tarball = format!("/v6.x/linux-{version}.tar.xz");
    if path == "/v6.x/sha256sums.asc" {
        // kernel.org's format: clear-signed `<sha256>  <file>` lines.
        let sum = kernel_build::fetch::sha256_file(Path::new(TARBALL)).unwrap();
        let body = format!("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{sum}  linux-{version}.tar.xz\n-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n");
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    } else if path == "/v6.x/" {
        let names = ["linux-6.11.11.tar.xz".to_string(), "linux-6.12.tar.xz".into(), "linux-6.12.1.tar.xz".into(), format!("linux-{version}.tar.xz")];
        let mut body = String::from("<html><head><title>Index of /v6.x/</title></head><body><pre>\n");
        for n in names {
            body.push_str(&format!("<a href=\"{n}\">{n}</a>  01-Jan-2025 00:00  140M\n"));
        }
        body.push_str("</pre></body></html>\n");
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    } else if path == tarball {
        let mut f = std::fs::File::open(TARBALL).unwrap();
        let len = f.metadata().unwrap().len();
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/x-xz\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    } else {
        let _ = write!(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
}

/// Acceptance 2 (+ concurrent builders): `6.12 --mirror http://127.0.0.1:PORT/`
/// resolves through the listing, downloads, builds and caches in a fresh
/// cache; two simultaneous builds of the key: one builds, the other waits and hits.
#[test]
fn mirror_version_downloads_builds_caches() {
    let Some(_serial) = slow_enabled("mirror_version_downloads_builds_caches") else { return };
    let version = kernel_build::fetch::tarball_version(&kernel_build::TarballSource::Local(TARBALL.into()))
        .unwrap()
        .unwrap();
    let url = serve_mirror(version.clone());
    let cache = tempfile::tempdir().unwrap();
    let spawn = || {
        fixture::cargo_ktstr(cache.path())
            .args(["kernel", "build", "6.12", "--mirror", &url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let b = spawn();
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let res: Vec<(String, String)> = outs.iter().map(ok).collect();
    assert_eq!(res[0].0, res[1].0);
    let built: Vec<&(String, String)> = res.iter().filter(|(_, e)| e.contains("ktstr: cached ")).collect();
    let waited: Vec<&(String, String)> = res.iter().filter(|(_, e)| e.contains("cache hit") && e.contains("after waiting")).collect();
    assert_eq!((built.len(), waited.len()), (1, 1), "one builds, the other waits then hits");
    assert!(built[0].1.contains("] fetch: http://"), "the fetch phase line names the download: {}", built[0].1);
    let (label, image) = image_of(&res[0].0);
    assert_eq!(label, version);
    let kc = kernel_build::InputDigest::new(&kernel_build::Base::Tinyconfig, None, None).unwrap().kc();
    let entry = image.parent().unwrap();
    assert_eq!(entry.parent().unwrap(), cache.path());
    assert_eq!(entry.file_name().unwrap().to_string_lossy(), kernel_build::cache::tarball_key(&version, &kc));
    assert_config(entry);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["version"], version.as_str());
    assert!(meta["source"].as_str().unwrap().starts_with(&url));
    assert_eq!(meta["source_kind"], "mirror");
    assert_eq!(meta["source_sha256"].as_str().unwrap(), kernel_build::fetch::sha256_file(Path::new(TARBALL)).unwrap());
}

/// Acceptance 3 on a real kernel: `git+file://…#v6.12` of the Debian
/// tree checks out and builds under a `v6.12-git-{commit7}` key with the
/// ktstr options. The repo is imported once per machine
/// (`fixture::tarball_git_repo`, fixed commit dates) and the build lands
/// in the suite's persistent cache, so only a machine's first run imports
/// and builds. Moving branches, clean and dirty trees (in-place builds)
/// are proven every run on a stand-in tree by kernel_cli.rs
/// `git_refs_and_clean_or_dirty_trees`.
#[test]
fn git_tag_builds_a_real_kernel() {
    let Some(_serial) = slow_enabled("git_tag_builds_a_real_kernel") else { return };
    let t = Instant::now();
    let repo = fixture::tarball_git_repo(Path::new(TARBALL), "v6.12", &fixture::test_git_root());
    eprintln!("git repo {} ready in {:.1}s", repo.display(), t.elapsed().as_secs_f64());
    let cache = fixture::test_cache();
    let (out, _) = ok(&ktstr(&cache, &["kernel", "build", &format!("git+file://{}#v6.12", repo.display())]));
    let (label, image) = image_of(&out);
    let stem = repo.file_stem().unwrap().to_string_lossy().into_owned();
    assert_eq!(label, format!("git_test-git_{stem}_v6.12"));
    let key = image.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
    let commit = fixture::git(&repo, &["rev-parse", "v6.12^{commit}"]);
    assert!(key.starts_with(&format!("v6.12-git-{}-", &commit[..7])), "{key}");
    assert_eq!(image.parent().unwrap().parent().unwrap(), cache.canonicalize().unwrap());
    assert_config(image.parent().unwrap());
    eprintln!("git_tag_builds_a_real_kernel: {:.1}s", t.elapsed().as_secs_f64());
}
