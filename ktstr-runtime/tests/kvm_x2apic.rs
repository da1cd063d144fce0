//! Up to 256 vCPUs on the KVM backend: the BSP wakes every AP with
//! INIT/SIPI (shorthand "all excluding self"); each AP goes from real
//! mode to long mode, switches its local APIC to x2APIC mode, reads its
//! own x2APIC id (MSR 0x802) and the topology leaves (CPUID 0xb, 1), and
//! appends a checksummed record to the data channel. The last one to
//! finish publishes the records, rings the doorbell and powers off; the
//! host checks every vCPU's report against the topology.

use std::time::{Duration, Instant};

use ktstr_runtime::channel::{self, kind, Writer, DOORBELL_PORT};
use ktstr_runtime::testing;
use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, S5_POWER_OFF};
use ktstr_runtime::vmm::kvm::asm::{Asm, Cond, Reg};
use ktstr_runtime::vmm::kvm::gdt::{CODE64_SEL, GDT};
use ktstr_runtime::vmm::kvm::memory::{GDT_ADDR, LAPIC_ADDR, MIB, PML4, RAW_CODE};
use ktstr_runtime::vmm::kvm::{cpuid, Machine};
use ktstr_runtime::vmm::{ChannelRegion, ExitKind, Topology};
use vm_memory::{Bytes, GuestAddress};

const TRAMPOLINE: u64 = 0x8000;
const GDTR: u64 = 0x8f00;
const TICKET: u64 = 0x6000;
const DONE: u64 = 0x6008;
const CRC_TABLE: u64 = 0x30_0000;
const CHANNEL: ChannelRegion = ChannelRegion { gpa: 32 * MIB, size: MIB };
/// Record header (16 bytes) + 8 u32 of payload.
const RECORD: u32 = 48;

/// 16-bit code at the SIPI page: straight from real mode to long mode
/// (PAE, the boot identity map, EFER.LME, CR0.PG|PE), then a far jump
/// into the 64-bit code segment at `entry`.
fn trampoline(entry: u32) -> Vec<u8> {
    let [g0, g1] = (GDTR as u16).to_le_bytes();
    let p = (PML4 as u32).to_le_bytes();
    let e = entry.to_le_bytes();
    let s = CODE64_SEL.to_le_bytes();
    #[rustfmt::skip]
    let code = vec![
        0xfa,                                     // cli
        0x31, 0xc0, 0x8e, 0xd8,                   // xor ax, ax; mov ds, ax
        0x0f, 0x01, 0x16, g0, g1,                 // lgdt [GDTR]
        0x66, 0xb8, 0x20, 0, 0, 0,                // mov eax, CR4.PAE
        0x0f, 0x22, 0xe0,                         // mov cr4, eax
        0x66, 0xb8, p[0], p[1], p[2], p[3],       // mov eax, PML4
        0x0f, 0x22, 0xd8,                         // mov cr3, eax
        0x66, 0xb9, 0x80, 0, 0, 0xc0,             // mov ecx, EFER
        0x0f, 0x32,                               // rdmsr
        0x66, 0x0d, 0, 1, 0, 0,                   // or eax, LME
        0x0f, 0x30,                               // wrmsr
        0x66, 0xb8, 1, 0, 0, 0x80,                // mov eax, PG | PE
        0x0f, 0x22, 0xc0,                         // mov cr0, eax
        0x66, 0xea, e[0], e[1], e[2], e[3], s[0], s[1], // jmp far CODE64_SEL:entry
    ];
    code
}

/// The code every vCPU (the BSP after waking the others) runs in long
/// mode: take a record slot, fill it, checksum it, count itself done.
fn report(a: &mut Asm, n: u32) {
    let data = CHANNEL.gpa + channel::HEADER_SIZE;
    a.mov64(Reg::Rdi, TICKET);
    a.bytes(&[0xb8, 1, 0, 0, 0]); // mov eax, 1
    a.bytes(&[0xf0, 0x0f, 0xc1, 0x07]); // lock xadd [rdi], eax
    a.bytes(&[0x6b, 0xc0, RECORD as u8]); // imul eax, eax, RECORD
    a.mov64(Reg::Rsi, data);
    a.bytes(&[0x48, 0x01, 0xc6]); // add rsi, rax: this vCPU's record
    #[rustfmt::skip]
    a.bytes(&[
        0xb9, 0x1b, 0, 0, 0,          // mov ecx, IA32_APIC_BASE
        0x0f, 0x32,                   // rdmsr
        0x0d, 0x00, 0x0c, 0, 0,       // or eax, EN | EXTD: x2APIC mode
        0x0f, 0x30,                   // wrmsr
        0xb9, 0x02, 0x08, 0, 0,       // mov ecx, x2APIC ID MSR
        0x0f, 0x32,                   // rdmsr
        0x89, 0x46, 0x10,             // mov [rsi+16], eax      x2APIC id
        0xb8, 0x0b, 0, 0, 0,          // mov eax, 0xb
        0x31, 0xc9,                   // xor ecx, ecx
        0x0f, 0xa2,                   // cpuid
        0x89, 0x56, 0x14,             // mov [rsi+20], edx      0xb.0 EDX: x2APIC id
        0x89, 0x46, 0x18,             // mov [rsi+24], eax      0xb.0 EAX: SMT shift
        0x89, 0x5e, 0x1c,             // mov [rsi+28], ebx      0xb.0 EBX: threads
        0xb8, 0x0b, 0, 0, 0,          // mov eax, 0xb
        0xb9, 1, 0, 0, 0,             // mov ecx, 1
        0x0f, 0xa2,                   // cpuid
        0x89, 0x46, 0x20,             // mov [rsi+32], eax      0xb.1 EAX: package shift
        0x89, 0x5e, 0x24,             // mov [rsi+36], ebx      0xb.1 EBX: CPUs per package
        0x89, 0x4e, 0x2c,             // mov [rsi+44], ecx      0xb.1 ECX: level type and number
        0xb8, 1, 0, 0, 0,             // mov eax, 1
        0x0f, 0xa2,                   // cpuid
        0xc1, 0xeb, 24,               // shr ebx, 24
        0x89, 0x5e, 0x28,             // mov [rsi+40], ebx      leaf 1: initial (8-bit) APIC id
        0xc7, 0x06, kind::BLOB as u8, 0, 0, 0,   // mov dword [rsi], BLOB
        0xc7, 0x46, 4, 32, 0, 0, 0,              // mov dword [rsi+4], 32
        0xc7, 0x46, 12, 0, 0, 0, 0,              // mov dword [rsi+12], 0
    ]);
    // CRC-32 (IEEE, what the host's decoder checks) of the 32 payload bytes.
    a.mov64(Reg::Rbx, CRC_TABLE);
    #[rustfmt::skip]
    a.bytes(&[
        0xba, 0xff, 0xff, 0xff, 0xff, // mov edx, !0
        0x31, 0xc9,                   // xor ecx, ecx
        0x0f, 0xb6, 0x44, 0x0e, 0x10, // loop: movzx eax, byte [rsi+rcx+16]
        0x31, 0xd0,                   // xor eax, edx
        0x0f, 0xb6, 0xc0,             // movzx eax, al
        0xc1, 0xea, 8,                // shr edx, 8
        0x33, 0x14, 0x83,             // xor edx, [rbx+rax*4]
        0xff, 0xc1,                   // inc ecx
        0x83, 0xf9, 32,               // cmp ecx, 32
        0x75, 0xe9,                   // jne loop
        0xf7, 0xd2,                   // not edx
        0x89, 0x56, 0x08,             // mov [rsi+8], edx
    ]);
    a.mov64(Reg::Rdi, DONE);
    a.bytes(&[0xb8, 1, 0, 0, 0]); // mov eax, 1
    a.bytes(&[0xf0, 0x0f, 0xc1, 0x07]); // lock xadd [rdi], eax
    let halt = a.label();
    a.cmp32(Reg::Rax, n - 1).jcc(Cond::Ne, halt);
    // The last one publishes all n records (their stores precede every
    // locked increment), rings the doorbell and powers off.
    a.mov64(Reg::Rdi, CHANNEL.gpa + 16).mov64(Reg::Rax, (n * RECORD) as u64);
    a.bytes(&[0x48, 0x89, 0x07]); // mov [rdi], rax: committed length
    a.outb(DOORBELL_PORT, 1).outw(PM1A_CNT_PORT, S5_POWER_OFF);
    a.bind(halt).halt_forever();
}

fn crc_table() -> Vec<u8> {
    (0..256u32)
        .flat_map(|i| (0..8).fold(i, |c, _| if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 }).to_le_bytes())
        .collect()
}

/// What one vCPU reported.
#[derive(Debug)]
struct Seen {
    x2apic_id: u32,
    leaf_b_id: u32,
    smt_shift: u32,
    threads: u32,
    pkg_shift: u32,
    per_pkg: u32,
    initial_id: u32,
    level1: u32,
}

fn wake_all(topo: Topology) {
    let Some(mut m) = testing::kvm(Machine::new(topo, 64)) else { return };
    let n = topo.total_cpus();
    let mem = m.memory();
    let mut gdtr = ((GDT.len() * 8 - 1) as u16).to_le_bytes().to_vec();
    gdtr.extend_from_slice(&(GDT_ADDR as u32).to_le_bytes());
    mem.write_slice(&gdtr, GuestAddress(GDTR)).unwrap();
    mem.write_slice(&crc_table(), GuestAddress(CRC_TABLE)).unwrap();
    let mut staged = vec![0u8; CHANNEL.size as usize];
    Writer::init(&mut staged);
    mem.write_slice(&staged[..channel::HEADER_SIZE as usize], GuestAddress(CHANNEL.gpa)).unwrap();

    let mut a = Asm::new(RAW_CODE);
    a.wake_all_aps(LAPIC_ADDR, TRAMPOLINE);
    let entry = a.label();
    a.bind(entry);
    let entry_addr = a.addr_of(entry);
    report(&mut a, n);
    mem.write_slice(&trampoline(entry_addr as u32), GuestAddress(TRAMPOLINE)).unwrap();
    m.set_channel(CHANNEL);
    m.load_raw(&a.finish()).unwrap();
    let t0 = Instant::now();
    let out = m.run(Duration::from_secs(120)).unwrap();
    eprintln!("{n} vCPUs ({topo:?}): woke, reported and powered off in {:.2}s", t0.elapsed().as_secs_f64());
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}\n{}", out.cause, out.vcpu_states.join("\n"));
    assert_eq!(out.doorbells, 1);
    let msgs = out.messages.expect("every record's checksum verifies");
    assert_eq!(msgs.len(), n as usize, "one record per vCPU");
    let mut seen: Vec<Seen> = msgs
        .iter()
        .map(|m| {
            assert_eq!((m.kind, m.payload.len()), (kind::BLOB, 32));
            let w = |i: usize| u32::from_le_bytes(m.payload[i * 4..i * 4 + 4].try_into().unwrap());
            Seen {
                x2apic_id: w(0),
                leaf_b_id: w(1),
                smt_shift: w(2),
                threads: w(3) & 0xffff,
                pkg_shift: w(4),
                per_pkg: w(5) & 0xffff,
                initial_id: w(6),
                level1: w(7),
            }
        })
        .collect();
    seen.sort_by_key(|s| s.x2apic_id);
    let want: Vec<u32> = (0..n).map(|c| cpuid::apic_id(&topo, c)).collect();
    assert_eq!(seen.iter().map(|s| s.x2apic_id).collect::<Vec<_>>(), want, "every vCPU reports its own x2APIC id");
    for s in &seen {
        assert_eq!(s.leaf_b_id, s.x2apic_id, "{s:?}");
        assert_eq!(s.initial_id, s.x2apic_id & 0xff, "{s:?}");
        assert_eq!((s.smt_shift, s.threads), (cpuid::thread_bits(&topo), topo.threads), "{s:?}");
        assert_eq!((s.pkg_shift, s.per_pkg), (cpuid::package_shift(&topo), topo.threads * topo.cores), "{s:?}");
        assert_eq!(s.level1 & 0xffff, 0x201, "leaf 0xb subleaf 1 is the core level: {s:?}");
    }
}

/// The largest gauntlet preset: 256 vCPUs, APIC ids 0..=255 (255 is
/// only reachable as x2APIC).
#[test]
fn kvm_x2apic_256_vcpus_report_their_ids() {
    let p = ktstr_runtime::preset::PRESETS.last().unwrap();
    assert_eq!(p.cpus(), 256);
    wake_all(p.topology);
}

/// Six cores per LLC leave gaps in the ids: 240 vCPUs with ids up to 315.
#[test]
fn kvm_x2apic_sparse_ids_past_255() {
    let t = Topology::new(4, 5, 6, 2);
    assert_eq!(cpuid::apic_id(&t, 239), 315);
    wake_all(t);
}
