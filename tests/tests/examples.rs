//! Example ktstr tests. Under nextest they are listed as `ktstr/NAME`
//! and each boots a VM (except `host_only`); `demo_` tests are ignored by
//! default and fail on purpose for the driver tests in `driver/`.

use ktstr_runtime::prelude::*;

mod driver;

/// Two cgroups with two spinners each share two CPUs fairly.
#[ktstr_test(cpus = 2, memory_mib = 512, timeout_s = 30)]
fn two_cgroups_share_cpu(ctx: &Ctx) -> Result<()> {
    let a = ctx.cgroup("a")?.cpus(ctx.all_cpus())?;
    let b = ctx.cgroup("b")?.cpus(ctx.all_cpus())?;
    let report = ctx.run(&[a.workers(2), b.workers(2)], Duration::from_secs(2))?;
    println!("{report}");
    report.assert_no_starvation()?.assert_in_cpuset()?.assert_fair_share(0.25)
}

/// Three spinners on two CPUs, no cgroups: every one gets CPU time. Needs
/// nothing but CPUs, so its exported `.run` also runs on hosts without
/// cgroup v2 controllers.
#[ktstr_test(cpus = 2, timeout_s = 20)]
fn spinners_all_make_progress(ctx: &Ctx) -> Result<()> {
    let report = ctx.run(&[ctx.workers(3)], Duration::from_secs(1))?;
    println!("{report}");
    report.assert_no_starvation()?.assert_in_cpuset()
}

/// The guest sees the topology the test asked for.
#[ktstr_test(numa_nodes = 2, llcs = 1, cores = 2, threads = 1, timeout_s = 20)]
fn topology_matches_request(ctx: &Ctx) -> Result<()> {
    let seen = ctx.assert_topology()?;
    ensure!(ctx.all_cpus().len() == 4, "affinity {} (seen {seen:?})", ctx.all_cpus());
    Ok(())
}

/// Sleep/wake workers confined to one CPU's cgroup wake up and stay put.
#[ktstr_test(cpus = 2, timeout_s = 20)]
fn sleepers_stay_in_their_cpuset(ctx: &Ctx) -> Result<()> {
    let one = ctx.cgroup("one")?.cpus(CpuSet::empty().with(1))?;
    let spin = ctx.workers(1);
    let sleepy = one.sleepers(2, Duration::from_millis(2), Duration::from_millis(5));
    let report = ctx.run(&[spin, sleepy], Duration::from_secs(1))?;
    println!("{report}");
    report.assert_in_cpuset()?.assert_no_starvation()?;
    for w in report.group("one") {
        ensure!(w.cpus == CpuSet::empty().with(1), "{}[{}] ran on {}", w.group, w.index, w.cpus);
        // ~140 cycles fit in 1 s; TCG on a loaded host manages far fewer.
        ensure!(w.wakeups >= 5, "{}[{}] woke only {} times", w.group, w.index, w.wakeups);
    }
    one.remove()
}

/// Extra kernel arguments and include files reach the guest.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10, cmdline = "ktstr_example.flag=1", include_files = ["data/hello.txt"])]
fn guest_gets_cmdline_and_files(ctx: &Ctx) -> Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    ensure!(cmdline.split_whitespace().any(|a| a == "ktstr_example.flag=1"), "cmdline: {cmdline}");
    let path = ctx.include("hello.txt")?;
    ensure!(path.starts_with("/include"), "{}", path.display());
    ensure!(std::fs::read_to_string(&path)?.trim() == "hello from the host");
    Ok(())
}

/// Fails on purpose: two spinners squeezed onto CPU 0 against one alone on
/// CPU 1 cannot get equal CPU time, and the fairness check must say so.
#[ktstr_test(cpus = 2, timeout_s = 20, expect_err)]
fn unfair_split_is_detected(ctx: &Ctx) -> Result<()> {
    let crowded = ctx.cgroup("crowded")?.cpus(CpuSet::empty().with(0))?;
    let alone = ctx.cgroup("alone")?.cpus(CpuSet::empty().with(1))?;
    let report = ctx.run(&[crowded.workers(2), alone.workers(1)], Duration::from_secs(1))?;
    println!("{report}");
    report.assert_in_cpuset()?.assert_fair_share(0.10)?;
    Ok(())
}

/// Runs on the host, never in a VM: the worker machinery itself.
#[ktstr_test(host_only, timeout_s = 20)]
fn host_workers_report(ctx: &Ctx) -> Result<()> {
    ensure!(!ctx.in_guest());
    let report = ctx.run(&[ctx.workers(2)], Duration::from_millis(300))?;
    report.assert_no_starvation()?.assert_in_cpuset()?;
    for w in &report.workers {
        ensure!(w.iterations > 0 && !w.cpus.is_empty(), "{w:?}");
    }
    Ok(())
}

/// Prints the guest kernel release (used to prove which kernel ran).
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10)]
fn demo_uname(_ctx: &Ctx) -> Result<()> {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!("demo_uname: {}", r.trim());
    Ok(())
}

#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10)]
fn demo_panics(_ctx: &Ctx) -> Result<()> {
    let v: Vec<u32> = Vec::new();
    if v.is_empty() {
        panic!("demo body panic: the vector was empty");
    }
    Ok(())
}

#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10)]
fn demo_returns_error(_ctx: &Ctx) -> Result<()> {
    let e: Result<()> = Err(anyhow!("inner cause 42"));
    e.context("demo body error: step two failed")
}

#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 3)]
fn demo_sleeps_past_timeout(_ctx: &Ctx) -> Result<()> {
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}

#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10)]
fn demo_killed_by_signal(_ctx: &Ctx) -> Result<()> {
    // SAFETY: raising a signal on ourselves.
    unsafe { libc::raise(libc::SIGSEGV) };
    Ok(())
}

/// The kernel finds no init (the cmdline points it elsewhere) and panics.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10, cmdline = "rdinit=/no/such/init root=/dev/nonexistent")]
fn demo_kernel_panics(_ctx: &Ctx) -> Result<()> {
    Ok(())
}

/// A plain libtest test in the same binary must still be listed and run.
#[test]
fn plain_test_still_runs() {
    assert_eq!(CpuSet::parse("0-1").unwrap().len(), 2);
}
