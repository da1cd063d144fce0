//! Drives this very test binary the way nextest does (`NEXTEST=1`,
//! `--list --format terse`, `--exact NAME`) and checks names, verdicts,
//! banners and exit codes. VM-booting checks need kernels from
//! `KTSTR_TEST_KERNELS` (`;`-separated images) or `KTSTR_TEST_KERNEL`;
//! without them they skip (and fail under `KTSTR_NO_SKIP_MODE=1`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ktstr_runtime::prelude::{ensure, ktstr_test, Ctx, Result};
use ktstr_runtime::testing;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs this binary with a clean ktstr environment plus `env`, in an
/// empty directory, with an empty kernel cache (so discovery finds
/// nothing unless `env` names a kernel).
fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(args).current_dir(scratch.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("KTSTR_") || k.starts_with("NEXTEST") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NEXTEST", "1").env("KTSTR_CACHE_DIR", &cache);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let Output { status, stdout, stderr } = cmd.output().unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        took: t0.elapsed(),
    }
}

fn listed(r: &Run) -> Vec<String> {
    r.stdout.lines().filter_map(|l| l.strip_suffix(": test")).map(String::from).collect()
}

fn kernels() -> Vec<PathBuf> {
    let list = std::env::var("KTSTR_TEST_KERNELS")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| std::env::var("KTSTR_TEST_KERNEL").ok().filter(|v| !v.is_empty()));
    match list {
        Some(v) => v.split(';').filter(|s| !s.is_empty()).map(PathBuf::from).collect(),
        None => Vec::new(),
    }
}

fn need_kernels(n: usize) -> Option<Vec<PathBuf>> {
    let k = kernels();
    testing::require(
        Some(k).filter(|k| k.len() >= n),
        &format!("{n} kernel(s) in KTSTR_TEST_KERNELS (or KTSTR_TEST_KERNEL)"),
        "set them to kernel images (.ci/run does)",
    )
}

/// The version string a bzImage carries in its setup header.
fn image_release(image: &Path) -> Option<String> {
    let b = std::fs::read(image).ok()?;
    if b.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([b[0x20e], b[0x20f]]) as usize + 0x200;
    let s = b.get(off..off + 256)?;
    let end = s.iter().position(|&c| c == 0 || c == b' ')?;
    Some(String::from_utf8_lossy(&s[..end]).into_owned())
}

fn uname_line(stderr: &str) -> Option<String> {
    let l = stderr.lines().find(|l| l.contains("guest uname -r "))?;
    l.split("guest uname -r ").nth(1)?.split(',').next().map(String::from)
}

#[test]
fn list_single_kernel() {
    let r = run(&["--list", "--format", "terse"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let names = listed(&r);
    for want in [
        "ktstr/two_cgroups_share_cpu",
        "ktstr/unfair_split_is_detected",
        "ktstr/host_workers_report",
        "ktstr/demo_panics",
        "plain_test_still_runs",
        "driver::list_single_kernel",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.ends_with("::ktstr")), "cargo-test wrappers leak into the list: {names:?}");
    let plain: Vec<&String> = names.iter().filter(|n| !n.starts_with("gauntlet/")).collect();
    assert!(!plain.iter().any(|n| n.matches('/').count() > 1), "no kernel suffixes in single-kernel mode: {plain:?}");

    let r = run(&["--list", "--format", "terse", "--ignored"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ignored = listed(&r);
    assert!(ignored.contains(&"ktstr/demo_panics".to_string()), "{ignored:?}");
    assert!(
        ignored.iter().all(|n| n.starts_with("ktstr/demo_") || n.starts_with("gauntlet/")),
        "only demo_ tests and gauntlet variants are ignored: {ignored:?}"
    );
}

/// What `cargo nextest list` shows: every VM test also as
/// `gauntlet/{name}/{preset}`, ignored, once per preset its constraints
/// allow; none for host_only, demo_ or `gauntlet = false` tests.
#[test]
fn list_gauntlet_variants() {
    use ktstr_runtime::preset::PRESETS;
    let all = listed(&run(&["--list", "--format", "terse"], &[]));
    let ignored = listed(&run(&["--list", "--format", "terse", "--ignored"], &[]));
    let variants: Vec<&String> = all.iter().filter(|n| n.starts_with("gauntlet/")).collect();
    assert!(!variants.is_empty(), "{all:?}");
    for v in &variants {
        assert!(ignored.contains(v), "{v} is not listed as ignored");
    }
    let of = |test: &str| -> Vec<String> {
        variants.iter().filter_map(|n| n.strip_prefix(&format!("gauntlet/{test}/"))).map(String::from).collect()
    };
    let where_ = |f: &dyn Fn(&ktstr_runtime::vmm::Topology) -> bool| -> Vec<String> {
        PRESETS.iter().filter(|p| f(&p.topology)).map(|p| p.name.to_string()).collect()
    };
    // No constraints: every rung, 2 to 256 vCPUs.
    assert_eq!(of("topology_matches_request"), where_(&|_| true));
    assert_eq!(of("topology_matches_request").len(), PRESETS.len());
    // max_cpus = 16.
    assert_eq!(of("two_cgroups_share_cpu"), where_(&|t| t.total_cpus() <= 16));
    // requires_smt, min_llcs = 2.
    let smt = of("topology_llcs_and_smt_match_request");
    assert_eq!(smt, where_(&|t| t.threads > 1 && t.numa_nodes * t.llcs >= 2));
    assert_eq!(smt, ["llc2-smt", "numa2-smt", "llc4-smt", "numa4-far-smt", "numa4-llc4-smt"]);
    for none in ["guest_gets_cmdline_and_files", "host_workers_report", "demo_panics"] {
        assert_eq!(of(none), Vec::<String>::new(), "{none}: gauntlet = false, host_only or demo_");
    }
    // Each variant once.
    let mut sorted = variants.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), variants.len());
    // Multi-kernel mode: the kernel suffix goes last.
    let r = run(&["--list", "--format", "terse", "--ignored"], &[("KTSTR_KERNEL_LIST", "a=/x;b=/y")]);
    let multi = listed(&r);
    assert!(multi.contains(&"gauntlet/topology_matches_request/tiny/kernel_b".to_string()), "{multi:?}");
    assert!(!multi.contains(&"gauntlet/topology_matches_request/tiny".to_string()));
    // --exact on an excluded preset says why.
    let r = run(&["--exact", "gauntlet/two_cgroups_share_cpu/llc4-smt"], &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("two_cgroups_share_cpu has no gauntlet variant on preset llc4-smt: 32 CPUs > max_cpus 16"), "{}", r.stderr);
}

#[test]
fn list_multi_kernel() {
    // "6.12" is a strict suffix of "git_x_6.12"; paths need not exist to list.
    let list = "6.12=/nonexistent/a;git_x_6.12=/nonexistent/b";
    let r = run(&["--list", "--format", "terse"], &[("KTSTR_KERNEL_LIST", list)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let names = listed(&r);
    for base in ["ktstr/two_cgroups_share_cpu", "ktstr/demo_uname"] {
        assert!(names.contains(&format!("{base}/kernel_6_12")), "{names:?}");
        assert!(names.contains(&format!("{base}/kernel_git_x_6_12")), "{names:?}");
        assert!(!names.contains(&base.to_string()));
    }
    assert_eq!(names.iter().filter(|n| n.starts_with("ktstr/host_workers_report")).collect::<Vec<_>>(), ["ktstr/host_workers_report"]);

    let r = run(&["--exact", "ktstr/demo_uname", "--nocapture"], &[("KTSTR_KERNEL_LIST", list)]);
    assert_eq!(r.code, 1, "no suffix in multi-kernel mode is an error: {}", r.stderr);
    assert!(r.stderr.contains("needs a kernel suffix") && r.stderr.contains("kernel_git_x_6_12"), "{}", r.stderr);

    let r = run(&["--exact", "ktstr/demo_uname/kernel_6_12"], &[("KTSTR_KERNEL_LIST", list)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("ktstr: FAIL: KTSTR_KERNEL_LIST entry 6.12=/nonexistent/a does not exist"), "{}", r.stderr);

    let r = run(&["--list", "--format", "terse"], &[("KTSTR_KERNEL_LIST", "6.12")]);
    assert_eq!(r.code, 1, "malformed list: {}", r.stderr);
}

#[test]
fn no_kernel_skips_and_no_skip_mode_fails() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("skips");
    let log_env = ("KTSTR_SKIP_LOG", log.to_str().unwrap());
    let r = run(&["--exact", "ktstr/two_cgroups_share_cpu", "--nocapture"], &[log_env]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("ktstr: SKIP: harness not configured"), "{}", r.stderr);
    assert!(r.stderr.contains("cargo ktstr test --kernel"), "the skip names the fix: {}", r.stderr);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.starts_with("ktstr/two_cgroups_share_cpu\tharness not configured"), "the skip is counted: {logged}");

    let r = run(&["--exact", "ktstr/two_cgroups_share_cpu"], &[("KTSTR_NO_SKIP_MODE", "1"), log_env]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("ktstr: FAIL: skip not allowed (KTSTR_NO_SKIP_MODE=1): harness not configured"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), logged, "a failure is not a skip");

    let r = run(&["--exact", "ktstr/demo_uname"], &[("KTSTR_TEST_KERNEL", "/nonexistent/bzImage")]);
    assert_eq!(r.code, 1, "a named but missing kernel fails: {}", r.stderr);
    assert!(r.stderr.contains("ktstr: FAIL: KTSTR_TEST_KERNEL=/nonexistent/bzImage"), "{}", r.stderr);

    let r = run(&["--exact", "ktstr/no_such_test"], &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
}

#[test]
fn host_only_and_plain_tests_run() {
    let r = run(&["--exact", "ktstr/host_workers_report", "--nocapture"], &[("KTSTR_KERNEL_LIST", "a=/x;b=/y")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("ktstr: PASS: ktstr/host_workers_report"), "{}", r.stderr);

    let r = run(&["--exact", "plain_test_still_runs", "--nocapture"], &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("1 passed"), "libtest ran it: {}", r.stdout);
}

/// A `host_only` test whose name is also a kernel label of the run.
#[ktstr_test(host_only, timeout_s = 10)]
fn kernel_lookalike(ctx: &Ctx) -> Result<()> {
    ensure!(!ctx.in_guest());
    Ok(())
}

/// Suffix peeling must not eat a `host_only` test's own name: with a
/// kernel labelled `lookalike` (suffix `kernel_lookalike`), the host_only
/// test `ktstr/kernel_lookalike` is listed once and runs.
#[test]
fn host_only_named_like_a_kernel_label_runs() {
    let list = [("KTSTR_KERNEL_LIST", "lookalike=/nonexistent/a;other=/nonexistent/b")];
    let names = listed(&run(&["--list", "--format", "terse"], &list));
    let lookalike: Vec<&String> = names.iter().filter(|n| n.starts_with("ktstr/kernel_lookalike")).collect();
    assert_eq!(lookalike, ["ktstr/kernel_lookalike"], "listed once, without a suffix: {names:?}");
    let r = run(&["--exact", "ktstr/kernel_lookalike", "--nocapture"], &list);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("ktstr: PASS: ktstr/kernel_lookalike"), "{}", r.stderr);
    // A VM test named without a suffix still gets the multi-kernel error.
    let r = run(&["--exact", "ktstr/demo_uname"], &list);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("needs a kernel suffix"), "{}", r.stderr);
}

/// A non-UTF-8 argument gets a one-line error, not a panic in the early
/// constructor (which aborts the process).
#[test]
fn non_utf8_argument_is_an_error_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"ktstr/\xff");
    for nextest in [true, false] {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.arg("--exact").arg(bad).env_remove("NEXTEST");
        if nextest {
            cmd.env("NEXTEST", "1");
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "exit 1, not an abort (nextest={nextest}): {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains("ktstr: FAIL: argument \"ktstr/\u{fffd}\" is not valid UTF-8"), "{err}");
    }
}

#[test]
fn plain_cargo_test_mode() {
    let scratch = tempfile::tempdir().unwrap();
    let plain = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "host_workers_report::ktstr", "--nocapture"]).current_dir(scratch.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("KTSTR_") || k.starts_with("NEXTEST") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(extra.iter().copied());
        let o = cmd.output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (code, out, err) = plain(&[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("test host_workers_report::ktstr ... ok"), "the wrapper ran under libtest: {out}");
    assert_eq!(err.matches("variants do not expand").count(), 1, "one warning: {err}");
    let (code, _, err) = plain(&[("KTSTR_CARGO_TEST_MODE", "1")]);
    assert_eq!(code, Some(0));
    assert!(!err.contains("variants do not expand"), "{err}");
}

#[test]
fn vm_verdicts() {
    let Some(k) = need_kernels(1) else { return };
    let env = [("KTSTR_TEST_KERNEL", k[0].to_str().unwrap())];
    for (name, code, needle) in [
        ("ktstr/two_cgroups_share_cpu", 0, "ktstr: PASS: ktstr/two_cgroups_share_cpu"),
        ("ktstr/unfair_split_is_detected", 0, "failed as expected: fair_share: CPU time not shared within ±10%"),
        ("ktstr/demo_panics", 1, "ktstr: FAIL: test body panicked: demo body panic: the vector was empty (at tests/tests/examples.rs:"),
        ("ktstr/demo_returns_error", 1, "ktstr: FAIL: test body returned an error: demo body error: step two failed: inner cause 42"),
        ("ktstr/demo_sleeps_past_timeout", 1, "ktstr: FAIL: test body did not finish within its timeout of 3s"),
        ("ktstr/demo_killed_by_signal", 1, "ktstr: FAIL: test body was killed by signal 11"),
        ("ktstr/demo_kernel_panics", 1, "ktstr: FAIL: Kernel panic - not syncing: No working init found."),
    ] {
        let r = run(&["--exact", name, "--nocapture"], &env);
        eprintln!("{name}: exit {} in {:.1}s", r.code, r.took.as_secs_f64());
        assert_eq!(r.code, code, "{name}:\n{}", r.stderr);
        assert!(r.stderr.contains(needle), "{name}: want {needle:?} in:\n{}", r.stderr);
        assert!(r.took < Duration::from_secs(120), "{name} took {:?}", r.took);
        if code == 1 {
            assert!(r.stderr.contains("guest console (last lines):"), "{name}: failures carry the console tail:\n{}", r.stderr);
        }
        if name.ends_with("kernel_panics") {
            assert!(r.stderr.contains("\nthe guest kernel panicked before reporting a verdict for demo_kernel_panics\n"), "{}", r.stderr);
        }
    }
}

#[test]
fn vm_topology_and_cpusets() {
    let Some(k) = need_kernels(1) else { return };
    let env = [("KTSTR_TEST_KERNEL", k[0].to_str().unwrap())];
    for name in ["ktstr/topology_matches_request", "ktstr/sleepers_stay_in_their_cpuset", "ktstr/guest_gets_cmdline_and_files"] {
        let r = run(&["--exact", name], &env);
        assert_eq!(r.code, 0, "{name}:\n{}", r.stderr);
        // Exit 0 is also a skip: only the PASS banner says it ran.
        assert!(r.stderr.contains(&format!("ktstr: PASS: {name}")), "{name} did not pass:\n{}", r.stderr);
    }
}

/// `KTSTR_CPUS` resizes a test for one run: the guest boots that many
/// vCPUs, the structured topology keeps its nodes or SMT (the body asserts
/// sysfs against the resized topology), result.json records it, and a bad
/// value fails with the fix.
#[test]
fn cpus_override_resizes_the_topology() {
    let Some(k) = need_kernels(1) else { return };
    let art = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, [u64; 4]); 3] = [
        ("ktstr/topology_matches_request", "2", [2, 1, 1, 1]),
        ("ktstr/topology_llcs_and_smt_match_request", "2", [1, 1, 1, 2]),
        ("ktstr/spinners_all_make_progress", "1", [1, 1, 1, 1]),
    ];
    for (i, (name, cpus, [nodes, llcs, cores, threads])) in cases.into_iter().enumerate() {
        let run_id = format!("cpus-{i}");
        let env = [
            ("KTSTR_TEST_KERNEL", k[0].to_str().unwrap()),
            ("KTSTR_ARTIFACT_DIR", art.path().to_str().unwrap()),
            ("NEXTEST_RUN_ID", run_id.as_str()),
            ("KTSTR_CPUS", cpus),
        ];
        let r = run(&["--exact", name, "--nocapture"], &env);
        assert!(r.code == 0 && r.stderr.contains(&format!("ktstr: PASS: {name}")), "{name} at {cpus} CPUs:\n{}", r.stderr);
        let t = &result_json(&artifact_dir(art.path(), &run_id, name))["topology"];
        let got = ["numa_nodes", "llcs", "cores", "threads", "cpus"].map(|f| t[f].as_u64());
        let want = [nodes, llcs, cores, threads, cpus.parse().unwrap()].map(Some);
        assert_eq!(got, want, "{name} at {cpus} CPUs: result.json topology {t}");
    }
    let r = run(&["--exact", "ktstr/topology_matches_request"], &[("KTSTR_TEST_KERNEL", k[0].to_str().unwrap()), ("KTSTR_CPUS", "0")]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("ktstr: FAIL: KTSTR_CPUS=0: want a vCPU count from 1 to 256"), "{}", r.stderr);
    // Below a test's min_cpus: a SKIP that says why, with no VM booted.
    let r = run(&["--exact", "ktstr/unfair_split_is_detected"], &[("KTSTR_TEST_KERNEL", k[0].to_str().unwrap()), ("KTSTR_CPUS", "1")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("ktstr: SKIP: KTSTR_CPUS=1: unfair_split_is_detected needs at least 2 vCPUs (its min_cpus)"),
        "{}",
        r.stderr
    );
    assert!(uname_line(&r.stderr).is_none(), "a VM booted for a run it skipped: {}", r.stderr);
}

#[test]
fn multi_kernel_runs_the_named_kernel() {
    let Some(k) = need_kernels(2) else { return };
    let list = format!("first={};second={}", k[0].display(), k[1].display());
    let env = [("KTSTR_KERNEL_LIST", list.as_str())];
    let names = listed(&run(&["--list", "--format", "terse", "--ignored"], &env));
    // What `-E 'test(kernel_second)'` selects.
    let second: Vec<&String> = names.iter().filter(|n| n.contains("kernel_second")).collect();
    assert!(second.contains(&&"ktstr/demo_uname/kernel_second".to_string()), "{names:?}");
    assert!(second.iter().all(|n| !n.contains("kernel_first")));
    let mut releases = Vec::new();
    for (label, image) in [("first", &k[0]), ("second", &k[1])] {
        let r = run(&["--exact", &format!("ktstr/demo_uname/kernel_{label}"), "--ignored"], &env);
        assert_eq!(r.code, 0, "{label}:\n{}", r.stderr);
        let seen = uname_line(&r.stderr).unwrap_or_else(|| panic!("no uname line:\n{}", r.stderr));
        if let Some(want) = image_release(image) {
            assert_eq!(seen, want, "{label} booted {} but the guest runs {seen}", image.display());
        }
        releases.push(seen);
    }
    if releases[0] == releases[1] {
        eprintln!("note: both kernels report {}; they cannot be told apart by uname", releases[0]);
    }
}

/// design.md: `/dev/kvm` not writable is a FAIL with the kvm-group hint,
/// not a silent fall-back (run as `nobody`, who has no access here).
#[test]
fn kvm_without_access_fails_with_the_group_hint() {
    let Some(k) = need_kernels(1) else { return };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !testing::premise(root && Path::new("/usr/bin/setpriv").exists(), "root and setpriv, to run as another user", "run as root on a host with util-linux") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let home = scratch.path();
    std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let image = home.join("bzImage");
    std::fs::copy(&k[0], &image).unwrap();
    // A copy nobody can reach, wherever the target dir lives.
    let exe = home.join("testbin");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/env", "-i"])
            .arg(format!("HOME={}", home.display()))
            .args(["PATH=/usr/bin:/bin", "NEXTEST=1"])
            .arg(format!("KTSTR_TEST_KERNEL={}", image.display()))
            .args(args)
            .current_dir(home)
            .output()
            .unwrap()
    };
    assert!(as_nobody(&["/usr/bin/test", "-x", exe.to_str().unwrap()]).status.success(), "nobody cannot run {}", exe.display());
    if !testing::premise(
        !as_nobody(&["/usr/bin/test", "-w", "/dev/kvm"]).status.success(),
        "a /dev/kvm that user nobody cannot write",
        "run on a host whose /dev/kvm is not world-writable",
    ) {
        return;
    }
    let o = as_nobody(&[exe.to_str().unwrap(), "--exact", "ktstr/demo_uname", "--ignored"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let fail = err.lines().find(|l| l.starts_with("ktstr: FAIL: ")).unwrap_or_else(|| panic!("no FAIL line:\n{err}"));
    assert!(fail.contains("/dev/kvm") && fail.contains("join the kvm group") && fail.contains("KTSTR_VMM=tcg"), "{fail}");
}

/// The one directory `{artifacts}/{run}/{test}/` holds (the kernel's).
fn artifact_dir(root: &Path, run: &str, test: &str) -> PathBuf {
    let t = root.join(run).join(test.replace('/', "__"));
    let dirs: Vec<PathBuf> = std::fs::read_dir(&t)
        .unwrap_or_else(|e| panic!("{}: {e}", t.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "one kernel directory under {}: {dirs:?}", t.display());
    dirs.into_iter().next().unwrap()
}

fn result_json(dir: &Path) -> serde_json::Value {
    let p = dir.join("result.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// design.md "Run artifacts" and the banners, through the real binary: a
/// pass and two failures leave result.json, console.log and output.log;
/// the FAIL banner's first line is the cause and its last the directory;
/// the body's stdout/stderr reach ours for a pass, in order.
#[test]
fn vm_artifacts_and_banners() {
    let Some(k) = need_kernels(1) else { return };
    let art = tempfile::tempdir().unwrap();
    let env = [
        ("KTSTR_TEST_KERNEL", k[0].to_str().unwrap()),
        ("KTSTR_ARTIFACT_DIR", art.path().to_str().unwrap()),
        ("NEXTEST_RUN_ID", "itest-run"),
    ];

    let name = "ktstr/demo_prints_to_both_streams";
    let r = run(&["--exact", name, "--ignored", "--nocapture"], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("ktstr: PASS: {name}")), "{}", r.stderr);
    assert!(
        r.stdout.contains("demo output line 1 on stdout\ndemo output line 3 on stdout\nunterminated last stdout line"),
        "a pass's body stdout reaches ours: {:?}",
        r.stdout
    );
    let e2 = r.stderr.find("demo output line 2 on stderr\n").expect("body stderr reaches ours");
    assert!(r.stderr[e2..].contains("demo output line 4 on stderr\n"), "{}", r.stderr);
    let dir = artifact_dir(art.path(), "itest-run", "ktstr/demo_prints_to_both_streams");
    assert_eq!(r.stderr.trim_end().lines().last().unwrap(), format!("ktstr: artifacts: {}", dir.display()));
    let v = result_json(&dir);
    assert_eq!(v["schema"], 1);
    assert_eq!(v["test"], name);
    assert_eq!(v["outcome"], "pass");
    assert_eq!(v["cause"], "");
    assert_eq!(v["kernel"]["image"], k[0].to_str().unwrap());
    assert_eq!(v["kernel"]["release"].as_str(), uname_line(&r.stderr).as_deref(), "the guest's uname -r");
    assert!(["kvm", "qemu-tcg"].contains(&v["backend"].as_str().unwrap()), "{v}");
    assert_eq!(v["topology"]["cpus"], 1);
    assert!(v["metrics"].is_object() && v["timings"]["wall_s"].as_f64().unwrap() > 0.0, "{v}");
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert!(console.contains("Linux version") && console.contains("ktstr: guest: running demo_prints_to_both_streams"), "{console}");
    assert!(!console.contains("demo output line"), "body output travels on the data channel, not the console: {console}");
    assert_eq!(
        std::fs::read_to_string(dir.join("output.log")).unwrap(),
        "[stdout] demo output line 1 on stdout\n[stderr] demo output line 2 on stderr\n[stdout] demo output line 3 on stdout\n\
         [stderr] demo output line 4 on stderr\n[stdout] unterminated last stdout line\n"
    );

    let name = "ktstr/demo_unfair_split_fails";
    let r = run(&["--exact", name, "--ignored"], &env);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let banner = &r.stderr[r.stderr.find("ktstr: FAIL: ").expect("a FAIL banner")..];
    let first = banner.lines().next().unwrap();
    assert!(
        first.starts_with("ktstr: FAIL: test body returned an error: fair_share: CPU time not shared within ±10%: crowded[")
            && first.contains("off the mean")
            && first.contains(" (test at tests/tests/examples.rs:"),
        "the first line names the failing figure: {first}"
    );
    let dir = artifact_dir(art.path(), "itest-run", name);
    assert_eq!(banner.trim_end().lines().last().unwrap(), format!("ktstr: artifacts: {}", dir.display()));
    let v = result_json(&dir);
    assert_eq!(v["outcome"], "fail");
    assert_eq!(format!("ktstr: FAIL: {}", v["cause"].as_str().unwrap()), first);
    assert!(v["message"].as_str().unwrap().contains("alone[0] got"), "{v}");
    let run0 = &v["metrics"]["runs"][0];
    assert_eq!(run0["workers"].as_array().map(Vec::len), Some(3), "{v}");
    let group = |name: &str| run0["groups"].as_array().and_then(|g| g.iter().find(|g| g["group"] == name)).cloned();
    assert_eq!(group("crowded").map(|g| g["workers"].clone()), Some(2.into()), "{v}");
    assert!(group("alone").and_then(|g| g["runtime_ms"].as_f64()).unwrap() > 0.0, "{v}");
    assert!(std::fs::read_to_string(dir.join("console.log")).unwrap().contains("KTSTR_VERDICT "));

    let name = "ktstr/demo_kernel_panics";
    let r = run(&["--exact", name, "--ignored"], &env);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let banner = &r.stderr[r.stderr.find("ktstr: FAIL: ").expect("a FAIL banner")..];
    assert!(banner.starts_with("ktstr: FAIL: Kernel panic - not syncing: No working init found."), "{banner}");
    let dir = artifact_dir(art.path(), "itest-run", name);
    assert_eq!(banner.trim_end().lines().last().unwrap(), format!("ktstr: artifacts: {}", dir.display()));
    let v = result_json(&dir);
    assert_eq!((v["outcome"].as_str(), v["kernel"]["release"].as_str()), (Some("fail"), Some("")), "{v}");
    assert!(std::fs::read_to_string(dir.join("console.log")).unwrap().contains("Kernel panic - not syncing: No working init found."));
}

/// A host_only run leaves result.json under `host`, and its body's output
/// is in output.log.
#[test]
fn host_only_artifacts() {
    let art = tempfile::tempdir().unwrap();
    let env = [("KTSTR_ARTIFACT_DIR", art.path().to_str().unwrap()), ("NEXTEST_RUN_ID", "host-run")];
    let r = run(&["--exact", "ktstr/host_workers_report"], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dir = art.path().join("host-run/ktstr__host_workers_report/host");
    let v = result_json(&dir);
    assert_eq!((v["outcome"].as_str(), v["backend"].as_str(), v["kernel"]["label"].as_str()), (Some("pass"), Some("host"), Some("host")));
    assert!(v["topology"].is_null() && v["kernel"]["image"].is_null(), "{v}");
    assert_eq!(v["metrics"]["runs"][0]["workers"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(dir.join("output.log").is_file());
}

/// A body printing 10 MiB: its output travels over the data channel (the
/// first and last part, with a note of what was dropped between) and
/// costs about what writing it costs, not a serial console's transfer time.
/// Prints the figures.
#[test]
fn body_output_of_10mib_is_cheap() {
    let Some(k) = need_kernels(1) else { return };
    let art = tempfile::tempdir().unwrap();
    let env = [("KTSTR_TEST_KERNEL", k[0].to_str().unwrap()), ("KTSTR_ARTIFACT_DIR", art.path().to_str().unwrap())];
    let quiet = run(&["--exact", "ktstr/demo_uname", "--ignored"], &env);
    assert_eq!(quiet.code, 0, "{}", quiet.stderr);
    let loud = run(&["--exact", "ktstr/demo_prints_10mib", "--ignored"], &env);
    assert_eq!(loud.code, 0, "{}", loud.stderr);
    let lines = 10 * 1024 * 1024 / 100;
    assert!(loud.stdout.starts_with("0000000000 xxx"), "{}", &loud.stdout[..100.min(loud.stdout.len())]);
    assert!(loud.stdout.ends_with(&format!("{:010} {}\n", lines - 1, "x".repeat(88))), "the last line arrives");
    let note = loud.stderr.lines().find(|l| l.contains("bytes of the test body's output dropped here")).expect("a note on the gap");
    let dropped: usize = note.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(loud.stdout.len() + dropped, lines * 100, "every byte is delivered or counted");
    let extra = loud.took.saturating_sub(quiet.took);
    eprintln!(
        "10 MiB of body output: {:.2}s vs {:.2}s for a quiet body (+{:.2}s); {} bytes delivered, {dropped} dropped; {}",
        loud.took.as_secs_f64(),
        quiet.took.as_secs_f64(),
        extra.as_secs_f64(),
        loud.stdout.len(),
        loud.stderr.lines().find(|l| l.starts_with("demo_prints_10mib: wrote")).unwrap_or("")
    );
    assert!(extra < Duration::from_secs(10), "10 MiB of output cost {extra:?}");
}

/// Boots `gauntlet/topology_matches_request/{preset}` for each preset: the
/// guest's sysfs (nodes, distances, LLC sharing, SMT siblings) must match
/// the preset (`topo_view`). Returns the failures, one line each.
fn gauntlet_topology(presets: &[&ktstr_runtime::preset::Preset], kernel: &Path) -> Vec<String> {
    let env = [("KTSTR_TEST_KERNEL", kernel.to_str().unwrap())];
    let mut bad = Vec::new();
    for p in presets {
        let name = format!("gauntlet/topology_matches_request/{}", p.name);
        let r = run(&["--exact", &name, "--nocapture"], &env);
        eprintln!("{name}: {} vCPUs, exit {} in {:.1}s", p.cpus(), r.code, r.took.as_secs_f64());
        // Exit 0 is also a skip: only the PASS banner says it ran.
        if r.code != 0 || !r.stderr.contains(&format!("ktstr: PASS: {name}")) {
            let why = r.stderr.lines().find(|l| l.starts_with("ktstr: FAIL") || l.starts_with("ktstr: SKIP")).unwrap_or("no verdict");
            bad.push(format!("{name}: exit {}: {why}", r.code));
        }
    }
    bad
}

/// Every preset up to 16 vCPUs boots with the topology it names.
#[test]
fn gauntlet_topology_up_to_16_vcpus() {
    let Some(k) = need_kernels(1) else { return };
    let presets: Vec<_> = ktstr_runtime::preset::PRESETS.iter().filter(|p| p.cpus() <= 16).collect();
    assert!(presets.len() >= 8, "{presets:?}");
    let bad = gauntlet_topology(&presets, &k[0]);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The 64-vCPU rung (slow under TCG: every CPU is brought up by init).
#[test]
fn gauntlet_topology_64_vcpus() {
    if !testing::slow_tests_enabled() {
        return;
    }
    let Some(k) = need_kernels(1) else { return };
    let presets: Vec<_> = ktstr_runtime::preset::PRESETS.iter().filter(|p| p.cpus() == 64).collect();
    assert_eq!(presets.len(), 1);
    let bad = gauntlet_topology(&presets, &k[0]);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
