//! Puts a kernel, its command line and initrd into guest memory and says
//! where to enter: the 64-bit boot protocol for a bzImage, the PVH entry
//! (32-bit protected mode) for a vmlinux ELF.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot_params::{self, BootInfo, Initrd};
use super::memory::{self, CMDLINE, CMDLINE_MAX, MIB, ZERO_PAGE};
use crate::vmm::{VmConfig, VmError};

const HIMEM: u64 = 0x10_0000;
/// bzImage header: the kernel is 64-bit entry capable.
const XLF_KERNEL_64: u16 = 1;

/// Entry state for the BSP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub rip: u64,
    /// 64-bit mode with paging (bzImage); else 32-bit protected mode (PVH).
    pub long_mode: bool,
    /// Zero page (RSI) or start info (RBX).
    pub params: u64,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> VmError {
    VmError::BadImage(format!("{}: {what}", path.display()))
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"\x7fELF"
}

/// Loads `cfg`'s kernel (preferring `vmlinux` through PVH) and everything
/// the kernel reads at entry.
pub fn load(mem: &GuestMemoryMmap, cfg: &VmConfig, rsdp: u64) -> Result<BootEntry, VmError> {
    let elf = cfg.vmlinux.iter().chain(std::iter::once(&cfg.kernel)).find(|p| is_elf(p)).cloned();
    let mut kernel_end = 0;
    let mut entry = None;
    let mut header = None;
    if let Some(path) = &elf {
        let mut f = File::open(path).map_err(|e| bad(path, e))?;
        match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM))) {
            Ok(r) => match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => {
                    kernel_end = r.kernel_end;
                    entry = Some(BootEntry { rip: addr.0, long_mode: false, params: ZERO_PAGE });
                }
                _ if path == &cfg.kernel => {
                    return Err(bad(path, "vmlinux has no PVH entry point; build with CONFIG_PVH=y or boot the bzImage"))
                }
                _ => {}
            },
            Err(e) if path == &cfg.kernel => return Err(bad(path, format!("cannot load ELF kernel: {e}"))),
            Err(_) => {}
        }
    }
    if entry.is_none() {
        let path = &cfg.kernel;
        let mut f = File::open(path).map_err(|e| bad(path, e))?;
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM)))
            .map_err(|e| bad(path, format!("not a loadable bzImage: {e}")))?;
        let hdr = r.setup_header.ok_or_else(|| bad(path, "bzImage without a setup header"))?;
        if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(bad(path, "bzImage lacks the 64-bit entry point (boot protocol < 2.12 or no XLF_KERNEL_64)"));
        }
        kernel_end = r.kernel_end;
        header = Some(hdr);
        entry = Some(BootEntry { rip: r.kernel_load.0 + 0x200, long_mode: true, params: ZERO_PAGE });
    }
    let entry = entry.expect("one loader ran");

    let cmdline = Cmdline::try_from(&cfg.cmdline, CMDLINE_MAX)
        .map_err(|e| VmError::Host(anyhow::anyhow!("kernel command line: {e}")))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline)
        .map_err(|e| VmError::Host(anyhow::anyhow!("writing the command line: {e}")))?;

    let initrd_max = header.map_or(u32::MAX as u64, |h| h.initrd_addr_max as u64);
    let initrd = match &cfg.initramfs {
        Some(p) => Some(load_initrd(mem, cfg, p, kernel_end, initrd_max)?),
        None => None,
    };
    let e820 = memory::e820_map(cfg.memory_mib, Some(cfg.channel));
    let info = BootInfo { cmdline_addr: CMDLINE, cmdline_len: cfg.cmdline.len() + 1, initrd, rsdp, e820: &e820 };
    match header {
        Some(hdr) => boot_params::write_zero_page(mem, &boot_params::zero_page(hdr, &info))?,
        None => boot_params::write_pvh(mem, &info)?,
    }
    Ok(entry)
}

/// Top of low RAM, below the channel region, 2 MiB aligned down.
fn initrd_ceiling(cfg: &VmConfig, max: u64) -> u64 {
    let low_top = memory::ram_ranges(cfg.memory_mib)[0].1;
    let mut top = low_top.min(max + 1);
    if cfg.channel.size > 0 && cfg.channel.gpa < top {
        top = top.min(cfg.channel.gpa);
    }
    top
}

fn load_initrd(mem: &GuestMemoryMmap, cfg: &VmConfig, path: &Path, kernel_end: u64, max: u64) -> Result<Initrd, VmError> {
    let data = std::fs::read(path)
        .map_err(|e| VmError::Host(anyhow::anyhow!("reading initramfs {}: {e}", path.display())))?;
    let size = data.len() as u64;
    let top = initrd_ceiling(cfg, max);
    let addr = top.checked_sub(size).map(|a| a & !(2 * MIB - 1)).filter(|a| *a >= kernel_end).ok_or_else(|| {
        VmError::Host(anyhow::anyhow!(
            "initramfs {} ({} MiB) does not fit between the kernel and the top of guest memory; raise memory_mib",
            path.display(),
            size / MIB
        ))
    })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| VmError::Host(anyhow::anyhow!("writing the initramfs: {e}")))?;
    Ok(Initrd { addr, size })
}
