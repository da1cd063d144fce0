//! What workers report, and the checks tests make over it.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::checks::failure;
use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;
use crate::metrics::Histogram;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Label of its group (the cgroup name, or "workers").
    pub group: String,
    pub index: usize,
    pub pid: i32,
    /// True for always-runnable work (spin, yield, memory), false otherwise.
    pub spinner: bool,
    /// CPU time the worker got.
    pub runtime: Duration,
    /// Wall time from its first instruction to its last.
    pub wall: Duration,
    /// Times it woke from a voluntary sleep.
    pub wakeups: u64,
    /// CPU changes it observed between consecutive samples.
    pub migrations: u64,
    /// CPUs it was seen running on.
    pub cpus: CpuSet,
    /// CPUs it was allowed (its cgroup's effective cpuset, else affinity).
    pub allowed: CpuSet,
    /// Work units of its type (chunks, yields, round trips, acquisitions, ...).
    pub iterations: u64,
    /// Work type name (`spin`, `ping_pong`, ...).
    pub work: String,
    /// Longest stretch between two progress stamps while runnable.
    pub max_gap: Duration,
    /// When that stretch ended, from the worker's start.
    pub max_gap_at: Duration,
    /// Wake request → running, in ns (ping-pong, fan-out, mutex).
    pub wake: Histogram,
    /// Time spent runnable but waiting on a runqueue (`/proc/PID/schedstat`).
    pub run_delay: Option<Duration>,
    /// Timeslices run (`/proc/PID/schedstat`).
    pub timeslices: Option<u64>,
    pub voluntary_csw: u64,
    pub involuntary_csw: u64,
    pub minor_faults: u64,
    /// Affinity churn: times the CPU after `sched_setaffinity` was not the one asked.
    pub affinity_misses: u64,
    /// Mutex work: times another worker was found inside the critical section.
    pub exclusion_violations: u64,
    /// Fork churn: children that failed to fork or exit cleanly.
    pub failed_children: u64,
    /// Sequence work: iterations of each phase.
    pub phase_iterations: Vec<u64>,
    /// Where and when it ran: last stamp per CPU, CPU changes, progress
    /// per time slot (guest monotonic ns, like [`Report::steps`]).
    pub trace: crate::work::trace::Trace,
    /// `comm`, policy and nice as the kernel reported them after setup.
    pub comm: String,
    pub policy: String,
    pub nice: i32,
    /// Set when the worker could not apply its policy, affinity or comm.
    pub error: Option<String>,
}

impl WorkerReport {
    /// `group[index]`, how checks name a worker.
    pub fn name(&self) -> String {
        format!("{}[{}]", self.group, self.index)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub duration: Duration,
    pub workers: Vec<WorkerReport>,
    /// When the workers' clock started (guest CLOCK_MONOTONIC ns; they
    /// were released up to 20 ms before): step and trace times minus this
    /// are offsets into the run.
    pub start_ns: u64,
    /// Scenario steps in the order they ran (`Ctx::scenario`).
    pub steps: Vec<crate::scenario::StepRecord>,
    /// Undoing the steps' changes after the run failed (CPUs back online,
    /// cgroups removed): one line per failure.
    pub cleanup_error: Option<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<12} {:>3} {:<14} {:>7} {:>10} {:>9} {:>7} {:>5} {:>8} {:>9} {:>9} {:>7} {:>7} {:<8} {:<8}",
            "group", "#", "work", "pid", "runtime_ms", "iters", "wakeups", "migr", "gap_ms", "wake99_us", "delay_ms", "vcsw", "icsw", "ran_on", "allowed"
        )?;
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
        for w in &self.workers {
            writeln!(
                f,
                "{:<12} {:>3} {:<14} {:>7} {:>10.1} {:>9} {:>7} {:>5} {:>8.2} {:>9} {:>9} {:>7} {:>7} {:<8} {:<8}",
                w.group,
                w.index,
                w.work,
                w.pid,
                w.runtime.as_secs_f64() * 1e3,
                w.iterations,
                w.wakeups,
                w.migrations,
                w.max_gap.as_secs_f64() * 1e3,
                opt(w.wake.quantile(0.99).map(|v| v as f64 / 1e3)),
                opt(w.run_delay.map(|d| d.as_secs_f64() * 1e3)),
                w.voluntary_csw,
                w.involuntary_csw,
                w.cpus.to_string(),
                w.allowed.to_string()
            )?;
        }
        for s in &self.steps {
            let err = s.error.as_deref().map(|e| format!(" FAILED: {e}")).unwrap_or_default();
            writeln!(f, "step {:<28} at {:>7.0} ms, ran at {:>8.1} ms, took {:>7.2} ms{err}", s.name, s.at_ms, s.offset_ms, s.took_ms)?;
        }
        Ok(())
    }
}

/// A worker with less than this fraction of the mean runtime of its kind
/// (spinners or sleepers) counts as starved.
pub const STARVED_FRACTION: f64 = 0.05;

impl Report {
    pub fn spinners(&self) -> impl Iterator<Item = &WorkerReport> {
        self.workers.iter().filter(|w| w.spinner)
    }

    pub fn group(&self, label: &str) -> impl Iterator<Item = &WorkerReport> + '_ {
        let label = label.to_string();
        self.workers.iter().filter(move |w| w.group == label)
    }

    /// Total CPU time of a group.
    pub fn group_runtime(&self, label: &str) -> Duration {
        self.group(label).map(|w| w.runtime).sum()
    }

    fn mean_runtime(ws: &[&WorkerReport]) -> f64 {
        ws.iter().map(|w| w.runtime.as_secs_f64()).sum::<f64>() / ws.len().max(1) as f64
    }

    /// Every worker ran: at least [`STARVED_FRACTION`] of the mean runtime
    /// of its work type, and a sleeping type woke at least once.
    pub fn assert_no_starvation(&self) -> Result<&Self> {
        let mut offenders = Vec::new();
        let mut kinds: Vec<&str> = self.workers.iter().map(|w| w.work.as_str()).collect();
        kinds.dedup();
        kinds.sort();
        kinds.dedup();
        for kind in kinds {
            let ws: Vec<&WorkerReport> = self.workers.iter().filter(|w| w.work == kind).collect();
            let mean = Self::mean_runtime(&ws);
            let sleeps = matches!(kind, "sleep_wake" | "bursty");
            for w in &ws {
                let rt = w.runtime.as_secs_f64();
                if rt <= 0.0 || rt < mean * STARVED_FRACTION || (sleeps && w.wakeups == 0) {
                    offenders.push((
                        w.name(),
                        format!("got {:.1} ms of CPU (limit {:.1} ms = {:.0} % of the {kind} mean {:.1} ms), {} wakeups", rt * 1e3, mean * STARVED_FRACTION * 1e3, STARVED_FRACTION * 100.0, mean * 1e3, w.wakeups),
                    ));
                }
            }
        }
        if !offenders.is_empty() {
            return Err(failure("not_starved: starved workers", &offenders, self));
        }
        Ok(self)
    }

    /// Every spinner's CPU time is within `tolerance` (a fraction, 0.25 =
    /// ±25 %) of the spinners' mean.
    pub fn assert_fair_share(&self, tolerance: f64) -> Result<&Self> {
        let ws: Vec<&WorkerReport> = self.spinners().collect();
        if ws.is_empty() {
            bail!("assert_fair_share: no CPU spinners in the report");
        }
        let mean = Self::mean_runtime(&ws);
        let mut offenders = Vec::new();
        for w in &ws {
            let dev = (w.runtime.as_secs_f64() - mean).abs() / mean.max(1e-9);
            if dev > tolerance {
                offenders.push((w.name(), format!("got {:.1} ms, {:+.0}% off the mean {:.1} ms", w.runtime.as_secs_f64() * 1e3, (w.runtime.as_secs_f64() / mean - 1.0) * 100.0, mean * 1e3)));
            }
        }
        if !offenders.is_empty() {
            return Err(failure(&format!("fair_share: CPU time not shared within ±{:.0}%", tolerance * 100.0), &offenders, self));
        }
        Ok(self)
    }

    /// No worker was seen on a CPU outside its allowed set.
    pub fn assert_in_cpuset(&self) -> Result<&Self> {
        let offenders: Vec<_> = self
            .workers
            .iter()
            .filter(|w| !w.cpus.is_subset(&w.allowed))
            .map(|w| (w.name(), format!("ran on {} but was allowed only {}", w.cpus, w.allowed)))
            .collect();
        if !offenders.is_empty() {
            return Err(failure("isolated: worker ran outside its cpuset", &offenders, self));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(group: &str, ms: u64, cpus: &str, allowed: &str) -> WorkerReport {
        WorkerReport {
            group: group.into(),
            spinner: true,
            work: "spin".into(),
            runtime: Duration::from_millis(ms),
            cpus: CpuSet::parse(cpus).unwrap(),
            allowed: CpuSet::parse(allowed).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn checks() {
        let r = Report { duration: Duration::from_secs(1), workers: vec![w("a", 500, "0", "0-1"), w("b", 480, "1", "0-1")], ..Default::default() };
        r.assert_no_starvation().unwrap().assert_fair_share(0.1).unwrap().assert_in_cpuset().unwrap();

        let r = Report { duration: Duration::from_secs(1), workers: vec![w("a", 900, "0", "0"), w("b", 10, "0-1", "0")], ..Default::default() };
        let e = r.assert_no_starvation().unwrap_err().to_string();
        assert!(e.lines().next().unwrap().starts_with("not_starved: starved workers: b[0] got 10.0 ms of CPU (limit 22.8 ms"), "{e}");
        let e = r.assert_fair_share(0.5).unwrap_err().to_string();
        assert!(e.lines().next().unwrap().starts_with("fair_share: CPU time not shared within ±50%: a[0] got 900.0 ms, +98% off"), "{e}");
        assert!(r.assert_in_cpuset().unwrap_err().to_string().contains("ran on 0-1 but was allowed only 0"));

        let mut sl = w("s", 100, "0", "0");
        sl.spinner = false;
        sl.work = "sleep_wake".into();
        let r = Report { duration: Duration::from_secs(1), workers: vec![sl], ..Default::default() };
        assert!(r.assert_no_starvation().unwrap_err().to_string().contains("0 wakeups"));
    }
}
