//! Guest-physical layout and guest RAM.
//!
//! Fixed low-memory addresses for the boot structures, RAM split around
//! the 32-bit MMIO hole, and the e820 map that describes it.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::vmm::{ChannelRegion, VmError};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Boot GDT (null, code64, data, code32, TSS).
pub const GDT_ADDR: u64 = 0x500;
/// Empty boot IDT; the self-test installs its own.
pub const IDT_ADDR: u64 = 0x600;
/// Linux zero page (bzImage) or PVH `hvm_start_info`.
pub const ZERO_PAGE: u64 = 0x7000;
/// PVH memory map and module list follow the start info.
pub const PVH_MEMMAP: u64 = 0x7800;
pub const PVH_MODLIST: u64 = 0x7f00;
/// Identity-map page tables: PML4, PDPT, then four PDs covering 4 GiB.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD0: u64 = 0xb000;
/// Boot stack top for raw guests (grows down from here).
pub const STACK_TOP: u64 = 0x8_0000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Start of the BIOS area; e820 marks [EBDA, 1 MiB) reserved.
pub const EBDA: u64 = 0x9_fc00;
/// ACPI tables live in the BIOS area where the RSDP scan looks too.
pub const ACPI_BASE: u64 = 0xe_0000;
pub const ACPI_MAX: u64 = 0x2_0000;
/// Where raw micro-guest code is loaded by default.
pub const RAW_CODE: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC, scratch device).
pub const MMIO_HOLE: u64 = 3 * GIB;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// A host-side register page for MMIO-exit tests; never RAM.
pub const SCRATCH_MMIO: u64 = 0xd000_0000;
pub const SCRATCH_MMIO_SIZE: u64 = 0x1000;

/// RAM ranges for `memory_mib`: below the hole, and the rest above 4 GiB.
pub fn ram_ranges(memory_mib: u64) -> Vec<(u64, u64)> {
    let total = memory_mib * MIB;
    if total <= MMIO_HOLE {
        vec![(0, total)]
    } else {
        vec![(0, MMIO_HOLE), (4 * GIB, total - MMIO_HOLE)]
    }
}

pub fn create(memory_mib: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_ranges(memory_mib).into_iter().map(|(a, s)| (GuestAddress(a), s as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| {
        // An mmap failure is host memory pressure, not a broken host.
        match &e {
            vm_memory::mmap::FromRangesError::MmapRegion(vm_memory::mmap::MmapRegionError::Mmap(io)) => {
                VmError::from_kvm_errno("mmap guest RAM", io.raw_os_error().unwrap_or(libc::ENOMEM))
            }
            _ => VmError::Host(anyhow::anyhow!("guest RAM of {memory_mib} MiB: {e}")),
        }
    })
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map: low RAM, the BIOS hole, RAM with the channel region
/// carved out as reserved (so the guest kernel never allocates it).
pub fn e820_map(memory_mib: u64, channel: Option<ChannelRegion>) -> Vec<E820Entry> {
    let mut out = vec![
        E820Entry { addr: 0, size: EBDA, kind: E820_RAM },
        E820Entry { addr: EBDA, size: 0x10_0000 - EBDA, kind: E820_RESERVED },
    ];
    for (start, size) in ram_ranges(memory_mib) {
        let end = start + size;
        let start = start.max(0x10_0000);
        if end <= start {
            continue;
        }
        let mut pieces = vec![(start, end, E820_RAM)];
        if let Some(ch) = channel.filter(|c| c.size > 0) {
            let (cs, ce) = (ch.gpa, ch.gpa + ch.size);
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e, k)| {
                    if ce <= s || cs >= e {
                        return vec![(s, e, k)];
                    }
                    let mut v = Vec::new();
                    if cs > s {
                        v.push((s, cs, k));
                    }
                    v.push((cs.max(s), ce.min(e), E820_RESERVED));
                    if ce < e {
                        v.push((ce, e, k));
                    }
                    v
                })
                .collect();
        }
        out.extend(pieces.into_iter().map(|(s, e, kind)| E820Entry { addr: s, size: e - s, kind }));
    }
    // The IOAPIC and LAPIC pages are not RAM; say so, as firmware does.
    out.push(E820Entry { addr: IOAPIC_ADDR, size: 0x1000, kind: E820_RESERVED });
    out.push(E820Entry { addr: LAPIC_ADDR, size: 0x1000, kind: E820_RESERVED });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_channel() {
        let ch = ChannelRegion { gpa: 0xfc0_0000, size: 0x40_0000 };
        let map = e820_map(256, Some(ch));
        assert!(map.contains(&E820Entry { addr: 0x10_0000, size: 0xfc0_0000 - 0x10_0000, kind: E820_RAM }));
        assert!(map.contains(&E820Entry { addr: 0xfc0_0000, size: 0x40_0000, kind: E820_RESERVED }));
        let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, 256 * MIB - 0x40_0000 - (0x10_0000 - EBDA));
    }

    #[test]
    fn high_memory_split() {
        assert_eq!(ram_ranges(4096), vec![(0, 3 * GIB), (4 * GIB, GIB)]);
        let map = e820_map(4096, None);
        assert!(map.contains(&E820Entry { addr: 4 * GIB, size: GIB, kind: E820_RAM }));
        assert!(map.contains(&E820Entry { addr: 0x10_0000, size: 3 * GIB - 0x10_0000, kind: E820_RAM }));
    }
}
