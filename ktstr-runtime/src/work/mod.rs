//! Work types: what each worker process does until the deadline, and
//! what it measures while doing it (see [`tally::Tally`]).

pub mod futex;
pub mod pingpong;
pub mod shared;
pub mod solo;
pub mod tally;
pub mod trace;

use std::time::Duration;

use anyhow::{bail, Result};

pub use shared::GroupRes;
use tally::Tally;

/// What a worker does. Types marked *group* coordinate the workers of
/// one group; the others run alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Burn CPU until the deadline. Iterations: work chunks.
    Spin,
    /// Burn CPU for `run`, sleep for `sleep`, repeat. Iterations: chunks.
    SleepWake { run: Duration, sleep: Duration },
    /// `sched_yield()` in a loop. Iterations: yields.
    Yield,
    /// Duty cycle on a fixed clock: burn for `burst` at the start of each
    /// `period`, sleep until the next one. Iterations: chunks.
    Bursty { burst: Duration, period: Duration },
    /// *Group*, n even: worker 2k and 2k+1 bounce a timestamp through two
    /// pipes, each burning `spin` per hop. Iterations: messages received;
    /// every receipt is a wake-up latency sample.
    PingPong { spin: Duration },
    /// *Group*, n ≥ 2: worker 0 wakes all others with one `FUTEX_WAKE`
    /// every `interval` (after they all finished the last round); each
    /// waiter burns `spin` per wake. Iterations: wake-ups (rounds for the
    /// waker); every wake-up is a latency sample.
    FanOut { interval: Duration, spin: Duration },
    /// *Group*: all workers take one futex mutex, burn `hold` inside and
    /// `outside` between. Iterations: acquisitions; a waiter woken by an
    /// unlock gives a latency sample.
    Mutex { hold: Duration, outside: Duration },
    /// Strided read-modify-write walk over a private `bytes` buffer (huge
    /// pages off, so first touches fault page by page). Iterations: 4096 accesses.
    Memory { bytes: usize, stride: usize },
    /// mmap `pages` pages, write each, munmap, repeat. Iterations: cycles.
    PageFaults { pages: usize },
    /// fork a child that exits at once, reap it, repeat. Iterations: forks.
    ForkExit,
    /// Pin itself to the next CPU of its starting affinity, burn `dwell`,
    /// repeat. Iterations: affinity changes.
    AffinityChurn { dwell: Duration },
    /// The phases in turn, cycling until the deadline (solo types only).
    Sequence(Vec<Phase>),
}

/// One phase of a [`Work::Sequence`].
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub work: Work,
    pub dur: Duration,
}

impl Phase {
    pub fn new(work: Work, dur: Duration) -> Self {
        Self { work, dur }
    }
}

impl Work {
    pub fn name(&self) -> &'static str {
        match self {
            Work::Spin => "spin",
            Work::SleepWake { .. } => "sleep_wake",
            Work::Yield => "yield",
            Work::Bursty { .. } => "bursty",
            Work::PingPong { .. } => "ping_pong",
            Work::FanOut { .. } => "fan_out",
            Work::Mutex { .. } => "mutex",
            Work::Memory { .. } => "memory",
            Work::PageFaults { .. } => "page_faults",
            Work::ForkExit => "fork_exit",
            Work::AffinityChurn { .. } => "affinity_churn",
            Work::Sequence(_) => "sequence",
        }
    }

    fn is_group(&self) -> bool {
        matches!(self, Work::PingPong { .. } | Work::FanOut { .. } | Work::Mutex { .. })
    }

    /// Refuses shapes that cannot run, naming the group and the fix.
    pub fn validate(&self, label: &str, n: usize) -> Result<()> {
        match self {
            Work::PingPong { .. } if n < 2 || !n.is_multiple_of(2) => bail!("group {label}: ping_pong needs an even number of workers (pairs), got {n}"),
            Work::FanOut { .. } if n < 2 => bail!("group {label}: fan_out needs 2+ workers (1 waker, n-1 waiters), got {n}"),
            Work::FanOut { interval, .. } if interval.is_zero() => bail!("group {label}: fan_out interval must be > 0"),
            Work::Bursty { burst, period } if period.is_zero() || burst > period => {
                bail!("group {label}: bursty needs 0 < burst <= period, got burst {burst:?}, period {period:?}")
            }
            Work::Memory { bytes, stride } if *stride == 0 || bytes < stride => {
                bail!("group {label}: memory needs 0 < stride <= bytes, got stride {stride}, bytes {bytes}")
            }
            Work::PageFaults { pages: 0 } => bail!("group {label}: page_faults needs pages >= 1"),
            Work::Sequence(ps) if ps.is_empty() => bail!("group {label}: a sequence needs at least one phase"),
            Work::Sequence(ps) => {
                for p in ps {
                    if p.work.is_group() || matches!(p.work, Work::Sequence(_)) {
                        bail!("group {label}: sequence phase {} cannot run inside a sequence (only solo work types)", p.work.name());
                    }
                    if p.dur.is_zero() {
                        bail!("group {label}: sequence phase {} has a zero duration", p.work.name());
                    }
                    p.work.validate(label, n)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Where a worker stands in its group.
pub struct Role<'a> {
    pub index: usize,
    pub n: usize,
    pub res: &'a GroupRes,
}

/// Runs `work` until `deadline` (CLOCK_MONOTONIC ns). `phases` gets the
/// iterations of each phase of a sequence.
pub fn run(work: &Work, role: &Role, deadline: u64, t: &mut Tally, phases: &mut Vec<u64>) {
    match work {
        Work::PingPong { spin } => pingpong::run(role, *spin, deadline, t),
        Work::FanOut { interval, spin } => futex::fan_out(role, *interval, *spin, deadline, t),
        Work::Mutex { hold, outside } => futex::mutex(role, *hold, *outside, deadline, t),
        Work::Sequence(ps) => {
            phases.resize(ps.len(), 0);
            'outer: loop {
                for (i, p) in ps.iter().enumerate() {
                    let now = tally::now_ns();
                    if now >= deadline {
                        break 'outer;
                    }
                    let before = t.iterations;
                    solo::run(&p.work, (now + p.dur.as_nanos() as u64).min(deadline), t);
                    phases[i] += t.iterations - before;
                }
            }
        }
        w => solo::run(w, deadline, t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        let ms = Duration::from_millis;
        assert!(Work::PingPong { spin: ms(0) }.validate("pp", 3).unwrap_err().to_string().contains("group pp: ping_pong needs an even number"));
        assert!(Work::PingPong { spin: ms(0) }.validate("pp", 4).is_ok());
        assert!(Work::FanOut { interval: ms(1), spin: ms(0) }.validate("f", 1).is_err());
        assert!(Work::Bursty { burst: ms(5), period: ms(2) }.validate("b", 1).unwrap_err().to_string().contains("burst <= period"));
        assert!(Work::Memory { bytes: 10, stride: 64 }.validate("m", 1).is_err());
        let seq = Work::Sequence(vec![Phase::new(Work::Spin, ms(10)), Phase::new(Work::Mutex { hold: ms(1), outside: ms(1) }, ms(10))]);
        assert!(seq.validate("s", 1).unwrap_err().to_string().contains("mutex cannot run inside a sequence"));
        assert!(Work::Sequence(vec![Phase::new(Work::Yield, ms(10))]).validate("s", 1).is_ok());
    }
}
