//! Scenario steps at given times during a run, each checked against a
//! figure it produces, and cpusets from the topology. Every step's time
//! and every worker's trace (last stamp per CPU, CPU moves, progress per
//! 10 ms slot) are guest CLOCK_MONOTONIC ns, so the checks relate them
//! directly. The same fidelity scenarios then run under scx_simple
//! (docs/sched_ext.md says which expectations hold there and why).
//! The whole binary runs alone (.config/nextest.toml): shares and the
//! 100 ms bounds are judged against guest time under TCG.

use ktstr_runtime::prelude::*;
use std::sync::{Arc, Mutex};

const MS: fn(u64) -> Duration = Duration::from_millis;
const NS_PER_MS: f64 = 1e6;
/// A stamp reads the CPU, then the clock: one migrated between the two
/// shows the old CPU at a time after the step that moved it. Windows
/// after a step start this much later.
const STAMP_RACE_NS: u64 = 10_000_000;

/// Whether a share `got` is within 15 % of `want` (relative).
fn within_15pct(got: f64, want: f64) -> bool {
    (got / want - 1.0).abs() <= 0.15
}

/// The run's end: its start plus its duration (guest ns).
fn end_ns(r: &Report) -> u64 {
    r.start_ns + r.duration.as_nanos() as u64
}

/// Milliseconds from `from` to `to` (guest ns), negative when `to` is earlier.
fn ms_between(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / NS_PER_MS
}

/// The cgroup a process is in (`/proc/PID/cgroup`, v2: `0::/path`).
fn cgroup_of(pid: i32) -> Result<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    Ok(s.lines().find_map(|l| l.strip_prefix("0::")).context("no cgroup v2 line")?.to_string())
}

/// A cgroup's cpuset shrinks from CPUs 0-1 to 0 mid-run: every worker
/// stops running on CPU 1 within 100 ms of the step's start (the write
/// moves a running task off before it returns: cpuset →
/// set_cpus_allowed_ptr → migration stopper), and keeps running on CPU 0
/// from 100 ms after it.
pub fn cpuset_shrink(ctx: &Ctx) -> Result<()> {
    let a = ctx.cgroup("a")?.cpus(CpuSet::first(2))?;
    let r = ctx.scenario().at(MS(1000), Step::cpuset(&a, CpuSet::one(0))).run(&[a.workers(2)], MS(2500))?;
    println!("{r}");
    let s = r.step("cpuset a=0")?;
    println!("step `{}` asked at {} ms, ran at {:.1} ms, took {:.2} ms", s.name, s.at_ms, s.offset_ms, s.took_ms);
    for w in &r.workers {
        let moves: Vec<String> = w.trace.moves.iter().map(|m| format!("cpu{}@{:.1}ms", m.cpu, ms_between(r.start_ns, m.at_ns))).collect();
        println!("{} moves: {}", w.name(), moves.join(" "));
    }
    ensure!(a.effective_cpus()? == CpuSet::one(0), "cpuset.cpus.effective is {} after the step", a.effective_cpus()?);
    ensure!(
        r.workers.iter().any(|w| w.trace.on_cpu.iter().any(|c| c.cpu == 1 && c.first_ns < s.start_ns)),
        "no worker ran on CPU 1 before the shrink: nothing to leave\n{r}"
    );
    for w in &r.workers {
        let last1 = w.trace.last_on(1).map(|t| ms_between(s.start_ns, t));
        // From the step's start: the write can block well after the move
        // (1 s seen under heavy host load, rebuilding sched domains).
        let after = w.trace.stamps_between(s.start_ns + 100_000_000, end_ns(&r));
        println!("{}: last on CPU 1 {:?} ms from the step, {after} stamps on CPU 0 after it", w.name(), last1);
        if let Some(d) = last1 {
            ensure!(d <= 100.0, "{} ran on removed CPU 1 {d:.1} ms after the cpuset shrank to 0 (limit 100 ms)", w.name());
        }
        ensure!(after > 0 && w.trace.last_on(0).is_some_and(|t| t > s.start_ns + 100_000_000), "{} did not keep running on CPU 0 after the shrink", w.name());
    }
    Ok(())
}

#[ktstr_test(cpus = 2, timeout_s = 60, gauntlet = false)]
fn cpuset_shrink_leaves_removed_cpus(ctx: &Ctx) -> Result<()> {
    cpuset_shrink(ctx)
}

/// CPU 1 goes offline mid-run and comes back: the worker whose cgroup
/// holds only CPU 1 moves (cgroup v2 falls back to the parent's CPUs
/// while its own are all offline), keeps making progress while CPU 1 is
/// gone, and returns to CPU 1 once it is back (v2 restores the effective
/// cpuset on online).
pub fn cpu_offline(ctx: &Ctx) -> Result<()> {
    let a = ctx.cgroup("a")?.cpus(CpuSet::one(1))?;
    let r = ctx
        .scenario()
        .at(MS(500), Step::offline(1))
        .at(MS(1700), Step::online(1))
        .run(&[a.workers(1)], MS(3000))?;
    println!("{r}");
    let (off, on) = (r.step("offline cpu1")?, r.step("online cpu1")?);
    println!("offline ran at {:.1} ms, took {:.1} ms; online ran at {:.1} ms, took {:.1} ms", off.offset_ms, off.took_ms, on.offset_ms, on.took_ms);
    let w = &r.workers[0];
    ensure!(w.trace.cpu_at(off.start_ns) == Some(1), "{} was on CPU {:?} before CPU 1 went offline", w.name(), w.trace.cpu_at(off.start_ns));
    // Measured from when it left CPU 1, not from the step's end: taking a
    // CPU down moves its tasks early, then can take over a second (1.7 s
    // seen under heavy host load) to finish.
    let left = w.trace.moves.iter().filter(|m| m.cpu == 1 && m.at_ns < on.start_ns).map(|m| m.last_ns).max().context("never on CPU 1")?;
    ensure!(left <= off.end_ns, "{} ran on CPU 1 {:.1} ms after the offline step ended", w.name(), ms_between(off.end_ns, left));
    let away = w.trace.cpus_between(left + STAMP_RACE_NS, on.start_ns);
    let kept = w.trace.stamps_between(left, on.start_ns);
    let before = w.trace.stamps_between(r.start_ns, off.start_ns);
    println!(
        "{}: left CPU 1 {:.1} ms into the offline step; {before} stamps in the {:.0} ms before, {kept} in the {:.0} ms until the online step (on CPUs {away})",
        w.name(),
        ms_between(off.start_ns, left),
        off.offset_ms,
        ms_between(left, on.start_ns)
    );
    ensure!(!away.contains(1), "{} was on CPUs {away} while CPU 1 was offline", w.name());
    ensure!(kept > 0, "{} made no progress while CPU 1 was offline", w.name());
    let back = w.trace.moves.iter().find(|m| m.cpu == 1 && m.at_ns >= on.start_ns).context("never back on CPU 1 after it came online")?;
    println!("{}: back on CPU 1 {:.1} ms after the online step started", w.name(), ms_between(on.start_ns, back.at_ns));
    ensure!(std::fs::read_to_string("/sys/devices/system/cpu/online")?.trim() == "0-1");
    Ok(())
}

#[ktstr_test(cpus = 2, timeout_s = 60, gauntlet = false)]
fn cpu_offline_worker_moves_and_keeps_running(ctx: &Ctx) -> Result<()> {
    cpu_offline(ctx)
}

/// A step left undone is undone at the end: CPU 1 taken offline and
/// never brought back is online again when the run returns, with its
/// fair server parameters (6.12 gives a hot-added CPU runtime 0).
#[ktstr_test(cpus = 2, timeout_s = 60, gauntlet = false)]
fn offline_cpu_is_back_after_the_run(ctx: &Ctx) -> Result<()> {
    let r = ctx.scenario().at(MS(300), Step::offline(1)).run(&[ctx.workers(2)], MS(1000))?;
    let off = r.step("offline cpu1")?;
    for w in &r.workers {
        let (from, to) = (off.end_ns + STAMP_RACE_NS, end_ns(&r));
        ensure!(w.trace.stamps_between(from, to) > 0, "{} made no progress while CPU 1 was offline", w.name());
        ensure!(w.trace.cpus_between(from, to).iter().all(|c| c == 0), "{} ran on CPU 1 while it was offline", w.name());
    }
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    ensure!(online.trim() == "0-1", "online CPUs after the run: {online}");
    let rt_file = "/sys/kernel/debug/sched/fair_server/cpu1/runtime";
    let rt = std::fs::read_to_string(rt_file).with_context(|| format!("reading {rt_file} (debugfs mounted? a 6.12+ kernel?)"))?;
    println!("cpu1 fair_server runtime after re-online: {}", rt.trim());
    ensure!(rt.trim() != "0", "CPU 1's fair server has runtime 0 after coming back online");
    Ok(())
}

/// Spinners in two cgroups share CPU 1 at weights 100:100, then 100:300:
/// the second's share moves from 50 % to 75 % (cgroup v2 cpu.weight is
/// the group entity's CFS/EEVDF weight). Shares come from each worker's
/// progress stamps per 10 ms slot in the half of the run before and the half
/// after the step (one chunk per stamp; same CPU, same speed), so one
/// run shows both; each within 15 % of what the weights give.
pub fn weight_shift(ctx: &Ctx, dur: Duration) -> Result<(f64, f64)> {
    let a = ctx.cgroup("a")?.cpus(CpuSet::one(1))?.weight(100)?;
    let b = ctx.cgroup("b")?.cpus(CpuSet::one(1))?.weight(100)?;
    let r = ctx.scenario().at(dur / 2, Step::weight(&b, 300)).run(&[a.workers(1), b.workers(1)], dur)?;
    println!("{r}");
    let s = r.step("weight b=300")?;
    let w = std::fs::read_to_string(b.path().join("cpu.weight"))?;
    ensure!(w.trim() == "300", "b's cpu.weight is {} after the step", w.trim());
    let end = end_ns(&r);
    let share = |from: u64, to: u64| -> f64 {
        let st = |g: &str| r.group(g).map(|w| w.trace.stamps_between(from, to)).sum::<u64>() as f64;
        st("b") / (st("a") + st("b")).max(1.0)
    };
    let before = share(r.start_ns + 300_000_000, s.start_ns);
    let after = share(s.end_ns + 200_000_000, end);
    println!("b's share of CPU 1: {:.1} % before the weight change, {:.1} % after", before * 100.0, after * 100.0);
    Ok((before, after))
}

#[ktstr_test(cpus = 2, timeout_s = 60, gauntlet = false)]
fn share_weight_change_shifts_share(ctx: &Ctx) -> Result<()> {
    let (before, after) = weight_shift(ctx, MS(3000))?;
    ensure!(within_15pct(before, 0.5), "b got {:.1} % at weights 100:100, want 50 % ± 15 %", before * 100.0);
    ensure!(within_15pct(after, 0.75), "b got {:.1} % at weights 100:300, want 75 % ± 15 %", after * 100.0);
    Ok(())
}

/// Workers moved from cgroup a (CPU 0) into b (CPU 1) change cgroup and
/// CPU: worker 1 alone at 600 ms (`move_worker`), then the whole group
/// at 1200 ms (`move_group`). A custom step reads /proc/PID/cgroup in
/// between; the traces show each worker on CPU 0 only before its move and
/// on CPU 1 only after it.
#[ktstr_test(cpus = 2, timeout_s = 60, gauntlet = false)]
fn move_between_cgroups_changes_cgroup_and_cpus(ctx: &Ctx) -> Result<()> {
    let a = ctx.cgroup("a")?.cpus(CpuSet::one(0))?;
    let b = ctx.cgroup("b")?.cpus(CpuSet::one(1))?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let read = Step::custom("read cgroups", move |sc: &StepCtx| {
        for pid in sc.pids("a") {
            s2.lock().unwrap().push(cgroup_of(pid)?);
        }
        Ok(())
    });
    let r = ctx
        .scenario()
        .at(MS(600), Step::move_worker("a", 1, &b))
        .at(MS(900), read)
        .at(MS(1200), Step::move_group("a", &b))
        .run(&[a.workers(2)], MS(1800))?;
    println!("{r}");
    let end = end_ns(&r);
    for (w, mv) in r.workers.iter().zip([r.step("move a -> b")?, r.step("move a[1] -> b")?]) {
        let (before, after) = (w.trace.cpus_between(r.start_ns, mv.start_ns), w.trace.cpus_between(mv.end_ns + STAMP_RACE_NS, end));
        println!("{} ran on {before} before `{}` (at {:.0} ms), on {after} after", w.name(), mv.name, mv.offset_ms);
        ensure!(before == CpuSet::one(0) && after == CpuSet::one(1), "{} ran on {before} before and {after} after `{}` from a (CPU 0) to b (CPU 1)", w.name(), mv.name);
    }
    let cg = seen.lock().unwrap().clone();
    println!("cgroups at 900 ms: {cg:?}");
    ensure!(cg.len() == 2 && cg[0].ends_with("/a") && cg[1].ends_with("/b"), "a[0] and a[1] were in {cg:?} at 900 ms; want a and b");
    ensure!(r.step("read cgroups")?.start_ns >= r.start_ns + 900_000_000);
    Ok(())
}

/// Nested cgroups made and removed mid-run: outer/inner is created,
/// given CPU 1, the workers move in and out again, and inner is removed,
/// each at its time. The trace shows them on CPU 1 only while inside; a
/// custom step sees their cgroup path; inner is gone at the end.
#[ktstr_test(cpus = 2, timeout_s = 60, gauntlet = false)]
fn nested_cgroup_create_move_remove(ctx: &Ctx) -> Result<()> {
    let outer = ctx.cgroup("outer")?.cpus(CpuSet::first(2))?;
    let home = ctx.cgroup("home")?.cpus(CpuSet::one(0))?;
    let inner = outer.child("inner");
    let seen = Arc::new(Mutex::new(String::new()));
    let s2 = seen.clone();
    let r = ctx
        .scenario()
        .at(MS(200), Step::create(&inner))
        .at(MS(250), Step::cpuset(&inner, CpuSet::one(1)))
        .at(MS(300), Step::move_group("home", &inner))
        .at(MS(700), Step::custom("where", move |sc| {
            *s2.lock().unwrap() = cgroup_of(sc.pids("home")[0])?;
            Ok(())
        }))
        .at(MS(1100), Step::move_group("home", &home))
        .at(MS(1200), Step::remove(&inner))
        .run(&[home.workers(2)], MS(1600))?;
    println!("{r}");
    for s in &r.steps {
        println!("{:<28} at {:>6.0} ms ran at {:>7.1} ms took {:>6.2} ms", s.name, s.at_ms, s.offset_ms, s.took_ms);
    }
    ensure!(r.steps.len() == 6, "{:?}", r.steps);
    let (i, o) = (r.step("move home -> outer/inner")?, r.step("move home -> home")?);
    let end = end_ns(&r);
    for w in &r.workers {
        let (inside, after) = (w.trace.cpus_between(i.end_ns + STAMP_RACE_NS, o.start_ns), w.trace.cpus_between(o.end_ns + STAMP_RACE_NS, end));
        ensure!(inside == CpuSet::one(1) && after == CpuSet::one(0), "{} ran on {inside} inside outer/inner (CPU 1) and {after} back home (CPU 0)", w.name());
        ensure!(w.trace.stamps_between(i.end_ns, o.start_ns) > 0);
    }
    let where_ = seen.lock().unwrap().clone();
    ensure!(where_.ends_with("/outer/inner"), "a worker's cgroup at 700 ms: {where_:?}");
    ensure!(!inner.path().exists(), "{} still exists", inner.path().display());
    Ok(())
}

/// A step that fails fails the run with one line naming it (removing a
/// cgroup that still holds workers: EBUSY), later steps do not run, and
/// what earlier steps made is still cleaned up.
#[ktstr_test(cpus = 2, timeout_s = 60, gauntlet = false)]
fn failing_step_names_itself(ctx: &Ctx) -> Result<()> {
    let a = ctx.cgroup("a")?;
    let extra = a.child("x");
    let outer = ctx.cgroup("outer")?;
    let made = outer.child("made");
    let e = ctx
        .scenario()
        .at(MS(100), Step::create(&made))
        .at(MS(300), Step::remove(&a))
        .at(MS(500), Step::create(&extra))
        .run(&[a.workers(1)], MS(800));
    let e = match e {
        Ok(r) => bail!("removing a cgroup with a worker inside succeeded\n{r}"),
        Err(e) => e.to_string(),
    };
    let first = e.lines().next().unwrap_or_default();
    println!("{first}");
    ensure!(first.starts_with("scenario step `remove a` (at 300 ms, ran at ") && first.contains("Device or resource busy"), "{e}");
    ensure!(!made.path().exists(), "outer/made was not cleaned up");
    ensure!(!extra.path().exists(), "a step after the failure ran");
    Ok(())
}

/// Cpusets from the topology on 2 NUMA nodes × 2 LLCs × 1 core: one per
/// LLC and per node match sysfs, the halves split the nodes, and sets
/// overlapping by 1 share exactly one CPU. Workers in per-LLC and
/// per-node cgroups never leave them (the `isolated` key checks it).
#[ktstr_test(numa_nodes = 2, llcs = 2, cores = 1, threads = 1, memory_mib = 512, timeout_s = 60, isolated, gauntlet = false)]
fn topology_cpusets(ctx: &Ctx) -> Result<()> {
    let t = ctx.cpusets()?;
    let show = |v: &[CpuSet]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" ");
    let (h0, h1) = t.halves()?;
    let (o0, o1) = t.overlapping(1)?;
    println!("llcs {} | nodes {} | halves {h0} {h1} | overlapping(1) {o0} {o1}", show(t.llcs()), show(t.nodes()));
    ensure!(show(t.llcs()) == "0 1 2 3" && show(t.nodes()) == "0-1 2-3", "llcs {} nodes {}", show(t.llcs()), show(t.nodes()));
    ensure!(h0.and(&h1).is_empty() && (h0.to_string(), h1.to_string()) == ("0-1".into(), "2-3".into()));
    ensure!(o0.and(&o1).len() == 1 && o0.len() + o1.len() == 5);
    let mut groups = Vec::new();
    let mut cgs = Vec::new();
    for (i, l) in t.llcs().iter().enumerate() {
        let cg = ctx.cgroup(&format!("llc{i}"))?.cpus(l.clone())?;
        groups.push(cg.workers(1));
        cgs.push(cg);
    }
    for (i, (s, name)) in [(o0, "ov0"), (o1, "ov1")].into_iter().enumerate() {
        let cg = ctx.cgroup(name)?.cpus(s)?;
        groups.push(cg.workers(2).label(&format!("ov{i}")));
        cgs.push(cg);
    }
    let r = ctx.run(&groups, MS(1000))?;
    println!("{r}");
    for (i, l) in t.llcs().iter().enumerate() {
        let w = r.group(&format!("llc{i}")).next().context("no worker")?;
        ensure!(w.cpus == *l, "{} ran on {}, its LLC is {l}", w.name(), w.cpus);
    }
    Ok(())
}

// ---- The same fidelity scenarios under scx_simple (docs/sched_ext.md) ----

/// Shares under scx_simple are judged over 6 s, not EEVDF's 3: two tasks
/// alternate 20 ms slices and nothing pays back a slice that overran
/// (a late tick; under TCG a host stall), where EEVDF charges it to the
/// task's vruntime. 61 % and 58 % were seen in 3 s runs on a busy host.
const SCX_SHARE_RUN: Duration = Duration::from_secs(6);

/// scx_simple in its default weighted-vtime mode.
const SIMPLE_VTIME: Scheduler = Scheduler::new("scx_simple");
/// scx_simple -f: one FIFO queue, every task gets the same 20 ms slice.
const SIMPLE_FIFO: Scheduler = Scheduler::new("scx_simple_fifo").binary("scx_simple").args(&["-f"]).ops_name("simple");

/// Holds: cpumasks are enforced by the kernel core whatever the BPF
/// scheduler does (a task on a CPU it may no longer use is migrated by
/// the same stopper; scx_simple's select_cpu picks among allowed CPUs).
#[ktstr_test(scheduler = SIMPLE_VTIME, cpus = 2, memory_mib = 512, timeout_s = 60, gauntlet = false)]
fn scx_simple_cpuset_shrink_leaves_removed_cpus(ctx: &Ctx) -> Result<()> {
    cpuset_shrink(ctx)
}

// Holds under the scx project's schedulers too (same reason): scx_bpfland,
// and scx_rusty on two LLCs (its two balancing domains; the cgroup
// keeps to CPUs 0-1 of the four).
use ktstr_tests::{BPFLAND, RUSTY};

#[ktstr_test(scheduler = BPFLAND, cpus = 2, memory_mib = 1024, timeout_s = 90, gauntlet = false)]
fn scx_bpfland_cpuset_shrink_leaves_removed_cpus(ctx: &Ctx) -> Result<()> {
    cpuset_shrink(ctx)
}

#[ktstr_test(scheduler = RUSTY, llcs = 2, cores = 2, threads = 1, memory_mib = 2048, timeout_s = 120, gauntlet = false)]
fn scx_rusty_cpuset_shrink_leaves_removed_cpus(ctx: &Ctx) -> Result<()> {
    cpuset_shrink(ctx)
}

/// Differs: two spinners at nice 0 and nice 5 alternate 20 ms slices
/// (50 % each ± 15 %) although scx_simple's vtime mode charges used
/// slice × 100 / p->scx.weight (nice 5: 33). In 6.12 a CPU whose task's
/// slice ran out calls ops.dispatch() *before* that task is re-enqueued
/// (balance_one() runs ahead of put_prev_task_scx()), and simple_dispatch
/// consumes the shared DSQ without comparing against `prev`: the one
/// queued task always runs next, so the vtime order never decides between
/// two tasks. (EEVDF gives nice 5 24.7 %: `share_nice_weights`.)
#[ktstr_test(scheduler = SIMPLE_VTIME, cpus = 2, memory_mib = 512, timeout_s = 60, gauntlet = false)]
fn share_scx_simple_nice_pair_alternates(ctx: &Ctx) -> Result<()> {
    let got = nice5_share(ctx)?;
    ensure!(within_15pct(got, 0.5), "nice 5 got {:.1} % beside nice 0 under scx_simple (vtime): two tasks alternate slices, want 50 % ± 15 %", got * 100.0);
    Ok(())
}

/// Differs: in FIFO mode scx_simple ignores weights; every task runs
/// its full 20 ms slice in turn, so nice 5 gets half (±15 %).
#[ktstr_test(scheduler = SIMPLE_FIFO, cpus = 2, memory_mib = 512, timeout_s = 60, gauntlet = false)]
fn share_scx_simple_fifo_ignores_nice(ctx: &Ctx) -> Result<()> {
    let got = nice5_share(ctx)?;
    ensure!(within_15pct(got, 0.5), "nice 5 got {:.1} % under scx_simple -f, FIFO gives 50 % (±15 %)", got * 100.0);
    Ok(())
}

fn nice5_share(ctx: &Ctx) -> Result<f64> {
    let dur = SCX_SHARE_RUN;
    let a = ctx.work(1, Work::Spin).label("nice0").cpus(CpuSet::one(1));
    let b = ctx.work(1, Work::Spin).label("nice5").cpus(CpuSet::one(1)).nice(5);
    let r = ctx.run(&[a, b], dur)?;
    println!("{r}");
    let w5 = r.group("nice5").next().context("no nice5")?;
    ensure!(w5.nice == 5, "nice5 runs at nice {}", w5.nice);
    let total: f64 = r.workers.iter().map(|w| w.runtime.as_secs_f64()).sum();
    let got = w5.runtime.as_secs_f64() / total;
    println!("nice 5 share: {:.1} %", got * 100.0);
    Ok(got)
}

/// Differs: scx_simple has no cgroup support (no cgroup_* ops; the
/// kernel logs `"simple" does not implement cgroup cpu.weight`), so after
/// b's weight goes to 300 the two spinners still split CPU 1 evenly
/// (50 % ± 15 %, not 75 %); with two tasks on a CPU they would alternate
/// anyway (see `share_scx_simple_nice_pair_alternates`).
#[ktstr_test(scheduler = SIMPLE_VTIME, cpus = 2, memory_mib = 512, timeout_s = 60, gauntlet = false)]
fn share_scx_simple_ignores_cgroup_weight(ctx: &Ctx) -> Result<()> {
    let (before, after) = weight_shift(ctx, SCX_SHARE_RUN)?;
    for (when, s) in [("before", before), ("after", after)] {
        ensure!(within_15pct(s, 0.5), "b got {:.1} % {when} the weight change under scx_simple, which ignores cgroups: want 50 % ± 15 %", s * 100.0);
    }
    Ok(())
}

/// Differs: 6.12 unregisters a BPF scheduler without ops.cpu_offline on
/// any hotplug ("cpu 1 going offline, exiting scheduler"; scx_simple's
/// loader then restarts it), so the harness sees it leave and fails the
/// test. Fails on purpose; `driver::scx_simple_cpu_offline_unregisters`
/// checks the failure.
#[ktstr_test(scheduler = SIMPLE_VTIME, cpus = 2, memory_mib = 512, timeout_s = 60, gauntlet = false)]
fn demo_scx_simple_cpu_offline(ctx: &Ctx) -> Result<()> {
    cpu_offline(ctx)
}

mod driver {
    use ktstr_tests::driver::run_exact;

    #[test]
    fn scx_simple_cpu_offline_unregisters() {
        let Some(r) = run_exact("ktstr/demo_scx_simple_cpu_offline") else { return };
        let (code, stderr) = (r.code, r.stderr);
        assert_eq!(code, 1, "taking a CPU offline under scx_simple must fail the test:\n{stderr}");
        let banner = stderr.lines().find(|l| l.starts_with("ktstr: FAIL: ")).unwrap_or_else(|| panic!("no FAIL banner:\n{stderr}"));
        assert!(banner.contains("scx_simple") && banner.contains("unregistered from the main kernel"), "{banner}");
        assert!(stderr.contains("cpu 1 going offline, exiting scheduler"), "scx_simple's exit report names the hotplug:\n{stderr}");
    }
}
