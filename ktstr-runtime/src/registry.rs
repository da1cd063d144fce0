//! The link-time registry every `#[ktstr_test]` adds itself to.

use crate::ctx::Ctx;
use crate::preset::{Constraints, Preset, PRESETS};
use crate::vmm::Topology;

/// One registered test. The macro fills the keys the user gave and takes
/// the rest from [`TestDef::DEFAULT`], so new keys (a scheduler, say)
/// can be added without touching existing tests.
#[derive(Debug)]
pub struct TestDef {
    /// Function name; the nextest name is `ktstr/{name}`.
    pub name: &'static str,
    /// `module_path!()` of the test, to recognise its `cargo test` wrapper.
    pub module_path: &'static str,
    pub func: fn(&Ctx) -> anyhow::Result<()>,
    pub topology: Topology,
    pub memory_mib: u64,
    /// Limit on the test body, measured in the guest from the body's start.
    pub timeout_s: u64,
    pub host_only: bool,
    pub expect_err: bool,
    /// Extra kernel arguments.
    pub cmdline: &'static str,
    /// Host paths (absolute) copied to `/include/{basename}` in the guest.
    pub include_files: &'static [&'static str],
    /// The bytes of each of `include_files`, in order, embedded when the
    /// test was compiled: a binary copied elsewhere still has them.
    pub include_data: &'static [&'static [u8]],
    /// Host programs (bare names or paths) packed with their libraries at
    /// `/ktstr/bin/{name}` in the guest; see [`crate::host_tools`].
    pub host_tools: &'static [&'static str],
    /// sched_ext scheduler the body runs under; `None` is the kernel default.
    pub scheduler: Option<&'static crate::scheduler::Scheduler>,
    /// Checks `ctx.run` applies to every report (`max_gap_ms = 50`, ...).
    pub checks: crate::checks::Checks,
    /// Appended to the scheduler's own arguments for this test.
    pub scheduler_args: &'static [&'static str],
    /// The test passes only if the kernel ejects the scheduler with a
    /// sched_ext error containing this text.
    pub expect_scx_error: Option<&'static str>,
    /// Which gauntlet presets the test is also listed on.
    pub gauntlet: Constraints,
    /// Set on a gauntlet variant only (see [`TestDef::variant`]).
    pub preset: Option<&'static Preset>,
    /// Set on a run resized by `KTSTR_CPUS` only: that vCPU count
    /// ([`crate::cpu_override`]).
    pub cpus_override: Option<u32>,
    pub file: &'static str,
    pub line: u32,
    /// Always boot this test's kernel, never start it from a VM snapshot
    /// (tests of boot itself; `cmdline` implies it, see [`crate::snapshot`]).
    pub cold_boot: bool,
}

fn unset_body(_: &Ctx) -> anyhow::Result<()> {
    anyhow::bail!("TestDef without a body")
}

impl TestDef {
    pub const DEFAULT: TestDef = TestDef {
        name: "",
        module_path: "",
        func: unset_body,
        topology: Topology::cpus(2),
        memory_mib: 512,
        timeout_s: 30,
        host_only: false,
        expect_err: false,
        cmdline: "",
        include_files: &[],
        include_data: &[],
        host_tools: &[],
        scheduler: None,
        checks: crate::checks::Checks::NONE,
        scheduler_args: &[],
        expect_scx_error: None,
        gauntlet: Constraints::DEFAULT,
        preset: None,
        cpus_override: None,
        file: "",
        line: 0,
        cold_boot: false,
    };

    /// Ignored by default under nextest (`demo_` prefix).
    pub fn ignored(&self) -> bool {
        self.name.starts_with("demo_")
    }

    /// The scheduler as this test runs it: its arguments, then the
    /// test's `scheduler_args`.
    pub fn scheduler(&self) -> Option<crate::scheduler::Scheduler> {
        let s = *self.scheduler?;
        if self.scheduler_args.is_empty() {
            return Some(s);
        }
        let args: Vec<&'static str> = s.args.iter().chain(self.scheduler_args).copied().collect();
        Some(crate::scheduler::Scheduler { args: Box::leak(args.into_boxed_slice()), ..s })
    }

    /// The presets this test gets `gauntlet/{name}/{preset}` variants on:
    /// none for `host_only` tests (no VM) and `demo_` tests (they fail
    /// on purpose), else every preset the constraints allow.
    pub fn presets(&self) -> impl Iterator<Item = &'static Preset> + '_ {
        let eligible = !self.host_only && !self.name.starts_with("demo_") && self.preset.is_none();
        PRESETS.iter().filter(move |p| eligible && self.gauntlet.allows(p))
    }

    /// This test on preset `p`: its topology, and memory enough for both.
    pub fn variant(&self, p: &'static Preset) -> TestDef {
        TestDef { topology: p.topology, memory_mib: p.memory_for(self.memory_mib), preset: Some(p), ..*self }
    }

    /// [`TestDef::variant`] with a static lifetime, for one run of one
    /// process (nextest's `--exact`, guest init).
    pub fn leak_variant(&'static self, p: &'static Preset) -> &'static TestDef {
        Box::leak(Box::new(self.variant(p)))
    }

    /// The libtest name of the `#[test]` wrapper the macro emits:
    /// module path without the crate, then `{name}::ktstr`.
    pub fn wrapper_name(&self) -> String {
        match self.module_path.split_once("::") {
            Some((_, rest)) => format!("{rest}::{}::ktstr", self.name),
            None => format!("{}::ktstr", self.name),
        }
    }

    /// A host file holding include file `i`: its embedded bytes written
    /// once to `{cache}/ktstr/include/{crc32}/{basename}`, or the recorded
    /// path when nothing was embedded (a `TestDef` built by hand).
    pub fn include_source(&self, i: usize) -> std::io::Result<std::path::PathBuf> {
        let root = crate::initramfs::cache_dir().parent().map(|p| p.join("include")).unwrap_or_else(|| "/tmp/ktstr-include".into());
        self.include_source_in(i, &root)
    }

    /// `include_source` with the embedded bytes kept under `root`.
    fn include_source_in(&self, i: usize, root: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
        let host = self.include_files[i];
        let Some(data) = self.include_data.get(i) else { return Ok(host.into()) };
        let name = std::path::Path::new(host)
            .file_name()
            .ok_or_else(|| std::io::Error::other(format!("include file {host} has no file name")))?;
        let dir = root.join(format!("{:08x}", crc32fast::hash(data)));
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|d| d == *data) {
            return Ok(path);
        }
        std::fs::create_dir_all(&dir)?;
        // Write beside, then rename: a concurrent reader never sees half a file.
        let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Where the guest finds an include file.
    pub fn guest_include_path(host: &str) -> String {
        let base = std::path::Path::new(host).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("/include/{base}")
    }
}

#[linkme::distributed_slice]
pub static TESTS: [TestDef];

/// All registered tests, first registration of a name wins.
pub fn tests() -> Vec<&'static TestDef> {
    let mut out: Vec<&'static TestDef> = Vec::new();
    for t in TESTS.iter() {
        if !out.iter().any(|o| o.name == t.name) {
            out.push(t);
        }
    }
    out.sort_by_key(|t| t.name);
    out
}

/// Names registered more than once (each reported once).
pub fn duplicates() -> Vec<&'static TestDef> {
    duplicates_in(&TESTS)
}

fn duplicates_in(all: &'static [TestDef]) -> Vec<&'static TestDef> {
    let mut dups: Vec<&'static TestDef> = Vec::new();
    for (i, t) in all.iter().enumerate() {
        if all[..i].iter().any(|o| o.name == t.name) && !dups.iter().any(|d| d.name == t.name) {
            dups.push(t);
        }
    }
    dups
}

pub fn find(name: &str) -> Option<&'static TestDef> {
    TESTS.iter().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_source_writes_embedded_bytes_once() {
        let root = tempfile::tempdir().unwrap();
        let def = TestDef {
            name: "inc",
            include_files: &["/nonexistent/ktstr-src/data/a.txt", "/also/gone/b.bin"],
            include_data: &[b"alpha", b"beta"],
            ..TestDef::DEFAULT
        };
        let a = def.include_source_in(0, root.path()).unwrap();
        assert_eq!(a.file_name().unwrap(), "a.txt", "the name the test asks ctx.include for");
        assert_eq!(std::fs::read(&a).unwrap(), b"alpha");
        assert_eq!(std::fs::read(def.include_source_in(1, root.path()).unwrap()).unwrap(), b"beta");
        // A second call finds the file; a damaged copy is rewritten.
        assert_eq!(def.include_source_in(0, root.path()).unwrap(), a);
        std::fs::write(&a, b"alp").unwrap();
        assert_eq!(std::fs::read(def.include_source_in(0, root.path()).unwrap()).unwrap(), b"alpha");
        // Nothing embedded (a TestDef built by hand): the recorded path.
        let bare = TestDef { name: "bare", include_files: &["/x/y.txt"], ..TestDef::DEFAULT };
        assert_eq!(bare.include_source_in(0, root.path()).unwrap(), std::path::PathBuf::from("/x/y.txt"));
    }

    static THREE: [TestDef; 4] = [
        TestDef { name: "a", ..TestDef::DEFAULT },
        TestDef { name: "b", ..TestDef::DEFAULT },
        TestDef { name: "a", line: 2, ..TestDef::DEFAULT },
        TestDef { name: "a", line: 3, ..TestDef::DEFAULT },
    ];

    #[test]
    fn a_duplicate_is_reported_once() {
        let d = duplicates_in(&THREE);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].name, d[0].line), ("a", 2));
    }

    #[test]
    fn wrapper_names() {
        let t = TestDef { name: "x", module_path: "examples", ..TestDef::DEFAULT };
        assert_eq!(t.wrapper_name(), "x::ktstr");
        let t = TestDef { name: "x", module_path: "examples::sub::deeper", ..TestDef::DEFAULT };
        assert_eq!(t.wrapper_name(), "sub::deeper::x::ktstr");
        assert!(TestDef { name: "demo_x", ..TestDef::DEFAULT }.ignored());
    }

    #[test]
    fn scheduler_args_follow_the_scheduler_s_own() {
        static S: crate::scheduler::Scheduler = crate::scheduler::Scheduler::new("scx_qmap").args(&["-v"]);
        let t = TestDef { name: "t", scheduler: Some(&S), scheduler_args: &["-e", "1000"], ..TestDef::DEFAULT };
        assert_eq!(t.scheduler().unwrap().args, ["-v", "-e", "1000"]);
        assert_eq!(TestDef { name: "u", scheduler: Some(&S), ..TestDef::DEFAULT }.scheduler().unwrap().args, ["-v"]);
        assert!(TestDef::DEFAULT.scheduler().is_none());
    }

    #[test]
    fn variants_take_the_preset_and_the_constraints() {
        let t = TestDef { name: "t", memory_mib: 2048, ..TestDef::DEFAULT };
        assert_eq!(t.presets().count(), PRESETS.len());
        let p = crate::preset::find("numa3").unwrap();
        let v = t.variant(p);
        assert_eq!((v.topology, v.memory_mib, v.preset, v.name), (p.topology, 2049, Some(p), "t"));
        assert_eq!(v.presets().count(), 0, "a variant has no variants");
        let small = TestDef { name: "s", gauntlet: Constraints { max_cpus: 4, ..Constraints::DEFAULT }, ..TestDef::DEFAULT };
        assert_eq!(small.presets().map(|p| p.name).collect::<Vec<_>>(), ["tiny", "tiny-smt", "llc2"]);
        assert_eq!(TestDef { name: "h", host_only: true, ..TestDef::DEFAULT }.presets().count(), 0);
        assert_eq!(TestDef { name: "demo_x", ..TestDef::DEFAULT }.presets().count(), 0);
        let off = TestDef { name: "o", gauntlet: Constraints { gauntlet: false, ..Constraints::DEFAULT }, ..TestDef::DEFAULT };
        assert_eq!(off.presets().count(), 0);
    }
}
