//! Scale-out end to end, with the real ktstr 6.12 kernel and real VMs, in
//! the user's crate of tests/fixture:
//! - two runners and a remote cache (moto on 127.0.0.1): the builder
//!   pushes the kernel, the other runner (an empty local cache) downloads
//!   it, says so, builds nothing, and its tests pass;
//! - `cargo ktstr archive` on two kernels, then two partitions of it run
//!   in a clean directory with no workspace and no cargo on PATH: together
//!   they run every test × kernel exactly once, with a plain run's results.
//!
//! Slow (kernel boots, a crate build): only with KTSTR_SLOW_TESTS=1.

mod fixture;
mod moto;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use fixture::{results, text, Fixture, TARBALL};

fn slow() -> bool {
    if !ktstr_runtime::testing::slow_tests_enabled() {
        return false;
    }
    assert!(Path::new(TARBALL).is_file(), "KTSTR_SLOW_TESTS=1 but {TARBALL} is missing (apt-get install linux-source-6.12)");
    true
}

/// The builder's key for the 6.12 tarball (a hit in the suite's cache).
fn tarball_key(f: &Fixture) -> String {
    fixture::built(&f.cargo_ktstr(&["kernel", "build", TARBALL])).2
}

#[test]
fn second_runner_gets_the_kernel_from_the_remote_and_its_tests_pass() {
    if !slow() {
        return;
    }
    let Some(m) = moto::Moto::start() else { return };
    m.bucket("e2e");
    let url = "s3://e2e/kernels";
    let _serial = fixture::serial();
    let f = Fixture::new();
    let key = tarball_key(&f);

    // Runner A, the builder: its cache has the kernel (built by the slow tests); it uploads.
    let mut push = f.cargo_ktstr_in(&fixture::test_cache());
    m.apply(&mut push, url);
    let o = push.args(["kernel", "push", &key]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // Runner B: an empty cache of its own.
    let cache_b = tempfile::tempdir().unwrap();
    let mut b = f.cargo_ktstr_in(cache_b.path());
    m.apply(&mut b, url);
    let o = b.args(["test", "--kernel", TARBALL, "--", "-E", "not test(fails_on_purpose)", "--no-fail-fast"]).output().unwrap();
    let out = text(&o);
    eprintln!("{out}");
    assert!(out.contains(&format!("kernel {key}: from remote cache {url}, no build")), "runner B must say where its kernel came from");
    assert!(!out.contains("configure") && !cache_b.path().join(format!("{key}.log")).exists(), "runner B built nothing");
    assert_eq!(o.status.code(), Some(0), "runner B's tests pass");
    let rs = results(&out);
    assert_eq!(rs.len(), 3, "reports_kernel, spinners_progress, host_side: {rs:?}");
    assert!(rs.iter().all(|(s, _)| s == "PASS"), "{rs:?}");
    assert!(cache_b.path().join(&key).join("bzImage").is_file());
}

#[test]
fn archive_partitions_run_every_test_once_without_a_workspace() {
    if !slow() {
        return;
    }
    let deb = fixture::debian_kernel();
    let nextest = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("cargo-nextest")).find(|p| p.is_file()));
    if !ktstr_runtime::testing::premise(nextest.is_some(), "cargo-nextest", "cargo install cargo-nextest --locked") {
        return;
    }
    let _serial = fixture::serial();
    let f = Fixture::new();
    let out_dir = tempfile::tempdir().unwrap();
    let suite = out_dir.path().join("suite.tar.zst");
    let o = f.cargo_ktstr(&["archive", "--kernel", TARBALL, "--kernel", deb.to_str().unwrap(), "-o", suite.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 kernel(s)"), "{}", text(&o));

    // Another "machine": a directory with no Cargo.toml, a PATH with
    // cargo-nextest and no cargo, an empty kernel cache.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::copy(&suite, elsewhere.path().join("suite.tar.zst")).unwrap();
    let bin = elsewhere.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(nextest.unwrap(), bin.join("cargo-nextest")).unwrap();
    let path = format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let cache = elsewhere.path().join("cache");
    let part = |p: &str| -> Output {
        let mut c = fixture::cargo_ktstr(&cache);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CARGO")) {
            c.env_remove(k);
        }
        c.current_dir(elsewhere.path())
            .env("PATH", &path)
            .env("CARGO_HOME", elsewhere.path().join("no-cargo-home"))
            .env("CARGO_TERM_COLOR", "never")
            .args(["test", "--archive", "suite.tar.zst", "--partition", p, "--", "--no-fail-fast"])
            .output()
            .unwrap()
    };
    let mut union: BTreeMap<String, String> = BTreeMap::new();
    for p in ["count:1/2", "count:2/2"] {
        let o = part(p);
        let out = text(&o);
        eprintln!("--- partition {p}\n{out}");
        let rs = results(&out);
        assert!(!rs.is_empty(), "partition {p} ran no test");
        let failed = rs.iter().any(|(s, _)| s == "FAIL");
        assert_eq!(o.status.code(), Some(if failed { 100 } else { 0 }), "{p}: nextest's exit code");
        for (s, n) in rs {
            assert!(union.insert(n.clone(), s).is_none(), "{n} ran in two partitions");
        }
    }
    assert!(!cache.exists() || fixture::entries(&cache).is_empty(), "the runner built or cached no kernel");
    // What the plain run gives (plugin_e2e.rs): every VM test once per kernel, host_only once.
    let labels: Vec<String> = union.keys().filter_map(|n| n.strip_prefix("ktstr/reports_kernel/").map(String::from)).collect();
    assert_eq!(labels.len(), 2, "{union:?}");
    assert!(labels.iter().any(|l| l.starts_with("kernel_6_12_")) && labels.iter().any(|l| l.starts_with("kernel_path_vmlinuz_")), "{labels:?}");
    let mut want = BTreeMap::new();
    for l in &labels {
        want.insert(format!("ktstr/reports_kernel/{l}"), "PASS".to_string());
        want.insert(format!("ktstr/spinners_progress/{l}"), "PASS".to_string());
        want.insert(format!("ktstr/fails_on_purpose/{l}"), "FAIL".to_string());
    }
    want.insert("ktstr/host_side".into(), "PASS".into());
    assert_eq!(union, want);

    // And the same as a plain run of the same suite on the same kernels, here.
    let o = f.cargo_ktstr(&["test", "--kernel", TARBALL, "--kernel", deb.to_str().unwrap(), "--", "--no-fail-fast"]);
    let plain: BTreeMap<String, String> = results(&text(&o)).into_iter().map(|(s, n)| (n, s)).collect();
    assert_eq!(union, plain, "partitions vs a plain run");
}

/// `--remote-kernels`: the archive carries the kernel's key, not its files;
/// a runner with the remote configured and an empty cache downloads it
/// (and says so) and runs the suite; without the remote it is told what to set.
#[test]
fn archive_with_remote_kernel_references() {
    if !slow() {
        return;
    }
    let Some(m) = moto::Moto::start() else { return };
    m.bucket("refs");
    let url = "s3://refs/kernels";
    let _serial = fixture::serial();
    let f = Fixture::new();
    let key = tarball_key(&f);
    let out_dir = tempfile::tempdir().unwrap();
    let suite = out_dir.path().join("suite.tar.zst");
    // A stand-in scheduler binary (and a file that is not executable, left out).
    let scheds = out_dir.path().join("scheds");
    std::fs::create_dir(&scheds).unwrap();
    std::fs::write(scheds.join("scx_fake"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(scheds.join("scx_fake"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(scheds.join("README"), "not a scheduler").unwrap();
    let mut c = f.cargo_ktstr_in(&fixture::test_cache());
    m.apply(&mut c, url);
    let o = c
        .args(["archive", "--kernel", TARBALL, "--remote-kernels", "--scheduler-dir", scheds.to_str().unwrap(), "-o", suite.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("uploaded {key} to {url}")), "{}", text(&o));
    let mut names = Vec::new();
    let mut manifest = String::new();
    let mut ar = tar::Archive::new(zstd::stream::read::Decoder::new(std::fs::File::open(&suite).unwrap()).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let n = e.path().unwrap().to_string_lossy().into_owned();
        if n == "ktstr-archive.json" {
            std::io::Read::read_to_string(&mut e, &mut manifest).unwrap();
        }
        names.push(n);
    }
    assert!(names.iter().all(|n| !n.starts_with("kernels/")), "no kernel files in the archive: {names:?}");
    assert!(names.contains(&"schedulers/scx_fake".to_string()) && !names.iter().any(|n| n.ends_with("README")), "{names:?}");
    assert!(names.contains(&"workspace/Cargo.toml".to_string()), "{names:?}");
    let am: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(am["kernels"][0]["key"], key.as_str(), "{manifest}");
    assert_eq!(am["kernels"][0]["remote"], url, "{manifest}");

    let elsewhere = tempfile::tempdir().unwrap();
    let cache = elsewhere.path().join("cache");
    let run = |remote: bool| {
        let mut c = fixture::cargo_ktstr(&cache);
        if remote {
            m.apply(&mut c, url);
        }
        c.current_dir(elsewhere.path())
            .args(["test", "--archive", suite.to_str().unwrap(), "--", "-E", "not test(fails_on_purpose)"])
            .output()
            .unwrap()
    };
    let o = run(false);
    assert!(!o.status.success() && text(&o).contains(&format!("names kernel {key} in remote cache {url}; set KTSTR_REMOTE_CACHE")), "{}", text(&o));
    let o = run(true);
    let out = text(&o);
    eprintln!("{out}");
    assert!(out.contains(&format!("kernel {key}: from remote cache {url}, no build")), "{out}");
    assert_eq!(o.status.code(), Some(0), "{out}");
    let rs = results(&out);
    assert_eq!(rs.len(), 3, "{rs:?}");
    assert!(rs.iter().all(|(s, _)| s == "PASS"), "{rs:?}");
    assert_eq!(fixture::entries(&cache), std::slice::from_ref(&key));
    // The carried schedulers are what the test binaries search first.
    let mut c = fixture::cargo_ktstr(&cache);
    m.apply(&mut c, url);
    let o = c.current_dir(elsewhere.path()).args(["test", "--archive", suite.to_str().unwrap(), "--print-env"]).output().unwrap();
    let env = String::from_utf8_lossy(&o.stdout).into_owned();
    let dir = env.lines().find_map(|l| l.strip_prefix("KTSTR_SCHEDULER_DIR=")).unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(dir.ends_with("/schedulers"), "{env}");
    assert!(env.contains(&format!("KTSTR_KERNEL={}", cache.join(&key).join("bzImage").display())), "{env}");
}
