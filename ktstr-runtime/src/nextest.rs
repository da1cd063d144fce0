//! The libtest-compatible protocol nextest speaks: `--list --format terse
//! [--ignored]` and `--exact NAME`.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::discovery;
use crate::host::{self, KernelChoice};
use crate::label::{peel_suffix, KernelEntry};
use crate::preset::Preset;
use crate::registry::{self, TestDef};
use crate::verdict::{self, Verdict};

/// Set on the re-executed child that lets libtest answer.
pub const PASSTHROUGH_ENV: &str = "KTSTR_LIBTEST_PASSTHROUGH";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub list: bool,
    pub ignored: bool,
    pub include_ignored: bool,
    pub exact: bool,
    pub terse: bool,
    pub filters: Vec<String>,
}

impl Args {
    pub fn parse(args: &[String]) -> Self {
        let mut a = Args::default();
        let mut it = args.iter();
        while let Some(s) = it.next() {
            match s.as_str() {
                "--list" => a.list = true,
                "--ignored" => a.ignored = true,
                "--include-ignored" => a.include_ignored = true,
                "--exact" => a.exact = true,
                "--format" => a.terse = it.next().is_some_and(|f| f == "terse"),
                "--format=terse" => a.terse = true,
                "--skip" | "--test-threads" | "--color" | "--logfile" | "-Z" => {
                    it.next();
                }
                s if s.starts_with('-') => {}
                s => a.filters.push(s.to_string()),
            }
        }
        a
    }

    fn matches(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| if self.exact { f == name } else { name.contains(f.as_str()) })
    }
}

/// One nextest-visible ktstr test.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub ignored: bool,
    pub def: &'static TestDef,
    pub kernel: Option<KernelEntry>,
    /// A gauntlet variant's preset; `def` is the base test.
    pub preset: Option<&'static Preset>,
}

impl Listed {
    /// What runs: the test itself, or its variant on the preset.
    pub fn run_def(&self) -> &'static TestDef {
        match self.preset {
            Some(p) => self.def.leak_variant(p),
            None => self.def,
        }
    }
}

/// Every name this binary offers, in the shapes of the design contract:
/// `ktstr/{name}` for each test, then `gauntlet/{name}/{preset}` for each
/// test and allowed preset (always ignored), each with a kernel suffix
/// per kernel in multi-kernel mode.
pub fn expand(tests: &[&'static TestDef], kernels: Option<&[KernelEntry]>) -> Vec<Listed> {
    let mut out = Vec::new();
    let mut push = |base: String, ignored: bool, def: &'static TestDef, preset: Option<&'static Preset>| match kernels {
        Some(ks) if !def.host_only => {
            for k in ks {
                out.push(Listed { name: format!("{base}/{}", k.sanitized), ignored, def, kernel: Some(k.clone()), preset });
            }
        }
        _ => out.push(Listed { name: base, ignored, def, kernel: None, preset }),
    };
    for def in tests {
        push(format!("ktstr/{}", def.name), def.ignored(), def, None);
    }
    for def in tests {
        for p in def.presets() {
            push(format!("{GAUNTLET_PREFIX}{}/{}", def.name, p.name), true, def, Some(p));
        }
    }
    out
}

/// Test names of gauntlet variants start with this.
pub const GAUNTLET_PREFIX: &str = "gauntlet/";

/// True for a name this runtime answers `--exact` for.
pub fn is_ktstr_name(name: &str) -> bool {
    name.starts_with("ktstr/") || name.starts_with(GAUNTLET_PREFIX)
}

fn kernels_or_exit() -> Option<Vec<KernelEntry>> {
    match discovery::kernel_list() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("ktstr: FAIL: {e}");
            std::process::exit(1);
        }
    }
}

fn warn_duplicates() {
    for d in registry::duplicates() {
        eprintln!("ktstr: warning: #[ktstr_test] name {} is registered more than once ({}:{}); the first wins", d.name, d.file, d.line);
    }
}

/// Answers `--list`: ktstr names, then libtest's own tests minus the
/// `cargo test` wrappers. Returns the exit code.
pub fn list(args: &[String]) -> i32 {
    let a = Args::parse(&args[1..]);
    warn_duplicates();
    let kernels = kernels_or_exit();
    let mut out = std::io::stdout().lock();
    for l in expand(&registry::tests(), kernels.as_deref()) {
        if (!a.ignored || l.ignored) && a.matches(&l.name) {
            let _ = writeln!(out, "{}: test", l.name);
        }
    }
    let _ = out.flush();
    let wrappers: Vec<String> = registry::TESTS.iter().map(TestDef::wrapper_name).collect();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ktstr: FAIL: cannot re-run the test binary to list its plain tests: {e}");
            return 1;
        }
    };
    let child = Command::new(exe).args(&args[1..]).env(PASSTHROUGH_ENV, "1").stderr(Stdio::inherit()).output();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ktstr: FAIL: re-running the test binary to list its plain tests: {e}");
            return 1;
        }
    };
    for line in String::from_utf8_lossy(&child.stdout).lines() {
        let name = line.rsplit_once(": ").map_or(line, |(n, _)| n);
        if !wrappers.iter().any(|w| w == name) {
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = out.flush();
    child.status.code().unwrap_or(1)
}

/// The listed test `--exact NAME` names, or why there is none. Names are
/// matched whole against the listing, so a `host_only` test whose own
/// name looks like a kernel suffix is still found; suffix peeling only
/// explains a miss.
pub fn resolve(name: &str, tests: &[&'static TestDef], kernels: Option<&[KernelEntry]>) -> Result<Listed, String> {
    if let Some(l) = expand(tests, kernels).into_iter().find(|l| l.name == name) {
        return Ok(l);
    }
    let labels: Vec<String> = kernels.iter().flat_map(|ks| ks.iter()).map(|k| k.sanitized.clone()).collect();
    let (base, label) = peel_suffix(name, &labels);
    // A gauntlet name whose test exists but is not listed on that preset.
    if let Some((test, preset)) = base.strip_prefix(GAUNTLET_PREFIX).and_then(|r| r.rsplit_once('/')) {
        if let (Some(d), Some(p)) = (tests.iter().find(|d| d.name == test), crate::preset::find(preset)) {
            if d.presets().all(|q| q.name != p.name) {
                let why = match d.gauntlet.excludes(p) {
                    Some(why) => why,
                    None if d.host_only => "host_only tests have no variants".into(),
                    None => "demo_ tests have no variants".into(),
                };
                return Err(format!("{test} has no gauntlet variant on preset {preset}: {why}"));
            }
        }
    }
    let def = tests.iter().find(|d| Some(d.name) == name.strip_prefix("ktstr/"));
    let peeled = tests.iter().find(|d| Some(d.name) == base.strip_prefix("ktstr/"));
    let gauntlet_unsuffixed = label.is_none() && kernels.is_some() && name.starts_with(GAUNTLET_PREFIX);
    Err(match (def, peeled, label) {
        _ if gauntlet_unsuffixed && expand(tests, kernels).iter().any(|l| l.name.starts_with(&format!("{name}/"))) => format!(
            "multi-kernel mode (KTSTR_KERNEL_LIST): {name} needs a kernel suffix, one of: {}",
            labels.join(", ")
        ),
        (Some(d), ..) if !d.host_only && kernels.is_some() => format!(
            "multi-kernel mode (KTSTR_KERNEL_LIST): {name} needs a kernel suffix, one of: {}",
            labels.join(", ")
        ),
        (None, Some(d), Some(_)) if d.host_only => format!("{name} is host_only and has no kernel suffix; run ktstr/{}", d.name),
        _ => format!("no ktstr test named {name} in this binary (list them with --list)"),
    })
}

/// Answers `--exact NAME` for a `ktstr/…` or `gauntlet/…` name. Returns the exit code.
pub fn run_exact(name: &str) -> i32 {
    let kernels = kernels_or_exit();
    let listed = match resolve(name, &registry::tests(), kernels.as_deref()) {
        Ok(l) => l,
        Err(m) => {
            eprintln!("ktstr: FAIL: {m}");
            return 1;
        }
    };
    let (def, refused) = match crate::cpu_override::for_run(listed.run_def()) {
        Ok(r) => r,
        Err(m) => {
            eprintln!("ktstr: FAIL: {m}");
            return 1;
        }
    };
    let run = match (refused, def.host_only, listed.kernel) {
        (Some(why), _, _) => host::run_on_host(|| verdict::Verdict::skip(why)),
        (None, true, _) => host::run_on_host(|| host::run_host_only(def)),
        (None, false, Some(entry)) => host::run_vm_full(def, &KernelChoice::Entry(entry)),
        (None, false, None) => host::run_vm_full(def, &KernelChoice::Discover),
    };
    let (verdict, artifacts) = crate::conclude::conclude(name, def, run);
    print_pass(name, &verdict);
    if verdict.outcome == verdict::Outcome::Skip && !verdict::no_skip_mode() {
        crate::testing::record_skip(name, &verdict.message);
    }
    verdict::finish(&verdict, artifacts.as_deref())
}

/// `ktstr: PASS: NAME[: message]` on stderr for a pass; nothing otherwise.
pub fn print_pass(name: &str, v: &Verdict) {
    if v.outcome == verdict::Outcome::Pass {
        if v.message.is_empty() {
            eprintln!("ktstr: PASS: {name}");
        } else {
            eprintln!("ktstr: PASS: {name}: {}", v.message);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::label::parse_kernel_list;
    use crate::vmm::Topology;

    pub(crate) static VM: TestDef = TestDef { name: "vm", ..TestDef::DEFAULT };
    static HOST: TestDef = TestDef { name: "h", host_only: true, ..TestDef::DEFAULT };
    static DEMO: TestDef = TestDef { name: "demo_x", ..TestDef::DEFAULT };

    /// Gauntlet variants up to 4 vCPUs (tiny, tiny-smt, llc2).
    pub(crate) static SMALL: TestDef = TestDef {
        name: "small",
        gauntlet: crate::preset::Constraints { max_cpus: 4, ..crate::preset::Constraints::DEFAULT },
        ..TestDef::DEFAULT
    };

    #[test]
    fn names_in_both_modes() {
        let tests = [&VM, &HOST, &DEMO];
        let single: Vec<_> = expand(&tests, None).into_iter().filter(|l| l.preset.is_none()).map(|l| (l.name, l.ignored)).collect();
        assert_eq!(single, [("ktstr/vm".into(), false), ("ktstr/h".into(), false), ("ktstr/demo_x".into(), true)]);
        let ks = parse_kernel_list("6.12=/a;6.13-rc1=/b").unwrap();
        let multi: Vec<_> = expand(&tests, Some(&ks)).into_iter().filter(|l| l.preset.is_none()).map(|l| l.name).collect();
        assert_eq!(
            multi,
            [
                "ktstr/vm/kernel_6_12",
                "ktstr/vm/kernel_6_13_rc1",
                "ktstr/h",
                "ktstr/demo_x/kernel_6_12",
                "ktstr/demo_x/kernel_6_13_rc1"
            ]
        );
    }

    #[test]
    fn gauntlet_variants_are_ignored_and_follow_constraints() {
        let tests = [&VM, &HOST, &DEMO, &SMALL];
        let listed = expand(&tests, None);
        let variants: Vec<_> = listed.iter().filter(|l| l.preset.is_some()).collect();
        assert!(variants.iter().all(|l| l.ignored), "variants are always ignored");
        let names: Vec<&str> = variants.iter().map(|l| l.name.as_str()).collect();
        let vm: Vec<String> = crate::preset::PRESETS.iter().map(|p| format!("gauntlet/vm/{}", p.name)).collect();
        assert_eq!(&names[..vm.len()], vm.as_slice(), "one per preset, in ladder order");
        assert_eq!(&names[vm.len()..], ["gauntlet/small/tiny", "gauntlet/small/tiny-smt", "gauntlet/small/llc2"]);
        let ks = parse_kernel_list("6.12=/a;6.13=/b").unwrap();
        let multi: Vec<String> = expand(&tests, Some(&ks)).into_iter().filter(|l| l.def.name == "small" && l.preset.is_some()).map(|l| l.name).collect();
        assert_eq!(multi[..2], ["gauntlet/small/tiny/kernel_6_12", "gauntlet/small/tiny/kernel_6_13"]);
        // --exact on a variant runs the base test on the preset's topology.
        let r = resolve("gauntlet/small/llc2", &tests, None).unwrap();
        let def = r.run_def();
        assert_eq!((def.name, def.topology, def.preset.map(|p| p.name)), ("small", Topology::new(1, 2, 2, 1), Some("llc2")));
        let e = resolve("gauntlet/small/llc4", &tests, None).unwrap_err();
        assert_eq!(e, "small has no gauntlet variant on preset llc4: 16 CPUs > max_cpus 4");
        assert!(resolve("gauntlet/h/tiny", &tests, None).unwrap_err().contains("host_only"));
        assert!(resolve("gauntlet/small/tiny", &tests, Some(&ks)).unwrap_err().contains("needs a kernel suffix"));
        assert_eq!(resolve("gauntlet/small/tiny/kernel_6_13", &tests, Some(&ks)).unwrap().kernel.unwrap().sanitized, "kernel_6_13");
        assert!(is_ktstr_name("gauntlet/small/tiny") && is_ktstr_name("ktstr/x") && !is_ktstr_name("plain::test"));
    }

    #[test]
    fn exact_names_resolve_whole() {
        static LOOKALIKE: TestDef = TestDef { name: "kernel_6_12", host_only: true, ..TestDef::DEFAULT };
        let tests = [&VM, &HOST, &LOOKALIKE];
        let ks = parse_kernel_list("6.12=/a;6.13=/b").unwrap();
        let r = resolve("ktstr/kernel_6_12", &tests, Some(&ks)).unwrap();
        assert_eq!((r.def.name, r.kernel), ("kernel_6_12", None), "a host_only test named like a label runs");
        let r = resolve("ktstr/vm/kernel_6_13", &tests, Some(&ks)).unwrap();
        assert_eq!(r.kernel.unwrap().sanitized, "kernel_6_13");
        assert!(resolve("ktstr/vm", &tests, Some(&ks)).unwrap_err().contains("needs a kernel suffix"));
        assert!(resolve("ktstr/h/kernel_6_12", &tests, Some(&ks)).unwrap_err().contains("host_only"));
        assert!(resolve("ktstr/nope/kernel_6_12", &tests, Some(&ks)).unwrap_err().contains("no ktstr test named"));
        assert!(resolve("ktstr/vm/kernel_6_12", &tests, None).unwrap_err().contains("no ktstr test named"));
        assert!(resolve("ktstr/vm", &tests, None).unwrap().kernel.is_none());
    }

    #[test]
    fn args() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let a = Args::parse(&v("--list --format terse --ignored"));
        assert!(a.list && a.terse && a.ignored && a.filters.is_empty());
        let a = Args::parse(&v("--exact ktstr/x --nocapture"));
        assert!(a.exact && !a.list);
        assert_eq!(a.filters, ["ktstr/x"]);
        assert!(a.matches("ktstr/x") && !a.matches("ktstr/xy"));
    }
}
