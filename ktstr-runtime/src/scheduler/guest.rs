//! Guest side: start the scheduler, wait until sched_ext runs it, watch
//! it while the test body runs, stop it and confirm it detached.
//!
//! ```ignore
//! let mut running = Running::start(&SCHED)?;   // Err(StartError::Skip | Fail)
//! let v = supervise::run_body(def, true);       // body runs; a thread watches
//! let stopped = running.stop();                 // Err(SchedFail::Ejected(..)) if lost
//! ```
//!
//! The scheduler is started through a small monitor process that waits
//! for it and reports its exit status on a pipe: the guest's PID 1 reaps
//! every child with `waitpid(-1)` while the body runs, which would
//! otherwise swallow the scheduler's status.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::kmsg::{Kmsg, ScxLog};
use super::{EjectKind, Ejection, ExitKind, KernelExit, OpsName, Output, SchedFail, Scheduler, StartError};
use crate::verdict::{Outcome, Verdict};

pub const SCX_DIR: &str = "/sys/kernel/sched_ext";
const POLL: Duration = Duration::from_millis(20);
const WATCH_POLL: Duration = Duration::from_millis(100);
/// After an ejection, how long the scheduler gets to print its exit
/// report (the "EXIT:" line and the sched_ext dump) and die.
const EJECT_GRACE: Duration = Duration::from_secs(5);
const OUTPUT_CAP: u64 = 256 * 1024;

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// `/sys/kernel/sched_ext/state`, or "" when unreadable.
pub fn state() -> String {
    read_trim(&format!("{SCX_DIR}/state"))
}

/// `/sys/kernel/sched_ext/root/ops`, or "" when no scheduler is loaded.
pub fn ops() -> String {
    read_trim(&format!("{SCX_DIR}/root/ops"))
}

/// `/sys/kernel/sched_ext/enable_seq`: bumped on every enable (6.12+);
/// `None` when the kernel lacks it.
pub fn enable_seq() -> Option<u64> {
    std::fs::read_to_string(format!("{SCX_DIR}/enable_seq")).ok()?.trim().parse().ok()
}

/// The ops name of a scheduler sched_ext enabled after our start, or
/// `None` while there is none. Before the start the state was `disabled`
/// with enable count `seq_before`; now it is `state` with `seq_now`, ops
/// `ops`, and `logged` is the `BPF scheduler "X" enabled` name the kernel
/// logged since. The kernel sets `enabled` a moment before it bumps the
/// count, so either the count or the log line proves a new enable; a
/// kernel without the count relies on the `disabled` checked before the
/// start. The name does not decide: the scx project's schedulers
/// register versioned names, and whatever we started is what attached.
pub fn enabled_since_start(seq_before: Option<u64>, state: &str, seq_now: Option<u64>, ops: &str, logged: Option<&str>) -> Option<String> {
    if state != "enabled" {
        return None;
    }
    let fresh = match (seq_before, seq_now) {
        (Some(b), Some(n)) => n > b || logged.is_some(),
        _ => true,
    };
    let name = [ops.trim(), logged.unwrap_or("").trim()].into_iter().find(|n| !n.is_empty())?;
    fresh.then(|| name.to_string())
}

/// `None` when this kernel can run sched_ext schedulers, else the skip reason.
pub fn unsupported_reason() -> Option<String> {
    if Path::new(SCX_DIR).is_dir() {
        return None;
    }
    let release = read_trim("/proc/sys/kernel/osrelease");
    Some(format!(
        "kernel {} lacks CONFIG_SCHED_CLASS_EXT (no {SCX_DIR}); sched_ext scheduler tests need a kernel built with it \
         (e.g. `cargo ktstr test --kernel 6.12`, which applies ktstr.kconfig)",
        if release.is_empty() { "?" } else { &release }
    ))
}

/// Describes a wait(2) status.
pub fn describe_status(st: i32) -> String {
    if libc::WIFEXITED(st) {
        format!("exit status {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        let sig = libc::WTERMSIG(st);
        // SAFETY: strsignal returns a static/thread-local string or NULL.
        let name = unsafe { libc::strsignal(sig) };
        let name = if name.is_null() {
            String::new()
        } else {
            // SAFETY: non-null C string.
            format!(" ({})", unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy())
        };
        format!("killed by signal {sig}{name}")
    } else {
        format!("wait status {st:#x}")
    }
}

/// Records on the monitor pipe: a tag byte and an i32.
const TAG_PID: u8 = b'P';
const TAG_EXEC_ERR: u8 = b'E';
const TAG_STATUS: u8 = b'S';

/// What the monitor pipe said so far.
#[derive(Debug, Default)]
struct ProcState {
    pid: Option<i32>,
    exec_errno: Option<i32>,
    status: Option<i32>,
    buf: Vec<u8>,
    closed: bool,
}

impl ProcState {
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while self.buf.len() >= 5 {
            let v = i32::from_ne_bytes(self.buf[1..5].try_into().unwrap());
            match self.buf[0] {
                TAG_PID => self.pid = Some(v),
                TAG_EXEC_ERR => self.exec_errno = Some(v),
                TAG_STATUS => self.status = Some(v),
                _ => {}
            }
            self.buf.drain(..5);
        }
    }
}

/// Everything polled: the monitor pipe, the kernel log, the output files.
struct Probe {
    name: String,
    pipe: OwnedFd,
    proc_: ProcState,
    kmsg: Kmsg,
    log: ScxLog,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    monitor_pid: i32,
    /// The ops name sched_ext showed at attach; a different one later means ours left.
    attached_ops: String,
}

impl Probe {
    fn poll(&mut self) {
        let mut buf = [0u8; 64];
        while !self.proc_.closed {
            // SAFETY: read into a stack buffer from our non-blocking fd.
            let n = unsafe { libc::read(self.pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                self.proc_.feed(&buf[..n as usize]);
            } else if n == 0 {
                self.proc_.closed = true;
            } else {
                let e = std::io::Error::last_os_error().raw_os_error();
                if e != Some(libc::EINTR) {
                    break;
                }
            }
        }
        for r in self.kmsg.drain() {
            self.log.push(&r.text);
        }
        // The monitor may be ours to reap (outside the body, nobody else does).
        if self.proc_.status.is_some() && self.monitor_pid > 0 {
            let mut st = 0;
            // SAFETY: non-blocking wait for our own child.
            if unsafe { libc::waitpid(self.monitor_pid, &mut st, libc::WNOHANG) } != 0 {
                self.monitor_pid = 0;
            }
        }
        // The monitor died without reporting (killed): fall back to probing the pid.
        if self.proc_.closed && self.proc_.status.is_none() {
            if let Some(pid) = self.proc_.pid {
                // SAFETY: signal 0 only checks existence.
                if unsafe { libc::kill(pid, 0) } != 0 {
                    self.proc_.status = Some(-1);
                }
            }
        }
    }

    fn exited(&self) -> Option<String> {
        self.proc_.status.map(|s| if s == -1 { "gone; exit status unknown".into() } else { describe_status(s) })
    }

    fn output(&self) -> Output {
        let read = |p: &Path| {
            use std::io::{Read, Seek, SeekFrom};
            let Ok(mut f) = std::fs::File::open(p) else { return String::new() };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let mut s = Vec::new();
            // Keep the end: that is where the exit report and dump are.
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(OUTPUT_CAP)));
            let _ = f.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        };
        Output { stdout: read(&self.stdout_path), stderr: read(&self.stderr_path), kernel: self.log.lines.clone() }
    }

    fn signal(&self, sig: i32) {
        if let (Some(pid), None) = (self.proc_.pid, self.proc_.status) {
            // SAFETY: signalling the scheduler we started.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Polls until `done` or `limit`; true when `done` held.
    fn wait_for(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let t0 = Instant::now();
        loop {
            self.poll();
            if done(self) {
                return true;
            }
            if t0.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Checks the scheduler is still attached; builds the ejection if not.
    fn ejection(&mut self) -> Option<Ejection> {
        self.poll();
        let st = state();
        let lost_kernel = self.log.exit.is_some();
        let died = self.proc_.status.is_some();
        // An empty root/ops (briefly, around an enable) is not a replacement.
        let now_ops = ops();
        let left = st != "enabled" || (!now_ops.is_empty() && now_ops != self.attached_ops);
        if !lost_kernel && !died && !left {
            return None;
        }
        // Let the scheduler print its exit report and the kernel finish its log.
        self.wait_for(EJECT_GRACE, |p| p.proc_.status.is_some());
        std::thread::sleep(Duration::from_millis(200));
        self.poll();
        let kind = classify(self.log.exit.clone(), self.exited(), || format!("{} (ops {:?})", state(), ops()));
        Some(Ejection { scheduler: self.name.clone(), kind, process: self.exited(), output: self.output() })
    }
}

/// How a lost scheduler is reported. A kernel error explains everything; a
/// process that died explains a plain "unregistered from user space";
/// anything else is reported as seen (`now` describes the sysfs state).
fn classify(kernel: Option<KernelExit>, exited: Option<String>, now: impl FnOnce() -> String) -> EjectKind {
    match (kernel, exited) {
        (Some(k), _) if k.kind.is_error() => EjectKind::Kernel(k),
        (k, Some(status)) if !k.as_ref().is_some_and(|k| k.kind != ExitKind::UnregUser) => {
            EjectKind::ProcessDied { status, kernel: k }
        }
        (Some(k), _) => EjectKind::Kernel(k),
        (None, _) => EjectKind::StateChanged(now()),
    }
}

/// Spawns `path args…` with stdio redirected, under a monitor process;
/// returns the monitor's pid and the read end of its pipe.
fn spawn_monitored(path: &Path, args: &[&str], out: &std::fs::File, err: &std::fs::File) -> std::io::Result<(i32, OwnedFd)> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let mut cargs = vec![cpath.clone()];
    for a in args {
        cargs.push(CString::new(*a)?);
    }
    let mut argv: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let devnull = std::fs::File::open("/dev/null").or_else(|_| std::fs::File::open("/proc/self/cmdline"))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds we own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let (o, e, n, w) = (out.as_raw_fd(), err.as_raw_fd(), devnull.as_raw_fd(), wr.as_raw_fd());
    // Only async-signal-safe calls after fork: everything is prepared above.
    unsafe fn put(fd: i32, tag: u8, v: i32) {
        let mut rec = [0u8; 5];
        rec[0] = tag;
        rec[1..].copy_from_slice(&v.to_ne_bytes());
        libc::write(fd, rec.as_ptr().cast(), 5);
    }
    // SAFETY: the children only use async-signal-safe calls and _exit.
    let monitor = unsafe { libc::fork() };
    if monitor < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if monitor == 0 {
        unsafe {
            let child = libc::fork();
            if child == 0 {
                libc::dup2(n, 0);
                libc::dup2(o, 1);
                libc::dup2(e, 2);
                // Own process group, default signal handling and mask: PID 1's
                // settings must not leak into the scheduler.
                libc::setpgid(0, 0);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGPIPE, libc::SIGCHLD] {
                    libc::signal(sig, libc::SIG_DFL);
                }
                libc::execv(argv[0], argv.as_ptr());
                put(w, TAG_EXEC_ERR, *libc::__errno_location());
                libc::_exit(127);
            }
            if child < 0 {
                put(w, TAG_EXEC_ERR, *libc::__errno_location());
                libc::_exit(1);
            }
            put(w, TAG_PID, child);
            let mut st = 0;
            loop {
                let r = libc::waitpid(child, &mut st, 0);
                if r == child {
                    break;
                }
                if *libc::__errno_location() != libc::EINTR {
                    st = -1;
                    break;
                }
            }
            put(w, TAG_STATUS, st);
            libc::_exit(0);
        }
    }
    drop(wr);
    // SAFETY: setting O_NONBLOCK on our fd.
    unsafe {
        let fl = libc::fcntl(rd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(rd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((monitor, rd))
}

/// A scheduler that attached, watched by a thread while the body runs.
pub struct Running {
    sched: Scheduler,
    probe: Arc<Mutex<Probe>>,
    ejection: Arc<Mutex<Option<Ejection>>>,
    stop_flag: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
    attach_time: Duration,
    pid: i32,
    ops: String,
    stopped: bool,
}

/// A clean stop.
#[derive(Debug, Clone)]
pub struct Stopped {
    /// How the process ended after SIGINT.
    pub status: String,
    /// SIGINT → state `disabled`.
    pub detach_time: Duration,
    pub output: Output,
}

impl Running {
    /// Starts `sched` from its guest path ([`Scheduler::guest_path`]).
    pub fn start(sched: &Scheduler) -> Result<Running, StartError> {
        Self::start_at(sched, Path::new(&sched.guest_path()))
    }

    /// Starts `sched` from `path` and waits (bounded) until sched_ext
    /// reports it `enabled` under its ops name.
    pub fn start_at(sched: &Scheduler, path: &Path) -> Result<Running, StartError> {
        if let Some(why) = unsupported_reason() {
            if !Path::new("/sys/kernel").is_dir() {
                return Err(SchedFail::Io { name: sched.name.into(), what: format!("sysfs is not mounted; cannot check {SCX_DIR}") }.into());
            }
            return Err(StartError::Skip(format!("scheduler {}: {why}", sched.name)));
        }
        let name = sched.name.to_string();
        let (st, op) = (state(), ops());
        if st != "disabled" {
            return Err(SchedFail::Busy { name, state: st, ops: op }.into());
        }
        let io = |what: String| StartError::Fail(SchedFail::Io { name: sched.name.into(), what });
        let dir = PathBuf::from("/tmp/ktstr-sched");
        std::fs::create_dir_all(&dir).map_err(|e| io(format!("mkdir {}: {e}", dir.display())))?;
        let stdout_path = dir.join(format!("{}.stdout", sched.name.replace('/', "_")));
        let stderr_path = dir.join(format!("{}.stderr", sched.name.replace('/', "_")));
        let out = std::fs::File::create(&stdout_path).map_err(|e| io(format!("create {}: {e}", stdout_path.display())))?;
        let err = std::fs::File::create(&stderr_path).map_err(|e| io(format!("create {}: {e}", stderr_path.display())))?;
        // Opened before the start so the kernel's attach/exit lines are all seen.
        let kmsg = Kmsg::open_at_end().unwrap_or_else(|e| {
            println!("ktstr: guest: cannot read /dev/kmsg ({e}); sched_ext exit reasons will be missing");
            Kmsg::none()
        });
        let seq_before = enable_seq();
        let t0 = Instant::now();
        let (monitor_pid, pipe) = spawn_monitored(path, sched.args, &out, &err).map_err(|e| {
            StartError::Fail(SchedFail::Spawn { name: name.clone(), path: path.display().to_string(), error: e.to_string() })
        })?;
        let mut probe = Probe {
            name: name.clone(),
            pipe,
            proc_: ProcState::default(),
            kmsg,
            log: ScxLog::default(),
            stdout_path,
            stderr_path,
            monitor_pid,
            attached_ops: String::new(),
        };
        let limit = Duration::from_secs(sched.attach_timeout_s);
        let mut attached_ops = None;
        let attached = probe.wait_for(limit, |p| {
            if p.proc_.status.is_some() || p.proc_.exec_errno.is_some() {
                return true;
            }
            attached_ops = enabled_since_start(seq_before, &state(), enable_seq(), &ops(), p.log.enabled.as_deref());
            attached_ops.is_some()
        });
        let attach_time = t0.elapsed();
        if let Some(errno) = probe.proc_.exec_errno {
            return Err(SchedFail::Spawn {
                name,
                path: path.display().to_string(),
                error: std::io::Error::from_raw_os_error(errno).to_string(),
            }
            .into());
        }
        if let Some(status) = probe.exited() {
            // Give the kernel a moment to log why (e.g. ops.init() failing).
            std::thread::sleep(Duration::from_millis(100));
            probe.poll();
            // The kernel logged it enabled, then an error exit: it attached and
            // was ejected before this poll saw it (e.g. PID 1 itself stalled).
            let attached_then_ejected = probe.log.enabled.is_some();
            if let Some(k) = probe.log.exit.clone().filter(|k| attached_then_ejected && k.kind.is_error()) {
                return Err(SchedFail::Ejected(Ejection {
                    scheduler: name,
                    kind: EjectKind::Kernel(k),
                    process: Some(status),
                    output: probe.output(),
                })
                .into());
            }
            return Err(SchedFail::ExitedBeforeAttach {
                name,
                status,
                kernel: probe.log.exit.clone(),
                output: probe.output(),
            }
            .into());
        }
        if !attached {
            let (st, op) = (state(), ops());
            probe.signal(libc::SIGKILL);
            probe.wait_for(Duration::from_secs(5), |p| p.proc_.status.is_some());
            return Err(SchedFail::AttachTimeout { name, waited_ms: attach_time.as_millis(), state: st, ops: op, output: probe.output() }.into());
        }
        let pid = probe.proc_.pid.unwrap_or(0);
        let ops_name = attached_ops.unwrap_or_default();
        probe.attached_ops = ops_name.clone();
        let note = match sched.classify_ops(&ops_name) {
            OpsName::Unexpected => format!(
                " (not {:?} or its versioned form; accepted: it enabled after this scheduler started)",
                sched.ops_name.unwrap_or(sched.name)
            ),
            _ => String::new(),
        };
        println!("ktstr: guest: scheduler {} (pid {pid}, ops {ops_name:?}{note}) attached in {} ms", sched.name, attach_time.as_millis());
        let mut me = Running {
            sched: *sched,
            probe: Arc::new(Mutex::new(probe)),
            ejection: Arc::new(Mutex::new(None)),
            stop_flag: Arc::new(AtomicBool::new(false)),
            watcher: None,
            attach_time,
            pid,
            ops: ops_name,
            stopped: false,
        };
        me.spawn_watcher();
        Ok(me)
    }

    fn spawn_watcher(&mut self) {
        let (probe, ej, stop) = (self.probe.clone(), self.ejection.clone(), self.stop_flag.clone());
        self.watcher = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let found = probe.lock().unwrap_or_else(|e| e.into_inner()).ejection();
                if let Some(e) = found {
                    println!("ktstr: guest: {e}");
                    *ej.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    return;
                }
                std::thread::sleep(WATCH_POLL);
            }
        }));
    }

    /// Start → sched_ext `enabled` with this scheduler's ops.
    pub fn attach_time(&self) -> Duration {
        self.attach_time
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The ops name sched_ext reported when it attached.
    pub fn ops(&self) -> &str {
        &self.ops
    }

    /// The ejection the watcher saw, if any (non-blocking).
    pub fn check(&self) -> Option<Ejection> {
        self.ejection.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the watcher; an ejection seen during the body fails here.
    /// Otherwise SIGINT, wait for the process to end and sched_ext to
    /// report `disabled`.
    pub fn stop(mut self) -> Result<Stopped, SchedFail> {
        self.stopped = true;
        self.stop_flag.store(true, Ordering::Relaxed);
        if let Some(h) = self.watcher.take() {
            let _ = h.join();
        }
        let mut p = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        let seen = self.ejection.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(e) = seen.or_else(|| p.ejection()) {
            p.signal(libc::SIGKILL);
            p.wait_for(Duration::from_secs(2), |p| p.proc_.status.is_some());
            return Err(SchedFail::Ejected(e));
        }
        let name = self.sched.name.to_string();
        let t0 = Instant::now();
        p.signal(libc::SIGINT);
        let limit = Duration::from_secs(self.sched.stop_timeout_s);
        if !p.wait_for(limit, |p| p.proc_.status.is_some()) {
            p.signal(libc::SIGKILL);
            p.wait_for(Duration::from_secs(5), |p| p.proc_.status.is_some());
            return Err(SchedFail::StopFailed {
                name,
                why: format!("still running {}s after SIGINT (sched_ext state {:?}); killed it", limit.as_secs(), state()),
                output: p.output(),
            });
        }
        let detached = p.wait_for(Duration::from_secs(5), |_| state() == "disabled");
        let detach_time = t0.elapsed();
        let status = p.exited().unwrap_or_default();
        if let Some(k) = p.log.exit.clone().filter(|k| k.kind.is_error()) {
            // The kernel disabled it with an error while it was shutting down.
            return Err(SchedFail::Ejected(Ejection {
                scheduler: name,
                kind: EjectKind::Kernel(k),
                process: Some(status),
                output: p.output(),
            }));
        }
        if !detached {
            return Err(SchedFail::StopFailed {
                name,
                why: format!("process ended ({status}) but sched_ext state is still {:?} (ops {:?})", state(), ops()),
                output: p.output(),
            });
        }
        println!("ktstr: guest: scheduler {} stopped ({status}), detached {} ms after SIGINT", self.sched.name, detach_time.as_millis());
        Ok(Stopped { status, detach_time, output: p.output() })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.stopped {
            self.stop_flag.store(true, Ordering::Relaxed);
            if let Ok(p) = self.probe.lock() {
                p.signal(libc::SIGKILL);
            }
        }
    }
}

/// Runs `body` (the supervised test body) under `sched`: a kernel without
/// sched_ext skips; a scheduler that fails to attach, is ejected during
/// the body, or does not detach fails the test whatever the body returned
/// (`expect_err` only ever inverts the body's own result).
pub fn run_under(sched: &Scheduler, body: impl FnOnce() -> Verdict) -> Verdict {
    run_under_at(sched, Path::new(&sched.guest_path()), body)
}

/// [`run_under`] with the binary at `path` (an exported `.run` on the host).
pub fn run_under_at(sched: &Scheduler, path: &Path, body: impl FnOnce() -> Verdict) -> Verdict {
    run_under_expecting(sched, path, None, body)
}

/// [`run_under_at`]; with `expect_scx_error`, the test passes only if the
/// kernel ejects the scheduler with a sched_ext error whose text contains
/// it (see [`expected_ejection`]).
pub fn run_under_expecting(sched: &Scheduler, path: &Path, expect_scx_error: Option<&str>, body: impl FnOnce() -> Verdict) -> Verdict {
    let Some(want) = expect_scx_error else { return run_under_plain(sched, path, body) };
    match Running::start_at(sched, path) {
        Err(StartError::Skip(m)) => Verdict::skip(m),
        // Attached and ejected before the start returned: judged the same.
        Err(StartError::Fail(f)) => expected_ejection(sched.name, want, Err(&f), None),
        Ok(running) => {
            let v = body();
            let stopped = running.stop();
            expected_ejection(sched.name, want, stopped.as_ref().map(|_| ()), Some(&v))
        }
    }
}

/// The verdict of an `expect_scx_error = want` test from how the scheduler
/// ended: PASS for a kernel ejection with an error exit (a stall, a BPF or
/// runtime error) whose text contains `want`, whatever the body returned;
/// FAIL for a clean run, another kind of ending, or another error.
pub fn expected_ejection(sched: &str, want: &str, ended: Result<(), &SchedFail>, body: Option<&Verdict>) -> Verdict {
    let body_note = body.filter(|b| b.outcome != Outcome::Pass || !b.message.is_empty()).map(|b| format!("test body verdict: {:?}: {}\n", b.outcome, b.message));
    let f = match ended {
        Ok(()) => {
            return Verdict::fail(format!(
                "expected scheduler {sched} to be ejected with a sched_ext error containing {want:?}; it ran the whole test and detached cleanly"
            ))
            .with_details(body_note.unwrap_or_default())
        }
        Err(f) => f,
    };
    let text = format!("{f}\n{}", f.details());
    let sched_ext_error = matches!(f, SchedFail::Ejected(Ejection { kind: EjectKind::Kernel(k), .. }) if k.kind.is_error());
    if sched_ext_error && text.contains(want) {
        let mut v = Verdict::pass();
        v.message = format!("ejected as expected ({want:?}): {f}");
        return v;
    }
    let why = if sched_ext_error { format!("but its error does not contain {want:?}") } else { "not by a sched_ext error ejection".to_string() };
    Verdict::fail(format!("expected scheduler {sched} to be ejected with a sched_ext error containing {want:?}; it ended otherwise ({why}): {f}"))
        .with_details(body_note.unwrap_or_default() + &f.details())
}

fn run_under_plain(sched: &Scheduler, path: &Path, body: impl FnOnce() -> Verdict) -> Verdict {
    let running = match Running::start_at(sched, path) {
        Ok(r) => r,
        Err(StartError::Skip(m)) => return Verdict::skip(m),
        Err(StartError::Fail(f)) => return Verdict::fail(f.to_string()).with_details(f.details()),
    };
    let (attach, ops_name) = (running.attach_time(), running.ops().to_string());
    let mut v = body();
    match running.stop() {
        Ok(stopped) => {
            // The host prints a pass's message: it carries the attach time.
            if v.outcome == Outcome::Pass {
                let note = format!(
                    "scheduler {} (ops {ops_name:?}) attached in {} ms, detached {} ms after SIGINT",
                    sched.name,
                    attach.as_millis(),
                    stopped.detach_time.as_millis()
                );
                v.message = if v.message.is_empty() { note } else { format!("{}; {note}", v.message) };
            }
            v
        }
        Err(f) => {
            let mut details = String::new();
            if v.outcome != Outcome::Pass || !v.message.is_empty() {
                details = format!("test body verdict: {:?}: {}\n", v.outcome, v.message);
            }
            Verdict::fail(f.to_string()).with_details(details + &f.details())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_records() {
        let mut p = ProcState::default();
        let mut bytes = vec![TAG_PID];
        bytes.extend_from_slice(&42i32.to_ne_bytes());
        bytes.push(TAG_STATUS);
        bytes.extend_from_slice(&256i32.to_ne_bytes());
        // Records may arrive split across reads.
        p.feed(&bytes[..3]);
        assert_eq!(p.pid, None);
        p.feed(&bytes[3..7]);
        assert_eq!(p.pid, Some(42));
        p.feed(&bytes[7..]);
        assert_eq!(p.status, Some(256));
        assert_eq!(describe_status(256), "exit status 1");
        assert!(describe_status(9).starts_with("killed by signal 9"));
    }

    #[test]
    fn expected_ejections() {
        let exit = |kind, msg: &str| KernelExit { ops: "qmap".into(), kind, msg: Some(msg.into()), log: vec![format!("sched_ext: BPF scheduler \"qmap\" disabled ({msg})")] };
        let ejected = |kind, msg: &str| {
            SchedFail::Ejected(Ejection { scheduler: "q".into(), kind: EjectKind::Kernel(exit(kind, msg)), process: None, output: Output::default() })
        };
        let stall = ejected(ExitKind::Stall, "qmap: init[48] failed to run for 5.060s");
        let v = expected_ejection("q", "failed to run for", Err(&stall), Some(&Verdict::fail("workers starved")));
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.message);
        assert!(v.message.starts_with("ejected as expected (\"failed to run for\"): scheduler q was ejected by the kernel"), "{}", v.message);
        // The kernel log at the ejection counts too.
        assert_eq!(expected_ejection("q", "BPF scheduler \"qmap\" disabled", Err(&stall), None).outcome, Outcome::Pass);
        let v = expected_ejection("q", "scx_bpf_error", Err(&stall), None);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.message.contains("its error does not contain \"scx_bpf_error\""), "{}", v.message);
        let v = expected_ejection("q", "stall", Ok(()), Some(&Verdict::pass()));
        assert!(v.message.contains("ran the whole test and detached cleanly"), "{}", v.message);
        // Leaving without an error (unregistered from user space) is not an ejection.
        let left = ejected(ExitKind::UnregUser, "stall in the message");
        let v = expected_ejection("q", "stall", Err(&left), None);
        assert!(v.outcome == Outcome::Fail && v.message.contains("not by a sched_ext error ejection"), "{}", v.message);
        let died = SchedFail::Ejected(Ejection {
            scheduler: "q".into(),
            kind: EjectKind::ProcessDied { status: "killed by signal 9".into(), kernel: None },
            process: None,
            output: Output::default(),
        });
        assert_eq!(expected_ejection("q", "signal", Err(&died), None).outcome, Outcome::Fail);
    }

    #[test]
    fn attach_is_judged_by_a_new_enable_not_the_name() {
        let v = "bpfland_1.1.4_x86_64_unknown_linux_gnu";
        // Versioned or unexpected names attach once the count moved.
        assert_eq!(enabled_since_start(Some(3), "enabled", Some(4), v, None).as_deref(), Some(v));
        assert_eq!(enabled_since_start(Some(3), "enabled", Some(4), "whatever", None).as_deref(), Some("whatever"));
        // The kernel logs the line just before it bumps the count.
        assert_eq!(enabled_since_start(Some(3), "enabled", Some(3), v, Some(v)).as_deref(), Some(v));
        // Nothing new enabled: a stale state/count is not an attach.
        assert_eq!(enabled_since_start(Some(3), "enabled", Some(3), v, None), None);
        assert_eq!(enabled_since_start(Some(3), "enabling", Some(3), "", None), None);
        assert_eq!(enabled_since_start(Some(3), "disabled", Some(4), "", Some(v)), None);
        // Absent ops: the log's name stands in; with neither, not attached.
        assert_eq!(enabled_since_start(Some(3), "enabled", Some(4), "", Some(v)).as_deref(), Some(v));
        assert_eq!(enabled_since_start(Some(3), "enabled", Some(4), "\n", None), None);
        // Without enable_seq the `disabled` checked before the start decides.
        assert_eq!(enabled_since_start(None, "enabled", None, "simple", None).as_deref(), Some("simple"));
    }

    #[test]
    fn classification() {
        let k = |kind| Some(KernelExit { ops: "q".into(), kind, msg: None, log: vec![] });
        let now = || "disabled (ops \"\")".to_string();
        let st = || Some("exit status 0".to_string());
        // A kernel error wins even when the process also exited.
        assert!(matches!(classify(k(ExitKind::Stall), st(), now), EjectKind::Kernel(e) if e.kind == ExitKind::Stall));
        assert!(matches!(classify(k(ExitKind::ErrorBpf), None, now), EjectKind::Kernel(_)));
        // Death with the plain detach that follows it, or with nothing logged.
        assert!(matches!(classify(k(ExitKind::UnregUser), st(), now), EjectKind::ProcessDied { kernel: Some(_), .. }));
        assert!(matches!(classify(None, st(), now), EjectKind::ProcessDied { kernel: None, .. }));
        // scx_bpf_exit() from BPF is the scheduler leaving, dead or not.
        assert!(matches!(classify(k(ExitKind::UnregBpf), st(), now), EjectKind::Kernel(e) if e.kind == ExitKind::UnregBpf));
        assert!(matches!(classify(k(ExitKind::UnregUser), None, now), EjectKind::Kernel(_)));
        assert_eq!(classify(None, None, now), EjectKind::StateChanged("disabled (ops \"\")".into()));
    }

    /// The monitor reports pid and status of a real process, and stdio
    /// lands in the files (runs on the host: no sched_ext needed).
    #[test]
    fn spawn_monitored_reports_exit() {
        let t = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(t.path().join("o")).unwrap();
        let err = std::fs::File::create(t.path().join("e")).unwrap();
        let (mon, rd) = spawn_monitored(Path::new("/bin/sh"), &["-c", "echo hi; echo oops >&2; exit 3"], &out, &err).unwrap();
        let mut probe = Probe {
            name: "t".into(),
            pipe: rd,
            proc_: ProcState::default(),
            kmsg: Kmsg::none(),
            log: ScxLog::default(),
            stdout_path: t.path().join("o"),
            stderr_path: t.path().join("e"),
            monitor_pid: mon,
            attached_ops: String::new(),
        };
        assert!(probe.wait_for(Duration::from_secs(10), |p| p.proc_.status.is_some()));
        assert!(probe.proc_.pid.is_some());
        assert_eq!(probe.exited().unwrap(), "exit status 3");
        let o = probe.output();
        assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("hi\n", "oops\n"));

        let (mon, rd) = spawn_monitored(Path::new("/nonexistent/x"), &[], &out, &err).unwrap();
        probe.pipe = rd;
        probe.proc_ = ProcState::default();
        probe.monitor_pid = mon;
        assert!(probe.wait_for(Duration::from_secs(10), |p| p.proc_.exec_errno.is_some()));
        assert_eq!(probe.proc_.exec_errno, Some(libc::ENOENT));
    }
}
