//! Boot GDT and the segment state that matches it.
//!
//! The guest starts with segments already loaded (KVM_SET_SREGS), but the
//! table is also written to memory so a guest reloading a selector gets the
//! same descriptor.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::memory::{GDT_ADDR, IDT_ADDR};

/// The 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18,
/// both flat; PVH only needs flat 32-bit code and data.
pub const CODE32_SEL: u16 = 0x08;
pub const CODE64_SEL: u16 = 0x10;
pub const DATA_SEL: u16 = 0x18;
pub const TSS_SEL: u16 = 0x20;

/// flags(12 bits: G DB L AVL | P DPL S TYPE), base, limit → descriptor.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

pub const GDT: [u64; 6] = [
    0,
    descriptor(0xc09b, 0, 0xfffff), // 32-bit code (PVH entry)
    descriptor(0xa09b, 0, 0xfffff), // 64-bit code
    descriptor(0xc093, 0, 0xfffff), // flat data
    descriptor(0x008b, 0, 0x67),    // busy TSS, low half
    0,                              // TSS high half
];

/// The `kvm_segment` a descriptor loads as.
pub fn segment(sel: u16, desc: u64) -> kvm_segment {
    let g = ((desc >> 55) & 1) as u8;
    let raw_limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: sel,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: u8::from((desc >> 47) & 1 == 0),
        padding: 0,
    }
}

pub fn write(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
}

/// Loads GDTR/IDTR, TR and the data segments; CS is 64-bit code when
/// `long_mode`, else flat 32-bit code.
pub fn load_segments(sregs: &mut kvm_sregs, long_mode: bool) {
    let code = if long_mode { segment(CODE64_SEL, GDT[2]) } else { segment(CODE32_SEL, GDT[1]) };
    let data = segment(DATA_SEL, GDT[3]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SEL, GDT[4]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors() {
        assert_eq!(GDT[(CODE64_SEL >> 3) as usize], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[(DATA_SEL >> 3) as usize], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[(CODE32_SEL >> 3) as usize], 0x00cf_9b00_0000_ffff);
        assert_eq!((CODE64_SEL, DATA_SEL), (0x10, 0x18), "__BOOT_CS/__BOOT_DS");
        let cs = segment(CODE64_SEL, GDT[2]);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_, cs.limit), (1, 0, 1, 0xb, 0xffff_ffff));
        let tr = segment(TSS_SEL, GDT[4]);
        assert_eq!((tr.type_, tr.limit, tr.s, tr.g), (0xb, 0x67, 0, 0));
    }
}
