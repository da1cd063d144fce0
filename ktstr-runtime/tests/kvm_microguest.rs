//! Micro-guests on the real /dev/kvm: tiny 64-bit programs, assembled
//! here, that exercise the KVM backend's exits and devices end to end.
//! Guest code at CPL0 may run through KVM's emulator (~1M instr/s on
//! kvm_pvm hosts), so every guest is a few dozen instructions.

use std::time::{Duration, Instant};

use ktstr_runtime::channel;
use ktstr_runtime::testing;
use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, RESET_PORT, S5_POWER_OFF};
use ktstr_runtime::vmm::kvm::asm::{Asm, Cond, Reg};
use ktstr_runtime::vmm::kvm::devices::TEST_PORT;
use ktstr_runtime::vmm::kvm::memory::{RAW_CODE, SCRATCH_MMIO};
use ktstr_runtime::vmm::kvm::serial::{COM1_BASE, COM2_BASE};
use ktstr_runtime::vmm::kvm::{Cause, Machine, Outcome};
use ktstr_runtime::vmm::{ChannelRegion, ConsoleLink, ExitKind, Topology, VmError};

const TIMEOUT: Duration = Duration::from_secs(20);

/// None (and a SKIP line, or a failure under KTSTR_NO_SKIP_MODE=1) when
/// this host has no usable /dev/kvm.
fn machine(topo: Topology) -> Option<Machine> {
    testing::kvm(Machine::new(topo, 64))
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

#[test]
fn kvm_both_uarts() {
    let Some(out) = run(Topology::cpus(1), |a| {
        a.puts(COM1_BASE, "hello com1\n");
        // IER: ask for the THR-empty interrupt; the UART raises IRQ 4.
        a.outb(COM1_BASE + 1, 0x02);
        a.puts(COM2_BASE, "hello com2\n");
        power_off(a);
    }) else { return };
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
    assert_eq!(out.console, "hello com1\n");
    assert_eq!(out.com2, "hello com2\n");
    assert!(out.serial_irqs[0] >= 1, "COM1 raised no interrupt: {:?}", out.serial_irqs);
}

#[test]
fn kvm_mmio_exits() {
    let Some(out) = run(Topology::cpus(1), |a| {
        a.mov64(Reg::Rdi, SCRATCH_MMIO).mov64(Reg::Rax, 0x1122_3344_5566_7788);
        a.store64(Reg::Rdi, 0x10, Reg::Rax);
        a.load64(Reg::Rbx, Reg::Rdi, 0x10);
        a.mov_rr(Reg::Rax, Reg::Rbx).out_eax(TEST_PORT);
        a.mov_rr(Reg::Rax, Reg::Rbx).shr64(Reg::Rax, 32).out_eax(TEST_PORT);
        // An MMIO address nobody claims reads as all ones.
        a.load32(Reg::Rax, Reg::Rdi, 0x2000).out_eax(TEST_PORT);
        power_off(a);
    }) else { return };
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
    assert_eq!(out.test_values(), vec![0x5566_7788, 0x1122_3344, 0xffff_ffff]);
    assert_eq!(out.mmio_writes.len(), 1);
    assert_eq!(out.mmio_writes[0].addr, SCRATCH_MMIO + 0x10);
    assert_eq!(out.mmio_writes[0].data, 0x1122_3344_5566_7788u64.to_le_bytes());
}

#[test]
fn kvm_data_channel_record() {
    let Some(mut m) = machine(Topology::cpus(1)) else { return };
    let ch = ChannelRegion { gpa: 0x20_0000, size: 0x1_0000 };
    m.set_channel(ch);
    let payload = *b"micro-guest data";
    let crc = crc32fast::hash(&payload);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    let mut a = Asm::new(RAW_CODE);
    a.mov64(Reg::Rdi, ch.gpa);
    // Record first: [kind][len][crc][0] payload.
    a.mov64(Reg::Rax, u64::from(channel::kind::INIT) | (16 << 32)).store64(Reg::Rdi, 4096, Reg::Rax);
    a.mov64(Reg::Rax, u64::from(crc)).store64(Reg::Rdi, 4104, Reg::Rax);
    a.mov64(Reg::Rax, word(&payload[..8])).store64(Reg::Rdi, 4112, Reg::Rax);
    a.mov64(Reg::Rax, word(&payload[8..])).store64(Reg::Rdi, 4120, Reg::Rax);
    // Then the header, committed length last, then the doorbell.
    a.mov64(Reg::Rax, word(channel::MAGIC)).store64(Reg::Rdi, 0, Reg::Rax);
    a.mov64(Reg::Rax, ch.size - 4096).store64(Reg::Rdi, 8, Reg::Rax);
    a.mov64(Reg::Rax, 32).store64(Reg::Rdi, 16, Reg::Rax);
    a.outb(channel::DOORBELL_PORT, 1);
    power_off(&mut a);
    m.load_raw(&a.finish()).unwrap();
    let out = m.run(TIMEOUT).unwrap();
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
    assert_eq!(out.doorbells, 1);
    let msgs = out.messages.expect("channel decodes");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].kind, channel::kind::INIT);
    assert_eq!(msgs[0].payload, payload);
    assert!(out.to_init.is_some_and(|t| t <= out.run_time), "INIT on the doorbell marks to_init");
}

/// A guest that cannot ring the doorbell (a kernel without ioperm) still
/// gets its INIT seen: the host polls the channel while it waits.
#[test]
fn kvm_init_seen_without_doorbell() {
    let Some(mut m) = machine(Topology::cpus(1)) else { return };
    let ch = ChannelRegion { gpa: 0x20_0000, size: 0x1_0000 };
    m.set_channel(ch);
    let crc = crc32fast::hash(b"");
    let mut a = Asm::new(RAW_CODE);
    a.mov64(Reg::Rdi, ch.gpa);
    a.mov64(Reg::Rax, u64::from(channel::kind::INIT)).store64(Reg::Rdi, 4096, Reg::Rax);
    a.mov64(Reg::Rax, u64::from(crc)).store64(Reg::Rdi, 4104, Reg::Rax);
    a.mov64(Reg::Rax, u64::from_le_bytes(*channel::MAGIC)).store64(Reg::Rdi, 0, Reg::Rax);
    a.mov64(Reg::Rax, ch.size - 4096).store64(Reg::Rdi, 8, Reg::Rax);
    a.mov64(Reg::Rax, 16).store64(Reg::Rdi, 16, Reg::Rax);
    // No doorbell, no exit: halt with interrupts off until the timeout.
    a.halt_forever();
    m.load_raw(&a.finish()).unwrap();
    let out = m.run(Duration::from_secs(2)).unwrap();
    assert_eq!(out.exit, ExitKind::Timeout, "{:?}", out.cause);
    assert_eq!(out.doorbells, 0);
    assert_eq!(out.messages.expect("channel decodes").len(), 1);
    let t = out.to_init.expect("INIT in the channel marks to_init without a doorbell");
    assert!(t < Duration::from_secs(1), "INIT seen only after {t:?}");
    assert_eq!(out.vcpu_states.len(), 1);
    assert!(out.vcpu_states[0].contains("halted"), "{:?}", out.vcpu_states);
}

#[test]
fn kvm_reset_via_cf9() {
    let Some(out) = run(Topology::cpus(1), |a| {
        a.outb(RESET_PORT, 0x06).halt_forever();
    }) else { return };
    assert_eq!(out.exit, ExitKind::Reboot, "{:?}", out.cause);
}

#[test]
fn kvm_reset_via_i8042() {
    let Some(out) = run(Topology::cpus(1), |a| {
        a.outb(0x64, 0xfe).halt_forever();
    }) else { return };
    assert_eq!(out.exit, ExitKind::Reboot, "{:?}", out.cause);
}

#[test]
fn kvm_triple_fault() {
    // The boot IDT is empty: the #GP from a non-canonical access becomes
    // a double and then a triple fault.
    let Some(out) = run(Topology::cpus(1), |a| {
        a.mov64(Reg::Rdi, 0x8000_0000_0000_0000).load64(Reg::Rax, Reg::Rdi, 0);
        power_off(a);
    }) else { return };
    assert_eq!(out.exit, ExitKind::TripleFault, "{:?}", out.cause);
}

#[test]
fn kvm_selftest_measures_this_host() {
    use ktstr_runtime::vmm::kvm::selftest;
    let t = Instant::now();
    let Some(v) = testing::kvm(selftest::measure()) else { return };
    eprintln!("self-test verdict ({:?}): {v}", t.elapsed());
    let text = v.to_string();
    assert!(text.starts_with(if v.usable() { "usable:" } else { "unusable:" }), "{text}");
    assert!(text.contains("CPL0 loop"), "{text}");
    // The cached verdict agrees on usability with a fresh measurement.
    assert_eq!(selftest::verdict().unwrap().usable(), v.usable());
}

#[test]
fn kvm_console_panic_then_reset_is_panic() {
    let Some(out) = run(Topology::cpus(1), |a| {
        a.puts(COM1_BASE, "Kernel panic - not syncing: micro-guest\n");
        a.outb(RESET_PORT, 0x06).halt_forever();
    }) else { return };
    assert_eq!(out.exit, ExitKind::Panic, "{:?}", out.cause);
    assert_eq!(out.cause, Cause::Device(ktstr_runtime::vmm::kvm::devices::Stop::Reset));
}

#[test]
fn kvm_console_panic_then_hang_ends_early() {
    let t = Instant::now();
    let Some(out) = run(Topology::cpus(1), |a| {
        a.puts(COM1_BASE, "Kernel panic - not syncing: hung after panic\n");
        let l = a.label();
        a.bind(l).jmp(l);
    }) else { return };
    assert_eq!(out.exit, ExitKind::Panic, "{:?}", out.cause);
    assert_eq!(out.cause, Cause::PanicSeen);
    assert!(t.elapsed() < TIMEOUT / 2, "panic did not cut the wait short: {:?}", t.elapsed());
}

#[test]
fn kvm_missing_device_is_kvm_unavailable_with_hint() {
    let err = ktstr_runtime::vmm::kvm::machine::open_kvm_at(c"/nonexistent/kvm").map(drop).expect_err("no such device");
    let VmError::KvmUnavailable(msg) = &err else { panic!("{err:?}") };
    assert!(msg.contains("enable KVM") && msg.contains("kvm group"), "{msg}");
    assert!(!err.is_skip());
}

#[test]
fn kvm_guest_sees_topology_cpuid() {
    use ktstr_runtime::vmm::kvm::cpuid;
    // 2 nodes x 2 LLCs x 2 cores x 2 threads; only the BSP runs.
    let topo = Topology::new(2, 2, 2, 2);
    let Some(out) = run(topo, |a| {
        for (leaf, sub) in [(0xb, 0), (0xb, 1), (1, 0)] {
            a.mov32(Reg::Rax, leaf).mov32(Reg::Rcx, sub).cpuid();
            a.mov_rr(Reg::Rax, Reg::Rbx).out_eax(TEST_PORT);
        }
        power_off(a);
    }) else { return };
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
    let v = out.test_values();
    assert_eq!(v[0] & 0xffff, 2, "threads per core (leaf 0xB SMT level)");
    assert_eq!(v[1] & 0xffff, 4, "CPUs per package (leaf 0xB core level)");
    assert_eq!(v[2] >> 24, cpuid::apic_id(&topo, 0));
    assert_eq!((v[2] >> 16) & 0xff, 4, "leaf 1 EBX logical processors");
}

#[test]
fn kvm_emulation_failure_is_reported_with_the_instruction() {
    // POPCNT: the kvm_pvm emulator cannot run it; a hardware-virtualised
    // KVM runs it natively and the guest powers off.
    let Some(out) = run(Topology::cpus(1), |a| {
        a.mov32(Reg::Rax, 0xff).bytes(&[0xf3, 0x0f, 0xb8, 0xc8]).mov_rr(Reg::Rax, Reg::Rcx).out_eax(TEST_PORT);
        power_off(a);
    }) else { return };
    match &out.cause {
        Cause::Emulation(e) => {
            assert_eq!(&e.insn[..4], &[0xf3, 0x0f, 0xb8, 0xc8], "{e}");
            assert_eq!(e.rip, RAW_CODE + 5);
            let ExitKind::HostError(msg) = &out.exit else { panic!("{:?}", out.exit) };
            assert!(msg.contains("emulation failure") && msg.contains("KTSTR_VMM=tcg"), "{msg}");
        }
        _ => {
            assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
            assert_eq!(out.test_values(), vec![8]);
        }
    }
}

/// Interactive mode (`cargo ktstr shell` on KVM): keys the host queued on
/// the console link reach COM1's receive FIFO in order, the guest's COM1
/// output reaches the link's sink as it is written, and the guest polls
/// LSR.DR for each byte as the 8250 driver's interrupt handler would.
#[test]
fn kvm_console_link_feeds_com1_input() {
    let Some(mut m) = machine(Topology::cpus(1)) else { return };
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let link = ConsoleLink::new(move |b| s.lock().unwrap().extend_from_slice(b));
    // More than the 64-byte FIFO holds: the rest is fed as the guest drains it.
    let keys: Vec<u8> = (0..100u8).map(|i| b'!' + i % 90).collect();
    link.send(&keys);
    m.set_console(link.clone());
    let mut a = Asm::new(RAW_CODE);
    a.puts(COM1_BASE, "ready");
    a.mov32(Reg::Rcx, keys.len() as u32);
    let top = a.label();
    a.bind(top);
    // test al, 1 (LSR.DR); jz top
    a.in_eax(COM1_BASE + 5).bytes(&[0xa8, 0x01]).jcc(Cond::E, top);
    a.in_eax(COM1_BASE).out_eax(TEST_PORT).dec32(Reg::Rcx).jcc(Cond::Ne, top);
    power_off(&mut a);
    m.load_raw(&a.finish()).unwrap();
    let out = m.run(TIMEOUT).unwrap();
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
    let got: Vec<u8> = out.test_values().iter().map(|v| (*v & 0xff) as u8).collect();
    assert_eq!(got, keys);
    assert_eq!(*seen.lock().unwrap(), b"ready");
}

/// `ConsoleLink::stop` (the shell's escape key) ends a guest that would run forever.
#[test]
fn kvm_console_link_stop_ends_the_run() {
    let Some(mut m) = machine(Topology::cpus(1)) else { return };
    let link = ConsoleLink::new(|_| {});
    m.set_console(link.clone());
    let mut a = Asm::new(RAW_CODE);
    let top = a.label();
    a.bind(top).jmp(top);
    m.load_raw(&a.finish()).unwrap();
    let l = link.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        l.stop();
    });
    let t = Instant::now();
    let out = m.run(TIMEOUT).unwrap();
    assert_eq!(out.exit, ExitKind::Stopped, "{:?}", out.cause);
    assert_eq!(out.cause, Cause::Stopped);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
