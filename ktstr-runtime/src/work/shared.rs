//! What the workers of one group share, set up by the parent before it
//! forks them: pipes for ping-pong pairs, a shared page for futex work.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64};

use anyhow::{Context, Result};

use super::Work;

/// Futex fan-out: one waker, the rest wait on `seq`.
#[repr(C)]
pub struct FanShared {
    pub seq: AtomicU32,
    pub acks: AtomicU32,
    pub stop: AtomicU32,
    /// When the waker asked for the wake-up (CLOCK_MONOTONIC ns).
    pub ts: AtomicU64,
}

/// Futex mutex: 0 free, 1 locked, 2 locked with waiters (Drepper's "Futexes Are Tricky").
#[repr(C)]
pub struct MutexShared {
    pub lock: AtomicU32,
    pub owner: AtomicI32,
    /// When the last unlock woke a waiter.
    pub wake_ts: AtomicU64,
}

pub struct GroupRes {
    /// Ping-pong: pair k sends on `pipes[2k]` (a→b) and `pipes[2k+1]` (b→a), as (read, write).
    pub pipes: Vec<(i32, i32)>,
    shm: *mut libc::c_void,
}

const SHM_LEN: usize = 4096;

fn pipe() -> Result<(i32, i32)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2 for ping-pong workers");
    }
    Ok((fds[0], fds[1]))
}

impl GroupRes {
    pub fn new(work: &Work, n: usize) -> Result<Self> {
        let mut r = GroupRes { pipes: Vec::new(), shm: std::ptr::null_mut() };
        match work {
            Work::PingPong { .. } => {
                for _ in 0..n {
                    r.pipes.push(pipe()?);
                }
            }
            Work::FanOut { .. } | Work::Mutex { .. } => {
                // SAFETY: a fresh anonymous shared mapping; checked below.
                let p = unsafe {
                    libc::mmap(std::ptr::null_mut(), SHM_LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
                };
                if p == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error()).context("mmap a shared page for futex workers");
                }
                r.shm = p;
            }
            _ => {}
        }
        Ok(r)
    }

    pub fn fan(&self) -> &FanShared {
        assert!(!self.shm.is_null());
        // SAFETY: a zeroed, page-aligned shared page outlives `self`; all-zero is a valid FanShared.
        unsafe { &*(self.shm as *const FanShared) }
    }

    pub fn mutex(&self) -> &MutexShared {
        assert!(!self.shm.is_null());
        // SAFETY: as for `fan`.
        unsafe { &*(self.shm as *const MutexShared) }
    }
}

impl Drop for GroupRes {
    /// The parent drops its copies once the children are forked.
    fn drop(&mut self) {
        for (r, w) in self.pipes.drain(..) {
            // SAFETY: closing fds we created.
            unsafe {
                libc::close(r);
                libc::close(w);
            }
        }
        if !self.shm.is_null() {
            // SAFETY: unmapping the page we mapped; children keep their own mapping.
            unsafe { libc::munmap(self.shm, SHM_LEN) };
        }
    }
}
