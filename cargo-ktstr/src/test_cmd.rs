//! `cargo ktstr test`: resolve every `--kernel`, export the hand-off env
//! vars of design.md, then replace this process with `cargo nextest run`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use kernel_build::{KernelSpec, Options, ResolvedKernel};

const EXAMPLES: &str = "\
Examples:
  cargo ktstr test                                   # kernel found by discovery (cache, ./linux, /boot)
  cargo ktstr test --kernel 6.12                     # newest 6.12.x, built once and cached
  cargo ktstr test --kernel 6.12 --kernel ../linux   # every VM test once per kernel
  cargo ktstr test --kernel 6.10..6.12 -- -E 'test(kernel_6_11)'
  cargo ktstr test -p my-sched-tests --release -- --no-fail-fast --retries 2
  cargo ktstr test --offline --kernel 6.12              # newest cached 6.12.x, no network
  cargo ktstr test --kernel 6.12 --kernel ../linux --repeat 3 && cargo ktstr stats --compare 6.12 linux
  cargo ktstr test --kernel 6.12 --gauntlet                 # every test on every topology preset
  cargo ktstr test --kernel 6.12 --gauntlet tiny llc2 -- -E 'test(topology_matches_request)'
  cargo ktstr test --archive suite.tar.zst --partition count:2/4   # a share of a `cargo ktstr archive`

Everything after `--` goes to `cargo nextest run` untouched.
Environment: KTSTR_KERNEL_PARALLELISM (kernels resolved at once, default: CPU count),
KTSTR_CACHE_DIR, KTSTR_KERNEL_MIRROR, KTSTR_OFFLINE, KTSTR_REMOTE_CACHE (docs/ci.md).";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct TestArgs {
    /// Kernel to test against (repeatable): VERSION, RANGE, TARBALL, git+URL#REF, PATH or CACHE-KEY.
    #[arg(long = "kernel", value_name = "SPEC")]
    pub kernels: Vec<String>,
    /// Build the test binaries in release mode.
    #[arg(long)]
    pub release: bool,
    /// Package(s) whose tests to run (repeatable).
    #[arg(short = 'p', long = "package", value_name = "PKG")]
    pub packages: Vec<String>,
    /// Mirror base URL for version and range specs.
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// Run the whole nextest run N times, all N in one artifacts run
    /// (`cargo ktstr stats` shows their median and spread).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Run the gauntlet: each VM test's topology variants (`gauntlet/{test}/{preset}`,
    /// ignored otherwise) on every preset, or only on the PRESETs named
    /// (space- or comma-separated). A `-E` filter among the nextest
    /// arguments narrows it further.
    #[arg(long, value_name = "PRESET", num_args = 0.., value_delimiter = ',')]
    pub gauntlet: Option<Vec<String>>,
    /// Run the tests of a `cargo ktstr archive` file (no sources, cargo or
    /// kernel build needed); conflicts with --kernel, -p and --release.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernels", "packages", "release", "repeat"])]
    pub archive: Option<PathBuf>,
    /// nextest partition of the archive's tests, e.g. `count:2/4` or `hash:1/3`.
    #[arg(long, value_name = "PART", requires = "archive")]
    pub partition: Option<String>,
    /// Print the environment and the nextest command instead of running it.
    #[arg(long, hide = true)]
    pub print_env: bool,
    #[command(flatten)]
    pub common: crate::kernel_cmd::CommonArgs,
    /// Arguments for `cargo nextest run`.
    #[arg(last = true, value_name = "NEXTEST ARGS", allow_hyphen_values = true)]
    pub nextest_args: Vec<String>,
}

/// The env vars handed to the test binaries, from resolved kernels in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelEnv {
    /// `KTSTR_KERNEL`: the first kernel.
    pub kernel: Option<PathBuf>,
    /// `KTSTR_KERNEL_LIST`: `label=path;…`, only with two or more kernels.
    pub list: Option<String>,
}

// The runtime's own sanitizer: two labels that would collide as test-name
// suffixes are caught before nextest starts.
use kernel_build::label::sanitize;

/// One resolved kernel as the hand-off sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub spec: String,
    pub label: String,
    pub image: PathBuf,
    /// What tells it apart: its cache key, else its image path.
    pub id: String,
}

impl Handoff {
    pub fn of(spec: &str, k: &ResolvedKernel) -> Handoff {
        Handoff {
            spec: spec.to_string(),
            label: k.label.clone(),
            image: k.image.clone(),
            id: k.cache_key.clone().unwrap_or_else(|| k.image.display().to_string()),
        }
    }
}

/// Resolved kernels → env vars (see [`unique_kernels`]).
pub fn kernel_env(kernels: &[Handoff]) -> Result<KernelEnv> {
    let uniq = unique_kernels(kernels)?;
    let mut env = KernelEnv { kernel: uniq.first().map(|k| k.image.clone()), list: None };
    if uniq.len() >= 2 {
        env.list = Some(uniq.iter().map(|k| format!("{}={}", k.label, k.image.display())).collect::<Vec<_>>().join(";"));
    }
    Ok(env)
}

/// The kernels a run exports, in order: the same image named twice
/// collapses; distinct kernels whose labels sanitize alike each get
/// `_{hash6}` of their id (design.md: labels are unique within one run).
pub fn unique_kernels(kernels: &[Handoff]) -> Result<Vec<Handoff>> {
    let mut distinct: Vec<Handoff> = Vec::new();
    for k in kernels {
        if !distinct.iter().any(|u| u.image == k.image) {
            distinct.push(k.clone());
        }
    }
    let clashing: Vec<bool> =
        distinct.iter().map(|k| distinct.iter().filter(|u| sanitize(&u.label) == sanitize(&k.label)).count() > 1).collect();
    for (k, clash) in distinct.iter_mut().zip(clashing) {
        if clash {
            k.label = kernel_build::label::with_hash6(&k.label, &k.id);
        }
    }
    let mut uniq: Vec<&Handoff> = Vec::new();
    for k in &distinct {
        if let Some(prev) = uniq.iter().find(|u| sanitize(&u.label) == sanitize(&k.label)) {
            bail!(
                "--kernel {} and --kernel {} both get the test-name suffix {} (labels {:?} and {:?}); drop one of them",
                prev.spec,
                k.spec,
                sanitize(&k.label),
                prev.label,
                k.label
            );
        }
        for (what, s) in [("label", &k.label), ("image path", &k.image.to_string_lossy().into_owned())] {
            if s.contains(';') || (what == "label" && s.contains('=')) {
                bail!("--kernel {}: {what} {s:?} contains `;` or `=`, which KTSTR_KERNEL_LIST cannot carry", k.spec);
            }
        }
        uniq.push(k);
    }
    Ok(uniq.into_iter().cloned().collect())
}

/// `KTSTR_KERNEL_PARALLELISM`, else the CPU count.
pub fn parallelism() -> Result<usize> {
    match std::env::var("KTSTR_KERNEL_PARALLELISM") {
        Ok(v) if !v.is_empty() => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("KTSTR_KERNEL_PARALLELISM={v:?} is not a positive integer"),
        },
        _ => Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    }
}

/// Resolves every spec on at most `parallelism` threads, keeping the
/// command-line order. The first failure is returned as one line naming
/// its spec; the caller exits without waiting for other builds.
pub fn resolve_all(specs: &[String], opts: &Options, parallelism: usize) -> Result<Vec<(String, ResolvedKernel)>> {
    // Parse everything first: a typo must not wait behind a kernel build.
    for s in specs {
        KernelSpec::parse(s).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let all = specs;
    let (unique, slot_of) = dedupe(all);
    let specs: Arc<Vec<String>> = Arc::new(unique);
    let next = Arc::new(AtomicUsize::new(0));
    type Resolved = Result<Vec<ResolvedKernel>, String>;
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Resolved)>();
    // Detached workers: on the first failure we return (and exit) without
    // waiting for the other builds.
    for _ in 0..parallelism.min(specs.len()).max(1) {
        let (specs, next, tx, opts) = (specs.clone(), next.clone(), tx.clone(), opts.clone());
        std::thread::spawn(move || loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(spec) = specs.get(i) else { return };
            let r = kernel_build::resolve(spec, &opts).map_err(|e| kernel_build::one_line(&format!("{e:#}")));
            if tx.send((i, r)).is_err() {
                return;
            }
        });
    }
    drop(tx);
    let mut slots: Vec<Option<Vec<ResolvedKernel>>> = specs.iter().map(|_| None).collect();
    for _ in 0..specs.len() {
        let (i, r) = rx.recv().map_err(|_| anyhow::anyhow!("a kernel resolver thread died"))?;
        match r {
            Ok(ks) => slots[i] = Some(ks),
            Err(e) => {
                let spec = &specs[i];
                bail!("kernel {spec:?}: {}", e.strip_prefix(&format!("invalid kernel spec {spec:?}: ")).unwrap_or(&e));
            }
        }
    }
    Ok(all
        .iter()
        .zip(slot_of)
        .flat_map(|(spec, j)| slots[j].clone().expect("every spec reported").into_iter().map(move |k| (spec.clone(), k)))
        .collect())
}

/// What makes two specs the same kernel before resolving: a path by its
/// canonical form (`../linux` and `$PWD/../linux` are one tree, built
/// once), anything else by its text.
fn identity(spec: &str) -> String {
    match KernelSpec::parse(spec) {
        Ok(KernelSpec::Path(p)) => match p.canonicalize() {
            Ok(c) => format!("path:{}", c.display()),
            Err(_) => spec.to_string(),
        },
        _ => spec.to_string(),
    }
}

/// The specs to resolve (first of each identity, in order) and, for every
/// given spec, the index of the one that resolves it.
fn dedupe(specs: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut ids: Vec<String> = Vec::new();
    let mut unique = Vec::new();
    let mut slot_of = Vec::new();
    for s in specs {
        let id = identity(s);
        match ids.iter().position(|u| *u == id) {
            Some(j) => slot_of.push(j),
            None => {
                ids.push(id);
                unique.push(s.clone());
                slot_of.push(unique.len() - 1);
            }
        }
    }
    (unique, slot_of)
}

/// Where cargo looks for `cargo-nextest`: PATH, then `$CARGO_HOME/bin`.
pub fn find_nextest() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    dirs.extend(cargo_home.map(|h| h.join("bin")));
    dirs.into_iter().map(|d| d.join("cargo-nextest")).find(|p| is_executable(p))
}

/// [`find_nextest`], or the error saying how to install it.
pub fn require_nextest() -> Result<PathBuf> {
    find_nextest().ok_or_else(|| anyhow!("cargo-nextest is not installed; install it with: cargo install cargo-nextest --locked"))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The cargo that invoked us (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").filter(|c| !c.is_empty()).unwrap_or_else(|| "cargo".into())
}

/// A shared lock on each cache entry that survives `exec`, so nextest (and
/// every test it runs) keeps `kernel clean` off the images until it exits.
fn inherit_entry_locks(kernels: &[(String, ResolvedKernel)]) -> Result<()> {
    use std::os::fd::IntoRawFd;
    for (_, k) in kernels {
        if k.cache_key.is_none() {
            continue;
        }
        let path = kernel_build::cache::entry_lock_path(&k.dir);
        let f = std::fs::OpenOptions::new().read(true).open(&path)?;
        let fd = f.into_raw_fd();
        // SAFETY: fd is ours and open; flock/fcntl have no memory effects.
        unsafe {
            // We already hold a shared lock through `k.lock`, so this cannot block on a writer.
            if libc::flock(fd, libc::LOCK_SH) != 0 {
                bail!("locking {}: {}", path.display(), std::io::Error::last_os_error());
            }
            let flags = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
        }
    }
    Ok(())
}

/// The `cargo nextest run …` argument list (after the cargo binary).
pub fn nextest_argv(args: &TestArgs) -> Vec<String> {
    let mut v = vec!["nextest".to_string(), "run".to_string()];
    if args.release {
        v.push("--release".into());
    }
    for p in &args.packages {
        v.push("-p".into());
        v.push(p.clone());
    }
    match &args.gauntlet {
        Some(presets) => v.extend(gauntlet_args(presets, &args.nextest_args)),
        None => v.extend(args.nextest_args.iter().cloned()),
    }
    v
}

/// The nextest filterset of the gauntlet variants on `presets` (all of
/// them when empty); names are checked by [`ktstr_runtime::preset::resolve`].
pub fn gauntlet_filter(presets: &[String]) -> String {
    if presets.is_empty() {
        return "test(/^gauntlet\\//)".into();
    }
    // gauntlet/{test}/{preset}, then a kernel suffix in multi-kernel mode.
    format!("test(/^gauntlet\\/[^\\/]+\\/({})(\\/kernel_[a-z0-9_]+)?$/)", presets.join("|"))
}

/// `--gauntlet`: nextest's ignored-test selection (`--run-ignored only`)
/// with one `-E` that is the gauntlet filter AND the user's own `-E`s
/// (several `-E`s are a union in nextest, so they are folded into one).
/// Every other argument passes through in order.
pub fn gauntlet_args(presets: &[String], nextest_args: &[String]) -> Vec<String> {
    let mut user = Vec::new();
    let mut rest = Vec::new();
    let mut it = nextest_args.iter();
    let mut ignored_given = false;
    while let Some(a) = it.next() {
        if a == "--" {
            rest.push(a.clone());
            rest.extend(it.by_ref().cloned());
            break;
        }
        match a.as_str() {
            "-E" | "--filterset" | "--filter-expr" => user.extend(it.next().cloned()),
            _ if a.starts_with("--filterset=") || a.starts_with("--filter-expr=") => {
                user.push(a.split_once('=').map(|(_, v)| v.to_string()).unwrap_or_default())
            }
            _ if a.starts_with("-E") && a.len() > 2 => user.push(a[2..].trim_start_matches('=').to_string()),
            _ => {
                ignored_given |= a == "--run-ignored" || a.starts_with("--run-ignored=");
                rest.push(a.clone());
            }
        }
    }
    let mut expr = gauntlet_filter(presets);
    if !user.is_empty() {
        let ors: Vec<String> = user.iter().map(|u| format!("({u})")).collect();
        expr = format!("{expr} and ({})", ors.join(" or "));
    }
    let mut v = Vec::new();
    if !ignored_given {
        v.extend(["--run-ignored".to_string(), "only".to_string()]);
    }
    v.extend(["-E".to_string(), expr]);
    v.extend(rest);
    v
}

/// The artifacts run id shared by the N nextest runs of `--repeat N`:
/// the runtime's UTC stamp (sortable, no `:`), with `-rN` so the
/// directory says what it holds.
pub fn repeat_run_id(now: std::time::SystemTime, n: u32) -> String {
    format!("{}-r{n}", ktstr_runtime::artifacts::utc_stamp(now))
}

/// nextest's exit code when tests failed (the run itself worked).
const NEXTEST_TESTS_FAILED: i32 = 100;

/// `--repeat N`: nextest N times with one artifacts run id. A repeat whose
/// tests failed does not stop the rest (their figures still count); any
/// other failure (build, bad arguments, a signal) does. Returns the first
/// non-zero exit code.
fn run_repeated(cmd: &mut Command, n: u32, id: &str) -> Result<i32> {
    let mut first_bad = 0;
    for i in 1..=n {
        eprintln!("ktstr: repeat {i}/{n} (artifacts run {id})");
        cmd.env("KTSTR_RUN_ID", id).env("KTSTR_REPEAT", format!("{i}/{n}"));
        let st = cmd.status().map_err(|e| anyhow::anyhow!("running {} nextest run: {e}", cargo().to_string_lossy()))?;
        match st.code() {
            Some(0) => {}
            Some(NEXTEST_TESTS_FAILED) => {
                if first_bad == 0 {
                    first_bad = NEXTEST_TESTS_FAILED;
                }
            }
            code => {
                eprintln!("ktstr: nextest ended with {st} in repeat {i}/{n}; the remaining repeats are not run");
                return Ok(code.unwrap_or(1));
            }
        }
    }
    eprintln!("ktstr: {n} repeats done; `cargo ktstr stats {id}` shows their median and spread");
    Ok(first_bad)
}

pub fn run(args: TestArgs) -> Result<i32> {
    if let Some(p) = &args.gauntlet {
        ktstr_runtime::preset::resolve(p).map_err(|e| anyhow::anyhow!("--gauntlet: {e}"))?;
    }
    let mut opts = Options { mirror: args.mirror.clone(), ..Options::default() };
    args.common.apply(&mut opts)?;
    if let Some(file) = &args.archive {
        let nextest_args = match &args.gauntlet {
            Some(presets) => gauntlet_args(presets, &args.nextest_args),
            None => args.nextest_args.clone(),
        };
        return crate::archive_cmd::run_archive(file, args.partition.as_deref(), nextest_args, &opts, args.print_env);
    }
    let kernels = if args.kernels.is_empty() { Vec::new() } else { resolve_all(&args.kernels, &opts, parallelism()?)? };
    let handoff: Vec<Handoff> = kernels.iter().map(|(s, k)| Handoff::of(s, k)).collect();
    let env = kernel_env(&handoff)?;

    let mut cmd = Command::new(cargo());
    cmd.args(nextest_argv(&args));
    if let Some(k) = &env.kernel {
        if std::env::var_os("KTSTR_TEST_KERNEL").is_some() {
            eprintln!("ktstr: note: --kernel given, so KTSTR_TEST_KERNEL from the environment is ignored");
        }
        cmd.env("KTSTR_KERNEL", k).env_remove("KTSTR_TEST_KERNEL");
        match &env.list {
            Some(l) => cmd.env("KTSTR_KERNEL_LIST", l),
            // A stale list from the caller's environment would override our single kernel.
            None => cmd.env_remove("KTSTR_KERNEL_LIST"),
        };
    }
    let repeat_id = (args.repeat > 1).then(|| repeat_run_id(std::time::SystemTime::now(), args.repeat));
    // A stale KTSTR_REPEAT from the caller would file a single run as a repeat.
    cmd.env_remove("KTSTR_REPEAT");
    if args.print_env {
        if let Some(id) = &repeat_id {
            println!("KTSTR_RUN_ID={id}");
            println!("KTSTR_REPEAT=1/{}..{}/{}", args.repeat, args.repeat, args.repeat);
        }
        if let Some(k) = &env.kernel {
            println!("KTSTR_KERNEL={}", k.display());
        }
        if let Some(l) = &env.list {
            println!("KTSTR_KERNEL_LIST={l}");
        }
        println!("exec: {} {}", cargo().to_string_lossy(), nextest_argv(&args).join(" "));
        std::process::exit(0);
    }
    require_nextest()?;
    inherit_entry_locks(&kernels)?;
    if let Some(id) = &repeat_id {
        // Not exec: we come back for the next repeat (and keep the cache locks).
        return run_repeated(&mut cmd, args.repeat, id);
    }
    let err = cmd.exec();
    bail!("running {} nextest run: {err}", cargo().to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_tree_named_two_ways_resolves_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("work")).unwrap();
        std::fs::create_dir_all(d.path().join("linux")).unwrap();
        let abs = d.path().join("linux").to_string_lossy().into_owned();
        let dotted = format!("{}/work/../linux/", d.path().display());
        let specs: Vec<String> = vec![abs.clone(), "6.12".into(), dotted, "6.12".into(), "/no/such/dir".into()];
        let (unique, slot_of) = dedupe(&specs);
        assert_eq!(unique, [abs, "6.12".to_string(), "/no/such/dir".into()]);
        assert_eq!(slot_of, [0, 1, 0, 1, 2]);
    }

    #[test]
    fn env_from_kernels() {
        let k = |s: &str, l: &str, p: &str| Handoff { spec: s.into(), label: l.into(), image: p.into(), id: p.into() };
        assert_eq!(kernel_env(&[]).unwrap(), KernelEnv::default());
        let one = kernel_env(&[k("6.12", "6.12.9", "/c/a/bzImage")]).unwrap();
        assert_eq!(one, KernelEnv { kernel: Some("/c/a/bzImage".into()), list: None });
        let two = kernel_env(&[k("6.12", "6.12.9", "/c/a/bzImage"), k("../linux", "path_linux_abc123_dirty", "/l/bzImage")])
            .unwrap();
        assert_eq!(two.kernel, Some("/c/a/bzImage".into()));
        assert_eq!(two.list.as_deref(), Some("6.12.9=/c/a/bzImage;path_linux_abc123_dirty=/l/bzImage"));
        // The same kernel named twice collapses to single-kernel mode.
        let dup = kernel_env(&[k("6.12", "6.12.9", "/c/a/bzImage"), k("6.12.9", "6.12.9", "/c/a/bzImage")]).unwrap();
        assert_eq!(dup.list, None);
        // Two kernels that would share a label each get `_{hash6}` of their id.
        let h6 = |id: &str| kernel_build::label::with_hash6("", id);
        let two = kernel_env(&[k("a.tar.xz", "6.12.9", "/c/a/bzImage"), k("b.tar.xz", "6.12.9", "/c/b/bzImage"), k("6.11", "6.11.3", "/c/c/bzImage")])
            .unwrap();
        assert_eq!(
            two.list.as_deref().unwrap(),
            format!("6.12.9{}=/c/a/bzImage;6.12.9{}=/c/b/bzImage;6.11.3=/c/c/bzImage", h6("/c/a/bzImage"), h6("/c/b/bzImage"))
        );
        // Labels that differ only in punctuation sanitize alike: disambiguated too.
        let sim = kernel_env(&[k("a", "6.12", "/a"), k("b", "6-12", "/b")]).unwrap();
        assert_eq!(sim.list.unwrap(), format!("6.12{}=/a;6-12{}=/b", h6("/a"), h6("/b")));
        assert!(kernel_env(&[k("a", "x", "/a;b"), k("b", "y", "/c")]).is_err());
    }

    #[test]
    fn repeat_run_id_is_the_runtime_s_timestamp_plus_count() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_767_232_984_123);
        assert_eq!(repeat_run_id(t, 3), "20260101T020304.123Z-r3");
        for secs in [0u64, 951_782_400, 4_102_444_799, 1_767_232_984] {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            assert_eq!(repeat_run_id(t, 2), format!("{}-r2", ktstr_runtime::artifacts::utc_stamp(t)));
        }
    }

    fn test_args() -> TestArgs {
        TestArgs {
            kernels: vec![],
            release: false,
            packages: vec![],
            mirror: None,
            print_env: false,
            gauntlet: None,
            repeat: 1,
            archive: None,
            partition: None,
            common: crate::kernel_cmd::CommonArgs { extra_kconfig: None, offline: false, max_kernels: 16, quiet: false },
            nextest_args: vec![],
        }
    }

    #[test]
    fn argv_passes_nextest_args_untouched() {
        let a = TestArgs {
            release: true,
            packages: vec!["p1".into()],
            nextest_args: vec!["-E".into(), "test(kernel_6_12)".into(), "--".into(), "--exact".into()],
            ..test_args()
        };
        assert_eq!(nextest_argv(&a), ["nextest", "run", "--release", "-p", "p1", "-E", "test(kernel_6_12)", "--", "--exact"]);
    }

    #[test]
    fn gauntlet_selects_ignored_variants_and_ands_the_user_filter() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(gauntlet_args(&[], &[]), s(&["--run-ignored", "only", "-E", "test(/^gauntlet\\//)"]));
        let v = gauntlet_args(&s(&["tiny", "llc2"]), &s(&["-E", "test(a)", "--no-fail-fast", "-E=test(b)", "--", "--nocapture"]));
        assert_eq!(
            v,
            s(&[
                "--run-ignored",
                "only",
                "-E",
                "test(/^gauntlet\\/[^\\/]+\\/(tiny|llc2)(\\/kernel_[a-z0-9_]+)?$/) and ((test(a)) or (test(b)))",
                "--no-fail-fast",
                "--",
                "--nocapture"
            ])
        );
        // The user's own --run-ignored wins; -E after `--` is not nextest's.
        let v = gauntlet_args(&[], &s(&["--run-ignored", "all", "--filterset", "test(x)", "--", "-E", "y"]));
        assert_eq!(v, s(&["-E", "test(/^gauntlet\\//) and ((test(x)))", "--run-ignored", "all", "--", "-E", "y"]));
        let a = TestArgs { gauntlet: Some(s(&["tiny"])), ..test_args() };
        assert_eq!(nextest_argv(&a)[..4], s(&["nextest", "run", "--run-ignored", "only"]));
    }

    /// The filter matches variant names, with and without a kernel suffix, and nothing else.
    #[test]
    fn gauntlet_filter_regex_shape() {
        let f = gauntlet_filter(&["llc2".into(), "numa4-far".into()]);
        let re = f.strip_prefix("test(/").and_then(|r| r.strip_suffix("/)")).unwrap().replace("\\/", "/");
        assert_eq!(re, "^gauntlet/[^/]+/(llc2|numa4-far)(/kernel_[a-z0-9_]+)?$");
    }
}
