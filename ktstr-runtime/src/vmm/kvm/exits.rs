//! Why a VM stopped, and the state the vCPU threads share to say so.

use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::devices::{Devices, Stop};
use crate::channel::{self, kind};
use crate::vmm::{ChannelRegion, ExitKind};

/// KVM could not run an instruction (KVM_EXIT_INTERNAL_ERROR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulationFailure {
    pub vcpu: usize,
    pub rip: u64,
    pub suberror: u32,
    /// The instruction bytes, from KVM or read at RIP.
    pub insn: Vec<u8>,
}

impl std::fmt::Display for EmulationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: Vec<String> = self.insn.iter().take(8).map(|b| format!("{b:02x}")).collect();
        // KVM_INTERNAL_ERROR_* suberrors.
        let what = match self.suberror {
            1 => "emulation failure",
            2 => "exception while delivering an exception",
            3 => "event delivery failed",
            4 => "unexpected exit",
            _ => "internal error",
        };
        write!(
            f,
            "KVM {what} (suberror {}) on vCPU {} at RIP {:#x}, instruction bytes [{}]",
            self.suberror,
            self.vcpu,
            self.rip,
            bytes.join(" ")
        )
    }
}

/// The first thing that ended the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    Device(Stop),
    TripleFault { vcpu: usize },
    Emulation(EmulationFailure),
    Timeout,
    /// The console showed a panic and the guest did not stop by itself.
    PanicSeen,
    /// The host ended the run through the console link.
    Stopped,
    /// The host paused every vCPU to save the VM ([`super::Machine::run_and_save`]).
    Saved,
    Host(String),
}

impl Cause {
    /// The public exit kind; a panic on the console wins over how the
    /// guest then went down (`panic=-1` reboots).
    pub fn exit_kind(&self, console: &str) -> ExitKind {
        if crate::vmm::console_shows_panic(console) {
            return ExitKind::Panic;
        }
        match self {
            Cause::Device(Stop::PowerOff) => ExitKind::PowerOff,
            Cause::Device(Stop::Reset) => ExitKind::Reboot,
            Cause::TripleFault { .. } => ExitKind::TripleFault,
            Cause::Emulation(e) => ExitKind::HostError(format!(
                "{e}; this host's KVM cannot run this guest (see the KVM self-test verdict; KTSTR_VMM=tcg boots under QEMU TCG)"
            )),
            Cause::Timeout => ExitKind::Timeout,
            Cause::PanicSeen => ExitKind::Panic,
            Cause::Stopped | Cause::Saved => ExitKind::Stopped,
            Cause::Host(m) => ExitKind::HostError(m.clone()),
        }
    }
}

pub struct Shared {
    pub devices: Mutex<Devices>,
    pub stop: AtomicBool,
    pub cause: Mutex<Option<Cause>>,
    pub cv: Condvar,
    pub mem: GuestMemoryMmap,
    pub channel: Option<ChannelRegion>,
    pub started: Instant,
    pub to_init: Mutex<Option<Duration>>,
    /// First vCPU start until the guest's `BODY` record, and how far the
    /// channel's records have been scanned for it.
    pub to_body: Mutex<(Option<Duration>, u64)>,
    /// Each vCPU's state when its thread left the run loop, by index.
    pub vcpu_states: Mutex<Vec<(usize, String)>>,
    /// The host is still writing a restored guest's payload into the
    /// channel region: what is there is the ready init's, not this run's.
    pub inbox: AtomicBool,
}

impl Shared {
    /// Records the first stop cause and wakes the waiting thread.
    pub fn finish(&self, c: Cause) {
        let mut g = self.cause.lock().unwrap();
        if g.is_none() {
            *g = Some(c);
        }
        self.cv.notify_all();
    }

    /// A doorbell: the guest may have just sent its INIT or BODY message.
    pub fn on_doorbell(&self) {
        self.note_init();
        self.note_body();
    }

    /// Marks `to_body` once the channel holds a `BODY` record, reading
    /// only the record headers written since the last call.
    pub fn note_body(&self) {
        let Some(ch) = self.channel else { return };
        if self.inbox.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut g = self.to_body.lock().unwrap();
        if g.0.is_some() {
            return;
        }
        let Some(committed) = self.committed(ch) else { return };
        let committed = committed.min(ch.size.saturating_sub(channel::HEADER_SIZE));
        let kinds = channel::scan_kinds(committed, &mut g.1, |off, len| {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(ch.gpa + off)).ok().map(|()| v)
        });
        if kinds.contains(&kind::BODY) {
            g.0 = Some(self.started.elapsed());
        }
    }

    /// Marks `to_init` the first time the channel holds the guest's INIT
    /// record. Called on doorbells and polled by the waiting thread: a
    /// kernel without ioperm (CONFIG_X86_IOPL_IOPERM off) rings none.
    pub fn note_init(&self) {
        let Some(ch) = self.channel else { return };
        if self.inbox.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut t = self.to_init.lock().unwrap();
        if t.is_some() {
            return;
        }
        // The INIT record is the first one: a nonzero committed length and
        // the first record's kind.
        if self.committed(ch).is_some_and(|c| c > 0) && self.first_kind(ch) == Some(kind::INIT) {
            *t = Some(self.started.elapsed());
        }
    }

    /// The channel's committed length; `None` before the guest opened it.
    fn committed(&self, ch: ChannelRegion) -> Option<u64> {
        let mut head = [0u8; channel::OFF_COMMITTED + 8];
        self.mem.read_slice(&mut head, GuestAddress(ch.gpa)).ok()?;
        channel::committed(&head)
    }

    /// The kind of the channel's first record.
    fn first_kind(&self, ch: ChannelRegion) -> Option<u32> {
        let mut k = [0u8; 4];
        self.mem.read_slice(&mut k, GuestAddress(ch.gpa + channel::HEADER_SIZE)).ok()?;
        Some(u32::from_le_bytes(k))
    }

    /// True once the guest published a message of `kind` in the first
    /// `READY_UPLINK` bytes (the ready point's messages are few).
    pub fn channel_has(&self, kind: u32) -> bool {
        let Some(ch) = self.channel else { return false };
        let Some(committed) = self.committed(ch) else { return false };
        if committed == 0 || committed > crate::snapshot::payload::READY_UPLINK as u64 {
            return false;
        }
        let mut v = vec![0u8; (channel::HEADER_SIZE + committed) as usize];
        self.mem.read_slice(&mut v, GuestAddress(ch.gpa)).is_ok()
            && channel::decode(&v).is_ok_and(|m| m.iter().any(|m| m.kind == kind))
    }

    /// The channel region's bytes, for `channel::decode`.
    pub fn channel_bytes(&self) -> Vec<u8> {
        let Some(ch) = self.channel else { return Vec::new() };
        let mut v = vec![0u8; ch.size as usize];
        if self.mem.read_slice(&mut v, GuestAddress(ch.gpa)).is_err() {
            v.clear();
        }
        v
    }
}
