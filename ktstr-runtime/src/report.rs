//! What workers report, and the checks tests make over it.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Label of its group (the cgroup name, or "workers").
    pub group: String,
    pub index: usize,
    pub pid: i32,
    /// True for CPU spinners, false for sleep/wake workers.
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
    /// Work chunks completed (a throughput proxy).
    pub iterations: u64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub duration: Duration,
    pub workers: Vec<WorkerReport>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<12} {:>3} {:>7} {:>10} {:>8} {:>7} {:<10} {:<10}", "group", "#", "pid", "runtime_ms", "wakeups", "migr", "ran_on", "allowed")?;
        for w in &self.workers {
            writeln!(
                f,
                "{:<12} {:>3} {:>7} {:>10.1} {:>8} {:>7} {:<10} {:<10}",
                w.group,
                w.index,
                w.pid,
                w.runtime.as_secs_f64() * 1e3,
                w.wakeups,
                w.migrations,
                w.cpus.to_string(),
                w.allowed.to_string()
            )?;
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

    /// The figures `result.json` keeps under `metrics`: per worker and per
    /// group (seconds as floats, CPU sets in list form).
    pub fn metrics(&self) -> serde_json::Value {
        let workers: Vec<serde_json::Value> = self
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "group": w.group, "index": w.index, "pid": w.pid, "spinner": w.spinner,
                    "runtime_s": w.runtime.as_secs_f64(), "wall_s": w.wall.as_secs_f64(),
                    "wakeups": w.wakeups, "migrations": w.migrations, "iterations": w.iterations,
                    "cpus": w.cpus.to_string(), "allowed": w.allowed.to_string(),
                })
            })
            .collect();
        let mut groups = serde_json::Map::new();
        for w in &self.workers {
            if groups.contains_key(&w.group) {
                continue;
            }
            let ws: Vec<&WorkerReport> = self.group(&w.group).collect();
            groups.insert(
                w.group.clone(),
                serde_json::json!({
                    "workers": ws.len(),
                    "runtime_s": ws.iter().map(|w| w.runtime.as_secs_f64()).sum::<f64>(),
                    "wakeups": ws.iter().map(|w| w.wakeups).sum::<u64>(),
                    "migrations": ws.iter().map(|w| w.migrations).sum::<u64>(),
                    "iterations": ws.iter().map(|w| w.iterations).sum::<u64>(),
                }),
            );
        }
        serde_json::json!({ "duration_s": self.duration.as_secs_f64(), "workers": workers, "groups": groups })
    }

    /// Every worker ran: at least [`STARVED_FRACTION`] of the mean runtime
    /// of its kind, and a sleep/wake worker woke at least once.
    pub fn assert_no_starvation(&self) -> Result<&Self> {
        let mut bad = String::new();
        for spin in [true, false] {
            let ws: Vec<&WorkerReport> = self.workers.iter().filter(|w| w.spinner == spin).collect();
            let mean = Self::mean_runtime(&ws);
            for w in &ws {
                let rt = w.runtime.as_secs_f64();
                if rt <= 0.0 || rt < mean * STARVED_FRACTION || (!spin && w.wakeups == 0) {
                    let _ = writeln!(
                        bad,
                        "  {}[{}] got {:.1} ms of CPU (mean {:.1} ms), {} wakeups",
                        w.group,
                        w.index,
                        rt * 1e3,
                        mean * 1e3,
                        w.wakeups
                    );
                }
            }
        }
        if !bad.is_empty() {
            bail!("starved workers:\n{bad}{self}");
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
        let mut bad = String::new();
        for w in &ws {
            let dev = (w.runtime.as_secs_f64() - mean).abs() / mean.max(1e-9);
            if dev > tolerance {
                let _ = writeln!(
                    bad,
                    "  {}[{}] got {:.1} ms, {:+.0}% off the mean {:.1} ms",
                    w.group,
                    w.index,
                    w.runtime.as_secs_f64() * 1e3,
                    (w.runtime.as_secs_f64() / mean - 1.0) * 100.0,
                    mean * 1e3
                );
            }
        }
        if !bad.is_empty() {
            bail!("CPU time not shared within ±{:.0}%:\n{bad}{self}", tolerance * 100.0);
        }
        Ok(self)
    }

    /// No worker was seen on a CPU outside its allowed set.
    pub fn assert_in_cpuset(&self) -> Result<&Self> {
        let mut bad = String::new();
        for w in &self.workers {
            if !w.cpus.is_subset(&w.allowed) {
                let _ = writeln!(bad, "  {}[{}] ran on {} but was allowed only {}", w.group, w.index, w.cpus, w.allowed);
            }
        }
        if !bad.is_empty() {
            bail!("workers left their cpuset:\n{bad}{self}");
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
            runtime: Duration::from_millis(ms),
            cpus: CpuSet::parse(cpus).unwrap(),
            allowed: CpuSet::parse(allowed).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn checks() {
        let r = Report { duration: Duration::from_secs(1), workers: vec![w("a", 500, "0", "0-1"), w("b", 480, "1", "0-1")] };
        r.assert_no_starvation().unwrap().assert_fair_share(0.1).unwrap().assert_in_cpuset().unwrap();

        let r = Report { duration: Duration::from_secs(1), workers: vec![w("a", 900, "0", "0"), w("b", 10, "0-1", "0")] };
        let e = r.assert_no_starvation().unwrap_err().to_string();
        assert!(e.contains("b[0] got 10.0 ms"), "{e}");
        assert!(r.assert_fair_share(0.5).unwrap_err().to_string().contains("not shared"));
        assert!(r.assert_in_cpuset().unwrap_err().to_string().contains("ran on 0-1 but was allowed only 0"));

        let mut sl = w("s", 100, "0", "0");
        sl.spinner = false;
        let r = Report { duration: Duration::from_secs(1), workers: vec![sl] };
        assert!(r.assert_no_starvation().unwrap_err().to_string().contains("0 wakeups"));
    }

    #[test]
    fn metrics_per_worker_and_group() {
        let r = Report { duration: Duration::from_secs(2), workers: vec![w("a", 500, "0", "0-1"), w("a", 300, "1", "0-1"), w("b", 200, "1", "1")] };
        let m = r.metrics();
        assert_eq!(m["duration_s"], 2.0);
        assert_eq!(m["workers"].as_array().unwrap().len(), 3);
        assert_eq!(m["workers"][1]["runtime_s"], 0.3);
        assert_eq!(m["workers"][2]["allowed"], "1");
        assert_eq!(m["groups"]["a"]["workers"], 2);
        assert_eq!(m["groups"]["a"]["runtime_s"], 0.8);
        assert_eq!(m["groups"]["b"]["runtime_s"], 0.2);
    }
}
