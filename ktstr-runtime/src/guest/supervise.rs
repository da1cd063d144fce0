//! Runs a test body in a forked child with a timeout, and turns how it
//! ended (result, error, panic, signal, hang) into a verdict.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ctx::Ctx;
use crate::registry::TestDef;
use crate::verdict::{Outcome, Verdict};

/// How a test body ended, as the child reports it to its parent.
#[derive(Debug, Serialize, Deserialize)]
pub enum BodyEnd {
    Ok,
    Err(String),
    Panic(String),
    Skip(String),
}

/// A test body returns `Err(Skip(..).into())` to skip (e.g. a kernel
/// feature it needs is missing). Never inverted by `expect_err`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Skip(pub String);

static PANIC_AT: Mutex<Option<String>> = Mutex::new(None);

pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

fn body_in_child(def: &'static TestDef, in_guest: bool) -> BodyEnd {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(l) = info.location() {
            *PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{}:{}", l.file(), l.line()));
        }
        prev(info);
    }));
    let ctx = Ctx::new(def, in_guest);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (def.func)(&ctx)));
    drop(ctx);
    match r {
        Ok(Ok(())) => BodyEnd::Ok,
        Ok(Err(e)) => match e.downcast_ref::<Skip>() {
            Some(s) => BodyEnd::Skip(s.0.clone()),
            None => BodyEnd::Err(format!("{e:#}")),
        },
        Err(p) => {
            let at = PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()).take();
            let msg = panic_message(&*p);
            BodyEnd::Panic(match at {
                Some(at) => format!("{msg} (at {at})"),
                None => msg,
            })
        }
    }
}

fn signal_name(sig: i32) -> String {
    // SAFETY: strsignal returns a static or thread-local string.
    let s = unsafe { libc::strsignal(sig) };
    if s.is_null() {
        format!("signal {sig}")
    } else {
        // SAFETY: non-null C string from libc.
        format!("signal {sig} ({})", unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy())
    }
}

/// Applies `expect_err` to how the body ended.
pub fn verdict_for(def: &TestDef, end: BodyEnd) -> Verdict {
    match (end, def.expect_err) {
        (BodyEnd::Ok, false) => Verdict::pass(),
        (BodyEnd::Ok, true) => Verdict::fail("expect_err: the test body returned Ok, but it was expected to fail"),
        (BodyEnd::Err(m), false) => Verdict::fail(format!("test body returned an error: {m}")),
        (BodyEnd::Panic(m), false) => Verdict::fail(format!("test body panicked: {m}")),
        (BodyEnd::Err(m), true) | (BodyEnd::Panic(m), true) => {
            Verdict::new(Outcome::Pass, format!("failed as expected: {m}"))
        }
        (BodyEnd::Skip(m), _) => Verdict::skip(m),
    }
}

/// Forks, runs the body in the child (its own process group), and waits
/// at most `def.timeout_s`. In the guest (`reap_all`), PID 1 also reaps
/// orphans re-parented to it.
pub fn run_body(def: &'static TestDef, reap_all: bool) -> Verdict {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Verdict::fail(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    let (rd, wr) = (fds[0], fds[1]);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // SAFETY: the child runs the body and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Verdict::fail(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: child side; plain syscalls and _exit.
        unsafe {
            libc::setpgid(0, 0);
            libc::close(rd);
        }
        // Whatever happens, the child must not unwind back into its
        // parent's code (in the guest that is PID 1's init).
        let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body_in_child(def, reap_all)))
            .unwrap_or_else(|p| BodyEnd::Panic(format!("ktstr harness panicked in the body process: {}", panic_message(&*p))));
        let bytes = serde_json::to_vec(&end).unwrap_or_default();
        let mut off = 0;
        while off < bytes.len() {
            // SAFETY: writing from a live buffer.
            let n = unsafe { libc::write(wr, bytes[off..].as_ptr().cast(), bytes.len() - off) };
            if n <= 0 {
                break;
            }
            off += n as usize;
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        // SAFETY: leave without running the parent's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: parent closes the child's end.
    unsafe {
        libc::setpgid(pid, pid);
        libc::close(wr);
    }
    // Drain the pipe concurrently so a large result never blocks the child.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a stack buffer.
            let n = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                out.extend_from_slice(&buf[..n as usize]);
            } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        // SAFETY: closing our fd.
        unsafe { libc::close(rd) };
        out
    });
    let limit = Duration::from_secs(def.timeout_s);
    let t0 = Instant::now();
    let mut status: Option<i32> = None;
    let mut timed_out = false;
    while status.is_none() {
        let mut st = 0;
        let target = if reap_all { -1 } else { pid };
        // SAFETY: waitpid on our children.
        let r = unsafe { libc::waitpid(target, &mut st, libc::WNOHANG) };
        if r == pid {
            status = Some(st);
            continue;
        }
        if r > 0 {
            continue; // an orphan reaped; look again at once
        }
        if t0.elapsed() >= limit {
            timed_out = true;
            // SAFETY: killing the body's process group, then reaping it.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut st, 0);
            }
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Workers the body left behind die with its group; the pipe then closes.
    // SAFETY: as above.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let bytes = reader.join().unwrap_or_default();
    let st = status.unwrap_or(0);
    if timed_out {
        return Verdict::fail(format!(
            "test body did not finish within its timeout of {}s (timeout_s); it was killed",
            def.timeout_s
        ));
    }
    if libc::WIFSIGNALED(st) {
        return Verdict::fail(format!("test body was killed by {}", signal_name(libc::WTERMSIG(st))));
    }
    match serde_json::from_slice::<BodyEnd>(&bytes) {
        Ok(end) => verdict_for(def, end),
        Err(_) => Verdict::fail(format!(
            "test body exited with status {} without reporting a result (did it call process::exit?)",
            libc::WEXITSTATUS(st)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expect_err_inverts_only_pass_and_fail() {
        let normal = TestDef { name: "t", ..TestDef::DEFAULT };
        let inverted = TestDef { name: "t", expect_err: true, ..TestDef::DEFAULT };
        assert_eq!(verdict_for(&normal, BodyEnd::Ok).outcome, Outcome::Pass);
        assert_eq!(verdict_for(&normal, BodyEnd::Err("e".into())).outcome, Outcome::Fail);
        assert_eq!(verdict_for(&normal, BodyEnd::Panic("p".into())).outcome, Outcome::Fail);
        assert_eq!(verdict_for(&inverted, BodyEnd::Ok).outcome, Outcome::Fail);
        assert_eq!(verdict_for(&inverted, BodyEnd::Err("e".into())).outcome, Outcome::Pass);
        assert_eq!(verdict_for(&inverted, BodyEnd::Panic("p".into())).outcome, Outcome::Pass);
        assert_eq!(verdict_for(&inverted, BodyEnd::Skip("s".into())).outcome, Outcome::Skip);
    }
}
