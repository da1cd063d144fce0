//! 16 MiB through the data channel of a KVM micro-guest: the guest copies
//! a record (header + 16 MiB payload, prepared in its RAM) into the
//! reserved region with `rep movsq`, publishes it and rings the doorbell;
//! the host decodes and checksums it from guest memory.

use std::time::{Duration, Instant};

use ktstr_runtime::channel::{self, kind, Writer};
use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, S5_POWER_OFF};
use ktstr_runtime::vmm::kvm::asm::{Asm, Reg};
use ktstr_runtime::vmm::kvm::memory::{MIB, RAW_CODE};
use ktstr_runtime::vmm::kvm::Machine;
use ktstr_runtime::testing;
use ktstr_runtime::vmm::{ChannelRegion, ExitKind, Topology};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn kvm_channel_carries_16_mib() {
    let Some(mut m) = testing::kvm(Machine::new(Topology::cpus(1), 64)) else { return };
    let ch = ChannelRegion { gpa: 32 * MIB, size: 20 * MIB };
    m.set_channel(ch);
    // The guest's source: a staged copy of the region with one record.
    let payload: Vec<u8> = (0..16 * MIB as usize).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let mut staged = vec![0u8; ch.size as usize];
    Writer::init(&mut staged).send(kind::BLOB, &payload).unwrap();
    let used = channel::HEADER_SIZE as usize + 16 + payload.len();
    let src = 8 * MIB;
    m.memory().write_slice(&staged[..used], GuestAddress(src)).unwrap();

    let mut a = Asm::new(RAW_CODE);
    a.mov64(Reg::Rsi, src).mov64(Reg::Rdi, ch.gpa).mov64(Reg::Rcx, (used / 8) as u64);
    a.bytes(&[0xf3, 0x48, 0xa5]); // rep movsq
    a.outb(channel::DOORBELL_PORT, 1).outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();
    m.load_raw(&a.finish()).unwrap();
    let t = Instant::now();
    let out = m.run(Duration::from_secs(120)).unwrap();
    eprintln!("16 MiB copy + decode: {:?}", t.elapsed());
    assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
    assert_eq!(out.doorbells, 1);
    let msgs = out.messages.expect("checksums verify");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].payload.len(), payload.len());
    assert!(msgs[0].payload == payload, "16 MiB intact");
}
