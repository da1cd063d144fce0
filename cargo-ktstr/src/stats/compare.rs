//! Kernel B against kernel A, per test and figure: the difference of the
//! medians, and whether it is beyond the run-to-run noise measured by the
//! repeats (`cargo ktstr test --repeat N`).

use anyhow::{bail, Result};
use serde::Serialize;

use super::aggregate::{Summary, Table};

/// Which way is better for a figure, from its name; `None` when it
/// depends on the test (CPU time is zero-sum between groups).
pub fn lower_is_better(field: &str) -> Option<bool> {
    const LOWER: &[&str] = &["gap", "wake_p", "wake_max", "delay", "latency", "_cv_pct", "spread", "migrations", "involuntary_csw", "violations", "misses", "failed"];
    if LOWER.iter().any(|p| field.contains(p)) {
        return Some(true);
    }
    if field == "iterations" || field.starts_with("iterations") && !field.contains("cv") {
        return Some(false);
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The noise could not be measured: a side has a single run.
    Unmeasured,
    /// |B − A| is within the summed spreads of A and B.
    WithinNoise,
    /// Beyond the noise, and the figure says which way is better.
    ABetter,
    BBetter,
    /// Beyond the noise; better or worse depends on the test.
    Differs,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub metric: String,
    pub a: Summary,
    pub b: Summary,
    /// `median(B) − median(A)`.
    pub delta: f64,
    /// `delta / |median(A)| · 100`; none at median(A) = 0.
    pub delta_pct: Option<f64>,
    /// `spread(A) + spread(B)`; none when a side has one run.
    pub noise: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestDiff {
    pub test: String,
    pub preset: Option<String>,
    #[serde(rename = "metrics")]
    pub diffs: Vec<Diff>,
}

/// One figure's difference.
pub fn diff(metric: &str, field: &str, a: &Summary, b: &Summary) -> Diff {
    let delta = b.median - a.median;
    let delta_pct = (a.median != 0.0).then(|| delta / a.median.abs() * 100.0);
    let noise = (a.n >= 2 && b.n >= 2).then_some(a.spread + b.spread);
    let verdict = match noise {
        None => Verdict::Unmeasured,
        Some(n) if delta.abs() <= n => Verdict::WithinNoise,
        Some(_) => match lower_is_better(field) {
            Some(lower) if (delta < 0.0) == lower => Verdict::BBetter,
            Some(_) => Verdict::ABetter,
            None => Verdict::Differs,
        },
    };
    Diff { metric: metric.to_string(), a: a.clone(), b: b.clone(), delta, delta_pct, noise, verdict }
}

/// The row of `table` for a kernel named by `want`: its label exactly, its
/// sanitized form (`kernel_6_12_117`), else the one label containing it.
pub fn resolve_label(want: &str, labels: &[String]) -> Result<String> {
    let s = kernel_build::label::sanitize;
    if let Some(l) = labels.iter().find(|l| *l == want || s(l) == want || s(l) == s(want)) {
        return Ok(l.clone());
    }
    let hits: Vec<&String> = labels.iter().filter(|l| l.contains(want) || s(l).contains(want)).collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("kernel {want:?} is not in this run; its kernels: {}", labels.join(", ")),
        many => bail!("kernel {want:?} matches several kernels of this run ({}); give the whole label", many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
    }
}

/// Per preset of a test, every column both kernels have.
pub fn compare_table(t: &Table, a: &str, b: &str, field_of: &dyn Fn(&str) -> String) -> Vec<TestDiff> {
    let mut presets: Vec<Option<String>> = t.rows.iter().map(|r| r.preset.clone()).collect();
    presets.sort();
    presets.dedup();
    let mut out = Vec::new();
    for p in presets {
        let row = |k: &str| t.rows.iter().find(|r| r.kernel == k && r.preset == p);
        let (Some(ra), Some(rb)) = (row(a), row(b)) else { continue };
        let diffs = t
            .columns
            .iter()
            .filter_map(|c| Some(diff(c, &field_of(c), ra.get(c)?, rb.get(c)?)))
            .collect();
        out.push(TestDiff { test: t.test.clone(), preset: p, diffs });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::aggregate::Row;

    fn s(v: &[f64]) -> Summary {
        Summary::of(v).unwrap()
    }

    #[test]
    fn noise_from_the_repeats_decides() {
        // A: 100 ±1, B: 110 ±1 → 10 apart, noise 2: beyond; higher iterations are better.
        let d = diff("a.iterations", "iterations", &s(&[99.0, 100.0, 101.0]), &s(&[109.0, 110.0, 111.0]));
        assert_eq!((d.delta, d.delta_pct, d.noise, d.verdict), (10.0, Some(10.0), Some(2.0), Verdict::BBetter));
        // Same gap but overlapping noise: within.
        let d = diff("a.iterations", "iterations", &s(&[90.0, 100.0, 110.0]), &s(&[105.0, 110.0, 115.0]));
        assert_eq!((d.noise, d.verdict), (Some(15.0), Verdict::WithinNoise));
        // Lower is better for a latency: B grew → A better.
        let d = diff("pp.wake_p99_us", "wake_p99_us", &s(&[10.0, 11.0]), &s(&[20.0, 21.0]));
        assert_eq!(d.verdict, Verdict::ABetter);
        // Runtime has no better side.
        let d = diff("a.runtime_s", "runtime_s", &s(&[1.0, 1.01]), &s(&[1.5, 1.51]));
        assert_eq!(d.verdict, Verdict::Differs);
        // Exactly at the noise is within it; identical deterministic figures too.
        assert_eq!(diff("x", "x", &s(&[1.0, 3.0]), &s(&[3.0, 5.0])).verdict, Verdict::WithinNoise);
        assert_eq!(diff("a.workers", "workers", &s(&[2.0, 2.0]), &s(&[2.0, 2.0])).verdict, Verdict::WithinNoise);
        // A deterministic figure that changed is beyond zero noise.
        assert_eq!(diff("a.workers", "workers", &s(&[2.0, 2.0]), &s(&[3.0, 3.0])).verdict, Verdict::Differs);
        // One run on a side: no noise measured, never flagged.
        let d = diff("a.iterations", "iterations", &s(&[100.0]), &s(&[200.0, 201.0]));
        assert_eq!((d.noise, d.verdict), (None, Verdict::Unmeasured));
        assert_eq!(diff("x", "x", &s(&[0.0, 0.0]), &s(&[1.0, 1.0])).delta_pct, None);
        assert_eq!(diff("x", "x", &s(&[-2.0, -2.0]), &s(&[-1.0, -1.0])).delta_pct, Some(50.0));
    }

    #[test]
    fn direction_by_name() {
        assert_eq!(lower_is_better("max_gap_ms"), Some(true));
        assert_eq!(lower_is_better("wake_p99_us"), Some(true));
        assert_eq!(lower_is_better("iterations_cv_pct"), Some(true));
        assert_eq!(lower_is_better("iterations"), Some(false));
        assert_eq!(lower_is_better("runtime_s"), None);
        assert_eq!(lower_is_better("wakeups"), None, "more wake-ups can be more work done");
        assert_eq!(lower_is_better("wake_samples"), None);
    }

    #[test]
    fn labels_by_name_sanitized_or_unique_part() {
        let labels = vec!["6.12.117".to_string(), "path_vmlinuz-6.12.117+deb12-cloud-amd64_fbc963".to_string()];
        assert_eq!(resolve_label("6.12.117", &labels).unwrap(), "6.12.117");
        assert_eq!(resolve_label("kernel_6_12_117", &labels).unwrap(), "6.12.117");
        assert_eq!(resolve_label("deb12", &labels).unwrap(), labels[1]);
        assert_eq!(resolve_label("kernel_path_vmlinuz_6_12_117_deb12_cloud_amd64_fbc963", &labels).unwrap(), labels[1]);
        let e = resolve_label("6.13", &labels).unwrap_err().to_string();
        assert!(e.contains("not in this run; its kernels: 6.12.117, path_vmlinuz"), "{e}");
        let e = resolve_label("6.12", &labels).unwrap_err().to_string();
        assert!(e.contains("matches several kernels"), "{e}");
    }

    #[test]
    fn per_preset_and_only_shared_columns() {
        let row = |k: &str, p: Option<&str>, m: Vec<(&str, &[f64])>| Row {
            kernel: k.into(),
            preset: p.map(Into::into),
            runs: 2,
            outcomes: Default::default(),
            metrics: m.into_iter().map(|(c, v)| (c.to_string(), s(v))).collect(),
        };
        let t = Table {
            test: "t".into(),
            columns: vec!["a.iterations".into(), "a.wake_p99_us".into()],
            rows: vec![
                row("A", None, vec![("a.iterations", &[1.0, 2.0]), ("a.wake_p99_us", &[5.0, 6.0])]),
                row("B", None, vec![("a.iterations", &[3.0, 4.0])]),
                row("A", Some("llc2"), vec![("a.iterations", &[1.0, 1.0])]),
                row("C", Some("llc2"), vec![("a.iterations", &[1.0, 1.0])]),
            ],
        };
        let field = |k: &str| k.rsplit('.').next().unwrap().to_string();
        let d = compare_table(&t, "A", "B", &field);
        assert_eq!(d.len(), 1, "llc2 has no B row");
        assert_eq!(d[0].diffs.len(), 1, "wake_p99_us only on A");
        assert_eq!(d[0].diffs[0].delta, 2.0);
    }
}
