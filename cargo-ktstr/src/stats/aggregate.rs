//! Entries → one table per test: rows are kernels (and gauntlet presets),
//! cells the median and spread of a figure over the repeats of that row.

use serde::Serialize;

use super::load::{Entry, Level};

/// A figure over the repeats of one row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Half the range, `(max - min) / 2`: the run-to-run noise; 0 for n = 1.
    pub spread: f64,
    /// Every repeat's value, in repeat order.
    pub values: Vec<f64>,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        let mut s = values.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        let (min, max) = (s[0], s[n - 1]);
        Some(Summary { n, median, min, max, spread: (max - min) / 2.0, values: values.to_vec() })
    }

    /// The spread as a percentage of the median; none at median 0.
    pub fn spread_pct(&self) -> Option<f64> {
        (self.median != 0.0).then(|| self.spread / self.median.abs() * 100.0)
    }
}

/// One row: one kernel (and preset), all its repeats.
#[derive(Debug, Clone)]
pub struct Row {
    pub kernel: String,
    pub preset: Option<String>,
    /// How many `result.json` files (repeats) the row has.
    pub runs: usize,
    /// Outcome → count (`pass`, `fail`, `skip`, …).
    pub outcomes: std::collections::BTreeMap<String, usize>,
    /// Selected figure → summary, in column order; a figure no repeat of
    /// this row has is absent.
    pub metrics: Vec<(String, Summary)>,
}

impl Row {
    pub fn get(&self, key: &str) -> Option<&Summary> {
        self.metrics.iter().find(|(k, _)| k == key).map(|(_, s)| s)
    }
}

#[derive(Debug, Clone)]
pub struct Table {
    pub test: String,
    /// Column order: the selected figures present in any row.
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
}

/// Which figures become columns.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// The key figures of every group (see [`DEFAULT_FIELDS`]).
    Default,
    /// Every figure, workers included.
    All,
    /// `--metric` patterns: a bare name (`wake_p99_us`) takes that field of
    /// every group and the run; a name with `.` or `[` is a whole key,
    /// where `*` matches any run of characters (`a[*].iterations`).
    Patterns(Vec<String>),
}

/// Per group, in column order: CPU time, throughput, spread across the
/// group's workers, longest gap, wake-up latency. Absent ones are skipped.
pub const DEFAULT_FIELDS: &[&[&str]] =
    &[&["runtime_ms", "runtime_s"], &["iterations"], &["iterations_cv_pct"], &["max_gap_ms"], &["wake_p99_us"]];

impl Selection {
    pub fn from_args(metrics: &[String]) -> Selection {
        let pats: Vec<String> = metrics.iter().flat_map(|m| m.split(',')).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if pats.is_empty() {
            Selection::Default
        } else if pats.iter().any(|p| p == "all") {
            Selection::All
        } else {
            Selection::Patterns(pats)
        }
    }

    /// The selected keys among `entries`' figures, in column order.
    pub fn columns(&self, entries: &[&Entry]) -> Vec<String> {
        // Every distinct key, in the order of first appearance.
        let mut all: Vec<(&str, &str, Level)> = Vec::new();
        for e in entries {
            for f in &e.figures {
                if !all.iter().any(|(k, _, _)| *k == f.key) {
                    all.push((&f.key, &f.field, f.level));
                }
            }
        }
        let owner = |k: &str, field: &str| k[..k.len() - field.len()].trim_end_matches('.').to_string();
        let mut out: Vec<String> = Vec::new();
        match self {
            Selection::All => out.extend(all.iter().map(|(k, _, _)| k.to_string())),
            Selection::Default => {
                let mut owners: Vec<String> = Vec::new();
                for (k, field, lvl) in &all {
                    let o = owner(k, field);
                    if *lvl == Level::Group && !owners.contains(&o) {
                        owners.push(o);
                    }
                }
                for o in &owners {
                    for alternatives in DEFAULT_FIELDS {
                        let hit = alternatives.iter().map(|f| if o.is_empty() { f.to_string() } else { format!("{o}.{f}") }).find(|key| {
                            all.iter().any(|(k, _, l)| k == key && *l == Level::Group)
                        });
                        out.extend(hit);
                    }
                }
            }
            Selection::Patterns(pats) => {
                for p in pats {
                    for (k, field, lvl) in &all {
                        let hit = if p.contains('.') || p.contains('[') || p.contains('*') {
                            glob(p, k)
                        } else {
                            field == p && *lvl != Level::Worker
                        };
                        if hit && !out.iter().any(|o| o == k) {
                            out.push(k.to_string());
                        }
                    }
                }
            }
        }
        out
    }
}

/// `*` matches any run of characters; everything else literally.
pub fn glob(pat: &str, s: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    if parts.len() == 1 {
        return pat == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// One table for a test's entries: rows by (kernel, preset) in order of
/// kernel label then preset, repeats folded into each cell's summary.
pub fn table(test: &str, entries: &[&Entry], sel: &Selection) -> Table {
    let columns = sel.columns(entries);
    let mut keys: Vec<(String, Option<String>)> = entries.iter().map(|e| (e.kernel.clone(), e.preset.clone())).collect();
    keys.sort();
    keys.dedup();
    let rows = keys
        .into_iter()
        .map(|(kernel, preset)| {
            let mut mine: Vec<&&Entry> = entries.iter().filter(|e| e.kernel == kernel && e.preset == preset).collect();
            mine.sort_by_key(|e| (e.repeat, e.path.clone()));
            let mut outcomes = std::collections::BTreeMap::new();
            for e in &mine {
                *outcomes.entry(e.outcome.clone()).or_insert(0) += 1;
            }
            let metrics = columns
                .iter()
                .filter_map(|c| {
                    let vals: Vec<f64> = mine.iter().filter_map(|e| e.figures.iter().find(|f| &f.key == c).map(|f| f.value)).collect();
                    Summary::of(&vals).map(|s| (c.clone(), s))
                })
                .collect();
            Row { kernel, preset, runs: mine.len(), outcomes, metrics }
        })
        .collect();
    Table { test: test.to_string(), columns, rows }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::load::Figure;

    fn fig(key: &str, level: Level, value: f64) -> Figure {
        let field = key.rsplit('.').next().unwrap().to_string();
        Figure { key: key.into(), field, level, value }
    }

    fn entry(kernel: &str, repeat: Option<u64>, outcome: &str, figs: Vec<Figure>) -> Entry {
        Entry {
            path: format!("/r/t/{kernel}/{repeat:?}").into(),
            test: "t".into(),
            preset: None,
            kernel: kernel.into(),
            repeat,
            outcome: outcome.into(),
            figures: figs,
        }
    }

    #[test]
    fn median_and_spread() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max, s.spread), (3, 2.0, 1.0, 3.0, 1.0));
        assert_eq!(s.values, [3.0, 1.0, 2.0], "repeat order kept");
        assert_eq!(s.spread_pct(), Some(50.0));
        let s = Summary::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.spread), (3.0, 4.5));
        let s = Summary::of(&[7.0]).unwrap();
        assert_eq!((s.median, s.spread), (7.0, 0.0));
        assert_eq!(Summary::of(&[0.0, 0.0]).unwrap().spread_pct(), None);
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn default_columns_are_key_group_figures_in_group_order() {
        let e = entry(
            "6.12",
            None,
            "pass",
            vec![
                fig("b.workers", Level::Group, 2.0),
                fig("b.runtime_s", Level::Group, 1.0),
                fig("b.iterations", Level::Group, 10.0),
                fig("b.wake_p99_us", Level::Group, 50.0),
                fig("a.runtime_ms", Level::Group, 900.0),
                fig("a.runtime_s", Level::Group, 0.9),
                fig("a.iterations_cv_pct", Level::Group, 4.0),
                fig("duration_s", Level::Run, 2.0),
                fig("a[0].iterations", Level::Worker, 5.0),
            ],
        );
        let cols = Selection::Default.columns(&[&e]);
        assert_eq!(cols, ["b.runtime_s", "b.iterations", "b.wake_p99_us", "a.runtime_ms", "a.iterations_cv_pct"]);
        let sel = Selection::from_args(&["iterations,duration_s".into()]);
        assert_eq!(sel.columns(&[&e]), ["b.iterations", "duration_s"], "bare names skip workers");
        assert_eq!(Selection::from_args(&["a[*].iterations".into()]).columns(&[&e]), ["a[0].iterations"]);
        assert_eq!(Selection::from_args(&["*.runtime_s".into()]).columns(&[&e]), ["b.runtime_s", "a.runtime_s"]);
        assert_eq!(Selection::from_args(&["all".into()]).columns(&[&e]).len(), 9);
        assert_eq!(Selection::from_args(&[]), Selection::Default);
    }

    #[test]
    fn glob_matching() {
        assert!(glob("a[*].x", "a[12].x"));
        assert!(!glob("a[*].x", "b[1].x"));
        assert!(glob("*", "anything"));
        assert!(glob("*p99*", "run2.pp.wake_p99_us"));
        assert!(!glob("a*a", "a"));
        assert!(glob("exact", "exact") && !glob("exact", "exactly"));
    }

    #[test]
    fn rows_fold_repeats_per_kernel() {
        let es = [
            entry("6.12", Some(1), "pass", vec![fig("a.runtime_s", Level::Group, 1.0)]),
            entry("deb", Some(1), "pass", vec![fig("a.runtime_s", Level::Group, 4.0)]),
            entry("6.12", Some(2), "fail", vec![fig("a.runtime_s", Level::Group, 3.0)]),
            entry("6.12", Some(3), "pass", vec![fig("a.runtime_s", Level::Group, 2.0)]),
            entry("deb", Some(2), "skip", vec![]),
        ];
        let refs: Vec<&Entry> = es.iter().collect();
        let t = table("t", &refs, &Selection::Default);
        assert_eq!(t.columns, ["a.runtime_s"]);
        assert_eq!(t.rows.len(), 2);
        let r = &t.rows[0];
        assert_eq!((r.kernel.as_str(), r.runs), ("6.12", 3));
        assert_eq!(r.outcomes.get("pass"), Some(&2));
        assert_eq!(r.outcomes.get("fail"), Some(&1));
        let s = r.get("a.runtime_s").unwrap();
        assert_eq!((s.median, s.spread, s.values.clone()), (2.0, 1.0, vec![1.0, 3.0, 2.0]));
        let d = &t.rows[1];
        assert_eq!((d.runs, d.get("a.runtime_s").unwrap().n), (2, 1), "the skipped repeat has no figure");
    }
}
