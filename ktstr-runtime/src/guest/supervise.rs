//! Runs a test body in a forked child with a timeout, and turns how it
//! ended (result, error, panic, signal, hang) into a verdict.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ctx::Ctx;
use crate::output::{self, Chunk, Stream};
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

/// What the body's process sends its supervisor: how it ended, and the
/// figures of every `ctx.run` it made (`Verdict::metrics`).
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    end: BodyEnd,
    #[serde(default)]
    metrics: serde_json::Value,
}

fn body_in_child(def: &'static TestDef, in_guest: bool) -> ChildReport {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(l) = info.location() {
            *PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{}:{}", l.file(), l.line()));
        }
        prev(info);
    }));
    let ctx = Ctx::new(def, in_guest);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (def.func)(&ctx)));
    let metrics = ctx.metrics();
    drop(ctx);
    let end = match r {
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
    };
    ChildReport { end, metrics }
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
    let mut fds = [[0; 2]; 3];
    for p in &mut fds {
        // SAFETY: pipe2 fills the array.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Verdict::fail(format!("pipe2: {}", std::io::Error::last_os_error()));
        }
    }
    let [[rd, wr], [out_rd, out_wr], [err_rd, err_wr]] = fds;
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = std::io::Write::flush(&mut std::io::stderr());
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
            // The body's stdout/stderr become the capture pipes (dup2
            // clears O_CLOEXEC on 1 and 2, so workers it execs inherit them).
            libc::dup2(out_wr, 1);
            libc::dup2(err_wr, 2);
            libc::close(out_rd);
            libc::close(err_rd);
            libc::close(out_wr);
            libc::close(err_wr);
        }
        // Whatever happens, the child must not unwind back into its
        // parent's code (in the guest that is PID 1's init).
        let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body_in_child(def, reap_all)))
            .unwrap_or_else(|p| ChildReport {
                end: BodyEnd::Panic(format!("ktstr harness panicked in the body process: {}", panic_message(&*p))),
                metrics: serde_json::Value::Null,
            });
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
    // SAFETY: parent closes the child's ends.
    unsafe {
        libc::setpgid(pid, pid);
        libc::close(wr);
        libc::close(out_wr);
        libc::close(err_wr);
    }
    let stop_output = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let output = {
        let stop = std::sync::Arc::clone(&stop_output);
        std::thread::spawn(move || capture_output([out_rd, err_rd], &stop, reap_all))
    };
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
    // Workers the body left behind die with its group; the pipes then close.
    // SAFETY: as above.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let bytes = reader.join().unwrap_or_default();
    stop_output.store(true, std::sync::atomic::Ordering::Release);
    let captured = output.join().unwrap_or_default();
    HOST_OUTPUT.with(|o| *o.borrow_mut() = captured);
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
    match serde_json::from_slice::<ChildReport>(&bytes) {
        Ok(r) => {
            let mut v = verdict_for(def, r.end);
            v.metrics = (!r.metrics.is_null()).then(|| Box::new(r.metrics));
            v
        }
        Err(_) => Verdict::fail(format!(
            "test body exited with status {} without reporting a result (did it call process::exit?)",
            libc::WEXITSTATUS(st)
        )),
    }
}

thread_local! {
    /// What the last [`run_body`] on this thread captured (host only; in
    /// the guest it went to the data channel).
    static HOST_OUTPUT: std::cell::RefCell<Vec<Chunk>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes the output the last [`run_body`] on this thread captured on the host.
pub fn take_host_output() -> Vec<Chunk> {
    HOST_OUTPUT.with(|o| std::mem::take(&mut *o.borrow_mut()))
}

/// Channel bytes kept free for the verdict and later messages.
const CHANNEL_RESERVE: usize = 512 * 1024;

/// Drains the body's stdout/stderr. In the guest each chunk goes to the
/// data channel (within a budget, see [`output::Budget`]), or to the
/// console without a channel; on the host it is echoed at once to our own
/// stdout/stderr (nextest captures them) and kept for `output.log`.
fn capture_output(fds: [std::os::fd::RawFd; 2], stop: &std::sync::atomic::AtomicBool, in_guest: bool) -> Vec<Chunk> {
    use std::io::Write;
    let mut kept = Vec::new();
    match in_guest.then(crate::guest::channel_capacity_left).flatten() {
        Some(left) => {
            let mut budget = output::Budget::new(left.saturating_sub(CHANNEL_RESERVE), |p: &[u8]| {
                let _ = crate::guest::channel_send(crate::channel::kind::OUTPUT, p);
            });
            output::drain(fds, stop, |s, b| budget.push(s, b));
            budget.finish();
        }
        None => output::drain(fds, stop, |s, b| {
            let _ = match s {
                Stream::Stdout => std::io::stdout().write_all(b).and_then(|_| std::io::stdout().flush()),
                _ => std::io::stderr().write_all(b),
            };
            if !in_guest {
                kept.push(Chunk { stream: s, bytes: b.to_vec() });
            }
        }),
    }
    kept
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
