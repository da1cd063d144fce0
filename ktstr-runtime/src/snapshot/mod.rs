//! Boot once, run many: VM snapshots at the guest's ready point.
//!
//! The first VM test of a (kernel, topology, memory, …) boots a generic
//! init to the ready point ([`crate::guest::ready`]: filesystems mounted,
//! every CPU online, waiting on the inbox) and the backend saves the VM
//! there. Every test then starts from a fresh restore of that save and
//! hands the guest its payload ([`payload`]): the same archive a cold
//! boot packs (test binary, libraries, include files, host tools,
//! scheduler), the test's name, the host's time and a random seed. The
//! verdict path is the cold boot's.
//!
//! Saves live in `{kernel cache root}/.snapshots/{key}/` (`state`: the
//! VM's migration stream (QEMU) or machine state (KVM); `ram0`…: guest
//! RAM, sparse; `initrd.cpio`: the ready init's archive;
//! `meta.json`: the key's inputs and the state's CRC32), locked like
//! kernel cache entries (`{key}.lock` beside the directory: shared while
//! a VM restores from it, exclusive to write or remove it), and removed
//! by `cargo ktstr kernel clean` (and, least recently used first, once
//! the store outgrows its budget: [`budget`]). The key covers everything that shapes
//! the saved VM ([`KeyInputs`]), so a changed kernel, topology, memory
//! size, `ktstr.kconfig`, runtime, backend, QEMU or KVM state format
//! never reuses a save.
//!
//! Control: `KTSTR_SNAPSHOT=1` turns snapshots on, `0` off (default:
//! [`DEFAULT_ON`]); a test with `cold_boot` or its own `cmdline` always
//! boots cold. A missing save is created; a stale, corrupt or failing one
//! gives one warning and a cold boot.

pub mod budget;
pub mod payload;
pub mod sparse;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kernel_build::cache::EntryLock;
use kernel_build::Cache;

use crate::guest::ready::READY_ARG;
use sparse::files_crc;
use crate::registry::TestDef;
use crate::vmm::qemu::{BootCpus, TcgThread};
use crate::vmm::{BackendKind, Start, Vm, VmError, VmResult};

/// `KTSTR_SNAPSHOT=1|0`.
pub const ENV: &str = "KTSTR_SNAPSHOT";
/// Whether snapshots are used without `KTSTR_SNAPSHOT`, before the backend
/// is known; [`default_on`] then decides per backend.
pub const DEFAULT_ON: bool = true;

/// Whether `kind` uses snapshots without `KTSTR_SNAPSHOT=1`: QEMU TCG,
/// where every test ran restored in CI; not yet KVM, whose restores have
/// only run in the nested-KVM rig, never on a KVM host of its own.
pub fn default_on(kind: BackendKind) -> bool {
    kind == BackendKind::QemuTcg
}
/// The directory under the kernel cache root.
pub const DIR: &str = kernel_build::cache::SNAPSHOT_DIR;
/// Bumped when the layout of a save or its key changes.
const SCHEMA: u32 = 2;
/// How long a test waits for another test that is writing the save it needs.
const LOCK_WAIT: Duration = Duration::from_secs(180);
/// Boot to the ready point: twice a cold boot's allowance.
fn ready_timeout(def: &TestDef) -> Duration {
    Duration::from_secs(crate::host::boot_allowance_s(def.topology.total_cpus()) * 2)
}

/// `KTSTR_SNAPSHOT` as a switch: `Ok(None)` when unset.
pub fn env_switch() -> Result<Option<bool>, String> {
    parse_switch(std::env::var(ENV).ok().as_deref())
}

/// A `KTSTR_SNAPSHOT` value as a switch: `Ok(None)` when unset or empty.
pub fn parse_switch(value: Option<&str>) -> Result<Option<bool>, String> {
    match value {
        None | Some("") => Ok(None),
        Some("1" | "on" | "true") => Ok(Some(true)),
        Some("0" | "off" | "false") => Ok(Some(false)),
        Some(v) => Err(format!(
            "{ENV}={v:?} is not a switch; use 1 (snapshots on) or 0 (off)"
        )),
    }
}

/// Why `def` boots cold whatever the switch says.
pub fn cold_boot_reason(def: &TestDef) -> Option<&'static str> {
    if def.cold_boot {
        Some("the test sets cold_boot")
    } else if !def.cmdline.is_empty() {
        // The saved VM booted with ktstr's command line, not the test's.
        Some("the test sets its own kernel cmdline")
    } else {
        None
    }
}

/// How one VM test started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StartKind {
    /// A cold boot (snapshots off, or the test opts out).
    Cold,
    /// Restored from a save; `created`: this test wrote the save first.
    Restored { created: bool },
    /// Snapshots were on but this one booted cold; the reason was warned.
    Fallback { reason: String },
}

/// Where saves live and whether to use them; tests point it elsewhere.
#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    /// `KTSTR_SNAPSHOT=1` said so: every backend uses them, not only
    /// those [`default_on`] names.
    pub explicit: bool,
}

impl Options {
    /// Saves in the kernel cache; `explicit`: `KTSTR_SNAPSHOT=1` was given.
    pub fn in_cache(explicit: bool) -> Self {
        Self {
            root: crate::discovery::cache_root().join(DIR),
            explicit,
        }
    }
}

/// Everything that shapes the saved VM. Two runs share a save only if
/// every field is equal (the key is their CRC32, and `meta.json` keeps
/// them to check).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyInputs {
    pub schema: u32,
    /// SHA-256 prefix and length of the kernel image.
    pub image_sha: String,
    pub image_len: u64,
    pub cpus: u32,
    pub numa_nodes: u32,
    pub memory_mib: u64,
    /// The backend's whole command line for the VM (topology, memory,
    /// NUMA distances, kernel command line, `KTSTR_QEMU_ARGS`) with the
    /// per-run paths left out.
    pub vm: String,
    /// CRC32 of the embedded `ktstr.kconfig`.
    pub kconfig: String,
    /// The runtime's version and the source of what runs at the ready point.
    pub runtime: String,
    /// The backend that saves and restores (`kvm`, `qemu-tcg`).
    pub backend: String,
    /// The VMM under it: the QEMU binary (path, size, modification
    /// time), or the KVM host (kernel release, CPU) and state format.
    pub vmm: String,
}

impl KeyInputs {
    /// `{image sha}-{cpus}c{nodes}n-{mem}m-{crc of all inputs}`.
    pub fn key(&self) -> String {
        let all = crc32fast::hash(&serde_json::to_vec(self).unwrap_or_default());
        let img = &self.image_sha[..self.image_sha.len().min(8)];
        format!(
            "{img}-{}c{}n-{}m-{all:08x}",
            self.cpus, self.numa_nodes, self.memory_mib
        )
    }
}

/// The source the ready point runs, and the protocol around it: any
/// change there must not restore a save made by the old code.
pub fn runtime_fingerprint() -> String {
    let parts: [&[u8]; 9] = [
        env!("CARGO_PKG_VERSION").as_bytes(),
        include_bytes!("../guest/mod.rs"),
        include_bytes!("../guest/ready.rs"),
        include_bytes!("../guest/cpus.rs"),
        include_bytes!("../channel.rs"),
        include_bytes!("payload.rs"),
        include_bytes!("../vmm/qemu.rs"),
        include_bytes!("../vmm/kvm/snapshot.rs"),
        include_bytes!("../vmm/kvm/vcpu_state.rs"),
    ];
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    format!("{}-{:08x}", env!("CARGO_PKG_VERSION"), h.finalize())
}

/// The QEMU binary on `PATH` by path, size and modification time: any
/// upgrade changes it. (Asking `--version` costs a QEMU start, 200 ms on a
/// loaded host, for every test.)
fn qemu_version() -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let path = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|q| q.is_file())
        })
        .ok_or("qemu-system-x86_64 not found on PATH")?;
    let real = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let m = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    Ok(format!(
        "{} size={} mtime={}.{}",
        real.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// First 16 hex digits of the SHA-256 of a file (a bzImage's CRC32 is
/// constant: the build appends the bytes that make it 0xffffffff).
fn file_sha(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let len = std::io::copy(&mut f, &mut h)?;
    Ok((
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        len,
    ))
}

/// The VM a save of `def` on `image` is made from and restored into.
fn ready_vm(
    def: &TestDef,
    image: &Path,
    initrd: &Path,
    timeout: Duration,
    start: Start,
    backend: BackendKind,
) -> Result<Vm, VmError> {
    Vm::builder()
        .kernel(image)
        .initramfs(initrd)
        .topo(def.topology)
        .memory_mib(def.memory_mib)
        .timeout(timeout)
        .cmdline(READY_ARG)
        .backend(backend)
        .start(start)
        .build()
}

impl KeyInputs {
    /// The inputs for `def` on `image` under this host's `backend`.
    pub fn of(def: &TestDef, image: &Path, backend: BackendKind) -> Result<Self, String> {
        let vmm = match backend {
            BackendKind::QemuTcg => qemu_version()?,
            BackendKind::Kvm => crate::vmm::kvm::host_fingerprint(),
        };
        Self::with_vmm(def, image, backend, vmm)
    }

    /// [`KeyInputs::of`] with the VMM's version given.
    pub fn with_vmm(def: &TestDef, image: &Path, backend: BackendKind, vmm: String) -> Result<Self, String> {
        let (sha, len) = file_sha(image)
            .map_err(|e| format!("reading kernel image {}: {e}", image.display()))?;
        let vm = ready_vm(def, image, Path::new("initrd"), ready_timeout(def), Start::Boot, backend)
            .map_err(|e| e.to_string())?;
        let mut cfg = vm.config;
        cfg.kernel = PathBuf::from("kernel");
        let vm = match backend {
            BackendKind::QemuTcg => {
                let threads = TcgThread::from_env().map_err(|e| e.to_string())?;
                let boot = BootCpus::tcg_from_env().map_err(|e| e.to_string())?;
                crate::vmm::qemu::args(&cfg, Path::new("/run"), threads, boot).join(" ")
            }
            BackendKind::Kvm => crate::vmm::kvm::key_args(&cfg).map_err(|e| e.to_string())?,
        };
        Ok(Self {
            schema: SCHEMA,
            image_sha: sha,
            image_len: len,
            cpus: def.topology.total_cpus(),
            numa_nodes: def.topology.numa_nodes,
            memory_mib: def.memory_mib,
            vm,
            kconfig: kernel_build::kconfig_hash(),
            runtime: runtime_fingerprint(),
            backend: backend.to_string(),
            vmm,
        })
    }

    /// How many RAM files a save has: QEMU writes one per NUMA node, the
    /// KVM backend one for all of RAM.
    pub fn ram_files(&self) -> u32 {
        if self.backend == BackendKind::Kvm.to_string() {
            1
        } else {
            self.numa_nodes
        }
    }
}

/// `meta.json` of a save.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub key: String,
    pub inputs: KeyInputs,
    /// CRC32 of `state` and the RAM files' data, and how many bytes that
    /// is: a corrupt save is never restored.
    pub state_crc: String,
    pub state_len: u64,
    /// Seconds from QEMU's start to the ready point, and to write the state.
    pub boot_s: f64,
    pub save_s: f64,
    pub created: u64,
}

impl Meta {
    /// `state_crc` and `state_len`, as [`sparse::Crc::finish`] gives them.
    pub fn checksum(&self) -> Option<(u32, u64)> {
        Some((u32::from_str_radix(&self.state_crc, 16).ok()?, self.state_len))
    }
}

/// A save's directory and what is in it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
}

impl Entry {
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.cpio")
    }
    pub fn meta_path(&self) -> PathBuf {
        self.dir.join("meta.json")
    }
    /// The ready boot's console: a restored test's console.log starts with it.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The files a restore reads: the state, then the `rams` RAM files
    /// ([`KeyInputs::ram_files`]).
    pub fn files(&self, rams: u32) -> Vec<PathBuf> {
        std::iter::once(self.state())
            .chain((0..rams).map(|n| self.dir.join(format!("ram{n}"))))
            .collect()
    }
    pub fn meta(&self) -> Option<Meta> {
        serde_json::from_slice(&std::fs::read(self.meta_path()).ok()?).ok()
    }

    /// The save's meta if it was made from `inputs` and has all its files;
    /// else why not (`None` reason: there is no save). Cheap: the files'
    /// checksum is [`sparse::copy_checked`]'s, as a restore reads them.
    fn check(&self, inputs: &KeyInputs) -> Result<Meta, Option<String>> {
        if !self.dir.is_dir() {
            return Err(None);
        }
        let Some(meta) = self.meta() else {
            return Err(Some(format!(
                "{} is missing or unreadable",
                self.meta_path().display()
            )));
        };
        if meta.inputs != *inputs {
            return Err(Some(format!(
                "{} was made from other inputs (stale)",
                self.dir.display()
            )));
        }
        if !self.initrd().is_file() {
            return Err(Some(format!("{} is missing", self.initrd().display())));
        }
        if let Some(f) = self.files(inputs.ram_files()).into_iter().find(|f| !f.is_file()) {
            return Err(Some(format!("{} is missing", f.display())));
        }
        // The files' checksum is checked as the restore copies them.
        meta.checksum().map(|_| meta).ok_or_else(|| {
            Some(format!("{} has no valid state_crc", self.meta_path().display()))
        })
    }
}

/// One warning per process for snapshots that were on but not used.
pub fn warn_fallback(reason: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("ktstr: warning: VM snapshot not used ({reason}); booting cold"));
}

/// Runs `def` from a save (making it first if needed), handing it the
/// archive at `payload_archive`. `Ok(None)`: this backend boots cold
/// unless told otherwise ([`default_on`]); `Err` is why the caller must
/// boot cold after all.
pub fn run(
    def: &TestDef,
    image: &Path,
    payload_archive: &Path,
    opts: &Options,
) -> Result<Option<(VmResult, bool)>, String> {
    // The backend a cold boot would get; its saves are its own (the key
    // names it).
    let kind = crate::vmm::backend::select(
        crate::vmm::backend::BackendChoice::from_env().map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    if !opts.explicit && !default_on(kind) {
        return Ok(None);
    }
    let inputs = KeyInputs::of(def, image, kind)?;
    let target = Target { def, image, kind };
    let key = inputs.key();
    // Opening also removes the temp dirs of writers that were killed.
    let cache = Cache::open(Some(&opts.root)).map_err(|e| format!("{e:#}"))?;
    let entry = Entry {
        dir: cache.entry_dir(&key),
    };
    let payload = payload::Payload {
        test: def.name.to_string(),
        preset: def.preset.map(|p| p.name.to_string()),
        cpus: def.cpus_override,
        archive: payload_archive.to_path_buf(),
    };
    let t0 = Instant::now();
    let mut created = false;
    loop {
        if let Some(shared) =
            kernel_build::cache::try_lock_entry_shared(&entry.dir).map_err(|e| format!("{e:#}"))?
        {
            match entry.check(&inputs) {
                Ok(meta) => {
                    return restore(&target, &cache, &entry, &meta, payload, shared)
                        .map(|r| Some((r, created)))
                }
                Err(Some(why)) if created => {
                    return Err(format!("the save just written is unusable: {why}"))
                }
                Err(Some(why)) => {
                    // Stale or corrupt: this test boots cold, the next writes it again.
                    drop(shared);
                    discard(&cache, &key);
                    return Err(format!("{why}; removed it"));
                }
                Err(None) => drop(shared),
            }
            if let Some(excl) = cache
                .try_lock_exclusive(&key)
                .map_err(|e| format!("{e:#}"))?
            {
                // Another test may have written it between our two locks.
                if entry.check(&inputs).is_err() {
                    create(&target, &cache, &entry, &inputs, &excl)?;
                    created = true;
                }
                drop(excl);
                continue;
            }
        }
        if t0.elapsed() > LOCK_WAIT {
            return Err(format!(
                "snapshot {key} still locked by its writer after {}s",
                LOCK_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn entry_key(entry: &Entry) -> String {
    entry.dir.file_name().map(|k| k.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Removes a save nobody else uses (a test restoring it keeps it alive).
fn discard(cache: &Cache, key: &str) {
    let _ = cache.clean(None, &[key.to_string()]);
}

/// Recomputes a save's checksum after its files were changed on purpose
/// (tests that need a save QEMU cannot load but the checksum accepts).
pub fn reseal(dir: &Path) -> Result<(), String> {
    let entry = Entry {
        dir: dir.to_path_buf(),
    };
    let mut meta = entry
        .meta()
        .ok_or_else(|| format!("{}: no readable meta.json", dir.display()))?;
    let (crc, len) = files_crc(&entry.files(meta.inputs.ram_files()))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    meta.state_crc = format!("{crc:08x}");
    meta.state_len = len;
    std::fs::write(
        entry.meta_path(),
        serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )
    .map_err(|e| format!("writing {}: {e}", entry.meta_path().display()))
}

/// The test and kernel a save is for, and the backend that makes it.
struct Target<'a> {
    def: &'a TestDef,
    image: &'a Path,
    kind: BackendKind,
}

fn restore(
    t: &Target,
    cache: &Cache,
    entry: &Entry,
    meta: &Meta,
    payload: payload::Payload,
    lock: EntryLock,
) -> Result<VmResult, String> {
    budget::touch(&entry.dir);
    let timeout = crate::host::vm_timeout(t.def);
    let vm = ready_vm(
        t.def,
        t.image,
        &entry.initrd(),
        timeout,
        Start::Restore {
            state: entry.state(),
            checksum: meta.checksum().unwrap_or_default(),
            payload,
        },
        t.kind,
    )
    .map_err(|e| e.to_string())?;
    match vm.run() {
        Ok(mut r) => {
            r.console = with_boot_console(entry, &r.console);
            Ok(r)
        }
        Err(VmError::Snapshot(why)) => {
            drop(lock);
            // A save that cannot be restored is removed; the next test writes it again.
            discard(cache, &entry_key(entry));
            Err(format!("restoring {}: {why}", entry.dir.display()))
        }
        // Anything else (VmError::Payload: this test's payload did not
        // cross) is not the save's fault: it stays for the next test.
        Err(e) => Err(e.to_string()),
    }
}

/// A restored VM's console after the boot that made its save, so a
/// test's console.log has the kernel's boot messages as a cold boot's does.
fn with_boot_console(entry: &Entry, restored: &str) -> String {
    let Ok(boot) = std::fs::read_to_string(entry.console()) else { return restored.to_string() };
    let sep = if boot.is_empty() || boot.ends_with('\n') { "" } else { "\n" };
    format!("{boot}{sep}ktstr: restored from snapshot {} (above: the boot that made it)\n{restored}", entry_key(entry))
}

/// Boots the ready VM, saves it and stores the save at `entry` (we hold
/// its exclusive lock): built in a temp dir beside it, then renamed.
fn create(t: &Target, cache: &Cache, entry: &Entry, inputs: &KeyInputs, _lock: &EntryLock) -> Result<(), String> {
    // Locked while we write; a later Cache::open removes it if we are killed.
    let tmp = cache.temp_build(&inputs.key()).map_err(|e| format!("{e:#}"))?;
    let staged = Entry {
        dir: tmp.path().join("entry"),
    };
    std::fs::create_dir(&staged.dir).map_err(|e| format!("{}: {e}", staged.dir.display()))?;
    // The ready init is this binary; Initramfs packs it without its DWARF.
    let init = std::env::current_exe().map_err(|e| format!("cannot find the test binary: {e}"))?;
    let ir =
        crate::initramfs::Initramfs::new(&init).map_err(|e| format!("ready initramfs: {e:#}"))?;
    std::fs::write(
        staged.initrd(),
        ir.build().map_err(|e| format!("ready initramfs: {e:#}"))?,
    )
    .map_err(|e| format!("writing {}: {e}", staged.initrd().display()))?;
    let vm = ready_vm(
        t.def,
        t.image,
        &staged.initrd(),
        ready_timeout(t.def),
        Start::Save {
            state: staged.state(),
        },
        t.kind,
    )
    .map_err(|e| e.to_string())?;
    let r = vm
        .run()
        .map_err(|e| format!("booting to the ready point: {e}"))?;
    if r.exit != crate::vmm::ExitKind::Stopped || !staged.state().is_file() {
        return Err(format!(
            "the ready boot ended ({:?}) without reaching the ready point; console:\n{}",
            r.exit,
            r.console_tail(5)
        ));
    }
    std::fs::write(staged.console(), &r.console)
        .map_err(|e| format!("writing {}: {e}", staged.console().display()))?;
    let (crc, len) = files_crc(&staged.files(inputs.ram_files()))
        .map_err(|e| format!("reading the new save: {e}"))?;
    let save = r.timings.snapshot.unwrap_or_default();
    let meta = Meta {
        key: inputs.key(),
        inputs: inputs.clone(),
        state_crc: format!("{crc:08x}"),
        state_len: len,
        boot_s: (r.timings.total.saturating_sub(save)).as_secs_f64(),
        save_s: save.as_secs_f64(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    std::fs::write(
        staged.meta_path(),
        serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )
    .map_err(|e| format!("writing {}: {e}", staged.meta_path().display()))?;
    if entry.dir.exists() {
        // A stale or corrupt save under our exclusive lock.
        let _ = std::fs::remove_dir_all(&entry.dir);
    }
    std::fs::rename(&staged.dir, &entry.dir)
        .map_err(|e| format!("storing {}: {e}", entry.dir.display()))?;
    eprintln!(
        "ktstr: snapshot {}: ready point after {:.2}s, saved in {:.2}s ({} MiB)",
        meta.key,
        meta.boot_s,
        meta.save_s,
        len >> 20
    );
    let limit = budget::from_env();
    let gone = budget::prune(cache, limit, &meta.key);
    if !gone.is_empty() {
        eprintln!("ktstr: snapshot store over {} MiB ({}): removed {} least recently used save(s)", limit >> 20, budget::ENV, gone.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(mem: u64) -> TestDef {
        TestDef {
            name: "t",
            memory_mib: mem,
            ..TestDef::DEFAULT
        }
    }

    fn fake_image(dir: &Path) -> PathBuf {
        let p = dir.join("bzImage");
        let mut hdr = vec![0u8; 4096];
        hdr[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&p, hdr).unwrap();
        p
    }

    #[test]
    fn key_changes_with_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let img = fake_image(dir.path());
        let of = |d: &TestDef| {
            KeyInputs::with_vmm(d, &img, BackendKind::QemuTcg, "QEMU emulator version 7.2.22".into()).unwrap()
        };
        let base = of(&def(512));
        assert_eq!(of(&def(512)).key(), base.key(), "same inputs, same key");
        let mem = of(&def(768));
        assert_ne!(mem.key(), base.key());
        assert!(mem.key().contains("-768m-"), "{}", mem.key());
        let topo = of(&TestDef {
            topology: crate::vmm::Topology::cpus(4),
            ..def(512)
        });
        assert_ne!(topo.key(), base.key());
        // Same CPU count, other shape: only the VM's arguments differ.
        let llcs = of(&TestDef {
            topology: crate::vmm::Topology::new(1, 2, 2, 1),
            ..def(512)
        });
        assert_ne!(llcs.key(), topo.key());
        assert_eq!(llcs.cpus, topo.cpus);
        let mut hdr = std::fs::read(&img).unwrap();
        hdr[100] = 1;
        std::fs::write(&img, hdr).unwrap();
        let kernel = of(&def(512));
        assert_ne!(kernel.key(), base.key(), "a changed kernel image");
        for tweak in [
            |k: &mut KeyInputs| k.kconfig.push('x'),
            |k: &mut KeyInputs| k.runtime.push('x'),
            |k: &mut KeyInputs| k.vmm.push('x'),
            |k: &mut KeyInputs| k.backend.push('x'),
        ] {
            let mut k = base.clone();
            tweak(&mut k);
            assert_ne!(k.key(), base.key());
        }
    }

    #[test]
    fn kvm_keys_name_the_backend_and_its_vm_shape() {
        let dir = tempfile::tempdir().unwrap();
        let img = fake_image(dir.path());
        let kvm = |d: &TestDef| KeyInputs::with_vmm(d, &img, BackendKind::Kvm, "kvm host".into()).unwrap();
        let base = kvm(&def(512));
        let tcg = KeyInputs::with_vmm(&def(512), &img, BackendKind::QemuTcg, "kvm host".into()).unwrap();
        assert_ne!(base.key(), tcg.key(), "a QEMU save is never restored on KVM");
        assert!(base.vm.starts_with("kvm state-format="), "{}", base.vm);
        assert!(base.vm.contains(READY_ARG), "the command line is in the key: {}", base.vm);
        assert_eq!(kvm(&def(512)).key(), base.key());
        assert_ne!(kvm(&def(768)).key(), base.key());
        let llcs = kvm(&TestDef { topology: crate::vmm::Topology::new(1, 2, 2, 1), ..def(512) });
        let flat = kvm(&TestDef { topology: crate::vmm::Topology::cpus(4), ..def(512) });
        assert_ne!(llcs.key(), flat.key(), "same CPU count, other shape");
        // One RAM file for all of RAM, whatever the NUMA nodes.
        let numa = KeyInputs { numa_nodes: 2, ..base.clone() };
        assert_eq!((numa.ram_files(), KeyInputs { numa_nodes: 2, ..tcg }.ram_files()), (1, 2));
        assert!(crate::vmm::kvm::host_fingerprint().contains("state format"));
    }

    #[test]
    fn cmdline_and_cold_boot_opt_out() {
        assert_eq!(cold_boot_reason(&def(512)), None);
        assert!(cold_boot_reason(&TestDef {
            cold_boot: true,
            ..def(512)
        })
        .unwrap()
        .contains("cold_boot"));
        assert!(cold_boot_reason(&TestDef {
            cmdline: "quiet",
            ..def(512)
        })
        .unwrap()
        .contains("cmdline"));
    }

    #[test]
    fn entry_check_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let e = Entry {
            dir: dir.path().join("k"),
        };
        let inputs = KeyInputs {
            schema: SCHEMA,
            image_sha: "0000000000000000".into(),
            image_len: 1,
            cpus: 2,
            numa_nodes: 1,
            memory_mib: 512,
            vm: "args".into(),
            kconfig: "k".into(),
            runtime: runtime_fingerprint(),
            backend: BackendKind::QemuTcg.to_string(),
            vmm: "QEMU 7.2".into(),
        };
        assert_eq!(e.check(&inputs).err(), Some(None), "no save yet");
        std::fs::create_dir(&e.dir).unwrap();
        std::fs::write(e.state(), b"QEVM state").unwrap();
        std::fs::write(e.initrd(), b"cpio").unwrap();
        assert!(e.check(&inputs).unwrap_err().unwrap().contains("meta.json"));
        // A RAM file with a hole before and after its data.
        let ram = std::fs::File::create(e.dir.join("ram0")).unwrap();
        ram.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&ram, &[7u8; 4096], 32 << 20).unwrap();
        let (crc, len) = files_crc(&e.files(1)).unwrap();
        assert!(len < 1 << 20, "holes are not read: {len}");
        let meta = Meta {
            key: inputs.key(),
            inputs: inputs.clone(),
            state_crc: format!("{crc:08x}"),
            state_len: len,
            boot_s: 1.0,
            save_s: 0.1,
            created: 0,
        };
        std::fs::write(e.meta_path(), serde_json::to_vec(&meta).unwrap()).unwrap();
        assert_eq!(e.check(&inputs).map(|m| m.checksum()), Ok(Some((crc, len))));
        let other = KeyInputs {
            memory_mib: 768,
            ..inputs.clone()
        };
        assert!(e.check(&other).unwrap_err().unwrap().contains("stale"));
        // The checksum is checked as a restore copies the RAM.
        let to = tempfile::tempdir().unwrap();
        let copy = |e: &Entry| sparse::copy_checked(&e.state(), &e.files(1)[1..], to.path(), (crc, len));
        assert_eq!(copy(&e), Ok(()));
        assert_eq!(std::fs::read(e.dir.join("ram0")).unwrap(), std::fs::read(to.path().join("ram0")).unwrap());
        std::os::unix::fs::FileExt::write_all_at(&ram, &[8u8], 32 << 20).unwrap();
        assert!(copy(&e).unwrap_err().contains("corrupt"), "a changed RAM byte");
        std::os::unix::fs::FileExt::write_all_at(&ram, &[7u8], 32 << 20).unwrap();
        assert_eq!(copy(&e), Ok(()));
        std::fs::write(e.state(), b"QEVM stbte").unwrap();
        assert!(copy(&e).unwrap_err().contains("corrupt"), "a changed state byte");
        std::fs::write(e.state(), b"QEVM state").unwrap();
        std::fs::remove_file(e.dir.join("ram0")).unwrap();
        assert!(copy(&e).unwrap_err().contains("copying"));
        assert!(e.check(&inputs).unwrap_err().unwrap().contains("ram0 is missing"));
    }

    #[test]
    fn restored_console_follows_the_boot_that_made_the_save() {
        let dir = tempfile::tempdir().unwrap();
        let e = Entry { dir: dir.path().join("k1") };
        std::fs::create_dir(&e.dir).unwrap();
        assert_eq!(with_boot_console(&e, "after\n"), "after\n", "a save without its boot console");
        std::fs::write(e.console(), "Linux version 6.12\nREADY").unwrap();
        assert_eq!(
            with_boot_console(&e, "ktstr: guest: running t\n"),
            "Linux version 6.12\nREADY\nktstr: restored from snapshot k1 (above: the boot that made it)\nktstr: guest: running t\n"
        );
    }

    #[test]
    fn switch_values() {
        for (v, want) in [
            ("1", Some(true)),
            ("0", Some(false)),
            ("on", Some(true)),
            ("off", Some(false)),
            ("true", Some(true)),
            ("false", Some(false)),
            ("", None),
        ] {
            assert_eq!(parse_switch(Some(v)).unwrap(), want, "{v}");
        }
        assert!(parse_switch(Some("yes please")).unwrap_err().contains("use 1"));
        assert_eq!(parse_switch(None).unwrap(), None);
    }
}
