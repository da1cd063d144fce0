//! Ping-pong pairs: a wake-up chain through two pipes. Each message
//! carries the sender's CLOCK_MONOTONIC time; the receiver's delay from
//! that stamp to running again is its wake-up latency.

use std::time::Duration;

use super::tally::{now_ns, Tally};
use super::Role;

/// Waits for 8 bytes on `fd` until `deadline`; `None` when time ran out.
fn recv(fd: i32, deadline: u64) -> Option<u64> {
    loop {
        let now = now_ns();
        if now >= deadline {
            return None;
        }
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = ((deadline - now) / 1_000_000 + 1).min(i32::MAX as u64) as i32;
        // SAFETY: polling one fd we own.
        if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
            continue;
        }
        let mut b = [0u8; 8];
        // SAFETY: reading into a stack buffer of its size. Writes of 8 bytes
        // to a pipe are atomic, so a read gets a whole message.
        if unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) } == 8 {
            return Some(u64::from_le_bytes(b));
        }
    }
}

fn send(fd: i32) {
    let b = now_ns().to_le_bytes();
    // SAFETY: writing from a stack buffer; the pipe never fills (one message in flight).
    unsafe { libc::write(fd, b.as_ptr().cast(), 8) };
}

pub fn run(role: &Role, spin: Duration, deadline: u64, t: &mut Tally) {
    let pair = role.index / 2;
    let (ab, ba) = (role.res.pipes[2 * pair], role.res.pipes[2 * pair + 1]);
    let first = role.index.is_multiple_of(2);
    let (rx, tx) = if first { (ba.0, ab.1) } else { (ab.0, ba.1) };
    if first {
        t.tick();
        send(tx);
    }
    loop {
        t.pause();
        let Some(sent) = recv(rx, deadline) else { break };
        let now = t.tick();
        t.wake.record(now.saturating_sub(sent));
        t.wakeups += 1;
        t.iterations += 1;
        t.burn_for(spin.as_nanos() as u64, deadline);
        if now_ns() >= deadline {
            break;
        }
        send(tx);
    }
}
