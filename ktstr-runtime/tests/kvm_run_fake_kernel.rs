//! `kvm::run` end to end on a stand-in kernel: a bzImage-shaped file whose
//! 64-bit entry is a micro-guest. It reads the zero page the loader built
//! (command line, e820 count), prints to both UARTs, sends the channel's
//! INIT message and powers off through ACPI: the same path a real kernel
//! takes, at a size this host's emulated CPL0 can run.

use std::time::Duration;

use ktstr_runtime::channel::{self, kind};
use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, S5_POWER_OFF};
use ktstr_runtime::vmm::kvm::asm::{Asm, Cond, Reg};
use ktstr_runtime::vmm::kvm::serial::{COM1_BASE, COM2_BASE};
use ktstr_runtime::testing;
use ktstr_runtime::vmm::{BackendKind, ChannelRegion, ExitKind, Vm};

mod common;

use common::{bzimage, LOAD};

fn guest(ch: ChannelRegion) -> Vec<u8> {
    let mut a = Asm::new(LOAD + 0x200);
    a.mov_rr(Reg::Rbx, Reg::Rsi); // RSI: the zero page
    a.load32(Reg::Rsi, Reg::Rbx, 0x228); // hdr.cmd_line_ptr
    a.mov32(Reg::Rdx, COM1_BASE.into());
    let (top, done) = (a.label(), a.label());
    a.bind(top).bytes(&[0x0f, 0xb6, 0x06, 0x84, 0xc0]); // movzx eax, byte [rsi]; test al, al
    a.jcc(Cond::E, done).bytes(&[0xee, 0x48, 0xff, 0xc6]).jmp(top); // out dx, al; inc rsi
    a.bind(done).puts(COM1_BASE, "\n");
    a.puts(COM2_BASE, "e820=");
    a.mov32(Reg::Rdx, COM2_BASE.into()).bytes(&[0x8a, 0x83]).bytes(&0x1e8u32.to_le_bytes()); // mov al, [rbx+0x1e8]
    a.bytes(&[0x04, b'0', 0xee]); // add al, '0'; out dx, al
    // INIT record (empty payload, crc32("") = 0), then the header.
    a.mov64(Reg::Rdi, ch.gpa);
    a.mov64(Reg::Rax, kind::INIT.into()).store64(Reg::Rdi, 4096, Reg::Rax);
    a.mov64(Reg::Rax, 0).store64(Reg::Rdi, 4104, Reg::Rax);
    a.mov64(Reg::Rax, u64::from_le_bytes(*channel::MAGIC)).store64(Reg::Rdi, 0, Reg::Rax);
    a.mov64(Reg::Rax, ch.size - 4096).store64(Reg::Rdi, 8, Reg::Rax);
    a.mov64(Reg::Rax, 16).store64(Reg::Rdi, 16, Reg::Rax);
    a.outb(channel::DOORBELL_PORT, 1);
    a.outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();
    a.finish()
}


#[test]
fn kvm_run_boots_a_stand_in_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bzImage");
    // Build once to learn the channel address, then write the image.
    std::fs::write(&path, bzimage(&[])).unwrap();
    let vm = Vm::builder()
        .kernel(&path)
        .memory_mib(128)
        .channel_mib(1)
        .cmdline("ktstr.stand_in=1")
        .timeout(Duration::from_secs(60))
        .backend(BackendKind::Kvm)
        .build()
        .unwrap();
    std::fs::write(&path, bzimage(&guest(vm.config.channel))).unwrap();
    let Some(r) = testing::kvm(vm.run()) else { return };
    assert_eq!(r.backend, BackendKind::Kvm);
    assert_eq!(r.exit, ExitKind::PowerOff, "{}", r.console);
    assert_eq!(r.console, format!("{}\n", vm.config.cmdline));
    // Low RAM, BIOS hole, RAM, the reserved channel, RAM above it, IOAPIC, LAPIC.
    let e820 = ktstr_runtime::vmm::kvm::memory::e820_map(128, Some(vm.config.channel));
    assert_eq!(e820.len(), 7);
    assert_eq!(r.com2, format!("e820={}", e820.len()));
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.messages[0].kind, kind::INIT);
    let to_init = r.timings.to_init.expect("INIT seen");
    assert!(to_init <= r.timings.total);
    assert!(r.timings.setup > Duration::ZERO);
}

const PVH_LOAD: u64 = 0x100_0000;

/// 32-bit PVH entry code: checks the start-info magic EBX points at,
/// prints the verdict, powers off. (No REX prefixes: valid 32-bit code.)
fn pvh_guest() -> Vec<u8> {
    let mut a = Asm::new(PVH_LOAD);
    let bad = a.label();
    a.load32(Reg::Rax, Reg::Rbx, 0).cmp32(Reg::Rax, 0x336e_c578).jcc(Cond::Ne, bad);
    a.load32(Reg::Rax, Reg::Rbx, 48).cmp32(Reg::Rax, 7).jcc(Cond::Ne, bad); // memmap entries
    a.puts(COM1_BASE, "pvh ok\n").outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();
    a.bind(bad).puts(COM1_BASE, "pvh bad start info\n").outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();
    a.finish()
}

/// A minimal vmlinux: one PT_LOAD at 16 MiB and a PT_NOTE holding the
/// Xen PHYS32_ENTRY note that marks the PVH entry point.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    let h = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    h(&mut f, 0, b"\x7fELF\x02\x01\x01");
    h(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    h(&mut f, 18, &0x3eu16.to_le_bytes()); // x86-64
    h(&mut f, 20, &1u32.to_le_bytes());
    h(&mut f, 24, &PVH_LOAD.to_le_bytes()); // e_entry
    h(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    h(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    h(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    h(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
    let note_off = 0x200u64;
    let note: Vec<u8> = [&4u32.to_le_bytes()[..], &8u32.to_le_bytes(), &18u32.to_le_bytes(), b"Xen\0", &PVH_LOAD.to_le_bytes()].concat();
    h(&mut f, note_off as usize, &note);
    let phdr = |ty: u32, flags: u32, off: u64, addr: u64, size: u64| -> Vec<u8> {
        [&ty.to_le_bytes()[..], &flags.to_le_bytes(), &off.to_le_bytes(), &addr.to_le_bytes(), &addr.to_le_bytes(), &size.to_le_bytes(), &size.to_le_bytes(), &0x1000u64.to_le_bytes()].concat()
    };
    h(&mut f, 64, &phdr(1, 5, 0x1000, PVH_LOAD, code.len() as u64));
    h(&mut f, 120, &phdr(4, 4, note_off, 0, note.len() as u64));
    f.extend_from_slice(code);
    f
}

#[test]
fn kvm_run_enters_a_vmlinux_through_pvh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmlinux");
    std::fs::write(&path, pvh_elf(&pvh_guest())).unwrap();
    let vm = Vm::builder()
        .kernel(&path)
        .memory_mib(128)
        .channel_mib(1)
        .timeout(Duration::from_secs(60))
        .backend(BackendKind::Kvm)
        .build()
        .unwrap();
    let Some(r) = testing::kvm(vm.run()) else { return };
    assert_eq!(r.exit, ExitKind::PowerOff, "{}", r.console);
    assert_eq!(r.console, "pvh ok\n");
}
