//! The snapshot ready point (`ktstr.ready` on the command line): a guest
//! that did what every test needs (mounts, data channel, every CPU
//! online), says READY and waits for its test on the inbox. The host
//! saves the VM here; every restore continues from this wait with the
//! test's payload ([`crate::snapshot::payload`]), which this init
//! unpacks, then it steps the clock to the host's, reseeds the random
//! pool, and execs the test's binary as PID 1.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Instant;

use crate::channel::kind;
use crate::snapshot::payload::{self, Header, Inbox};

/// Kernel command-line flag for a snapshot boot.
pub const READY_ARG: &str = "ktstr.ready";
/// Set for the test's `/init` after a restore: the filesystems are mounted.
pub const RESTORED_ENV: &str = "KTSTR_RESTORED";
/// The test (preset, `KTSTR_CPUS` count) a restored `/init` runs, from the
/// payload: the command line's `ktstr.test`/`ktstr.preset`/`ktstr.cpus`
/// are the ready VM's, not the test's.
pub const TEST_ENV: &str = "KTSTR_GUEST_TEST";
pub const PRESET_ENV: &str = "KTSTR_GUEST_PRESET";
pub const CPUS_ENV: &str = "KTSTR_GUEST_CPUS";

/// PID 1 at the ready point, after [`super::prepare`] gave `bringup`; never returns.
pub fn run(bringup: Result<super::cpus::Bringup, String>) -> ! {
    if let Err(e) = bringup {
        // No READY: the host sees a guest that powered off and boots cold.
        println!("ktstr: guest: CPU bring-up failed at the ready point: {e}");
        super::power_off()
    }
    let raw = super::CHANNEL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|c| c.raw());
    let Some((base, len)) = raw else {
        println!("ktstr: guest: no data channel at the ready point");
        super::power_off()
    };
    if let Some(Err(e)) = super::channel_send(kind::READY, b"ready") {
        println!("ktstr: guest: announcing the ready point failed: {e}");
        super::power_off()
    }
    // SAFETY: the channel's mapping stays alive (CHANNEL holds it) and the
    // uplink is idle from here on: only the inbox uses the region.
    let mut inbox = unsafe { Inbox::new(base, len) };
    let err = match receive(&mut inbox) {
        Ok((h, arrived)) => {
            inbox.finish();
            start_test(&h, arrived)
        }
        Err(e) => format!("receiving the test from the host: {e}"),
    };
    // Only reached when the test could not start: the host reports it.
    let v = crate::verdict::Verdict::fail(format!("restored guest: {err}"));
    println!("ktstr: guest: {err}");
    println!(
        "{}{}",
        crate::verdict::CONSOLE_MARKER,
        serde_json::to_string(&v).unwrap_or_default()
    );
    super::power_off()
}

/// Waits for the payload and unpacks it; returns its header and when it arrived.
fn receive(inbox: &mut Inbox) -> std::io::Result<(Header, Instant)> {
    let (h, rest) = inbox.header()?;
    let arrived = Instant::now();
    use std::io::Read;
    payload::extract(inbox.take(rest), Path::new("/"))?;
    Ok((h, arrived))
}

/// Clock, random pool, then exec; returns only the error.
fn start_test(h: &Header, arrived: Instant) -> String {
    // The host's time when it sent the header, plus what passed here since.
    let now = h.host_time_ns as u128 + arrived.elapsed().as_nanos();
    if let Err(e) = set_realtime(now) {
        return format!("stepping CLOCK_REALTIME to the host's: {e}");
    }
    if let Err(e) = reseed(&h.seed) {
        return format!("reseeding the random pool: {e}");
    }
    let mut cmd = std::process::Command::new("/init");
    cmd.env(RESTORED_ENV, "1").env(TEST_ENV, &h.test);
    if let Some(p) = &h.preset {
        cmd.env(PRESET_ENV, p);
    }
    if let Some(n) = h.cpus {
        cmd.env(CPUS_ENV, n.to_string());
    }
    format!("exec /init: {}", cmd.exec())
}

fn set_realtime(ns: u128) -> std::io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `struct rand_pool_info` with room for the seed.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; 64],
}

/// `_IOW('R', 0x03, int[2])` and `_IO('R', 0x07)` from `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes the host's bytes into the input pool (credited, so the kernel
/// takes them as real entropy) and forces the CRNG to reseed from it:
/// every restore then draws different random bytes, although all of them
/// resume the same saved pool.
fn reseed(seed: &[u8]) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    let mut info = PoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; 64],
    };
    let n = seed.len().min(info.buf.len());
    info.buf[..n].copy_from_slice(&seed[..n]);
    info.buf_size = n as libc::c_int;
    info.entropy_count = (n * 8) as libc::c_int;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of buf_size bytes of buf.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &info) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
