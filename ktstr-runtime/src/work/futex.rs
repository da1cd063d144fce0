//! Futex work: fan-out (one waker, many waiters) and a contended mutex.

use std::sync::atomic::{AtomicU32, Ordering::*};
use std::time::Duration;

use super::tally::{now_ns, Tally};
use super::Role;

/// FUTEX_WAIT on a shared (not private) word, at most until `deadline`
/// and never longer than 50 ms. True when woken (not a timeout or a changed value).
fn wait(word: &AtomicU32, expected: u32, deadline: u64) -> bool {
    let left = deadline.saturating_sub(now_ns()).min(50_000_000);
    if left == 0 {
        return false;
    }
    let ts = libc::timespec { tv_sec: 0, tv_nsec: left as i64 };
    // SAFETY: the word lives in a shared mapping for the whole run.
    let r = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec, 0usize, 0u32) };
    r == 0
}

fn wake(word: &AtomicU32, n: i32) {
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n, 0usize, 0usize, 0u32) };
}

pub fn fan_out(role: &Role, interval: Duration, spin: Duration, deadline: u64, t: &mut Tally) {
    let s = role.res.fan();
    let waiters = (role.n - 1) as u32;
    if role.index == 0 {
        t.tick();
        while now_ns() < deadline {
            // Wait for every waiter to finish the last round, then idle for
            // `interval` so they are all parked when the wake comes.
            t.pause();
            loop {
                let a = s.acks.load(Acquire);
                if a >= waiters * t.iterations as u32 || now_ns() >= deadline {
                    break;
                }
                wait(&s.acks, a, deadline);
            }
            std::thread::sleep(interval);
            if now_ns() >= deadline {
                break;
            }
            t.tick();
            s.ts.store(now_ns(), Release);
            s.seq.fetch_add(1, Release);
            wake(&s.seq, i32::MAX);
            t.iterations += 1;
        }
        s.stop.store(1, Release);
        s.seq.fetch_add(1, Release);
        wake(&s.seq, i32::MAX);
        return;
    }
    let mut seen = 0;
    loop {
        t.pause();
        let cur = s.seq.load(Acquire);
        if cur == seen {
            if now_ns() >= deadline {
                break;
            }
            wait(&s.seq, seen, deadline);
            continue;
        }
        // A new round (woken, or the wake came before we slept: both are
        // wake request → running).
        let now = t.tick();
        seen = cur;
        if s.stop.load(Acquire) != 0 {
            break;
        }
        t.wake.record(now.saturating_sub(s.ts.load(Acquire)));
        t.wakeups += 1;
        t.iterations += 1;
        t.burn_for(spin.as_nanos() as u64, deadline);
        s.acks.fetch_add(1, Release);
        wake(&s.acks, 1);
    }
}

pub fn mutex(role: &Role, hold: Duration, outside: Duration, deadline: u64, t: &mut Tally) {
    let m = role.res.mutex();
    // SAFETY: no preconditions.
    let me = unsafe { libc::getpid() };
    t.tick();
    'run: while now_ns() < deadline {
        // Lock: 0 → 1 uncontended; else mark contended (2) and sleep.
        if m.lock.compare_exchange(0, 1, Acquire, Relaxed).is_err() {
            while m.lock.swap(2, Acquire) != 0 {
                t.pause();
                let woken = wait(&m.lock, 2, deadline);
                let now = t.tick();
                if woken {
                    let at = m.wake_ts.load(Acquire);
                    if at != 0 && now >= at {
                        t.wake.record(now - at);
                        t.wakeups += 1;
                    }
                }
                if now >= deadline {
                    break 'run;
                }
            }
        }
        if m.owner.swap(me, AcqRel) != 0 {
            t.exclusion_violations += 1;
        }
        t.burn_for(hold.as_nanos() as u64, deadline);
        if m.owner.swap(0, AcqRel) != me {
            t.exclusion_violations += 1;
        }
        t.iterations += 1;
        // Unlock; wake one waiter if any.
        if m.lock.swap(0, Release) == 2 {
            m.wake_ts.store(now_ns(), Release);
            wake(&m.lock, 1);
        }
        t.burn_for(outside.as_nanos() as u64, deadline);
        t.tick();
    }
}
