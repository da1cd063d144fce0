//! `cargo ktstr test` and `cargo ktstr export` end to end, in a user's
//! crate outside the workspace (tests/fixture), against two real kernels:
//! the ktstr 6.12 built from Debian's tarball (in the suite's own cache,
//! `~/.cache/ktstr/test-cache`: a hit once kernel_slow.rs or an earlier run
//! built it) and the Debian cloud image named by `KTSTR_DEBIAN_KERNEL`.
//! Slow (kernel boots, a crate build): only with KTSTR_SLOW_TESTS=1.

mod fixture;

use std::path::{Path, PathBuf};
use std::process::Output;

use fixture::{results, text, Fixture, TARBALL};

fn kernels() -> Option<(String, PathBuf)> {
    if !ktstr_runtime::testing::slow_tests_enabled() {
        return None;
    }
    assert!(Path::new(TARBALL).is_file(), "KTSTR_SLOW_TESTS=1 but {TARBALL} is missing (apt-get install linux-source-6.12)");
    Some((TARBALL.to_string(), fixture::debian_kernel()))
}

fn names_with(rs: &[(String, String)], status: &str, base: &str) -> Vec<String> {
    rs.iter().filter(|(s, n)| s == status && n.starts_with(base)).map(|(_, n)| n.clone()).collect()
}

fn run_file(path: &Path, cwd: &Path) -> Output {
    let mut c = std::process::Command::new(path);
    c.current_dir(cwd);
    fixture::scrub_env(&mut c);
    c.output().unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn test_and_export_end_to_end() {
    let Some((tarball, deb)) = kernels() else { return };
    // Not beside kernel_slow.rs's in-place kernel builds: both want the CPUs.
    let _serial = fixture::serial();
    let f = Fixture::new();

    // Acceptance 1: every VM test once per kernel, with kernel_ suffixes;
    // the failing test makes the command exit non-zero.
    let o = f.cargo_ktstr(&["test", "--kernel", &tarball, "--kernel", deb.to_str().unwrap(), "--", "--no-fail-fast"]);
    let out = text(&o);
    eprintln!("{out}");
    assert_ne!(o.status.code(), Some(0), "a failing test must fail the command");
    let rs = results(&out);
    let passed = names_with(&rs, "PASS", "ktstr/reports_kernel/");
    assert_eq!(passed.len(), 2, "reports_kernel once per kernel: {rs:?}");
    let suffix = |n: &String| n.rsplit('/').next().unwrap().to_string();
    let ktstr_label = passed.iter().map(suffix).find(|s| s.starts_with("kernel_6_12_")).expect("the tarball kernel's label");
    assert!(passed.iter().any(|n| suffix(n).starts_with("kernel_path_vmlinuz_")), "the Debian image's label: {passed:?}");
    assert_eq!(names_with(&rs, "PASS", "ktstr/spinners_progress/").len(), 2, "{rs:?}");
    assert_eq!(names_with(&rs, "FAIL", "ktstr/fails_on_purpose/").len(), 2, "{rs:?}");
    assert_eq!(names_with(&rs, "PASS", "ktstr/host_side"), ["ktstr/host_side"], "host_only: once, no suffix");
    assert!(out.contains("e2e: this test fails on purpose"), "the failure shows the test's own error");

    // One kernel only, selected by its suffix; the guest proves which ran.
    let filter = format!("test({ktstr_label}) & !test(fails_on_purpose)");
    let o = f.cargo_ktstr(&[
        "test", "--kernel", &tarball, "--kernel", deb.to_str().unwrap(), "--", "-E", &filter, "--success-output", "final",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let rs = results(&out);
    assert_eq!(rs.len(), 2, "{rs:?}");
    assert!(rs.iter().all(|(s, n)| s == "PASS" && n.ends_with(&ktstr_label)), "{rs:?}");
    assert!(out.contains("guest uname -r 6.12"), "{out}");
    assert!(!out.contains("cloud-amd64,"), "the Debian kernel must not have run: {out}");

    // Acceptance 3: export to a .run, run it on this host; not found; refused.
    let o = f.cargo_ktstr(&["export", "spinners_progress"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let run = f.path().join("spinners_progress.run");
    let body = std::fs::read(&run).unwrap();
    let preamble = String::from_utf8_lossy(&body[..body.windows(12).position(|w| w == b"\n__ARCHIVE__").unwrap()]).into_owned();
    assert!(preamble.starts_with("#!/usr/bin/env bash\n"), "{preamble}");
    assert!(!preamble.contains(f.path().to_str().unwrap()) && !preamble.contains("/target/"), "host paths in: {preamble}");
    let elsewhere = tempfile::tempdir().unwrap();
    // Without root this part skips visibly (and fails under KTSTR_NO_SKIP_MODE=1); the rest still runs.
    if ktstr_runtime::testing::premise(is_root(), "root, to run the host-mode .run files", "run as root") {
        let o = run_file(&run, elsewhere.path());
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert!(text(&o).contains("ktstr: PASS: ktstr/spinners_progress"), "{}", text(&o));

        let o = f.cargo_ktstr(&["export", "ktstr/fails_on_purpose", "-o", "out/fail.run"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let o = run_file(&f.path().join("out/fail.run"), elsewhere.path());
        assert_eq!(o.status.code(), Some(1), "the .run exits with the verdict: {}", text(&o));
        assert!(text(&o).contains("e2e: this test fails on purpose"), "{}", text(&o));
    }
    let o = f.cargo_ktstr(&["export", "no_such_test"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("\"no_such_test\" not found"), "{}", text(&o));
    let o = f.cargo_ktstr(&["export", "host_side"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("host_only") && text(&o).contains("refused by"), "{}", text(&o));
    assert!(!f.path().join("host_side.run").exists());

    // Acceptance 4: --vm embeds the kernel; the .run boots it and reports.
    let o = f.cargo_ktstr(&["export", "reports_kernel", "--vm", "--kernel", deb.to_str().unwrap(), "-o", "vm.run"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run_file(&f.path().join("vm.run"), elsewhere.path());
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("ktstr: PASS: ktstr/reports_kernel"), "{out}");
    assert!(out.contains("cloud-amd64"), "the embedded Debian kernel ran: {out}");
    assert!(std::fs::read_dir(elsewhere.path()).unwrap().next().is_none(), "the .run leaves nothing behind in its cwd");

    // A gauntlet variant: only with --vm, and the .run boots the preset's topology.
    let variant = "gauntlet/reports_kernel/llc2";
    let o = f.cargo_ktstr(&["export", variant]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains(&format!("cargo ktstr export --vm {variant}")), "{}", text(&o));
    let o = f.cargo_ktstr(&["export", "--vm", "--kernel", deb.to_str().unwrap(), "gauntlet/reports_kernel/llc99"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("unknown gauntlet preset \"llc99\""), "{}", text(&o));
    let o = f.cargo_ktstr(&["export", "--vm", "--kernel", deb.to_str().unwrap(), variant]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run_file(&f.path().join("reports_kernel-llc2.run"), elsewhere.path());
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains(&format!("ktstr: PASS: {variant}")), "{out}");
    assert!(out.contains("e2e cpus: 0-3"), "llc2 is two LLCs of two cores: {out}");
}
