//! One stopped vCPU's whole architectural state, read from and written
//! back to KVM in the order KVM needs, for snapshots.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    Msrs,
};
use kvm_ioctls::VcpuFd;

use crate::vmm::VmError;

fn kvm_err(what: &str, e: kvm_ioctls::Error) -> VmError {
    VmError::Snapshot(format!("{what}: {e}"))
}

/// Everything KVM keeps for one vCPU. The kvm-bindings structs carry
/// their own serde (their bytes), so the state file holds them as KVM
/// gave them.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy FPU/SSE state and every XSAVE component up to 4 KiB
    /// (AVX, AVX-512; AMX is never enabled for our guests).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    /// Pending and injected exceptions, interrupts and NMIs, the
    /// interrupt shadow, SMM and the SIPI vector.
    pub events: kvm_vcpu_events,
}

/// The MSRs of `list` (KVM_GET_MSR_INDEX_LIST) this vCPU can read back:
/// KVM stops at the first one it cannot read, so drop that one and ask again.
pub fn readable_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<u32>, VmError> {
    let mut want: Vec<u32> = list.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = want.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VmError::Snapshot(format!("MSR table: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(|e| kvm_err("KVM_GET_MSRS", e))?;
        if n == want.len() {
            return Ok(want);
        }
        want.remove(n);
    }
}

/// MSRs a restore must not lose: the TSC and its deadline timer,
/// kvmclock, the syscall entry points and the kernel's GS base.
const ESSENTIAL_MSRS: &[u32] = &[
    0x10,        // TSC
    0x6e0,       // TSC_DEADLINE
    0x11,        // KVM wall clock (old)
    0x12,        // KVM system time (old)
    0x4b56_4d00, // KVM wall clock
    0x4b56_4d01, // KVM system time
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// KVM_SET_MSRS stops at the first MSR it refuses: skip that one and
/// write the rest (as other VMMs do, since KVM lists a few it reads but
/// will not take back). Returns the refused ones.
fn write_msrs(vcpu: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<Vec<u32>, VmError> {
    let mut refused = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let table = Msrs::from_entries(rest).map_err(|e| VmError::Snapshot(format!("MSR table: {e:?}")))?;
        let n = vcpu.set_msrs(&table).map_err(|e| kvm_err("KVM_SET_MSRS", e))?;
        if n == rest.len() {
            break;
        }
        refused.push(rest[n].index);
        rest = &rest[n + 1..];
    }
    Ok(refused)
}

/// Whether this CPU is AMD's (or Hygon's): KVM runs guests with SVM there.
fn host_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The sregs to write back. On SVM, KVM_GET_SREGS reports TR as a busy
/// TSS (it ORs in the busy bit the VMCB lacks: Intel's VM entry wants
/// it), while the CPU held the available type LTR loaded. Writing the
/// busy type back changes the restored CPU's TR: on QEMU TCG's SVM (the
/// nested-KVM rig) every user-space I/O the TSS bitmap allows (ioperm:
/// the doorbell) then raises #GP, since TCG checks I/O against an
/// available TSS only. So on AMD, restore the available type.
fn restorable_sregs(saved: &kvm_sregs, amd: bool) -> kvm_sregs {
    let mut s = *saved;
    // 0xb: busy 64-bit (or 32-bit) TSS; 0x9: the same, available.
    if amd && s.tr.type_ == 0xb {
        s.tr.type_ = 0x9;
    }
    s
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN with any I/O
    /// exit completed (see [`super::vcpu::complete_io`]); `msrs` from
    /// [`readable_msrs`].
    pub fn read(vcpu: &VcpuFd, msrs: &[u32]) -> Result<Self, VmError> {
        // Events first: reading them does not change what is pending.
        let events = vcpu.get_vcpu_events().map_err(|e| kvm_err("KVM_GET_VCPU_EVENTS", e))?;
        let mp_state = vcpu.get_mp_state().map_err(|e| kvm_err("KVM_GET_MP_STATE", e))?;
        let regs = vcpu.get_regs().map_err(|e| kvm_err("KVM_GET_REGS", e))?;
        let sregs = vcpu.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?;
        let xsave = vcpu.get_xsave().map_err(|e| kvm_err("KVM_GET_XSAVE", e))?;
        let xcrs = vcpu.get_xcrs().map_err(|e| kvm_err("KVM_GET_XCRS", e))?;
        let debugregs = vcpu.get_debug_regs().map_err(|e| kvm_err("KVM_GET_DEBUGREGS", e))?;
        let lapic = vcpu.get_lapic().map_err(|e| kvm_err("KVM_GET_LAPIC", e))?;
        let entries: Vec<kvm_msr_entry> = msrs.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut table = Msrs::from_entries(&entries).map_err(|e| VmError::Snapshot(format!("MSR table: {e:?}")))?;
        let n = vcpu.get_msrs(&mut table).map_err(|e| kvm_err("KVM_GET_MSRS", e))?;
        if n != msrs.len() {
            let bad = msrs[n];
            return Err(VmError::Snapshot(format!("KVM_GET_MSRS read {n} of {} MSRs (MSR {bad:#x} unreadable)", msrs.len())));
        }
        Ok(Self { regs, sregs, xsave, xcrs, debugregs, lapic, msrs: table.as_slice().to_vec(), mp_state, events })
    }

    /// Writes the state into a freshly configured vCPU (same CPUID). The
    /// order matters: sregs (EFER, CR*, APIC base) before the MSRs and the
    /// LAPIC, the LAPIC before the MSRs (TSC deadline is armed against
    /// its timer mode), the events last (they name a pending vector the
    /// LAPIC and mode must already allow).
    pub fn write(&self, vcpu: &VcpuFd) -> Result<(), VmError> {
        vcpu.set_mp_state(self.mp_state).map_err(|e| kvm_err("KVM_SET_MP_STATE", e))?;
        vcpu.set_regs(&self.regs).map_err(|e| kvm_err("KVM_SET_REGS", e))?;
        vcpu.set_sregs(&restorable_sregs(&self.sregs, host_is_amd())).map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
        // SAFETY: `xsave` is a whole kvm_xsave that KVM_GET_XSAVE filled;
        // this process never enables dynamic XSTATE features (AMX), so
        // KVM reads no more than that struct.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(|e| kvm_err("KVM_SET_XSAVE", e))?;
        vcpu.set_xcrs(&self.xcrs).map_err(|e| kvm_err("KVM_SET_XCRS", e))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(|e| kvm_err("KVM_SET_DEBUGREGS", e))?;
        vcpu.set_lapic(&self.lapic).map_err(|e| kvm_err("KVM_SET_LAPIC", e))?;
        let refused = write_msrs(vcpu, &self.msrs)?;
        if let Some(m) = refused.iter().find(|m| ESSENTIAL_MSRS.contains(m)) {
            return Err(VmError::Snapshot(format!("KVM_SET_MSRS refused MSR {m:#x}, which the guest cannot run without")));
        }
        if !refused.is_empty() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| eprintln!("ktstr: warning: KVM refused to restore MSRs {refused:#x?}; the restored guest runs without them"));
        }
        vcpu.set_vcpu_events(&self.events).map_err(|e| kvm_err("KVM_SET_VCPU_EVENTS", e))
    }

    /// An MSR's saved value.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tr_restored_available_on_amd_only() {
        let mut saved = kvm_sregs::default();
        saved.tr.type_ = 0xb;
        saved.tr.limit = 0x206f;
        saved.cs.type_ = 0xb;
        let amd = restorable_sregs(&saved, true);
        assert_eq!((amd.tr.type_, amd.tr.limit, amd.cs.type_), (0x9, 0x206f, 0xb), "only TR's busy bit goes");
        assert_eq!(restorable_sregs(&saved, false).tr.type_, 0xb, "VMX's VM entry needs the busy TSS");
        saved.tr.type_ = 0x3; // a 16-bit busy TSS stays as it was
        assert_eq!(restorable_sregs(&saved, true).tr.type_, 0x3);
    }
}
