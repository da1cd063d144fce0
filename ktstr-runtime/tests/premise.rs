//! `ktstr_runtime::testing`: a missing premise is a visible, countable
//! SKIP line, a test failure under `KTSTR_NO_SKIP_MODE=1`, and an allowed
//! skip only for tests named in `KTSTR_EXPECTED_SKIPS`. Each case runs the
//! (ignored) probe test below in a child with its own environment.

use std::process::Command;

/// The probe: a test whose premise is always missing.
#[test]
#[ignore = "run by premise_outcomes in a child process"]
fn probe_missing_premise() {
    if !ktstr_runtime::testing::premise(false, "a unicorn", "fetch one from the stable") {
        return;
    }
    unreachable!("the premise is missing");
}

struct Child {
    ok: bool,
    stderr: String,
}

fn probe(env: &[(&str, &str)]) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "probe_missing_premise", "--ignored", "--nocapture", "--test-threads=1"]);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KTSTR_") || k.starts_with("NEXTEST")) {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    let o = c.output().unwrap();
    Child { ok: o.status.success(), stderr: String::from_utf8_lossy(&o.stderr).into_owned() }
}

#[test]
fn premise_outcomes() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("skips.log");
    let log = log.to_str().unwrap();

    let r = probe(&[("KTSTR_SKIP_LOG", log)]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("ktstr: SKIP: probe_missing_premise: a unicorn; fetch one from the stable"),
        "one SKIP line with the test's name and the fix: {}",
        r.stderr
    );
    assert_eq!(std::fs::read_to_string(log).unwrap(), "probe_missing_premise\ta unicorn; fetch one from the stable\n");

    let r = probe(&[("KTSTR_NO_SKIP_MODE", "1"), ("KTSTR_SKIP_LOG", log)]);
    assert!(!r.ok, "a missing premise fails under KTSTR_NO_SKIP_MODE=1: {}", r.stderr);
    assert!(
        r.stderr.contains("premise missing under KTSTR_NO_SKIP_MODE=1: a unicorn; fetch one from the stable"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read_to_string(log).unwrap().lines().count(), 1, "a failure is not logged as a skip");

    let expected = d.path().join("expected");
    std::fs::write(&expected, "# this host has no unicorns\nprobe_missing_premise  a unicorn\n").unwrap();
    let r = probe(&[("KTSTR_NO_SKIP_MODE", "1"), ("KTSTR_EXPECTED_SKIPS", expected.to_str().unwrap()), ("KTSTR_SKIP_LOG", log)]);
    assert!(r.ok, "an expected skip is allowed: {}", r.stderr);
    assert!(r.stderr.contains("ktstr: SKIP: probe_missing_premise: a unicorn"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(log).unwrap().lines().count(), 2, "and still counted");

    for other in ["probe_missing_premise_2\n", "probe_missing_premise  a dragon\n"] {
        std::fs::write(&expected, other).unwrap();
        let r = probe(&[("KTSTR_NO_SKIP_MODE", "1"), ("KTSTR_EXPECTED_SKIPS", expected.to_str().unwrap())]);
        assert!(!r.ok, "only the whole name, for the reason given, is expected ({other:?}): {}", r.stderr);
    }
}

#[test]
fn slow_gate() {
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "probe_slow_gate", "--ignored", "--nocapture", "--test-threads=1"]);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KTSTR_")) {
            c.env_remove(k);
        }
        let o = c.envs(env.iter().copied()).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    };
    let (ok, out) = run(&[]);
    assert!(ok && out.contains("ktstr: SKIP: probe_slow_gate: a slow test"), "{out}");
    let (ok, out) = run(&[("KTSTR_NO_SKIP_MODE", "1")]);
    assert!(!ok && out.contains("set KTSTR_SLOW_TESTS=1"), "CI cannot silently skip slow tests: {out}");
    let (ok, out) = run(&[("KTSTR_NO_SKIP_MODE", "1"), ("KTSTR_SLOW_TESTS", "1")]);
    assert!(ok && out.contains("slow body ran"), "{out}");
}

#[test]
#[ignore = "run by slow_gate in a child process"]
fn probe_slow_gate() {
    if !ktstr_runtime::testing::slow_tests_enabled() {
        return;
    }
    println!("slow body ran");
}
