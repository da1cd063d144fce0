//! The host terminal in raw mode for an interactive shell, restored
//! however we end: on drop (normal return, a panic unwinding), and from
//! a signal handler for the signals that would otherwise kill us with
//! the terminal still raw (SIGTERM, SIGHUP, SIGQUIT, SIGINT).
//! SIGKILL cannot be caught: `stty sane` (or `reset`) repairs the terminal then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The termios to put back; read by the signal handler.
static SAVED: Mutex<Option<(i32, libc::termios)>> = Mutex::new(None);
/// A copy the handler can read without locking (set once before raw mode).
static mut HANDLER_COPY: Option<(i32, libc::termios)> = None;
static RAW: AtomicBool = AtomicBool::new(false);

const SIGNALS: &[i32] = &[libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGINT];

/// Raw mode on `fd` until dropped.
pub struct RawTerminal {
    fd: i32,
    /// The dispositions our handler replaced, put back on drop.
    old: Vec<(i32, libc::sighandler_t)>,
}

/// `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal's rows and columns, when `fd` is one.
pub fn size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which we own.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointer is valid for the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

extern "C" fn restore_and_reraise(sig: libc::c_int) {
    // SAFETY: only async-signal-safe calls (tcsetattr, signal, raise); the
    // copy was written before the handler was installed and never after.
    unsafe {
        if let Some((fd, t)) = *std::ptr::addr_of!(HANDLER_COPY) {
            if RAW.load(Ordering::Acquire) {
                libc::tcsetattr(fd, libc::TCSANOW, &t);
            }
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

impl RawTerminal {
    /// Puts `fd` in raw mode (no echo, no line editing, no signals from
    /// keys: Ctrl-C is a byte for the guest); `None` when `fd` is no terminal.
    pub fn enter(fd: i32) -> std::io::Result<Option<Self>> {
        if !is_tty(fd) {
            return Ok(None);
        }
        // SAFETY: tcgetattr fills `orig`, which we own.
        let mut orig: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::tcgetattr(fd, &mut orig) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, orig));
        // SAFETY: written before any handler that reads it is installed;
        // one shell session per process, so it is never rewritten while live.
        unsafe { *std::ptr::addr_of_mut!(HANDLER_COPY) = Some((fd, orig)) };
        let mut old = Vec::new();
        for &s in SIGNALS {
            // SAFETY: installs a handler that only makes async-signal-safe calls.
            old.push((s, unsafe { libc::signal(s, restore_and_reraise as *const () as libc::sighandler_t) }));
        }
        let mut raw = orig;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        RAW.store(true, Ordering::Release);
        // SAFETY: tcsetattr with a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            RAW.store(false, Ordering::Release);
            let e = std::io::Error::last_os_error();
            drop(Self { fd, old });
            return Err(e);
        }
        Ok(Some(Self { fd, old }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some((fd, t)) = *SAVED.lock().unwrap_or_else(|e| e.into_inner()) {
            // SAFETY: tcsetattr with the termios saved from this fd.
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
            debug_assert_eq!(fd, self.fd);
        }
        RAW.store(false, Ordering::Release);
        for &(s, h) in &self.old {
            // SAFETY: puts back the disposition signal() returned.
            unsafe { libc::signal(s, h) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lflag(fd: i32) -> libc::tcflag_t {
        // SAFETY: tcgetattr fills a termios we own.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        t.c_lflag
    }

    /// A pseudo-terminal pair: (controller, terminal).
    fn pty() -> (i32, i32) {
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two descriptors; no name, termios or winsize.
        let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        (m, s)
    }

    const COOKED: libc::tcflag_t = libc::ICANON | libc::ECHO | libc::ISIG;

    #[test]
    fn raw_until_dropped_and_restored_when_a_signal_kills_us() {
        let (m, s) = pty();
        assert_eq!(lflag(s) & COOKED, COOKED, "a new pty is cooked");
        let raw = RawTerminal::enter(s).unwrap().expect("a pty is a terminal");
        assert_eq!(lflag(s) & COOKED, 0, "raw: no line editing, echo or signal keys");
        drop(raw);
        assert_eq!(lflag(s) & COOKED, COOKED, "restored on drop");
        assert!(RawTerminal::enter(-1).unwrap().is_none() && !is_tty(-1));

        // SIGTERM from elsewhere: the handler restores the terminal, then
        // the process dies of the signal as it would have.
        // SAFETY: the child only enters raw mode and raises a signal, then _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let r = RawTerminal::enter(s);
            let raw_in_child = lflag(s) & COOKED == 0;
            if r.is_ok() && raw_in_child {
                std::mem::forget(r);
                // SAFETY: raise in the child; the handler runs.
                unsafe { libc::raise(libc::SIGTERM) };
            }
            // SAFETY: leave the forked child without running the parent's destructors.
            unsafe { libc::_exit(3) };
        }
        let mut st = 0;
        // SAFETY: waits for the child we forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
        assert!(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGTERM, "child status {st:#x}");
        assert_eq!(lflag(s) & COOKED, COOKED, "restored by the signal handler");
        // SAFETY: our descriptors.
        unsafe {
            libc::close(m);
            libc::close(s);
        }
    }
}
