//! PID 1 of a shell VM: after the usual preparation (filesystems, data
//! channel, CPUs online: [`crate::guest::prepare`]), install busybox's
//! applets, make the serial console init's controlling terminal, start
//! `/bin/sh` on it in a process group of its own in the foreground (so
//! Ctrl-C reaches the shell's jobs, never init), wait for it, report its
//! exit status on the data channel and the console, and power off.
//!
//! busybox's `poweroff`/`halt`/`reboot` signal PID 1 (SIGUSR2, SIGUSR1,
//! SIGTERM) rather than calling reboot(2) themselves; init answers each
//! by ending the session with status 0.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::{GuestConfig, CONFIG_PATH, EXIT_PREFIX, MARKER_END, READY};
use crate::channel::kind;
use crate::guest::{channel_send, cpus::Bringup, power_off, prepare};

const BUSYBOX: &str = "/bin/busybox";
/// The guest's PATH: busybox's applet directories, test tools first.
const PATH: &str = "/ktstr/bin:/bin:/sbin:/usr/bin:/usr/sbin:/include";

/// The signal a `poweroff`-like request sent PID 1; 0 for none yet.
static POWER_REQUEST: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_power_request(sig: libc::c_int) {
    POWER_REQUEST.store(sig, Ordering::SeqCst);
}

/// PID 1 of a plain `cargo ktstr shell` VM (cargo-ktstr is `/init`).
pub fn init_standalone() -> ! {
    let notes = bringup_notes(prepare());
    finish(session(&notes))
}

/// PID 1 of `cargo ktstr shell --test NAME`: the test's VM, with its
/// scheduler started and watched as for the body, and a shell in place
/// of the body.
pub fn run_test_shell(name: &str, bringup: Result<Bringup, String>) -> ! {
    let mut notes = bringup_notes(bringup);
    let Some(def) = crate::registry::find(name) else {
        notes.push(format!("ktstr: this guest binary has no ktstr test named {name:?}"));
        finish(session(&notes))
    };
    let status = match def.scheduler {
        None => session(&notes),
        Some(s) => {
            let mut status = 1;
            let v = crate::scheduler::guest::run_under(s, || {
                notes.push(format!("ktstr: scheduler {} is running (sched_ext ops: {})", s.name, crate::scheduler::guest::ops()));
                status = session(&notes);
                crate::verdict::Verdict::pass()
            });
            if v.outcome != crate::verdict::Outcome::Pass {
                // The scheduler failed to start or was ejected: say so before the exit marker.
                let msg = format!("\r\nktstr: scheduler {}: {}\r\n{}\r\n", s.name, v.message, v.details.replace('\n', "\r\n"));
                console_write(msg.as_bytes());
                if status == 0 {
                    status = 1;
                }
            }
            status
        }
    };
    finish(status)
}

fn bringup_notes(b: Result<Bringup, String>) -> Vec<String> {
    match b {
        Ok(_) => Vec::new(),
        Err(e) => vec![format!("ktstr: WARNING: CPU bring-up failed, fewer CPUs than asked are online: {e}")],
    }
}

fn config() -> GuestConfig {
    std::fs::read(CONFIG_PATH).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// The serial console as a file of our own (not `/dev/console`, which
/// can never become a controlling terminal).
fn open_console() -> std::io::Result<std::fs::File> {
    let open = |p: &str| std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(p);
    open("/dev/ttyS0").or_else(|_| open("/dev/console"))
}


/// Writes `b` to the console and waits until the UART has sent it (and
/// everything queued before it, such as the command's last output):
/// power-off does not wait for the tty to drain.
fn console_write(b: &[u8]) {
    if let Ok(mut c) = open_console() {
        let _ = c.write_all(b);
        // SAFETY: tcdrain on a descriptor we own.
        unsafe { libc::tcdrain(c.as_raw_fd()) };
    }
}

/// Output post-processing: on for a person's terminal (`\n` → `\r\n`),
/// off for `--exec`, whose bytes go to the host as they are.
fn set_onlcr(fd: i32, on: bool, rows: u16, cols: u16) {
    // SAFETY: tcgetattr/tcsetattr/TIOCSWINSZ on an open tty with structs we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            if on {
                t.c_oflag |= libc::OPOST | libc::ONLCR;
            } else {
                t.c_oflag &= !libc::ONLCR;
            }
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
        if rows > 0 && cols > 0 {
            let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
            libc::ioctl(fd, libc::TIOCSWINSZ, &ws);
        }
    }
}

/// Runs the shell (or `--exec` command) to its end; returns its status.
pub fn session(notes: &[String]) -> i32 {
    for s in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(s, on_power_request as *const () as libc::sighandler_t) };
    }
    let cfg = config();
    // Applet symlinks in /bin, /sbin, /usr/bin, /usr/sbin (the archive holds only busybox).
    let installed = Command::new(BUSYBOX).args(["--install", "-s"]).status();
    let tty = match open_console() {
        Ok(t) => t,
        Err(e) => {
            println!("ktstr: shell: cannot open the serial console: {e}");
            return 1;
        }
    };
    set_onlcr(tty.as_raw_fd(), cfg.exec.is_none(), cfg.rows, cfg.cols);
    let mut con = &tty;
    let _ = con.write_all(READY);
    let nl = if cfg.exec.is_some() { "\n" } else { "\r\n" };
    for n in notes {
        let _ = write!(con, "{n}{nl}");
    }
    if !installed.as_ref().is_ok_and(|s| s.success()) {
        let _ = write!(con, "ktstr: {BUSYBOX} --install -s failed ({installed:?}); only busybox's own name works{nl}");
    }
    let mut cmd = Command::new("/bin/sh");
    if let Some(c) = &cfg.exec {
        cmd.arg("-c").arg(c);
    }
    let dup = |f: &std::fs::File| f.try_clone().map(OwnedFd::from).map(Stdio::from);
    let (Ok(i), Ok(o), Ok(e)) = (dup(&tty), dup(&tty), dup(&tty)) else {
        let _ = write!(con, "ktstr: shell: cannot duplicate the console descriptor{nl}");
        return 1;
    };
    cmd.stdin(i).stdout(o).stderr(e).current_dir("/").env_clear();
    cmd.env("PATH", PATH).env("HOME", "/root").env("TERM", cfg.term.as_deref().unwrap_or("vt100")).env("PS1", "ktstr# ");
    let _ = std::fs::create_dir_all("/root");
    // Init, not the shell, leads the session that owns the console: when a
    // session leader exits the kernel hangs its terminal up, and a hangup
    // throws away output the UART has not sent yet (the command's last lines).
    // SAFETY: setsid/ioctl on our own descriptor; setsid fails harmlessly
    // when PID 1 already leads its session.
    unsafe {
        libc::setsid();
        if libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 1) < 0 {
            let _ = write!(con, "ktstr: shell: no controlling terminal ({}); Ctrl-C will not reach commands{nl}", std::io::Error::last_os_error());
        }
    }
    // SAFETY: only async-signal-safe calls. The child gets a process group
    // of its own and puts it in the console's foreground (SIGTTOU blocked
    // meanwhile: a background group changing it would be stopped), so
    // Ctrl-C reaches the shell's jobs and never init.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTTOU);
            libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
            let r = if libc::setpgid(0, 0) < 0 || libc::tcsetpgrp(0, libc::getpid()) < 0 { -1 } else { 0 };
            let err = std::io::Error::last_os_error();
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if r < 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(con, "ktstr: shell: starting /bin/sh: {e}{nl}");
            return 127;
        }
    };
    let pid = child.id() as i32;
    loop {
        if POWER_REQUEST.load(Ordering::SeqCst) != 0 {
            end_session(pid);
            return 0;
        }
        let mut st = 0;
        // PID 1 reaps every orphan; the shell's own status ends the session.
        // SAFETY: waitpid writes the status into `st`, which we own.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if r == pid {
            return if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else if libc::WIFSIGNALED(st) {
                128 + libc::WTERMSIG(st)
            } else {
                1
            };
        }
        if r == 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if r > 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        // ECHILD: the shell is gone without our seeing its status.
        return 1;
    }
}

/// Hangs up the shell's process group and waits (a bounded time) for the
/// shell to exit: the session leader's exit hangs up the console, and a
/// console opened before that hangup would swallow the exit marker.
fn end_session(pid: i32) {
    for (sig, wait_ms) in [(libc::SIGHUP, 1000), (libc::SIGKILL, 1000)] {
        // SAFETY: signals the shell's process group, which we started.
        unsafe { libc::kill(-pid, sig) };
        for _ in 0..wait_ms / 20 {
            let mut st = 0;
            // SAFETY: waitpid writes the status into `st`, which we own.
            let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
            if r == pid || r < 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reports `status` on the data channel and the console, then powers off.
pub fn finish(status: i32) -> ! {
    let _ = channel_send(kind::SHELL_EXIT, status.to_string().as_bytes());
    let mut marker = EXIT_PREFIX.to_vec();
    marker.extend_from_slice(status.to_string().as_bytes());
    marker.push(MARKER_END);
    console_write(&marker);
    power_off()
}
