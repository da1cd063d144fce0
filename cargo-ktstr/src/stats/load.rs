//! Reading run artifacts (design.md "Run artifacts"): which run, which
//! `result.json` files, and each one's metrics flattened to named numbers.
//!
//! The metrics are read generically: every numeric leaf of `metrics`
//! becomes a figure, so figures the runtime adds later show up here
//! without code changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Where a figure lives in the report: which level decides the default
/// columns and what `--metric NAME` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// A whole `ctx.run` (`duration_s`) or an unknown top-level figure.
    Run,
    /// One group (cgroup) of workers: `a.runtime_s`.
    Group,
    /// One worker: `a[0].iterations`.
    Worker,
}

/// One named figure of one `result.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// `a.runtime_s`, `a[1].iterations`, `duration_s`; `run2.` in front
    /// when the body made more than one `ctx.run`.
    pub key: String,
    /// The leaf's own name (`runtime_s`).
    pub field: String,
    pub level: Level,
    pub value: f64,
}

/// One `result.json`: one test on one kernel (one repeat of it).
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    /// The test's name without `ktstr/`, the kernel suffix, and the
    /// `gauntlet/…/{preset}` wrapping.
    pub test: String,
    pub preset: Option<String>,
    /// The producer's kernel label (`6.12.117`), `host` on the host.
    pub kernel: String,
    /// 1-based index under `cargo ktstr test --repeat N`.
    pub repeat: Option<u64>,
    pub outcome: String,
    /// In report order (groups as they first appear, then workers).
    pub figures: Vec<Figure>,
}

/// Identity fields and guest clock readings (scenario step and per-CPU
/// trace timestamps: instants, not measurements): left out of the figures.
const NOT_FIGURES: &[&str] = &["pid", "index", "schema", "cpu", "start_ns", "end_ns", "first_ns", "last_ns"];

/// `{artifacts}` as the test binaries pick it: `--artifact-dir`, else
/// `$KTSTR_ARTIFACT_DIR`, else `{cargo target dir}/ktstr`.
pub fn artifacts_root(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = explicit {
        return Ok(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("KTSTR_ARTIFACT_DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("finding the cargo target directory (run inside the test crate, or pass --artifact-dir DIR)")?;
    Ok(meta.target_directory.into_std_path_buf().join("ktstr"))
}

/// The run to read: `run` names a directory under `root` (or is a path to
/// one); without it, the run whose newest `result.json` is newest.
pub fn pick_run(root: &Path, run: Option<&str>) -> Result<PathBuf> {
    if let Some(r) = run {
        let under = root.join(r);
        if under.is_dir() {
            return Ok(under);
        }
        let p = Path::new(r);
        if p.is_dir() {
            return Ok(p.to_path_buf());
        }
        bail!("run {r:?} not found under {} (list the runs with `ls {}`)", root.display(), root.display());
    }
    let rd = std::fs::read_dir(root).with_context(|| {
        format!("no run artifacts at {} (run `cargo ktstr test` first, or pass --artifact-dir DIR)", root.display())
    })?;
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for e in rd.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let newest = result_files(&p).iter().filter_map(|f| f.metadata().and_then(|m| m.modified()).ok()).max();
        if let Some(t) = newest {
            if best.as_ref().is_none_or(|(b, bp)| (t, &p) > (*b, bp)) {
                best = Some((t, p));
            }
        }
    }
    match best {
        Some((_, p)) => Ok(p),
        None => bail!("no result.json under {} (run `cargo ktstr test` first, or pass --artifact-dir DIR)", root.display()),
    }
}

/// Every `result.json` under a run, sorted by path:
/// `{test}/{kernel}/result.json` and, under `--repeat`,
/// `{test}/{kernel}/repeat_{i}/result.json`.
pub fn result_files(run: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if depth > 0 {
                    walk(&p, depth - 1, out);
                }
            } else if p.file_name().is_some_and(|n| n == "result.json") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(run, 3, &mut out);
    out.sort();
    out
}

/// Every entry of a run; a `result.json` that cannot be read is an error
/// naming the file.
pub fn load_run(run: &Path) -> Result<Vec<Entry>> {
    result_files(run)
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON (a run still writing it? it is renamed into place)", f.display()))?;
            entry(&f, &v)
        })
        .collect()
}

/// One parsed `result.json`.
pub fn entry(path: &Path, v: &Value) -> Result<Entry> {
    match v.get("schema").and_then(Value::as_u64) {
        Some(1) => {}
        other => bail!("{}: schema {other:?}, this cargo-ktstr reads schema 1 (update cargo-ktstr)", path.display()),
    }
    let label = v.pointer("/kernel/label").and_then(Value::as_str).unwrap_or_default();
    // An unresolved kernel has an empty label; its directory says so.
    let kernel = if label.is_empty() { kernel_dir_name(path) } else { label.to_string() };
    let name = v.get("test").and_then(Value::as_str).unwrap_or_default();
    let (test, mut preset) = split_test_name(name, &kernel);
    if let Some(p) = v.get("preset").and_then(Value::as_str) {
        preset = Some(p.to_string());
    }
    Ok(Entry {
        path: path.to_path_buf(),
        test,
        preset,
        kernel,
        repeat: v.pointer("/repeat/index").and_then(Value::as_u64),
        outcome: v.get("outcome").and_then(Value::as_str).unwrap_or("unknown").to_string(),
        figures: flatten_metrics(v.get("metrics").unwrap_or(&Value::Null)),
    })
}

fn kernel_dir_name(result: &Path) -> String {
    let mut d = result.parent();
    if d.and_then(Path::file_name).is_some_and(|n| n.to_string_lossy().starts_with("repeat_")) {
        d = d.and_then(Path::parent);
    }
    d.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `ktstr/NAME[/kernel_x]` → (`NAME`, None);
/// `ktstr/gauntlet/NAME/PRESET[/kernel_x]` → (`NAME`, Some(`PRESET`)).
pub fn split_test_name(name: &str, kernel_label: &str) -> (String, Option<String>) {
    let name = name.strip_prefix("ktstr/").unwrap_or(name);
    let mut parts: Vec<&str> = name.split('/').collect();
    let suffix = kernel_build::label::sanitize(kernel_label);
    let base_len = if parts.first() == Some(&"gauntlet") { 3 } else { 1 };
    if parts.len() > base_len && parts.last().is_some_and(|l| *l == suffix || l.starts_with("kernel_")) {
        parts.pop();
    }
    match parts.as_slice() {
        ["gauntlet", n, p, ..] => (n.to_string(), Some(p.to_string())),
        _ => (parts.join("/"), None),
    }
}

/// `metrics` → figures. The runtime's shape is `{"runs": [{duration_s,
/// workers: [{group, index, …}], groups: {NAME: {…}} or [{group: NAME, …}]}]}`;
/// anything else is flattened as it comes (`a.b.c`, `a[0].b`).
pub fn flatten_metrics(m: &Value) -> Vec<Figure> {
    let mut out = Vec::new();
    match m.get("runs").and_then(Value::as_array) {
        Some(runs) => {
            for (i, run) in runs.iter().enumerate() {
                let prefix = if runs.len() > 1 { format!("run{}.", i + 1) } else { String::new() };
                flatten_run(run, &prefix, &mut out);
            }
        }
        None => leaves(m, "", Level::Run, &mut out),
    }
    out
}

fn flatten_run(run: &Value, prefix: &str, out: &mut Vec<Figure>) {
    let Some(obj) = run.as_object() else { return leaves(run, prefix.trim_end_matches('.'), Level::Run, out) };
    // Groups first: they are the default columns.
    let mut groups: Vec<(String, &Value)> = match obj.get("groups") {
        Some(Value::Object(g)) => g.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Some(Value::Array(g)) => g.iter().enumerate().map(|(i, v)| (owner_name(v, "group", i), v)).collect(),
        _ => Vec::new(),
    };
    let workers: Vec<&Value> = obj.get("workers").and_then(Value::as_array).map(|w| w.iter().collect()).unwrap_or_default();
    // A group without a spread gets one from its workers (same definition
    // as the runtime's: population CV, %).
    for (name, g) in &mut groups {
        leaves(g, &format!("{prefix}{name}"), Level::Group, out);
        for field in ["iterations", "runtime_s", "runtime_ms"] {
            let cv_field = format!("{}_cv_pct", field.trim_end_matches("_s").trim_end_matches("_ms"));
            if g.get(&cv_field).is_some() || out.iter().any(|f| f.key == format!("{prefix}{name}.{cv_field}")) {
                continue;
            }
            let xs: Vec<f64> = workers
                .iter()
                .filter(|w| w.get("group").and_then(Value::as_str) == Some(name.as_str()))
                .filter_map(|w| w.get(field).and_then(Value::as_f64))
                .collect();
            if let Some(cv) = cv(&xs) {
                out.push(Figure { key: format!("{prefix}{name}.{cv_field}"), field: cv_field, level: Level::Group, value: cv * 100.0 });
            }
        }
    }
    for (k, v) in obj {
        if k != "groups" && k != "workers" && !NOT_FIGURES.contains(&k.as_str()) {
            leaves(v, &format!("{prefix}{k}"), Level::Run, out);
        }
    }
    for (i, w) in workers.iter().enumerate() {
        let name = match (w.get("group").and_then(Value::as_str), w.get("index").and_then(Value::as_u64)) {
            (Some(g), Some(ix)) => format!("{g}[{ix}]"),
            _ => format!("workers[{i}]"),
        };
        leaves(w, &format!("{prefix}{name}"), Level::Worker, out);
    }
}

fn owner_name(v: &Value, field: &str, i: usize) -> String {
    v.get(field).and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("{i}"))
}

/// Population coefficient of variation; none below two values or at mean 0.
pub use ktstr_runtime::metrics::cv;

/// Every numeric leaf under `v`, named `{at}.{path}`; strings, booleans
/// and nulls (an absent percentile) are not figures.
fn leaves(v: &Value, at: &str, level: Level, out: &mut Vec<Figure>) {
    let join = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                let field = at.rsplit('.').next().unwrap_or(at).to_string();
                out.push(Figure { key: at.to_string(), field, level, value: x });
            }
        }
        Value::Object(o) => {
            for (k, v) in o {
                if !NOT_FIGURES.contains(&k.as_str()) {
                    leaves(v, &join(k), level, out);
                }
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                leaves(v, &format!("{at}[{i}]"), level, out);
            }
        }
        _ => {}
    }
}

/// Entries grouped by test, in name order.
pub fn by_test(entries: &[Entry]) -> BTreeMap<&str, Vec<&Entry>> {
    let mut m: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        m.entry(e.test.as_str()).or_default().push(e);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_names_lose_prefix_kernel_suffix_and_gauntlet() {
        assert_eq!(split_test_name("ktstr/two_cgroups_share_cpu/kernel_6_12_117", "6.12.117"), ("two_cgroups_share_cpu".into(), None));
        assert_eq!(split_test_name("ktstr/two_cgroups_share_cpu", "6.12.117"), ("two_cgroups_share_cpu".into(), None));
        assert_eq!(split_test_name("ktstr/host_workers_report", "host"), ("host_workers_report".into(), None));
        assert_eq!(
            split_test_name("ktstr/gauntlet/spread/llc2/kernel_path_vmlinuz_6_12_fbc963", "path_vmlinuz-6.12_fbc963"),
            ("spread".into(), Some("llc2".into()))
        );
        assert_eq!(split_test_name("ktstr/gauntlet/spread/llc2", "6.12"), ("spread".into(), Some("llc2".into())));
    }

    #[test]
    fn groups_as_map_or_array_workers_and_run_level_figures() {
        let map_shape = json!({"runs": [{
            "duration_s": 2.0,
            "groups": {"a": {"workers": 2, "runtime_s": 0.8, "iterations": 300}},
            "workers": [
                {"group": "a", "index": 0, "pid": 77, "spinner": true, "runtime_s": 0.5, "iterations": 100, "cpus": "0"},
                {"group": "a", "index": 1, "pid": 78, "spinner": true, "runtime_s": 0.3, "iterations": 200, "cpus": "1"}
            ]
        }]});
        let f = flatten_metrics(&map_shape);
        let get = |k: &str| f.iter().find(|x| x.key == k).map(|x| (x.value, x.level));
        assert_eq!(get("a.runtime_s"), Some((0.8, Level::Group)));
        assert_eq!(get("a.iterations"), Some((300.0, Level::Group)));
        assert_eq!(get("duration_s"), Some((2.0, Level::Run)));
        assert_eq!(get("a[1].iterations"), Some((200.0, Level::Worker)));
        // Derived spread: iterations 100 and 200 → mean 150, sd 50 → 33.3 %.
        let (cv, lvl) = get("a.iterations_cv_pct").unwrap();
        assert!((cv - 100.0 / 3.0).abs() < 1e-9, "{cv}");
        assert_eq!(lvl, Level::Group);
        assert!((get("a.runtime_cv_pct").unwrap().0 - 25.0).abs() < 1e-9);
        // Identity fields, strings and booleans are not figures.
        assert!(f.iter().all(|x| !x.key.ends_with(".pid") && !x.key.ends_with(".index") && !x.key.ends_with(".spinner")));
        assert!(f.iter().all(|x| !x.key.ends_with(".cpus")));
        // Groups come before workers.
        let first_worker = f.iter().position(|x| x.level == Level::Worker).unwrap();
        assert!(f[..first_worker].iter().any(|x| x.key == "a.runtime_s"));

        let array_shape = json!({"runs": [
            {"duration_s": 1.0, "groups": [{"group": "pp", "work": "ping_pong", "wake_p99_us": 41.5, "wake_p50_us": null,
                                             "iterations_cv_pct": 3.0, "hist": {"p90": 7}}],
             "workers": [{"group": "pp", "index": 0, "iterations": 10}, {"group": "pp", "index": 1, "iterations": 30}]},
            {"duration_s": 3.0, "groups": [], "workers": []}
        ]});
        let f = flatten_metrics(&array_shape);
        let keys: Vec<&str> = f.iter().map(|x| x.key.as_str()).collect();
        assert!(keys.contains(&"run1.pp.wake_p99_us"), "{keys:?}");
        assert!(keys.contains(&"run1.pp.hist.p90"), "{keys:?}");
        assert!(keys.contains(&"run2.duration_s"), "{keys:?}");
        assert!(!keys.contains(&"run1.pp.wake_p50_us"), "null is not a figure");
        // The producer's spread wins over a derived one.
        assert_eq!(f.iter().filter(|x| x.key == "run1.pp.iterations_cv_pct").map(|x| x.value).collect::<Vec<_>>(), [3.0]);
        assert_eq!(f.iter().find(|x| x.key == "run1.pp.wake_p99_us").unwrap().field, "wake_p99_us");

        // Scenario steps: how late and how long are figures, clock instants are not.
        let steps = json!({"runs": [{"duration_s": 1.0, "start_ns": 5_000_000_000u64, "groups": [], "workers": [
            {"group": "a", "index": 0, "on_cpu": [{"cpu": 1, "first_ns": 5, "last_ns": 9, "stamps": 40}]}],
            "steps": [{"name": "offline cpu1", "at_ms": 600.0, "start_ns": 5_600_000_000u64, "end_ns": 5_700_000_000u64, "offset_ms": 600.2, "took_ms": 84.5}]}]});
        let keys: Vec<String> = flatten_metrics(&steps).into_iter().map(|x| x.key).collect();
        assert_eq!(keys, ["duration_s", "steps[0].at_ms", "steps[0].offset_ms", "steps[0].took_ms", "a[0].on_cpu[0].stamps"]);

        // Not the runtime's shape: flattened as it comes.
        let f = flatten_metrics(&json!({"x": {"y": [1, 2]}}));
        assert_eq!(f.iter().map(|x| (x.key.as_str(), x.value)).collect::<Vec<_>>(), [("x.y[0]", 1.0), ("x.y[1]", 2.0)]);
        assert!(flatten_metrics(&json!({})).is_empty());
    }

    #[test]
    fn cv_matches_the_runtime_definition() {
        assert_eq!(cv(&[1.0]), None);
        assert_eq!(cv(&[0.0, 0.0]), None);
        assert!((cv(&[2.0, 4.0]).unwrap() - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn newest_run_and_named_runs() {
        let t = tempfile::tempdir().unwrap();
        let mk = |run: &str, rel: &str| {
            let d = t.path().join(run).join(rel);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("result.json"), "{}").unwrap();
        };
        mk("zzz-old", "ktstr__a/kernel_1");
        std::thread::sleep(std::time::Duration::from_millis(20));
        mk("aaa-new", "ktstr__a/kernel_1/repeat_2");
        std::fs::create_dir_all(t.path().join("empty-run")).unwrap();
        assert_eq!(pick_run(t.path(), None).unwrap(), t.path().join("aaa-new"));
        assert_eq!(pick_run(t.path(), Some("zzz-old")).unwrap(), t.path().join("zzz-old"));
        let e = pick_run(t.path(), Some("nope")).unwrap_err().to_string();
        assert!(e.contains("\"nope\" not found under"), "{e}");
        assert_eq!(result_files(&t.path().join("aaa-new")), [t.path().join("aaa-new/ktstr__a/kernel_1/repeat_2/result.json")]);
        let e = pick_run(&t.path().join("missing"), None).unwrap_err().to_string();
        assert!(e.contains("no run artifacts at"), "{e}");
        let e = pick_run(&t.path().join("empty-run"), None).unwrap_err().to_string();
        assert!(e.contains("no result.json under"), "{e}");
    }

    #[test]
    fn entry_fields_and_schema_check() {
        let v = json!({"schema": 1, "test": "ktstr/x/kernel_6_12", "kernel": {"label": "6.12", "image": null, "release": ""},
                       "outcome": "pass", "repeat": {"index": 2, "count": 3},
                       "metrics": {"runs": [{"duration_s": 1.0, "groups": {}, "workers": []}]}});
        let e = entry(Path::new("/r/ktstr__x/kernel_6_12/repeat_2/result.json"), &v).unwrap();
        assert_eq!((e.test.as_str(), e.kernel.as_str(), e.repeat, e.outcome.as_str()), ("x", "6.12", Some(2), "pass"));
        assert_eq!(e.figures.len(), 1);
        let mut v2 = v.clone();
        v2["kernel"]["label"] = json!("");
        let e = entry(Path::new("/r/ktstr__x/kernel_unresolved/repeat_2/result.json"), &v2).unwrap();
        assert_eq!(e.kernel, "kernel_unresolved");
        v2["schema"] = json!(2);
        let err = entry(Path::new("/r/result.json"), &v2).unwrap_err().to_string();
        assert!(err.contains("schema Some(2)") && err.contains("schema 1"), "{err}");
    }
}
