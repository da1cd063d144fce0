//! Worker processes: forked children that spin or sleep/wake until a
//! shared deadline and report what the scheduler gave them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cgroup::move_to;
use crate::cpuset::CpuSet;
use crate::report::{Report, WorkerReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Burn CPU until the deadline.
    Spin,
    /// Burn CPU for `run`, sleep for `sleep`, repeat.
    SleepWake { run: Duration, sleep: Duration },
}

/// `n` identical workers, optionally inside a cgroup.
#[derive(Debug, Clone)]
pub struct WorkerGroup {
    pub label: String,
    pub cgroup: Option<PathBuf>,
    pub n: usize,
    pub work: Work,
}

impl WorkerGroup {
    pub fn new(label: &str, cgroup: Option<PathBuf>, n: usize, work: Work) -> Self {
        Self { label: label.to_string(), cgroup, n, work }
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn cputime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn current_cpu() -> u32 {
    // SAFETY: no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    c.max(0) as u32
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

#[derive(Default)]
struct Tally {
    cpus: CpuSet,
    last: Option<u32>,
    migrations: u64,
    iterations: u64,
}

impl Tally {
    fn observe(&mut self) {
        let c = current_cpu();
        if self.last.is_some_and(|l| l != c) {
            self.migrations += 1;
        }
        self.last = Some(c);
        self.cpus.insert(c);
    }
    /// Spins in small chunks until `until_ns`, noting the CPU each chunk ran on.
    fn spin_until(&mut self, until_ns: u64) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        loop {
            for _ in 0..2000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
            }
            self.iterations += 1;
            self.observe();
            if now_ns() >= until_ns {
                return;
            }
        }
    }
}

/// The worker's body, in the forked child; returns its report.
fn work(work: Work, deadline_ns: u64) -> WorkerReport {
    let cpu0 = cputime_ns();
    let start = now_ns();
    let mut t = Tally::default();
    t.observe();
    let mut wakeups = 0;
    match work {
        Work::Spin => t.spin_until(deadline_ns),
        Work::SleepWake { run, sleep } => loop {
            let now = now_ns();
            if now >= deadline_ns {
                break;
            }
            t.spin_until((now + run.as_nanos() as u64).min(deadline_ns));
            if now_ns() >= deadline_ns {
                break;
            }
            std::thread::sleep(sleep);
            wakeups += 1;
            t.observe();
        },
    }
    WorkerReport {
        runtime: Duration::from_nanos(cputime_ns() - cpu0),
        wall: Duration::from_nanos(now_ns().saturating_sub(start)),
        wakeups,
        migrations: t.migrations,
        cpus: t.cpus,
        iterations: t.iterations,
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

fn read_all(fd: i32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a stack buffer of the given size.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            out.extend_from_slice(&buf[..n as usize]);
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return out;
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
    group: usize,
    index: usize,
    allowed: CpuSet,
    status: Option<i32>,
}

/// Forks every worker, moves each into its cgroup, starts them together,
/// and collects their reports. Workers still running `dur + 10 s` after
/// the start are killed and reported as an error.
pub fn run(groups: &[WorkerGroup], dur: Duration) -> Result<Report> {
    if groups.iter().map(|g| g.n).sum::<usize>() == 0 {
        bail!("ctx.run: no workers given");
    }
    let mut kids: Vec<Child> = Vec::new();
    let result = spawn_all(groups, dur, &mut kids);
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
    result
}

fn spawn_all(groups: &[WorkerGroup], dur: Duration, kids: &mut Vec<Child>) -> Result<Report> {
    for (gi, g) in groups.iter().enumerate() {
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
                    let mut d = [0u8; 8];
                    let got = libc::read(go_r, d.as_mut_ptr().cast(), 8);
                    if got == 8 {
                        let r = work(g.work, u64::from_le_bytes(d));
                        write_all(res_w, &serde_json::to_vec(&r).unwrap_or_default());
                    }
                    libc::_exit(0);
                }
            }
            // SAFETY: closing the child's ends in the parent.
            unsafe {
                libc::close(go_r);
                libc::close(res_w);
            }
            kids.push(Child { pid, go_w, res_r, group: gi, index: i, allowed: CpuSet::empty(), status: None });
            if let Some(cg) = &g.cgroup {
                move_to(cg, pid).with_context(|| format!("move worker {}[{i}] into its cgroup", g.label))?;
            }
        }
    }
    let all = affinity();
    for k in kids.iter_mut() {
        k.allowed = match &groups[k.group].cgroup {
            Some(cg) => std::fs::read_to_string(cg.join("cpuset.cpus.effective"))
                .ok()
                .and_then(|s| CpuSet::parse(&s).ok())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| all.clone()),
            None => all.clone(),
        };
    }
    // A little headroom so every worker is waiting when the clock starts.
    let start = now_ns() + 20_000_000;
    let deadline = start + dur.as_nanos() as u64;
    for k in kids.iter() {
        write_all(k.go_w, &deadline.to_le_bytes());
        // SAFETY: closing our end of the go pipe.
        unsafe { libc::close(k.go_w) };
    }
    let give_up = deadline + 10_000_000_000;
    loop {
        let mut pending = 0;
        for k in kids.iter_mut().filter(|k| k.status.is_none()) {
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
    let mut workers = Vec::new();
    for k in kids.iter() {
        let bytes = read_all(k.res_r);
        let mut r: WorkerReport = serde_json::from_slice(&bytes).map_err(|_| {
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
        r.spinner = groups[k.group].work == Work::Spin;
        workers.push(r);
    }
    Ok(Report { duration: dur, workers })
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
        assert!(CpuSet::empty().with(200).is_subset(&s), "a worker seen on CPU 200 is inside its cpuset");
        let here = affinity();
        assert!(!here.is_empty() && here.iter().all(|c| c < 1 << 16), "{here}");
        // SAFETY: no preconditions.
        assert!(here.contains(unsafe { libc::sched_getcpu() } as u32), "{here}");
    }
}
