//! `Vm::builder()`: the public way to boot a guest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::backend::{self, BackendChoice, BackendKind};
use super::{ChannelRegion, Topology, VmConfig, VmError, VmResult};

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct VmBuilder {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: Vec<String>,
    topology: Topology,
    memory_mib: u64,
    timeout: Duration,
    channel_mib: u64,
    backend: Option<BackendKind>,
    console: Option<super::ConsoleLink>,
    start: super::Start,
}

/// A configured VM, ready to run once.
#[derive(Debug, Clone)]
pub struct Vm {
    pub config: VmConfig,
    backend: Option<BackendKind>,
}

impl Vm {
    pub fn builder() -> VmBuilder {
        VmBuilder {
            kernel: None,
            initramfs: None,
            cmdline: Vec::new(),
            topology: Topology::default(),
            memory_mib: 256,
            timeout: Duration::from_secs(60),
            channel_mib: 4,
            backend: None,
            console: None,
            start: super::Start::Boot,
        }
    }

    /// Boots the guest and waits until it stops or times out.
    pub fn run(&self) -> Result<VmResult, VmError> {
        let kind = match self.backend {
            Some(k) => k,
            None => backend::select(BackendChoice::from_env()?)?,
        };
        backend::run(kind, &self.config)
    }
}

/// The image a kernel path names: the file itself, or `bzImage`/`vmlinuz`
/// inside a directory (a cache entry or a built source tree).
pub fn find_image(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    // The same lookup as kernel-build's (cache entry, built tree, /boot-like),
    // then an ELF vmlinux, which this VMM also boots.
    kernel_build::tree::find_image_in(path).or_else(|| Some(path.join("vmlinux")).filter(|p| p.is_file()))
}

/// Rejects files that are neither a bzImage (boot-protocol "HdrS" magic)
/// nor an ELF vmlinux, before any backend tries to boot them.
pub fn check_image(path: &Path) -> Result<(), VmError> {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| VmError::BadImage(format!("{}: cannot read kernel image: {e}", path.display())))?;
    let bzimage = n >= 0x206 && &head[0x202..0x206] == b"HdrS";
    let elf = n >= 4 && &head[..4] == b"\x7fELF";
    if bzimage || elf {
        Ok(())
    } else {
        Err(VmError::BadImage(format!(
            "{}: not a bootable kernel (no bzImage header, not an ELF vmlinux)",
            path.display()
        )))
    }
}

impl VmBuilder {
    pub fn kernel(mut self, p: impl Into<PathBuf>) -> Self {
        self.kernel = Some(p.into());
        self
    }
    pub fn initramfs(mut self, p: impl Into<PathBuf>) -> Self {
        self.initramfs = Some(p.into());
        self
    }
    /// Extra kernel arguments, appended after ktstr's own.
    pub fn cmdline(mut self, args: impl Into<String>) -> Self {
        self.cmdline.push(args.into());
        self
    }
    pub fn topology(mut self, numa_nodes: u32, llcs: u32, cores: u32, threads: u32) -> Self {
        self.topology = Topology::new(numa_nodes, llcs, cores, threads);
        self
    }
    pub fn topo(mut self, t: Topology) -> Self {
        self.topology = t;
        self
    }
    pub fn memory_mib(mut self, n: u64) -> Self {
        self.memory_mib = n;
        self
    }
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    /// Size of the guest → host data channel region.
    pub fn channel_mib(mut self, n: u64) -> Self {
        self.channel_mib = n;
        self
    }
    /// Interactive mode: the guest's COM1 is wired to `link` (input,
    /// live output, stop) instead of only being captured.
    pub fn console(mut self, link: super::ConsoleLink) -> Self {
        self.console = Some(link);
        self
    }
    /// Boot, save at the ready point, or restore ([`super::Start`]).
    pub fn start(mut self, s: super::Start) -> Self {
        self.start = s;
        self
    }
    /// Forces a backend instead of `KTSTR_VMM`/auto-selection.
    pub fn backend(mut self, k: BackendKind) -> Self {
        self.backend = Some(k);
        self
    }

    pub fn build(self) -> Result<Vm, VmError> {
        let given = self
            .kernel
            .ok_or_else(|| VmError::BadImage("no kernel given to Vm::builder()".into()))?;
        let kernel = find_image(&given).ok_or_else(|| {
            VmError::BadImage(format!(
                "{}: no kernel image there (expected a bzImage/vmlinuz file or a directory holding one)",
                given.display()
            ))
        })?;
        check_image(&kernel)?;
        let dir = kernel.parent().map(Path::to_path_buf).unwrap_or_default();
        let vmlinux = Some(dir.join("vmlinux")).filter(|p| p.is_file() && *p != kernel);
        self.topology.validate().map_err(VmError::Topology)?;
        self.topology.check_memory(self.memory_mib).map_err(VmError::Topology)?;
        if self.memory_mib < 64 {
            return Err(VmError::Host(anyhow::anyhow!("memory_mib {} is too small; use at least 64", self.memory_mib)));
        }
        if self.channel_mib * 4 > self.memory_mib {
            return Err(VmError::Host(anyhow::anyhow!(
                "channel of {} MiB does not fit in {} MiB of guest memory; raise memory_mib",
                self.channel_mib,
                self.memory_mib
            )));
        }
        // Top of RAM, 2 MiB aligned, kept below the 32-bit PCI hole.
        let mem_top = self.memory_mib.min(2048) * MIB;
        let size = self.channel_mib * MIB;
        let channel = ChannelRegion { gpa: (mem_top - size) & !(2 * MIB - 1), size };
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "earlyprintk=serial,ttyS0".into(),
            "panic=-1".into(),
            "loglevel=4".into(),
            "tsc=reliable".into(),
            crate::channel::cmdline_args(channel.gpa, channel.size),
        ];
        cmdline.extend(self.cmdline);
        Ok(Vm {
            config: VmConfig {
                kernel,
                vmlinux,
                initramfs: self.initramfs,
                cmdline: cmdline.join(" "),
                topology: self.topology,
                memory_mib: self.memory_mib,
                timeout: self.timeout,
                channel,
                console: self.console,
                start: self.start,
            },
            backend: self.backend,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_kernels() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("bzImage");
        std::fs::write(&junk, vec![0u8; 4096]).unwrap();
        let err = Vm::builder().kernel(dir.path()).build().unwrap_err();
        assert!(matches!(err, VmError::BadImage(ref m) if m.contains("not a bootable kernel")), "{err}");
        let mut hdr = vec![0u8; 4096];
        hdr[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&junk, hdr).unwrap();
        let vm = Vm::builder().kernel(dir.path()).memory_mib(256).build().unwrap();
        assert!(vm.config.cmdline.contains("ktstr.chan=0xfc00000:0x400000"), "{}", vm.config.cmdline);
        assert!(matches!(Vm::builder().kernel("/nonexistent").build(), Err(VmError::BadImage(_))));
        // Memory that does not split over the nodes: a definition error (FAIL) for every backend.
        let err = Vm::builder().kernel(dir.path()).topology(3, 1, 1, 1).memory_mib(512).build().unwrap_err();
        assert!(matches!(err, VmError::Topology(ref m) if m.contains("does not split evenly over 3 NUMA nodes")), "{err}");
        assert!(!err.is_skip());
    }
}
