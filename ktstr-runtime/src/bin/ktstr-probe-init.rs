//! A minimal guest `/init` for VMM tests and benchmarks: reports what the
//! guest sees, optionally streams test data over the data channel, then
//! powers off (or misbehaves on request: `probe.mode=panic|hang|reboot`).
//! `probe.spin_ms=N` first spins a pinned thread on every online CPU for N ms
//! (the TCG stress benchmark's body: timer interrupts and idle wake-ups on
//! all vCPUs while the kernel is still patching its text).

use std::io::Write;

use ktstr_runtime::channel::{kind, GuestChannel};

fn mount(src: &str, dst: &str, fstype: &str) {
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let _ = std::fs::create_dir_all(dst);
    // SAFETY: plain mount(2) with NUL-terminated strings.
    unsafe { libc::mount(c(src).as_ptr(), c(dst).as_ptr(), c(fstype).as_ptr(), 0, std::ptr::null()) };
}

/// Deterministic test pattern the host regenerates to verify blobs.
pub fn pattern(chunk: u32, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9u32 ^ chunk.wrapping_mul(0x85eb_ca6b);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
}

/// One busy thread per online CPU, each pinned to its CPU, for `ms` from
/// the moment it first runs there (a vCPU may not be scheduled at once).
/// Returns the iterations each thread managed (all must be non-zero).
fn spin_all(ncpus: usize, ms: u64) -> Vec<u64> {
    let threads: Vec<_> = (0..ncpus)
        .map(|cpu| {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
                // sched_setaffinity only touch that local set.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
                let mut n = 0u64;
                while std::time::Instant::now() < until {
                    n = std::hint::black_box(n + 1);
                }
                n
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap_or(0)).collect()
}

fn main() {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut ch = GuestChannel::open();
    if let Ok(ch) = ch.as_mut() {
        let _ = ch.send(kind::INIT, b"ktstr-probe-init");
    }
    match ktstr_runtime::guest::cpus::online_all() {
        Ok(b) if !b.onlined.is_empty() => {
            println!("ktstr-probe: onlined {} CPUs in {} ms", b.onlined.len(), b.took.as_millis())
        }
        Ok(_) => {}
        Err(e) => println!("ktstr-probe: {e}"),
    }
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let nodes = std::fs::read_dir("/sys/devices/system/node")
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("node")).count())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let ncpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let line = format!("ktstr-probe: cpus={ncpus} online={} nodes={nodes} release={}", cpus.trim(), release.trim());
    println!("{line}");
    let _ = std::io::stdout().flush();
    if let Some(ms) = arg(&cmdline, "probe.spin_ms").and_then(|v| v.parse::<u64>().ok()) {
        let iters = spin_all(ncpus.max(1) as usize, ms);
        let spin = format!("ktstr-probe: spin ms={ms} iterations={iters:?}");
        println!("{spin}");
        if let Ok(ch) = ch.as_mut() {
            let _ = ch.send(kind::TEXT, spin.as_bytes());
        }
    }
    match &mut ch {
        Ok(ch) => {
            let _ = ch.send(kind::TEXT, line.as_bytes());
            if let Some(mib) = arg(&cmdline, "probe.blob_mib").and_then(|v| v.parse::<u32>().ok()) {
                for i in 0..mib {
                    if let Err(e) = ch.send(kind::BLOB, &pattern(i, 1 << 20)) {
                        println!("ktstr-probe: blob {i}: {e}");
                        break;
                    }
                }
            }
        }
        Err(e) => println!("ktstr-probe: no data channel: {e}"),
    }
    match arg(&cmdline, "probe.mode") {
        Some("panic") => std::process::exit(3), // PID 1 exiting panics the kernel
        Some("hang") => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        // SAFETY: reboot(2) as PID 1.
        Some("reboot") => unsafe {
            libc::reboot(libc::RB_AUTOBOOT);
        },
        _ => unsafe {
            libc::reboot(libc::RB_POWER_OFF);
        },
    }
    std::process::exit(1);
}
