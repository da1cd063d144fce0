//! Loading, aggregation and noise over artifact trees real runs wrote
//! (tests/fixtures/stats; see tests/stats_cli.rs for what they are).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::aggregate::{table, Selection};
use super::compare::{compare_table, Verdict};
use super::load::{by_test, load_run, Level};

const SINGLE: &str = "0590bdd1-4bdc-479e-ab1e-764946690f6f";
const REPEATED: &str = "20261201T024348.045Z-r3";
const DEBIAN: &str = "path_vmlinuz-6.12.117+deb12-cloud-amd64_fbc963";

fn run(id: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stats").join(id)
}

fn raw(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_numeric_leaf_of_a_real_result_json_is_a_figure() {
    let es = load_run(&run(SINGLE)).unwrap();
    assert_eq!(es.len(), 4);
    let mut seen: Vec<(&str, &str)> = es.iter().map(|e| (e.test.as_str(), e.kernel.as_str())).collect();
    seen.sort();
    assert_eq!(
        seen,
        [("spinners_all_make_progress", "6.12.117"), ("spinners_all_make_progress", DEBIAN), ("two_cgroups_share_cpu", "6.12.117"), ("two_cgroups_share_cpu", DEBIAN)]
    );
    for e in &es {
        assert_eq!((e.outcome.as_str(), e.repeat, e.preset.as_deref()), ("pass", None, None));
        let v = raw(&e.path);
        let r = &v["metrics"]["runs"][0];
        for (g, fields) in r["groups"].as_object().unwrap() {
            for (f, x) in fields.as_object().unwrap() {
                let fig = e.figures.iter().find(|x| x.key == format!("{g}.{f}")).unwrap_or_else(|| panic!("{g}.{f}"));
                assert_eq!((fig.value, fig.level), (x.as_f64().unwrap(), Level::Group));
            }
        }
        for w in r["workers"].as_array().unwrap() {
            let name = format!("{}[{}]", w["group"].as_str().unwrap(), w["index"]);
            for f in ["runtime_s", "wall_s", "iterations", "migrations", "wakeups"] {
                let fig = e.figures.iter().find(|x| x.key == format!("{name}.{f}")).unwrap();
                assert_eq!((fig.value, fig.level), (w[f].as_f64().unwrap(), Level::Worker));
            }
        }
        assert_eq!(e.figures.iter().find(|f| f.key == "duration_s").unwrap().value, r["duration_s"].as_f64().unwrap());
    }
}

#[test]
fn repeats_fold_into_median_and_spread_and_set_the_noise() {
    let es = load_run(&run(REPEATED)).unwrap();
    assert_eq!(es.len(), 12, "2 tests x 2 kernels x 3 repeats");
    let tests = by_test(&es);
    let two = &tests["two_cgroups_share_cpu"];
    let t = table("two_cgroups_share_cpu", two, &Selection::Default);
    assert_eq!(t.rows.iter().map(|r| (r.kernel.as_str(), r.runs)).collect::<Vec<_>>(), [("6.12.117", 3), (DEBIAN, 3)]);
    for row in &t.rows {
        let mut per_repeat: Vec<(u64, f64)> = two
            .iter()
            .filter(|e| e.kernel == row.kernel)
            .map(|e| (e.repeat.unwrap(), raw(&e.path)["metrics"]["runs"][0]["groups"]["b"]["iterations"].as_f64().unwrap()))
            .collect();
        per_repeat.sort_by_key(|x| x.0);
        assert_eq!(per_repeat.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3]);
        let vals: Vec<f64> = per_repeat.iter().map(|x| x.1).collect();
        let s = row.get("b.iterations").unwrap();
        assert_eq!(s.values, vals, "repeat order");
        let mut sorted = vals.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!((s.median, s.min, s.max), (sorted[1], sorted[0], sorted[2]));
        assert_eq!(s.spread, (sorted[2] - sorted[0]) / 2.0);
    }
    let field = |k: &str| k.rsplit('.').next().unwrap().to_string();
    let diffs = compare_table(&t, "6.12.117", DEBIAN, &field);
    assert_eq!(diffs.len(), 1);
    for d in &diffs[0].diffs {
        let (a, b) = (t.rows[0].get(&d.metric).unwrap(), t.rows[1].get(&d.metric).unwrap());
        assert_eq!(d.noise, Some(a.spread + b.spread), "{}", d.metric);
        assert_eq!(d.delta, b.median - a.median);
        assert_eq!(d.verdict == Verdict::WithinNoise, d.delta.abs() <= a.spread + b.spread, "{}", d.metric);
    }
    // The single run has no noise to go by.
    let single = load_run(&run(SINGLE)).unwrap();
    let t = table("two_cgroups_share_cpu", &by_test(&single)["two_cgroups_share_cpu"], &Selection::Default);
    assert!(compare_table(&t, "6.12.117", DEBIAN, &field)[0].diffs.iter().all(|d| d.verdict == Verdict::Unmeasured));
}

/// The shape the runtime is moving to (`summary::ReportMetrics`: groups as
/// an array, times in ms, spread, gaps and wake-up percentiles): the
/// default columns pick them up without a code change here.
#[test]
fn the_richer_metrics_shape_fills_the_default_columns() {
    let v = serde_json::json!({
        "schema": 1, "test": "ktstr/ping_pong_pairs/kernel_6_12_117", "outcome": "pass",
        "kernel": {"label": "6.12.117", "image": "/k", "release": "6.12.117"},
        "metrics": {"runs": [{
            "duration_s": 2.0,
            "workers": [{"group": "pp", "index": 0, "work": "ping_pong", "runtime_ms": 900.0, "iterations": 1000,
                         "max_gap_ms": 3.5, "wake_p50_us": 20.0, "wake_p99_us": 80.0, "run_delay_ms": null, "timeslices": null}],
            "groups": [{"group": "pp", "work": "ping_pong", "workers": 2, "runtime_ms": 1800.0, "iterations": 2000,
                        "iterations_cv_pct": 1.5, "runtime_cv_pct": 0.7, "migrations": 4, "migrations_per_s": 2.0,
                        "max_gap_ms": 4.0, "wake_samples": 1999, "wake_p50_us": 21.0, "wake_p99_us": 85.0,
                        "wake_max_us": 300.0, "run_delay_ms": null, "voluntary_csw": 2000, "involuntary_csw": 3}]
        }]}
    });
    let e = super::load::entry(Path::new("/r/ktstr__ping_pong_pairs/kernel_6_12_117/result.json"), &v).unwrap();
    let t = table(&e.test, &[&e], &Selection::Default);
    assert_eq!(t.columns, ["pp.runtime_ms", "pp.iterations", "pp.iterations_cv_pct", "pp.max_gap_ms", "pp.wake_p99_us"]);
    assert_eq!(t.rows[0].get("pp.wake_p99_us").unwrap().median, 85.0);
    assert!(e.figures.iter().all(|f| f.key != "pp.run_delay_ms"), "null is no figure");
    let sel = Selection::from_args(&["wake_max_us,involuntary_csw".into()]);
    assert_eq!(sel.columns(&[&e]), ["pp.wake_max_us", "pp.involuntary_csw"]);
}
