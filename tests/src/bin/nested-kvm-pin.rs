//! Holds the outer kernel's KVM static keys on, for the nested-KVM rig
//! (scripts/nested-kvm.sh): run once in the outer guest while only its boot
//! CPU is online, before the others come up, and left running.
//!
//! Creating and destroying VMs flips static keys (`preempt_notifier_key`,
//! KVM's `kvm_has_noapic_vcpu`, `apic_hw_disabled`, `apic_sw_disabled`),
//! and each flip re-patches kernel text. Under multi-threaded QEMU TCG
//! another outer vCPU can then run a stale translation of that text and
//! die with `Oops: int3` (docs/vmm.md). While this process holds one VM of
//! each kind, every one of those counts stays above zero, so inner VMs
//! coming and going never re-patch anything.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::Kvm;

/// MSR_IA32_APICBASE: 0 turns the vCPU's local APIC off (hardware-disabled).
const MSR_IA32_APICBASE: u32 = 0x1b;

fn main() {
    if let Err(e) = pin() {
        eprintln!("nested-kvm-pin: {e}");
        std::process::exit(1);
    }
    println!("nested-kvm-pin: holding KVM's static keys");
    loop {
        std::thread::park();
    }
}

fn pin() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    // A VM with an in-kernel irqchip: its vCPU's APIC is created
    // software-disabled (apic_sw_disabled) and preempt notifiers go on;
    // turning the APIC off holds apic_hw_disabled too.
    let with_apic = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    with_apic.create_irq_chip().map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
    let vcpu = with_apic.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU (irqchip): {e}"))?;
    let msrs =
        Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_APICBASE, data: 0, ..Default::default() }]).map_err(|e| format!("MSR list: {e:?}"))?;
    let n = vcpu.set_msrs(&msrs).map_err(|e| format!("KVM_SET_MSRS(APICBASE=0): {e}"))?;
    if n != 1 {
        return Err("KVM_SET_MSRS(APICBASE=0) set no MSR".into());
    }
    // A vCPU without an in-kernel APIC holds kvm_has_noapic_vcpu.
    let no_apic = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let vcpu2 = no_apic.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU (no irqchip): {e}"))?;
    // Keep every descriptor open for the life of the process.
    std::mem::forget((kvm, with_apic, vcpu, no_apic, vcpu2));
    Ok(())
}
