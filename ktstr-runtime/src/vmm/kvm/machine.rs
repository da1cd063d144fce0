//! `Machine`: one KVM VM with RAM, irqchip, PIT, UARTs and vCPUs, loaded
//! with either a kernel or a raw code blob, then run to a stop.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_CAP_X2APIC_API, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
    KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK, KVM_X2APIC_API_USE_32BIT_IDS,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::devices::{Devices, MmioWrite, PortWrite};
use super::exits::{Cause, EmulationFailure, Shared};
use super::loader::BootEntry;
use super::memory::{self, ACPI_BASE, RAW_CODE};
use super::serial::{self, Capture, UartState, COM1_IRQ, COM2_IRQ};
use super::snapshot::{self, Files, GuestWindow, MachineState, SaveReport};
use super::{acpi, gdt, loader, paging, vcpu};
use crate::snapshot::payload::{Header, Payload, Progress, Sender};
use crate::channel::{self, ChannelError, Message};
use crate::vmm::error::ResourceSnapshot;
use crate::vmm::{ChannelRegion, ConsoleLink, ExitKind, Topology, VmConfig, VmError};

const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// How long KVM_CREATE_VM may keep failing with EINTR before we call it
/// transient host pressure.
const CREATE_VM_RETRY: Duration = Duration::from_secs(1);

/// What a finished run produced.
#[derive(Debug)]
pub struct Outcome {
    pub cause: Cause,
    pub exit: ExitKind,
    pub console: String,
    pub com2: String,
    /// Writes to `devices::TEST_PORT`, in order, with the writing vCPU.
    pub port_writes: Vec<PortWrite>,
    pub mmio_writes: Vec<MmioWrite>,
    pub doorbells: u64,
    /// Interrupts raised by COM1 and COM2.
    pub serial_irqs: [u64; 2],
    pub messages: Result<Vec<Message>, ChannelError>,
    pub setup: Duration,
    pub to_init: Option<Duration>,
    /// First vCPU start until the guest's `BODY` record on the channel.
    pub to_body: Option<Duration>,
    /// First vCPU start until the stop was seen.
    pub run_time: Duration,
    /// Stopping and joining the vCPU threads and closing the VM.
    pub teardown: Duration,
    /// After a timeout, each vCPU's state (`vcpu::describe`), by index.
    pub vcpu_states: Vec<String>,
    /// Guest memory after the run, for inspection.
    pub memory: GuestMemoryMmap,
    /// `run_and_save`: what the save wrote, if the save point was reached.
    pub saved: Option<SaveReport>,
    /// A payload set with `set_payload` that did not reach the guest, and why.
    pub payload_error: Option<String>,
}

impl Outcome {
    pub fn emulation_failure(&self) -> Option<&EmulationFailure> {
        match &self.cause {
            Cause::Emulation(e) => Some(e),
            _ => None,
        }
    }

    /// Values written to the test port, in order.
    pub fn test_values(&self) -> Vec<u32> {
        self.port_writes.iter().map(|w| w.value).collect()
    }
}

pub struct Machine {
    _kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    topo: Topology,
    vcpus: Vec<VcpuFd>,
    channel: Option<ChannelRegion>,
    devices: Devices,
    com_bufs: [Arc<Mutex<Vec<u8>>>; 2],
    serial_irqs: [Arc<AtomicU64>; 2],
    panic_seen: Arc<AtomicBool>,
    /// Interactive mode: COM1's live link (input from the host, output mirrored).
    console: Arc<OnceLock<ConsoleLink>>,
    _irq_evts: Vec<EventFd>,
    created: Instant,
    loaded: bool,
    memory_mib: u64,
    /// KVM_GET_MSR_INDEX_LIST, for a save.
    msr_list: Vec<u32>,
    payload: Option<Sender<GuestWindow>>,
}

/// When `Machine::run_and_save` pauses the guest to save it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveAt {
    /// The guest published `kind::READY` on the data channel (the ready point).
    Ready,
    /// This long after the first vCPU started.
    After(Duration),
    /// The guest rang the data channel's doorbell this many times.
    Doorbells(u64),
}

/// How long a restored guest may sit on a chunk of its payload.
const PAYLOAD_STALL: Duration = Duration::from_secs(30);

fn kvm_err(what: &str, e: kvm_ioctls::Error) -> VmError {
    VmError::from_kvm_errno(what, e.errno())
}

/// Opens `/dev/kvm`, telling a missing or inaccessible device (a setup
/// failure with a fix) from host pressure (a skip).
pub fn open_kvm() -> Result<Kvm, VmError> {
    open_kvm_at(c"/dev/kvm")
}

/// `open_kvm` on another device node (tests).
pub fn open_kvm_at(path: &std::ffi::CStr) -> Result<Kvm, VmError> {
    Kvm::new_with_path(path).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::KvmUnavailable(format!(
            "{} does not exist: enable KVM (load kvm_intel/kvm_amd, or turn on nested virtualisation for this VM) \
             / join the kvm group",
            path.to_string_lossy()
        )),
        libc::EACCES | libc::EPERM | libc::EROFS => VmError::KvmUnavailable(format!(
            "{} is not writable by this user: enable KVM / join the kvm group \
             (sudo usermod -aG kvm $USER, then log in again): {e}",
            path.to_string_lossy()
        )),
        errno => VmError::from_kvm_errno("open /dev/kvm", errno),
    })
}

/// KVM_CREATE_VM, retrying EINTR with backoff for about a second.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match kvm.create_vm() {
            Ok(vm) => return Ok(vm),
            Err(e) if e.errno() == libc::EINTR => {
                if start.elapsed() >= CREATE_VM_RETRY {
                    let snapshot = ResourceSnapshot::take();
                    let bypass = std::env::var("KTSTR_CONTENTION_BYPASS").is_ok_and(|v| v == "1");
                    let err = std::io::Error::from_raw_os_error(libc::EINTR);
                    if bypass && !snapshot.near_limit {
                        return Err(VmError::Host(anyhow::anyhow!("KVM_CREATE_VM: {err} after {CREATE_VM_RETRY:?} of retries")));
                    }
                    return Err(VmError::Transient { what: "KVM_CREATE_VM (EINTR after ~1 s of retries)".into(), errno: err, snapshot });
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(kvm_err("KVM_CREATE_VM", e)),
        }
    }
}

impl Machine {
    /// A VM with `topo`'s vCPUs (configured, BSP not yet given an entry)
    /// and `memory_mib` of RAM.
    pub fn new(topo: Topology, memory_mib: u64) -> Result<Self, VmError> {
        Self::build(topo, memory_mib, None)
    }

    /// A VM from a save (`Machine::run_and_save`): RAM mapped copy-on-write
    /// from the RAM file, every vCPU, the irqchip, PIT, kvmclock and the
    /// devices as they were. Run it with `run`.
    pub fn restore(files: &Files) -> Result<Self, VmError> {
        let created = Instant::now();
        let st = MachineState::read(&files.state)?;
        let mem = snapshot::map_ram(&files.ram, &st.ram)?;
        let mut m = Self::build(st.topology, st.memory_mib, Some((mem, st.devices.com.clone())))?;
        if m.vcpus.len() != st.vcpus.len() {
            return Err(VmError::Snapshot(format!(
                "{}: {} vCPU states for a topology of {}",
                files.state.display(),
                st.vcpus.len(),
                m.vcpus.len()
            )));
        }
        st.vm.write(&m.vm)?;
        for (v, s) in m.vcpus.iter().zip(&st.vcpus) {
            s.write(v)?;
        }
        m.devices.set_state(&st.devices).map_err(|e| VmError::Snapshot(format!("{}: {e}", files.state.display())))?;
        m.channel = st.channel.map(|(gpa, size)| ChannelRegion { gpa, size });
        m.created = created;
        m.loaded = true;
        Ok(m)
    }

    /// `from`: a restore's RAM and UART states; `None` for a new machine
    /// (fresh RAM with the boot tables written).
    fn build(topo: Topology, memory_mib: u64, from: Option<(GuestMemoryMmap, [UartState; 2])>) -> Result<Self, VmError> {
        let created = Instant::now();
        topo.validate().map_err(VmError::Topology)?;
        let max_apic_id = (0..topo.total_cpus()).map(|c| super::cpuid::apic_id(&topo, c)).max().unwrap_or(0);
        let kvm = open_kvm()?;
        // A valid topology this host's KVM cannot give is a skip, not a fail.
        let max = kvm.get_max_vcpus();
        if topo.total_cpus() as usize > max {
            return Err(VmError::HostLimit(format!("{} vCPUs asked; this host's KVM allows {max}", topo.total_cpus())));
        }
        // vCPU ids are the APIC ids, which may be sparse.
        let max_id = kvm.get_max_vcpu_id();
        if max_apic_id as usize >= max_id {
            return Err(VmError::HostLimit(format!("APIC id {max_apic_id} asked; this host's KVM allows vCPU ids below {max_id}")));
        }
        let vm = create_vm(&kvm)?;
        let (mem, uart_states) = match from {
            Some((mem, uarts)) => (mem, Some(uarts)),
            None => (memory::create(memory_mib)?, None),
        };
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).map_err(|e| VmError::Host(anyhow::anyhow!("{e}")))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which
            // the Machine keeps until the VM fd is closed.
            unsafe { vm.set_user_memory_region(r) }.map_err(|e| kvm_err("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        vm.set_tss_address(TSS_ADDR).map_err(|e| kvm_err("KVM_SET_TSS_ADDR", e))?;
        vm.set_identity_map_address(IDENTITY_MAP_ADDR).map_err(|e| kvm_err("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.create_irq_chip().map_err(|e| kvm_err("KVM_CREATE_IRQCHIP", e))?;
        if max_apic_id >= super::acpi::X2APIC_FROM {
            // 32-bit APIC ids in interrupt routing and the LAPIC state, and
            // no xAPIC broadcast meaning for id 0xff in x2APIC mode.
            let cap = kvm_enable_cap {
                cap: KVM_CAP_X2APIC_API,
                args: [(KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK).into(), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap).map_err(|e| kvm_err("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)", e))?;
        }
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(|e| kvm_err("KVM_CREATE_PIT2", e))?;

        let com_bufs = [Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new()))];
        let serial_irqs = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        let panic_seen = Arc::new(AtomicBool::new(false));
        let console: Arc<OnceLock<ConsoleLink>> = Arc::default();
        let mut evts = Vec::new();
        let mut uarts = Vec::new();
        for (i, irq) in [COM1_IRQ, COM2_IRQ].into_iter().enumerate() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::from_kvm_errno("eventfd", e.raw_os_error().unwrap_or(0)))?;
            vm.register_irqfd(&evt, irq).map_err(|e| kvm_err("KVM_IRQFD", e))?;
            let clone = evt.try_clone().map_err(|e| VmError::from_kvm_errno("eventfd dup", e.raw_os_error().unwrap_or(0)))?;
            let on_panic: Option<Box<dyn FnMut() + Send>> = if i == 0 {
                let flag = panic_seen.clone();
                Some(Box::new(move || flag.store(true, Ordering::Release)))
            } else {
                None
            };
            let mut capture = Capture::new(com_bufs[i].clone(), on_panic);
            if i == 0 {
                capture = capture.with_link(console.clone());
            }
            uarts.push(match &uart_states {
                Some(st) => serial::uart_from(&st[i], clone, serial_irqs[i].clone(), capture).map_err(VmError::Snapshot)?,
                None => serial::uart(clone, serial_irqs[i].clone(), capture),
            });
            evts.push(evt);
        }
        let com2 = uarts.pop().unwrap();
        let com1 = uarts.pop().unwrap();

        let base_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| kvm_err("KVM_GET_SUPPORTED_CPUID", e))?;
        let msr_list = kvm.get_msr_index_list().map_err(|e| kvm_err("KVM_GET_MSR_INDEX_LIST", e))?;
        vcpu::install_kick_handler()?;
        let mut vcpus = Vec::new();
        for i in 0..topo.total_cpus() {
            // The vCPU id is the in-kernel LAPIC's ID: it must match the
            // APIC id in CPUID and the MADT.
            let id = super::cpuid::apic_id(&topo, i);
            let v = vm.create_vcpu(id.into()).map_err(|e| kvm_err("KVM_CREATE_VCPU", e))?;
            vcpu::configure(&v, i, &topo, &base_cpuid, msr_list.as_slice())?;
            vcpus.push(v);
        }
        if uart_states.is_none() {
            gdt::write(&mem).map_err(|e| VmError::Host(anyhow::anyhow!("writing the GDT: {e}")))?;
            paging::write_identity_map(&mem).map_err(|e| VmError::Host(anyhow::anyhow!("writing page tables: {e}")))?;
            let tables = acpi::build(&topo, memory_mib, ACPI_BASE);
            assert!(tables.bytes.len() as u64 <= memory::ACPI_MAX);
            mem.write_slice(&tables.bytes, GuestAddress(ACPI_BASE))
                .map_err(|e| VmError::Host(anyhow::anyhow!("writing ACPI tables: {e}")))?;
        }

        Ok(Self {
            _kvm: kvm,
            vm,
            mem,
            topo,
            vcpus,
            channel: None,
            devices: Devices::new(com1, com2),
            com_bufs,
            serial_irqs,
            panic_seen,
            console,
            _irq_evts: evts,
            created,
            loaded: false,
            memory_mib,
            msr_list: msr_list.as_slice().to_vec(),
            payload: None,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The boot vCPU, for callers that adjust its state after loading.
    pub fn bsp(&self) -> &VcpuFd {
        &self.vcpus[0]
    }

    /// vCPU `index` (by index, not APIC id), for tests that start APs directly.
    pub fn vcpu(&self, index: usize) -> Option<&VcpuFd> {
        self.vcpus.get(index)
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }

    pub fn topology(&self) -> Topology {
        self.topo
    }

    /// Interactive mode: COM1 output goes to `link` as well, the host's
    /// keys in it reach COM1's receive FIFO, and `link.stop()` ends the run.
    pub fn set_console(&mut self, link: ConsoleLink) {
        let _ = self.console.set(link);
    }

    /// Decode this region as the data channel when the run ends.
    pub fn set_channel(&mut self, ch: ChannelRegion) {
        self.channel = Some(ch);
    }

    /// The channel region (set, loaded with a kernel, or restored).
    pub fn channel(&self) -> Option<ChannelRegion> {
        self.channel
    }

    /// A restored guest at its ready point: `run` feeds it `payload`
    /// through the channel's inbox (`snapshot::payload`) as it takes each
    /// chunk; the first is in place before any vCPU runs.
    pub fn set_payload(&mut self, payload: &Payload) -> Result<(), VmError> {
        let ch = self.channel.ok_or_else(|| VmError::Payload("the restored VM has no data channel".into()))?;
        let header = Header::now(payload).map_err(|e| VmError::Payload(format!("payload header: {e}")))?;
        let w = GuestWindow { mem: self.mem.clone(), base: ch.gpa };
        let mut tx = Sender::new(w, ch.size as usize, payload, &header).map_err(|e| VmError::Payload(format!("payload: {e}")))?;
        tx.pump().map_err(|e| VmError::Payload(format!("writing the first chunk of the test: {e}")))?;
        self.payload = Some(tx);
        Ok(())
    }

    /// Copies `code` to `RAW_CODE` and enters it in 64-bit mode with
    /// the first 4 GiB identity-mapped and interrupts off.
    pub fn load_raw(&mut self, code: &[u8]) -> Result<(), VmError> {
        self.load_raw_at(code, RAW_CODE, RAW_CODE)
    }

    /// Copies `code` to `load` and starts the BSP at `entry`.
    pub fn load_raw_at(&mut self, code: &[u8], load: u64, entry: u64) -> Result<(), VmError> {
        self.mem
            .write_slice(code, GuestAddress(load))
            .map_err(|e| VmError::Host(anyhow::anyhow!("writing guest code at {load:#x}: {e}")))?;
        vcpu::set_entry(&self.vcpus[0], &BootEntry { rip: entry, long_mode: true, params: 0 })?;
        self.loaded = true;
        Ok(())
    }

    /// Loads `cfg`'s kernel, initrd and command line; the channel region
    /// comes from `cfg`.
    pub fn load_kernel(&mut self, cfg: &VmConfig) -> Result<(), VmError> {
        let entry = loader::load(&self.mem, cfg, ACPI_BASE)?;
        vcpu::set_entry(&self.vcpus[0], &entry)?;
        self.channel = Some(cfg.channel);
        if let Some(link) = &cfg.console {
            self.set_console(link.clone());
        }
        self.loaded = true;
        Ok(())
    }

    /// Runs every vCPU on its own thread until the guest stops it, a
    /// vCPU fails, or `timeout` passes; then stops and joins them all.
    pub fn run(self, timeout: Duration) -> Result<Outcome, VmError> {
        self.run_inner(timeout, None)
    }

    /// `run`, but when `at` comes first the vCPUs are paused, the VM is
    /// saved to `files` (`Outcome::saved`) and the run ends with
    /// `ExitKind::Stopped`. A guest that stops by itself first is not saved.
    pub fn run_and_save(self, timeout: Duration, at: SaveAt, files: &Files) -> Result<Outcome, VmError> {
        self.run_inner(timeout, Some((at, files)))
    }

    fn run_inner(self, timeout: Duration, save: Option<(SaveAt, &Files)>) -> Result<Outcome, VmError> {
        if !self.loaded {
            return Err(VmError::Host(anyhow::anyhow!("Machine::run before anything was loaded")));
        }
        let setup = self.created.elapsed();
        let Machine {
            _kvm,
            vm,
            mem,
            vcpus,
            channel,
            devices,
            com_bufs,
            serial_irqs,
            panic_seen,
            console,
            _irq_evts,
            topo,
            memory_mib,
            msr_list,
            mut payload,
            ..
        } = self;
        let shared = Arc::new(Shared {
            devices: Mutex::new(devices),
            stop: AtomicBool::new(false),
            cause: Mutex::new(None),
            cv: Condvar::new(),
            mem: mem.clone(),
            channel,
            started: Instant::now(),
            to_init: Mutex::new(None),
            to_body: Mutex::new((None, 0)),
            vcpu_states: Mutex::new(Vec::new()),
            inbox: AtomicBool::new(payload.is_some()),
        });
        let mut threads = Vec::new();
        let mut spawn_err = None;
        for (i, v) in vcpus.into_iter().enumerate() {
            let s = shared.clone();
            match std::thread::Builder::new().name(format!("ktstr-vcpu{i}")).spawn(move || vcpu::run_loop(i, v, s)) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_err = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = &spawn_err {
            shared.finish(Cause::Host(format!("spawning a vCPU thread: {e}")));
        }

        let deadline = shared.started + timeout;
        let mut panic_deadline: Option<Instant> = None;
        let mut payload_error = None;
        let mut payload_since = Instant::now();
        let cause = {
            let mut g = shared.cause.lock().unwrap();
            loop {
                if let Some(c) = g.clone() {
                    break c;
                }
                shared.note_init();
                shared.note_body();
                let now = Instant::now();
                if panic_deadline.is_none() && panic_seen.load(Ordering::Acquire) {
                    // Give the guest a moment to print the trace and reboot.
                    panic_deadline = Some(now + Duration::from_secs(1));
                }
                if panic_deadline.is_some_and(|p| now >= p) {
                    break Cause::PanicSeen;
                }
                if now >= deadline {
                    break Cause::Timeout;
                }
                if let Some((at, _)) = save {
                    if save_point(at, &shared, now) {
                        break Cause::Saved;
                    }
                }
                if let Some(tx) = payload.as_mut() {
                    match tx.pump() {
                        Ok(Progress::Done) => {
                            payload = None;
                            shared.inbox.store(false, Ordering::Release);
                        }
                        Ok(Progress::Sent) => payload_since = now,
                        Ok(Progress::Waiting) if now - payload_since < PAYLOAD_STALL => {}
                        Ok(Progress::Waiting) => {
                            let why = format!(
                                "the restored guest stopped taking its test after {} of {} bytes ({}s without progress)",
                                tx.sent(),
                                tx.total(),
                                PAYLOAD_STALL.as_secs()
                            );
                            payload_error = Some(why.clone());
                            break Cause::Host(why);
                        }
                        Err(e) => {
                            let why = format!("writing the test into the restored guest: {e}");
                            payload_error = Some(why.clone());
                            break Cause::Host(why);
                        }
                    }
                }
                if let Some(link) = console.get() {
                    if link.stopped() {
                        break Cause::Stopped;
                    }
                    let keys = link.take_input();
                    if !keys.is_empty() {
                        // Not under the cause lock: a vCPU thread may hold
                        // the devices lock while it records a cause.
                        drop(g);
                        // A full FIFO takes nothing; the rest waits for the next poll.
                        let taken = shared.devices.lock().unwrap().com1.enqueue_raw_bytes(&keys).unwrap_or(0);
                        link.unread(&keys[taken..]);
                        g = shared.cause.lock().unwrap();
                        continue;
                    }
                }
                let mut wake = deadline;
                if let Some(p) = panic_deadline {
                    wake = wake.min(p);
                }
                // Poll the panic flag at least every 50 ms; keys, a save
                // point and a payload every 2-10 ms.
                let poll = if payload.is_some() {
                    2
                } else if console.get().is_some() || save.is_some() {
                    10
                } else {
                    50
                };
                let wait = (wake - now).min(Duration::from_millis(poll));
                g = shared.cv.wait_timeout(g, wait).unwrap().0;
            }
        };
        let run_time = shared.started.elapsed();
        // The guest may have taken the last chunk and gone on between two polls.
        if let Some(tx) = payload.as_mut() {
            if matches!(tx.pump(), Ok(Progress::Done)) {
                shared.inbox.store(false, Ordering::Release);
            } else {
                payload_error.get_or_insert(format!(
                    "the restored VM ended ({cause:?}) after taking {} of {} bytes of its test",
                    tx.sent(),
                    tx.total()
                ));
            }
        }
        // Recorded before the stop so every vCPU thread sees why it ends.
        shared.finish(cause.clone());
        let t = Instant::now();
        let vcpus = stop_all(&shared, threads);
        let mut saved = None;
        if let (Cause::Saved, Some((_, files))) = (&cause, save) {
            let what = snapshot::SaveWhat { vm: &vm, vcpus: &vcpus, mem: &mem, topo, memory_mib, msr_list: &msr_list, channel };
            saved = Some(snapshot::save(&what, &shared, files, t)?);
        }
        drop(vcpus);
        // Closing the VM is most of the teardown: the kernel waits out an
        // RCU grace period per in-kernel device (PIC, IOAPIC, PIT).
        drop(vm);
        drop(_irq_evts);
        let teardown = t.elapsed();

        let (port_writes, mmio_writes, doorbells) = {
            let d = shared.devices.lock().unwrap();
            (d.port_writes.clone(), d.mmio_writes.clone(), d.doorbells)
        };
        // A guest that publishes INIT and ends before the next poll (once
        // the payload is in, nothing else notes it) still has it timed.
        shared.note_init();
        shared.note_body();
        let to_init = *shared.to_init.lock().unwrap();
        let to_body = shared.to_body.lock().unwrap().0;
        let mut states = std::mem::take(&mut *shared.vcpu_states.lock().unwrap());
        states.sort();
        let vcpu_states = states.into_iter().map(|(i, s)| format!("vCPU {i}: {s}")).collect();
        let text = |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
        let console = text(&com_bufs[0]);
        let com2 = text(&com_bufs[1]);
        let messages = channel::decode(&shared.channel_bytes());
        let exit = cause.exit_kind(&console);
        Ok(Outcome {
            exit,
            cause,
            console,
            com2,
            port_writes,
            mmio_writes,
            doorbells,
            serial_irqs: [serial_irqs[0].load(Ordering::Relaxed), serial_irqs[1].load(Ordering::Relaxed)],
            messages,
            setup,
            to_init,
            to_body,
            run_time,
            teardown,
            vcpu_states,
            memory: mem,
            saved,
            payload_error,
        })
    }
}

/// Whether the guest reached `at`.
fn save_point(at: SaveAt, shared: &Shared, now: Instant) -> bool {
    match at {
        SaveAt::After(d) => now - shared.started >= d,
        SaveAt::Doorbells(n) => shared.devices.lock().unwrap().doorbells >= n,
        SaveAt::Ready => shared.channel_has(channel::kind::READY),
    }
}

/// Sets the stop flag and kicks every vCPU thread out of KVM_RUN until
/// all have exited, then joins them; returns the vCPUs of the threads
/// that did not panic, in order.
fn stop_all(shared: &Shared, threads: Vec<std::thread::JoinHandle<VcpuFd>>) -> Vec<VcpuFd> {
    shared.stop.store(true, Ordering::Release);
    let sig = vcpu::kick_signal();
    let mut pause = Duration::from_micros(200);
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            // SAFETY: the thread is not joined yet, so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.as_pthread_t(), sig) };
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
    threads.into_iter().filter_map(|t| t.join().ok()).collect()
}
