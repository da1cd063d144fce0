//! `cargo ktstr stats` through the real binary over artifact trees that
//! real runs wrote (tests/fixtures/stats: two example tests on the ktstr
//! 6.12.117 kernel and Debian's 6.12.117 cloud kernel, once, and three
//! times with `--repeat 3`; only the result.json files are kept). Every
//! printed figure is checked against the result.json files, read here
//! independently of the command's code.

mod fixture;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

const SINGLE: &str = "0590bdd1-4bdc-479e-ab1e-764946690f6f";
const REPEATED: &str = "20261201T024348.045Z-r3";
const KTSTR_KERNEL: &str = "6.12.117";
const DEBIAN_KERNEL: &str = "path_vmlinuz-6.12.117+deb12-cloud-amd64_fbc963";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stats")
}

fn stats(args: &[&str]) -> Output {
    let cache = tempfile::tempdir().unwrap();
    let mut c = fixture::cargo_ktstr(cache.path());
    c.arg("stats").arg("--artifact-dir").arg(fixtures()).args(args).env("COLUMNS", "1000");
    c.output().unwrap()
}

fn stdout_ok(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Every result.json of `run`'s `test` on `kernel` (all repeats).
fn results(run: &str, test: &str, kernel: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for entry in walk(&fixtures().join(run).join(format!("ktstr__{test}"))) {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&entry).unwrap()).unwrap();
        if v["kernel"]["label"] == kernel {
            out.push(v);
        }
    }
    assert!(!out.is_empty(), "no fixture for {run} {test} {kernel}");
    out
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.ends_with("result.json") {
            out.push(p);
        }
    }
    out
}

/// The value of a group figure (`a.runtime_s`) in one result.json; a
/// `*_cv_pct` the file lacks is the population CV of the group's workers.
fn figure(v: &Value, key: &str) -> f64 {
    let (group, field) = key.split_once('.').unwrap();
    let run = &v["metrics"]["runs"][0];
    if let Some(x) = run["groups"][group][field].as_f64() {
        return x;
    }
    let base = field.strip_suffix("_cv_pct").unwrap_or_else(|| panic!("{key} not in {v}"));
    let xs: Vec<f64> = run["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == group)
        .map(|w| w[base].as_f64().or_else(|| w[format!("{base}_s")].as_f64()).unwrap())
        .collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
    sd / mean * 100.0
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The printed number equals `want` to the digits printed.
#[track_caller]
fn assert_printed(printed: &str, want: f64, what: &str) {
    let p: f64 = printed.trim_start_matches('+').parse().unwrap_or_else(|_| panic!("{what}: {printed:?} is not a number"));
    let decimals = printed.split_once('.').map_or(0, |(_, d)| d.len()) as i32;
    let tol = 0.5 * 10f64.powi(-decimals) + 1e-9;
    assert!((p - want).abs() <= tol, "{what}: printed {printed}, result.json gives {want}");
}

/// `cell` is `M` or `M ±S%`: M is the median of the repeats, S their
/// half-range as a share of it.
#[track_caller]
fn assert_cell(cell: &str, values: &[f64], what: &str) {
    let med = median(values.to_vec());
    match cell.split_once(" ±") {
        None => {
            assert_eq!(values.len(), 1, "{what}: one figure printed for {} runs", values.len());
            assert_printed(cell, med, what);
        }
        Some((m, s)) => {
            assert!(values.len() > 1, "{what}");
            assert_printed(m, med, what);
            let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            assert_printed(s.strip_suffix('%').unwrap(), (hi - lo) / 2.0 / med.abs() * 100.0, what);
        }
    }
}

/// The tables of `stats` output: test → (header cells, rows of cells).
fn tables(out: &str) -> Vec<(String, Vec<String>, Vec<Vec<String>>)> {
    let cells = |l: &str| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect::<Vec<_>>();
    let mut t = Vec::new();
    let mut lines = out.lines().peekable();
    while let Some(l) = lines.next() {
        if let Some(name) = l.strip_prefix("== ") {
            let header = cells(lines.next().unwrap());
            let mut rows = Vec::new();
            while let Some(r) = lines.peek().filter(|r| !r.is_empty()) {
                rows.push(cells(r));
                lines.next();
            }
            t.push((name.to_string(), header, rows));
        }
    }
    t
}

fn check_tables(run: &str, want_runs: usize) {
    let out = stdout_ok(&stats(&[run]));
    assert!(out.starts_with(&format!("run {run}\n")), "{out}");
    let ts = tables(&out);
    assert_eq!(ts.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(), ["spinners_all_make_progress", "two_cgroups_share_cpu"], "{out}");
    let mut checked = 0;
    for (test, header, rows) in &ts {
        assert_eq!(&header[..2], ["kernel", "runs"], "{out}");
        // The default columns: runtime, iterations and spread of every group.
        let groups: Vec<&str> = if test == "two_cgroups_share_cpu" { vec!["a", "b"] } else { vec!["workers"] };
        let want: Vec<String> =
            groups.iter().flat_map(|g| ["runtime_s", "iterations", "iterations_cv_pct"].map(|f| format!("{g}.{f}"))).collect();
        assert_eq!(&header[2..], want.as_slice(), "{out}");
        assert_eq!(rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), [KTSTR_KERNEL, DEBIAN_KERNEL], "{out}");
        for row in rows {
            let rs = results(run, test, &row[0]);
            assert_eq!(rs.len(), want_runs);
            assert_eq!(row[1], want_runs.to_string(), "all passed: {out}");
            for (key, cell) in header[2..].iter().zip(&row[2..]) {
                let values: Vec<f64> = rs.iter().map(|v| figure(v, key)).collect();
                assert_cell(cell, &values, &format!("{test} {} {key}", row[0]));
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * 3 + 2 * 6);
}

#[test]
fn tables_print_the_figures_of_result_json() {
    check_tables(SINGLE, 1);
    check_tables(REPEATED, 3);
}

#[test]
fn compare_prints_differences_and_flags_beyond_the_noise() {
    let out = stdout_ok(&stats(&[REPEATED, "--compare", "kernel_6_12_117", "deb12"]));
    assert!(out.starts_with(&format!("run {REPEATED}: B = {DEBIAN_KERNEL} vs A = {KTSTR_KERNEL}\n")), "{out}");
    let ts = tables(&out);
    assert_eq!(ts.len(), 2, "{out}");
    let mut flagged = 0;
    let mut total = 0;
    for (test, header, rows) in &ts {
        assert_eq!(header, &["metric", "A (n=3)", "B (n=3)", "B-A", "B-A %", "noise", "verdict"], "{out}");
        let (ra, rb) = (results(REPEATED, test, KTSTR_KERNEL), results(REPEATED, test, DEBIAN_KERNEL));
        for row in rows {
            let key = &row[0];
            let va: Vec<f64> = ra.iter().map(|v| figure(v, key)).collect();
            let vb: Vec<f64> = rb.iter().map(|v| figure(v, key)).collect();
            assert_cell(&row[1], &va, key);
            assert_cell(&row[2], &vb, key);
            let (ma, mb) = (median(va.clone()), median(vb.clone()));
            assert_printed(&row[3], mb - ma, key);
            assert_printed(row[4].strip_suffix('%').unwrap(), (mb - ma) / ma.abs() * 100.0, key);
            let half = |v: &[f64]| (v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min)) / 2.0;
            let noise = half(&va) + half(&vb);
            assert_printed(&row[5], noise, key);
            let beyond = (mb - ma).abs() > noise;
            assert_eq!(row[6].ends_with(" *"), beyond, "{key}: {row:?}");
            if beyond {
                flagged += 1;
                let lower_better = key.ends_with("_cv_pct");
                let b_better = (mb < ma) == lower_better;
                let want = if key.ends_with("runtime_s") { "differs *" } else if b_better { "B better *" } else { "A better *" };
                assert_eq!(row[6], want, "{key}: {row:?}");
            } else {
                assert_eq!(row[6], "within noise", "{key}");
            }
            total += 1;
        }
    }
    assert!(out.contains(&format!("\n{flagged} of {total} figures differ beyond the run-to-run noise")), "{out}");

    // One run per kernel: nothing is flagged, and it says why.
    let out = stdout_ok(&stats(&[SINGLE, "--compare", KTSTR_KERNEL, DEBIAN_KERNEL]));
    assert!(out.contains("0 of 9 figures differ") && out.contains("9 figures have a single run on a side"), "{out}");
    assert_eq!(out.lines().filter(|l| l.ends_with("  noise not measured")).count(), 9, "{out}");
}

#[test]
fn json_holds_every_repeat_s_value() {
    let out = stdout_ok(&stats(&[REPEATED, "--json", "-t", "two_cgroups"]));
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["schema"], 1);
    assert_eq!(j["run"], REPEATED);
    assert_eq!(j["tests"].as_array().unwrap().len(), 1);
    let t = &j["tests"][0];
    assert_eq!(t["test"], "two_cgroups_share_cpu");
    for row in t["rows"].as_array().unwrap() {
        let kernel = row["kernel"].as_str().unwrap();
        assert_eq!(row["outcomes"], serde_json::json!({"pass": 3}));
        let rs = results(REPEATED, "two_cgroups_share_cpu", kernel);
        // Every numeric leaf of a worker, too: b[1].iterations in repeat order.
        let mut by_repeat: Vec<(u64, f64)> = rs
            .iter()
            .map(|v| (v["repeat"]["index"].as_u64().unwrap(), v["metrics"]["runs"][0]["workers"][3]["iterations"].as_f64().unwrap()))
            .collect();
        by_repeat.sort_by_key(|x| x.0);
        let want: Vec<f64> = by_repeat.iter().map(|x| x.1).collect();
        let got: Vec<f64> = row["metrics"]["b[1].iterations"]["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(got, want, "{kernel}");
        let s = &row["metrics"]["a.runtime_s"];
        let vals: Vec<f64> = rs.iter().map(|v| figure(v, "a.runtime_s")).collect();
        assert!((s["median"].as_f64().unwrap() - median(vals)).abs() < 1e-12, "{s}");
        assert!(row["metrics"].get("a[0].pid").is_none(), "pids are not figures");
    }
    let out = stdout_ok(&stats(&[REPEATED, "--json", "--compare", KTSTR_KERNEL, "deb12", "--metric", "iterations"]));
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((j["a"].as_str(), j["b"].as_str()), (Some(KTSTR_KERNEL), Some(DEBIAN_KERNEL)));
    let metrics: Vec<&str> =
        j["tests"].as_array().unwrap().iter().flat_map(|t| t["metrics"].as_array().unwrap()).map(|m| m["metric"].as_str().unwrap()).collect();
    assert_eq!(metrics, ["workers.iterations", "a.iterations", "b.iterations"]);
}

#[test]
fn newest_run_by_default_and_one_line_errors() {
    // A copy whose repeated run is the newest.
    let t = tempfile::tempdir().unwrap();
    for run in [SINGLE, REPEATED] {
        for f in walk(&fixtures().join(run)) {
            let to = t.path().join(f.strip_prefix(fixtures()).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&f, &to).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut c = fixture::cargo_ktstr(cache.path());
        c.arg("stats").args(args).env("KTSTR_ARTIFACT_DIR", t.path()).output().unwrap()
    };
    let out = stdout_ok(&run(&[]));
    assert!(out.starts_with(&format!("run {REPEATED}\n")), "{out}");

    let one_line = |o: Output, wants: &[&str]| {
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        for w in wants {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
    };
    one_line(run(&["no-such-run"]), &["run \"no-such-run\" not found under"]);
    one_line(run(&["--compare", "6.13", "deb12"]), &["kernel \"6.13\" is not in this run; its kernels: 6.12.117, path_vmlinuz"]);
    one_line(run(&["--compare", "6.12.117", "kernel_6_12_117"]), &["both name kernel 6.12.117"]);
    one_line(run(&["-t", "nothing_like_this"]), &["matches the given --test filters"]);
    std::fs::write(t.path().join(SINGLE).join("ktstr__two_cgroups_share_cpu/kernel_6_12_117/result.json"), r#"{"schema": 2}"#).unwrap();
    one_line(run(&[SINGLE]), &["schema Some(2)", "update cargo-ktstr"]);
}
