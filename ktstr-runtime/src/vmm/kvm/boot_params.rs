//! What the kernel reads at entry: the Linux zero page (64-bit boot
//! protocol) or the PVH `hvm_start_info`, each with the e820 map.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::memory::{E820Entry, PVH_MEMMAP, PVH_MODLIST, ZERO_PAGE};

const KERNEL_LOADER_OTHER: u8 = 0xff;
const CAN_USE_HEAP: u8 = 0x80;
const PVH_MAGIC: u32 = 0x336e_c578;

/// Where the initrd landed, if any.
#[derive(Debug, Clone, Copy)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

pub struct BootInfo<'a> {
    pub cmdline_addr: u64,
    pub cmdline_len: usize,
    pub initrd: Option<Initrd>,
    pub rsdp: u64,
    pub e820: &'a [E820Entry],
}

/// The zero page for the 64-bit boot protocol, from the image's setup header.
pub fn zero_page(hdr: setup_header, info: &BootInfo) -> boot_params {
    let mut p = boot_params { hdr, ..Default::default() };
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.loadflags |= CAN_USE_HEAP;
    p.hdr.heap_end_ptr = 0xfe00;
    p.hdr.vid_mode = 0xffff; // "normal": no video mode switch
    p.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    p.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some(rd) = info.initrd {
        p.hdr.ramdisk_image = rd.addr as u32;
        p.hdr.ramdisk_size = rd.size as u32;
        p.ext_ramdisk_image = (rd.addr >> 32) as u32;
        p.ext_ramdisk_size = (rd.size >> 32) as u32;
    }
    p.acpi_rsdp_addr = info.rsdp;
    for (slot, e) in p.e820_table.iter_mut().zip(info.e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    p.e820_entries = info.e820.len().min(p.e820_table.len()) as u8;
    p
}

pub fn write_zero_page(mem: &GuestMemoryMmap, p: &boot_params) -> anyhow::Result<()> {
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&BootParams::new(p, GuestAddress(ZERO_PAGE)), mem)
        .map_err(|e| anyhow::anyhow!("writing the zero page: {e}"))
}

/// The PVH start info (at `ZERO_PAGE`), memory map and module list.
pub fn write_pvh(mem: &GuestMemoryMmap, info: &BootInfo) -> anyhow::Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = info
        .e820
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 })
        .collect();
    let mut start = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: info.cmdline_addr,
        rsdp_paddr: info.rsdp,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params;
    if let Some(rd) = info.initrd {
        start.nr_modules = 1;
        start.modlist_paddr = PVH_MODLIST;
        params = BootParams::new(&start, GuestAddress(ZERO_PAGE));
        params.set_modules(&[hvm_modlist_entry { paddr: rd.addr, size: rd.size, ..Default::default() }], GuestAddress(PVH_MODLIST));
    } else {
        params = BootParams::new(&start, GuestAddress(ZERO_PAGE));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| anyhow::anyhow!("writing the PVH start info: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::kvm::memory::{e820_map, CMDLINE};
    use vm_memory::Bytes;

    #[test]
    fn zero_page_fields() {
        let e820 = e820_map(256, None);
        let info = BootInfo { cmdline_addr: CMDLINE, cmdline_len: 12, initrd: Some(Initrd { addr: 0x800_0000, size: 4096 }), rsdp: 0xe_0000, e820: &e820 };
        let hdr = setup_header { header: 0x5372_6448, version: 0x20f, ..Default::default() };
        let p = zero_page(hdr, &info);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_zero_page(&mem, &p).unwrap();
        // Byte offsets from the boot protocol, read back raw.
        let rd: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x218)).unwrap();
        let cmd: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x228)).unwrap();
        let rsdp: u64 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x70)).unwrap();
        let n: u8 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x1e8)).unwrap();
        let loader: u8 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x210)).unwrap();
        let e0_size: u64 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x2d0 + 8)).unwrap();
        assert_eq!((rd, cmd, rsdp, n as usize, loader), (0x800_0000, CMDLINE as u32, 0xe_0000, e820.len(), 0xff));
        assert_eq!(e0_size, e820[0].size);
    }

    #[test]
    fn pvh_start_info() {
        let e820 = e820_map(256, None);
        let info = BootInfo { cmdline_addr: CMDLINE, cmdline_len: 4, initrd: Some(Initrd { addr: 0x800_0000, size: 77 }), rsdp: 0xe_0000, e820: &e820 };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_pvh(&mem, &info).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        let nmods: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 12)).unwrap();
        let rd_size: u64 = mem.read_obj(GuestAddress(PVH_MODLIST + 8)).unwrap();
        let entries: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 48)).unwrap();
        assert_eq!((magic, nmods, rd_size, entries as usize), (PVH_MAGIC, 1, 77, e820.len()));
    }
}
