//! Host side of a shell VM: the userland packed beside `/init`, the VM
//! booted with a live console link, the terminal in raw mode, and how the
//! VM ended turned into an exit status.
//!
//! Exit status: the `--exec` command's (or the interactive shell's) own;
//! 0 after `poweroff` or the escape key; 1 with the cause first and the
//! console tail when the guest does not get to run the shell (a panic, a
//! boot that exceeds the boot timeout) or dies before it reports a status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::stream::Filter;
use super::term::{self, RawTerminal};
use super::{GuestConfig, CONFIG_PATH, ESCAPE, ESCAPE_NAME, INCLUDE_DIR, SHELL_ARG};
use crate::channel::kind;
use crate::initramfs::Initramfs;
use crate::vmm::backend::{self, BackendChoice};
use crate::vmm::{ConsoleLink, ExitKind, VmBuilder, VmResult};

/// `cargo ktstr shell --test NAME` runs the test binary holding NAME with
/// this flag; [`OPTIONS_ENV`] carries the rest of the command line.
pub const TEST_FLAG: &str = "--ktstr-shell-test=";
/// Asks a test binary whether it holds a test: exit 0 and [`HAS_TEST_YES`] on stdout.
pub const HAS_TEST_FLAG: &str = "--ktstr-has-test=";
pub const HAS_TEST_YES: &str = "ktstr: has test";
/// JSON of [`Options`], for the test binary that opens a `--test` shell.
pub const OPTIONS_ENV: &str = "KTSTR_SHELL_OPTIONS";
/// Where busybox is looked for when `KTSTR_BUSYBOX` does not name it.
pub const BUSYBOX_ENV: &str = "KTSTR_BUSYBOX";
/// Default time from starting the VM until init announces the shell.
pub const BOOT_TIMEOUT_S: u64 = 60;
/// The VM's own timeout: a session lasts as long as the user wants.
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const TAIL_LINES: usize = 40;

/// What the user asked for beyond the VM's shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Options {
    pub exec: Option<String>,
    /// `-i FILE`: host files packed (with their shared libraries) at `/include/NAME`.
    pub includes: Vec<PathBuf>,
    pub boot_timeout_s: u64,
    /// Extra kernel arguments.
    pub cmdline: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self { exec: None, includes: Vec::new(), boot_timeout_s: BOOT_TIMEOUT_S, cmdline: Vec::new() }
    }
}

/// Busybox on the host: `$KTSTR_BUSYBOX`, else `busybox` on PATH or in
/// the system directories (Debian's busybox-static installs `/bin/busybox`).
pub fn find_busybox() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(BUSYBOX_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{BUSYBOX_ENV}={} does not exist; point it at a busybox binary or unset it", p.display());
        }
        return Ok(p);
    }
    crate::host_tools::find("busybox")
        .map_err(|m| anyhow::anyhow!("busybox not found on the host ({m}); install it: apt-get install busybox-static"))
}

/// The guest's config: the command, the host's `$TERM` and terminal size.
pub fn guest_config(opts: &Options) -> GuestConfig {
    let (rows, cols) = term::size(0).or_else(|| term::size(1)).unwrap_or((0, 0));
    GuestConfig { exec: opts.exec.clone(), term: std::env::var("TERM").ok().filter(|t| !t.is_empty()), rows, cols }
}

/// Adds busybox (`/bin/busybox`; init installs its applet links), the
/// `-i` files at `/include/NAME` with their libraries, and the guest config.
pub fn add_userland(mut ir: Initramfs, opts: &Options) -> Result<Initramfs> {
    let bb = find_busybox()?;
    ir = ir.file(&bb, "/bin/busybox").with_context(|| format!("packing busybox from {}", bb.display()))?;
    for f in &opts.includes {
        if !f.is_file() {
            bail!("-i {}: no such file (give a regular file; it lands at {INCLUDE_DIR}/NAME)", f.display());
        }
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        ir = ir.file(f, &format!("{INCLUDE_DIR}/{name}")).with_context(|| format!("-i {}", f.display()))?;
    }
    let cfg = serde_json::to_vec(&guest_config(opts))?;
    Ok(ir.data(CONFIG_PATH, cfg, 0o644))
}

/// Reads host keys and queues them for the guest until `done`; the escape
/// key stops the VM instead. Polls so it notices `done` without a key.
fn forward_keys(link: ConsoleLink, done: Arc<AtomicBool>, escaped: Arc<AtomicBool>) {
    let mut buf = [0u8; 1024];
    while !done.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, 100) };
        if r <= 0 {
            continue;
        }
        // SAFETY: reads into our buffer, at most its length.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // EOF (a pipe ran dry) or an error: no more keys, the VM goes on.
            return;
        }
        let keys = &buf[..n as usize];
        match keys.iter().position(|&b| b == ESCAPE) {
            Some(i) => {
                link.send(&keys[..i]);
                escaped.store(true, Ordering::Release);
                link.stop();
                return;
            }
            None => link.send(keys),
        }
    }
}

/// Boots `b` (kernel, initramfs with [`add_userland`], topology, memory,
/// command line already set) as a shell VM and returns the exit status.
/// `what` names the VM in the banner.
pub fn drive(b: VmBuilder, opts: &Options, what: &str) -> i32 {
    let interactive = opts.exec.is_none();
    let filter = Arc::new(Mutex::new(Filter::default()));
    let sink = filter.clone();
    let link = ConsoleLink::new(move |bytes| {
        let show = sink.lock().unwrap_or_else(|e| e.into_inner()).feed(bytes);
        if !show.is_empty() {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(&show).and_then(|()| o.flush());
        }
    });
    // Chosen before raw mode: the backend's notice (KVM unusable, TCG) is a normal line.
    let backend = match BackendChoice::from_env().and_then(backend::select) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("ktstr: shell: FAIL: {e}");
            return 1;
        }
    };
    let vm = match b.cmdline(SHELL_ARG).timeout(FOREVER).console(link.clone()).backend(backend).build() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ktstr: shell: FAIL: {e}");
            return 1;
        }
    };
    if interactive {
        eprintln!("ktstr: shell: booting {what}; {ESCAPE_NAME} or `poweroff` ends the VM");
    }
    let raw = if interactive {
        match RawTerminal::enter(0) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("ktstr: shell: FAIL: cannot put the terminal in raw mode: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    let done = Arc::new(AtomicBool::new(false));
    let escaped = Arc::new(AtomicBool::new(false));
    let keys = interactive.then(|| {
        let (l, d, e) = (link.clone(), done.clone(), escaped.clone());
        std::thread::spawn(move || forward_keys(l, d, e))
    });
    let boot_timeout = Duration::from_secs(opts.boot_timeout_s);
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (l, d, f, t) = (link.clone(), done.clone(), filter.clone(), timed_out.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !d.load(Ordering::Acquire) && !f.lock().unwrap_or_else(|e| e.into_inner()).ready() {
                if t0.elapsed() >= boot_timeout {
                    t.store(true, Ordering::Release);
                    l.stop();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let r = vm.run();
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    if let Some(k) = keys {
        let _ = k.join();
    }
    drop(raw);
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ktstr: shell: FAIL: {e}");
            return 1;
        }
    };
    let (ready, marker_status) = {
        let f = filter.lock().unwrap_or_else(|e| e.into_inner());
        (f.ready(), f.status())
    };
    if interactive && ready {
        // The guest's last line may not end in a newline.
        eprintln!();
    }
    if escaped.load(Ordering::Acquire) {
        eprintln!("ktstr: shell: VM ended by {ESCAPE_NAME}");
        return 0;
    }
    if let Some(s) = exit_status(&r).or(marker_status) {
        return s;
    }
    let cause = failure_cause(&r, ready, timed_out.load(Ordering::Acquire).then_some(opts.boot_timeout_s));
    eprintln!("ktstr: shell: FAIL: {cause}");
    eprintln!("ktstr: shell: guest console (last {TAIL_LINES} lines):\n{}", clean_tail(&r));
    1
}

/// The status init sent on the data channel.
pub fn exit_status(r: &VmResult) -> Option<i32> {
    r.messages.iter().rev().find(|m| m.kind == kind::SHELL_EXIT).and_then(|m| std::str::from_utf8(&m.payload).ok()?.trim().parse().ok())
}

/// The console's last lines without carriage returns or our markers.
fn clean_tail(r: &VmResult) -> String {
    let text: String = r.console.chars().filter(|c| !matches!(c, '\r' | '\u{2}' | '\u{3}')).collect();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// One line: why the VM ended without a status, the panic line first.
pub fn failure_cause(r: &VmResult, ready: bool, boot_timed_out: Option<u64>) -> String {
    let when = if ready { "during the session" } else { "before the shell started" };
    if let Some(s) = boot_timed_out {
        return format!("the guest did not start the shell within {s}s (the boot timeout; --boot-timeout SECS raises it)");
    }
    match &r.exit {
        ExitKind::Panic => {
            let line = r.console.lines().find(|l| l.contains("Kernel panic - not syncing")).map(|l| l.trim().to_string());
            format!("guest kernel panic {when}: {}", line.unwrap_or_else(|| "(no panic line on the console)".into()))
        }
        ExitKind::TripleFault => format!("the guest CPU triple-faulted {when}"),
        ExitKind::HostError(e) => format!("the VMM failed {when}: {e}"),
        ExitKind::Timeout => format!("the VM timed out {when}"),
        ExitKind::Stopped => format!("the VM was stopped {when}"),
        ExitKind::PowerOff | ExitKind::Reboot => {
            format!("the guest stopped ({:?}) {when} without reporting an exit status", r.exit)
        }
    }
}

/// `cargo ktstr shell --test NAME`, in the test binary that holds NAME:
/// the test's VM (its kernel by discovery, topology, memory, command
/// line, include files, host tools and scheduler) with a shell for a body.
pub fn run_test(name: &str) -> i32 {
    let name = name.strip_prefix("ktstr/").unwrap_or(name);
    let opts: Options = match std::env::var(OPTIONS_ENV) {
        Ok(j) => match serde_json::from_str(&j) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("ktstr: shell: FAIL: {OPTIONS_ENV} is not valid: {e}");
                return 1;
            }
        },
        Err(_) => Options::default(),
    };
    let Some(def) = crate::registry::find(name) else {
        eprintln!("ktstr: shell: FAIL: no ktstr test named {name} in {}", exe_name());
        return 1;
    };
    if def.host_only {
        eprintln!("ktstr: shell: FAIL: {name} is host_only: it never boots a VM, so there is no VM to open a shell in");
        return 1;
    }
    let found = match crate::discovery::discover() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ktstr: shell: FAIL: {e}");
            return 1;
        }
    };
    let lock = crate::host::lock_cache_entry(&found.image, &crate::discovery::cache_root(), Duration::from_secs(60));
    let _lock = match lock {
        Ok(l) => l,
        Err(v) => {
            eprintln!("ktstr: shell: FAIL: {}", v.message);
            return 1;
        }
    };
    let ir = match crate::host::test_initramfs(def, &found) {
        Ok(ir) => ir,
        Err(v) => {
            eprintln!("ktstr: shell: FAIL: {}: {}", def.name, v.message);
            return 1;
        }
    };
    let initrd = match add_userland(ir, &opts).and_then(|ir| ir.build_cached()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ktstr: shell: FAIL: {e:#}");
            return 1;
        }
    };
    let mut b = crate::vmm::Vm::builder()
        .kernel(&found.image)
        .initramfs(initrd)
        .topo(def.topology)
        .memory_mib(def.memory_mib)
        .cmdline(format!("{}={name}", crate::guest::TEST_ARG));
    if !def.cmdline.is_empty() {
        b = b.cmdline(def.cmdline);
    }
    for a in &opts.cmdline {
        b = b.cmdline(a.clone());
    }
    let sched = def.scheduler.map(|s| format!(", scheduler {}", s.name)).unwrap_or_default();
    let what = format!(
        "{} for test {name} ({} CPUs, {} MiB{sched})",
        found.image.display(),
        def.topology.total_cpus(),
        def.memory_mib
    );
    drive(b, &opts, &what)
}

fn exe_name() -> String {
    std::env::current_exe().ok().map(|p| p.display().to_string()).unwrap_or_else(|| "this binary".into())
}

/// The name `-i` files get in the guest.
pub fn include_guest_path(host: &Path) -> String {
    format!("{INCLUDE_DIR}/{}", host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Message;
    use crate::vmm::{BackendKind, Timings};

    fn result(exit: ExitKind, console: &str, messages: Vec<Message>) -> VmResult {
        VmResult { exit, backend: BackendKind::QemuTcg, console: console.into(), com2: String::new(), messages, timings: Timings::default() }
    }

    #[test]
    fn status_and_causes() {
        let m = |k: u32, p: &str| Message { kind: k, payload: p.as_bytes().to_vec() };
        let r = result(ExitKind::PowerOff, "", vec![m(kind::INIT, "x"), m(kind::SHELL_EXIT, "7")]);
        assert_eq!(exit_status(&r), Some(7));
        assert_eq!(exit_status(&result(ExitKind::PowerOff, "", vec![m(kind::TEXT, "7")])), None);
        let panic = "[ 1.0] Run /init as init process\r\n[ 1.2] Kernel panic - not syncing: No working init found.\r\n[ 1.3] CPU: 0\r\n";
        let r = result(ExitKind::Panic, panic, vec![]);
        let c = failure_cause(&r, false, None);
        assert_eq!(c, "guest kernel panic before the shell started: [ 1.2] Kernel panic - not syncing: No working init found.");
        assert!(failure_cause(&r, false, Some(5)).starts_with("the guest did not start the shell within 5s"));
        assert!(failure_cause(&result(ExitKind::PowerOff, "", vec![]), true, None).contains("during the session"));
        let tail = clean_tail(&r);
        assert!(!tail.contains('\r') && tail.ends_with("[ 1.3] CPU: 0"), "{tail:?}");
    }

    #[test]
    fn userland_packs_busybox_includes_and_config() {
        let Some(_) = crate::testing::require(find_busybox().ok(), "busybox on the host", "apt-get install busybox-static") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data.txt");
        std::fs::write(&f, "x").unwrap();
        let opts = Options { exec: Some("nproc".into()), includes: vec![f.clone(), "/bin/sh".into()], ..Options::default() };
        let ir = add_userland(Initramfs::default(), &opts).unwrap();
        let paths = ir.paths();
        for want in ["bin/busybox", "include/data.txt", "include/sh", "ktstr/shell.json"] {
            assert!(paths.contains(&want), "{want} missing: {paths:?}");
        }
        assert!(paths.iter().any(|p| p.contains("libc.so")), "an ELF include brings its libraries: {paths:?}");
        assert_eq!(include_guest_path(&f), "/include/data.txt");
        let bad = Options { includes: vec![dir.path().join("nope")], ..Options::default() };
        let e = format!("{:#}", add_userland(Initramfs::default(), &bad).unwrap_err());
        assert!(e.contains("-i ") && e.contains("nope") && e.contains("no such file"), "{e}");
    }
}
