//! The report's figures as plain numbers, per worker and per group: what
//! `result.json`'s `metrics` object holds (`Report::metrics()`).

use serde::{Deserialize, Serialize};

use crate::metrics::{cv, Histogram};
use crate::report::{Report, WorkerReport};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportMetrics {
    pub duration_s: f64,
    pub workers: Vec<WorkerMetrics>,
    pub groups: Vec<GroupMetrics>,
    /// The run's clock start, guest CLOCK_MONOTONIC ns (steps and `on_cpu` use the same clock).
    #[serde(default)]
    pub start_ns: u64,
    /// Scenario steps as they ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<crate::scenario::StepRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerMetrics {
    pub group: String,
    pub index: usize,
    pub work: String,
    pub runtime_ms: f64,
    pub wall_ms: f64,
    pub iterations: u64,
    pub migrations: u64,
    pub migrations_per_s: f64,
    pub max_gap_ms: f64,
    pub wake_samples: u64,
    pub wake_p50_us: Option<f64>,
    pub wake_p99_us: Option<f64>,
    pub wake_max_us: Option<f64>,
    pub run_delay_ms: Option<f64>,
    pub timeslices: Option<u64>,
    pub voluntary_csw: u64,
    pub involuntary_csw: u64,
    pub minor_faults: u64,
    pub cpus: String,
    pub allowed: String,
    /// Per CPU it ran on: first and last stamp there (guest monotonic ns) and the stamp count.
    #[serde(default)]
    pub on_cpu: Vec<crate::work::trace::CpuSpan>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMetrics {
    pub group: String,
    pub work: String,
    pub workers: usize,
    pub runtime_ms: f64,
    pub iterations: u64,
    /// Spread of iterations across the group's workers (CV, %); `None` below two workers.
    pub iterations_cv_pct: Option<f64>,
    pub runtime_cv_pct: Option<f64>,
    pub migrations: u64,
    pub migrations_per_s: f64,
    pub max_gap_ms: f64,
    pub wake_samples: u64,
    pub wake_p50_us: Option<f64>,
    pub wake_p99_us: Option<f64>,
    pub wake_max_us: Option<f64>,
    pub run_delay_ms: Option<f64>,
    pub voluntary_csw: u64,
    pub involuntary_csw: u64,
}

fn us(v: Option<u64>) -> Option<f64> {
    v.map(|x| x as f64 / 1e3)
}

/// Migrations per second of wall time (0 for a worker that never ran).
pub fn migrations_per_s(w: &WorkerReport) -> f64 {
    let s = w.wall.as_secs_f64();
    if s > 0.0 {
        w.migrations as f64 / s
    } else {
        0.0
    }
}

impl WorkerMetrics {
    pub fn of(w: &WorkerReport) -> Self {
        Self {
            group: w.group.clone(),
            index: w.index,
            work: w.work.clone(),
            runtime_ms: w.runtime.as_secs_f64() * 1e3,
            wall_ms: w.wall.as_secs_f64() * 1e3,
            iterations: w.iterations,
            migrations: w.migrations,
            migrations_per_s: migrations_per_s(w),
            max_gap_ms: w.max_gap.as_secs_f64() * 1e3,
            wake_samples: w.wake.count(),
            wake_p50_us: us(w.wake.quantile(0.5)),
            wake_p99_us: us(w.wake.quantile(0.99)),
            wake_max_us: us(w.wake.max()),
            run_delay_ms: w.run_delay.map(|d| d.as_secs_f64() * 1e3),
            timeslices: w.timeslices,
            voluntary_csw: w.voluntary_csw,
            involuntary_csw: w.involuntary_csw,
            minor_faults: w.minor_faults,
            cpus: w.cpus.to_string(),
            allowed: w.allowed.to_string(),
            on_cpu: w.trace.on_cpu.clone(),
        }
    }
}

impl GroupMetrics {
    pub fn of(label: &str, ws: &[&WorkerReport]) -> Self {
        let mut wake = Histogram::default();
        ws.iter().for_each(|w| wake.merge(&w.wake));
        let delays: Vec<f64> = ws.iter().filter_map(|w| w.run_delay.map(|d| d.as_secs_f64() * 1e3)).collect();
        let iters: Vec<f64> = ws.iter().map(|w| w.iterations as f64).collect();
        let rts: Vec<f64> = ws.iter().map(|w| w.runtime.as_secs_f64()).collect();
        Self {
            group: label.to_string(),
            work: ws.first().map(|w| w.work.clone()).unwrap_or_default(),
            workers: ws.len(),
            runtime_ms: rts.iter().sum::<f64>() * 1e3,
            iterations: ws.iter().map(|w| w.iterations).sum(),
            iterations_cv_pct: cv(&iters).map(|c| c * 100.0),
            runtime_cv_pct: cv(&rts).map(|c| c * 100.0),
            migrations: ws.iter().map(|w| w.migrations).sum(),
            migrations_per_s: ws.iter().map(|w| migrations_per_s(w)).sum(),
            max_gap_ms: ws.iter().map(|w| w.max_gap.as_secs_f64() * 1e3).fold(0.0, f64::max),
            wake_samples: wake.count(),
            wake_p50_us: us(wake.quantile(0.5)),
            wake_p99_us: us(wake.quantile(0.99)),
            wake_max_us: us(wake.max()),
            run_delay_ms: (delays.len() == ws.len() && !ws.is_empty()).then(|| delays.iter().sum()),
            voluntary_csw: ws.iter().map(|w| w.voluntary_csw).sum(),
            involuntary_csw: ws.iter().map(|w| w.involuntary_csw).sum(),
        }
    }
}

impl Report {
    /// Group labels in the order they first appear.
    pub fn group_labels(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for w in &self.workers {
            if !out.contains(&w.group) {
                out.push(w.group.clone());
            }
        }
        out
    }

    /// Every figure, per worker and per group, as plain serializable numbers.
    pub fn metrics(&self) -> ReportMetrics {
        ReportMetrics {
            duration_s: self.duration.as_secs_f64(),
            workers: self.workers.iter().map(WorkerMetrics::of).collect(),
            groups: self
                .group_labels()
                .iter()
                .map(|g| GroupMetrics::of(g, &self.group(g).collect::<Vec<_>>()))
                .collect(),
            start_ns: self.start_ns,
            steps: self.steps.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_worker_and_per_group() {
        let mk = |g: &str, i: usize, iters: u64, wake: &[u64]| {
            let mut w = WorkerReport {
                group: g.into(),
                index: i,
                work: "ping_pong".into(),
                iterations: iters,
                runtime: Duration::from_millis(100),
                wall: Duration::from_secs(2),
                migrations: 4,
                max_gap: Duration::from_micros(1500 * (i as u64 + 1)),
                run_delay: Some(Duration::from_millis(3)),
                ..Default::default()
            };
            wake.iter().for_each(|&v| w.wake.record(v));
            w
        };
        let r = Report {
            duration: Duration::from_secs(2),
            workers: vec![mk("pp", 0, 90, &[10_000, 20_000]), mk("pp", 1, 110, &[30_000]), mk("solo", 0, 5, &[])],
            ..Default::default()
        };
        let m = r.metrics();
        assert_eq!(m.workers.len(), 3);
        assert_eq!(m.workers[0].migrations_per_s, 2.0);
        assert_eq!(m.workers[1].wake_p99_us, Some(30.0));
        assert_eq!(m.workers[2].wake_p99_us, None);
        let pp = &m.groups[0];
        assert_eq!((pp.group.as_str(), pp.workers, pp.iterations, pp.wake_samples), ("pp", 2, 200, 3));
        assert!((pp.iterations_cv_pct.unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(pp.max_gap_ms, 3.0);
        assert_eq!(pp.wake_max_us, Some(30.0));
        assert_eq!(pp.run_delay_ms, Some(6.0));
        assert_eq!(m.groups[1].iterations_cv_pct, None);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["groups"][0]["wake_p99_us"], 30.0);
    }
}
