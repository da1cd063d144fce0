//! What a worker applies to itself before it starts: scheduling policy
//! (through `sched_setattr(2)`, the one call that covers every class),
//! nice, CPU affinity and its `comm` name.

use std::time::Duration;

use crate::cpuset::CpuSet;

const SCHED_DEADLINE: u32 = 6;

/// A scheduling policy (`sched(7)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// `SCHED_OTHER` (EEVDF, or the sched_ext scheduler when one is loaded).
    #[default]
    Other,
    /// `SCHED_BATCH`: like `SCHED_OTHER`, but never preempts on wake-up.
    Batch,
    /// `SCHED_IDLE`: runs only with weight 3 (below nice 19).
    Idle,
    /// `SCHED_FIFO` at a priority 1..=99.
    Fifo(u32),
    /// `SCHED_RR` at a priority 1..=99.
    Rr(u32),
    /// `SCHED_DEADLINE`: `runtime` every `period`, due by `deadline`. The
    /// worker's affinity must span its root domain (no pinning, no
    /// narrowed cpuset) and it cannot fork.
    Deadline { runtime: Duration, deadline: Duration, period: Duration },
}

/// `struct sched_attr`, `SCHED_ATTR_SIZE_VER0` (48 bytes).
#[repr(C)]
#[derive(Debug, Default, PartialEq, Eq)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

impl Policy {
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Other => "SCHED_OTHER",
            Policy::Batch => "SCHED_BATCH",
            Policy::Idle => "SCHED_IDLE",
            Policy::Fifo(_) => "SCHED_FIFO",
            Policy::Rr(_) => "SCHED_RR",
            Policy::Deadline { .. } => "SCHED_DEADLINE",
        }
    }

    /// Checks the parameters the kernel would refuse with a bare `EINVAL`.
    pub fn validate(&self, nice: i32) -> Result<(), String> {
        if !(-20..=19).contains(&nice) {
            return Err(format!("nice {nice} is outside -20..=19"));
        }
        match *self {
            Policy::Fifo(p) | Policy::Rr(p) if !(1..=99).contains(&p) => {
                Err(format!("{} priority {p} is outside 1..=99", self.name()))
            }
            Policy::Deadline { runtime, deadline, period } => {
                // sched_setattr(2): 1024 ns <= runtime <= deadline <= period.
                if runtime < Duration::from_nanos(1024) || runtime > deadline || deadline > period {
                    Err(format!(
                        "SCHED_DEADLINE needs 1024 ns <= runtime <= deadline <= period, got runtime {runtime:?}, deadline {deadline:?}, period {period:?}"
                    ))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    fn attr(&self, nice: i32) -> SchedAttr {
        let mut a = SchedAttr { size: std::mem::size_of::<SchedAttr>() as u32, nice, ..SchedAttr::default() };
        match *self {
            Policy::Other => a.policy = libc::SCHED_OTHER as u32,
            Policy::Batch => a.policy = libc::SCHED_BATCH as u32,
            Policy::Idle => a.policy = libc::SCHED_IDLE as u32,
            Policy::Fifo(p) => (a.policy, a.priority) = (libc::SCHED_FIFO as u32, p),
            Policy::Rr(p) => (a.policy, a.priority) = (libc::SCHED_RR as u32, p),
            Policy::Deadline { runtime, deadline, period } => {
                a.policy = SCHED_DEADLINE;
                (a.runtime, a.deadline, a.period) = (runtime.as_nanos() as u64, deadline.as_nanos() as u64, period.as_nanos() as u64);
            }
        }
        a
    }

    /// Applies the policy and nice to the calling thread.
    pub fn apply(&self, nice: i32) -> Result<(), String> {
        self.validate(nice)?;
        let a = self.attr(nice);
        // SAFETY: sched_setattr reads a `struct sched_attr` of `a.size` bytes.
        let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &a as *const SchedAttr, 0u32) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let hint = match (self, e.raw_os_error()) {
                (Policy::Deadline { .. }, Some(libc::EBUSY)) => ": the deadline bandwidth is used up (sum of runtime/period over 95 % per CPU)",
                (Policy::Deadline { .. }, Some(libc::EPERM)) => ": SCHED_DEADLINE needs an affinity spanning the root domain (do not pin it or narrow its cpuset)",
                _ => "",
            };
            return Err(format!("sched_setattr({}, nice {nice}): {e}{hint}", self.name()));
        }
        Ok(())
    }
}

/// Restricts the calling thread to `cpus`.
pub fn set_affinity(cpus: &CpuSet) -> Result<(), String> {
    let words = (cpus.max().unwrap_or(0) as usize / 64 + 1).max(std::mem::size_of::<libc::cpu_set_t>() / 8);
    let mut mask = vec![0u64; words];
    cpus.iter().for_each(|c| mask[c as usize / 64] |= 1 << (c % 64));
    // SAFETY: the kernel reads `words * 8` bytes from `mask`.
    let r = unsafe { libc::sched_setaffinity(0, words * 8, mask.as_ptr().cast::<libc::cpu_set_t>()) };
    if r != 0 {
        return Err(format!("sched_setaffinity({cpus}): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the calling thread's `comm` (`prctl(PR_SET_NAME)`; the kernel
/// keeps 15 bytes).
pub fn set_comm(name: &str) -> Result<(), String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("comm name {name:?} contains a NUL byte"))?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    if unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) } != 0 {
        return Err(format!("prctl(PR_SET_NAME, {name:?}): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(Policy::Fifo(50).validate(0).is_ok());
        assert!(Policy::Fifo(0).validate(0).unwrap_err().contains("SCHED_FIFO priority 0 is outside 1..=99"));
        assert!(Policy::Rr(100).validate(0).is_err());
        assert!(Policy::Other.validate(20).unwrap_err().contains("nice 20"));
        let ms = Duration::from_millis;
        assert!(Policy::Deadline { runtime: ms(1), deadline: ms(5), period: ms(10) }.validate(0).is_ok());
        assert!(Policy::Deadline { runtime: ms(6), deadline: ms(5), period: ms(10) }.validate(0).unwrap_err().contains("runtime <= deadline"));
    }

    #[test]
    fn attr_layout() {
        assert_eq!(std::mem::size_of::<SchedAttr>(), 48, "SCHED_ATTR_SIZE_VER0");
        let a = Policy::Rr(7).attr(0);
        assert_eq!((a.policy, a.priority), (libc::SCHED_RR as u32, 7));
        let a = Policy::Deadline { runtime: Duration::from_micros(100), deadline: Duration::from_millis(1), period: Duration::from_millis(2) }.attr(0);
        assert_eq!((a.policy, a.runtime, a.deadline, a.period), (6, 100_000, 1_000_000, 2_000_000));
        assert_eq!(Policy::Other.attr(5).nice, 5);
    }

    #[test]
    fn comm_and_nice_on_this_thread() {
        // A thread of our own, so the test harness's threads are untouched.
        std::thread::spawn(|| {
            set_comm("ktstr-policy-t").unwrap();
            let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
            assert_eq!(comm.trim(), "ktstr-policy-t");
            // Raising nice needs no privilege.
            Policy::Batch.apply(3).unwrap();
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let after_comm = stat.rsplit_once(')').unwrap().1;
            let nice: i32 = after_comm.split_whitespace().nth(16).unwrap().parse().unwrap();
            assert_eq!(nice, 3, "{stat}");
            assert!(set_comm("a\0b").is_err());
        })
        .join()
        .unwrap();
    }
}
