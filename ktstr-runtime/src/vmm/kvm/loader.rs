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

    if let Some(max) = header.map(|h| h.cmdline_size as usize).filter(|m| *m > 0) {
        if cfg.cmdline.len() > max {
            return Err(VmError::Host(anyhow::anyhow!(
                "kernel command line is {} bytes; this kernel takes at most {max}",
                cfg.cmdline.len()
            )));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{ChannelRegion, Topology};
    use std::time::Duration;

    /// A bzImage-shaped file: boot sector + setup header, then a payload.
    fn fake_bzimage(dir: &Path, xloadflags: u16) -> std::path::PathBuf {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4; // setup_sects
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img.extend_from_slice(&[0xf4; 4096]); // "kernel": hlt
        let p = dir.join("bzImage");
        std::fs::write(&p, img).unwrap();
        p
    }

    fn cfg(kernel: std::path::PathBuf, initrd: Option<std::path::PathBuf>) -> VmConfig {
        VmConfig {
            kernel,
            vmlinux: None,
            initramfs: initrd,
            cmdline: "console=ttyS0 ktstr.chan=0x3c00000:0x400000".into(),
            topology: Topology::cpus(1),
            memory_mib: 64,
            timeout: Duration::from_secs(1),
            channel: ChannelRegion { gpa: 0x3c0_0000, size: 0x40_0000 },
            console: None,
            start: Default::default(),
        }
    }

    #[test]
    fn bzimage_64bit_entry_with_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let rd = dir.path().join("initrd");
        std::fs::write(&rd, vec![0xab; 3 * 4096 + 5]).unwrap();
        let c = cfg(fake_bzimage(dir.path(), XLF_KERNEL_64), Some(rd));
        let mem = memory::create(64).unwrap();
        let e = load(&mem, &c, 0xe_0000).unwrap();
        assert_eq!(e, BootEntry { rip: 0x10_0200, long_mode: true, params: ZERO_PAGE });
        let hlt: u8 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(hlt, 0xf4);
        let rd_addr: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x218)).unwrap();
        let rd_size: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x21c)).unwrap();
        assert_eq!(rd_size, 3 * 4096 + 5);
        assert!(rd_addr as u64 + rd_size as u64 <= c.channel.gpa, "initrd below the channel region");
        assert_eq!(rd_addr % (2 << 20), 0);
        let byte: u8 = mem.read_obj(GuestAddress(rd_addr as u64)).unwrap();
        assert_eq!(byte, 0xab);
        let mut line = vec![0u8; c.cmdline.len() + 1];
        mem.read_slice(&mut line, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&line[..c.cmdline.len()], c.cmdline.as_bytes());
        assert_eq!(line[c.cmdline.len()], 0);
        // The e820 map in the zero page reserves the channel.
        let n: u8 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x1e8)).unwrap();
        let reserved = (0..n as u64).any(|i| {
            let at = ZERO_PAGE + 0x2d0 + i * 20;
            mem.read_obj::<u64>(GuestAddress(at)).unwrap() == c.channel.gpa
                && mem.read_obj::<u32>(GuestAddress(at + 16)).unwrap() == memory::E820_RESERVED
        });
        assert!(reserved);
    }

    #[test]
    fn rejects_32bit_only_bzimage_and_huge_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create(64).unwrap();
        let err = load(&mem, &cfg(fake_bzimage(dir.path(), 0), None), 0).unwrap_err();
        assert!(matches!(&err, VmError::BadImage(m) if m.contains("64-bit")), "{err}");
        let rd = dir.path().join("big");
        std::fs::write(&rd, vec![0u8; 80 << 20]).unwrap();
        let err = load(&mem, &cfg(fake_bzimage(dir.path(), XLF_KERNEL_64), Some(rd)), 0).unwrap_err();
        assert!(err.to_string().contains("raise memory_mib"), "{err}");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0u8; 8192]).unwrap();
        assert!(matches!(load(&mem, &cfg(junk, None), 0), Err(VmError::BadImage(_))));
    }
}
