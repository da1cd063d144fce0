//! Missing premises in ktstr's own tests (and any crate's tests that use
//! it): a test that cannot run here says so in one countable line, and
//! under `KTSTR_NO_SKIP_MODE=1` it fails instead of passing vacuously.
//!
//! - `KTSTR_NO_SKIP_MODE=1`: a missing premise panics (the test fails)
//!   naming what is missing and the fix, unless the file
//!   `KTSTR_EXPECTED_SKIPS` names lists it: a premise this host is known
//!   not to give. Each line is a test name, optionally followed by text
//!   the skip reason must contain; `#` starts a comment.
//! - Otherwise it prints `ktstr: SKIP: <test>: <what is missing>; <fix>`
//!   on stderr and the caller returns.
//! - Every skip that happens is appended to `KTSTR_SKIP_LOG` when set
//!   (`<test>\t<reason>` per line), so CI can count and list them.

use std::io::Write;

/// The test running on this thread: libtest names each test's thread
/// after the test; elsewhere the executable's name.
pub fn current_test() -> String {
    match std::thread::current().name() {
        Some(n) if n != "main" => n.to_string(),
        _ => std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "?".into()),
    }
}

/// True when the `KTSTR_EXPECTED_SKIPS` file lists `test` skipping for `reason`.
pub fn skip_expected(test: &str, reason: &str) -> bool {
    let Some(path) = std::env::var_os("KTSTR_EXPECTED_SKIPS").filter(|p| !p.is_empty()) else { return false };
    let list = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("KTSTR_EXPECTED_SKIPS={}: {e}", std::path::Path::new(&path).display()));
    expected_in(&list, test, reason)
}

fn expected_in(list: &str, test: &str, reason: &str) -> bool {
    list.lines().map(|l| l.split('#').next().unwrap_or("").trim()).any(|l| {
        let (name, needle) = l.split_once(char::is_whitespace).map_or((l, ""), |(n, r)| (n, r.trim()));
        !name.is_empty() && name == test && reason.contains(needle)
    })
}

/// Appends one skip to `KTSTR_SKIP_LOG` (one `write` of one line, so
/// parallel test processes do not interleave).
pub fn record_skip(test: &str, reason: &str) {
    let Some(path) = std::env::var_os("KTSTR_SKIP_LOG").filter(|p| !p.is_empty()) else { return };
    let line = format!("{test}\t{}\n", reason.replace(['\n', '\t'], " "));
    let f = std::fs::OpenOptions::new().create(true).append(true).open(&path);
    if let Err(e) = f.and_then(|mut f| f.write_all(line.as_bytes())) {
        panic!("KTSTR_SKIP_LOG={}: {e}", std::path::Path::new(&path).display());
    }
}

/// Reports that this test's premise `what` is missing (`fix` says how to
/// provide it). Panics under `KTSTR_NO_SKIP_MODE=1` unless the test is
/// an expected skip; otherwise prints the SKIP line. The caller returns.
#[track_caller]
pub fn skip(what: &str, fix: &str) {
    let test = current_test();
    let reason = if fix.is_empty() { what.to_string() } else { format!("{what}; {fix}") };
    if crate::verdict::no_skip_mode() && !skip_expected(&test, &reason) {
        panic!("ktstr: FAIL: {test}: premise missing under KTSTR_NO_SKIP_MODE=1: {reason}");
    }
    eprintln!("ktstr: SKIP: {test}: {reason}");
    record_skip(&test, &reason);
}

/// `present`, or [`skip`] and false: `if !premise(ok, what, fix) { return }`.
#[track_caller]
pub fn premise(present: bool, what: &str, fix: &str) -> bool {
    if !present {
        skip(what, fix);
    }
    present
}

/// `Some(v)`, or [`skip`] and `None`: `let Some(x) = require(..) else { return }`.
#[track_caller]
pub fn require<T>(v: Option<T>, what: &str, fix: &str) -> Option<T> {
    if v.is_none() {
        skip(what, fix);
    }
    v
}

/// The value of a KVM step, or [`skip`] and `None` when this host has no
/// usable `/dev/kvm` (or is under transient pressure); any other error
/// fails the test.
#[track_caller]
pub fn kvm<T>(r: Result<T, crate::vmm::VmError>) -> Option<T> {
    use crate::vmm::VmError;
    match r {
        Ok(v) => Some(v),
        Err(e @ (VmError::KvmUnavailable(_) | VmError::Transient { .. })) => {
            skip(&format!("a usable /dev/kvm ({e})"), "run on a host with KVM");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The gate of slow tests (real kernel builds, crate builds): they run
/// with `KTSTR_SLOW_TESTS=1`; without it they skip, and under
/// `KTSTR_NO_SKIP_MODE=1` (CI) they fail rather than skip.
#[track_caller]
pub fn slow_tests_enabled() -> bool {
    premise(
        std::env::var("KTSTR_SLOW_TESTS").is_ok_and(|v| v == "1"),
        "a slow test (KTSTR_SLOW_TESTS is not 1)",
        "set KTSTR_SLOW_TESTS=1 to run it (.ci/run does)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_list_matches_whole_names() {
        let list = "# comment\nkvm_boots_x  a KVM that passes # why\n\ndriver::a\n";
        assert!(expected_in(list, "kvm_boots_x", "needs a KVM that passes the self-test"));
        assert!(!expected_in(list, "kvm_boots_x", "no kernel found"), "only for the reason given");
        assert!(expected_in(list, "driver::a", "anything"));
        assert!(!expected_in(list, "kvm_boots", "a KVM that passes"));
        assert!(!expected_in(list, "comment", ""));
    }

    #[test]
    fn current_test_is_the_libtest_name() {
        assert_eq!(current_test(), "testing::tests::current_test_is_the_libtest_name");
    }
}
