//! Our KVM VMM (x86_64): boots a kernel, or a raw micro-guest, on
//! `/dev/kvm` with rust-vmm crates.
//!
//! One module per concept: `memory` (layout, RAM, e820), `gdt`/`paging`
//! (entry CPU state), `loader`/`boot_params` (kernel, initrd, zero page,
//! PVH), `cpuid` (topology leaves), `acpi` (tables), `serial`/`devices`
//! (port and MMIO devices), `vcpu` (setup + run loop), `exits` (stop
//! causes), `machine` (the VM), `selftest` (can this KVM boot kernels?),
//! `asm` (a tiny code emitter for micro-guests).
//!
//! Internal API for tests, the self-test and benches: `Machine::new(topo,
//! mib)`, then `load_raw(code)` (64-bit, paging on, at `memory::RAW_CODE`)
//! or `load_kernel(cfg)`, optionally `set_channel(region)`, then
//! `run(timeout) -> Outcome` (stop cause, exit kind, both UARTs, test-port
//! and MMIO write logs, doorbells, decoded channel, guest memory).

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

/// Boots `cfg` on KVM and waits for it to stop or time out.
pub fn run(cfg: &VmConfig) -> Result<VmResult, VmError> {
    let start = std::time::Instant::now();
    if !matches!(cfg.start, super::Start::Boot) {
        // Saving vCPU, device and memory state is the next step (issue 13, item 3).
        return Err(VmError::Snapshot("the KVM backend cannot save or restore VMs yet".into()));
    }
    let boot = super::boot_cpus::BootCpus::from_env(KVM_BOOT_CPUS_ENV, super::boot_cpus::BootCpus::All)?;
    let cfg = &VmConfig { cmdline: boot.cmdline(&cfg.cmdline, cfg.topology.total_cpus()), ..cfg.clone() };
    let mut m = Machine::new(cfg.topology, cfg.memory_mib)?;
    m.load_kernel(cfg)?;
    let mut out = m.run(cfg.timeout)?;
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
        timings: Timings { setup: out.setup, to_init: out.to_init, total: start.elapsed(), vcpu_wait: None, ..Default::default() },
    })
}

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
