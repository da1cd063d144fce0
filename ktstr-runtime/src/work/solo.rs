//! Work types a worker runs on its own.

use std::time::Duration;

use super::tally::{current_cpu, now_ns, Tally};
use super::Work;
use crate::policy::set_affinity;

const PAGE: usize = 4096;

pub fn run(work: &Work, until: u64, t: &mut Tally) {
    match work {
        Work::Spin => t.iterations += t.burn_until(until),
        Work::SleepWake { run, sleep } => sleep_wake(*run, *sleep, until, t),
        Work::Yield => yield_loop(until, t),
        Work::Bursty { burst, period } => bursty(*burst, *period, until, t),
        Work::Memory { bytes, stride } => memory(*bytes, *stride, until, t),
        Work::PageFaults { pages } => page_faults(*pages, until, t),
        Work::ForkExit => fork_exit(until, t),
        Work::AffinityChurn { dwell } => affinity_churn(*dwell, until, t),
        // Validated away: group types and nested sequences never get here.
        Work::PingPong { .. } | Work::FanOut { .. } | Work::Mutex { .. } | Work::Sequence(_) => {}
    }
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

fn sleep_wake(run: Duration, sleep: Duration, until: u64, t: &mut Tally) {
    while now_ns() < until {
        t.iterations += t.burn_for(ns(run), until);
        if now_ns() >= until {
            break;
        }
        t.pause();
        std::thread::sleep(sleep);
        t.wakeups += 1;
        t.tick();
    }
}

fn yield_loop(until: u64, t: &mut Tally) {
    // A yielding task stays runnable: the time between stamps is a gap.
    while t.tick() < until {
        // SAFETY: no preconditions.
        unsafe { libc::sched_yield() };
        t.iterations += 1;
    }
}

fn sleep_until(at: u64) {
    let ts = libc::timespec { tv_sec: (at / 1_000_000_000) as i64, tv_nsec: (at % 1_000_000_000) as i64 };
    // SAFETY: an absolute CLOCK_MONOTONIC sleep; EINTR just ends it early.
    unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &ts, std::ptr::null_mut()) };
}

fn bursty(burst: Duration, period: Duration, until: u64, t: &mut Tally) {
    // Periods on a fixed clock: a late burst does not shift the next one.
    let mut start = now_ns();
    while start < until {
        t.iterations += t.burn_until((start + ns(burst)).min(until));
        start += ns(period);
        if start >= until {
            break;
        }
        if now_ns() < start {
            t.pause();
            sleep_until(start);
            t.wakeups += 1;
            t.tick();
        }
    }
}

/// A private anonymous mapping with transparent huge pages off, so each
/// page faults on first touch.
fn map(bytes: usize) -> Option<*mut u8> {
    // SAFETY: a fresh private anonymous mapping; checked below.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: advising our own mapping; failure (no THP) is harmless.
    unsafe { libc::madvise(p, bytes, libc::MADV_NOHUGEPAGE) };
    Some(p.cast())
}

fn memory(bytes: usize, stride: usize, until: u64, t: &mut Tally) {
    let Some(buf) = map(bytes) else { return };
    let mut off = 0;
    'walk: loop {
        for _ in 0..4096 {
            // SAFETY: `off < bytes` inside our mapping; volatile keeps every access.
            unsafe {
                let p = buf.add(off);
                p.write_volatile(p.read_volatile().wrapping_add(1));
            }
            off += stride;
            if off >= bytes {
                off = 0;
            }
        }
        t.iterations += 1;
        if t.tick() >= until {
            break 'walk;
        }
    }
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(buf.cast(), bytes) };
}

fn page_faults(pages: usize, until: u64, t: &mut Tally) {
    while t.tick() < until {
        let Some(buf) = map(pages * PAGE) else { return };
        for i in 0..pages {
            // SAFETY: page `i` of our mapping.
            unsafe { buf.add(i * PAGE).write_volatile(1) };
        }
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(buf.cast(), pages * PAGE) };
        t.iterations += 1;
    }
}

fn fork_exit(until: u64, t: &mut Tally) {
    while t.tick() < until {
        // SAFETY: the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: leaving the child without running any parent state's destructors.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            t.failed_children += 1;
            return;
        }
        t.pause();
        let mut st = 0;
        // SAFETY: reaping our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r != pid || !libc::WIFEXITED(st) || libc::WEXITSTATUS(st) != 0 {
            t.failed_children += 1;
        }
        t.iterations += 1;
    }
}

fn affinity_churn(dwell: Duration, until: u64, t: &mut Tally) {
    let cpus: Vec<u32> = crate::workers::affinity().iter().collect();
    if cpus.is_empty() {
        return;
    }
    let mut i = cpus.iter().position(|&c| c == current_cpu()).map_or(0, |p| p + 1);
    while t.tick() < until {
        let want = cpus[i % cpus.len()];
        i += 1;
        if set_affinity(&crate::cpuset::CpuSet::one(want)).is_err() {
            t.affinity_misses += 1;
            continue;
        }
        t.iterations += 1;
        // sched_setaffinity(2) returns after moving the caller off a CPU
        // outside the new mask: it must now run on `want`.
        if current_cpu() != want {
            t.affinity_misses += 1;
        }
        t.burn_for(ns(dwell), until);
    }
    // Back to where it started, so the report's `allowed` still holds.
    let all: crate::cpuset::CpuSet = cpus.iter().fold(crate::cpuset::CpuSet::empty(), |s, &c| s.with(c));
    let _ = set_affinity(&all);
}
