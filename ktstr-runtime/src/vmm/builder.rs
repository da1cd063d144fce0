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
    ["bzImage", "arch/x86/boot/bzImage", "vmlinuz", "vmlinux"]
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file())
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
        let dir = kernel.parent().map(Path::to_path_buf).unwrap_or_default();
        let vmlinux = Some(dir.join("vmlinux")).filter(|p| p.is_file() && *p != kernel);
        self.topology.validate().map_err(VmError::Topology)?;
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
            },
            backend: self.backend,
        })
    }
}
