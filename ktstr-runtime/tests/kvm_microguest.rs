//! Micro-guests on the real /dev/kvm: tiny 64-bit programs, assembled
//! here, that exercise the KVM backend's exits and devices end to end.
//! Guest code at CPL0 may run through KVM's emulator (~1M instr/s on
//! kvm_pvm hosts), so every guest is a few dozen instructions.

use std::time::{Duration, Instant};

use ktstr_runtime::channel;
use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, RESET_PORT, S5_POWER_OFF};
use ktstr_runtime::vmm::kvm::asm::{Asm, Cond, Reg};
use ktstr_runtime::vmm::kvm::devices::TEST_PORT;
use ktstr_runtime::vmm::kvm::memory::{RAW_CODE, SCRATCH_MMIO};
use ktstr_runtime::vmm::kvm::serial::{COM1_BASE, COM2_BASE};
use ktstr_runtime::vmm::kvm::{Cause, Machine, Outcome};
use ktstr_runtime::vmm::{ChannelRegion, ExitKind, Topology, VmError};

const TIMEOUT: Duration = Duration::from_secs(20);

/// None (and a SKIP line) when this host has no usable /dev/kvm.
fn machine(topo: Topology) -> Option<Machine> {
    match Machine::new(topo, 64) {
        Ok(m) => Some(m),
        Err(e @ (VmError::KvmUnavailable(_) | VmError::Transient { .. })) => {
            eprintln!("ktstr: SKIP: {e}");
            None
        }
        Err(e) => panic!("creating a KVM machine: {e}"),
    }
}

fn run(topo: Topology, build: impl FnOnce(&mut Asm)) -> Option<Outcome> {
    let mut m = machine(topo)?;
    let mut a = Asm::new(RAW_CODE);
    build(&mut a);
    m.load_raw(&a.finish()).unwrap();
    Some(m.run(TIMEOUT).unwrap())
}

fn power_off(a: &mut Asm) {
    a.outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();
}

#[test]
fn kvm_long_mode_entry_and_pio() {
    let Some(out) = run(Topology::cpus(1), |a| {
        // EFER (LMA|LME), CR0 and CR4 as the guest sees them.
        a.mov32(Reg::Rcx, 0xc000_0080).rdmsr().out_eax(TEST_PORT);
        a.read_cr(0).out_eax(TEST_PORT);
        a.read_cr(4).out_eax(TEST_PORT);
        // PIO in: the test port answers last-written + 1.
        a.mov32(Reg::Rax, 41).out_eax(TEST_PORT).in_eax(TEST_PORT).out_eax(TEST_PORT);
        power_off(a);
    }) else { return };
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
    let v = out.test_values();
    assert_eq!(v.len(), 5, "{v:x?}");
    assert_eq!(v[0] & 0x500, 0x500, "EFER.LME|LMA: {:#x}", v[0]);
    assert_eq!(v[1] & 0x8000_0001, 0x8000_0001, "CR0.PG|PE: {:#x}", v[1]);
    assert_ne!(v[2] & 0x20, 0, "CR4.PAE: {:#x}", v[2]);
    assert_eq!(&v[3..], &[41, 42]);
}
