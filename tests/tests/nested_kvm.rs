//! The KVM backend on real kernels, proved under nested KVM: drives
//! `scripts/nested-kvm.sh`, which boots a QEMU TCG guest with kvm-amd
//! loaded and runs this crate's example and sched_ext test binaries
//! inside it with `KTSTR_VMM=kvm`, against the ktstr kernel and the
//! Debian cloud kernel, each test resized to each vCPU count
//! (`KTSTR_CPUS`), on an outer guest of one vCPU (`NESTED_KVM_SMP=match`:
//! one outer boot per count with as many; docs/vmm.md weighs the two).
//! Two more run the snapshot test binary in the rig (VM snapshots saved
//! and restored by the KVM backend on both kernels) and ktstr-runtime's
//! kvm_snapshot micro-guests.
//!
//! Slow (minutes of emulated CPU): runs only with `KTSTR_SLOW_TESTS=1`.
//! By default (what CI runs) a subset at 1 and 2 vCPUs; with
//! `NESTED_KVM_FULL=1` every example and sched_ext workload test at 1, 2
//! and 4. `NESTED_KVM_TESTS` (space-separated `BIN:TEST`) and
//! `NESTED_KVM_CPUS` (`1,2,4`) replace the list and the counts. Its
//! premises (QEMU, busybox-static, the Debian kernel and modules from
//! scripts/setup.sh, a ktstr kernel, the sibling test binaries) SKIP when
//! missing, and FAIL under `KTSTR_NO_SKIP_MODE=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// CI's subset: the include-file test, spinners on every vCPU, the NUMA
/// topology as the kernel reads our ACPI tables, and one sched_ext
/// scheduler. Not `two_cgroups_share_cpu`: its ±25 % CPU-time check is
/// unsound in the rig (docs/vmm.md, "Outer vCPUs").
const CI_TESTS: &[&str] = &[
    "examples:guest_gets_cmdline_and_files",
    "examples:spinners_all_make_progress",
    "examples:topology_matches_request",
    "sched_ext:scx_simple_workload",
];
const CI_CPUS: &str = "1,2";
const FULL_CPUS: &str = "1,2,4";

/// Tests with `min_cpus = 2`: at 1 vCPU they SKIP (docs/harness.md).
const MIN_TWO_CPUS: &[&str] = &["examples:unfair_split_is_detected"];
/// Tests with `max_cpus = 1` (6.12's scx_central and scx_flatcg): above 1 vCPU they SKIP.
const MAX_ONE_CPU: &[&str] = &["sched_ext:scx_central_workload", "sched_ext:scx_flatcg_workload"];

/// The examples binary's `host_only` tests: they boot no VM, so the rig
/// has nothing to prove with them.
const HOST_ONLY_EXAMPLES: &[&str] = &["host_reads_include_files", "host_workers_report", "kernel_lookalike"];

use ktstr_runtime::testing::{premise, slow_tests_enabled};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The newest test binary `NAME-HASH` next to this one (cargo puts every
/// integration test binary of the crate in the same deps directory) that
/// lists `marker` (a bench target of another crate can share the name).
fn sibling_binary(name: &str, marker: &str) -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let dir = me.parent()?;
    let prefix = format!("{name}-");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && !n.contains('.') && e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0)
        })
        .filter_map(|e| Some((e.metadata().and_then(|m| m.modified()).ok()?, e.path())))
        .collect();
    found.sort();
    found.into_iter().rev().map(|(_, p)| p).find(|p| {
        Command::new(p)
            .args(["--list", "--format", "terse"])
            .env("NEXTEST", "1")
            .env_remove("KTSTR_KERNEL_LIST")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(marker)))
    })
}

/// The rig's `--kernel` arguments for the two kernels, as `/k/ktstr` and `/k/debian`.
fn kernel_args(ktstr: &Path, deb: &Path) -> [String; 4] {
    ["--kernel".into(), format!("ktstr={}", ktstr.display()), "--kernel".into(), format!("debian={}", deb.display())]
}

/// Runs the rig with `args`, echoing what it printed; its stdout and exit status.
fn run_rig(args: &[String]) -> (String, std::process::ExitStatus) {
    let out = Command::new(repo().join("scripts/nested-kvm.sh")).args(args).output().expect("running scripts/nested-kvm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (stdout, out.status)
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
    cpus: String,
    init: String,
    /// How much of the run the outer vCPU threads waited for a host CPU.
    host_wait: String,
}

fn parse_results(out: &str) -> Vec<Run> {
    out.lines()
        .filter_map(|l| l.strip_prefix("nested-kvm: RESULT "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let verdict = it.next()?.to_string();
            let field = |k: &str| l.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);
            Some(Run {
                verdict,
                kernel: field("kernel=")?,
                test: field("test=")?,
                cpus: field("cpus=")?,
                init: field("init=").unwrap_or_else(|| "-".into()),
                host_wait: field("host_wait=").unwrap_or_else(|| "-".into()),
            })
        })
        .collect()
}

#[test]
fn parses_rig_result_lines() {
    let out = "noise\nnested-kvm: RESULT PASS kernel=ktstr test=examples:a cpus=2 rc=0 secs=9.1 init=1.77 total=2.13 host_wait=3%\n\
               nested-kvm: RESULT SKIP kernel=debian test=sched_ext:b cpus=4 rc=0 secs=3 init=- total=-\n";
    let r = parse_results(out);
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].verdict.as_str(), r[0].kernel.as_str(), r[0].test.as_str()), ("PASS", "ktstr", "examples:a"));
    assert_eq!((r[0].cpus.as_str(), r[0].init.as_str(), r[0].host_wait.as_str()), ("2", "1.77", "3%"));
    assert_eq!(r[1].host_wait, "-");
    assert_eq!((r[1].verdict.as_str(), r[1].kernel.as_str(), r[1].cpus.as_str(), r[1].init.as_str()), ("SKIP", "debian", "4", "-"));
}

/// The `ktstr/` tests `bin` lists under nextest, without the prefix;
/// with `ignored`, only the ignored ones (`demo_`).
fn listed(bin: &Path, ignored: bool) -> Vec<String> {
    let mut cmd = Command::new(bin);
    cmd.args(["--list", "--format", "terse"]).env("NEXTEST", "1");
    if ignored {
        cmd.arg("--ignored");
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("KTSTR_KERNEL") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("{} --list: {e}", bin.display()));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test")?.strip_prefix("ktstr/"))
        .filter(|n| !n.contains('/'))
        .map(str::to_string)
        .collect()
}

/// The tests a plain nextest run of `bin` runs: listed and not ignored.
fn listed_vm_tests(bin: &Path) -> Vec<String> {
    let ignored = listed(bin, true);
    assert!(ignored.iter().any(|n| n.starts_with("demo_")), "{}: no ignored demo_ tests listed; the filter below is blind", bin.display());
    listed(bin, false).into_iter().filter(|n| !ignored.contains(n)).collect()
}

/// Every example VM test and every sched_ext workload test, as `BIN:TEST`.
fn full_list(examples: &Path, sched_ext: &Path) -> Vec<String> {
    let ex = listed_vm_tests(examples);
    assert!(HOST_ONLY_EXAMPLES.iter().all(|h| ex.iter().any(|n| n == h)), "{HOST_ONLY_EXAMPLES:?} are no longer examples: update the list");
    let mut all: Vec<String> = ex.iter().filter(|n| !HOST_ONLY_EXAMPLES.contains(&n.as_str())).map(|n| format!("examples:{n}")).collect();
    all.extend(listed_vm_tests(sched_ext).iter().filter(|n| n.ends_with("_workload")).map(|n| format!("sched_ext:{n}")));
    all
}

/// The rig's premises: QEMU, busybox, the Debian cloud kernel (the
/// outer one, and a test kernel) and a ktstr kernel; `None` after a SKIP.
fn rig_kernels() -> Option<(PathBuf, PathBuf)> {
    if !premise(on_path("qemu-system-x86_64"), "qemu-system-x86_64", "apt-get install qemu-system-x86")
        || !premise(on_path("busybox"), "busybox", "apt-get install busybox-static")
    {
        return None;
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
        return None;
    };
    match ktstr_runtime::discovery::discover() {
        Ok(f) => Some((deb, f.image)),
        Err(e) => {
            premise(false, &format!("a ktstr kernel ({e})"), "set KTSTR_TEST_KERNEL");
            None
        }
    }
}

#[test]
fn kvm_backend_passes_under_nested_kvm() {
    if !slow_tests_enabled() {
        return;
    }
    let Some((deb, ktstr)) = rig_kernels() else { return };
    let (Some(examples), Some(sched_ext)) = (sibling_binary("examples", "ktstr/spinners_all_make_progress"), sibling_binary("sched_ext", "ktstr/scx_simple_workload")) else {
        premise(false, "the examples and sched_ext test binaries", "cargo build -p ktstr-tests --tests");
        return;
    };
    let sched_dir = std::env::var_os("KTSTR_SCHEDULER_DIR").map(PathBuf::from);

    let full = std::env::var("NESTED_KVM_FULL").is_ok_and(|v| v == "1");
    let tests: Vec<String> = match std::env::var("NESTED_KVM_TESTS") {
        Ok(v) if !v.trim().is_empty() => v.split_whitespace().map(str::to_string).collect(),
        _ if full => full_list(&examples, &sched_ext),
        _ => CI_TESTS.iter().map(|s| s.to_string()).collect(),
    };
    let cpus = std::env::var("NESTED_KVM_CPUS").ok().filter(|v| !v.trim().is_empty());
    let cpus = cpus.unwrap_or_else(|| (if full { FULL_CPUS } else { CI_CPUS }).to_string());
    let counts: Vec<&str> = cpus.split(',').map(str::trim).collect();
    let pin = PathBuf::from(env!("CARGO_BIN_EXE_nested-kvm-pin"));
    let mut args = vec![
        "--bin".into(),
        format!("examples={}", examples.display()),
        "--bin".into(),
        format!("sched_ext={}", sched_ext.display()),
        "--cpus".into(),
        cpus.clone(),
        "--pin".into(),
        pin.display().to_string(),
    ];
    args.extend(kernel_args(&ktstr, &deb));
    if let Some(d) = &sched_dir {
        args.extend(["--sched-dir".into(), d.display().to_string()]);
    }
    args.extend(tests.iter().cloned());
    let t0 = std::time::Instant::now();
    let (stdout, status) = run_rig(&args);
    let runs = parse_results(&stdout);
    let mut bad = Vec::new();
    for n in &counts {
        for t in &tests {
            for k in ["ktstr", "debian"] {
                let want_skip = (k == "debian" && t.starts_with("sched_ext:"))
                    || (*n == "1" && MIN_TWO_CPUS.contains(&t.as_str()))
                    || (*n != "1" && MAX_ONE_CPU.contains(&t.as_str()));
                match runs.iter().find(|r| &r.test == t && r.kernel == k && r.cpus == *n) {
                    None => bad.push(format!("{t} on {k} at {n} vCPUs: no verdict came back")),
                    Some(r) if want_skip && r.verdict == "SKIP" => {}
                    Some(r) if want_skip => bad.push(format!("{t} on {k} at {n} vCPUs: {}, want SKIP", r.verdict)),
                    Some(r) if r.verdict == "PASS" && r.init == "-" => {
                        bad.push(format!("{t} on {k} at {n} vCPUs: the timing line has no init time"))
                    }
                    Some(r) if r.verdict == "PASS" => {}
                    // host_wait tells a fairness FAIL under host contention
                    // (TCG gives the outer guest no steal time) from a real one.
                    Some(r) => bad.push(format!("{t} on {k} at {n} vCPUs: {} (outer vCPUs waited {} for a host CPU)", r.verdict, r.host_wait)),
                }
            }
        }
    }
    eprintln!(
        "nested-KVM rig: {} runs ({} tests x 2 kernels x vCPUs {cpus}) in {:.0}s",
        runs.len(),
        tests.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(bad.is_empty(), "nested-KVM rig: {}", bad.join("; "));
    assert!(status.success(), "rig exit status {status:?}");
}

/// The `nested-kvm: out| ` lines of the rig's `--run LABEL`.
fn run_output(stdout: &str, label: &str) -> String {
    let begin = format!("nested-kvm: BEGIN run={label}");
    let end = format!(" run={label} rc=");
    stdout
        .lines()
        .skip_while(|l| *l != begin)
        .take_while(|l| !(l.starts_with("nested-kvm: RESULT") && l.contains(&end)))
        .filter_map(|l| l.strip_prefix("nested-kvm: out| "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn run_output_takes_one_runs_lines() {
    let out = "nested-kvm: BEGIN run=a\nnested-kvm: out| one\n[ 1.0] kvm: noise\nnested-kvm: RESULT PASS run=a rc=0 secs=1\n\
               nested-kvm: BEGIN run=ab\nnested-kvm: out| two\nnested-kvm: RESULT FAIL run=ab rc=1 secs=1\n";
    assert_eq!(run_output(out, "a"), "one");
    assert_eq!(run_output(out, "ab"), "two");
    assert_eq!(run_output(out, "b"), "");
}

/// VM snapshots on the KVM backend with real kernels: the snapshot test
/// binary (saves at the ready point, restores, isolation, random bytes,
/// the clock, corrupt and unloadable saves, payload failures) run inside
/// the rig, where its backend is KVM, on the ktstr kernel; and its
/// `restored_` tests (the kernel-dependent part: a restored guest runs
/// its test) on the Debian one, whose init rings the doorbell from user
/// space through ioperm (ktstr's kernel has no CONFIG_X86_IOPL_IOPERM).
#[test]
fn kvm_snapshots_pass_under_nested_kvm() {
    if !slow_tests_enabled() {
        return;
    }
    let Some((deb, ktstr)) = rig_kernels() else { return };
    let Some(snapshot) = sibling_binary("snapshot", "ktstr/snap_leaves_a_file") else {
        premise(false, "the snapshot test binary", "cargo build -p ktstr-tests --tests");
        return;
    };
    let t0 = std::time::Instant::now();
    let mut args = vec![
        "--bin".into(),
        format!("snapshot={}", snapshot.display()),
        "--run".into(),
        "snap_ktstr=KTSTR_TEST_KERNEL=/k/ktstr/bzImage /t/snapshot --test-threads 1 --nocapture".into(),
        "--run".into(),
        "snap_debian=KTSTR_TEST_KERNEL=/k/debian/bzImage /t/snapshot restored_ --test-threads 1 --nocapture".into(),
    ];
    args.extend(kernel_args(&ktstr, &deb));
    let (stdout, status) = run_rig(&args);
    eprintln!("nested-KVM rig: snapshot tests on 2 kernels in {:.0}s", t0.elapsed().as_secs_f64());
    for k in ["ktstr", "debian"] {
        let label = format!("snap_{k}");
        assert!(stdout.contains(&format!("nested-kvm: RESULT PASS run={label} ")), "the snapshot tests failed under nested KVM on the {k} kernel");
        // Restored on KVM, not every test fallen back to a cold boot.
        assert!(
            run_output(&stdout, &label).contains("kvm backend (restored from snapshot)"),
            "no test was restored on the KVM backend with the {k} kernel"
        );
    }
    assert!(status.success(), "rig exit status {status:?}");
}

/// The KVM snapshot micro-guests (ktstr-runtime's kvm_snapshot tests)
/// on the rig's KVM, which is QEMU TCG's SVM: it refuses ring-3 I/O
/// through a TSS restored busy, as KVM reports it (the TR fix).
#[test]
fn kvm_snapshot_micro_guests_pass_under_nested_kvm() {
    if !slow_tests_enabled() {
        return;
    }
    // The Debian kernel is the outer one; no test kernel runs here.
    if rig_kernels().is_none() {
        return;
    }
    let Some(micro) = sibling_binary("kvm_snapshot", "kvm_snapshot_user_io_through_the_tss_bitmap_after_restore") else {
        premise(false, "ktstr-runtime's kvm_snapshot test binary", "cargo build -p ktstr-runtime --test kvm_snapshot");
        return;
    };
    let (stdout, status) = run_rig(&[
        "--bin".into(),
        format!("kvm_snapshot={}", micro.display()),
        "--run".into(),
        "micro=/t/kvm_snapshot --test-threads 1".into(),
    ]);
    assert!(stdout.contains("nested-kvm: RESULT PASS run=micro "), "the KVM snapshot micro-guests failed under nested KVM");
    let lines = run_output(&stdout, "micro");
    assert!(
        lines.contains("test kvm_snapshot_user_io_through_the_tss_bitmap_after_restore ... ok"),
        "the ring-3 I/O micro-guest did not pass:\n{lines}"
    );
    assert!(status.success(), "rig exit status {status:?}");
}
