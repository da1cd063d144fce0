//! Guest CPU bring-up from init.
//!
//! The TCG backend boots with `maxcpus=1` so the kernel's boot-time text
//! patching (static keys flipped by late initcalls) runs with no second
//! vCPU executing that text: multi-threaded TCG can keep a stale
//! translation of a patched site and later execute a breakpoint that the
//! kernel already removed (`Oops: int3`, docs/vmm.md). Init then brings
//! every present CPU online before anything else runs, and gives the new
//! CPUs the fair-server parameters a boot-time CPU gets (6.12 sets them
//! only for CPUs online at boot; see [`restore_fair_servers`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CPU_DIR: &str = "/sys/devices/system/cpu";
const FAIR_SERVER_DIR: &str = "/sys/kernel/debug/sched/fair_server";

/// Parses a kernel CPU list (`0-3,5,7-8`).
pub fn parse_list(s: &str) -> Result<Vec<u32>, String> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list {s:?}");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(cpus)
}

/// What [`online_all`] did.
#[derive(Debug, Default)]
pub struct Bringup {
    /// CPUs this call brought online.
    pub onlined: Vec<u32>,
    /// Of those, the CPUs whose fair server was given the boot CPU's parameters.
    pub fair_servers: Vec<u32>,
    pub took: Duration,
}

/// CPUs listed in `present` but not in `online`, under `root`.
pub fn offline_present(root: &Path) -> Result<Vec<u32>, String> {
    let read = |f: &str| std::fs::read_to_string(root.join(f)).map_err(|e| format!("reading {}/{f}: {e}", root.display()));
    let present = parse_list(&read("present")?)?;
    let online = parse_list(&read("online")?)?;
    Ok(present.into_iter().filter(|c| !online.contains(c)).collect())
}

/// Brings every present, offline CPU online (in CPU order; the kernel
/// serialises hotplug anyway), then restores their fair servers (needs
/// debugfs mounted). An error names the CPU and the errno.
pub fn online_all() -> Result<Bringup, String> {
    online_all_in(Path::new(CPU_DIR), Path::new(FAIR_SERVER_DIR))
}

/// Writes CPU `cpu`'s `online` file (hotplug). An error names the CPU,
/// the file and the errno, or says the CPU cannot be hot-plugged.
pub fn set_online(cpu: u32, on: bool) -> Result<(), String> {
    set_online_in(Path::new(CPU_DIR), cpu, on)
}

/// Brings `cpus` online (with [`with_ticker`], as init does at boot) and
/// restores their fair servers; returns the CPUs whose fair server was set.
pub fn online(cpus: &[u32]) -> Result<Vec<u32>, String> {
    online_in(Path::new(CPU_DIR), Path::new(FAIR_SERVER_DIR), cpus)
}

fn set_online_in(root: &Path, cpu: u32, on: bool) -> Result<(), String> {
    let what = if on { "online" } else { "offline" };
    let f = root.join(format!("cpu{cpu}/online"));
    if !f.exists() {
        return Err(format!("bringing CPU {cpu} {what}: {} does not exist: CPU {cpu} cannot be hot-plugged on this kernel (CPU 0 usually cannot)", f.display()));
    }
    std::fs::write(&f, if on { "1" } else { "0" }).map_err(|e| format!("bringing CPU {cpu} {what} ({}): {e}", f.display()))
}

fn online_in(root: &Path, fair_dir: &Path, cpus: &[u32]) -> Result<Vec<u32>, String> {
    with_ticker(|| cpus.iter().try_for_each(|&cpu| set_online_in(root, cpu, true)))?;
    restore_fair_servers(fair_dir, cpus)
}

/// 6.12's fair server (the deadline server that keeps 50 ms/s for normal
/// tasks beside RT hogs) gets its parameters for the CPUs online at boot
/// only; a CPU onlined later reads runtime 0 and period 0, and a SCHED_FIFO
/// hog there starves normal tasks outright. Copies the boot CPU's period
/// and runtime to each such CPU (period first: runtime may not exceed it).
/// Nothing to do on kernels without the debugfs files or whose new CPUs
/// already have parameters.
pub fn restore_fair_servers(dir: &Path, onlined: &[u32]) -> Result<Vec<u32>, String> {
    let read = |cpu: u32, f: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(format!("cpu{cpu}/{f}"))).ok()?.trim().parse().ok()
    };
    let Some(boot) = (0..).take(4096).find(|c| !onlined.contains(c) && dir.join(format!("cpu{c}")).is_dir()) else {
        return Ok(Vec::new());
    };
    let (Some(period), Some(runtime)) = (read(boot, "period"), read(boot, "runtime")) else {
        return Ok(Vec::new());
    };
    let mut fixed = Vec::new();
    for &cpu in onlined {
        if read(cpu, "period") != Some(0) {
            continue;
        }
        for (f, v) in [("period", period), ("runtime", runtime)] {
            let p = dir.join(format!("cpu{cpu}/{f}"));
            std::fs::write(&p, v.to_string())
                .map_err(|e| format!("setting CPU {cpu}'s fair server {f} to {v} ({}): {e}", p.display()))?;
        }
        fixed.push(cpu);
    }
    Ok(fixed)
}

fn online_all_in(root: &Path, fair_dir: &Path) -> Result<Bringup, String> {
    let start = Instant::now();
    let offline = offline_present(root)?;
    if offline.is_empty() {
        return Ok(Bringup::default());
    }
    let fair_servers = online_in(root, fair_dir, &offline)?;
    Ok(Bringup { onlined: offline, fair_servers, took: start.elapsed() })
}

/// Runs `f` (a CPU bring-up) with a spinning thread beside it. A new CPU
/// calibrates its delay loop against jiffies; with the boot CPU idle
/// (tickless) while it waits for the new one, jiffies stall and each
/// bring-up took 1-2 s on Debian's HZ=250 kernel; a spinner keeps its tick.
pub fn with_ticker<T>(f: impl FnOnce() -> T) -> T {
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let r = f();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_ranges_and_singles() {
        assert_eq!(parse_list("0-3,5,7-8\n").unwrap(), vec![0, 1, 2, 3, 5, 7, 8]);
        assert_eq!(parse_list("0").unwrap(), vec![0]);
        assert_eq!(parse_list("\n").unwrap(), Vec::<u32>::new());
        assert!(parse_list("3-1").is_err());
        assert!(parse_list("a").is_err());
    }

    #[test]
    fn onlines_exactly_the_present_offline_cpus() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("present"), "0-3\n").unwrap();
        std::fs::write(d.path().join("online"), "0,2\n").unwrap();
        for c in 0..4 {
            std::fs::create_dir(d.path().join(format!("cpu{c}"))).unwrap();
        }
        // Like sysfs: the offline CPUs have an `online` file reading 0.
        for c in [1, 3] {
            std::fs::write(d.path().join(format!("cpu{c}/online")), "0\n").unwrap();
        }
        let b = online_all_in(d.path(), &d.path().join("no-fair-server")).unwrap();
        assert_eq!(b.onlined, vec![1, 3]);
        for c in [1, 3] {
            assert_eq!(std::fs::read_to_string(d.path().join(format!("cpu{c}/online"))).unwrap(), "1");
        }
        assert!(!d.path().join("cpu0/online").exists() && !d.path().join("cpu2/online").exists());
    }

    #[test]
    fn new_cpus_get_the_boot_cpus_fair_server() {
        let d = tempfile::tempdir().unwrap();
        let put = |cpu: u32, period: &str, runtime: &str| {
            let c = d.path().join(format!("cpu{cpu}"));
            std::fs::create_dir_all(&c).unwrap();
            std::fs::write(c.join("period"), period).unwrap();
            std::fs::write(c.join("runtime"), runtime).unwrap();
        };
        put(0, "1000000000\n", "50000000\n");
        put(1, "0\n", "0\n");
        put(2, "1000000000\n", "40000000\n");
        assert_eq!(restore_fair_servers(d.path(), &[1, 2]).unwrap(), vec![1]);
        let get = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!((get("cpu1/period"), get("cpu1/runtime")), ("1000000000".into(), "50000000".into()));
        assert_eq!(get("cpu2/runtime"), "40000000\n", "a CPU with parameters is left alone");
        assert_eq!(restore_fair_servers(&d.path().join("absent"), &[1]).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn a_cpu_that_cannot_go_online_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("present"), "0-1").unwrap();
        std::fs::write(d.path().join("online"), "0").unwrap();
        let e = online_all_in(d.path(), &d.path().join("no-fair-server")).unwrap_err();
        assert!(e.starts_with("bringing CPU 1 online"), "{e}");
    }

    #[test]
    fn hotplug_of_a_cpu_without_an_online_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = set_online_in(d.path(), 0, false).unwrap_err();
        assert!(e.starts_with("bringing CPU 0 offline") && e.contains("CPU 0 cannot be hot-plugged"), "{e}");
    }
}
