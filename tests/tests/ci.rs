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
    let expected = "# host limits\nkvm_boots_x  # kvm_pvm\n";
    let (code, out) = report("", expected);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().last(), Some("ktstr CI: 0 test(s) skipped (0 unexpected)"), "{out}");

    let (code, out) = report("kvm_boots_x\tno usable KVM\nkvm_boots_x\tno usable KVM\n", expected);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("expected:   kvm_boots_x\tno usable KVM"), "{out}");
    assert_eq!(out.lines().last(), Some("ktstr CI: 1 test(s) skipped (0 unexpected)"), "a retried skip counts once: {out}");

    let (code, out) = report("kvm_boots_x\tno usable KVM\ndriver::vm_verdicts\tno kernel\nkvm_boots\tprefix only\n", expected);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("UNEXPECTED: driver::vm_verdicts\tno kernel"), "{out}");
    assert!(out.contains("UNEXPECTED: kvm_boots\tprefix only"), "whole names only: {out}");
    assert_eq!(out.lines().last(), Some("ktstr CI: 3 test(s) skipped (2 unexpected)"), "{out}");
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
