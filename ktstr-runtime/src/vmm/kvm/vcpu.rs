//! vCPU state setup (CPUID, MSRs, LAPIC, FPU, entry registers) and the
//! per-vCPU run loop that dispatches exits to the devices.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_run, CpuId, Msrs, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::cpuid;
use super::devices::Event;
use super::exits::{Cause, EmulationFailure, Shared};
use super::loader::BootEntry;
use super::memory::STACK_TOP;
use super::paging;
use crate::vmm::{Topology, VmError};

fn kvm_err(what: &str, e: kvm_ioctls::Error) -> VmError {
    VmError::from_kvm_errno(what, e.errno())
}

/// MSRs given a defined start value; filtered by what KVM can save.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),         // SYSENTER_CS
    (0x175, 0),         // SYSENTER_ESP
    (0x176, 0),         // SYSENTER_EIP
    (0xc000_0081, 0),   // STAR
    (0xc000_0082, 0),   // LSTAR
    (0xc000_0083, 0),   // CSTAR
    (0xc000_0084, 0),   // SYSCALL_MASK
    (0xc000_0102, 0),   // KERNEL_GS_BASE
    (0x10, 0),          // TSC
    (0x1a0, 1),         // MISC_ENABLE: fast strings
    (0x2ff, 0x806),     // MTRRdefType: MTRRs on, default write-back
];

/// Everything common to the BSP and APs.
pub fn configure(vcpu: &VcpuFd, index: u32, topo: &Topology, base_cpuid: &CpuId, msr_list: &[u32]) -> Result<(), VmError> {
    let entries = cpuid::for_vcpu(base_cpuid.as_slice(), topo, index);
    let cpuid = CpuId::from_entries(&entries).map_err(|e| VmError::Host(anyhow::anyhow!("CPUID table: {e:?}")))?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| kvm_err("KVM_SET_CPUID2", e))?;

    let msrs: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .filter(|(i, _)| msr_list.contains(i))
        .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&msrs).map_err(|e| VmError::Host(anyhow::anyhow!("MSR table: {e:?}")))?;
    vcpu.set_msrs(&msrs).map_err(|e| kvm_err("KVM_SET_MSRS", e))?;

    // LINT0 takes the 8259's ExtINT, LINT1 is NMI: what firmware leaves.
    let mut lapic = vcpu.get_lapic().map_err(|e| kvm_err("KVM_GET_LAPIC", e))?;
    let set = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut v = u32::from_le_bytes([regs[off] as u8, regs[off + 1] as u8, regs[off + 2] as u8, regs[off + 3] as u8]);
        v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, 0x350, 7);
    set(&mut lapic.regs, 0x360, 4);
    vcpu.set_lapic(&lapic).map_err(|e| kvm_err("KVM_SET_LAPIC", e))?;

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| kvm_err("KVM_SET_FPU", e))?;

    if index != 0 {
        // APs wait for the guest's INIT/SIPI, in the in-kernel LAPIC.
        vcpu.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_UNINITIALIZED })
            .map_err(|e| kvm_err("KVM_SET_MP_STATE", e))?;
    }
    Ok(())
}

/// Entry registers for the BSP.
pub fn set_entry(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), VmError> {
    let mut sregs = vcpu.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?;
    if entry.long_mode {
        paging::long_mode(&mut sregs);
    } else {
        paging::protected_mode(&mut sregs);
    }
    vcpu.set_sregs(&sregs).map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
    let mut regs = vcpu.get_regs().map_err(|e| kvm_err("KVM_GET_REGS", e))?;
    regs.rflags = 2;
    regs.rip = entry.rip;
    regs.rsp = STACK_TOP;
    if entry.long_mode {
        regs.rsi = entry.params;
    } else {
        regs.rbx = entry.params;
    }
    vcpu.set_regs(&regs).map_err(|e| kvm_err("KVM_SET_REGS", e))
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Kick handler: makes a KVM_RUN that is about to start return at once;
/// one already running returns EINTR because of the signal itself.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RUN.with(|r| {
        let p = r.get();
        if !p.is_null() {
            // SAFETY: set by the owning thread while its VcpuFd is alive.
            unsafe { (*p).immediate_exit = 1 };
        }
    });
}

pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 4
}

pub fn install_kick_handler() -> Result<(), VmError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|e| VmError::Host(anyhow::anyhow!("installing the vCPU kick handler: errno {e}")))
}

/// Runs one vCPU until the VM stops; reports why through `shared`, and
/// hands the vCPU back (a save reads its state).
pub fn run_loop(index: usize, mut vcpu: VcpuFd, shared: Arc<Shared>) -> VcpuFd {
    RUN.with(|r| r.set(vcpu.get_kvm_run() as *mut kvm_run));
    loop {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let cause = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let ev = shared.devices.lock().unwrap().pio_write(index, port, data);
                match ev {
                    Event::None => None,
                    Event::Doorbell => {
                        shared.on_doorbell();
                        None
                    }
                    Event::Stop(s) => Some(Cause::Device(s)),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                shared.devices.lock().unwrap().pio_read(port, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.devices.lock().unwrap().mmio_write(index, addr, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.devices.lock().unwrap().mmio_read(addr, data);
                None
            }
            // Only without an in-kernel LAPIC; idle until kicked.
            Ok(VcpuExit::Hlt) => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                None
            }
            Ok(VcpuExit::Shutdown) => Some(Cause::TripleFault { vcpu: index }),
            Ok(VcpuExit::InternalError) => Some(Cause::Emulation(emulation_failure(index, &mut vcpu, &shared))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Some(Cause::Host(format!("vCPU {index}: KVM_EXIT_FAIL_ENTRY, reason {reason:#x} on host CPU {cpu}")))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Cause::Device(super::devices::Stop::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Cause::Device(super::devices::Stop::Reset),
                other => Cause::Host(format!("vCPU {index}: system event {other}")),
            }),
            Ok(VcpuExit::Intr) => None,
            Ok(other) => Some(Cause::Host(format!("vCPU {index}: unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(Cause::Host(format!("vCPU {index}: KVM_RUN: {e}"))),
        };
        if let Some(c) = cause {
            shared.finish(c);
            break;
        }
    }
    let cause = shared.cause.lock().unwrap().clone();
    if matches!(cause, Some(Cause::Saved)) {
        if let Err(e) = complete_io(&mut vcpu) {
            shared.vcpu_states.lock().unwrap().push((index, format!("completing its last I/O exit: {e}")));
        }
    }
    RUN.with(|r| r.set(std::ptr::null_mut()));
    // Only a timeout needs the diagnosis (and its few dozen ioctls).
    if matches!(cause, Some(Cause::Timeout)) {
        shared.vcpu_states.lock().unwrap().push((index, describe(&vcpu, &shared.mem)));
    }
    vcpu
}

/// Finishes the exit the vCPU last left KVM_RUN for (a port or MMIO
/// access: KVM writes an IN's value and steps RIP only on the next
/// KVM_RUN) without running a guest instruction, so its saved state is
/// consistent (the KVM API's advice before migration).
pub fn complete_io(vcpu: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(drop);
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        other => other,
    }
}

/// Kernel-text-looking words on the top of a vCPU's stack: return
/// addresses, for symbolising a stuck guest with its vmlinux.
fn stack_words(vcpu: &VcpuFd, mem: &vm_memory::GuestMemoryMmap, rsp: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for i in 0..64u64 {
        let va = rsp.wrapping_add(i * 8);
        let Ok(t) = vcpu.translate_gva(va) else { break };
        if t.valid == 0 {
            break;
        }
        let Ok(w) = mem.read_obj::<u64>(GuestAddress(t.physical_address)) else { break };
        if (0xffff_ffff_8000_0000..0xffff_ffff_c000_0000).contains(&w) {
            out.push(w);
            if out.len() == 12 {
                break;
            }
        }
    }
    out
}

/// One line of a stopped vCPU's state, for a timeout's diagnosis: where
/// it was (RIP, CPL), whether it could take interrupts, and its MP state.
pub fn describe(vcpu: &VcpuFd, mem: &vm_memory::GuestMemoryMmap) -> String {
    let regs = vcpu.get_regs();
    let sregs = vcpu.get_sregs();
    let mp = vcpu.get_mp_state().map(|m| match m.mp_state {
        kvm_bindings::KVM_MP_STATE_RUNNABLE => "runnable".to_string(),
        KVM_MP_STATE_UNINITIALIZED => "uninitialized (never started)".to_string(),
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "INIT received".to_string(),
        kvm_bindings::KVM_MP_STATE_HALTED => "halted".to_string(),
        kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => "SIPI received".to_string(),
        other => format!("mp_state {other}"),
    });
    match (regs, sregs, mp) {
        (Ok(r), Ok(s), Ok(mp)) => {
            let stack: Vec<String> = stack_words(vcpu, mem, r.rsp).iter().map(|w| format!("{w:#x}")).collect();
            format!(
                "rip {:#x} rsp {:#x} cpl {} if {} {mp}; stack text words [{}]",
                r.rip,
                r.rsp,
                s.cs.selector & 3,
                (r.rflags >> 9) & 1,
                stack.join(" ")
            )
        }
        (r, s, mp) => format!("state unreadable: {:?}", r.err().or(s.err()).or(mp.err())),
    }
}

/// Reads what KVM reports about an exit it could not emulate.
fn emulation_failure(index: usize, vcpu: &mut VcpuFd, shared: &Shared) -> EmulationFailure {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live union member.
    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
    let n = (internal.ndata as usize).min(16);
    let data = &internal.data[..n];
    // `struct kvm_run.emulation_failure`: data[0] is flags; with
    // KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, the next 16
    // bytes are insn_size then up to 15 instruction bytes.
    let mut insn: Vec<u8> = Vec::new();
    if internal.suberror == 1 && n >= 3 && data[0] & 1 != 0 {
        let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
        let len = (raw[0] as usize).min(15);
        insn = raw[1..1 + len].to_vec();
    }
    if insn.is_empty() {
        if let Ok(t) = vcpu.translate_gva(rip) {
            if t.valid != 0 {
                let mut b = [0u8; 15];
                if shared.mem.read_slice(&mut b, GuestAddress(t.physical_address)).is_ok() {
                    insn = b.to_vec();
                }
            }
        }
    }
    EmulationFailure { vcpu: index, rip, suberror: internal.suberror, insn }
}
