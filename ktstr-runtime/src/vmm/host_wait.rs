//! How long the host kept the VM's vCPU threads waiting for a CPU.
//!
//! TCG offers the guest no steal time: while the host runs something else
//! instead of a vCPU thread, the guest clock keeps going and the task on
//! that vCPU is charged for time it never ran. A CPU-time verdict from such
//! a run says more about the host than about the guest scheduler, so the
//! backend samples the vCPU threads' run-queue wait (`schedstat`) and a
//! FAIL names it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Run and wait time of one thread, from `/proc/PID/task/TID/schedstat`
/// (`run_ns wait_ns timeslices`).
pub fn parse_schedstat(s: &str) -> Option<(u64, u64)> {
    let mut it = s.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Latest run/wait figures of a process's vCPU threads, by thread id.
#[derive(Debug, Default)]
pub struct VcpuWait {
    latest: BTreeMap<u32, (u64, u64)>,
}

impl VcpuWait {
    /// Reads every thread of `pid` whose name marks a vCPU (`is_vcpu`).
    /// Threads that exited keep their last figures.
    pub fn sample(&mut self, proc_task: &Path, is_vcpu: impl Fn(&str) -> bool) {
        let Ok(dir) = std::fs::read_dir(proc_task) else { return };
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if !is_vcpu(comm.trim()) {
                continue;
            }
            if let Some(f) = std::fs::read_to_string(e.path().join("schedstat")).ok().as_deref().and_then(parse_schedstat) {
                self.latest.insert(tid, f);
            }
        }
    }

    /// Total time the vCPU threads spent runnable but not running.
    pub fn waited(&self) -> Option<Duration> {
        (!self.latest.is_empty()).then(|| Duration::from_nanos(self.latest.values().map(|&(_, w)| w).sum()))
    }

    pub fn threads(&self) -> usize {
        self.latest.len()
    }
}

/// QEMU names its TCG vCPU threads `CPU N/TCG`.
pub fn is_qemu_tcg_vcpu(comm: &str) -> bool {
    comm.starts_with("CPU ") && comm.ends_with("/TCG")
}

/// The share of the VM's vCPU time the host withheld: waited over
/// (vCPUs × wall time). A figure above [`CONTENTION_PCT`] is named in a FAIL.
pub fn wait_pct(waited: Duration, vcpus: u32, wall: Duration) -> f64 {
    let budget = wall.as_secs_f64() * vcpus.max(1) as f64;
    if budget == 0.0 {
        0.0
    } else {
        100.0 * waited.as_secs_f64() / budget
    }
}

/// Above this share of withheld vCPU time, CPU-time figures are skewed
/// enough to decide a ±25 % fairness check on their own.
pub const CONTENTION_PCT: f64 = 10.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_lines_parse() {
        assert_eq!(parse_schedstat("123 456 7\n"), Some((123, 456)));
        assert_eq!(parse_schedstat("x 1 2"), None);
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn samples_only_vcpu_threads_of_a_live_process() {
        // The real /proc plumbing, with this thread standing in for a vCPU.
        let me = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        let mut w = VcpuWait::default();
        w.sample(Path::new("/proc/self/task"), |c| c == me.trim());
        assert!(w.threads() >= 1, "this thread is found by name");
        assert!(w.waited().is_some());
        let mut none = VcpuWait::default();
        none.sample(Path::new("/proc/self/task"), is_qemu_tcg_vcpu);
        assert_eq!((none.threads(), none.waited()), (0, None));
    }

    #[test]
    fn contention_share() {
        assert_eq!(wait_pct(Duration::from_secs(1), 2, Duration::from_secs(5)), 10.0);
        assert_eq!(wait_pct(Duration::ZERO, 2, Duration::ZERO), 0.0);
        assert!(is_qemu_tcg_vcpu("CPU 3/TCG") && !is_qemu_tcg_vcpu("qemu-system-x86"));
    }
}
