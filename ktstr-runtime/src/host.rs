//! Host side of one test: resolve the kernel, build the initramfs with
//! this binary as `/init`, boot, and read the guest's verdict.

use std::time::Duration;

use crate::discovery::{self, DiscoveryError, Found};
use crate::guest::{supervise, TEST_ARG};
use crate::initramfs::Initramfs;
use crate::label::KernelEntry;
use crate::registry::TestDef;
use crate::verdict::{Outcome, Verdict};
use crate::vmm::{ExitKind, Vm, VmError, VmResult};

/// Time the VM gets beyond the body's own timeout: boot, init, power-off.
/// The guest enforces the body timeout; this only catches a stuck guest.
pub const BOOT_ALLOWANCE_S: u64 = 60;
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

/// Runs a `host_only` test in this process's child.
pub fn run_host_only(def: &'static TestDef) -> Verdict {
    supervise::run_body(def, false)
}

/// Boots the test's VM and returns its verdict.
pub fn run_vm(def: &'static TestDef, choice: &KernelChoice) -> Verdict {
    let found = match choice {
        KernelChoice::Discover => discovery::discover(),
        KernelChoice::Entry(e) => discovery::entry_image(e),
    };
    let found = match found {
        Ok(f) => f,
        Err(e @ DiscoveryError::NotFound { .. }) => return Verdict::skip(e.to_string()),
        Err(DiscoveryError::Bad(m)) => return Verdict::fail(m),
    };
    match boot(def, &found) {
        Ok(v) => v,
        Err(v) => v,
    }
}

/// How long a reader waits for a cache writer before skipping.
const CACHE_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Takes the shared lock (`{entry}.lock`, beside the entry directory) on
/// the cache entry holding `image`, so a writer cannot replace it while
/// the VM reads it. Images outside the cache need no lock.
fn lock_cache_entry(image: &std::path::Path, timeout: Duration) -> Result<Option<std::fs::File>, Verdict> {
    use std::os::unix::io::AsRawFd;
    let Some(dir) = image.parent().and_then(|d| d.canonicalize().ok()) else { return Ok(None) };
    let lock = std::path::PathBuf::from(format!("{}.lock", dir.display()));
    let root = discovery::cache_root().and_then(|r| r.canonicalize().ok());
    let in_cache = root.is_some_and(|r| dir.parent() == Some(r.as_path()));
    if !in_cache && !lock.exists() {
        return Ok(None);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(|e| Verdict::fail(format!("kernel cache lock {}: {e}", lock.display())))?;
    let t0 = std::time::Instant::now();
    loop {
        // SAFETY: flock on a file we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return Ok(Some(f));
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

fn boot(def: &'static TestDef, found: &Found) -> Result<Verdict, Verdict> {
    let _cache_lock = lock_cache_entry(&found.image, CACHE_LOCK_TIMEOUT)?;
    let exe = std::env::current_exe().map_err(|e| Verdict::fail(format!("cannot find the test binary: {e}")))?;
    let mut ir = Initramfs::new(&exe).map_err(|e| Verdict::fail(format!("initramfs: {e:#}")))?;
    for (i, f) in def.include_files.iter().enumerate() {
        let src = def.include_source(i).map_err(|e| Verdict::fail(format!("include_files: {f}: {e}")))?;
        ir = ir
            .file(&src, &TestDef::guest_include_path(f))
            .map_err(|e| Verdict::fail(format!("include_files: {e:#}")))?;
    }
    if let Some(s) = def.scheduler {
        // sched_ext: the scheduler binary (with its libraries) at its guest path.
        let bin = crate::scheduler::host::find_binary(s, Some(&found.image)).map_err(|e| Verdict::fail(e.to_string()))?;
        eprintln!("ktstr: {}: scheduler {} from {}", def.name, s.name, bin.display());
        ir = ir
            .file(&bin, &s.guest_path())
            .map_err(|e| Verdict::fail(format!("scheduler {}: packing {}: {e:#}", s.name, bin.display())))?;
    }
    let initrd = ir.build_cached().map_err(|e| Verdict::fail(format!("initramfs: {e:#}")))?;
    let mut b = Vm::builder()
        .kernel(&found.image)
        .initramfs(initrd)
        .topo(def.topology)
        .memory_mib(def.memory_mib)
        .timeout(Duration::from_secs(def.timeout_s + BOOT_ALLOWANCE_S))
        .cmdline(format!("{TEST_ARG}={}", def.name));
    if !def.cmdline.is_empty() {
        b = b.cmdline(def.cmdline);
    }
    let r = b.build().map_err(vm_error)?.run().map_err(vm_error)?;
    let v = interpret(def, &r);
    eprintln!(
        "ktstr: {}: kernel {} ({}), guest uname -r {}, {} backend, init after {}, total {:.2}s, {:?}",
        def.name,
        found.image.display(),
        found.how,
        if v.kernel_release.is_empty() { "?" } else { &v.kernel_release },
        r.backend,
        r.timings.to_init.map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
        r.timings.total.as_secs_f64(),
        r.exit,
    );
    Ok(v)
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
            "the guest did not finish within {}s (timeout_s {} + {}s for boot)",
            def.timeout_s + BOOT_ALLOWANCE_S,
            def.timeout_s,
            BOOT_ALLOWANCE_S
        ),
        ExitKind::TripleFault => "the guest CPU triple-faulted".to_string(),
        ExitKind::HostError(e) => format!("the VMM failed: {e}"),
        ExitKind::PowerOff | ExitKind::Reboot => format!("the guest stopped ({:?}) without a verdict", r.exit),
    };
    Verdict::fail(format!("{why} before reporting a verdict for {}", def.name))
        .with_details(format!("guest console (last lines):\n{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::error::ResourceSnapshot;

    #[test]
    fn cache_entry_lock_is_shared_and_times_out_against_a_writer() {
        use std::os::unix::io::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("6.12-tarball-x86_64-kc00000000");
        std::fs::create_dir(&entry).unwrap();
        std::fs::write(entry.join("bzImage"), b"x").unwrap();
        let t = Duration::from_millis(300);
        assert!(lock_cache_entry(&dir.path().join("elsewhere/bzImage"), t).unwrap().is_none());
        let lock = std::path::PathBuf::from(format!("{}.lock", entry.display()));
        std::fs::write(&lock, b"").unwrap();
        let a = lock_cache_entry(&entry.join("bzImage"), t).unwrap();
        let b = lock_cache_entry(&entry.join("bzImage"), t).unwrap();
        assert!(a.is_some() && b.is_some(), "readers share the lock");
        drop((a, b));
        let w = std::fs::File::open(&lock).unwrap();
        // SAFETY: flock on our own file.
        assert_eq!(unsafe { libc::flock(w.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        let v = lock_cache_entry(&entry.join("bzImage"), Duration::from_millis(300)).unwrap_err();
        assert_eq!(v.outcome, Outcome::Skip);
        assert!(v.message.contains("still locked by a writer") && v.message.contains("near_limit="), "{}", v.message);
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
        assert_eq!(vm_error(VmError::Topology("8 CPUs".into())).outcome, Outcome::Skip);
        assert_eq!(vm_error(VmError::BadImage("not a kernel".into())).outcome, Outcome::Fail);
    }
}
