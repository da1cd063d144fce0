//! Identity page tables and the control-register state for each entry mode.

use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt;
use super::memory::{PD0, PDPT, PML4};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

pub const CR0_PE: u64 = 1;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// Maps the first 4 GiB 1:1 with 2 MiB pages: enough for the kernel,
/// boot structures and the LAPIC/IOAPIC/scratch MMIO pages.
pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(PDPT | PRESENT_RW, GuestAddress(PML4))?;
    for pd in 0..4u64 {
        let pd_addr = PD0 + pd * 0x1000;
        mem.write_obj(pd_addr | PRESENT_RW, GuestAddress(PDPT + pd * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((pd << 30) + (i << 21)) | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd_addr))?;
    }
    Ok(())
}

/// 64-bit mode with paging: the state the 64-bit boot protocol and raw
/// micro-guests start in.
pub fn long_mode(sregs: &mut kvm_sregs) {
    gdt::load_segments(sregs, true);
    sregs.cr3 = PML4;
    sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// 32-bit protected mode, paging off: the PVH entry state.
pub fn protected_mode(sregs: &mut kvm_sregs) {
    gdt::load_segments(sregs, false);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_map(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD0 + 3 * 0x1000 + 511 * 8)).unwrap();
        assert_eq!(pde, 0xffe0_0000 | 0x83);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPT + 8)).unwrap();
        assert_eq!(pdpte, (PD0 + 0x1000) | 3);
    }
}
