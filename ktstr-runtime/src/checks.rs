//! Threshold checks over a [`Report`], as chain methods and as the
//! `#[ktstr_test]` keys ([`Checks`]) that `ctx.run` applies to every
//! report it returns. A failure's first line names the metric, the
//! threshold, and each offending worker with its figure; the report
//! table follows.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::metrics::cv;
use crate::report::Report;
use crate::summary::migrations_per_s;

/// Checks a test declares in its attribute; `None`/`false` = not checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checks {
    pub max_gap_ms: Option<u64>,
    pub max_wake_p99_us: Option<u64>,
    pub max_spread_pct: Option<f64>,
    pub max_migrations_per_s: Option<f64>,
    pub not_starved: bool,
    pub isolated: bool,
}

impl Checks {
    pub const NONE: Checks =
        Checks { max_gap_ms: None, max_wake_p99_us: None, max_spread_pct: None, max_migrations_per_s: None, not_starved: false, isolated: false };
}

impl Default for Checks {
    fn default() -> Self {
        Self::NONE
    }
}

/// Offenders shown on the first line before "and N more".
const FIRST_LINE: usize = 4;

/// `"{what}: {a} {fig}, {b} {fig} (+N more)"` then every offender and the table.
pub(crate) fn failure(what: &str, offenders: &[(String, String)], report: &Report) -> anyhow::Error {
    let shown: Vec<String> = offenders.iter().take(FIRST_LINE).map(|(w, f)| format!("{w} {f}")).collect();
    let more = offenders.len().saturating_sub(FIRST_LINE);
    let more = if more > 0 { format!(" (+{more} more)") } else { String::new() };
    let all: String = offenders.iter().map(|(w, f)| format!("  {w} {f}\n")).collect();
    anyhow::anyhow!("{what}: {}{more}\n{all}{report}", shown.join(", "))
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

impl Report {
    /// Applies every check `c` declares, in a fixed order.
    pub fn check(&self, c: &Checks) -> Result<&Self> {
        if c.not_starved {
            self.assert_no_starvation()?;
        }
        if c.isolated {
            self.assert_in_cpuset()?;
        }
        if let Some(ms) = c.max_gap_ms {
            self.assert_max_gap(Duration::from_millis(ms))?;
        }
        if let Some(us) = c.max_wake_p99_us {
            self.assert_wake_p99(Duration::from_micros(us))?;
        }
        if let Some(p) = c.max_spread_pct {
            self.assert_spread(p)?;
        }
        if let Some(r) = c.max_migrations_per_s {
            self.assert_max_migrations_per_s(r)?;
        }
        Ok(self)
    }

    /// No worker was runnable without running for longer than `max`.
    pub fn assert_max_gap(&self, max: Duration) -> Result<&Self> {
        let mut bad: Vec<_> = self.workers.iter().filter(|w| w.max_gap > max).collect();
        bad.sort_by_key(|w| std::cmp::Reverse(w.max_gap));
        let offenders: Vec<_> =
            bad.iter().map(|w| (w.name(), format!("{} (at {:.0} ms)", fmt_ms(w.max_gap), w.max_gap_at.as_secs_f64() * 1e3))).collect();
        if !offenders.is_empty() {
            return Err(failure(&format!("max_gap_ms: longest scheduling gap over {}", fmt_ms(max)), &offenders, self));
        }
        Ok(self)
    }

    /// Every worker with wake-up samples has a p99 wake-up latency ≤ `max`.
    pub fn assert_wake_p99(&self, max: Duration) -> Result<&Self> {
        let sampled: Vec<_> = self.workers.iter().filter(|w| w.wake.count() > 0).collect();
        if sampled.is_empty() {
            bail!("max_wake_p99_us: no worker has wake-up samples; use ping_pong, fan_out or mutex work\n{self}");
        }
        let limit = max.as_nanos() as u64;
        let mut bad: Vec<_> = sampled.iter().filter_map(|w| w.wake.quantile(0.99).filter(|p| *p > limit).map(|p| (w, p))).collect();
        bad.sort_by_key(|(_, p)| std::cmp::Reverse(*p));
        let offenders: Vec<_> =
            bad.iter().map(|(w, p)| (w.name(), format!("{:.0} µs ({} samples)", *p as f64 / 1e3, w.wake.count()))).collect();
        if !offenders.is_empty() {
            return Err(failure(&format!("max_wake_p99_us: p99 wake-up latency over {} µs", max.as_micros()), &offenders, self));
        }
        Ok(self)
    }

    /// In every group of two or more workers, the iterations' coefficient
    /// of variation is ≤ `max_pct` percent.
    pub fn assert_spread(&self, max_pct: f64) -> Result<&Self> {
        let mut offenders = Vec::new();
        let mut judged = 0;
        for g in self.group_labels() {
            let ws: Vec<_> = self.group(&g).collect();
            let iters: Vec<f64> = ws.iter().map(|w| w.iterations as f64).collect();
            let Some(c) = cv(&iters) else { continue };
            judged += 1;
            if c * 100.0 > max_pct {
                let lo = ws.iter().min_by_key(|w| w.iterations).expect("2+ workers");
                let hi = ws.iter().max_by_key(|w| w.iterations).expect("2+ workers");
                offenders.push((
                    format!("group {g}"),
                    format!("{:.1} % ({} {} .. {} {} iterations)", c * 100.0, lo.name(), lo.iterations, hi.name(), hi.iterations),
                ));
            }
        }
        if judged == 0 {
            bail!("max_spread_pct: no group has two workers with iterations to compare\n{self}");
        }
        if !offenders.is_empty() {
            return Err(failure(&format!("max_spread_pct: iterations spread (CV) over {max_pct} %"), &offenders, self));
        }
        Ok(self)
    }

    /// No worker migrated more than `rate` times per second of wall time.
    pub fn assert_max_migrations_per_s(&self, rate: f64) -> Result<&Self> {
        let mut bad: Vec<_> = self.workers.iter().map(|w| (w, migrations_per_s(w))).filter(|(_, r)| *r > rate).collect();
        bad.sort_by(|a, b| b.1.total_cmp(&a.1));
        let offenders: Vec<_> = bad
            .iter()
            .map(|(w, r)| (w.name(), format!("{r:.1}/s ({} in {:.2} s)", w.migrations, w.wall.as_secs_f64())))
            .collect();
        if !offenders.is_empty() {
            return Err(failure(&format!("max_migrations_per_s: migrations over {rate}/s"), &offenders, self));
        }
        Ok(self)
    }

    /// `not_starved` under its key's name: [`Report::assert_no_starvation`].
    pub fn assert_not_starved(&self) -> Result<&Self> {
        self.assert_no_starvation()
    }

    /// `isolated` under its key's name: [`Report::assert_in_cpuset`].
    pub fn assert_isolated(&self) -> Result<&Self> {
        self.assert_in_cpuset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuset::CpuSet;
    use crate::report::WorkerReport;

    fn w(group: &str, index: usize, f: impl FnOnce(&mut WorkerReport)) -> WorkerReport {
        let mut w = WorkerReport {
            group: group.into(),
            index,
            spinner: true,
            work: "spin".into(),
            runtime: Duration::from_millis(500),
            wall: Duration::from_secs(2),
            iterations: 100,
            cpus: CpuSet::first(1),
            allowed: CpuSet::first(2),
            ..Default::default()
        };
        f(&mut w);
        w
    }

    fn first_line(e: anyhow::Error) -> String {
        e.to_string().lines().next().unwrap().to_string()
    }

    fn report(workers: Vec<WorkerReport>) -> Report {
        Report { duration: Duration::from_secs(2), workers, ..Default::default() }
    }

    #[test]
    fn gap() {
        let r = report(vec![
            w("a", 0, |w| w.max_gap = Duration::from_millis(3)),
            w("a", 1, |w| {
                w.max_gap = Duration::from_micros(312_400);
                w.max_gap_at = Duration::from_millis(700)
            }),
        ]);
        assert!(r.assert_max_gap(Duration::from_millis(400)).is_ok());
        let e = first_line(r.assert_max_gap(Duration::from_millis(50)).unwrap_err());
        assert_eq!(e, "max_gap_ms: longest scheduling gap over 50.0 ms: a[1] 312.4 ms (at 700 ms)");
    }

    #[test]
    fn wake_p99() {
        let r = report(vec![
            w("pp", 0, |w| (0..100).for_each(|_| w.wake.record(20_000))),
            w("pp", 1, |w| (0..100).for_each(|_| w.wake.record(900_000))),
            w("spin", 0, |_| {}),
        ]);
        let e = first_line(r.assert_wake_p99(Duration::from_micros(500)).unwrap_err());
        assert_eq!(e, "max_wake_p99_us: p99 wake-up latency over 500 µs: pp[1] 900 µs (100 samples)");
        assert!(r.assert_wake_p99(Duration::from_millis(1)).is_ok());
        let none = report(vec![w("spin", 0, |_| {})]);
        assert!(first_line(none.assert_wake_p99(Duration::from_micros(1)).unwrap_err()).contains("no worker has wake-up samples"));
    }

    #[test]
    fn spread() {
        let r = report(vec![w("g", 0, |w| w.iterations = 90), w("g", 1, |w| w.iterations = 110), w("solo", 0, |_| {})]);
        assert!(r.assert_spread(10.0).is_ok(), "CV exactly 10 %");
        let e = first_line(r.assert_spread(5.0).unwrap_err());
        assert_eq!(e, "max_spread_pct: iterations spread (CV) over 5 %: group g 10.0 % (g[0] 90 .. g[1] 110 iterations)");
        let lone = report(vec![w("solo", 0, |_| {})]);
        assert!(lone.assert_spread(5.0).is_err(), "nothing to judge is an error, not a pass");
    }

    #[test]
    fn migrations_and_key_order() {
        let r = report(vec![w("m", 0, |w| w.migrations = 10), w("m", 1, |w| w.migrations = 110)]);
        let e = first_line(r.assert_max_migrations_per_s(20.0).unwrap_err());
        assert_eq!(e, "max_migrations_per_s: migrations over 20/s: m[1] 55.0/s (110 in 2.00 s)");
        assert!(r.check(&Checks { max_migrations_per_s: Some(60.0), ..Checks::NONE }).is_ok());
        // Many offenders: four named on the first line, the rest counted.
        let many = report((0..6).map(|i| w("x", i, |w| w.max_gap = Duration::from_millis(100 + i as u64))).collect());
        let e = first_line(many.check(&Checks { max_gap_ms: Some(10), ..Checks::NONE }).unwrap_err());
        assert!(e.starts_with("max_gap_ms: longest scheduling gap over 10.0 ms: x[5] 105.0 ms") && e.ends_with("(+2 more)"), "{e}");
        let isolated = report(vec![w("i", 0, |w| w.cpus = CpuSet::parse("0-2").unwrap())]);
        let e = first_line(isolated.check(&Checks { isolated: true, ..Checks::NONE }).unwrap_err());
        assert_eq!(e, "isolated: worker ran outside its cpuset: i[0] ran on 0-2 but was allowed only 0-1");
    }
}
