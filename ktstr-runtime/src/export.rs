//! `--ktstr-export-test=NAME`: writes `NAME.run`, a self-contained bash
//! reproducer of one test (preamble, `__ARCHIVE__`, base64 gzip tarball).
//!
//! Protocol (design.md): exit 0 when the file was written, 1 when this
//! binary has no such test, 2 when it has the test but refuses it (reason
//! on stderr). Extensions beyond design.md: `--ktstr-export-vm` embeds a
//! kernel image (`--ktstr-export-kernel=PATH`, else the runtime's kernel
//! discovery) so the `.run` boots the test in a VM.
//!
//! What the `.run` runs, by mode:
//! - host: `testbin --ktstr-run-host=NAME` (see [`RUN_HOST_FLAG`]), the
//!   test body directly on this host, as root;
//! - vm: `NEXTEST=1 testbin --exact ktstr/NAME --nocapture` with
//!   `KTSTR_TEST_KERNEL` pointing at the embedded image, i.e. exactly what
//!   nextest runs. A gauntlet variant (`gauntlet/NAME/PRESET`) exports
//!   only this way and runs `--exact gauntlet/NAME/PRESET`, so the VM has
//!   the preset's topology.
//!
//! Both set `KTSTR_INCLUDE_DIR` (the extracted include files, by basename)
//! and, with a scheduler, `KTSTR_SCHEDULER` (the extracted binary), so the
//! runtime finds them without the exporting host's paths and starts,
//! watches and stops the scheduler as it does under nextest.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use flate2::write::GzEncoder;

use crate::registry::TestDef;

pub const EXPORT_FLAG: &str = "--ktstr-export-test=";
pub const OUTPUT_FLAG: &str = "--ktstr-export-output=";
pub const VM_FLAG: &str = "--ktstr-export-vm";
pub const KERNEL_FLAG: &str = "--ktstr-export-kernel=";
/// `testbin --ktstr-run-host=NAME` runs one test body on the host (no VM)
/// and exits with its verdict code; the host-mode `.run` depends on it.
pub const RUN_HOST_FLAG: &str = "--ktstr-run-host=";
/// The line between the preamble and the base64 payload.
pub const ARCHIVE_MARKER: &str = "__ARCHIVE__";

/// What an export names: the definition that runs (a gauntlet variant
/// carries its preset's topology) and the name `--exact` takes.
#[derive(Debug, Clone)]
pub struct Target {
    pub def: &'static TestDef,
    pub exact: String,
}

impl Target {
    /// `NAME`, or `NAME-PRESET` for a variant: the default `.run` file name.
    pub fn stem(&self) -> String {
        match self.def.preset {
            Some(p) => format!("{}-{}", self.def.name, p.name),
            None => self.def.name.to_string(),
        }
    }
}

/// Parsed `--ktstr-export-*` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportArgs {
    pub name: String,
    /// Where to write; default `./{stem}.run` (`NAME-PRESET` for a variant).
    pub output: Option<PathBuf>,
    pub vm: bool,
    pub kernel: Option<PathBuf>,
}

impl ExportArgs {
    /// `None` when the arguments hold no `--ktstr-export-test=` (not an
    /// export invocation); `Some(Err)` for a malformed one.
    pub fn from_args<I, S>(args: I) -> Option<Result<ExportArgs, String>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = ExportArgs::default();
        let mut seen = false;
        for a in args {
            let a = a.as_ref();
            if let Some(n) = a.strip_prefix(EXPORT_FLAG) {
                seen = true;
                out.name = n.to_string();
            } else if let Some(p) = a.strip_prefix(OUTPUT_FLAG) {
                out.output = Some(PathBuf::from(p));
            } else if a == VM_FLAG {
                out.vm = true;
            } else if let Some(p) = a.strip_prefix(KERNEL_FLAG) {
                out.kernel = Some(PathBuf::from(p));
            }
        }
        if !seen {
            return None;
        }
        if out.name.is_empty() {
            return Some(Err(format!("{EXPORT_FLAG} needs a test name")));
        }
        Some(Ok(out))
    }
}

/// How an export ended, with its protocol exit code.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Written(PathBuf),
    NotFound(String),
    Refused(String),
}

impl Outcome {
    pub fn code(&self) -> i32 {
        match self {
            Outcome::Written(_) => 0,
            Outcome::NotFound(_) => 1,
            Outcome::Refused(_) => 2,
        }
    }
}

/// Entry for the early-constructor dispatch: `None` when `args` is not an
/// export invocation, else the exit code (0 written, 1 no such test,
/// 2 refused or failed, reason on stderr).
pub fn dispatch<I, S>(args: I, lookup: impl FnOnce(&str) -> Result<Option<Target>, String>) -> Option<i32>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let outcome = match ExportArgs::from_args(args)? {
        Ok(a) => match lookup(&a.name) {
            Ok(t) => export(&a, t.as_ref()),
            Err(why) => Outcome::Refused(why),
        },
        Err(e) => Outcome::Refused(e),
    };
    match &outcome {
        Outcome::Written(p) => eprintln!("ktstr: export: wrote {}", p.display()),
        Outcome::NotFound(m) | Outcome::Refused(m) => eprintln!("ktstr: export: {m}"),
    }
    Some(outcome.code())
}

/// [`dispatch`] against this binary's registry (`ktstr/NAME`, `NAME` or
/// `gauntlet/NAME/PRESET`).
pub fn dispatch_registry<S: AsRef<str>>(args: &[S]) -> Option<i32> {
    dispatch(args.iter().map(|a| a.as_ref()), |name| lookup(name, &crate::registry::tests()))
}

/// The test `name` exports: `Ok(None)` when `tests` has no test of that
/// name (another binary may), `Err` for a gauntlet name whose test is here
/// but has no such variant.
pub fn lookup(name: &str, tests: &[&'static TestDef]) -> Result<Option<Target>, String> {
    let Some(rest) = name.strip_prefix(crate::nextest::GAUNTLET_PREFIX) else {
        let base = name.strip_prefix("ktstr/").unwrap_or(name);
        return Ok(tests.iter().find(|d| d.name == base).map(|d| Target { def: d, exact: format!("ktstr/{base}") }));
    };
    let Some((base, preset)) = rest.split_once('/') else {
        return Ok(None);
    };
    let Some(def) = tests.iter().find(|d| d.name == base) else { return Ok(None) };
    if let Some((preset, suffix)) = preset.split_once('/') {
        return Err(format!(
            "export names a variant without a kernel suffix: drop /{suffix} and embed that kernel with \
             cargo ktstr export --vm --kernel SPEC gauntlet/{base}/{preset}"
        ));
    }
    crate::preset::resolve(&[preset.to_string()])?;
    let listed = crate::nextest::resolve(name, &[*def], None)?;
    Ok(Some(Target { def: listed.run_def(), exact: name.to_string() }))
}

/// Exports `target` (or reports its absence) per the 0/1/2 protocol.
pub fn export(args: &ExportArgs, target: Option<&Target>) -> Outcome {
    let Some(target) = target else {
        let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
        return Outcome::NotFound(format!("no test named {:?} in {exe}", args.name));
    };
    let test = target.def;
    if let Err(reason) = refusal(test) {
        return Outcome::Refused(reason);
    }
    if let (Some(p), false) = (test.preset, args.vm) {
        return Outcome::Refused(format!(
            "{} runs the test in a VM of preset {}'s topology, so it exports only with the kernel embedded: \
             cargo ktstr export --vm {}",
            target.exact, p.name, target.exact
        ));
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return Outcome::Refused(format!("cannot locate this test binary: {e}")),
    };
    let kernel = match args.vm.then(|| vm_kernel(args)).transpose() {
        Ok(k) => k,
        Err(e) => return Outcome::Refused(e),
    };
    let scheduler = match test.scheduler {
        Some(s) => match crate::scheduler::host::find_binary(s, kernel.as_deref()) {
            Ok(bin) => Some(bin),
            Err(e) => return Outcome::Refused(e.to_string()),
        },
        None => None,
    };
    let output = args.output.clone().unwrap_or_else(|| PathBuf::from(format!("{}.run", target.stem())));
    match write_run_file(target, &exe, scheduler.as_deref(), kernel.as_deref(), &output) {
        Ok(()) => Outcome::Written(output),
        Err(e) => Outcome::Refused(format!("writing {}: {e:#}", output.display())),
    }
}

/// Why a test cannot be exported, if it cannot.
pub fn refusal(test: &TestDef) -> Result<(), String> {
    if test.host_only {
        return Err(format!(
            "test {:?} is host_only: it already runs directly on the host, so a .run adds nothing; \
             run it with `cargo nextest run -E 'test(=ktstr/{})'`",
            test.name, test.name
        ));
    }
    for (i, f) in test.include_files.iter().enumerate() {
        if !test.include_source(i).is_ok_and(|p| p.is_file()) {
            return Err(format!("include file {f} of test {:?} does not exist", test.name));
        }
    }
    Ok(())
}

/// `--ktstr-export-kernel=PATH`, else the same discovery a VM test uses
/// (`KTSTR_TEST_KERNEL`, `KTSTR_KERNEL`, the cache, `./linux`, ...).
fn vm_kernel(args: &ExportArgs) -> Result<PathBuf, String> {
    let image = match &args.kernel {
        Some(given) => crate::vmm::builder::find_image(given)
            .ok_or_else(|| format!("{} does not exist or holds no kernel image (bzImage/vmlinuz)", given.display()))?,
        None => crate::discovery::discover()
            .map_err(|e| format!("--vm needs a kernel ({e}); pass `cargo ktstr export --vm --kernel SPEC NAME`"))?
            .image,
    };
    crate::vmm::builder::check_image(&image).map_err(|e| e.to_string())?;
    Ok(image)
}

/// POSIX shell single-quoting: safe for any byte string without NUL.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn basename(p: &Path) -> io::Result<String> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no file name", p.display())))
}

/// One archive member: its name inside the tarball and where it comes from.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub source: PathBuf,
    pub executable: bool,
    pub size: u64,
}

impl Member {
    fn new(name: String, source: &Path, executable: Option<bool>) -> io::Result<Member> {
        let meta = std::fs::metadata(source)?;
        let executable = executable.unwrap_or(meta.permissions().mode() & 0o111 != 0);
        Ok(Member { name, source: source.to_path_buf(), executable, size: meta.len() })
    }
}

/// The archive layout: `testbin`, `sched/{base}`, `include/{base}`,
/// `kernel/{base}`. Relative names only, so no host path leaks in.
pub fn members(test: &TestDef, exe: &Path, scheduler: Option<&Path>, kernel: Option<&Path>) -> io::Result<Vec<Member>> {
    let mut m = vec![Member::new("testbin".into(), exe, Some(true))?];
    if let Some(s) = scheduler {
        m.push(Member::new(format!("sched/{}", basename(s)?), s, Some(true))?);
    }
    for (i, f) in test.include_files.iter().map(Path::new).enumerate() {
        let name = format!("include/{}", basename(f)?);
        if m.iter().any(|x| x.name == name) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("two include files named {name}")));
        }
        m.push(Member::new(name, &test.include_source(i)?, None)?);
    }
    if let Some(k) = kernel {
        m.push(Member::new(format!("kernel/{}", basename(k)?), k, Some(false))?);
    }
    Ok(m)
}

/// Writes the preamble, then streams tar → gzip → base64 (76 columns).
pub fn write_run_file(
    target: &Target,
    exe: &Path,
    scheduler: Option<&Path>,
    kernel: Option<&Path>,
    output: &Path,
) -> io::Result<()> {
    let members = members(target.def, exe, scheduler, kernel)?;
    let script = preamble(target, kernel.is_some(), &members);
    let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".ktstr-export").tempfile_in(dir)?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        w.write_all(script.as_bytes())?;
        let wrap = LineWrap { inner: w, col: 0 };
        let b64 = base64::write::EncoderWriter::new(wrap, &STANDARD);
        let gz = GzEncoder::new(b64, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        tar.mode(tar::HeaderMode::Deterministic);
        for m in &members {
            // The size the preamble announced; a file that changed since is cut or fails.
            let f = File::open(&m.source)?;
            let len = m.size;
            let mut h = tar::Header::new_gnu();
            h.set_size(len);
            h.set_mode(if m.executable { 0o755 } else { 0o644 });
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, &m.name, f.take(len))?;
        }
        let gz = tar.into_inner()?;
        let mut b64 = gz.finish()?;
        let mut wrap = b64.finish()?;
        if wrap.col != 0 {
            wrap.inner.write_all(b"\n")?;
        }
        wrap.inner.flush()?;
    }
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o755))?;
    tmp.persist(output).map_err(|e| e.error)?;
    Ok(())
}

/// Breaks the base64 stream into 76-column lines (what `base64 -d` and
/// editors handle comfortably).
struct LineWrap<W: Write> {
    inner: W,
    col: usize,
}

impl<W: Write> Write for LineWrap<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let n = rest.len().min(76 - self.col);
            self.inner.write_all(&rest[..n])?;
            self.col += n;
            rest = &rest[n..];
            if self.col == 76 {
                self.inner.write_all(b"\n")?;
                self.col = 0;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Comment text is kept to one line and free of anything bash would read.
fn comment(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The bash preamble. Every value comes in through a quoted assignment.
pub fn preamble(target: &Target, vm: bool, members: &[Member]) -> String {
    let test = target.def;
    let q = shell_quote;
    let member = |prefix: &str| members.iter().find(|m| m.name.starts_with(prefix)).map(|m| m.name.clone());
    let mut s = String::new();
    s.push_str("#!/usr/bin/env bash\n");
    s.push_str(&format!("# ktstr reproducer for test {} (ktstr-runtime {})\n", comment(&target.exact), env!("CARGO_PKG_VERSION")));
    if vm {
        s.push_str("# Boots the embedded kernel in a VM (needs /dev/kvm, or QEMU) and runs the test in it.\n");
    } else {
        s.push_str("# Runs the test directly on this host: needs root, cgroup v2, no sched_ext scheduler\n");
        s.push_str("# already loaded, and enough CPUs.\n");
    }
    s.push_str("# Usage: ./THIS.run            run it; exit 0 pass/skip, 1 fail, 2 inconclusive\n");
    s.push_str("#                             or prerequisites not met (the test did not run)\n");
    s.push_str("#        ./THIS.run --extract DIR   only unpack the archive into DIR\n");
    let preset = test.preset.map(|p| format!(" preset={} ({})", p.name, comment(p.about))).unwrap_or_default();
    let ignored = test.ignored() || test.preset.is_some();
    s.push_str(&format!(
        "# Test: cpus={} memory_mib={} timeout_s={}{preset}{}\n",
        test.topology.total_cpus(),
        test.memory_mib,
        test.timeout_s,
        if ignored { " (ignored by default)" } else { "" }
    ));
    if let Some(sc) = test.scheduler {
        s.push_str(&format!("# Scheduler: {} {}\n", comment(sc.name), comment(&sc.args.join(" "))));
    }
    s.push_str("# Archive:\n");
    for m in members {
        s.push_str(&format!("#   {:<40} {}\n", comment(&m.name), human(m.size)));
    }
    s.push_str("set -euo pipefail\n\n");
    s.push_str(&format!("KTSTR_TEST={}\n", q(test.name)));
    s.push_str(&format!("KTSTR_EXACT={}\n", q(&target.exact)));
    s.push_str(&format!("KTSTR_MODE={}\n", q(if vm { "vm" } else { "host" })));
    s.push_str(&format!("KTSTR_NEEDS_CPUS={}\n", q(&test.topology.total_cpus().to_string())));
    s.push_str(&format!("KTSTR_SCHED={}\n", q(member("sched/").as_deref().unwrap_or(""))));
    s.push_str(&format!("KTSTR_KERNEL_IMAGE={}\n", q(member("kernel/").as_deref().unwrap_or(""))));
    s.push_str(&format!("KTSTR_IGNORED={}\n", q(if ignored { "1" } else { "" })));
    s.push_str(PREAMBLE_BODY);
    s.push_str(ARCHIVE_MARKER);
    s.push('\n');
    s
}

/// The fixed part of the preamble; values come from the assignments above.
const PREAMBLE_BODY: &str = r#"
die() { printf 'ktstr: %s\n' "$*" >&2; exit 2; }

extract() {
    local line
    line=$(awk '/^__ARCHIVE__$/ { print NR + 1; exit }' "$0")
    [ -n "$line" ] || die "no __ARCHIVE__ line in $0; the file is truncated"
    tail -n +"$line" -- "$0" | base64 -d | tar -xzf - -C "$1" \
        || die "the archive in $0 is corrupt or truncated; export it again"
}

for tool in awk base64 tar gzip mktemp; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool'; install it (coreutils, tar, gzip, gawk/mawk)"
done

case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --extract)
        [ -n "${2:-}" ] || die "--extract needs a directory"
        mkdir -p -- "$2"
        extract "$2"
        echo "extracted into $2"
        exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac

if [ "$KTSTR_MODE" = host ]; then
    [ "$(id -u)" = 0 ] || die "must run as root (the test creates cgroups and may load a sched_ext scheduler): sudo $0"
    if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]; then
        # A v1 or hybrid host: give the test a cgroup v2 mount of its own,
        # in a private mount namespace that ends with this script.
        if [ -z "${KTSTR_RUN_PRIVATE_CGROUP:-}" ] && grep -qw cgroup2 /proc/filesystems && command -v unshare >/dev/null; then
            export KTSTR_RUN_PRIVATE_CGROUP=1
            exec unshare --mount --propagation private -- \
                bash -c 'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$0" "$@"' "$0" "$@"
        fi
        die "cgroup v2 is not mounted at /sys/fs/cgroup and could not be mounted privately; boot with systemd.unified_cgroup_hierarchy=1, or export the VM variant (cargo ktstr export --vm)"
    fi
    if [ -n "${KTSTR_RUN_PRIVATE_CGROUP:-}" ]; then
        echo "ktstr: note: /sys/fs/cgroup is not cgroup v2 here; the test runs on a private cgroup v2 mount (controllers: $(cat /sys/fs/cgroup/cgroup.controllers))" >&2
    fi
    state=$(cat /sys/kernel/sched_ext/state 2>/dev/null || echo missing)
    if [ -n "$KTSTR_SCHED" ] && [ "$state" = missing ]; then
        die "this kernel has no sched_ext (CONFIG_SCHED_CLASS_EXT=y, 6.12+ needed); export the VM variant (cargo ktstr export --vm)"
    fi
    if [ "$state" != missing ] && [ "$state" != disabled ]; then
        ops=$(cat /sys/kernel/sched_ext/root/ops 2>/dev/null || echo unknown)
        die "a sched_ext scheduler ($ops) is already loaded (state: $state); stop it first (kill its scx_* process or systemctl stop scx)"
    fi
    ncpu=$(getconf _NPROCESSORS_ONLN)
    [ "$ncpu" -ge "$KTSTR_NEEDS_CPUS" ] || die "the test needs $KTSTR_NEEDS_CPUS CPUs, this host has $ncpu online"
elif [ "${KTSTR_VMM:-auto}" != tcg ] && ! [ -w /dev/kvm ]; then
    die "no write access to /dev/kvm: enable KVM and join the kvm group (sudo usermod -aG kvm \$USER, then log in again); or run with KTSTR_VMM=tcg to use QEMU TCG (slow)"
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/ktstr-$KTSTR_TEST.XXXXXX")
trap 'rm -rf -- "$dir"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

extract "$dir"
export KTSTR_INCLUDE_DIR="$dir/include"
# The runtime starts, watches and stops the scheduler it carries.
[ -z "$KTSTR_SCHED" ] || export KTSTR_SCHEDULER="$dir/$KTSTR_SCHED"

set +e
if [ "$KTSTR_MODE" = host ]; then
    "$dir/testbin" "--ktstr-run-host=$KTSTR_TEST"
else
    ignored=()
    [ -z "$KTSTR_IGNORED" ] || ignored=(--ignored)
    # A one-off run boots cold: no snapshot is written into the user's cache.
    env -u KTSTR_KERNEL_LIST -u KTSTR_KERNEL NEXTEST=1 KTSTR_TEST_KERNEL="$dir/$KTSTR_KERNEL_IMAGE" \
        KTSTR_SNAPSHOT="${KTSTR_SNAPSHOT:-0}" \
        "$dir/testbin" --exact "$KTSTR_EXACT" --nocapture ${ignored[@]+"${ignored[@]}"}
fi
rc=$?
set -e
exit "$rc"
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Scheduler;

    #[test]
    fn args() {
        assert_eq!(ExportArgs::from_args(["--list"]), None);
        let a = ExportArgs::from_args(["x", "--ktstr-export-test=t1", "--ktstr-export-output=/o/t.run", "--ktstr-export-vm"])
            .unwrap()
            .unwrap();
        assert_eq!(a, ExportArgs { name: "t1".into(), output: Some("/o/t.run".into()), vm: true, kernel: None });
        assert!(ExportArgs::from_args(["--ktstr-export-test="]).unwrap().is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc"), "'abc'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("it's $(x)"), r"'it'\''s $(x)'");
    }

    #[test]
    fn protocol_codes() {
        let a = ExportArgs { name: "nope".into(), ..Default::default() };
        assert_eq!(export(&a, None).code(), 1);
        static HOST: TestDef = TestDef { name: "h", host_only: true, ..TestDef::DEFAULT };
        let t = |def: &'static TestDef| Target { def, exact: "x".into() };
        let refused = export(&a, Some(&t(&HOST)));
        assert!(matches!(&refused, Outcome::Refused(m) if m.contains("host_only")), "{refused:?}");
        assert_eq!(refused.code(), 2);
        static NO_BIN: Scheduler = Scheduler::new("scx_ktstr_no_such_binary");
        static SCHED: TestDef = TestDef { name: "s", scheduler: Some(&NO_BIN), ..TestDef::DEFAULT };
        let refused = export(&a, Some(&t(&SCHED)));
        assert!(matches!(&refused, Outcome::Refused(m) if m.contains("scx_ktstr_no_such_binary")), "{refused:?}");
        static INC: TestDef = TestDef { name: "i", include_files: &["/nonexistent/ktstr-include"], ..TestDef::DEFAULT };
        assert!(matches!(export(&a, Some(&t(&INC))), Outcome::Refused(m) if m.contains("/nonexistent/ktstr-include")));
        assert_eq!(dispatch(["--exact", "x"], |_| Ok(None)), None);
        assert_eq!(dispatch(["--ktstr-export-test=x"], |_| Ok(None)), Some(1));
        assert_eq!(dispatch(["--ktstr-export-test=x"], |_| Err("no such variant".into())), Some(2));
    }

    use crate::nextest::tests::{SMALL, VM};

    #[test]
    fn lookup_plain_and_gauntlet_names() {
        let tests: &[&'static TestDef] = &[&VM, &SMALL];
        for name in ["vm", "ktstr/vm"] {
            let t = lookup(name, tests).unwrap().unwrap();
            assert_eq!((t.def.name, t.exact.as_str(), t.stem()), ("vm", "ktstr/vm", "vm".to_string()));
        }
        let t = lookup("gauntlet/small/llc2", tests).unwrap().unwrap();
        assert_eq!((t.exact.as_str(), t.stem()), ("gauntlet/small/llc2", "small-llc2".to_string()));
        assert_eq!(t.def.topology.total_cpus(), 4, "the variant carries the preset's topology");
        assert_eq!(t.def.preset.map(|p| p.name), Some("llc2"));
        // Not in this binary: another one may have it.
        assert!(lookup("gauntlet/other/llc2", tests).unwrap().is_none());
        assert!(lookup("other", tests).unwrap().is_none());
        // Here, but no such variant: refused with the reason.
        let e = lookup("gauntlet/small/llc4", tests).unwrap_err();
        assert!(e.contains("no gauntlet variant on preset llc4"), "{e}");
        let e = lookup("gauntlet/small/llc2/kernel_6_12", tests).unwrap_err();
        assert!(e.contains("drop /kernel_6_12") && e.contains("--kernel SPEC gauntlet/small/llc2"), "{e}");
        let e = lookup("gauntlet/small/llc99", tests).unwrap_err();
        assert!(e.contains("unknown gauntlet preset \"llc99\"") && e.contains("tiny"), "{e}");
    }

    #[test]
    fn gauntlet_variant_exports_only_with_vm() {
        let t = lookup("gauntlet/small/tiny", &[&SMALL]).unwrap().unwrap();
        let a = ExportArgs { name: "gauntlet/small/tiny".into(), ..Default::default() };
        let o = export(&a, Some(&t));
        assert!(matches!(&o, Outcome::Refused(m) if m.contains("cargo ktstr export --vm gauntlet/small/tiny")), "{o:?}");

        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("v.run");
        let exe = std::env::current_exe().unwrap();
        let kernel = d.path().join("bzImage");
        std::fs::write(&kernel, "not really a kernel").unwrap();
        write_run_file(&t, &exe, None, Some(&kernel), &out).unwrap();
        let text = std::fs::read(&out).unwrap();
        let head = String::from_utf8_lossy(&text[..4096.min(text.len())]).to_string();
        assert!(head.contains("KTSTR_EXACT='gauntlet/small/tiny'"), "{head}");
        assert!(head.contains("KTSTR_IGNORED='1'"), "variants are ignored by default: {head}");
        assert!(head.contains("cpus=2") && head.contains("preset=tiny"), "{head}");
    }

    #[test]
    fn archive_roundtrip_and_syntax() {
        let d = tempfile::tempdir().unwrap();
        let inc = d.path().join("it's data.txt");
        std::fs::write(&inc, "hello").unwrap();
        let sched = d.path().join("scx_fake");
        std::fs::write(&sched, "#!/bin/sh\n").unwrap();
        static FAKE: Scheduler = Scheduler::new("scx_fake").args(&["--slice", "a b'c"]);
        let inc: &'static str = Box::leak(inc.display().to_string().into_boxed_str());
        let t: &'static TestDef = Box::leak(Box::new(TestDef {
            name: "weird_name",
            include_files: Box::leak(vec![inc].into_boxed_slice()),
            scheduler: Some(&FAKE),
            ..TestDef::DEFAULT
        }));
        let exe = std::env::current_exe().unwrap();
        let out = d.path().join("o.run");
        write_run_file(&Target { def: t, exact: "ktstr/weird_name".into() }, &exe, Some(&sched), None, &out).unwrap();
        let text = std::fs::read(&out).unwrap();
        let head = String::from_utf8_lossy(&text[..4096.min(text.len())]).to_string();
        assert!(head.contains("KTSTR_SCHED='sched/scx_fake'"), "{head}");
        assert!(head.contains("# Scheduler: scx_fake --slice a b'c"), "{head}");
        assert!(!head.contains(d.path().to_str().unwrap()), "preamble leaks a host path");
        let st = std::process::Command::new("bash").arg("-n").arg(&out).status().unwrap();
        assert!(st.success());
        let x = d.path().join("x");
        let o = std::process::Command::new(&out).arg("--extract").arg(&x).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(std::fs::read_to_string(x.join("include/it's data.txt")).unwrap(), "hello");
        assert_eq!(std::fs::read(x.join("testbin")).unwrap(), std::fs::read(&exe).unwrap());
        assert!(x.join("sched/scx_fake").is_file());

        // A truncated archive fails with one line and exit 2.
        let cut = d.path().join("cut.run");
        std::fs::write(&cut, &text[..text.len() - 200]).unwrap();
        std::fs::set_permissions(&cut, std::fs::Permissions::from_mode(0o755)).unwrap();
        let o = std::process::Command::new(&cut).arg("--extract").arg(d.path().join("y")).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("corrupt or truncated"), "{}", String::from_utf8_lossy(&o.stderr));
    }
}
