//! The KVM backend on real kernels, proved under nested KVM: drives
//! `scripts/nested-kvm.sh`, which boots a QEMU TCG guest with kvm-amd
//! loaded and runs this crate's example and sched_ext test binaries
//! inside it with `KTSTR_VMM=kvm`, against the ktstr kernel and the
//! Debian cloud kernel.
//!
//! Slow (minutes of emulated CPU per test): runs only with
//! `KTSTR_SLOW_TESTS=1`. Its premises (QEMU, busybox-static, the Debian
//! kernel and modules from scripts/setup.sh, a ktstr kernel, the sibling
//! test binaries) SKIP when missing, and FAIL under `KTSTR_NO_SKIP_MODE=1`.
//! `NESTED_KVM_TESTS` (space-separated `BIN:TEST`) replaces the default list.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Default list: every vCPU count the examples ask for (1, 2, 4 with
/// NUMA, 4 with LLCs and SMT), the include-file test, and one sched_ext
/// scheduler.
const DEFAULT_TESTS: &[&str] = &[
    "examples:guest_gets_cmdline_and_files",
    "examples:spinners_all_make_progress",
    "examples:topology_matches_request",
    "examples:topology_llcs_and_smt_match_request",
    "sched_ext:scx_simple_workload",
];

use ktstr_runtime::testing::{premise, slow_tests_enabled};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The newest test binary `NAME-HASH` next to this one (cargo puts every
/// integration test binary of the crate in the same deps directory).
fn sibling_binary(name: &str) -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let dir = me.parent()?;
    let prefix = format!("{name}-");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && !n.contains('.') && e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0)
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn on_path(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().is_ok_and(|o| o.status.success())
}

/// One `nested-kvm: RESULT` line.
#[derive(Debug)]
struct Run {
    verdict: String,
    kernel: String,
    test: String,
}

fn parse_results(out: &str) -> Vec<Run> {
    out.lines()
        .filter_map(|l| l.strip_prefix("nested-kvm: RESULT "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let verdict = it.next()?.to_string();
            let field = |k: &str| l.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);
            Some(Run { verdict, kernel: field("kernel=")?, test: field("test=")? })
        })
        .collect()
}

#[test]
fn parses_rig_result_lines() {
    let out = "noise\nnested-kvm: RESULT PASS kernel=ktstr test=examples:a rc=0 secs=9.1\n\
               nested-kvm: RESULT SKIP kernel=debian test=sched_ext:b rc=0 secs=3\n";
    let r = parse_results(out);
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].verdict.as_str(), r[0].kernel.as_str(), r[0].test.as_str()), ("PASS", "ktstr", "examples:a"));
    assert_eq!((r[1].verdict.as_str(), r[1].kernel.as_str()), ("SKIP", "debian"));
}

#[test]
fn kvm_backend_passes_under_nested_kvm() {
    if !slow_tests_enabled() {
        return;
    }
    if !premise(on_path("qemu-system-x86_64"), "qemu-system-x86_64", "apt-get install qemu-system-x86")
        || !premise(on_path("busybox"), "busybox", "apt-get install busybox-static")
    {
        return;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"))
        .join("ktstr");
    let deb = std::fs::read_dir(cache.join("debian/x/boot"))
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.to_string_lossy().contains("vmlinuz-6.12")));
    let Some(deb) = deb else {
        premise(false, &format!("a Debian cloud kernel under {}", cache.join("debian/x/boot").display()), "run scripts/setup.sh");
        return;
    };
    let ktstr = match ktstr_runtime::discovery::discover() {
        Ok(f) => f.image,
        Err(e) => {
            premise(false, &format!("a ktstr kernel ({e})"), "set KTSTR_TEST_KERNEL");
            return;
        }
    };
    let (Some(examples), Some(sched_ext)) = (sibling_binary("examples"), sibling_binary("sched_ext")) else {
        premise(false, "the examples and sched_ext test binaries", "cargo build -p ktstr-tests --tests");
        return;
    };
    let sched_dir = std::env::var_os("KTSTR_SCHEDULER_DIR").map(PathBuf::from);

    let tests: Vec<String> = match std::env::var("NESTED_KVM_TESTS") {
        Ok(v) if !v.trim().is_empty() => v.split_whitespace().map(str::to_string).collect(),
        _ => DEFAULT_TESTS.iter().map(|s| s.to_string()).collect(),
    };
    let mut cmd = Command::new(repo().join("scripts/nested-kvm.sh"));
    cmd.arg("--bin").arg(format!("examples={}", examples.display()));
    cmd.arg("--bin").arg(format!("sched_ext={}", sched_ext.display()));
    cmd.arg("--kernel").arg(format!("ktstr={}", ktstr.display()));
    cmd.arg("--kernel").arg(format!("debian={}", deb.display()));
    if let Some(d) = &sched_dir {
        cmd.arg("--sched-dir").arg(d);
    }
    cmd.args(&tests);
    let out = cmd.output().expect("running scripts/nested-kvm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let runs = parse_results(&stdout);
    let mut bad = Vec::new();
    for t in &tests {
        for k in ["ktstr", "debian"] {
            let want_skip = k == "debian" && t.starts_with("sched_ext:");
            match runs.iter().find(|r| &r.test == t && r.kernel == k) {
                None => bad.push(format!("{t} on {k}: no verdict came back")),
                Some(r) if r.verdict == "PASS" || (want_skip && r.verdict == "SKIP") => {}
                Some(r) => bad.push(format!("{t} on {k}: {}", r.verdict)),
            }
        }
    }
    assert!(bad.is_empty(), "nested-KVM rig: {}", bad.join("; "));
    assert!(!stdout.contains("init after -"), "a run did not record when init started");
    assert!(out.status.success(), "rig exit status {:?}", out.status);
}
