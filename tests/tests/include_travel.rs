//! Include files travel with the test binary: a copy of the examples
//! binary, run where the crate's `data/` directory is hidden (an empty
//! tmpfs over it in a private mount namespace), still finds them.
//!
//! Needs root and util-linux `unshare`; without them it SKIPs, and FAILs
//! under `KTSTR_NO_SKIP_MODE=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `testing::premise` as an early return.
macro_rules! premise {
    ($cond:expr, $what:expr, $fix:expr) => {
        if !ktstr_runtime::testing::premise($cond, $what, $fix) {
            return;
        }
    };
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// The newest `examples-HASH` test binary beside this one.
fn examples_binary() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    std::fs::read_dir(me.parent()?)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("examples-") && !n.contains('.')
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn can_hide_sources() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("unshare").args(["--mount", "true"]).output().is_ok_and(|o| o.status.success())
}

/// Copies the examples binary to a fresh directory and runs `test` in it
/// with the crate's data directory hidden.
fn run_copy_without_sources(test: &str) -> Option<Output> {
    let dir = tempfile::tempdir().unwrap();
    run_copy_in(dir.path(), &format!("--exact 'ktstr/{test}'"))
}

/// Runs a copy of the examples binary, made in `dir`, with `args` (shell
/// words) and the crate's data directory hidden.
fn run_copy_in(dir: &Path, args: &str) -> Option<Output> {
    let bin = examples_binary()?;
    let copy = dir.join("examples-copy");
    std::fs::copy(&bin, &copy).unwrap();
    let data = data_dir();
    let script = format!(
        "mount -t tmpfs ktstr-hidden '{}' && test ! -e '{}/hello.txt' && exec '{}' {args}",
        data.display(),
        data.display(),
        copy.display()
    );
    // A private cache so the embedded bytes are written fresh, not found.
    let cache = dir.join("cache");
    let mut cmd = Command::new("unshare");
    // The kernel as this process finds it (the private cache hides the
    // user's), in single-kernel mode whatever `cargo ktstr test` exported.
    cmd.env_remove("KTSTR_KERNEL_LIST");
    if let Ok(found) = ktstr_runtime::discovery::discover() {
        cmd.env("KTSTR_TEST_KERNEL", found.image);
    }
    Some(
        cmd
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("NEXTEST", "1")
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .unwrap(),
    )
}

#[test]
fn copied_binary_finds_include_files_on_the_host() {
    premise!(can_hide_sources(), "root and `unshare --mount` (to hide the sources)", "run as root with util-linux");
    let out = run_copy_without_sources("host_reads_include_files");
    premise!(out.is_some(), "the examples test binary", "cargo build -p ktstr-tests --tests");
    let out = out.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}:\n{text}", out.status);
    assert!(text.contains("PASS"), "{text}");
}

/// The same in a VM: the guest sees the file at /include/hello.txt.
#[test]
fn copied_binary_finds_include_files_in_the_guest() {
    premise!(can_hide_sources(), "root and `unshare --mount` (to hide the sources)", "run as root with util-linux");
    premise!(ktstr_runtime::discovery::discover().is_ok(), "a kernel for a VM test", "set KTSTR_TEST_KERNEL");
    let out = run_copy_without_sources("guest_gets_cmdline_and_files");
    premise!(out.is_some(), "the examples test binary", "cargo build -p ktstr-tests --tests");
    let out = out.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}:\n{text}", out.status);
    assert!(text.contains("PASS: ktstr/guest_gets_cmdline_and_files"), "{text}");
}

/// An exported `.run` carries the include file too.
#[test]
fn copied_binary_exports_its_include_files() {
    premise!(can_hide_sources(), "root and `unshare --mount` (to hide the sources)", "run as root with util-linux");
    premise!(ktstr_runtime::discovery::discover().is_ok(), "a kernel", "set KTSTR_TEST_KERNEL");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("t.run");
    let args = format!("--ktstr-export-test=guest_gets_cmdline_and_files --ktstr-export-output='{}'", run.display());
    let out = run_copy_in(dir.path(), &args);
    premise!(out.is_some(), "the examples test binary", "cargo build -p ktstr-tests --tests");
    let out = out.unwrap();
    assert!(out.status.success(), "export: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let x = dir.path().join("x");
    let o = Command::new(&run).arg("--extract").arg(&x).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(x.join("include/hello.txt")).unwrap().trim(), "hello from the host");
}
