//! The virtual machine monitor: one API, two backends.
//!
//! `kvm` is our own VMM on `/dev/kvm`; `qemu` drives `qemu-system-x86_64
//! -accel tcg` for hosts whose KVM cannot boot a kernel. Both take a
//! [`VmConfig`] and return the same [`VmResult`].

pub mod backend;
pub mod boot_cpus;
pub mod builder;
pub mod console;
pub mod error;
pub mod host_wait;
pub mod kvm;
pub mod qemu;
pub mod topology;

pub use backend::BackendKind;
pub use builder::{Vm, VmBuilder};
pub use console::ConsoleLink;
pub use error::VmError;
pub use topology::{Distances, Topology};

use std::path::PathBuf;
use std::time::Duration;

use crate::channel::Message;

/// Guest-physical layout of the guest → host data channel. The region is
/// reserved in the e820 map (KVM) or with `memmap=` (QEMU) and announced
/// to the guest with `ktstr.chan=ADDR:SIZE` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelRegion {
    pub gpa: u64,
    pub size: u64,
}

/// Everything a backend needs to boot one VM. Built by [`VmBuilder`].
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// `bzImage` or an uncompressed `vmlinux` ELF.
    pub kernel: PathBuf,
    /// `vmlinux` found beside `kernel`, preferred by the KVM backend.
    pub vmlinux: Option<PathBuf>,
    /// newc cpio archive (uncompressed or gzip).
    pub initramfs: Option<PathBuf>,
    /// Full command line, console and channel arguments included.
    pub cmdline: String,
    pub topology: Topology,
    pub memory_mib: u64,
    pub timeout: Duration,
    pub channel: ChannelRegion,
    /// Interactive mode: a live COM1 link (`cargo ktstr shell`); `None`
    /// for test runs (no input, output only captured).
    pub console: Option<ConsoleLink>,
    /// Cold boot, boot to the ready point and save, or restore a save.
    pub start: Start,
}

/// How a VM starts (see [`crate::snapshot`]). Backends that cannot save
/// or restore return [`VmError::Snapshot`] for the last two, and the
/// caller boots cold.
#[derive(Debug, Clone, Default)]
pub enum Start {
    /// Boot the kernel and run whatever `/init` does.
    #[default]
    Boot,
    /// Boot to the guest's ready point (`ktstr.ready`), pause there and
    /// write the VM's state to `state`; the VM then ends ([`ExitKind::Stopped`]).
    Save { state: PathBuf },
    /// Start from `state` (written by `Save` with the same config) and
    /// hand the waiting guest `payload` through the data channel's inbox.
    /// `checksum`: the save's ([`crate::snapshot::Meta::checksum`]), checked
    /// while the RAM is copied.
    Restore { state: PathBuf, checksum: (u32, u64), payload: crate::snapshot::payload::Payload },
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitKind {
    /// ACPI S5 / `reboot(POWER_OFF)`.
    PowerOff,
    /// Guest asked for a reset (keyboard controller, 0xcf9, reboot()).
    Reboot,
    /// The console shows a kernel panic.
    Panic,
    /// The CPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The timeout fired; every vCPU was stopped.
    Timeout,
    /// The VMM itself failed after the guest started.
    HostError(String),
    /// The host ended the VM through its [`ConsoleLink`] (the shell's
    /// escape key, or its boot timeout).
    Stopped,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// Host-side setup: memory, image load, tables, process spawn.
    pub setup: Duration,
    /// First guest instruction until the guest's `/init` announced itself
    /// on the data channel; `None` if it never did.
    pub to_init: Option<Duration>,
    pub total: Duration,
    /// Time the host kept the vCPU threads runnable but not running
    /// (TCG only: [`host_wait`]); `None` where not measured.
    #[serde(default)]
    pub vcpu_wait: Option<Duration>,
    /// Start of the VM (process spawn) until the guest announced the test
    /// body on the data channel (`kind::BODY`); `None` if it never did.
    #[serde(default)]
    pub to_body: Option<Duration>,
    /// [`Start::Save`]: pausing the guest and writing its state.
    /// [`Start::Restore`]: loading the state, until the guest runs.
    #[serde(default)]
    pub snapshot: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct VmResult {
    pub exit: ExitKind,
    pub backend: BackendKind,
    /// Everything the guest wrote to COM1.
    pub console: String,
    /// Everything the guest wrote to COM2.
    pub com2: String,
    /// Decoded, checksum-verified channel messages, in order.
    pub messages: Vec<Message>,
    pub timings: Timings,
}

impl VmResult {
    /// The last `n` lines of the console, for failure reports.
    pub fn console_tail(&self, n: usize) -> String {
        tail_lines(&self.console, n)
    }
}

/// The last `n` lines of `console`.
pub fn tail_lines(console: &str, n: usize) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Panic detection shared by both backends: the kernel prints this before
/// it halts or reboots (`panic=-1`).
pub fn console_shows_panic(console: &str) -> bool {
    console.contains("Kernel panic - not syncing")
}
