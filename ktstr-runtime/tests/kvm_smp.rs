//! Several vCPUs: the BSP wakes the APs with INIT/SIPI through its local
//! APIC; each AP reports its CPUID APIC id from real mode, and the last
//! one to arrive powers the VM off.

use std::time::Duration;

use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, S5_POWER_OFF};
use ktstr_runtime::vmm::kvm::asm::{Asm, Reg};
use ktstr_runtime::vmm::kvm::cpuid;
use ktstr_runtime::vmm::kvm::devices::TEST_PORT;
use ktstr_runtime::vmm::kvm::memory::{LAPIC_ADDR, RAW_CODE};
use ktstr_runtime::vmm::kvm::Machine;
use ktstr_runtime::testing;
use ktstr_runtime::vmm::{ExitKind, Topology};
use vm_memory::{Bytes, GuestAddress};

const TRAMPOLINE: u64 = 0x8000;
const COUNTER: u16 = 0x6000;

/// 16-bit AP code at the SIPI vector page.
fn ap_trampoline(aps: u8) -> Vec<u8> {
    let [plo, phi] = TEST_PORT.to_le_bytes();
    let [clo, chi] = COUNTER.to_le_bytes();
    let [pm_lo, pm_hi] = PM1A_CNT_PORT.to_le_bytes();
    let [s5_lo, s5_hi] = S5_POWER_OFF.to_le_bytes();
    vec![
        0x66, 0xb8, 1, 0, 0, 0, // mov eax, 1
        0x0f, 0xa2, // cpuid
        0x66, 0xc1, 0xeb, 24, // shr ebx, 24: initial APIC id
        0xba, plo, phi, // mov dx, TEST_PORT
        0x66, 0x89, 0xd8, // mov eax, ebx
        0x66, 0xef, // out dx, eax
        0xb0, 1, // mov al, 1
        0xf0, 0x0f, 0xc0, 0x06, clo, chi, // lock xadd [COUNTER], al
        0x3c, aps - 1, // cmp al, aps-1: am I the last AP?
        0x75, 7, // jne halt
        0xba, pm_lo, pm_hi, // mov dx, PM1a_CNT
        0xb8, s5_lo, s5_hi, // mov ax, SLP_EN|S5
        0xef, // out dx, ax
        0xfa, 0xf4, 0xeb, 0xfd, // halt: cli; hlt; jmp halt
    ]
}

fn wake_all(topo: Topology) {
    let Some(mut m) = testing::kvm(Machine::new(topo, 64)) else { return };
    let n = topo.total_cpus();
    m.memory().write_slice(&ap_trampoline(n as u8 - 1), GuestAddress(TRAMPOLINE)).unwrap();
    let mut a = Asm::new(RAW_CODE);
    a.mov32(Reg::Rax, 1).cpuid().mov_rr(Reg::Rax, Reg::Rbx).shr64(Reg::Rax, 24).out_eax(TEST_PORT);
    a.wake_all_aps(LAPIC_ADDR, TRAMPOLINE);
    a.halt_forever();
    m.load_raw(&a.finish()).unwrap();
    let out = m.run(Duration::from_secs(30)).unwrap();
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
    let mut seen: Vec<(usize, u32)> = out.port_writes.iter().map(|w| (w.vcpu, w.value)).collect();
    seen.sort();
    let want: Vec<(usize, u32)> = (0..n).map(|c| (c as usize, cpuid::apic_id(&topo, c))).collect();
    assert_eq!(seen, want, "every vCPU reports its own APIC id");
}

#[test]
fn kvm_smp_init_sipi_4_cpus() {
    wake_all(Topology::cpus(4));
}

#[test]
fn kvm_smp_init_sipi_sparse_apic_ids() {
    // 3 cores per LLC: APIC ids 0,1,2,4,5,6.
    wake_all(Topology::new(1, 2, 3, 1));
}
