//! Text tables for people, JSON for scripts (shape in docs/stats.md).

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::aggregate::{Summary, Table};
use super::compare::{TestDiff, Verdict};

/// The version of the `--json` shape; bumped only when a field changes meaning.
pub const JSON_SCHEMA: u32 = 1;

/// A figure with as many decimals as its size needs (integers stay whole).
pub fn num(v: f64) -> String {
    let a = v.abs();
    if v.fract() == 0.0 && a < 1e15 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

fn signed(v: f64) -> String {
    if v > 0.0 {
        format!("+{}", num(v))
    } else {
        num(v)
    }
}

/// `median` for one run, `median ±P%` (the spread as a share of the
/// median) for several.
pub fn cell(s: &Summary) -> String {
    if s.n < 2 {
        return num(s.median);
    }
    match s.spread_pct() {
        Some(p) => format!("{} ±{p:.1}%", num(s.median)),
        None => format!("{} ±{}", num(s.median), num(s.spread)),
    }
}

fn runs_cell(runs: usize, outcomes: &std::collections::BTreeMap<String, usize>) -> String {
    let other: Vec<String> = outcomes.iter().filter(|(o, _)| *o != "pass").map(|(o, n)| format!("{n} {o}")).collect();
    if other.is_empty() {
        runs.to_string()
    } else {
        format!("{runs} ({})", other.join(", "))
    }
}

/// Lays out `rows` (first `fixed` columns repeated) in blocks no wider
/// than `width`; numbers right-aligned, the fixed columns (and, with
/// `text_last`, the last one) left-aligned.
fn grid(header: &[String], rows: &[Vec<String>], fixed: usize, width: usize, text_last: bool) -> String {
    let w: Vec<usize> =
        (0..header.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].chars().count()]).max().unwrap_or(0)).collect();
    let fixed_w: usize = w[..fixed].iter().map(|x| x + 2).sum();
    let mut blocks: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut used = fixed_w;
    for (i, wi) in w.iter().enumerate().skip(fixed) {
        if !cur.is_empty() && used + wi + 2 > width {
            blocks.push(std::mem::take(&mut cur));
            used = fixed_w;
        }
        used += wi + 2;
        cur.push(i);
    }
    if !cur.is_empty() || blocks.is_empty() {
        blocks.push(cur);
    }
    let mut out = String::new();
    for (bi, block) in blocks.iter().enumerate() {
        if bi > 0 {
            out.push('\n');
        }
        let cols: Vec<usize> = (0..fixed).chain(block.iter().copied()).collect();
        for line in std::iter::once(header).chain(rows.iter().map(|r| r.as_slice())) {
            let mut l = String::new();
            for &c in &cols {
                if c < fixed || (text_last && c + 1 == header.len()) {
                    let _ = write!(l, "{:<w$}  ", line[c], w = w[c]);
                } else {
                    let _ = write!(l, "{:>w$}  ", line[c], w = w[c]);
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        }
    }
    out
}

/// One table per test.
pub fn tables_text(run: &str, tables: &[Table], width: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "run {run}");
    let mut repeated = false;
    for t in tables {
        let presets = t.rows.iter().any(|r| r.preset.is_some());
        let mut header = vec!["kernel".to_string()];
        if presets {
            header.push("preset".into());
        }
        header.push("runs".into());
        let fixed = header.len();
        header.extend(t.columns.iter().cloned());
        let rows: Vec<Vec<String>> = t
            .rows
            .iter()
            .map(|r| {
                repeated |= r.runs > 1;
                let mut v = vec![r.kernel.clone()];
                if presets {
                    v.push(r.preset.clone().unwrap_or_else(|| "-".into()));
                }
                v.push(runs_cell(r.runs, &r.outcomes));
                v.extend(t.columns.iter().map(|c| r.get(c).map_or("-".into(), cell)));
                v
            })
            .collect();
        let _ = writeln!(out, "\n== {}", t.test);
        if t.columns.is_empty() {
            let _ = writeln!(out, "(no figures: the test reported no metrics, or --metric matched none)");
        }
        out.push_str(&grid(&header, &rows, fixed, width, false));
    }
    out.push('\n');
    out.push_str(if repeated {
        "cells: median ±spread over the repeats (spread = half the min-max range, as % of the median)\n"
    } else {
        "one run per kernel: run-to-run noise not measured (cargo ktstr test --repeat N)\n"
    });
    out
}

fn verdict_text(v: Verdict, a: &str, b: &str) -> String {
    match v {
        Verdict::Unmeasured => "noise not measured".into(),
        Verdict::WithinNoise => "within noise".into(),
        Verdict::ABetter => format!("{a} better"),
        Verdict::BBetter => format!("{b} better"),
        Verdict::Differs => "differs".into(),
    }
}

/// Per test and figure: A, B, B − A (absolute and %), the noise, the verdict.
pub fn compare_text(run: &str, a: &str, b: &str, diffs: &[TestDiff], width: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "run {run}: B = {b} vs A = {a}");
    let (mut flagged, mut total, mut unmeasured) = (0, 0, 0);
    for td in diffs {
        let (na, nb) = td.diffs.first().map_or((0, 0), |d| (d.a.n, d.b.n));
        let _ = match &td.preset {
            Some(p) => writeln!(out, "\n== {} [{p}]", td.test),
            None => writeln!(out, "\n== {}", td.test),
        };
        let header: Vec<String> =
            ["metric", &format!("A (n={na})"), &format!("B (n={nb})"), "B-A", "B-A %", "noise", "verdict"].map(String::from).to_vec();
        let rows: Vec<Vec<String>> = td
            .diffs
            .iter()
            .map(|d| {
                total += 1;
                match d.verdict {
                    Verdict::Unmeasured => unmeasured += 1,
                    Verdict::WithinNoise => {}
                    _ => flagged += 1,
                }
                let mark = if matches!(d.verdict, Verdict::ABetter | Verdict::BBetter | Verdict::Differs) { " *" } else { "" };
                vec![
                    d.metric.clone(),
                    cell(&d.a),
                    cell(&d.b),
                    signed(d.delta),
                    d.delta_pct.map_or("-".into(), |p| format!("{p:+.1}%")),
                    d.noise.map_or("-".into(), num),
                    format!("{}{mark}", verdict_text(d.verdict, "A", "B")),
                ]
            })
            .collect();
        // The verdict is last and left to spill; keep the grid unwrapped.
        out.push_str(&grid(&header, &rows, 1, width.max(200), true));
    }
    let _ = writeln!(
        out,
        "\n{flagged} of {total} figures differ beyond the run-to-run noise (*: |B-A| > spread(A) + spread(B), spread = half the min-max range of the repeats)"
    );
    if unmeasured > 0 {
        let _ = writeln!(out, "{unmeasured} figures have a single run on a side: noise not measured (cargo ktstr test --repeat N)");
    }
    out
}

fn summary_json(s: &Summary) -> Value {
    serde_json::to_value(s).expect("plain numbers")
}

pub fn tables_json(run: &str, dir: &str, tables: &[Table]) -> Value {
    let tests: Vec<Value> = tables
        .iter()
        .map(|t| {
            let rows: Vec<Value> = t
                .rows
                .iter()
                .map(|r| {
                    let mut m = Map::new();
                    for (k, s) in &r.metrics {
                        m.insert(k.clone(), summary_json(s));
                    }
                    json!({"kernel": r.kernel, "preset": r.preset, "runs": r.runs, "outcomes": r.outcomes, "metrics": m})
                })
                .collect();
            json!({"test": t.test, "columns": t.columns, "rows": rows})
        })
        .collect();
    json!({"schema": JSON_SCHEMA, "run": run, "dir": dir, "tests": tests})
}

pub fn compare_json(run: &str, dir: &str, a: &str, b: &str, diffs: &[TestDiff]) -> Value {
    json!({"schema": JSON_SCHEMA, "run": run, "dir": dir, "a": a, "b": b, "tests": diffs})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::aggregate::Row;
    use crate::stats::compare::diff;

    #[test]
    fn numbers_and_cells() {
        assert_eq!(num(8391.0), "8391");
        assert_eq!(num(8391.5), "8391.5");
        assert_eq!(num(1.77690746), "1.777");
        assert_eq!(num(31.62), "31.62");
        assert_eq!(num(0.012345), "0.0123");
        assert_eq!(num(-2.5), "-2.500");
        assert_eq!(cell(&Summary::of(&[2.0]).unwrap()), "2");
        assert_eq!(cell(&Summary::of(&[1.0, 2.0, 3.0]).unwrap()), "2 ±50.0%");
        assert_eq!(cell(&Summary::of(&[-1.0, 0.0, 1.0]).unwrap()), "0 ±1");
    }

    fn table() -> Table {
        let row = |k: &str, runs: usize, m: Vec<(&str, &[f64])>| Row {
            kernel: k.into(),
            preset: None,
            runs,
            outcomes: [("pass".to_string(), runs)].into(),
            metrics: m.into_iter().map(|(c, v)| (c.to_string(), Summary::of(v).unwrap())).collect(),
        };
        Table {
            test: "two_cgroups_share_cpu".into(),
            columns: vec!["a.runtime_s".into(), "a.iterations".into()],
            rows: vec![row("6.12.117", 3, vec![("a.runtime_s", &[1.0, 1.1, 1.2]), ("a.iterations", &[10.0, 12.0, 11.0])]), row("deb", 1, vec![("a.runtime_s", &[2.0])])],
        }
    }

    #[test]
    fn table_text_rows_kernels_columns_figures() {
        let s = tables_text("r1", &[table()], 120);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "run r1");
        assert_eq!(lines[2], "== two_cgroups_share_cpu");
        assert!(lines[3].starts_with("kernel") && lines[3].contains("runs") && lines[3].ends_with("a.iterations"), "{s}");
        assert!(lines[4].starts_with("6.12.117  ") && lines[4].contains("1.100 ±9.1%") && lines[4].ends_with("11 ±9.1%"), "{s}");
        assert!(lines[5].starts_with("deb ") && lines[5].ends_with(" -"), "{s}");
        assert!(s.contains("cells: median ±spread"), "{s}");
        // Narrow: the figures wrap into blocks, each with the kernel column.
        let s = tables_text("r1", &[table()], 30);
        assert_eq!(s.lines().filter(|l| l.starts_with("kernel")).count(), 2, "{s}");
    }

    #[test]
    fn presets_get_a_column_when_a_test_has_them() {
        let mut t = table();
        t.rows[0].preset = Some("llc2".into());
        let s = tables_text("r1", &[t], 120);
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines[3].starts_with("kernel    preset  runs"), "{s}");
        assert!(lines[4].starts_with("6.12.117  llc2    3 "), "{s}");
        assert!(lines[5].starts_with("deb       -       1 "), "{s}");
        let mut t = table();
        t.rows[1].outcomes = [("fail".to_string(), 1)].into();
        assert!(tables_text("r1", &[t], 120).lines().nth(5).unwrap().starts_with("deb       1 (1 fail)  "));
    }

    #[test]
    fn compare_text_and_json() {
        let a = Summary::of(&[99.0, 100.0, 101.0]).unwrap();
        let b = Summary::of(&[109.0, 110.0, 111.0]).unwrap();
        let td = TestDiff { test: "t".into(), preset: None, diffs: vec![diff("a.iterations", "iterations", &a, &b)] };
        let s = compare_text("r1", "6.12.117", "deb", std::slice::from_ref(&td), 120);
        assert!(s.starts_with("run r1: B = deb vs A = 6.12.117\n"), "{s}");
        let row = s.lines().find(|l| l.starts_with("a.iterations")).unwrap();
        for want in ["100 ±1.0%", "110 ±0.9%", "+10", "+10.0%", "  2  ", "B better *"] {
            assert!(row.contains(want), "{want:?} in {row:?}");
        }
        assert!(s.contains("1 of 1 figures differ beyond"), "{s}");
        let j = compare_json("r1", "/x/r1", "6.12.117", "deb", &[td]);
        assert_eq!(j["schema"], 1);
        assert_eq!(j["tests"][0]["metrics"][0]["verdict"], "b_better");
        assert_eq!(j["tests"][0]["metrics"][0]["a"]["median"], 100.0);
        assert_eq!(j["tests"][0]["metrics"][0]["noise"], 2.0);
        let j = tables_json("r1", "/x/r1", &[table()]);
        assert_eq!(j["tests"][0]["rows"][0]["metrics"]["a.runtime_s"]["values"], json!([1.0, 1.1, 1.2]));
        assert_eq!(j["tests"][0]["columns"], json!(["a.runtime_s", "a.iterations"]));
    }
}
