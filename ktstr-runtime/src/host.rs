//! Host side of one test: resolve the kernel, build the initramfs with
//! this binary as `/init`, boot, and read the guest's verdict.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::discovery::{self, DiscoveryError, Found};
use crate::guest::{supervise, PRESET_ARG, TEST_ARG};
use crate::initramfs::Initramfs;
use crate::label::KernelEntry;
use crate::output::Chunk;
use crate::registry::TestDef;
use crate::verdict::{Outcome, Verdict};
use crate::vmm::{ExitKind, Vm, VmError, VmResult};

/// Time the VM gets beyond the body's own timeout: boot, init, power-off.
/// The guest enforces the body timeout; this only catches a stuck guest.
/// 60 s plus half a second per vCPU: under TCG on two host cores the
/// Debian 6.12 cloud kernel took 60 s to a `cargo ktstr shell` command at
/// 128 vCPUs (ktstr's kernel 10 s), so a fixed minute would time out big
/// gauntlet presets.
pub fn boot_allowance_s(vcpus: u32) -> u64 {
    60 + u64::from(vcpus) / 2
}

/// The VM's whole timeout for `def`: its body's plus the boot allowance.
pub fn vm_timeout(def: &TestDef) -> Duration {
    Duration::from_secs(def.timeout_s + boot_allowance_s(def.topology.total_cpus()))
}
const TAIL_LINES: usize = 40;

/// Which kernel a VM test boots.
#[derive(Debug, Clone)]
pub enum KernelChoice {
    /// Single-kernel mode: env vars, then discovery.
    Discover,
    /// Multi-kernel mode: the entry named by the test's suffix.
    Entry(KernelEntry),
}

pub const KVM_HINT: &str = "enable KVM in the BIOS/kernel and give this user access to /dev/kvm (join the `kvm` group)";

fn vm_error(e: VmError) -> Verdict {
    if e.is_skip() {
        return Verdict::skip(e.to_string());
    }
    match e {
        VmError::KvmUnavailable(m) if !m.contains("kvm` group") && !m.contains("kvm group") => {
            Verdict::fail(format!("{m}; {KVM_HINT}"))
        }
        e => Verdict::fail(e.to_string()),
    }
}

/// Everything the host knows about one finished run: what
/// [`crate::conclude`] turns into the banner and the artifacts.
#[derive(Debug)]
pub struct Run {
    pub verdict: Verdict,
    /// The VM's result, when one ran.
    pub vm: Option<VmResult>,
    /// The kernel, once one was chosen; `None` on the host or when no
    /// kernel was found.
    pub kernel: Option<RunKernel>,
    /// The body's stdout/stderr, in order.
    pub output: Vec<Chunk>,
    /// True when `output` already reached our stdout/stderr (the host
    /// echoes it live); a VM's output is printed when the VM is done.
    pub output_printed: bool,
    pub wall: Duration,
    /// Cold boot or snapshot restore (`Cold` on the host).
    pub start: crate::snapshot::StartKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunKernel {
    /// The producer's label (`6.12.9`, `path_linux_1a2b3c`).
    pub label: String,
    /// Its sanitized form (`kernel_6_12_9`): the artifact directory.
    pub dir: String,
    pub image: Option<PathBuf>,
}

impl RunKernel {
    fn of_entry(e: &KernelEntry, image: Option<PathBuf>) -> Self {
        Self { label: e.label.clone(), dir: e.sanitized.clone(), image }
    }

    /// A label for an image found in single-kernel mode, by the producer's
    /// rules: a cache entry (its directory holds `metadata.json`) gives its
    /// key's version prefix; anything else `path_{name}_{hash6}` of the
    /// directory holding a `bzImage`/`vmlinuz*`/`vmlinux`, else of the file.
    pub fn of_image(image: &Path) -> Self {
        let dir = image.parent().filter(|d| !d.as_os_str().is_empty());
        let label = match dir {
            Some(d) if d.join("metadata.json").is_file() => {
                kernel_build::label::cache_key_label(&d.file_name().unwrap_or_default().to_string_lossy())
            }
            Some(d) if image.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n == "bzImage" || n == "vmlinux" || n == "vmlinuz"
            }) => kernel_build::label::path_label(d, false),
            _ => kernel_build::label::path_label(image, false),
        };
        Self { dir: crate::label::sanitize(&label), label, image: Some(image.to_path_buf()) }
    }
}

/// Runs a `host_only` test in this process's child.
pub fn run_host_only(def: &'static TestDef) -> Verdict {
    supervise::run_body(def, false)
}

/// [`run_host_only`] (or `run` wrapping it, for a scheduler) with what it
/// printed, for [`crate::conclude`].
pub fn run_on_host(run: impl FnOnce() -> Verdict) -> Run {
    let t0 = std::time::Instant::now();
    let verdict = run();
    Run {
        verdict,
        vm: None,
        kernel: None,
        output: supervise::take_host_output(),
        output_printed: true,
        wall: t0.elapsed(),
        start: crate::snapshot::StartKind::Cold,
    }
}

/// Boots the test's VM and returns its verdict.
pub fn run_vm(def: &'static TestDef, choice: &KernelChoice) -> Verdict {
    run_vm_full(def, choice).verdict
}

/// Boots the test's VM: the verdict with the VM's console, output and timings.
/// Snapshots as `KTSTR_SNAPSHOT` says ([`crate::snapshot`]).
pub fn run_vm_full(def: &'static TestDef, choice: &KernelChoice) -> Run {
    let snapshots = match crate::snapshot::env_switch() {
        Ok(on) => on.unwrap_or(crate::snapshot::DEFAULT_ON).then(|| crate::snapshot::Options::in_cache(on == Some(true))),
        // A bad switch fails the test before any VM boots.
        Err(e) => return Run {
            verdict: Verdict::fail(e),
            vm: None,
            kernel: None,
            output: Vec::new(),
            output_printed: false,
            wall: Duration::ZERO,
            start: crate::snapshot::StartKind::Cold,
        },
    };
    run_vm_with(def, choice, snapshots.as_ref())
}

/// [`run_vm_full`] with snapshots off (`None`) or kept at the given place.
pub fn run_vm_with(def: &'static TestDef, choice: &KernelChoice, snapshots: Option<&crate::snapshot::Options>) -> Run {
    let t0 = std::time::Instant::now();
    let found = match choice {
        KernelChoice::Discover => discovery::discover(),
        KernelChoice::Entry(e) => discovery::entry_image(e),
    };
    let mut run = Run {
        verdict: Verdict::pass(),
        vm: None,
        kernel: match choice {
            KernelChoice::Entry(e) => Some(RunKernel::of_entry(e, None)),
            KernelChoice::Discover => None,
        },
        output: Vec::new(),
        output_printed: false,
        wall: Duration::ZERO,
        start: crate::snapshot::StartKind::Cold,
    };
    match found {
        Ok(f) => {
            run.kernel = Some(match choice {
                KernelChoice::Entry(e) => RunKernel::of_entry(e, Some(f.image.clone())),
                KernelChoice::Discover => RunKernel::of_image(&f.image),
            });
            match boot(def, &f, snapshots, &mut run.start) {
                Ok((v, r)) => {
                    run.verdict = v;
                    run.output = crate::output::from_messages(&r.messages);
                    run.vm = Some(r);
                }
                Err(v) => run.verdict = v,
            }
        }
        Err(e @ DiscoveryError::NotFound { .. }) => run.verdict = Verdict::skip(e.to_string()),
        Err(DiscoveryError::Bad(m)) => run.verdict = Verdict::fail(m),
    }
    run.wall = t0.elapsed();
    run
}

/// How long a reader waits for a cache writer before skipping.
const CACHE_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Takes the shared lock (`{entry}.lock`, beside the entry directory) on
/// the cache entry holding `image`, so a writer cannot replace it and
/// `kernel clean` cannot remove it while the VM reads it. Images outside
/// the cache `root` (and without a lock file of their own) need no lock.
/// The lock is kernel-build's, with its check that the lock file was not
/// unlinked by a `clean` while we waited.
pub(crate) fn lock_cache_entry(
    image: &std::path::Path,
    root: &std::path::Path,
    timeout: Duration,
) -> Result<Option<kernel_build::EntryLock>, Verdict> {
    let gone = || {
        Verdict::fail(format!(
            "kernel image {} is gone (removed by `cargo ktstr kernel clean`?) before the test could lock it; rerun",
            image.display()
        ))
    };
    let Some(dir) = image.parent().and_then(|d| d.canonicalize().ok()) else { return Err(gone()) };
    let in_cache = kernel_build::Cache::at(Some(root)).key_of(image).is_some();
    if !in_cache && !kernel_build::cache::entry_lock_path(&dir).exists() {
        return Ok(None);
    }
    let t0 = std::time::Instant::now();
    loop {
        let got = kernel_build::cache::try_lock_entry_shared(&dir)
            .map_err(|e| Verdict::fail(format!("kernel cache lock for {}: {e:#}", dir.display())))?;
        if let Some(lock) = got {
            // A `clean` may have removed the entry before we locked it.
            if !image.is_file() {
                return Err(gone());
            }
            return Ok(Some(lock));
        }
        if t0.elapsed() >= timeout {
            return Err(Verdict::skip(format!(
                "transient host pressure: kernel cache entry {} still locked by a writer after {:.1}s ({})",
                dir.display(),
                timeout.as_secs_f64(),
                crate::vmm::error::ResourceSnapshot::take()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The archive a test's VM boots: this binary as `/init`, the test's
/// include files, host tools and scheduler (shared with `cargo ktstr shell --test`).
pub(crate) fn test_initramfs(def: &'static TestDef, found: &Found) -> Result<Initramfs, Verdict> {
    let exe = std::env::current_exe().map_err(|e| Verdict::fail(format!("cannot find the test binary: {e}")))?;
    let mut ir = Initramfs::new(&exe).map_err(|e| Verdict::fail(format!("initramfs: {e:#}")))?;
    for (i, f) in def.include_files.iter().enumerate() {
        let src = def.include_source(i).map_err(|e| Verdict::fail(format!("include_files: {f}: {e}")))?;
        ir = ir
            .file(&src, &TestDef::guest_include_path(f))
            .map_err(|e| Verdict::fail(format!("include_files: {e:#}")))?;
    }
    ir = crate::host_tools::pack(def, ir)?;
    if let Some(s) = def.scheduler {
        // sched_ext: the scheduler binary (with its libraries) at its guest path.
        let bin = crate::scheduler::host::find_binary(s, Some(&found.image)).map_err(|e| Verdict::fail(e.to_string()))?;
        eprintln!("ktstr: {}: scheduler {} from {}", def.name, s.name, bin.display());
        ir = ir
            .file(&bin, &s.guest_path())
            .map_err(|e| Verdict::fail(format!("scheduler {}: packing {}: {e:#}", s.name, bin.display())))?;
    }
    Ok(ir)
}

fn boot(
    def: &'static TestDef,
    found: &Found,
    snapshots: Option<&crate::snapshot::Options>,
    start: &mut crate::snapshot::StartKind,
) -> Result<(Verdict, VmResult), Verdict> {
    use crate::snapshot::{self, StartKind};
    let _cache_lock = lock_cache_entry(&found.image, &discovery::cache_root(), CACHE_LOCK_TIMEOUT)?;
    let initrd = test_initramfs(def, found)?.build_cached().map_err(|e| Verdict::fail(format!("initramfs: {e:#}")))?;
    let restored = match snapshots {
        Some(opts) if snapshot::cold_boot_reason(def).is_none() => match snapshot::run(def, &found.image, &initrd, opts) {
            Ok(Some((r, created))) => {
                *start = StartKind::Restored { created };
                Some(r)
            }
            Ok(None) => None,
            Err(reason) => {
                snapshot::warn_fallback(&reason);
                *start = StartKind::Fallback { reason };
                None
            }
        },
        _ => None,
    };
    let r = match restored {
        Some(r) => r,
        None => cold_boot(def, found, initrd)?,
    };
    let v = interpret(def, &r);
    eprintln!(
        "ktstr: {}: kernel {} ({}), guest uname -r {}, {} backend{}, init after {}, body after {}, total {:.2}s, {:?}",
        def.name,
        found.image.display(),
        found.how,
        if v.kernel_release.is_empty() { "?" } else { &v.kernel_release },
        r.backend,
        match start {
            StartKind::Restored { created: true } => " (snapshot written, restored)",
            StartKind::Restored { created: false } => " (restored from snapshot)",
            _ => "",
        },
        r.timings.to_init.map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
        r.timings.to_body.map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
        r.timings.total.as_secs_f64(),
        r.exit,
    );
    Ok((v, r))
}

fn cold_boot(def: &'static TestDef, found: &Found, initrd: PathBuf) -> Result<VmResult, Verdict> {
    let mut b = Vm::builder()
        .kernel(&found.image)
        .initramfs(initrd)
        .topo(def.topology)
        .memory_mib(def.memory_mib)
        .timeout(vm_timeout(def))
        .cmdline(format!("{TEST_ARG}={}", def.name));
    if let Some(p) = def.preset {
        b = b.cmdline(format!("{PRESET_ARG}={}", p.name));
    }
    if let Some(n) = def.cpus_override {
        b = b.cmdline(format!("{}={n}", crate::cpu_override::GUEST_ARG));
    }
    if !def.cmdline.is_empty() {
        b = b.cmdline(def.cmdline);
    }
    b.build().map_err(vm_error)?.run().map_err(vm_error)
}

/// The guest's verdict from the data channel, else the console marker;
/// without either, a failure that says how the VM ended.
pub fn interpret(def: &TestDef, r: &VmResult) -> Verdict {
    let from_channel = r
        .messages
        .iter()
        .rev()
        .filter(|m| m.kind == crate::channel::kind::RESULT)
        .find_map(|m| serde_json::from_slice::<Verdict>(&m.payload).ok());
    if let Some(mut v) = from_channel.or_else(|| Verdict::from_console(&r.console)) {
        if v.outcome == Outcome::Fail && v.details.is_empty() {
            v.details = format!("guest console (last lines):\n{}", r.console_tail(TAIL_LINES));
        }
        return v;
    }
    let tail = r.console_tail(TAIL_LINES);
    let why = match &r.exit {
        ExitKind::Panic => "the guest kernel panicked".to_string(),
        ExitKind::Timeout => format!(
            "the guest did not finish within {}s (timeout_s {} + {}s for boot, {} vCPU{})",
            vm_timeout(def).as_secs(),
            def.timeout_s,
            boot_allowance_s(def.topology.total_cpus()),
            def.topology.total_cpus(),
            if def.topology.total_cpus() == 1 { "" } else { "s" }
        ),
        ExitKind::TripleFault => "the guest CPU triple-faulted".to_string(),
        ExitKind::HostError(e) => format!("the VMM failed: {e}"),
        ExitKind::Stopped => "the host stopped the guest".to_string(),
        ExitKind::PowerOff | ExitKind::Reboot => format!("the guest stopped ({:?}) without a verdict", r.exit),
    };
    Verdict::fail(format!("{why} before reporting a verdict for {}", def.name))
        .with_details(format!("guest console (last lines):\n{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::tests::{entry as cache_entry, key};
    use crate::vmm::error::ResourceSnapshot;

    #[test]
    fn boot_allowance_grows_with_vcpus() {
        static SMALL: TestDef = TestDef { name: "s", timeout_s: 10, ..TestDef::DEFAULT };
        let big: &'static TestDef = SMALL.leak_variant(crate::preset::find("numa4-far-smt").unwrap());
        assert_eq!(vm_timeout(&SMALL).as_secs(), 10 + 61, "2 vCPUs keep about the old minute");
        // The Debian cloud kernel took 60 s to a shell at 128 vCPUs under TCG:
        // the allowance leaves that again for a loaded host.
        assert_eq!(big.topology.total_cpus(), 128);
        assert!(boot_allowance_s(128) >= 2 * 60, "{}", boot_allowance_s(128));
        assert_eq!(vm_timeout(big).as_secs(), 10 + 124);
    }

    #[test]
    fn cache_entry_lock_is_shared_and_times_out_against_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let image = cache_entry(dir.path(), "6.12-tarball", 1);
        let t = Duration::from_millis(300);
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = cache_entry(elsewhere.path(), "x", 1);
        assert!(lock_cache_entry(&outside, dir.path(), t).unwrap().is_none(), "outside the cache: no lock");
        let a = lock_cache_entry(&image, dir.path(), t).unwrap();
        let b = lock_cache_entry(&image, dir.path(), t).unwrap();
        assert!(a.is_some() && b.is_some(), "readers share the lock");
        drop((a, b));
        let cache = kernel_build::Cache::at(Some(dir.path()));
        let w = cache.try_lock_exclusive(&key("6.12-tarball")).unwrap().expect("no reader left");
        let v = lock_cache_entry(&image, dir.path(), t).unwrap_err();
        assert_eq!(v.outcome, Outcome::Skip);
        assert!(v.message.contains("still locked by a writer") && v.message.contains("near_limit="), "{}", v.message);
        drop(w);
    }

    /// The lock a test takes on the entry discovery found (the cache's
    /// newest) keeps `Cache::clean` off it for as long as it is held.
    #[test]
    fn discovered_entry_lock_stops_clean() {
        let dir = tempfile::tempdir().unwrap();
        let cache = kernel_build::Cache::open(Some(dir.path())).unwrap();
        cache_entry(dir.path(), "older", 100);
        let newest = cache_entry(dir.path(), "newest", 200);
        assert_eq!(discovery::newest_cache_entry(dir.path()), Some(newest.clone()));
        let lock = lock_cache_entry(&newest, dir.path(), Duration::from_secs(1)).unwrap();
        assert!(lock.is_some(), "an image in the cache is locked");
        let r = cache.clean(None, &[]).unwrap();
        assert_eq!(r.removed, [key("older")]);
        assert_eq!(r.locked, [key("newest")], "clean refuses the entry a running test reads");
        assert!(newest.is_file());
        drop(lock);
        assert_eq!(cache.clean(None, &[]).unwrap().removed, [key("newest")]);
        // Removed while we were about to boot it: a clear failure, not a VM on a missing file.
        let v = lock_cache_entry(&newest, dir.path(), Duration::from_secs(1)).unwrap_err();
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.message.contains("is gone"), "{}", v.message);
    }

    /// A reader that waited on a lock file which `clean` unlinked must not
    /// count that stale lock: the entry's new writer holds the new file.
    #[test]
    fn reader_does_not_trust_an_unlinked_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = key("6.12-tarball");
        let image = cache_entry(dir.path(), "6.12-tarball", 1);
        let cache = kernel_build::Cache::at(Some(dir.path()));
        let old_writer = cache.try_lock_exclusive(&key).unwrap().unwrap();
        let root = dir.path().to_path_buf();
        let img = image.clone();
        let reader = std::thread::spawn(move || lock_cache_entry(&img, &root, Duration::from_millis(1500)).map(|l| l.is_some()));
        std::thread::sleep(Duration::from_millis(300));
        // What clean + a new build do: unlink the lock file, and the new
        // writer locks a fresh one before the old lock goes away.
        std::fs::remove_file(kernel_build::cache::entry_lock_path(&dir.path().join(&key))).unwrap();
        let new_writer = cache.try_lock_exclusive(&key).unwrap().expect("fresh lock file");
        drop(old_writer);
        let v = reader.join().unwrap().expect_err("the reader must wait for the new writer");
        assert_eq!(v.outcome, Outcome::Skip, "{}", v.message);
        drop(new_writer);
        assert!(lock_cache_entry(&image, dir.path(), Duration::from_secs(1)).unwrap().is_some());
    }

    #[test]
    fn single_kernel_labels_follow_the_producer_rules() {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("6.12.117-tarball-585a4a0-x86_64-kc22c3df21");
        std::fs::create_dir(&entry).unwrap();
        std::fs::write(entry.join("metadata.json"), "{}").unwrap();
        let k = RunKernel::of_image(&entry.join("bzImage"));
        assert_eq!((k.label.as_str(), k.dir.as_str()), ("6.12.117", "kernel_6_12_117"));
        let tree = dir.path().join("linux");
        std::fs::create_dir(&tree).unwrap();
        let k = RunKernel::of_image(&tree.join("bzImage"));
        assert_eq!(k.label, kernel_build::label::path_label(&tree, false), "a plain image names its directory");
        assert!(k.dir.starts_with("kernel_path_linux_"), "{}", k.dir);
        let k = RunKernel::of_image(Path::new("/boot/vmlinuz-6.12.117+deb12-cloud-amd64"));
        assert!(k.dir.starts_with("kernel_path_vmlinuz_6_12_117_deb12_cloud_amd64_"), "{}", k.dir);
    }

    #[test]
    fn vm_errors_map_to_skip_or_fail() {
        let v = vm_error(VmError::KvmUnavailable("/dev/kvm: permission denied".into()));
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.message.contains("join the `kvm` group"), "{}", v.message);
        let snapshot = ResourceSnapshot { fds: 5, vmrss_kib: 2048, threads: 1, near_limit: false };
        let v = vm_error(VmError::Transient {
            what: "KVM_CREATE_VM".into(),
            errno: std::io::Error::from_raw_os_error(libc::EAGAIN),
            snapshot,
        });
        assert_eq!(v.outcome, Outcome::Skip);
        assert!(v.message.contains("fds=5, vmrss=2MiB, threads=1, near_limit=false"), "{}", v.message);
        let v = vm_error(VmError::Topology("512 MiB of memory does not split evenly over 3 NUMA nodes".into()));
        assert_eq!(v.outcome, Outcome::Fail, "an impossible definition is not a skip");
        assert!(v.message.contains("fix the test definition"), "{}", v.message);
        assert_eq!(vm_error(VmError::HostLimit("96 vCPUs; this host's KVM allows 64".into())).outcome, Outcome::Skip);
        assert_eq!(vm_error(VmError::BadImage("not a kernel".into())).outcome, Outcome::Fail);
    }
}
