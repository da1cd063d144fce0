//! `.ci/skip-report`, the step that ends `.ci/run`: lists the skips the
//! suite logged, fails on one not in the expected list, and ends with the
//! count.

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/skip-report")
}

fn report(log: &str, expected: &str) -> (Option<i32>, String) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("log"), log).unwrap();
    std::fs::write(d.path().join("expected"), expected).unwrap();
    let o = Command::new("bash").arg(script()).arg(d.path().join("log")).arg(d.path().join("expected")).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
}

#[test]
fn skip_report_counts_lists_and_fails_on_unexpected() {
    let expected = "# host limits\nkvm_boots_x  no usable  # kvm_pvm\n";
    let (code, out) = report("", expected);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().last(), Some("ktstr CI: 0 test(s) skipped (0 unexpected)"), "{out}");

    let (code, out) = report("kvm_boots_x\tno usable KVM\nkvm_boots_x\tno usable KVM\n", expected);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("expected:   kvm_boots_x\tno usable KVM"), "{out}");
    assert_eq!(out.lines().last(), Some("ktstr CI: 1 test(s) skipped (0 unexpected)"), "a retried skip counts once: {out}");

    let (code, out) = report("kvm_boots_x\tno usable KVM\ndriver::vm_verdicts\tno kernel\nkvm_boots\tno usable KVM\n", expected);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("UNEXPECTED: driver::vm_verdicts\tno kernel"), "{out}");
    assert!(out.contains("UNEXPECTED: kvm_boots\tno usable KVM"), "whole names only: {out}");
    assert_eq!(out.lines().last(), Some("ktstr CI: 3 test(s) skipped (2 unexpected)"), "{out}");

    let (code, out) = report("kvm_boots_x\tno kernel found\n", expected);
    assert_eq!(code, Some(1), "expected only for the reason listed: {out}");
    assert!(out.contains("UNEXPECTED: kvm_boots_x\tno kernel found"), "{out}");
}

/// `.ci/run` runs the suite with skips turned into failures and hands the
/// log to the report (a cheap guard against the wiring being dropped).
#[test]
fn ci_run_sets_no_skip_mode_and_reports() {
    let run = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/run")).unwrap();
    for want in ["export KTSTR_NO_SKIP_MODE=1", "export KTSTR_SKIP_LOG", "export KTSTR_EXPECTED_SKIPS", ".ci/skip-report \"$KTSTR_SKIP_LOG\""] {
        assert!(run.contains(want), "{want:?} missing from .ci/run");
    }
    assert!(run.trim_end().ends_with("exit \"$rc\""), "the report is the last output");
}

/// The README's one-kernel filter, applied by nextest itself to this
/// crate's listing for the quick start's kernels plus look-alikes, selects
/// exactly the ktstr-built 6.12.
#[test]
fn readme_kernel_filter_selects_one_kernel() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let filter = readme.split("scripts/quickstart.sh -E '").nth(1).and_then(|r| r.split('\'').next()).expect("a quickstart -E filter in README.md");
    let list = "6.12.117=/a;path_vmlinuz_6_12_117_deb12_cloud_amd64_4be0c1=/b;6.12.117-rc1=/c;6.12.117_a1b2c3=/d";
    let mut c = Command::new("cargo");
    c.args(["nextest", "list", "--offline", "-p", "ktstr-tests", "--test", "examples", "-E"])
        .arg(format!("({filter}) & test(two_cgroups_share_cpu)"))
        .current_dir(&root)
        .env("KTSTR_KERNEL_LIST", list);
    // Nothing of this test's own run leaks in (cargo's per-package
    // variables describe this test); the target dir and cargo home stay.
    let ours = |k: &str| {
        k.starts_with("NEXTEST")
            || (k.starts_with("KTSTR_") && k != "KTSTR_KERNEL_LIST")
            || (k.starts_with("CARGO_") && !["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&k))
    };
    for (k, _) in std::env::vars().filter(|(k, _)| ours(k)) {
        c.env_remove(k);
    }
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    let names: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!(names, ["ktstr/two_cgroups_share_cpu/kernel_6_12_117"], "{filter:?} selected: {out}");
}
