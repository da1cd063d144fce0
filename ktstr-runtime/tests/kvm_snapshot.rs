//! Saving and restoring KVM machines with micro-guests: a computation
//! interrupted by a save continues from each of many restores to the
//! result of an uninterrupted run; timers keep firing after a restore, on
//! two vCPUs; a restore maps RAM copy-on-write (no copy) and one restored
//! VM's writes reach neither the save nor the next restore.

use std::time::{Duration, Instant};

mod common;

use common::{bzimage, LOAD};

use ktstr_runtime::channel::DOORBELL_PORT;
use ktstr_runtime::testing;
use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, S5_POWER_OFF};
use ktstr_runtime::vmm::kvm::asm::{Asm, Cond, Reg};
use ktstr_runtime::vmm::kvm::devices::TEST_PORT;
use ktstr_runtime::vmm::kvm::gdt::{descriptor, CODE64_SEL, GDT};
use ktstr_runtime::vmm::kvm::loader::BootEntry;
use ktstr_runtime::vmm::kvm::memory::{LAPIC_ADDR, PD0, PDPT, PML4, RAW_CODE};
use ktstr_runtime::vmm::kvm::snapshot::Files;
use ktstr_runtime::vmm::kvm::{vcpu, Machine, Outcome, SaveAt};
use ktstr_runtime::vmm::{ExitKind, Topology};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Hash state, the GO flag and counters.
const DATA: u64 = 0x20_0000;
const GO: i32 = 8;
const MARK: i32 = 16;
/// 256 pages the computation scatters its values over.
const PAGES: u64 = 0x30_0000;
const IDT: u64 = 0x3000;
const TIMER_VECTOR: u8 = 0x40;

fn machine(topo: Topology, mib: u64) -> Option<Machine> {
    testing::kvm(Machine::new(topo, mib))
}

fn power_off(a: &mut Asm) {
    a.outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();
}

/// Rings the doorbell, then spins until the host sets the GO word: a
/// save taken at the doorbell catches the guest inside this wait, with
/// everything live in registers (rax, rbx, rcx, rsi, rdi, xmm1) kept.
fn doorbell_then_wait(a: &mut Asm) {
    a.bytes(&[0x50]); // push rax
    a.outb(DOORBELL_PORT, 1);
    let spin = a.label();
    a.bind(spin).load64(Reg::Rax, Reg::Rdi, GO).bytes(&[0x48, 0x85, 0xc0]); // test rax, rax
    a.jcc(Cond::E, spin);
    a.bytes(&[0x58]); // pop rax
}

/// `iters` rounds of a hash kept in rax, in memory ([DATA]) and in xmm1,
/// scattering values over `PAGES`; at round `iters / 2` it rings the
/// doorbell and waits for GO. Reports rax, [DATA] and xmm1 (as 32-bit
/// halves) on the test port, then powers off.
fn computation(iters: u32) -> Vec<u8> {
    let mut a = Asm::new(RAW_CODE);
    a.outl(TEST_PORT, 0xa0);
    a.mov64(Reg::Rdi, DATA).mov64(Reg::Rsi, PAGES).mov32(Reg::Rcx, iters).mov64(Reg::Rax, 0x243f_6a88_85a3_08d3);
    a.bytes(&[0xf3, 0x0f, 0x6f, 0x0f]); // movdqu xmm1, [rdi]
    let top = a.label();
    let skip = a.label();
    a.bind(top);
    a.bytes(&[0x48, 0x69, 0xc0]).bytes(&0x2545_f491u32.to_le_bytes()); // imul rax, rax, imm32
    a.bytes(&[0x48, 0x01, 0xc8]); // add rax, rcx
    a.load64(Reg::Rbx, Reg::Rdi, 0);
    a.bytes(&[0x48, 0x31, 0xc3, 0x48, 0xc1, 0xc3, 13]); // xor rbx, rax; rol rbx, 13
    a.store64(Reg::Rdi, 0, Reg::Rbx);
    // xmm1 carries last round's [DATA] into this one (KVM's emulator,
    // which may run this code, moves SSE registers but has no SSE arithmetic).
    a.bytes(&[0xf3, 0x0f, 0x7f, 0x4f, 0x20]); // movdqu [rdi+32], xmm1
    a.load64(Reg::Rdx, Reg::Rdi, 32).bytes(&[0x48, 0x31, 0xd0]); // xor rax, rdx
    a.bytes(&[0xf3, 0x0f, 0x6f, 0x0f]); // movdqu xmm1, [rdi]
    a.mov_rr(Reg::Rdx, Reg::Rcx);
    a.bytes(&[0x81, 0xe2, 0xff, 0, 0, 0, 0x48, 0xc1, 0xe2, 12]); // and edx, 0xff; shl rdx, 12
    a.bytes(&[0x48, 0x89, 0x04, 0x16]); // mov [rsi+rdx], rax
    a.cmp32(Reg::Rcx, iters / 2).jcc(Cond::Ne, skip);
    doorbell_then_wait(&mut a);
    a.bind(skip).dec32(Reg::Rcx).jcc(Cond::Ne, top);
    let report = |a: &mut Asm| {
        a.bytes(&[0x49, 0x89, 0xc0]); // mov r8, rax
        a.out_eax(TEST_PORT).mov_rr(Reg::Rax, Reg::R8).shr64(Reg::Rax, 32).out_eax(TEST_PORT);
    };
    report(&mut a);
    a.load64(Reg::Rax, Reg::Rdi, 0);
    report(&mut a);
    a.bytes(&[0xf3, 0x0f, 0x7f, 0x4f, 0x28]); // movdqu [rdi+40], xmm1
    a.load64(Reg::Rax, Reg::Rdi, 40);
    report(&mut a);
    power_off(&mut a);
    a.finish()
}

fn pages_crc(mem: &vm_memory::GuestMemoryMmap) -> u32 {
    let mut v = vec![0u8; 256 << 12];
    mem.read_slice(&mut v, GuestAddress(PAGES)).unwrap();
    crc32fast::hash(&v)
}

fn files(dir: &std::path::Path) -> Files {
    Files::at(&dir.join("state"))
}

/// The results (test-port values past the start marker, and the CRC of
/// the scattered pages) of a run that ended in a power-off.
fn results(out: &Outcome) -> (Vec<u32>, u32) {
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}\n{}", out.cause, out.vcpu_states.join("\n"));
    let v: Vec<u32> = out.test_values().into_iter().filter(|&x| x != 0xa0).collect();
    (v, pages_crc(&out.memory))
}

fn set_go(m: &Machine, v: u64) {
    m.memory().write_obj(v, GuestAddress(DATA + GO as u64)).unwrap();
}

#[test]
fn kvm_snapshot_resumes_mid_computation_on_every_restore() {
    const ITERS: u32 = 40_000;
    let code = computation(ITERS);
    let Some(mut m) = machine(Topology::cpus(1), 64) else { return };
    m.load_raw(&code).unwrap();
    set_go(&m, 1);
    let t = Instant::now();
    let want = results(&m.run(TIMEOUT).unwrap());
    eprintln!("uninterrupted run: {:?}", t.elapsed());
    assert_eq!(want.0.len(), 6, "{:x?}", want.0);

    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let mut m = Machine::new(Topology::cpus(1), 64).unwrap();
    m.load_raw(&code).unwrap();
    let out = m.run_and_save(TIMEOUT, SaveAt::Doorbells(1), &f).unwrap();
    assert_eq!(out.exit, ExitKind::Stopped, "{:?}", out.cause);
    let saved = out.saved.expect("saved at the doorbell");
    assert_eq!(out.test_values(), [0xa0], "saved before the results: {:x?}", out.test_values());
    eprintln!("save: {saved:?}");
    assert!(saved.ram_bytes < 4 << 20, "zero pages were written: {saved:?}");
    drop(out);

    for i in 0..5 {
        let t = Instant::now();
        let m = Machine::restore(&f).unwrap();
        let restore = t.elapsed();
        set_go(&m, 1);
        let out = m.run(TIMEOUT).unwrap();
        assert!(!out.test_values().contains(&0xa0), "restore {i} ran the program from its start: {:x?}", out.test_values());
        assert_eq!(results(&out), want, "restore {i} ends with another result than the uninterrupted run");
        eprintln!("restore {i}: {restore:?}");
    }
}

/// An IDT gate to `handler` for `TIMER_VECTOR`, other vectors absent.
fn idt_with_timer(handler: u64) -> Vec<u8> {
    let mut idt = vec![0u8; 256 * 16];
    let g = &mut idt[TIMER_VECTOR as usize * 16..][..16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&CODE64_SEL.to_le_bytes());
    g[5] = 0x8e; // present, 64-bit interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    idt
}

/// Each vCPU: IDT loaded, its LAPIC timer periodic on `TIMER_VECTOR`;
/// the handler counts into [DATA + 64 + 8 * APIC id] and EOIs. The main
/// loop halts until its count reaches `target`; vCPU 0 rings the
/// doorbell once its count is `target / 2` and then waits for GO; the
/// last vCPU to finish powers off (a shared done counter).
fn timer_program(target: u64, cpus: u32) -> (Vec<u8>, u64) {
    let mut a = Asm::new(RAW_CODE);
    let handler = a.label();
    // lidt [DATA+0x100]: a 10-byte descriptor the host wrote there.
    a.bytes(&[0x0f, 0x01, 0x1c, 0x25]).bytes(&((DATA + 0x100) as u32).to_le_bytes());
    a.mov32(Reg::Rax, 1).cpuid().mov_rr(Reg::Rsi, Reg::Rbx).shr64(Reg::Rsi, 24); // rsi = APIC id
    a.bytes(&[0x48, 0xc1, 0xe6, 3]); // shl rsi, 3
    a.mov64(Reg::Rdi, DATA);
    a.bytes(&[0x48, 0x01, 0xfe]); // add rsi, rdi: rsi = DATA + 8 * id
    a.mov64(Reg::R9, LAPIC_ADDR);
    a.store32(Reg::R9, 0xf0, 0x1ff); // SVR: enabled
    a.store32(Reg::R9, 0x3e0, 0xb); // divide by 1
    a.store32(Reg::R9, 0x320, 0x2_0000 | TIMER_VECTOR as u32); // periodic
    a.store32(Reg::R9, 0x380, 2_000_000); // initial count: 2 ms at KVM's 1 GHz APIC bus
    a.bytes(&[0xfb]); // sti
    let wait = a.label();
    let not_half = a.label();
    let done = a.label();
    a.bind(wait).bytes(&[0xf4]); // hlt (an interrupt ends it)
    a.load64(Reg::Rax, Reg::Rsi, 64);
    a.bytes(&[0x48, 0x3d]).bytes(&(target as u32).to_le_bytes()); // cmp rax, target
    a.jcc(Cond::Ae, done);
    // Only vCPU 0 (rsi == DATA) rings, once, at half way.
    a.bytes(&[0x48, 0x39, 0xfe]); // cmp rsi, rdi
    a.jcc(Cond::Ne, wait);
    a.bytes(&[0x48, 0x3d]).bytes(&((target / 2) as u32).to_le_bytes());
    a.jcc(Cond::Ne, not_half);
    doorbell_then_wait(&mut a);
    a.bind(not_half).jmp(wait);
    a.bind(done);
    a.store32(Reg::R9, 0x320, 0x1_0000); // mask the timer
    a.bytes(&[0xf0, 0x48, 0xff, 0x47, 0x38]); // lock inc qword [rdi+56]: done counter
    a.load64(Reg::Rax, Reg::Rdi, 56).cmp32(Reg::Rax, cpus);
    let last = a.label();
    a.jcc(Cond::E, last).halt_forever();
    a.bind(last);
    for c in 0..cpus {
        a.load64(Reg::Rax, Reg::Rdi, 64 + 8 * c as i32).out_eax(TEST_PORT);
    }
    power_off(&mut a);
    // Handler: count, EOI, return.
    a.bind(handler);
    a.bytes(&[0x48, 0xff, 0x46, 64]); // inc qword [rsi+64]
    a.bytes(&[0x41, 0xc7, 0x81, 0xb0, 0, 0, 0, 0, 0, 0, 0]); // mov dword [r9+0xb0], 0: EOI
    a.bytes(&[0x48, 0xcf]); // iretq
    let h = a.addr_of(handler);
    (a.finish(), h)
}

/// Loads `code` into `m` with the IDT (timer vector -> `handler`) and
/// its IDTR image at `DATA + 0x100`, where the programs `lidt` it.
fn load_with_idt(m: &mut Machine, code: &[u8], handler: u64) {
    let mut idtr = [0u8; 10];
    idtr[..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    idtr[2..].copy_from_slice(&IDT.to_le_bytes());
    m.memory().write_slice(&idtr, GuestAddress(DATA + 0x100)).unwrap();
    m.memory().write_slice(&idt_with_timer(handler), GuestAddress(IDT)).unwrap();
    m.load_raw(code).unwrap();
}

/// Loads the timer program into `m`, with every AP started directly in
/// long mode at the same entry, its own stack.
fn load_timer(m: &mut Machine, target: u64) {
    let cpus = m.topology().total_cpus();
    let (code, handler) = timer_program(target, cpus);
    load_with_idt(m, &code, handler);
    for i in 1..cpus as usize {
        let v = m.vcpu(i).unwrap();
        vcpu::set_entry(v, &BootEntry { rip: RAW_CODE, long_mode: true, params: 0 }).unwrap();
        let mut regs = v.get_regs().unwrap();
        regs.rsp = 0x7_0000 - 0x1000 * i as u64;
        v.set_regs(&regs).unwrap();
        v.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE }).unwrap();
    }
}

fn timers_fire_after_restore(cpus: u32) {
    const TARGET: u64 = 60;
    let Some(mut m) = machine(Topology::cpus(cpus), 64) else { return };
    load_timer(&mut m, TARGET);
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let out = m.run_and_save(TIMEOUT, SaveAt::Doorbells(1), &f).unwrap();
    assert_eq!(out.exit, ExitKind::Stopped, "{:?}", out.cause);
    assert!(out.saved.is_some());
    let at_save: Vec<u64> = (0..cpus).map(|c| out.memory.read_obj(GuestAddress(DATA + 64 + 8 * c as u64)).unwrap()).collect();
    assert!(at_save[0] >= TARGET / 2 && at_save[0] < TARGET, "vCPU 0 saved mid-way: {at_save:?}");
    drop(out);
    for i in 0..3 {
        let m = Machine::restore(&f).unwrap();
        set_go(&m, 1);
        let out = m.run(Duration::from_secs(20)).unwrap();
        assert_eq!(out.exit, ExitKind::PowerOff, "restore {i}: timers stopped firing? {:?}\n{}", out.cause, out.vcpu_states.join("\n"));
        let counts: Vec<u64> = (0..cpus).map(|c| out.memory.read_obj(GuestAddress(DATA + 64 + 8 * c as u64)).unwrap()).collect();
        for (c, n) in counts.iter().enumerate() {
            assert!(*n >= TARGET, "restore {i}: vCPU {c} counted {n} timer interrupts, wanted {TARGET}");
        }
        // APIC ids equal indexes for a flat topology.
        assert_eq!(out.test_values().len(), cpus as usize);
    }
}

#[test]
fn kvm_snapshot_lapic_timer_fires_after_restore() {
    timers_fire_after_restore(1);
}

#[test]
fn kvm_snapshot_lapic_timers_fire_after_restore_2_vcpus() {
    timers_fire_after_restore(2);
}

/// kB of `field` in /proc/self/smaps for the mapping that starts at `addr`.
fn smaps_kb(addr: u64, field: &str) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(s) = u64::from_str_radix(start, 16) {
                    if range.contains('-') && !line.ends_with("kB") {
                        inside = s == addr;
                        continue;
                    }
                }
            }
        }
        if inside {
            if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
                return rest.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    panic!("no mapping at {addr:#x} in /proc/self/smaps");
}

/// The guest reports [MARK], stores GO there, touches nothing else and
/// powers off; saved while it waits for GO.
fn mark_program() -> Vec<u8> {
    let mut a = Asm::new(RAW_CODE);
    a.mov64(Reg::Rdi, DATA);
    a.mov64(Reg::Rax, 0x5a5a).store64(Reg::Rdi, MARK, Reg::Rax);
    doorbell_then_wait(&mut a);
    a.load64(Reg::Rax, Reg::Rdi, MARK).out_eax(TEST_PORT);
    a.load64(Reg::Rax, Reg::Rdi, GO).store64(Reg::Rdi, MARK, Reg::Rax);
    a.load64(Reg::Rax, Reg::Rdi, MARK).out_eax(TEST_PORT);
    power_off(&mut a);
    a.finish()
}

#[test]
fn kvm_snapshot_restore_maps_ram_without_copying_and_isolates() {
    const MIB: u64 = 2048;
    let Some(mut m) = machine(Topology::cpus(1), MIB) else { return };
    m.load_raw(&mark_program()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let out = m.run_and_save(TIMEOUT, SaveAt::Doorbells(1), &f).unwrap();
    let saved = out.saved.expect("saved at the doorbell");
    drop(out);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&f.ram).unwrap();
    assert_eq!(meta.len(), MIB << 20, "the RAM file spans all of RAM");
    assert!(meta.blocks() * 512 < 4 << 20, "zero pages were written: {} bytes on disk", meta.blocks() * 512);
    eprintln!("save of {MIB} MiB: {saved:?}");
    let mark_off = DATA + MARK as u64; // below the MMIO hole: file offset = gpa
    let in_file = || {
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&f.ram).unwrap(), &mut b, mark_off).unwrap();
        u64::from_le_bytes(b)
    };
    assert_eq!(in_file(), 0x5a5a);

    for go in [7u64, 8, 9] {
        let t = Instant::now();
        let m = Machine::restore(&f).unwrap();
        let restore = t.elapsed();
        let host = m.memory().get_host_address(GuestAddress(0)).unwrap() as u64;
        assert_eq!(smaps_kb(host, "Anonymous"), 0, "a restore copied RAM before the guest ran");
        set_go(&m, go);
        let out = m.run(TIMEOUT).unwrap();
        assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
        assert_eq!(out.test_values(), [0x5a5a, go as u32], "restore {go} saw another restore's write");
        let copied = smaps_kb(host, "Anonymous");
        assert!(copied <= 64, "{copied} kB of RAM copied for a guest that wrote 2 pages");
        assert_eq!(in_file(), 0x5a5a, "a restored VM wrote into the save");
        eprintln!("restore of {MIB} MiB: {restore:?}, {copied} kB copied on write");
    }
}

const KERNEL_GS_BASE: u32 = 0xc000_0102;
const GS_VALUE: u64 = 0x1234_5678_9abc;

/// `in al, dx` of `port`, zero-extended, out on the test port.
fn report_inb(a: &mut Asm, port: u16) {
    a.mov32(Reg::Rdx, port.into()).bytes(&[0xec, 0x0f, 0xb6, 0xc0]); // in al, dx; movzx eax, al
    a.out_eax(TEST_PORT);
}

/// Programs the PIC masks, an IOAPIC redirection entry, PIT channel 0,
/// COM1's scratch register and an MSR, keeps the TSC, and waits for a
/// save; then reads each back onto the test port, with the TSC's advance
/// (low and high halves).
fn devices_program() -> Vec<u8> {
    let mut a = Asm::new(RAW_CODE);
    a.outb(0x21, 0xa5).outb(0xa1, 0x5a); // PIC master and slave IMR
    a.mov64(Reg::R9, 0xfec0_0000).store32(Reg::R9, 0, 0x10).store32(Reg::R9, 0x10, 0x1_0035); // IOAPIC pin 0: masked, vector 0x35
    a.outb(0x43, 0x34).outb(0x40, 0x00).outb(0x40, 0x80); // PIT ch0: lo/hi, mode 2, count 0x8000
    a.outb(0x3ff, 0x77); // COM1 scratch
    a.mov32(Reg::Rcx, KERNEL_GS_BASE).mov32(Reg::Rax, GS_VALUE as u32).mov32(Reg::Rdx, (GS_VALUE >> 32) as u32);
    a.bytes(&[0x0f, 0x30]); // wrmsr
    a.mov64(Reg::Rdi, DATA);
    a.bytes(&[0x0f, 0x31, 0x48, 0xc1, 0xe2, 32, 0x48, 0x09, 0xd0]); // rdtsc; shl rdx, 32; or rax, rdx
    a.store64(Reg::Rdi, 24, Reg::Rax);
    doorbell_then_wait(&mut a);
    report_inb(&mut a, 0x21);
    report_inb(&mut a, 0xa1);
    a.store32(Reg::R9, 0, 0x10).load32(Reg::Rax, Reg::R9, 0x10).out_eax(TEST_PORT);
    a.outb(0x43, 0xe2); // read-back: latch channel 0's status
    report_inb(&mut a, 0x40);
    report_inb(&mut a, 0x3ff);
    a.mov32(Reg::Rcx, KERNEL_GS_BASE).bytes(&[0x0f, 0x32]); // rdmsr
    a.bytes(&[0x49, 0x89, 0xd0]).out_eax(TEST_PORT).mov_rr(Reg::Rax, Reg::R8).out_eax(TEST_PORT); // mov r8, rdx
    a.mov64(Reg::Rdi, DATA);
    a.bytes(&[0x0f, 0x31, 0x48, 0xc1, 0xe2, 32, 0x48, 0x09, 0xd0]); // rdtsc; shl rdx, 32; or rax, rdx
    a.bytes(&[0x48, 0x2b, 0x47, 24]); // sub rax, [rdi+24]
    a.bytes(&[0x49, 0x89, 0xc0]).out_eax(TEST_PORT).mov_rr(Reg::Rax, Reg::R8).shr64(Reg::Rax, 32).out_eax(TEST_PORT);
    power_off(&mut a);
    a.finish()
}

#[test]
fn kvm_snapshot_keeps_irqchip_pit_uart_msrs_tsc_and_kvmclock() {
    let Some(mut m) = machine(Topology::cpus(1), 64) else { return };
    m.load_raw(&devices_program()).unwrap();
    // A TSC far from a new vCPU's: a restore that lost it would run
    // backwards. (kvm_pvm hosts ignore the write: their guests read the
    // host's TSC, so there the check below holds either way.)
    let tsc = kvm_bindings::kvm_msr_entry { index: 0x10, data: 1 << 40, ..Default::default() };
    m.bsp().set_msrs(&kvm_bindings::Msrs::from_entries(&[tsc]).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let out = m.run_and_save(TIMEOUT, SaveAt::Doorbells(1), &f).unwrap();
    assert!(out.saved.is_some(), "{:?}", out.cause);
    drop(out);
    let st = ktstr_runtime::vmm::kvm::snapshot::MachineState::read(&f.state).unwrap();
    assert_eq!(st.vcpus[0].msr(KERNEL_GS_BASE), Some(GS_VALUE), "the MSR list covers KERNEL_GS_BASE");
    // Another VM first, so a restore that kept nothing would show fresh state.
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..2 {
        let m = Machine::restore(&f).unwrap();
        let clock = m.vm().get_clock().unwrap().clock;
        assert!(
            clock >= st.vm.clock.clock && clock < st.vm.clock.clock + 2_000_000_000,
            "restore {i}: kvmclock {clock} ns, saved at {} ns",
            st.vm.clock.clock
        );
        set_go(&m, 1);
        let out = m.run(TIMEOUT).unwrap();
        assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
        let v = out.test_values();
        assert_eq!(v.len(), 9, "{v:x?}");
        assert_eq!(&v[..2], &[0xa5, 0x5a], "restore {i}: PIC masks");
        assert_eq!(v[2], 0x1_0035, "restore {i}: IOAPIC redirection entry");
        assert_eq!(v[3] & 0x3f, 0x34, "restore {i}: PIT channel 0 status {:#x}", v[3]);
        assert_eq!(v[4], 0x77, "restore {i}: COM1 scratch");
        assert_eq!((v[5] as u64) | (v[6] as u64) << 32, GS_VALUE, "restore {i}: KERNEL_GS_BASE");
        // The guest's TSC went on from where it was: no jump back to a new
        // VM's zero, and not forward by more than this test's seconds.
        let tsc = (v[7] as u64) | (v[8] as u64) << 32;
        assert!((tsc as i64) > 0 && tsc < 100_000_000_000, "restore {i}: the guest's TSC moved by {tsc} ({:#x})", tsc);
    }
}



/// Empty records of `kinds` as the channel's only messages, committed.
fn publish(a: &mut Asm, ch: ktstr_runtime::vmm::ChannelRegion, kinds: &[u32]) {
    for (i, &kind) in kinds.iter().enumerate() {
        let at = 4096 + 16 * i as i32;
        a.mov64(Reg::Rax, kind.into()).store64(Reg::Rdi, at, Reg::Rax);
        a.mov64(Reg::Rax, 0).store64(Reg::Rdi, at + 8, Reg::Rax);
    }
    a.mov64(Reg::Rax, u64::from_le_bytes(*ktstr_runtime::channel::MAGIC)).store64(Reg::Rdi, 0, Reg::Rax);
    a.mov64(Reg::Rax, ch.size - 4096).store64(Reg::Rdi, 8, Reg::Rax);
    a.mov64(Reg::Rax, 16 * kinds.len() as u64).store64(Reg::Rdi, 16, Reg::Rax);
}

/// A stand-in for the ready init: prints "ready", publishes READY and
/// takes the inbox's payload chunk by chunk as the guest side of
/// `snapshot::payload` does (wait for the next sequence number, ack it;
/// at the end clear the uplink); then prints the bytes it took in hex
/// on COM2 and "taken" on COM1, publishes INIT and BODY (the test's init
/// and body start) and powers off.
fn ready_guest(ch: ktstr_runtime::vmm::ChannelRegion) -> Vec<u8> {
    use ktstr_runtime::snapshot::payload::{DATA_OFF, OFF_ACK, OFF_LEN, OFF_SEQ};
    let mut a = Asm::new(LOAD + 0x200);
    a.puts(ktstr_runtime::vmm::kvm::serial::COM1_BASE, "ready\n");
    a.mov64(Reg::Rdi, ch.gpa);
    publish(&mut a, ch, &[ktstr_runtime::channel::kind::READY]);
    a.mov32(Reg::R12, 0).mov32(Reg::R13, 0).mov32(Reg::R14, 0); // taken, seq, total
    let (next, wait, not_first, done) = (a.label(), a.label(), a.label(), a.label());
    a.bind(next).bytes(&[0x49, 0x8d, 0x5d, 0x01]); // lea rbx, [r13+1]
    a.bind(wait).load64(Reg::Rax, Reg::Rdi, OFF_SEQ as i32).cmp_rr(Reg::Rax, Reg::Rbx).jcc(Cond::Ne, wait);
    a.mov_rr(Reg::R13, Reg::Rbx);
    a.bytes(&[0x4d, 0x85, 0xf6]).jcc(Cond::Ne, not_first); // test r14, r14
    a.load64(Reg::R14, Reg::Rdi, DATA_OFF as i32); // the stream's total length
    a.bind(not_first).load64(Reg::Rax, Reg::Rdi, OFF_LEN as i32).bytes(&[0x49, 0x01, 0xc4]); // add r12, rax
    a.cmp_rr(Reg::R12, Reg::R14).jcc(Cond::Ae, done);
    a.store64(Reg::Rdi, OFF_ACK as i32, Reg::R13).jmp(next);
    a.bind(done);
    a.mov64(Reg::Rax, 0).store64(Reg::Rdi, 16, Reg::Rax).store64(Reg::Rdi, OFF_ACK as i32, Reg::R13);
    // r12 in hex on COM2.
    a.mov32(Reg::Rcx, 16).mov32(Reg::Rdx, ktstr_runtime::vmm::kvm::serial::COM2_BASE.into());
    let hex = a.label();
    a.bind(hex).bytes(&[0x49, 0xc1, 0xc4, 4]); // rol r12, 4
    a.mov_rr(Reg::Rax, Reg::R12).bytes(&[0x83, 0xe0, 0x0f, 0x04, b'0', 0x3c, b'9' + 1, 0x72, 0x02, 0x04, 39, 0xee]); // and eax, 15; add al, '0'; cmp al, '9'+1; jb +2; add al, 39; out dx, al
    a.dec32(Reg::Rcx).jcc(Cond::Ne, hex);
    a.puts(ktstr_runtime::vmm::kvm::serial::COM1_BASE, "taken\n");
    publish(&mut a, ch, &[ktstr_runtime::channel::kind::INIT, ktstr_runtime::channel::kind::BODY]);
    power_off(&mut a);
    a.finish()
}

#[test]
fn kvm_run_saves_at_the_ready_point_and_restores_with_a_payload() {
    use ktstr_runtime::snapshot::payload::Payload;
    use ktstr_runtime::vmm::{BackendKind, Start, Vm, VmError};
    // On tmpfs where there is one: a restore's reads fill the RAM file's
    // holes there, which must not change the save's checksum.
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let image = dir.path().join("bzImage");
    std::fs::write(&image, bzimage(&[])).unwrap();
    let vm = |start: Start| {
        Vm::builder()
            .kernel(&image)
            .memory_mib(128)
            .channel_mib(1)
            .timeout(Duration::from_secs(60))
            .backend(BackendKind::Kvm)
            .start(start)
            .build()
            .unwrap()
    };
    let ch = vm(Start::Boot).config.channel;
    std::fs::write(&image, bzimage(&ready_guest(ch))).unwrap();
    let state = dir.path().join("save").join("state");
    std::fs::create_dir(state.parent().unwrap()).unwrap();
    let Some(r) = testing::kvm(vm(Start::Save { state: state.clone() }).run()) else { return };
    assert_eq!(r.exit, ExitKind::Stopped, "{}", r.console);
    assert_eq!(r.console, "ready\n");
    let save = r.timings.snapshot.expect("the save's time");
    let f = Files::at(&state);
    let sum = ktstr_runtime::snapshot::sparse::files_crc(&[f.state.clone(), f.ram.clone()]).unwrap();
    eprintln!("ready point saved in {save:?}: {} bytes of state and RAM data", sum.1);

    // Payloads of 1 and of 3 chunks (a chunk is the region less the inbox's offset).
    for (i, size) in [1000usize, 2_500_000].into_iter().enumerate() {
        let archive = dir.path().join(format!("payload{i}"));
        std::fs::write(&archive, vec![i as u8 + 1; size]).unwrap();
        let payload = Payload { test: format!("t{i}"), preset: None, cpus: None, archive };
        let r = vm(Start::Restore { state: state.clone(), checksum: sum, payload: payload.clone() }).run().unwrap();
        assert_eq!(r.exit, ExitKind::PowerOff, "{}", r.console);
        assert_eq!(r.console, "taken\n", "restore {i} started after the ready point");
        // The stream: 12 bytes of lengths, the JSON header (its seed and
        // time vary in length), the archive.
        let taken = usize::from_str_radix(&r.com2, 16).unwrap_or_else(|_| panic!("COM2: {:?}", r.com2));
        assert!(taken > size + 12 && taken < size + 12 + 1024, "restore {i}: the guest took {taken} bytes of a {size}-byte payload");
        use ktstr_runtime::channel::kind::{BODY, INIT};
        assert_eq!(r.messages.iter().map(|m| m.kind).collect::<Vec<_>>(), [INIT, BODY]);
        let t = &r.timings;
        assert!(t.to_init.is_some() && t.snapshot.is_some(), "{t:?}");
        assert!(t.to_body.is_some_and(|b| b + t.setup <= t.total), "the body start is timed, within the run: {t:?}");
    }
    // A changed RAM byte is a corrupt save, refused before it runs.
    let mut b = [0u8; 1];
    let ram = std::fs::OpenOptions::new().read(true).write(true).open(&f.ram).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&ram, &mut b, LOAD + 0x200).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&ram, &[b[0] ^ 1], LOAD + 0x200).unwrap();
    let archive = dir.path().join("payload0");
    let payload = Payload { test: "t".into(), preset: None, cpus: None, archive };
    match vm(Start::Restore { state: state.clone(), checksum: sum, payload }).run() {
        Err(VmError::Snapshot(e)) => assert!(e.contains("corrupt"), "{e}"),
        other => panic!("a corrupt save was restored: {:?}", other.map(|r| r.exit)),
    }
}

/// With interrupts off, arms a one-shot LAPIC timer and waits until its
/// vector is pending in the IRR, then waits for a save; after GO it
/// enables interrupts and halts: the handler counts the pending one, and
/// the guest reports the count.
fn pending_interrupt_program() -> (Vec<u8>, u64) {
    let mut a = Asm::new(RAW_CODE);
    let handler = a.label();
    a.bytes(&[0x0f, 0x01, 0x1c, 0x25]).bytes(&((DATA + 0x100) as u32).to_le_bytes()); // lidt [DATA+0x100]
    a.mov64(Reg::Rdi, DATA).mov64(Reg::Rsi, DATA).mov64(Reg::R9, LAPIC_ADDR);
    a.store32(Reg::R9, 0xf0, 0x1ff).store32(Reg::R9, 0x3e0, 0xb);
    a.store32(Reg::R9, 0x320, TIMER_VECTOR as u32); // one-shot
    a.store32(Reg::R9, 0x380, 1_000_000); // 1 ms
    let pending = a.label();
    let irr = 0x200 + (TIMER_VECTOR as i32 / 32) * 0x10;
    a.bind(pending).load32(Reg::Rax, Reg::R9, irr).bytes(&[0xa9]).bytes(&(1u32 << (TIMER_VECTOR % 32)).to_le_bytes()); // test eax, bit
    a.jcc(Cond::E, pending);
    // Timer stopped: only the IRR can deliver it now (a restored LAPIC
    // would otherwise start the one-shot count again).
    a.store32(Reg::R9, 0x380, 0);
    doorbell_then_wait(&mut a);
    // sti; hlt: the pending interrupt ends the halt at once; one lost
    // in the restore leaves it halted until the run times out.
    a.bytes(&[0xfb, 0xf4, 0xfa]); // sti; hlt; cli
    a.load64(Reg::Rax, Reg::Rdi, 64).out_eax(TEST_PORT);
    power_off(&mut a);
    a.bind(handler);
    a.bytes(&[0x48, 0xff, 0x46, 64]); // inc qword [rsi+64]
    a.bytes(&[0x41, 0xc7, 0x81, 0xb0, 0, 0, 0, 0, 0, 0, 0]); // EOI
    a.bytes(&[0x48, 0xcf]); // iretq
    let h = a.addr_of(handler);
    (a.finish(), h)
}

#[test]
fn kvm_snapshot_keeps_a_pending_interrupt() {
    let Some(mut m) = machine(Topology::cpus(1), 64) else { return };
    let (code, handler) = pending_interrupt_program();
    load_with_idt(&mut m, &code, handler);
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let out = m.run_and_save(TIMEOUT, SaveAt::Doorbells(1), &f).unwrap();
    assert!(out.saved.is_some(), "{:?}", out.cause);
    drop(out);
    for i in 0..2 {
        let m = Machine::restore(&f).unwrap();
        set_go(&m, 1);
        let out = m.run(Duration::from_secs(5)).unwrap();
        assert_eq!(out.exit, ExitKind::PowerOff, "restore {i}: the pending interrupt never came? {:?}", out.cause);
        assert_eq!(out.test_values(), [1], "restore {i}: the interrupt pending at the save was delivered once");
    }
}

/// `computation`'s loop, saved at whatever instruction it is on a third
/// of the way through (GO already set: no wait at the doorbell), restored
/// three times: each ends like an uninterrupted run.
#[test]
fn kvm_snapshot_resumes_from_an_arbitrary_point() {
    let run = |iters: u32| {
        let mut m = Machine::new(Topology::cpus(1), 64).unwrap();
        m.load_raw(&computation(iters)).unwrap();
        set_go(&m, 1);
        m.run(TIMEOUT).unwrap()
    };
    let Some(probe) = machine(Topology::cpus(1), 64) else { return };
    drop(probe);
    // About 300 ms of loop whatever this host's speed (KVM's emulator
    // runs it at ~70k rounds/s here; a real CPU thousands of times faster).
    let mut iters = 20_000u32;
    let mut out = run(iters);
    while out.run_time < Duration::from_millis(300) && iters < 1 << 30 {
        let scale = (300.0 / out.run_time.as_secs_f64().max(1e-4) / 1000.0).clamp(1.5, 1000.0);
        iters = (iters as f64 * scale).min((1u64 << 30) as f64) as u32 & !1;
        out = run(iters);
    }
    let want = results(&out);
    let at = out.run_time / 3;
    eprintln!("{iters} rounds in {:?}; saving after {at:?}", out.run_time);
    drop(out);

    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let mut m = Machine::new(Topology::cpus(1), 64).unwrap();
    m.load_raw(&computation(iters)).unwrap();
    set_go(&m, 1);
    let out = m.run_and_save(TIMEOUT, SaveAt::After(at), &f).unwrap();
    assert!(out.saved.is_some(), "the loop ended before the save ({:?})", out.cause);
    assert_eq!(out.test_values(), [0xa0], "saved mid-loop, before the results");
    drop(out);
    for i in 0..3 {
        let m = Machine::restore(&f).unwrap();
        let out = m.run(TIMEOUT).unwrap();
        assert_eq!(results(&out), want, "restore {i} ends with another result than the uninterrupted run");
    }
}

/// User mode's GDT, its TSS (with an I/O bitmap) and its stack.
const USER_GDT: u64 = DATA + 0x1000;
const USER_TSS: u64 = DATA + 0x2000;
const USER_STACK: u64 = DATA + 0x8000;
const USER_TSS_SEL: u16 = 0x20;
const USER_DATA_SEL: u16 = 0x30;
const USER_CODE_SEL: u16 = 0x38;
/// Bitmap bytes (ports 0..0x800) past the 104-byte TSS, and the 0xff
/// byte the architecture wants after them.
const IO_BITMAP: usize = 0x100;

/// A TSS whose I/O bitmap lets ring 3 write the test port, the doorbell
/// and the ACPI control port (and nothing else), a GDT with that TSS
/// (available, as a kernel's `ltr` finds it) and ring-3 flat segments,
/// and the low 4 MiB (code, data, stack) user-accessible.
fn setup_user_io(m: &Machine) {
    let mem = m.memory();
    let mut tss = vec![0u8; 104 + IO_BITMAP + 1];
    tss[0x66..0x68].copy_from_slice(&104u16.to_le_bytes()); // I/O map base
    tss[104..].fill(0xff);
    for port in (TEST_PORT..TEST_PORT + 4).chain([DOORBELL_PORT, PM1A_CNT_PORT, PM1A_CNT_PORT + 1]) {
        tss[104 + port as usize / 8] &= !(1 << (port % 8));
    }
    mem.write_slice(&tss, GuestAddress(USER_TSS)).unwrap();
    let gdt = [
        GDT[0],
        GDT[1],
        GDT[2],
        GDT[3],
        descriptor(0x0089, USER_TSS as u32, (104 + IO_BITMAP) as u32), // available 64-bit TSS
        0,
        descriptor(0xc0f3, 0, 0xfffff), // ring-3 data
        descriptor(0xa0fb, 0, 0xfffff), // ring-3 64-bit code
    ];
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(USER_GDT)).unwrap();
    let mut gdtr = [0u8; 10];
    gdtr[..2].copy_from_slice(&(bytes.len() as u16 - 1).to_le_bytes());
    gdtr[2..].copy_from_slice(&USER_GDT.to_le_bytes());
    mem.write_slice(&gdtr, GuestAddress(DATA + 0x100)).unwrap();
    // The U bit on every level of the first two 2 MiB pages.
    for table in [PML4, PDPT, PD0, PD0 + 8] {
        let e: u64 = mem.read_obj(GuestAddress(table)).unwrap();
        mem.write_obj(e | 4, GuestAddress(table)).unwrap();
    }
}

/// Loads the GDT and TSS of [`setup_user_io`] and drops to ring 3
/// (IOPL 0: only the TSS bitmap allows its I/O), which reports 0xa1,
/// rings the doorbell and waits for GO, reports 0xa2 and powers off.
/// No IDT: an I/O the CPU refuses is a triple fault.
fn user_io_program() -> Vec<u8> {
    let mut a = Asm::new(RAW_CODE);
    let start = a.label();
    let user = a.label();
    a.jmp(start);
    a.bind(user).mov64(Reg::Rdi, DATA);
    a.outl(TEST_PORT, 0xa1);
    doorbell_then_wait(&mut a);
    a.outl(TEST_PORT, 0xa2);
    a.outw(PM1A_CNT_PORT, S5_POWER_OFF);
    let spin = a.label();
    a.bind(spin).jmp(spin); // ring 3 cannot hlt
    let user_entry = a.addr_of(user);
    a.bind(start);
    a.bytes(&[0x0f, 0x01, 0x14, 0x25]).bytes(&((DATA + 0x100) as u32).to_le_bytes()); // lgdt [DATA+0x100]
    a.mov32(Reg::Rax, USER_TSS_SEL.into()).bytes(&[0x0f, 0x00, 0xd8]); // ltr ax
    // iretq to ring 3: SS, RSP, RFLAGS (IF and IOPL 0), CS, RIP.
    a.bytes(&[0x6a, (USER_DATA_SEL | 3) as u8]); // push imm8
    a.mov64(Reg::Rax, USER_STACK).bytes(&[0x50]); // push rax
    a.bytes(&[0x6a, 0x02, 0x6a, (USER_CODE_SEL | 3) as u8]);
    a.mov64(Reg::Rax, user_entry).bytes(&[0x50]);
    a.bytes(&[0x48, 0xcf]); // iretq
    a.finish()
}

/// User space's I/O through the TSS bitmap (ioperm: how ktstr's guest
/// init rings the doorbell) keeps working after a restore. KVM reports
/// TR busy on AMD; restored as such, QEMU TCG's SVM (the nested-KVM
/// rig) refuses every such I/O and the Debian kernel's restored init
/// died of SIGSEGV on its first doorbell.
#[test]
fn kvm_snapshot_user_io_through_the_tss_bitmap_after_restore() {
    let code = user_io_program();
    let Some(mut m) = machine(Topology::cpus(1), 64) else { return };
    setup_user_io(&m);
    m.load_raw(&code).unwrap();
    set_go(&m, 1);
    let out = m.run(TIMEOUT).unwrap();
    assert_eq!(out.exit, ExitKind::PowerOff, "uninterrupted run: {:?}\n{}", out.cause, out.vcpu_states.join("\n"));
    assert_eq!(out.test_values(), [0xa1, 0xa2], "uninterrupted run");

    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let mut m = Machine::new(Topology::cpus(1), 64).unwrap();
    setup_user_io(&m);
    m.load_raw(&code).unwrap();
    let out = m.run_and_save(TIMEOUT, SaveAt::Doorbells(1), &f).unwrap();
    assert_eq!(out.exit, ExitKind::Stopped, "{:?}", out.cause);
    assert!(out.saved.is_some(), "not saved at the doorbell");
    assert_eq!(out.test_values(), [0xa1], "saved in ring 3 at the doorbell");
    drop(out);

    let m = Machine::restore(&f).unwrap();
    set_go(&m, 1);
    let out = m.run(TIMEOUT).unwrap();
    assert_eq!(
        out.exit,
        ExitKind::PowerOff,
        "the restored guest's ring-3 I/O was refused (a triple fault is the #GP with no IDT): {:?}\n{}",
        out.cause,
        out.vcpu_states.join("\n")
    );
    assert_eq!(out.test_values(), [0xa2], "the restored guest's ring-3 reports");
}
