//! Worker processes: forked children that set themselves up (policy,
//! nice, affinity, comm), do their work type until a shared deadline,
//! and report what the scheduler gave them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cgroup::move_to;
use crate::cpuset::CpuSet;
use crate::metrics::SchedStat;
use crate::policy::{set_affinity, set_comm, Policy};
use crate::report::{Report, WorkerReport};
use crate::scenario::step::Undo;
use crate::scenario::Plan;
use crate::work::tally::{cputime_ns, now_ns, Tally};
use crate::work::{GroupRes, Role};

pub use crate::work::{Phase, Work};

/// How each worker of a group sets itself up before it starts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerOpts {
    pub policy: Policy,
    pub nice: i32,
    /// Affinity of every worker (intersected with its cgroup's cpuset).
    pub cpus: Option<CpuSet>,
    /// Pins worker i to the (i mod len)-th CPU of this set instead.
    pub pin_each: Option<CpuSet>,
    /// `comm` of every worker (15 bytes kept).
    pub comm: Option<String>,
}

/// `n` identical workers, optionally inside a cgroup.
#[derive(Debug, Clone)]
pub struct WorkerGroup {
    pub label: String,
    pub cgroup: Option<PathBuf>,
    pub n: usize,
    pub work: Work,
    pub opts: WorkerOpts,
}

impl WorkerGroup {
    pub fn new(label: &str, cgroup: Option<PathBuf>, n: usize, work: Work) -> Self {
        Self { label: label.to_string(), cgroup, n, work, opts: WorkerOpts::default() }
    }
    /// Names the group in reports (default: its cgroup's name, or "workers").
    pub fn label(mut self, label: &str) -> Self {
        self.label = label.to_string();
        self
    }
    pub fn policy(mut self, p: Policy) -> Self {
        self.opts.policy = p;
        self
    }
    pub fn nice(mut self, nice: i32) -> Self {
        self.opts.nice = nice;
        self
    }
    /// Every worker's CPU affinity.
    pub fn cpus(mut self, cpus: CpuSet) -> Self {
        self.opts.cpus = Some(cpus);
        self
    }
    /// Worker i runs only on the (i mod len)-th CPU of `cpus`.
    pub fn pin_each(mut self, cpus: CpuSet) -> Self {
        self.opts.pin_each = Some(cpus);
        self
    }
    pub fn comm(mut self, name: &str) -> Self {
        self.opts.comm = Some(name.to_string());
        self
    }

    /// The affinity worker `i` sets on itself, if any.
    fn affinity_of(&self, i: usize) -> Option<CpuSet> {
        if let Some(p) = &self.opts.pin_each {
            let cpus: Vec<u32> = p.iter().collect();
            return cpus.get(i % cpus.len().max(1)).map(|&c| CpuSet::one(c));
        }
        self.opts.cpus.clone()
    }

    fn validate(&self) -> Result<()> {
        self.work.validate(&self.label, self.n)?;
        self.opts.policy.validate(self.opts.nice).map_err(|e| anyhow::anyhow!("group {}: {e}", self.label))?;
        if self.opts.pin_each.as_ref().is_some_and(|s| s.is_empty()) || self.opts.cpus.as_ref().is_some_and(|s| s.is_empty()) {
            bail!("group {}: empty CPU affinity; give at least one CPU", self.label);
        }
        Ok(())
    }
}

/// CPUs this process may run on (its affinity mask), however many the
/// host has: the mask grows until the kernel's CPU count fits.
pub fn affinity() -> CpuSet {
    let mut words = std::mem::size_of::<libc::cpu_set_t>() / 8;
    loop {
        let mut mask = vec![0u64; words];
        // SAFETY: the kernel writes at most `words * 8` bytes into `mask`.
        let r = unsafe { libc::sched_getaffinity(0, words * 8, mask.as_mut_ptr().cast::<libc::cpu_set_t>()) };
        if r == 0 {
            return from_mask(&mask);
        }
        // EINVAL: the kernel's mask is larger than ours.
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) || words >= 1 << 14 {
            return CpuSet::empty();
        }
        words *= 2;
    }
}

/// The CPUs of a kernel CPU mask (bit `c % 64` of word `c / 64`).
fn from_mask(mask: &[u64]) -> CpuSet {
    let mut out = CpuSet::empty();
    for (i, w) in mask.iter().enumerate() {
        (0..64).filter(|b| w & (1 << b) != 0).for_each(|b| out.insert(i as u32 * 64 + b));
    }
    out
}

/// Rusage figures a worker reports as deltas.
fn rusage() -> (u64, u64, u64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    (r.ru_nvcsw as u64, r.ru_nivcsw as u64, r.ru_minflt as u64)
}

/// Sets up the worker itself: affinity, comm, then policy and nice (in
/// that order: a `SCHED_DEADLINE` admission sees the final affinity).
fn setup(g: &WorkerGroup, index: usize) -> Result<(), String> {
    if let Some(a) = g.affinity_of(index) {
        set_affinity(&a)?;
    }
    if let Some(c) = &g.opts.comm {
        set_comm(c)?;
    }
    if g.opts.policy != Policy::Other || g.opts.nice != 0 {
        g.opts.policy.apply(g.opts.nice)?;
    }
    Ok(())
}

/// What the kernel says the worker is after setup: comm, policy, nice.
fn identity() -> (String, String, i32) {
    let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default().trim().to_string();
    // SAFETY: no preconditions.
    let p = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
    let policy = match p {
        libc::SCHED_OTHER => "SCHED_OTHER",
        libc::SCHED_BATCH => "SCHED_BATCH",
        libc::SCHED_IDLE => "SCHED_IDLE",
        libc::SCHED_FIFO => "SCHED_FIFO",
        libc::SCHED_RR => "SCHED_RR",
        6 => "SCHED_DEADLINE",
        7 => "SCHED_EXT",
        _ => "?",
    };
    // SAFETY: no preconditions (-1 is a valid nice; errors cannot happen for ourselves).
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    (comm, policy.to_string(), nice)
}

/// The worker's body, in the forked child; returns its report.
/// `go_ns`: when the parent released the workers; from then on a worker
/// is runnable, so a worker that gets no CPU until late shows that wait
/// as its first gap. `start_ns`: the run's clock start (`Report::start_ns`),
/// where every worker's trace slots begin, so slot `i` is the same time
/// in all of them.
fn worker_main(g: &WorkerGroup, index: usize, res: &GroupRes, go_ns: u64, start_ns: u64, deadline: u64) -> WorkerReport {
    if let Err(e) = setup(g, index) {
        return WorkerReport { error: Some(e), ..WorkerReport::default() };
    }
    let (comm, policy, nice) = identity();
    let cpu0 = cputime_ns();
    let start = now_ns();
    let (v0, i0, f0) = rusage();
    let ss0 = SchedStat::read_self();
    let mut t = Tally::default();
    t.trace = crate::work::trace::Trace::new(start_ns, deadline);
    t.gap.stamp(go_ns, crate::work::tally::thread_cputime_ns);
    t.tick();
    let mut phases = Vec::new();
    crate::work::run(&g.work, &Role { index, n: g.n, res }, deadline, &mut t, &mut phases);
    // A worker still running here was runnable up to now: the last stretch counts.
    t.tick();
    let (v1, i1, f1) = rusage();
    let ss = SchedStat::read_self().zip(ss0).map(|(b, a)| b.since(&a));
    WorkerReport {
        runtime: Duration::from_nanos(cputime_ns() - cpu0),
        wall: Duration::from_nanos(now_ns().saturating_sub(start)),
        wakeups: t.wakeups,
        migrations: t.migrations,
        cpus: t.cpus,
        iterations: t.iterations,
        max_gap: Duration::from_nanos(t.gap.max),
        max_gap_at: Duration::from_nanos(t.gap.at.saturating_sub(start)),
        wake: t.wake,
        run_delay: ss.map(|s| Duration::from_nanos(s.wait_ns)),
        timeslices: ss.map(|s| s.timeslices),
        voluntary_csw: v1.saturating_sub(v0),
        involuntary_csw: i1.saturating_sub(i0),
        minor_faults: f1.saturating_sub(f0),
        affinity_misses: t.affinity_misses,
        exclusion_violations: t.exclusion_violations,
        failed_children: t.failed_children,
        phase_iterations: phases,
        trace: t.trace,
        comm,
        policy,
        nice,
        ..WorkerReport::default()
    }
}

fn pipe() -> Result<(i32, i32)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    Ok((fds[0], fds[1]))
}

/// Appends what `fd` holds to `out`: up to EOF, or (non-blocking fd)
/// until the pipe is empty for now.
fn read_all(fd: i32, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a stack buffer of the given size.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            out.extend_from_slice(&buf[..n as usize]);
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

fn write_all(fd: i32, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: writing from a live slice.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n <= 0 {
            return;
        }
        data = &data[n as usize..];
    }
}

struct Child {
    pid: i32,
    go_w: i32,
    res_r: i32,
    /// The report read so far: drained while waiting, since a report
    /// larger than the pipe buffer blocks the worker until it is read.
    out: Vec<u8>,
    group: usize,
    index: usize,
    allowed: CpuSet,
    status: Option<i32>,
}

/// Forks every worker, moves each into its cgroup, starts them together,
/// and collects their reports. Workers still running `dur + 10 s` after
/// the start are killed and reported as an error.
pub fn run(groups: &[WorkerGroup], dur: Duration) -> Result<Report> {
    run_plan(groups, dur, Plan::default())
}

/// [`run`] with scenario steps, run by a thread of this process at their
/// times while the workers work; what they changed is undone at the end.
/// A failed step (or cleanup) is in `Report::steps` (`Report::cleanup_error`), not an `Err`:
/// `Ctx::run` records the figures, then fails on it.
pub fn run_plan(groups: &[WorkerGroup], dur: Duration, mut plan: Plan) -> Result<Report> {
    if groups.iter().map(|g| g.n).sum::<usize>() == 0 {
        bail!("ctx.run: no workers given");
    }
    for g in groups {
        g.validate()?;
    }
    plan.prepare(groups, dur)?;
    let mut kids: Vec<Child> = Vec::new();
    let mut undo = Undo::default();
    let result = spawn_all(groups, dur, &plan, &mut undo, &mut kids);
    if result.is_err() {
        for k in &kids {
            // SAFETY: killing and reaping our own children.
            unsafe {
                libc::kill(k.pid, libc::SIGKILL);
                libc::waitpid(k.pid, std::ptr::null_mut(), 0);
            }
        }
    }
    for k in &kids {
        // SAFETY: closing fds we own.
        unsafe {
            libc::close(k.res_r);
        }
    }
    // Workers are gone: cgroups the steps made are empty, CPUs can return.
    let cleanup = undo.run().err().map(|e| format!("{e:#}"));
    match result {
        Ok(report) => Ok(Report { cleanup_error: cleanup, ..report }),
        Err(e) => match cleanup {
            Some(c) => Err(anyhow::anyhow!("{e:#}; undoing the scenario steps afterwards failed too: {c}")),
            None => Err(e),
        },
    }
}

fn spawn_all(groups: &[WorkerGroup], dur: Duration, plan: &Plan, undo: &mut Undo, kids: &mut Vec<Child>) -> Result<Report> {
    for (gi, g) in groups.iter().enumerate() {
        // Dropped (the parent's copies closed) once the group is forked.
        let res = GroupRes::new(&g.work, g.n)?;
        for i in 0..g.n {
            let (go_r, go_w) = pipe()?;
            let (res_r, res_w) = pipe()?;
            // SAFETY: the child only reads a pipe, computes, writes and _exits.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(std::io::Error::last_os_error()).context("fork worker");
            }
            if pid == 0 {
                // SAFETY: child side: plain fd syscalls, then _exit without unwinding.
                unsafe {
                    libc::close(go_w);
                    libc::close(res_r);
                    let mut d = [0u8; 24];
                    let got = libc::read(go_r, d.as_mut_ptr().cast(), 24);
                    if got == 24 {
                        let word = |i: usize| u64::from_le_bytes(d[i * 8..i * 8 + 8].try_into().unwrap_or_default());
                        let r = worker_main(g, i, &res, word(0), word(1), word(2));
                        write_all(res_w, &serde_json::to_vec(&r).unwrap_or_default());
                    }
                    libc::_exit(0);
                }
            }
            // SAFETY: closing the child's ends in the parent; making our
            // read end non-blocking so the wait loop can drain it.
            unsafe {
                libc::close(go_r);
                libc::close(res_w);
                libc::fcntl(res_r, libc::F_SETFL, libc::O_NONBLOCK);
            }
            kids.push(Child { pid, go_w, res_r, out: Vec::new(), group: gi, index: i, allowed: CpuSet::empty(), status: None });
            if let Some(cg) = &g.cgroup {
                move_to(cg, pid).with_context(|| format!("move worker {}[{i}] into its cgroup", g.label))?;
            }
        }
    }
    let all = affinity();
    for k in kids.iter_mut() {
        let g = &groups[k.group];
        let cg = match &g.cgroup {
            Some(cg) => std::fs::read_to_string(cg.join("cpuset.cpus.effective"))
                .ok()
                .and_then(|s| CpuSet::parse(&s).ok())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| all.clone()),
            None => all.clone(),
        };
        k.allowed = match g.affinity_of(k.index) {
            Some(a) => cg.and(&a),
            None => cg,
        };
    }
    // A little headroom so every worker is waiting when the clock starts.
    let start = now_ns() + 20_000_000;
    let deadline = start + dur.as_nanos() as u64;
    for k in kids.iter() {
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&now_ns().to_le_bytes());
        msg[8..16].copy_from_slice(&start.to_le_bytes());
        msg[16..].copy_from_slice(&deadline.to_le_bytes());
        write_all(k.go_w, &msg);
        // SAFETY: closing our end of the go pipe.
        unsafe { libc::close(k.go_w) };
    }
    let pids: Vec<(String, usize, i32)> = kids.iter().map(|k| (groups[k.group].label.clone(), k.index, k.pid)).collect();
    // The steps run beside the wait for the workers; both end by the deadline.
    let (waited, steps) = std::thread::scope(|s| {
        let pids = &pids;
        let stepper = (!plan.is_empty()).then(|| s.spawn(move || plan.execute(start, pids, undo)));
        let waited = (|| -> Result<()> {
            let give_up = deadline + 10_000_000_000;
            loop {
                let mut pending = 0;
                for k in kids.iter_mut().filter(|k| k.status.is_none()) {
                    read_all(k.res_r, &mut k.out);
                    let mut st = 0;
                    // SAFETY: reaping our own child.
                    let r = unsafe { libc::waitpid(k.pid, &mut st, libc::WNOHANG) };
                    if r == k.pid {
                        k.status = Some(st);
                    } else {
                        pending += 1;
                    }
                }
                if pending == 0 {
                    break;
                }
                if now_ns() > give_up {
                    let stuck: Vec<String> = kids
                        .iter()
                        .filter(|k| k.status.is_none())
                        .map(|k| format!("{}[{}] (pid {})", groups[k.group].label, k.index, k.pid))
                        .collect();
                    bail!("workers still running 10 s past the deadline: {}", stuck.join(", "));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })();
        (waited, stepper.map(|h| h.join().unwrap_or_default()).unwrap_or_default())
    });
    waited?;
    let mut workers = Vec::new();
    for k in kids.iter_mut() {
        // The rest, written before the worker exited.
        read_all(k.res_r, &mut k.out);
    }
    for k in kids.iter() {
        let mut r: WorkerReport = serde_json::from_slice(&k.out).map_err(|_| {
            anyhow::anyhow!(
                "worker {}[{}] (pid {}) died without a report (wait status {:#x})",
                groups[k.group].label,
                k.index,
                k.pid,
                k.status.unwrap_or(0)
            )
        })?;
        r.group = groups[k.group].label.clone();
        r.index = k.index;
        r.pid = k.pid;
        r.allowed = k.allowed.clone();
        // Always runnable: these split CPU time evenly under a fair scheduler.
        r.spinner = matches!(groups[k.group].work, Work::Spin | Work::Yield | Work::Memory { .. });
        r.work = groups[k.group].work.name().to_string();
        if let Some(e) = &r.error {
            bail!("worker {}[{}] could not set itself up: {e}", r.group, r.index);
        }
        workers.push(r);
    }
    Ok(Report { duration: dur, workers, start_ns: start, steps, cleanup_error: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_masks_beyond_64_cpus() {
        // A 256-CPU host's mask with CPUs 0, 64 and 200 allowed.
        let mut mask = vec![0u64; 4];
        mask[0] = 1;
        mask[1] = 1;
        mask[3] = 1 << (200 - 192);
        let s = from_mask(&mask);
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 64, 200]);
        assert!(CpuSet::one(200).is_subset(&s), "a worker seen on CPU 200 is inside its cpuset");
        let here = affinity();
        assert!(!here.is_empty() && here.iter().all(|c| c < 1 << 16), "{here}");
        // SAFETY: no preconditions.
        assert!(here.contains(unsafe { libc::sched_getcpu() } as u32), "{here}");
    }

    /// A report far over the pipe buffer reaches the parent: draining the
    /// non-blocking read end while the writer runs, as the wait loop does.
    #[test]
    fn a_report_larger_than_the_pipe_buffer_is_drained() {
        let (r, w) = pipe().unwrap();
        // SAFETY: our own fd.
        unsafe { libc::fcntl(r, libc::F_SETFL, libc::O_NONBLOCK) };
        let data: Vec<u8> = (0..1 << 20).map(|i| i as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            write_all(w, &sent);
            // SAFETY: closing the write end we own.
            unsafe { libc::close(w) };
        });
        let mut out = Vec::new();
        while !writer.is_finished() {
            read_all(r, &mut out);
            std::thread::sleep(Duration::from_millis(1));
        }
        writer.join().unwrap();
        read_all(r, &mut out);
        // SAFETY: closing the read end we own.
        unsafe { libc::close(r) };
        assert!(out == data, "got {} of {} bytes", out.len(), data.len());
    }

    /// Every work type runs for real on this host and reports the figure
    /// it exists to produce.
    #[test]
    fn every_work_type_runs_here() {
        let ms = Duration::from_millis;
        let groups = [
            WorkerGroup::new("spin", None, 1, Work::Spin).comm("ktstr-spin"),
            WorkerGroup::new("yield", None, 1, Work::Yield).nice(5).comm("ktstr-yielder"),
            WorkerGroup::new("bursty", None, 1, Work::Bursty { burst: ms(2), period: ms(20) }).policy(Policy::Batch),
            WorkerGroup::new("pp", None, 2, Work::PingPong { spin: Duration::ZERO }),
            WorkerGroup::new("fan", None, 3, Work::FanOut { interval: ms(2), spin: Duration::ZERO }),
            WorkerGroup::new("mutex", None, 3, Work::Mutex { hold: Duration::from_micros(200), outside: Duration::from_micros(200) }),
            WorkerGroup::new("mem", None, 1, Work::Memory { bytes: 4 << 20, stride: 64 }),
            WorkerGroup::new("pf", None, 1, Work::PageFaults { pages: 16 }),
            WorkerGroup::new("fork", None, 1, Work::ForkExit),
            WorkerGroup::new("aff", None, 1, Work::AffinityChurn { dwell: ms(1) }),
            WorkerGroup::new("seq", None, 1, Work::Sequence(vec![Phase::new(Work::Spin, ms(30)), Phase::new(Work::Yield, ms(30))])),
        ];
        let r = run(&groups, ms(400)).unwrap();
        println!("{r}");
        let one = |g: &str| r.group(g).next().unwrap_or_else(|| panic!("no {g}"));
        for w in &r.workers {
            assert!(w.iterations > 0, "{} did no work\n{r}", w.name());
            assert!(w.error.is_none());
            // One slot grid for all: slot i is the same time in every trace.
            assert_eq!((w.trace.start_ns, w.trace.slot_ns), (r.start_ns, r.workers[0].trace.slot_ns), "{}", w.name());
        }
        assert!(one("bursty").wakeups >= 5, "a 20 ms period sleeps ~20 times in 400 ms\n{r}");
        assert!(r.group("pp").all(|w| w.wake.count() > 0), "{r}");
        assert!(r.group("fan").skip(1).all(|w| w.wake.count() > 0 && w.wake.count() <= r.group("fan").next().unwrap().iterations), "{r}");
        assert!(r.group("mutex").all(|w| w.exclusion_violations == 0), "{r}");
        // Every first touch of a (4 KiB, THP-off) page is a minor fault.
        assert!(one("mem").minor_faults >= (4 << 20) / 4096, "{r}");
        assert!(one("pf").minor_faults >= one("pf").iterations * 16, "{r}");
        assert_eq!(one("fork").failed_children, 0);
        assert_eq!((one("yield").comm.as_str(), one("yield").nice, one("yield").policy.as_str()), ("ktstr-yielder", 5, "SCHED_OTHER"));
        assert_eq!(one("bursty").policy, "SCHED_BATCH");
        assert_eq!(one("aff").affinity_misses, 0, "{r}");
        assert_eq!(one("seq").phase_iterations.len(), 2);
        assert!(one("seq").phase_iterations.iter().all(|&n| n > 0), "{r}");
        let m = r.metrics();
        assert_eq!(m.groups.len(), groups.len());
        let bad = WorkerGroup::new("pp", None, 3, Work::PingPong { spin: Duration::ZERO });
        assert!(run(&[bad], ms(10)).unwrap_err().to_string().contains("even number"));
        let fifo0 = WorkerGroup::new("rt", None, 1, Work::Spin).policy(Policy::Fifo(0));
        assert!(run(&[fifo0], ms(10)).unwrap_err().to_string().contains("priority 0"));
    }
}
