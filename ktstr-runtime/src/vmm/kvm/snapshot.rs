//! Saved KVM machines: the state file (vCPUs, in-kernel irqchip, PIT,
//! kvmclock, devices) and the RAM file, and mapping that RAM back as a
//! private copy-on-write view of the file, so a restore costs page
//! faults, not a copy, and nothing a restored VM writes reaches the file.
//!
//! A save (`save`) reads every vCPU once its thread left KVM_RUN with
//! its last exit completed, then the VM's devices, then writes the files.
//!
//! Layout of a save: `state` (JSON, [`MachineState`]) and `ram0` beside
//! it: every RAM region in guest-address order, back to back, all-zero
//! pages left as holes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::devices::DeviceState;
use super::exits::Shared;
use super::vcpu_state::{self, VcpuState};
use crate::snapshot::sparse::is_zero;
use crate::vmm::{ChannelRegion, Topology, VmError};

/// Bumped whenever [`MachineState`] or the RAM layout changes: a save
/// in another format is refused, never misread.
pub const FORMAT: u32 = 1;
const PAGE: usize = 4096;

/// A save's two files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub state: PathBuf,
    pub ram: PathBuf,
}

impl Files {
    /// `state` and the `ram0` beside it (the snapshot cache's layout).
    pub fn at(state: &Path) -> Self {
        Self { state: state.to_path_buf(), ram: state.with_file_name("ram0") }
    }
}

/// One RAM region and where its bytes are in the RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The VM-wide in-kernel devices: the two 8259s, the IOAPIC, the PIT and kvmclock.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The state file.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub format: u32,
    pub topology: Topology,
    pub memory_mib: u64,
    pub ram: Vec<RamRegion>,
    /// The data channel's (gpa, size), when the machine has one.
    pub channel: Option<(u64, u64)>,
    pub vm: VmState,
    /// By vCPU index (not APIC id).
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
}

fn kvm_err(what: &str, e: kvm_ioctls::Error) -> VmError {
    VmError::Snapshot(format!("{what}: {e}"))
}

fn io_err(what: &Path, e: std::io::Error) -> VmError {
    VmError::Snapshot(format!("{}: {e}", what.display()))
}

impl VmState {
    pub fn read(vm: &VmFd) -> Result<Self, VmError> {
        let chip = |id| {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            vm.get_irqchip(&mut c).map(|()| c).map_err(|e| kvm_err("KVM_GET_IRQCHIP", e))
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(|e| kvm_err("KVM_GET_PIT2", e))?,
            clock: vm.get_clock().map_err(|e| kvm_err("KVM_GET_CLOCK", e))?,
        })
    }

    /// Into a VM made like the saved one (irqchip and PIT created), before
    /// its vCPUs get their state.
    pub fn write(&self, vm: &VmFd) -> Result<(), VmError> {
        for c in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(c).map_err(|e| kvm_err("KVM_SET_IRQCHIP", e))?;
        }
        vm.set_pit2(&self.pit).map_err(|e| kvm_err("KVM_SET_PIT2", e))?;
        // kvmclock continues from the saved value: no jump inside the
        // guest (flags 0: not advanced by the host's time since the save;
        // a restored test steps its wall clock from the payload instead).
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(|e| kvm_err("KVM_SET_CLOCK", e))
    }
}

/// What a save wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveReport {
    /// Pausing the vCPUs until both files were written.
    pub time: std::time::Duration,
    pub state_bytes: u64,
    /// Bytes of RAM data written (the rest are holes).
    pub ram_bytes: u64,
    /// The RAM file's length, holes included.
    pub ram_len: u64,
}

/// Which pages of an anonymous mapping at `host` (`len` bytes) were ever
/// populated (present or swapped, from /proc/self/pagemap); the others
/// read as zero and need no scan. `None` when pagemap is unreadable.
fn populated(host: usize, len: usize) -> Option<Vec<bool>> {
    let f = File::open("/proc/self/pagemap").ok()?;
    let pages = len / PAGE;
    let mut raw = vec![0u8; pages * 8];
    f.read_exact_at(&mut raw, (host / PAGE * 8) as u64).ok()?;
    Some(raw.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().unwrap()) >> 62 != 0).collect())
}

/// Writes `mem` to a new file at `path`, regions back to back, zero
/// pages as holes; the vCPUs must be stopped.
pub fn write_ram(mem: &GuestMemoryMmap, path: &Path) -> Result<(Vec<RamRegion>, u64), VmError> {
    let f = File::create(path).map_err(|e| io_err(path, e))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    for r in mem.iter() {
        let len = r.len() as usize;
        let host = mem.get_host_address(r.start_addr()).map_err(|e| VmError::Snapshot(format!("guest RAM: {e}")))?;
        // SAFETY: `host` is the start of this region's live mapping of
        // `len` bytes, owned by `mem`; every vCPU is stopped, so nothing
        // writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        // A fresh VM's RAM is anonymous: pages it never touched are zero
        // without reading them (2 GiB takes ~0.8 s to scan). A restored
        // VM's unpopulated pages are the file's, so they are read.
        let touched = if r.file_offset().is_none() { populated(host as usize, len) } else { None };
        let zero = |p: usize| touched.as_ref().is_some_and(|t| !t[p / PAGE]) || is_zero(&bytes[p..p + PAGE]);
        let mut page = 0;
        while page < len {
            if zero(page) {
                page += PAGE;
                continue;
            }
            // A run of data pages, written in one go.
            let start = page;
            while page < len && !zero(page) {
                page += PAGE;
            }
            f.write_all_at(&bytes[start..page], offset + start as u64).map_err(|e| io_err(path, e))?;
            written += (page - start) as u64;
        }
        regions.push(RamRegion { gpa: r.start_addr().0, len: len as u64, file_offset: offset });
        offset += len as u64;
    }
    f.set_len(offset).map_err(|e| io_err(path, e))?;
    Ok((regions, written))
}

/// Guest RAM as a private, copy-on-write mapping of the RAM file: pages
/// are read from the file (the page cache) on first touch, and a write
/// copies just that page into this VM.
pub fn map_ram(path: &Path, regions: &[RamRegion]) -> Result<GuestMemoryMmap, VmError> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let flen = f.metadata().map_err(|e| io_err(path, e))?.len();
    let mut out = Vec::new();
    for r in regions {
        if r.file_offset + r.len > flen {
            return Err(VmError::Snapshot(format!(
                "{} is {flen} bytes, too short for guest RAM at {:#x} (+{:#x}): a truncated save",
                path.display(),
                r.gpa,
                r.len
            )));
        }
        let file = f.try_clone().map_err(|e| io_err(path, e))?;
        let region = MmapRegionBuilder::new(r.len as usize)
            .with_file_offset(FileOffset::new(file, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| match e {
                // An mmap failure is host memory pressure, as for a cold boot's RAM.
                vm_memory::mmap::MmapRegionError::Mmap(io) => {
                    VmError::from_kvm_errno("mmap saved guest RAM", io.raw_os_error().unwrap_or(libc::ENOMEM))
                }
                e => VmError::Snapshot(format!("mapping {}: {e}", path.display())),
            })?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.gpa))
            .ok_or_else(|| VmError::Snapshot(format!("guest RAM region at {:#x} overflows", r.gpa)))?;
        out.push(region);
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| VmError::Snapshot(format!("guest RAM regions: {e}")))
}

/// The channel region in guest RAM, as the inbox's sender sees it: this
/// process maps the RAM, so the host's writes are the guest's memory even
/// where the mapping is a private copy of a save.
pub struct GuestWindow {
    pub mem: GuestMemoryMmap,
    pub base: u64,
}

impl crate::snapshot::payload::Window for GuestWindow {
    fn write_at(&mut self, off: usize, data: &[u8]) -> std::io::Result<()> {
        use vm_memory::Bytes;
        self.mem.write_slice(data, GuestAddress(self.base + off as u64)).map_err(std::io::Error::other)
    }
    fn read_u64(&mut self, off: usize) -> std::io::Result<u64> {
        use vm_memory::Bytes;
        self.mem.read_obj::<u64>(GuestAddress(self.base + off as u64)).map(u64::from_le).map_err(std::io::Error::other)
    }
}

/// A stopped machine's parts, for a save.
pub(super) struct SaveWhat<'a> {
    pub vm: &'a VmFd,
    pub vcpus: &'a [VcpuFd],
    pub mem: &'a GuestMemoryMmap,
    pub topo: Topology,
    pub memory_mib: u64,
    pub msr_list: &'a [u32],
    pub channel: Option<ChannelRegion>,
}

/// Writes the state and RAM files of a machine whose vCPUs are stopped
/// with their last exits completed; `paused`: when the stop began.
pub(super) fn save(m: &SaveWhat, shared: &Shared, files: &Files, paused: Instant) -> Result<SaveReport, VmError> {
    if m.vcpus.len() != m.topo.total_cpus() as usize {
        let why = shared.vcpu_states.lock().unwrap().clone();
        return Err(VmError::Snapshot(format!("{} of {} vCPUs came back to be saved: {why:?}", m.vcpus.len(), m.topo.total_cpus())));
    }
    if let Some((i, why)) = shared.vcpu_states.lock().unwrap().first() {
        return Err(VmError::Snapshot(format!("vCPU {i}: {why}")));
    }
    // The MSRs this KVM reads back are the same for every vCPU.
    let msrs = vcpu_state::readable_msrs(&m.vcpus[0], m.msr_list)?;
    let vcpus = m.vcpus.iter().map(|v| VcpuState::read(v, &msrs)).collect::<Result<Vec<_>, _>>()?;
    let vm = VmState::read(m.vm)?;
    let devices = shared.devices.lock().unwrap().state();
    let (ram, ram_bytes) = write_ram(m.mem, &files.ram)?;
    let ram_len = ram.iter().map(|r| r.len).sum();
    let st = MachineState {
        format: FORMAT,
        topology: m.topo,
        memory_mib: m.memory_mib,
        ram,
        channel: m.channel.map(|c| (c.gpa, c.size)),
        vm,
        vcpus,
        devices,
    };
    let state_bytes = st.write(&files.state)?;
    Ok(SaveReport { time: paused.elapsed(), state_bytes, ram_bytes, ram_len })
}

impl MachineState {
    /// Writes the state file (through a `.part` file renamed into place).
    pub fn write(&self, path: &Path) -> Result<u64, VmError> {
        let json = serde_json::to_vec(self).map_err(|e| VmError::Snapshot(format!("encoding the VM state: {e}")))?;
        let part = path.with_extension("part");
        std::fs::write(&part, &json).map_err(|e| io_err(&part, e))?;
        std::fs::rename(&part, path).map_err(|e| io_err(path, e))?;
        Ok(json.len() as u64)
    }

    pub fn read(path: &Path) -> Result<Self, VmError> {
        let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
        // The format first, so an old save says so rather than failing to parse.
        #[derive(serde::Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(&bytes)
            .map_err(|e| VmError::Snapshot(format!("{}: not a KVM state file: {e}", path.display())))?;
        if head.format != FORMAT {
            return Err(VmError::Snapshot(format!(
                "{}: KVM state format {} but this ktstr reads {FORMAT}; remove the save (cargo ktstr kernel clean)",
                path.display(),
                head.format
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| VmError::Snapshot(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_file_has_holes_and_maps_back_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram0");
        let ranges = [(GuestAddress(0), 8 << 20), (GuestAddress(1 << 32), 4 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        mem.write_slice(b"low", GuestAddress(0x1234)).unwrap();
        mem.write_slice(&[9u8; 3 * PAGE], GuestAddress(5 << 20)).unwrap();
        mem.write_slice(b"high", GuestAddress((1 << 32) + (4 << 20) - 4)).unwrap();
        let (regions, written) = write_ram(&mem, &path).unwrap();
        assert_eq!(written, 5 * PAGE as u64, "3 data pages and 2 pages holding a few bytes");
        assert_eq!(regions[1], RamRegion { gpa: 1 << 32, len: 4 << 20, file_offset: 8 << 20 });
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 12 << 20);
        assert!(m.blocks() * 512 < 1 << 20, "zero pages were written: {} bytes", m.blocks() * 512);

        let a = map_ram(&path, &regions).unwrap();
        let mut b = [0u8; 4];
        a.read_slice(&mut b, GuestAddress((1 << 32) + (4 << 20) - 4)).unwrap();
        assert_eq!(&b, b"high");
        assert_eq!(a.read_obj::<u8>(GuestAddress((5 << 20) + 2 * PAGE as u64)).unwrap(), 9);
        // A write stays in this mapping: not in the file, not in another mapping.
        a.write_slice(b"LOW", GuestAddress(0x1234)).unwrap();
        let other = map_ram(&path, &regions).unwrap();
        let mut c = [0u8; 3];
        other.read_slice(&mut c, GuestAddress(0x1234)).unwrap();
        assert_eq!(&c, b"low");
        let mut f = [0u8; 3];
        File::open(&path).unwrap().read_exact_at(&mut f, 0x1234).unwrap();
        assert_eq!(&f, b"low");
        // Saved again from the private mapping: its untouched pages are
        // the file's (not zero) and its written page is its own.
        let again = dir.path().join("again");
        write_ram(&a, &again).unwrap();
        let b2 = map_ram(&again, &regions).unwrap();
        let mut d = [0u8; 4];
        b2.read_slice(&mut d, GuestAddress((1 << 32) + (4 << 20) - 4)).unwrap();
        assert_eq!((&d, b2.read_obj::<u8>(GuestAddress(0x1234)).unwrap()), (b"high", b'L'));
        let short = RamRegion { len: 16 << 20, ..regions[0] };
        assert!(map_ram(&path, &[short]).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn a_restore_on_tmpfs_keeps_the_save_s_checksum() {
        // /dev/shm is tmpfs: reading a hole through a private mapping fills it.
        let Some(dir) = crate::testing::require(tempfile::tempdir_in("/dev/shm").ok(), "a tmpfs at /dev/shm", "mount one (mount -t tmpfs tmpfs /dev/shm)") else { return };
        let path = dir.path().join("ram0");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_slice(b"kernel", GuestAddress(1 << 20)).unwrap();
        let (regions, _) = write_ram(&mem, &path).unwrap();
        let before = crate::snapshot::sparse::files_crc(std::slice::from_ref(&path)).unwrap();
        let m = map_ram(&path, &regions).unwrap();
        let mut b = vec![0u8; 4 << 20];
        m.read_slice(&mut b, GuestAddress(0)).unwrap();
        m.write_slice(b"guest", GuestAddress(2 << 20)).unwrap();
        drop(m);
        assert_eq!(crate::snapshot::sparse::files_crc(&[path]).unwrap(), before);
    }

    #[test]
    fn state_file_refuses_another_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        std::fs::write(&p, br#"{"format": 999}"#).unwrap();
        let e = MachineState::read(&p).err().unwrap().to_string();
        assert!(e.contains("format 999") && e.contains("kernel clean"), "{e}");
        std::fs::write(&p, b"QEVM").unwrap();
        assert!(MachineState::read(&p).err().unwrap().to_string().contains("not a KVM state file"));
    }
}
