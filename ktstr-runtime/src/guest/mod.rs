//! The guest side: the test binary as `/init` (PID 1) inside the VM.
//!
//! Mounts the usual filesystems (and devpts, debugfs, tracefs and bpffs
//! where the kernel has them), brings the CPUs the kernel left offline
//! online (`maxcpus=1` under TCG, see [`cpus`]), runs the test body named by
//! `ktstr.test=NAME` in a supervised child, sends the verdict over the
//! data channel (and prints it on the console as a fallback), then powers
//! off. Every path ends in a power-off so the host never waits for a hang.

pub mod cpus;
pub mod ready;
pub mod static_keys;
pub mod supervise;

use std::ffi::CString;
use std::io::Write;

use crate::cgroup::{enable_controllers, CGROUP_ROOT};
use crate::channel::{kind, GuestChannel};
use crate::registry;
use crate::verdict::{Verdict, CONSOLE_MARKER};

/// Kernel command-line key naming the test to run.
pub const TEST_ARG: &str = "ktstr.test";
/// `ktstr.preset=NAME`: the test runs as its gauntlet variant on that preset.
pub const PRESET_ARG: &str = "ktstr.preset";

fn mount(src: &str, dst: &str, fstype: &str, data: Option<&str>) -> Result<(), String> {
    let _ = std::fs::create_dir_all(dst);
    let c = |s: &str| CString::new(s).unwrap();
    let data = data.map(c);
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            c(src).as_ptr(),
            c(dst).as_ptr(),
            c(fstype).as_ptr(),
            0,
            data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
        Ok(())
    } else {
        Err(format!("mount {fstype} on {dst}: {}", std::io::Error::last_os_error()))
    }
}

/// Value of `key=` on a kernel command line.
pub fn cmdline_arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
}

pub fn power_off() -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: sync and reboot(2) as PID 1; reboot only returns on error.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        // Exiting PID 1 would panic the kernel; the host's timeout ends us.
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// PID 1 entry point; never returns.
pub fn init() -> ! {
    // After a snapshot restore the ready init execs us with the test's
    // arguments; the body must not see these variables.
    let restored = std::env::var_os(ready::RESTORED_ENV).is_some();
    let from_payload = restored.then(GuestArgs::from_env);
    for v in [ready::RESTORED_ENV, ready::TEST_ENV, ready::PRESET_ENV, ready::CPUS_ENV] {
        std::env::remove_var(v);
    }
    // Everything mounted (a restored guest's ready init did it), then the
    // command line says which init this is.
    let bringup = prepare_with(restored);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !restored && cmdline.split_whitespace().any(|a| a == ready::READY_ARG) {
        ready::run(bringup)
    }
    if cmdline.split_whitespace().any(|a| a == crate::shell::SHELL_ARG) {
        // `cargo ktstr shell --test NAME`: the test's VM, a shell instead of the body.
        crate::shell::guest::run_test_shell(cmdline_arg(&cmdline, TEST_ARG).unwrap_or(""), bringup)
    }
    // A test must never run on fewer CPUs than its topology asked for.
    let mut verdict = match bringup {
        Err(e) => Verdict::fail(format!("guest CPU bring-up failed: {e}")),
        Ok(_) => std::panic::catch_unwind(|| run_named_test(from_payload.unwrap_or_else(|| GuestArgs::from_cmdline(&cmdline)))).unwrap_or_else(|p| {
            Verdict::fail(format!("ktstr guest init panicked: {}", supervise::panic_message(&*p)))
        }),
    };
    verdict.kernel_release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let json = serde_json::to_string(&verdict).unwrap_or_default();
    if let Some(Err(e)) = channel_send(kind::RESULT, json.as_bytes()) {
        println!("ktstr: guest: sending the verdict failed: {e}");
    }
    // The console copy is a fallback for the verdict only: metrics travel
    // on the channel, not over the slow serial line.
    verdict.metrics = None;
    println!("{CONSOLE_MARKER}{}", serde_json::to_string(&verdict).unwrap_or_default());
    power_off()
}

/// What every ktstr guest's PID 1 does first: `PATH`, the filesystems, the
/// data channel (announcing INIT), and every present CPU online. Returns
/// the CPU bring-up's result; the rest is reported on the console.
pub fn prepare() -> Result<cpus::Bringup, String> {
    prepare_with(false)
}

/// [`prepare`]; `restored`: the ready init before us mounted everything.
fn prepare_with(restored: bool) -> Result<cpus::Bringup, String> {
    // The kernel starts init with no PATH; host tools (`host_tools`) go first.
    std::env::set_var("PATH", crate::host_tools::GUEST_PATH);
    let mut problems = Vec::new();
    let basic = [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", None),
        ("cgroup2", CGROUP_ROOT, "cgroup2", None),
        ("tmpfs", "/tmp", "tmpfs", Some("mode=1777")),
    ];
    if !restored {
        for (src, dst, fs, data) in basic {
            if let Err(e) = mount(src, dst, fs, data) {
                problems.push(e);
            }
        }
    }
    match GuestChannel::open() {
        Ok(mut c) => {
            let _ = c.send(kind::INIT, b"ktstr guest init");
            *CHANNEL.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
        }
        Err(e) => println!("ktstr: guest: no data channel ({e}); the verdict goes to the console only"),
    }
    for p in &problems {
        println!("ktstr: guest: {p}");
    }
    // debugfs first: the CPU bring-up restores fair servers through it.
    let absent = if restored { Vec::new() } else { mount_tool_filesystems() };
    if !absent.is_empty() {
        println!("ktstr: guest: this kernel offers no {} (tools that need them will not work)", absent.join(", "));
    }
    // A restored guest's ready init flipped them before its bring-up.
    if !restored {
        if let Err(e) = static_keys::flip() {
            println!("ktstr: guest: {e}");
        }
    }
    let bringup = cpus::online_all();
    match &bringup {
        Ok(b) if !b.onlined.is_empty() => println!(
            "ktstr: guest: brought {} CPUs online in {} ms (fair server parameters restored on {})",
            b.onlined.len(),
            b.took.as_millis(),
            b.fair_servers.len()
        ),
        Ok(_) => {}
        Err(e) => println!("ktstr: guest: {e}"),
    }
    bringup
}

/// The data channel, once init opened it; shared with the supervisor's
/// output capture.
static CHANNEL: std::sync::Mutex<Option<GuestChannel>> = std::sync::Mutex::new(None);

/// Sends one record on the data channel; `None` without a channel.
pub fn channel_send(kind: u32, payload: &[u8]) -> Option<std::io::Result<()>> {
    CHANNEL.lock().unwrap_or_else(|e| e.into_inner()).as_mut().map(|c| c.send(kind, payload))
}

/// Bytes the data channel can still take; `None` without a channel.
pub fn channel_capacity_left() -> Option<usize> {
    CHANNEL.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(GuestChannel::capacity_left)
}

/// The filesystems kernel tools expect beyond the basics (ptys for anything
/// that spawns a terminal, debugfs/tracefs for tracing, bpffs for pinned BPF
/// objects). Returns the ones this kernel cannot offer: a note, not a failure.
fn mount_tool_filesystems() -> Vec<String> {
    let mut absent = Vec::new();
    for (src, dst, fs, data) in [
        ("devpts", "/dev/pts", "devpts", Some("gid=5,mode=0620,ptmxmode=0666")),
        ("debugfs", "/sys/kernel/debug", "debugfs", None),
        ("tracefs", "/sys/kernel/tracing", "tracefs", None),
        ("bpf", "/sys/fs/bpf", "bpf", Some("mode=0700")),
    ] {
        if let Err(e) = mount(src, dst, fs, data) {
            absent.push(format!("{fs} ({})", e.rsplit(": ").next().unwrap_or(&e)));
        }
    }
    absent
}

/// What the host asks a test's `/init` to run. A cold boot reads it from
/// the kernel command line; a restored guest's command line is the ready
/// VM's, so the payload carries the same arguments ([`ready::TEST_ENV`]...).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuestArgs {
    /// `ktstr.test=NAME`.
    pub test: Option<String>,
    /// `ktstr.preset=NAME`: the test's gauntlet variant on that preset.
    pub preset: Option<String>,
    /// `ktstr.cpus=N` ([`crate::cpu_override`]), as given.
    pub cpus: Option<String>,
}

impl GuestArgs {
    pub fn from_cmdline(cmdline: &str) -> Self {
        let arg = |k| cmdline_arg(cmdline, k).map(str::to_string);
        Self { test: arg(TEST_ARG), preset: arg(PRESET_ARG), cpus: arg(crate::cpu_override::GUEST_ARG) }
    }

    /// What the ready init passed on from the payload.
    fn from_env() -> Self {
        let var = |k| std::env::var(k).ok();
        Self { test: var(ready::TEST_ENV), preset: var(ready::PRESET_ENV), cpus: var(ready::CPUS_ENV) }
    }
}

/// Runs the test `args` names.
fn run_named_test(args: GuestArgs) -> Verdict {
    let Some(name) = args.test.as_deref() else {
        return Verdict::fail(format!("no {TEST_ARG}= on the guest kernel command line"));
    };
    let Some(mut def) = registry::find(name) else {
        return Verdict::fail(format!("the guest binary has no ktstr test named {name}"));
    };
    if let Some(p) = args.preset.as_deref() {
        let Some(preset) = crate::preset::find(p) else {
            return Verdict::fail(format!("the guest binary has no gauntlet preset named {p}"));
        };
        def = def.leak_variant(preset);
    }
    if let Some(n) = args.cpus.as_deref() {
        // The host resized the test (KTSTR_CPUS); resize it the same way.
        match crate::cpu_override::parse(Some(n)).and_then(|n| crate::cpu_override::apply(def, n)) {
            Ok(d) => def = d,
            Err(e) => return Verdict::fail(format!("guest: {}={n}: {e}", crate::cpu_override::GUEST_ARG)),
        }
    }
    let _ = channel_send(kind::BODY, name.as_bytes());
    println!("ktstr: guest: running {name}");
    match def.scheduler() {
        // sched_ext: start the scheduler, watch it during the body, stop it after.
        Some(s) => crate::scheduler::guest::run_under_expecting(&s, std::path::Path::new(&s.guest_path()), def.expect_scx_error, || {
            supervise::run_body(def, true)
        }),
        None => supervise::run_body(def, true),
    }
}

/// The cgroup controllers a test's body (or its shell) can use: enabled
/// once, by [`static_keys::flip`] in [`prepare`] (a restored guest's ready
/// init did it before the save).
fn enable_test_controllers() {
    let missing = enable_controllers(std::path::Path::new(CGROUP_ROOT), &["cpu", "cpuset", "memory", "pids"]);
    if !missing.is_empty() {
        println!("ktstr: guest: cgroup controllers not available: {}", missing.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_args_from_the_command_line() {
        let a = GuestArgs::from_cmdline("console=ttyS0 ktstr.test=t1 ktstr.preset=smt ktstr.cpus=4 quiet");
        assert_eq!(a, GuestArgs { test: Some("t1".into()), preset: Some("smt".into()), cpus: Some("4".into()) });
        assert_eq!(GuestArgs::from_cmdline("console=ttyS0 ktstr.ready"), GuestArgs::default());
    }
}
