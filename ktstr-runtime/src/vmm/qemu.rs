//! QEMU TCG backend: the same kernel, initramfs, command line, topology,
//! memory and data channel as the KVM backend, run by
//! `qemu-system-x86_64 -accel tcg`.
//!
//! Guest RAM is a shared file in /dev/shm so the host reads the data
//! channel straight out of guest memory, live and after exit. How the VM
//! ended comes from QMP's SHUTDOWN event, the console (panic) and QEMU's
//! reset log (triple fault).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use super::{console_shows_panic, BackendKind, ExitKind, Timings, VmConfig, VmError, VmResult};
use super::host_wait;
use crate::channel;
use crate::snapshot::payload::{FileWindow, Header, Progress, Sender};

const QEMU: &str = "qemu-system-x86_64";
const POLL: Duration = Duration::from_millis(5);
/// `KTSTR_TCG_THREAD=single|multi` picks QEMU's TCG threading (see [`TcgThread`]).
pub const TCG_THREAD_ENV: &str = "KTSTR_TCG_THREAD";
/// Extra arguments appended to QEMU's command line.
pub const QEMU_ARGS_ENV: &str = "KTSTR_QEMU_ARGS";
/// `KTSTR_TCG_BOOT_CPUS=one|all` (see [`BootCpus`]).
pub const TCG_BOOT_CPUS_ENV: &str = "KTSTR_TCG_BOOT_CPUS";

pub use super::boot_cpus::BootCpus;

impl BootCpus {
    /// `KTSTR_TCG_BOOT_CPUS` (default `one`: `All` is the old behaviour,
    /// kept for the benchmarks).
    pub fn tcg_from_env() -> Result<Self, VmError> {
        Self::from_env(TCG_BOOT_CPUS_ENV, BootCpus::One)
    }
}

/// The guest kernel command line QEMU gets: the config's, plus `maxcpus=1`
/// when several vCPUs would otherwise come up together under multi-threaded TCG.
pub fn kernel_cmdline(cfg: &VmConfig, threads: TcgThread, boot: BootCpus) -> String {
    // Single-threaded TCG runs one vCPU at a time: nothing to keep apart.
    let boot = if threads == TcgThread::Multi { boot } else { BootCpus::All };
    boot.cmdline(&cfg.cmdline, cfg.topology.total_cpus())
}

/// How QEMU runs the vCPUs. Multi-threaded (the default, one host thread
/// per vCPU) keeps guest CPU time honest: single-threaded TCG round-robins
/// busy vCPUs in 100 ms slices while the guest clock runs on, so tasks get
/// charged for time their vCPU was not running and fair-share checks fail
/// (4 of 16 runs of `two_cgroups_share_cpu` here, 0 of 16 multi-threaded).
/// Single-threaded rules out cross-vCPU races on re-patched kernel text,
/// the suspected cause of rare `Oops: int3` boots (docs/vmm.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcgThread {
    Single,
    Multi,
}

impl TcgThread {
    /// `KTSTR_TCG_THREAD`: `multi` (default) or `single`.
    pub fn from_env() -> Result<Self, VmError> {
        match std::env::var(TCG_THREAD_ENV).as_deref() {
            Err(_) | Ok("") | Ok("multi") => Ok(TcgThread::Multi),
            Ok("single") => Ok(TcgThread::Single),
            Ok(other) => Err(VmError::Host(anyhow!("{TCG_THREAD_ENV}={other:?} is not a TCG mode; use multi or single"))),
        }
    }

    /// The `-accel` value.
    pub fn accel(self) -> &'static str {
        match self {
            TcgThread::Single => "tcg,thread=single",
            TcgThread::Multi => "tcg,thread=multi",
        }
    }
}

/// `-smp`: one socket per NUMA node and one die per LLC, since QEMU's
/// x86 CPUID (leaf 4, 0x8000001d) shares L3 among the CPUs of a die.
pub fn smp(t: &super::Topology) -> String {
    format!("{},sockets={},dies={},cores={},threads={}", t.total_cpus(), t.numa_nodes, t.llcs, t.cores, t.threads)
}

/// The QEMU argument list for a config (without the per-run file paths
/// that [`run`] adds). Public for tests and for `--dry-run` style output.
pub fn args(cfg: &VmConfig, dir: &Path, threads: TcgThread, boot: BootCpus) -> Vec<String> {
    let t = cfg.topology;
    let mut a: Vec<String> = vec![
        "-nodefaults".into(),
        // Named vCPU threads (`CPU N/TCG`): the host-contention sampler finds them.
        "-name".into(),
        "ktstr,debug-threads=on".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        "pc".into(),
        "-accel".into(),
        threads.accel().into(),
        "-cpu".into(),
        // TCG's `max` is AMD family 6 by default, where Linux puts the LLC
        // at the node and ignores dies; as Intel it reads leaves 4 and 0x1f,
        // which QEMU fills per die: one die per LLC (see `smp`).
        "max,vendor=GenuineIntel".into(),
        "-no-reboot".into(),
        "-m".into(),
        format!("{}M", cfg.memory_mib),
        "-smp".into(),
        smp(&t),
    ];
    let node_mib = cfg.memory_mib / t.numa_nodes as u64;
    let per_node_cpus = t.total_cpus() / t.numa_nodes;
    for n in 0..t.numa_nodes {
        a.push("-object".into());
        a.push(format!(
            "memory-backend-file,id=m{n},size={node_mib}M,mem-path={},share=on",
            dir.join(format!("ram{n}")).display()
        ));
    }
    if t.numa_nodes == 1 {
        a.push("-machine".into());
        a.push("memory-backend=m0".into());
    } else {
        for n in 0..t.numa_nodes {
            let first = n * per_node_cpus;
            a.push("-numa".into());
            a.push(format!("node,nodeid={n},cpus={}-{},memdev=m{n}", first, first + per_node_cpus - 1));
        }
        for i in 0..t.numa_nodes {
            for j in (0..t.numa_nodes).filter(|&j| j != i) {
                a.push("-numa".into());
                a.push(format!("dist,src={i},dst={j},val={}", t.distance(i, j)));
            }
        }
    }
    a.extend([
        "-chardev".into(),
        "stdio,id=com1,signal=off".into(),
        "-serial".into(),
        "chardev:com1".into(),
        "-chardev".into(),
        format!("file,id=com2,path={}", dir.join("com2").display()),
        "-serial".into(),
        "chardev:com2".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", dir.join("qmp").display()),
        "-d".into(),
        "cpu_reset".into(),
        "-D".into(),
        dir.join("qemu.log").display().to_string(),
        "-kernel".into(),
        cfg.kernel.display().to_string(),
        "-append".into(),
        kernel_cmdline(cfg, threads, boot),
    ]);
    if let Some(i) = &cfg.initramfs {
        a.push("-initrd".into());
        a.push(i.display().to_string());
    }
    if let super::Start::Restore { .. } = &cfg.start {
        // Paused after loading: the inbox gets its first chunk before the
        // guest runs. `defer`: the capabilities go first ([`restore`]).
        a.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    }
    // Extra QEMU arguments for debugging (`-d int`, `-icount ...`), split on spaces.
    if let Ok(extra) = std::env::var(QEMU_ARGS_ENV) {
        a.extend(extra.split_whitespace().map(str::to_string));
    }
    a
}

/// `s` as one POSIX shell word (QEMU's `exec:` migration runs `/bin/sh -c`).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The RAM file and offset that hold the channel region.
fn channel_location(cfg: &VmConfig, dir: &Path) -> (PathBuf, u64) {
    let node_bytes = (cfg.memory_mib / cfg.topology.numa_nodes as u64) << 20;
    let node = cfg.channel.gpa / node_bytes;
    (dir.join(format!("ram{node}")), cfg.channel.gpa - node * node_bytes)
}

/// Most vCPUs QEMU's `pc` machine takes without x2APIC, which TCG lacks
/// before QEMU 8.1: APIC id 255 is the xAPIC broadcast.
pub const TCG_MAX_CPUS: u32 = 255;

/// A topology this backend cannot give is a skip (`VmError::HostLimit`).
pub fn check_limits(t: &super::Topology) -> Result<(), VmError> {
    if t.total_cpus() > TCG_MAX_CPUS {
        return Err(VmError::HostLimit(format!(
            "{} vCPUs asked; QEMU TCG's pc machine takes at most {TCG_MAX_CPUS} (no x2APIC under TCG); run it on KVM",
            t.total_cpus()
        )));
    }
    Ok(())
}

pub fn run(cfg: &VmConfig) -> Result<VmResult, VmError> {
    let start = Instant::now();
    check_limits(&cfg.topology)?;
    if !cfg.memory_mib.is_multiple_of(cfg.topology.numa_nodes as u64) {
        return Err(VmError::Topology(format!(
            "{} MiB of memory does not split evenly over {} NUMA nodes",
            cfg.memory_mib, cfg.topology.numa_nodes
        )));
    }
    let threads = TcgThread::from_env()?;
    let boot_cpus = BootCpus::tcg_from_env()?;
    let shm = Path::new("/dev/shm");
    let dir = tempfile::Builder::new()
        .prefix("ktstr-vm-")
        .tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") })
        .context("creating the VM's scratch directory")?;
    if let super::Start::Restore { state, checksum, .. } = &cfg.start {
        let t0 = Instant::now();
        let from = state.parent().unwrap_or(Path::new("."));
        let rams: Vec<PathBuf> = (0..cfg.topology.numa_nodes).map(|n| from.join(format!("ram{n}"))).collect();
        crate::snapshot::sparse::copy_checked(state, &rams, dir.path(), *checksum).map_err(VmError::Snapshot)?;
        if std::env::var_os("KTSTR_SNAPSHOT_TRACE").is_some() {
            eprintln!("ktstr: trace: RAM copied in {:?}", t0.elapsed());
        }
    }
    let mut cmd = Command::new(QEMU);
    cmd.args(args(cfg, dir.path(), threads, boot_cpus)).stdout(Stdio::piped()).stderr(Stdio::piped());
    match &cfg.console {
        // Interactive: COM1's stdio chardev reads the host's keys from our pipe.
        Some(_) => {
            cmd.stdin(Stdio::piped());
            // SAFETY: prctl is async-signal-safe and touches no memory of
            // the parent. A shell's QEMU must not outlive a killed host side.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VmError::Host(anyhow!(
                "{QEMU} not found: install it (Debian: apt-get install qemu-system-x86) or use KTSTR_VMM=kvm"
            )),
            _ => VmError::Host(anyhow!("starting {QEMU}: {e}")),
        })?;
    let setup = start.elapsed();
    let boot = Instant::now();

    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    let out = child.stdout.take().expect("piped stdout");
    let con = Arc::clone(&console);
    let link = cfg.console.clone();
    let reader = std::thread::spawn(move || {
        let mut out = out;
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            con.lock().unwrap().extend_from_slice(&buf[..n]);
            if let Some(l) = &link {
                l.output(&buf[..n]);
            }
        }
    });
    let mut guest_input = child.stdin.take();
    let mut err = child.stderr.take().expect("piped stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });

    let (ram_path, offset) = channel_location(cfg, dir.path());
    let mut ram = Ram { path: ram_path, file: None };
    let mut qmp = None;
    let mut shutdown_reason: Option<String> = None;
    let mut to_init = None;
    let mut to_body = None;
    let mut body_scan = 0u64;
    let mut snapshot_time = None;
    let mut exit = None;
    let deadline = boot + cfg.timeout;
    let task_dir = PathBuf::from(format!("/proc/{}/task", child.id()));
    let mut vcpu_wait = host_wait::VcpuWait::default();
    let mut polls = 0u32;
    // Restore: load the state, hand the guest its first chunk, then let it run.
    let mut sender = match &cfg.start {
        super::Start::Restore { state, payload, .. } => match restore(
            &mut child,
            &dir.path().join("qmp"),
            &ram.path,
            offset,
            cfg,
            state,
            payload,
        ) {
            Ok((q, tx)) => {
                qmp = Some(q);
                snapshot_time = Some(boot.elapsed());
                Some((tx, Instant::now()))
            }
            Err(e) => {
                kill(&mut child);
                let _ = child.wait();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(match e {
                    RestoreError::Load(e) => VmError::Snapshot(format!("{e}{}", stderr_note(&stderr))),
                    RestoreError::Payload(e) => VmError::Payload(e),
                });
            }
        },
        _ => None,
    };
    loop {
        // Every 100 ms: the vCPU threads' run-queue wait (host contention).
        if polls.is_multiple_of(20) {
            vcpu_wait.sample(&task_dir, host_wait::is_qemu_tcg_vcpu);
        }
        polls = polls.wrapping_add(1);
        if qmp.is_none() {
            qmp = Qmp::connect(&dir.path().join("qmp"));
        }
        if let Some(q) = qmp.as_mut() {
            if let Some(r) = q.poll_shutdown() {
                shutdown_reason = Some(r);
            }
        }
        if let (Some(link), Some(w)) = (&cfg.console, guest_input.as_mut()) {
            if link.stopped() {
                exit = Some(ExitKind::Stopped);
                kill(&mut child);
                break;
            }
            let keys = link.take_input();
            // A failed write means QEMU is going away; try_wait reports it.
            if !keys.is_empty() && w.write_all(&keys).and_then(|()| w.flush()).is_err() {
                guest_input = None;
            }
        }
        if let Some((tx, since)) = sender.as_mut() {
            match tx.pump() {
                Ok(Progress::Done) => {
                    if std::env::var_os("KTSTR_SNAPSHOT_TRACE").is_some() {
                        eprintln!("ktstr: trace: restore loaded {:?}, payload taken at {:?}", snapshot_time, boot.elapsed());
                    }
                    sender = None
                }
                Ok(Progress::Sent) => *since = Instant::now(),
                Ok(Progress::Waiting) if since.elapsed() < PAYLOAD_STALL => {}
                Ok(Progress::Waiting) => {
                    let what = format!(
                        "the restored guest stopped taking its test after {} of {} bytes ({}s without progress)",
                        tx.sent(),
                        tx.total(),
                        PAYLOAD_STALL.as_secs()
                    );
                    return Err(payload_error(&mut child, &console, what));
                }
                Err(e) => {
                    let what = format!("writing the test into the restored guest: {e}");
                    return Err(payload_error(&mut child, &console, what));
                }
            }
        } else if to_init.is_none() && channel_has_init(&mut ram, offset) {
            to_init = Some(boot.elapsed());
        }
        // The body's start: a BODY record on the channel (a restore's inbox
        // reuses the region, so only once the payload is taken).
        if to_body.is_none() && sender.is_none() {
            let committed = header_committed(&mut ram, offset);
            let kinds = channel::scan_kinds(committed, &mut body_scan, |off, len| ram.read(offset + off, len as u64).ok());
            if kinds.contains(&channel::kind::BODY) {
                to_body = Some(boot.elapsed());
            }
        }
        if let (super::Start::Save { state }, Some(q)) = (&cfg.start, qmp.as_mut()) {
            if channel_has(&mut ram, offset, channel::kind::READY) {
                let t0 = Instant::now();
                let r = save(q, state).and_then(|()| {
                    copy_ram(cfg, dir.path(), state.parent().unwrap_or(Path::new(".")))
                        .map_err(|e| format!("copying guest RAM: {e}"))
                });
                kill(&mut child);
                let _ = child.wait();
                if let Err(e) = r {
                    let stderr = err_reader.join().unwrap_or_default();
                    return Err(VmError::Snapshot(format!(
                        "saving the VM at its ready point: {e}{}",
                        stderr_note(&stderr)
                    )));
                }
                snapshot_time = Some(t0.elapsed());
                exit = Some(ExitKind::Stopped);
                break;
            }
        }
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => {
                exit = Some(ExitKind::HostError(format!("waiting for {QEMU}: {e}")));
                break;
            }
        }
        if Instant::now() >= deadline {
            exit = Some(ExitKind::Timeout);
            kill(&mut child);
            break;
        }
        std::thread::sleep(POLL);
    }
    if let Some((tx, _)) = &sender {
        let what = format!("the restored VM ended ({exit:?}) after taking {} of {} bytes of its test", tx.sent(), tx.total());
        return Err(payload_error(&mut child, &console, what));
    }
    if let Some(q) = qmp.as_mut() {
        if shutdown_reason.is_none() {
            shutdown_reason = q.poll_shutdown();
        }
    }
    let _ = child.wait();
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let status = child.try_wait().ok().flatten();
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();

    let region = ram.read(offset, cfg.channel.size).unwrap_or_default();
    let messages = channel::decode(&region).map_err(|e| VmError::Host(anyhow!(e)))?;
    let com2 = std::fs::read_to_string(dir.path().join("com2")).unwrap_or_default();
    let reset_log = std::fs::read_to_string(dir.path().join("qemu.log")).unwrap_or_default();

    let exit = exit.unwrap_or_else(|| {
        if console_shows_panic(&console) {
            ExitKind::Panic
        } else if reset_log.contains("Triple fault") {
            ExitKind::TripleFault
        } else {
            match shutdown_reason.as_deref() {
                Some("guest-shutdown") => ExitKind::PowerOff,
                Some("guest-reset") => ExitKind::Reboot,
                Some("guest-panic") => ExitKind::Panic,
                other => ExitKind::HostError(format!(
                    "{QEMU} exited ({}) without a guest shutdown (reason {other:?}): {}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    stderr.trim()
                )),
            }
        }
    });
    Ok(VmResult {
        exit,
        backend: BackendKind::QemuTcg,
        console,
        com2,
        messages,
        timings: Timings { setup, to_init, total: start.elapsed(), vcpu_wait: vcpu_wait.waited(), to_body, snapshot: snapshot_time },
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
}

/// Ends QEMU once a restored guest did not take its payload: `what`, and
/// the console's last lines.
fn payload_error(child: &mut Child, console: &Mutex<Vec<u8>>, what: String) -> VmError {
    kill(child);
    let _ = child.wait();
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    VmError::Payload(format!("{what}; console: {}", super::tail_lines(&console, 5).replace('\n', " | ")))
}

/// True once the guest published its first message and it is INIT.
fn channel_has_init(ram: &mut Ram, offset: u64) -> bool {
    header_committed(ram, offset) > 0 && first_kind(ram, offset) == Some(channel::kind::INIT)
}

fn header_committed(ram: &mut Ram, offset: u64) -> u64 {
    const W: usize = channel::OFF_COMMITTED;
    ram.read(offset + W as u64, 8).ok().map(|b| u64::from_le_bytes(b[..8].try_into().unwrap())).unwrap_or(0)
}

fn first_kind(ram: &mut Ram, offset: u64) -> Option<u32> {
    let b = ram.read(offset + channel::HEADER_SIZE, 4).ok()?;
    Some(u32::from_le_bytes(b[..4].try_into().unwrap()))
}

/// The guest RAM file holding the data channel, opened once, when it
/// first exists (QEMU creates it on a cold boot): the poll loop reads it
/// several times every 5 ms.
struct Ram {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl Ram {
    fn read(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = match &self.file {
            Some(f) => f,
            None => self.file.insert(std::fs::File::open(&self.path)?),
        };
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// How long a restored guest may sit on a chunk of its payload.
const PAYLOAD_STALL: Duration = Duration::from_secs(30);
/// Loading or writing a snapshot; both take well under a second here.
const SNAPSHOT_IO: Duration = Duration::from_secs(120);
const QMP_REPLY: Duration = Duration::from_secs(10);

fn stderr_note(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!(
            "; {QEMU} said: {}",
            t.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
        )
    }
}

/// True once the guest published a message of `kind` (the uplink holds
/// few messages before the ready point, so this reads little).
fn channel_has(ram: &mut Ram, offset: u64, kind: u32) -> bool {
    let committed = header_committed(ram, offset);
    if committed == 0 || committed > crate::snapshot::payload::READY_UPLINK as u64 {
        return false;
    }
    ram.read(offset, channel::HEADER_SIZE + committed)
        .ok()
        .and_then(|r| channel::decode(&r).ok())
        .is_some_and(|m| m.iter().any(|m| m.kind == kind))
}

/// Copies the guest RAM files (`ram{node}`) from `from` to `to`, holes
/// and all: a saved guest touched a fraction of its memory.
pub fn copy_ram(cfg: &VmConfig, from: &Path, to: &Path) -> std::io::Result<()> {
    for n in 0..cfg.topology.numa_nodes {
        let name = format!("ram{n}");
        crate::snapshot::sparse::Crc::default()
            .file(&from.join(&name), Some(&to.join(&name)))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{} to {}: {e}", from.join(&name).display(), to.display())))?;
    }
    Ok(())
}

/// Guest RAM (the shared memory-backend files) stays out of the stream:
/// a save keeps a copy of the files ([`copy_ram`]), a restore its own copy.
fn ignore_shared(q: &mut Qmp) -> Result<(), String> {
    let caps = serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
    q.execute("migrate-set-capabilities", Some(caps), QMP_REPLY).map(drop)
}

/// Pauses the guest and writes its state to `state`: QEMU streams it to
/// `cat`, which writes a `.part` file that is renamed into place once
/// complete (QEMU reports completion when the pipe took the last byte,
/// not when `cat` wrote it).
fn save(q: &mut Qmp, state: &Path) -> Result<(), String> {
    let part = state.with_extension("part");
    // The default 32 MiB/s cap is for live migration over a network.
    q.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({"max-bandwidth": 1u64 << 40})),
        QMP_REPLY,
    )?;
    q.execute("stop", None, QMP_REPLY)?;
    ignore_shared(q)?;
    let uri = format!(
        "exec:cat > {p} && mv {p} {s}",
        p = shell_quote(&part.display().to_string()),
        s = shell_quote(&state.display().to_string())
    );
    q.execute(
        "migrate",
        Some(serde_json::json!({ "uri": uri })),
        QMP_REPLY,
    )?;
    let t0 = Instant::now();
    wait_migration(q, "writing the state", t0, || None)?;
    while !state.is_file() {
        if t0.elapsed() > SNAPSHOT_IO {
            return Err(format!(
                "{} never appeared (cat or mv failed?)",
                state.display()
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Why [`restore`] failed: the save (it must go) or this test's payload
/// (the save stays; the test boots cold).
enum RestoreError {
    Load(String),
    Payload(String),
}

/// Polls `query-migrate` until the migration (`what`, for errors) is
/// complete; `gone` says why QEMU is no longer there to ask.
fn wait_migration(q: &mut Qmp, what: &str, t0: Instant, mut gone: impl FnMut() -> Option<String>) -> Result<(), String> {
    loop {
        if let Some(e) = gone() {
            return Err(e);
        }
        let r = q.execute("query-migrate", None, QMP_REPLY);
        if let Some(e) = gone() {
            return Err(e);
        }
        let r = r?;
        match r["status"].as_str() {
            Some("completed") => return Ok(()),
            Some(st @ ("failed" | "cancelled")) => {
                return Err(format!(
                    "{what}: migration {st}: {}",
                    r["error-desc"].as_str().unwrap_or("no reason given")
                ))
            }
            _ => {}
        }
        if t0.elapsed() > SNAPSHOT_IO {
            return Err(format!("{what} took over {}s", SNAPSHOT_IO.as_secs()));
        }
        std::thread::sleep(POLL);
    }
}

/// Waits for QEMU (started with `-S -incoming`) to load the state, puts
/// the first chunk of `payload` into the inbox and starts the guest.
fn restore(
    child: &mut Child,
    qmp_path: &Path,
    ram: &Path,
    offset: u64,
    cfg: &VmConfig,
    state: &Path,
    payload: &crate::snapshot::payload::Payload,
) -> Result<(Qmp, Sender<FileWindow>), RestoreError> {
    let (mut q, file) = load(child, qmp_path, ram, state).map_err(RestoreError::Load)?;
    let header = Header::now(payload).map_err(|e| RestoreError::Payload(format!("payload header: {e}")))?;
    let mut tx = Sender::new(FileWindow { file, base: offset }, cfg.channel.size as usize, payload, &header)
        .map_err(|e| RestoreError::Payload(format!("payload: {e}")))?;
    tx.pump().map_err(|e| RestoreError::Payload(format!("writing the first chunk of the test: {e}")))?;
    q.execute("cont", None, QMP_REPLY).map_err(RestoreError::Load)?;
    Ok((q, tx))
}

/// [`restore`]'s first half: the state loaded, and the guest RAM file opened.
fn load(child: &mut Child, qmp_path: &Path, ram: &Path, state: &Path) -> Result<(Qmp, std::fs::File), String> {
    let t0 = Instant::now();
    let exited = |child: &mut Child| {
        child
            .try_wait()
            .ok()
            .flatten()
            .map(|st| format!("{QEMU} could not load the snapshot ({st})"))
    };
    let mut q = loop {
        if let Some(q) = Qmp::connect(qmp_path) {
            break q;
        }
        if let Some(e) = exited(child) {
            return Err(e);
        }
        if t0.elapsed() > SNAPSHOT_IO {
            return Err(format!(
                "{QEMU} opened no QMP socket within {}s",
                SNAPSHOT_IO.as_secs()
            ));
        }
        std::thread::sleep(POLL);
    };
    ignore_shared(&mut q)?;
    let uri = format!("exec:cat {}", shell_quote(&state.display().to_string()));
    q.execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })), QMP_REPLY)?;
    wait_migration(&mut q, "loading the snapshot", t0, || exited(child))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ram)
        .map_err(|e| format!("opening guest RAM {}: {e}", ram.display()))?;
    Ok((q, file))
}

/// QMP over the monitor socket: the SHUTDOWN event, and commands for
/// saving and restoring snapshots.
struct Qmp {
    stream: UnixStream,
    /// Bytes of a line not complete yet.
    partial: Vec<u8>,
    /// A SHUTDOWN reason seen while waiting for a command's reply.
    shutdown: Option<String>,
    next_id: u64,
    /// QEMU closed the socket.
    eof: bool,
}

impl Qmp {
    fn connect(path: &Path) -> Option<Self> {
        let mut s = UnixStream::connect(path).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(1))).ok()?;
        s.write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":\"caps\"}\n")
            .ok()?;
        Some(Self {
            stream: s,
            partial: Vec::new(),
            shutdown: None,
            next_id: 0,
            eof: false,
        })
    }

    /// The complete JSON lines read so far (waits at most the 1 ms read timeout).
    fn lines(&mut self) -> Vec<serde_json::Value> {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Err(_) => break,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
            }
        }
        let mut out = Vec::new();
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
                if v["event"] == "SHUTDOWN" {
                    self.shutdown = v["data"]["reason"].as_str().map(str::to_string);
                }
                out.push(v);
            }
        }
        out
    }

    /// Reads pending QMP lines; returns the SHUTDOWN reason if one came.
    fn poll_shutdown(&mut self) -> Option<String> {
        self.lines();
        self.shutdown.take()
    }

    /// Runs one command; its `return` value, or its error as text.
    fn execute(
        &mut self,
        cmd: &str,
        args: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        self.next_id += 1;
        let id = format!("k{}", self.next_id);
        let mut req = serde_json::json!({ "execute": cmd, "id": id });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP {cmd}: {e}"))?;
        let t0 = Instant::now();
        loop {
            for v in self.lines() {
                if v["id"] == id.as_str() {
                    return match v.get("error") {
                        Some(e) => Err(format!(
                            "QMP {cmd}: {}",
                            e["desc"].as_str().unwrap_or("error")
                        )),
                        None => Ok(v["return"].clone()),
                    };
                }
            }
            if self.eof {
                return Err(format!("QMP {cmd}: {QEMU} closed the monitor"));
            }
            if t0.elapsed() > timeout {
                return Err(format!("QMP {cmd}: no reply within {}s", timeout.as_secs()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{ChannelRegion, Topology};

    fn cfg(t: Topology, mem: u64) -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            vmlinux: None,
            initramfs: Some("/i".into()),
            cmdline: "console=ttyS0".into(),
            topology: t,
            memory_mib: mem,
            timeout: Duration::from_secs(1),
            channel: ChannelRegion { gpa: (mem - 4) << 20, size: 4 << 20 },
            console: None,
            start: Default::default(),
        }
    }

    #[test]
    fn smp_and_numa_args() {
        let a = args(&cfg(Topology::new(2, 2, 2, 2), 512), Path::new("/d"), TcgThread::Single, BootCpus::One).join(" ");
        assert!(a.contains("-accel tcg,thread=single"), "{a}");
        assert!(a.contains("-cpu max,vendor=GenuineIntel"), "{a}");
        assert!(a.contains("-smp 16,sockets=2,dies=2,cores=2,threads=2"), "{a}");
        assert!(a.contains("-numa dist,src=0,dst=1,val=20 -numa dist,src=1,dst=0,val=20 "), "{a}");
        assert!(a.contains("node,nodeid=0,cpus=0-7,memdev=m0"), "{a}");
        assert!(a.contains("node,nodeid=1,cpus=8-15,memdev=m1"), "{a}");
        assert!(a.contains("size=256M,mem-path=/d/ram1"), "{a}");
        assert!(!a.contains("memory-backend=m0"));
        let one = args(&cfg(Topology::cpus(4), 256), Path::new("/d"), TcgThread::Multi, BootCpus::One).join(" ");
        assert!(one.contains("-accel tcg,thread=multi"), "{one}");
        assert!(one.contains("-smp 4,sockets=1,dies=1,cores=4,threads=1"));
        assert!(one.contains("memory-backend=m0") && !one.contains("-numa"));
    }

    #[test]
    fn more_than_255_vcpus_is_a_host_limit() {
        assert!(check_limits(&Topology::new(4, 4, 8, 2).with_distances(Default::default())).unwrap_err().is_skip());
        assert!(check_limits(&Topology::new(4, 2, 8, 2)).is_ok());
    }

    #[test]
    fn numa_distances_from_the_topology() {
        let t = Topology::new(4, 1, 2, 1).with_distances(crate::vmm::Distances::Grouped { group: 2, near: 16, far: 32 });
        let a = args(&cfg(t, 1024), Path::new("/d"), TcgThread::Multi, BootCpus::One);
        let dists: Vec<&String> = a.iter().filter(|x| x.starts_with("dist,")).collect();
        assert_eq!(dists.len(), 12, "every ordered pair of distinct nodes");
        assert!(dists.contains(&&"dist,src=0,dst=1,val=16".to_string()));
        assert!(dists.contains(&&"dist,src=3,dst=0,val=32".to_string()));
        assert!(dists.contains(&&"dist,src=3,dst=2,val=16".to_string()));
        assert!(a.contains(&"node,nodeid=3,cpus=6-7,memdev=m3".to_string()));
        assert!(a.contains(&"8,sockets=4,dies=1,cores=2,threads=1".to_string()));
    }

    #[test]
    fn multi_threaded_boots_bring_up_one_cpu() {
        let four = cfg(Topology::cpus(4), 256);
        assert_eq!(kernel_cmdline(&four, TcgThread::Multi, BootCpus::One), "console=ttyS0 maxcpus=1");
        assert_eq!(kernel_cmdline(&four, TcgThread::Multi, BootCpus::All), "console=ttyS0");
        assert_eq!(kernel_cmdline(&four, TcgThread::Single, BootCpus::One), "console=ttyS0");
        assert_eq!(kernel_cmdline(&cfg(Topology::cpus(1), 256), TcgThread::Multi, BootCpus::One), "console=ttyS0");
        let a = args(&four, Path::new("/d"), TcgThread::Multi, BootCpus::One);
        let i = a.iter().position(|x| x == "-append").unwrap();
        assert_eq!(a[i + 1], "console=ttyS0 maxcpus=1");
    }

    #[test]
    fn restore_args_wait_paused_for_the_incoming_state() {
        let mut c = cfg(Topology::cpus(2), 256);
        let plain = args(&c, Path::new("/d"), TcgThread::Multi, BootCpus::One);
        assert!(!plain.iter().any(|a| a == "-incoming" || a == "-S"));
        c.start = crate::vmm::Start::Restore {
            checksum: (0, 0),
            state: "/s/state".into(),
            payload: crate::snapshot::payload::Payload { test: "t".into(), preset: None, cpus: None, archive: "/a".into() },
        };
        let a = args(&c, Path::new("/d"), TcgThread::Multi, BootCpus::One).join(" ");
        assert!(a.contains("-S -incoming defer"), "{a}");
        // The VM itself is the saved one: same memory backend, kernel command line.
        assert!(a.contains("mem-path=/d/ram0,share=on") && a.contains("-append console=ttyS0 maxcpus=1"), "{a}");
    }

    #[test]
    fn shell_words_survive_quotes_and_spaces() {
        let w = shell_quote("/home/o'neil/my cache/state");
        let out = std::process::Command::new("sh").arg("-c").arg(format!("printf %s {w}")).output().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "/home/o'neil/my cache/state");
    }

    #[test]
    fn channel_in_last_node() {
        let c = cfg(Topology::new(2, 1, 1, 1), 512);
        let (f, off) = channel_location(&c, Path::new("/d"));
        assert_eq!(f, Path::new("/d/ram1"));
        assert_eq!(off, 252 << 20);
    }
}
