//! Example ktstr tests. Under nextest they are listed as `ktstr/NAME`
//! and each boots a VM (except `host_only`); `demo_` tests are ignored by
//! default and fail on purpose for the driver tests in `driver/`.

use ktstr_runtime::prelude::*;
use ktstr_runtime::topo_view;

mod driver;

/// Two cgroups with two spinners each share two CPUs fairly. Gauntlet
/// rungs past 16 vCPUs only add boot time: four spinners never fill them.
#[ktstr_test(cpus = 2, memory_mib = 512, timeout_s = 30, max_cpus = 16)]
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

/// The guest sees the topology the test asked for (or, as a gauntlet
/// variant, its preset's; or its own resized by `KTSTR_CPUS`): CPUs, nodes and their distances, which CPUs
/// share an LLC, which are SMT siblings.
#[ktstr_test(numa_nodes = 2, llcs = 1, cores = 2, threads = 1, timeout_s = 60)]
fn topology_matches_request(ctx: &Ctx) -> Result<()> {
    let want = ctx.topology();
    let seen = ctx.assert_topology()?;
    ensure!(ctx.all_cpus().len() == want.total_cpus(), "affinity {} (seen {seen:?})", ctx.all_cpus());
    let view = topo_view::read_view(std::path::Path::new("/sys/devices/system")).map_err(anyhow::Error::msg)?;
    let bad = topo_view::diff(&topo_view::expected(&want), &view);
    let on = match (ctx.preset(), ctx.cpus_override()) {
        (Some(p), _) => format!("preset {}", p.name),
        (None, Some(n)) => format!("the test's own topology resized to {n} CPUs (KTSTR_CPUS)"),
        (None, None) => "the test's own topology".to_string(),
    };
    ensure!(bad.is_empty(), "guest view differs from {on} ({want:?}): {}", bad.join("; "));
    println!("{on}: {} CPUs, {} nodes, distances {:?}", view.online.len(), view.node_cpus.len(), view.distances);
    Ok(())
}

/// Two LLCs of one 2-thread core each: the guest kernel derives LLCs and
/// SMT siblings from our CPUID leaves and ACPI tables. Its gauntlet
/// variants are the rungs with SMT and at least two LLCs.
#[ktstr_test(numa_nodes = 1, llcs = 2, cores = 1, threads = 2, timeout_s = 60, requires_smt, min_llcs = 2)]
fn topology_llcs_and_smt_match_request(ctx: &Ctx) -> Result<()> {
    let seen = ctx.assert_topology()?;
    ensure!(seen.llcs.is_some(), "the guest shows no LLC (cache index3) information: {seen:?}");
    ensure!(ctx.all_cpus().len() == ctx.topology().total_cpus(), "affinity {} (seen {seen:?})", ctx.all_cpus());
    Ok(())
}

/// Sleep/wake workers confined to one CPU's cgroup (the last CPU, so it
/// runs at any `KTSTR_CPUS`) wake up and stay put.
#[ktstr_test(cpus = 2, timeout_s = 20)]
fn sleepers_stay_in_their_cpuset(ctx: &Ctx) -> Result<()> {
    let last = ctx.all_cpus().max().context("no CPUs")?;
    let one = ctx.cgroup("one")?.cpus(CpuSet::one(last))?;
    let spin = ctx.workers(1);
    let sleepy = one.sleepers(2, Duration::from_millis(2), Duration::from_millis(5));
    let report = ctx.run(&[spin, sleepy], Duration::from_secs(1))?;
    println!("{report}");
    report.assert_in_cpuset()?.assert_no_starvation()?;
    for w in report.group("one") {
        ensure!(w.cpus == CpuSet::one(last), "{}[{}] ran on {}", w.group, w.index, w.cpus);
        // ~140 cycles fit in 1 s; TCG on a loaded host manages far fewer.
        ensure!(w.wakeups >= 5, "{}[{}] woke only {} times", w.group, w.index, w.wakeups);
    }
    one.remove()
}

/// Extra kernel arguments and include files reach the guest. Nothing here
/// depends on the topology, so it has no gauntlet variants.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10, cmdline = "ktstr_example.flag=1", include_files = ["data/hello.txt"], gauntlet = false)]
fn guest_gets_cmdline_and_files(ctx: &Ctx) -> Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    ensure!(cmdline.split_whitespace().any(|a| a == "ktstr_example.flag=1"), "cmdline: {cmdline}");
    let path = ctx.include("hello.txt")?;
    ensure!(path.starts_with("/include"), "{}", path.display());
    ensure!(std::fs::read_to_string(&path)?.trim() == "hello from the host");
    Ok(())
}

/// Include files reach a host_only body too, from the bytes embedded in
/// the binary (tests/tests/include_travel.rs runs a copy without sources).
#[ktstr_test(host_only, timeout_s = 10, include_files = ["data/hello.txt"])]
fn host_reads_include_files(ctx: &Ctx) -> Result<()> {
    let path = ctx.include("hello.txt")?;
    ensure!(std::fs::read_to_string(&path)?.trim() == "hello from the host", "{}", path.display());
    Ok(())
}

/// Guest init mounts what kernel tools expect: devpts (a pty pair carries
/// bytes), debugfs, tracefs (with the sched_switch event) and bpffs.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 20)]
fn guest_has_tool_filesystems(_ctx: &Ctx) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    for (dir, fs) in [("/dev/pts", "devpts"), ("/sys/kernel/debug", "debugfs"), ("/sys/kernel/tracing", "tracefs"), ("/sys/fs/bpf", "bpf")] {
        ensure!(
            mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(dir) && l.split_whitespace().nth(2) == Some(fs)),
            "{fs} is not mounted at {dir}; /proc/mounts:\n{mounts}"
        );
    }
    ensure!(std::path::Path::new("/sys/kernel/tracing/events/sched/sched_switch/enable").exists(), "no sched_switch event in tracefs");
    let echoed = pty_roundtrip(b"ktstr-pty\n")?;
    ensure!(echoed.starts_with(b"ktstr-pty"), "pty carried {:?}", String::from_utf8_lossy(&echoed));
    Ok(())
}

/// Writes `msg` into a new pty's master and reads it back from its slave.
fn pty_roundtrip(msg: &[u8]) -> Result<Vec<u8>> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on a descriptor we own;
    // ptsname's static buffer is copied before any other call.
    let (master, slave_path) = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        ensure!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = std::fs::File::from_raw_fd(fd);
        ensure!(libc::grantpt(fd) == 0 && libc::unlockpt(fd) == 0, "grantpt/unlockpt: {}", std::io::Error::last_os_error());
        let name = libc::ptsname(fd);
        ensure!(!name.is_null(), "ptsname: {}", std::io::Error::last_os_error());
        (master, std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
    };
    let mut slave = std::fs::OpenOptions::new().read(true).write(true).open(&slave_path).with_context(|| format!("opening {slave_path}"))?;
    let mut master = master;
    master.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    slave.read_exact(&mut buf).with_context(|| format!("reading {slave_path}"))?;
    Ok(buf)
}

/// Fails on purpose: two spinners squeezed onto CPU 0 against one alone on
/// CPU 1 cannot get equal CPU time, and the fairness check must say so.
/// `min_cpus = 2`: at one vCPU it would fail for want of CPU 1, a vacuous
/// pass, so `KTSTR_CPUS=1` skips it.
#[ktstr_test(cpus = 2, timeout_s = 20, expect_err, min_cpus = 2)]
fn unfair_split_is_detected(ctx: &Ctx) -> Result<()> {
    let crowded = ctx.cgroup("crowded")?.cpus(CpuSet::one(0))?;
    let alone = ctx.cgroup("alone")?.cpus(CpuSet::one(1))?;
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

/// A fairness check that fails: the figure it names must lead the banner.
#[ktstr_test(cpus = 2, timeout_s = 20)]
fn demo_unfair_split_fails(ctx: &Ctx) -> Result<()> {
    let crowded = ctx.cgroup("crowded")?.cpus(CpuSet::one(0))?;
    let alone = ctx.cgroup("alone")?.cpus(CpuSet::one(1))?;
    let report = ctx.run(&[crowded.workers(2), alone.workers(1)], Duration::from_secs(1))?;
    report.assert_fair_share(0.10)?;
    Ok(())
}

/// The guest never reports: the body freezes PID 1 (the supervisor) in a
/// cgroup, so only the host's VM timeout (timeout_s + the boot allowance) ends the run.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 2)]
fn demo_guest_hangs(_ctx: &Ctx) -> Result<()> {
    let cg = std::path::Path::new("/sys/fs/cgroup/ktstr-frozen-init");
    std::fs::create_dir_all(cg)?;
    std::fs::write(cg.join("cgroup.procs"), "1")?;
    std::fs::write(cg.join("cgroup.freeze"), "1")?;
    println!("demo_guest_hangs: PID 1 frozen");
    Ok(())
}

/// Writes to stdout and stderr in a known order (with pauses, so the
/// order is unambiguous) and passes: the host must print and save both.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10)]
fn demo_prints_to_both_streams(_ctx: &Ctx) -> Result<()> {
    use std::io::Write;
    for (i, err) in [(1, false), (2, true), (3, false), (4, true)] {
        if err {
            eprintln!("demo output line {i} on stderr");
        } else {
            println!("demo output line {i} on stdout");
        }
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    print!("unterminated last stdout line");
    Ok(())
}

/// Prints 10 MiB of text on stdout: what a chatty body costs (the
/// driver's `body_output_of_10mib_is_cheap` times it).
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 60)]
fn demo_prints_10mib(_ctx: &Ctx) -> Result<()> {
    use std::io::Write;
    let mib = 10;
    let t0 = std::time::Instant::now();
    let mut out = std::io::stdout().lock();
    let line = [b'x'; 99];
    for i in 0..mib * 1024 * 1024 / 100 {
        write!(out, "{:010} ", i)?;
        out.write_all(&line[..88])?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    drop(out);
    eprintln!("demo_prints_10mib: wrote {mib} MiB in {:.3}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// A plain libtest test in the same binary must still be listed and run.
#[test]
fn plain_test_still_runs() {
    assert_eq!(CpuSet::parse("0-1").unwrap().len(), 2);
}
