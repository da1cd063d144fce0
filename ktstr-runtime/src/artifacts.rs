//! Run artifacts (design.md "Run artifacts"): every test run leaves
//! `{artifacts}/{run}/{test}/{kernel}/` holding `result.json`,
//! `console.log` (the whole guest console) and `output.log` (the body's
//! stdout/stderr, lines tagged by stream).
//!
//! `{artifacts}`: `$KTSTR_ARTIFACT_DIR`; else `{target}/ktstr`, where
//! `{target}` is the cargo target directory holding this test binary
//! (the nearest ancestor with cargo's `CACHEDIR.TAG`, else the parent of
//! `{profile}/deps/`), else an absolute `$CARGO_TARGET_DIR`; a binary
//! outside any target dir (an exported `.run`, a copied binary) uses
//! `$XDG_CACHE_HOME/ktstr/artifacts` (`~/.cache/ktstr/artifacts`).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::output::Chunk;
use crate::verdict::Outcome;

pub const DIR_ENV: &str = "KTSTR_ARTIFACT_DIR";
/// Set by `cargo ktstr test --repeat N`: one `{run}` for all N nextest runs.
pub const RUN_ID_ENV: &str = "KTSTR_RUN_ID";
/// Set by `cargo ktstr test --repeat N` to `i/N` for the i-th nextest run.
pub const REPEAT_ENV: &str = "KTSTR_REPEAT";
pub const SCHEMA: u32 = 1;

/// `{artifacts}` for this process.
pub fn root() -> PathBuf {
    root_from(&|k| std::env::var_os(k), std::env::current_exe().ok().as_deref())
}

/// `{artifacts}` given an environment lookup and the test binary's path.
pub fn root_from(env: &dyn Fn(&str) -> Option<OsString>, exe: Option<&Path>) -> PathBuf {
    if let Some(d) = env(DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(t) = exe.and_then(target_dir_of) {
        return t.join("ktstr");
    }
    // Relative, it would be relative to cargo's directory, not ours.
    if let Some(t) = env("CARGO_TARGET_DIR").map(PathBuf::from).filter(|p| p.is_absolute()) {
        return t.join("ktstr");
    }
    let cache = match env("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(env("HOME").filter(|v| !v.is_empty()).unwrap_or_else(|| "/".into())).join(".cache"),
    };
    cache.join("ktstr").join("artifacts")
}

/// The cargo target directory a binary was built into.
fn target_dir_of(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    if let Some(t) = dir.ancestors().find(|a| a.join("CACHEDIR.TAG").is_file()) {
        return Some(t.to_path_buf());
    }
    // `{target}/{profile}/deps/{bin}` (nextest and cargo test run it there).
    (dir.file_name()? == "deps").then(|| dir.parent()?.parent().map(Path::to_path_buf)).flatten()
}

/// `{run}`: `$KTSTR_RUN_ID` (`cargo ktstr test --repeat`), else nextest's
/// run id, else a UTC timestamp taken once per process (so every test of
/// one `cargo test` process shares it).
pub fn run_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| run_id_from(std::env::var(RUN_ID_ENV).ok(), std::env::var("NEXTEST_RUN_ID").ok(), SystemTime::now()))
        .clone()
}

pub fn run_id_from(ktstr: Option<String>, nextest: Option<String>, now: SystemTime) -> String {
    let ok = |v: &String| !v.is_empty() && !v.contains('/') && v != "." && v != "..";
    match ktstr.filter(ok).or(nextest.filter(ok)) {
        Some(id) => id,
        None => utc_stamp(now),
    }
}

/// Which of `cargo ktstr test --repeat N`'s nextest runs this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepeatJson {
    /// 1-based.
    pub index: u32,
    pub count: u32,
}

/// `$KTSTR_REPEAT` (`i/N`, 1 ≤ i ≤ N); none when unset or malformed.
pub fn repeat() -> Option<RepeatJson> {
    parse_repeat(std::env::var(REPEAT_ENV).ok().as_deref())
}

pub fn parse_repeat(v: Option<&str>) -> Option<RepeatJson> {
    let (i, n) = v?.split_once('/')?;
    let (index, count) = (i.trim().parse().ok()?, n.trim().parse().ok()?);
    (1..=count).contains(&index).then_some(RepeatJson { index, count })
}

/// `20260101T020304.123Z`: sortable, no `:` (awkward in paths).
pub fn utc_stamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// `{test}`: the test's name (without a kernel suffix) with `/` → `__`.
pub fn test_component(name: &str) -> String {
    name.replace('/', "__")
}

/// The directory of one run of one test on one kernel (`"host"` for a
/// run on the host); the i-th of `--repeat N` runs in `repeat_{i}` below it.
pub fn dir(root: &Path, run: &str, test: &str, kernel: &str, repeat: Option<RepeatJson>) -> PathBuf {
    let d = root.join(run).join(test_component(test)).join(kernel);
    match repeat {
        Some(r) => d.join(format!("repeat_{}", r.index)),
        None => d,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelJson {
    /// The producer's label (`6.12.9`), `"host"` for a run on the host.
    pub label: String,
    /// The image booted; null on the host.
    pub image: Option<String>,
    /// `uname -r` where the body ran; empty when it never ran.
    pub release: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimingsJson {
    /// VM setup (memory, image load, process spawn); null on the host.
    pub setup_s: Option<f64>,
    /// First guest instruction to `/init` on the data channel; null when it never got there.
    pub to_init_s: Option<f64>,
    /// The VM's whole life; null on the host.
    pub vm_total_s: Option<f64>,
    /// The whole run as the host saw it (kernel lookup, initramfs, VM or body).
    pub wall_s: f64,
    /// Share of the vCPUs' time the host kept them waiting for a CPU
    /// (TCG only, `vmm::host_wait`); absent where not measured.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vcpu_wait_pct: Option<f64>,
    /// VM start to the guest's "running NAME" line (cold boot or restore);
    /// absent on the host or when the body never started.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub to_body_s: Option<f64>,
}

/// `result.json`, schema 1. New fields may be added; these keep their meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultJson {
    pub schema: u32,
    /// The name nextest ran (`ktstr/NAME[/kernel_x]`).
    pub test: String,
    pub kernel: KernelJson,
    /// `kvm`, `qemu-tcg`, `host`, or `none` when no VM started.
    pub backend: String,
    /// `{numa_nodes, llcs, cores, threads, cpus, memory_mib}`; null on the host.
    pub topology: Option<serde_json::Value>,
    /// The sched_ext scheduler's name; null for the kernel's default.
    pub scheduler: Option<String>,
    pub outcome: Outcome,
    /// One-line first cause of a non-pass (`crate::cause`); empty for a pass.
    pub cause: String,
    pub message: String,
    /// The verdict's details (console tail, scheduler state); empty when none.
    #[serde(default)]
    pub details: String,
    pub timings: TimingsJson,
    /// `{"runs": [Report::metrics, ...]}` from the body's `ctx.run` calls;
    /// `{}` when the body reported none (or never ran).
    pub metrics: serde_json::Value,
    /// `{"index": i, "count": N}` under `cargo ktstr test --repeat N`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat: Option<RepeatJson>,
    /// How the VM started: `{"kind": "cold"}`, `{"kind": "restored",
    /// "created": bool}` (from a VM snapshot), `{"kind": "fallback",
    /// "reason": …}` (snapshots on, booted cold); absent on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<serde_json::Value>,
}

/// Writes `result.json`, `console.log` (when there is a console) and
/// `output.log` into `dir`, each atomically (temp file + rename).
pub fn write(dir: &Path, result: &ResultJson, console: Option<&str>, output: &[Chunk]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if let Some(c) = console {
        write_atomic(&dir.join("console.log"), c.as_bytes())?;
    }
    write_atomic(&dir.join("output.log"), crate::output::render_log(output).as_bytes())?;
    let mut json = serde_json::to_vec_pretty(result).map_err(std::io::Error::other)?;
    json.push(b'\n');
    // Last: a reader that sees result.json sees the logs too.
    write_atomic(&dir.join("result.json"), &json)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    // tempfile creates 0600; artifacts are ordinary files.
    tmp.as_file().set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn root_prefers_the_env_then_the_binary_s_target_dir() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        let deps = target.join("debug/deps");
        std::fs::create_dir_all(&deps).unwrap();
        let exe = deps.join("examples-0123");
        let e = env(&[(DIR_ENV, "/art"), ("CARGO_TARGET_DIR", "/ct"), ("HOME", "/home/u")]);
        assert_eq!(root_from(&e, Some(&exe)), PathBuf::from("/art"));
        // Without CACHEDIR.TAG: the parent of {profile}/deps.
        let e = env(&[("CARGO_TARGET_DIR", "/ct"), ("HOME", "/home/u")]);
        assert_eq!(root_from(&e, Some(&exe)), target.join("ktstr"));
        // With it: that directory, also for {target}/{triple}/{profile}/deps.
        let cross = target.join("x86_64-unknown-linux-gnu/release/deps");
        std::fs::create_dir_all(&cross).unwrap();
        std::fs::write(target.join("CACHEDIR.TAG"), "Signature: 8a477f597d28d172789f06886806bc55").unwrap();
        assert_eq!(root_from(&e, Some(&cross.join("x"))), target.join("ktstr"));
        // Outside a target dir: an absolute CARGO_TARGET_DIR, else the user cache.
        let loose = t.path().join("run-xyz/testbin");
        assert_eq!(root_from(&e, Some(&loose)), PathBuf::from("/ct/ktstr"));
        let e = env(&[("CARGO_TARGET_DIR", "rel/target"), ("HOME", "/home/u")]);
        assert_eq!(root_from(&e, Some(&loose)), PathBuf::from("/home/u/.cache/ktstr/artifacts"));
        let e = env(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")]);
        assert_eq!(root_from(&e, None), PathBuf::from("/xdg/ktstr/artifacts"));
    }

    #[test]
    fn run_ids_and_paths() {
        let t = UNIX_EPOCH + Duration::from_millis(1_767_232_984_123); // 2026-01-01 02:03:04.123 UTC
        assert_eq!(utc_stamp(t), "20260101T020304.123Z");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "20000229T000000.000Z");
        assert_eq!(run_id_from(None, Some("a1b2-c3".into()), t), "a1b2-c3");
        assert_eq!(run_id_from(Some("rep".into()), Some("a1b2-c3".into()), t), "rep", "--repeat's id wins");
        assert_eq!(run_id_from(Some("".into()), Some("a1b2-c3".into()), t), "a1b2-c3");
        assert_eq!(run_id_from(None, None, t), "20260101T020304.123Z");
        assert_eq!(run_id_from(Some("..".into()), Some("../x/y".into()), t), "20260101T020304.123Z", "never a path");
        assert_eq!(
            dir(Path::new("/a"), "r1", "ktstr/two_cgroups_share_cpu", "kernel_6_12_9", None),
            PathBuf::from("/a/r1/ktstr__two_cgroups_share_cpu/kernel_6_12_9")
        );
        let r2 = parse_repeat(Some("2/3"));
        assert_eq!(r2, Some(RepeatJson { index: 2, count: 3 }));
        assert_eq!(dir(Path::new("/a"), "r1", "ktstr/x", "host", r2), PathBuf::from("/a/r1/ktstr__x/host/repeat_2"));
        for bad in [None, Some(""), Some("3"), Some("0/3"), Some("4/3"), Some("a/3"), Some("1/")] {
            assert_eq!(parse_repeat(bad), None, "{bad:?}");
        }
        assert_eq!(test_component("gauntlet/x/preset"), "gauntlet__x__preset");
    }

    fn sample() -> ResultJson {
        ResultJson {
            schema: SCHEMA,
            test: "ktstr/x/kernel_6_12".into(),
            kernel: KernelJson { label: "6.12".into(), image: Some("/k/bzImage".into()), release: "6.12.9".into() },
            backend: "qemu-tcg".into(),
            topology: Some(serde_json::json!({"numa_nodes": 1, "llcs": 1, "cores": 2, "threads": 1, "cpus": 2, "memory_mib": 512})),
            scheduler: None,
            outcome: Outcome::Fail,
            cause: "Kernel panic - not syncing: x".into(),
            message: "the guest kernel panicked".into(),
            details: String::new(),
            timings: TimingsJson { setup_s: Some(0.1), to_init_s: None, vm_total_s: Some(1.5), wall_s: 2.0, vcpu_wait_pct: None, to_body_s: None },
            metrics: serde_json::json!({}),
            repeat: None,
            start: Some(serde_json::json!({"kind": "cold"})),
        }
    }

    #[test]
    fn schema_1_fields_and_atomic_files() {
        let r = sample();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for k in ["schema", "test", "kernel", "backend", "topology", "scheduler", "outcome", "cause", "message", "timings", "metrics"] {
            assert!(v.get(k).is_some(), "result.json lacks {k}: {v}");
        }
        assert_eq!(v["schema"], 1);
        assert_eq!(v["outcome"], "fail");
        for k in ["label", "image", "release"] {
            assert!(v["kernel"].get(k).is_some(), "kernel.{k}");
        }
        assert!(v["metrics"].is_object());

        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("r/ktstr__x/kernel_6_12");
        let out = [Chunk { stream: crate::output::Stream::Stdout, bytes: b"hi\n".to_vec() }];
        write(&d, &r, Some("[    0.1] booted\n"), &out).unwrap();
        let back: ResultJson = serde_json::from_slice(&std::fs::read(d.join("result.json")).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(v.get("repeat").is_none(), "absent unless repeating");
        let rep = ResultJson { repeat: parse_repeat(Some("1/2")), ..r.clone() };
        assert_eq!(serde_json::to_value(&rep).unwrap()["repeat"], serde_json::json!({"index": 1, "count": 2}));
        assert_eq!(std::fs::read_to_string(d.join("console.log")).unwrap(), "[    0.1] booted\n");
        assert_eq!(std::fs::read_to_string(d.join("output.log")).unwrap(), "[stdout] hi\n");
        // Rewriting replaces whole files and leaves no temp files behind.
        write(&d, &r, None, &[]).unwrap();
        let names: Vec<String> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(std::fs::read_to_string(d.join("output.log")).unwrap(), "");
        // A directory that cannot be made is an error, not a panic.
        std::fs::write(t.path().join("file"), "").unwrap();
        assert!(write(&t.path().join("file/sub"), &r, None, &[]).is_err());
    }
}
