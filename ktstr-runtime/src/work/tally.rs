//! What a worker measures about itself while it works: progress stamps
//! (iterations, longest gap), the CPU of each stamp (CPUs seen,
//! migrations) and wake-up latencies.

use crate::cpuset::CpuSet;
use crate::metrics::{GapTracker, Histogram};

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn cputime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This thread's CPU time (a syscall: read once per window of stamps).
pub fn thread_cputime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn current_cpu() -> u32 {
    // SAFETY: no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    c.max(0) as u32
}

/// One unit of CPU work: a dependent multiply-add chain the compiler
/// cannot fold (~4 µs natively, tens of µs under TCG): long enough that
/// the stamp after it (clock, CPU, gap) costs ~1 %.
#[inline(always)]
pub fn chunk(mut x: u64) -> u64 {
    for _ in 0..4000 {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
    }
    x
}

#[derive(Default)]
pub struct Tally {
    pub cpus: CpuSet,
    last_cpu: Option<u32>,
    pub migrations: u64,
    /// Work units of the worker's type (chunks, yields, round trips, ...).
    pub iterations: u64,
    pub wakeups: u64,
    pub gap: GapTracker,
    /// Wake request (by another task) to running, in ns.
    pub wake: Histogram,
    /// Affinity churn: the CPU after `sched_setaffinity` was not the one asked for.
    pub affinity_misses: u64,
    /// Mutex work: another worker was inside the critical section too.
    pub exclusion_violations: u64,
    /// Fork churn: children that did not exit with status 0.
    pub failed_children: u64,
    /// Where and when it ran (per CPU, moves, progress per slot).
    pub trace: super::trace::Trace,
    seed: u64,
}

impl Tally {
    /// A progress stamp: notes the time (for gaps) and the CPU. Returns now.
    #[inline]
    pub fn tick(&mut self) -> u64 {
        let c = current_cpu();
        let moved = self.last_cpu != Some(c);
        if moved {
            if self.last_cpu.is_some() {
                self.migrations += 1;
            }
            self.last_cpu = Some(c);
            self.cpus.insert(c);
        }
        let now = now_ns();
        self.gap.stamp(now, thread_cputime_ns);
        // `trace` is stamped only here, so its last CPU is `last_cpu` too.
        self.trace.stamp_on(c, now, moved);
        now
    }

    /// The worker is about to block on purpose.
    #[inline]
    pub fn pause(&mut self) {
        self.gap.pause(now_ns(), thread_cputime_ns);
    }

    /// Burns CPU in chunks until `until_ns`, stamping after each; returns
    /// the chunks done. At least one chunk when `until_ns` is in the future.
    pub fn burn_until(&mut self, until_ns: u64) -> u64 {
        if now_ns() >= until_ns {
            return 0;
        }
        let mut n = 0;
        loop {
            self.seed = chunk(self.seed);
            n += 1;
            if self.tick() >= until_ns {
                return n;
            }
        }
    }

    /// Burns CPU for `ns` (capped at `deadline`).
    pub fn burn_for(&mut self, ns: u64, deadline: u64) -> u64 {
        if ns == 0 {
            return 0;
        }
        self.burn_until((now_ns() + ns).min(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burn_stamps_and_counts() {
        let mut t = Tally::default();
        t.tick();
        let n = t.burn_for(20_000_000, u64::MAX);
        assert!(n > 0);
        assert!(!t.cpus.is_empty());
        // 20 ms of chunks: the longest gap is at least one chunk and, on
        // any machine, below the whole stretch plus scheduler noise.
        assert!(t.gap.max > 0 && t.gap.max < 2_000_000_000, "{:?}", t.gap);
        assert_eq!(t.burn_for(0, u64::MAX), 0);
        assert_eq!(t.burn_until(0), 0, "a past deadline does no work");
    }
}
