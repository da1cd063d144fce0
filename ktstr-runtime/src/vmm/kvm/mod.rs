//! Our KVM VMM (x86_64): boots a kernel, or a raw micro-guest, on
//! `/dev/kvm` with rust-vmm crates.
//!
//! One module per concept: `memory` (layout, RAM, e820), `gdt`/`paging`
//! (entry CPU state), `loader`/`boot_params` (kernel, initrd, zero page,
//! PVH), `cpuid` (topology leaves), `acpi` (tables), `serial`/`devices`
//! (port and MMIO devices), `vcpu` (setup + run loop), `exits` (stop
//! causes), `machine` (the VM), `selftest` (can this KVM boot kernels?),
//! `asm` (a tiny code emitter for micro-guests), `vcpu_state` (one vCPU's
//! saved state) and `snapshot` (saving a stopped machine, mapping its RAM
//! back copy-on-write).
//!
//! Internal API for tests, the self-test and benches: `Machine::new(topo,
//! mib)`, then `load_raw(code)` (64-bit, paging on, at `memory::RAW_CODE`)
//! or `load_kernel(cfg)`, optionally `set_channel(region)`, then
//! `run(timeout) -> Outcome` (stop cause, exit kind, both UARTs, test-port
//! and MMIO write logs, doorbells, decoded channel, guest memory).
//! Snapshots: `run_and_save(timeout, SaveAt, files)` pauses and saves;
//! `Machine::restore(files)` gives a machine to `run` again.

pub mod acpi;
pub mod asm;
pub mod boot_params;
pub mod cpuid;
pub mod devices;
pub mod exits;
pub mod gdt;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod paging;
pub mod selftest;
pub mod serial;
pub mod snapshot;
pub mod vcpu;
pub mod vcpu_state;

pub use exits::{Cause, EmulationFailure};
pub use machine::{Machine, Outcome, SaveAt};

use super::{BackendKind, Timings, VmConfig, VmError, VmResult};

/// `KTSTR_KVM_BOOT_CPUS=one`: boot with `maxcpus=1` and let guest init
/// bring the other CPUs online, as the TCG backend does. For the
/// nested-KVM rig, whose KVM runs under multi-threaded QEMU TCG: TCG's
/// stale translations of re-patched kernel text (`Oops: int3`,
/// docs/vmm.md) reach the inner kernel's boot-time patching too. Default
/// `all`: every CPU at boot, which a real CPU runs safely.
pub const KVM_BOOT_CPUS_ENV: &str = "KTSTR_KVM_BOOT_CPUS";

/// The kernel command line this backend boots `cfg` with.
fn boot_cmdline(cfg: &VmConfig) -> Result<String, VmError> {
    let boot = super::boot_cpus::BootCpus::from_env(KVM_BOOT_CPUS_ENV, super::boot_cpus::BootCpus::All)?;
    Ok(boot.cmdline(&cfg.cmdline, cfg.topology.total_cpus()))
}

/// What shapes a save of `cfg` on this backend, for the snapshot key:
/// topology, memory, the command line it boots with, the channel and the
/// state format.
pub fn key_args(cfg: &VmConfig) -> Result<String, VmError> {
    let topo = serde_json::to_string(&cfg.topology).map_err(|e| VmError::Host(anyhow::anyhow!("topology: {e}")))?;
    Ok(format!(
        "kvm state-format={} topology={topo} memory-mib={} channel={:#x}+{:#x} cmdline={}",
        snapshot::FORMAT,
        cfg.memory_mib,
        cfg.channel.gpa,
        cfg.channel.size,
        boot_cmdline(cfg)?
    ))
}

/// The KVM host a save depends on: its kernel (KVM's MSR list, XSAVE
/// layout) and CPU (the CPUID the guest saw).
pub fn host_fingerprint() -> String {
    // Read once per process: /proc/cpuinfo is large on big hosts.
    static FP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FP.get_or_init(read_host_fingerprint).clone()
}

fn read_host_fingerprint() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map_or("", |(_, v)| v.trim());
    format!("kvm host kernel {} cpu {cpu}, state format {}", release.trim(), snapshot::FORMAT)
}

/// Boots `cfg` on KVM and waits for it to stop or time out; or boots to
/// the ready point and saves (`Start::Save`), or restores a save and
/// hands the guest its payload (`Start::Restore`).
pub fn run(cfg: &VmConfig) -> Result<VmResult, VmError> {
    let start = std::time::Instant::now();
    let cfg = &VmConfig { cmdline: boot_cmdline(cfg)?, ..cfg.clone() };
    let mut snapshot_time = None;
    let mut out = match &cfg.start {
        super::Start::Boot => {
            let mut m = Machine::new(cfg.topology, cfg.memory_mib)?;
            m.load_kernel(cfg)?;
            m.run(cfg.timeout)?
        }
        super::Start::Save { state } => {
            let mut m = Machine::new(cfg.topology, cfg.memory_mib)?;
            m.load_kernel(cfg)?;
            let out = m.run_and_save(cfg.timeout, SaveAt::Ready, &snapshot::Files::at(state))?;
            snapshot_time = out.saved.map(|s| s.time);
            out
        }
        super::Start::Restore { state, checksum, payload } => {
            let t = std::time::Instant::now();
            let files = snapshot::Files::at(state);
            // Read once, not copied: the RAM is mapped from the file.
            let sum = crate::snapshot::sparse::files_crc(&[files.state.clone(), files.ram.clone()])
                .map_err(|e| VmError::Snapshot(format!("reading {}: {e}", state.display())))?;
            if sum != *checksum {
                let dir = state.parent().unwrap_or(std::path::Path::new("."));
                return Err(VmError::Snapshot(format!("{} fails its checksum (corrupt)", dir.display())));
            }
            let mut m = Machine::restore(&files)?;
            if m.topology() != cfg.topology || m.memory_mib() != cfg.memory_mib || m.channel() != Some(cfg.channel) {
                return Err(VmError::Snapshot(format!(
                    "{} was saved from another VM shape ({:?}, {} MiB) than asked ({:?}, {} MiB)",
                    state.display(),
                    m.topology(),
                    m.memory_mib(),
                    cfg.topology,
                    cfg.memory_mib
                )));
            }
            if let Some(link) = &cfg.console {
                m.set_console(link.clone());
            }
            m.set_payload(payload)?;
            snapshot_time = Some(t.elapsed());
            let out = m.run(cfg.timeout)?;
            if let Some(why) = &out.payload_error {
                return Err(VmError::Payload(format!("{why}; console:\n{}", super::tail_lines(&out.console, 5))));
            }
            out
        }
    };
    if out.exit == super::ExitKind::Timeout {
        // Where each vCPU was tells a guest spinning from one waiting on
        // an interrupt that never came.
        out.console.push_str("\nktstr: kvm: vCPU states at the timeout:\n");
        for s in &out.vcpu_states {
            out.console.push_str(&format!("ktstr: kvm:   {s}\n"));
        }
    }
    let (messages, exit) = match out.messages {
        Ok(m) => (m, out.exit),
        Err(e) => (Vec::new(), super::ExitKind::HostError(e.to_string())),
    };
    Ok(VmResult {
        exit,
        backend: BackendKind::Kvm,
        console: out.console,
        com2: out.com2,
        messages,
        timings: Timings {
            setup: out.setup,
            to_init: out.to_init,
            to_body: out.to_body,
            total: start.elapsed(),
            vcpu_wait: None,
            snapshot: snapshot_time,
        },
    })
}

/// The last `n` lines of `s`.
/// One micro-guest round trip: create a 1-vCPU VM, run a guest that
/// makes one PIO exit and powers off, tear it down. For benchmarks.
pub fn micro_guest_roundtrip() -> Result<std::time::Duration, VmError> {
    let t = std::time::Instant::now();
    let mut code = asm::Asm::new(memory::RAW_CODE);
    code.outl(devices::TEST_PORT, 1).outw(acpi::PM1A_CNT_PORT, acpi::S5_POWER_OFF).halt_forever();
    let mut m = Machine::new(super::Topology::cpus(1), 64)?;
    m.load_raw(&code.finish())?;
    let out = m.run(std::time::Duration::from_secs(10))?;
    if out.exit != super::ExitKind::PowerOff || out.test_values() != [1] {
        return Err(VmError::Host(anyhow::anyhow!("micro-guest round trip ended with {:?}", out.cause)));
    }
    drop(out);
    Ok(t.elapsed())
}
