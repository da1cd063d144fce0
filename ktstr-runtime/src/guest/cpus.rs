//! Guest CPU bring-up from init.
//!
//! The TCG backend boots with `maxcpus=1` so the kernel's boot-time text
//! patching (static keys flipped by late initcalls) runs with no second
//! vCPU executing that text: multi-threaded TCG can keep a stale
//! translation of a patched site and later execute a breakpoint that the
//! kernel already removed (`Oops: int3`, docs/vmm.md). Init then brings
//! every present CPU online before anything else runs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CPU_DIR: &str = "/sys/devices/system/cpu";

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
/// serialises hotplug anyway). An error names the CPU and the errno.
pub fn online_all() -> Result<Bringup, String> {
    online_all_in(Path::new(CPU_DIR))
}

fn online_all_in(root: &Path) -> Result<Bringup, String> {
    let start = Instant::now();
    let offline = offline_present(root)?;
    if offline.is_empty() {
        return Ok(Bringup::default());
    }
    // A new CPU calibrates its delay loop against jiffies. With the boot CPU
    // idle (tickless) while it waits for the new one, jiffies stall and each
    // bring-up took 1-2 s on Debian's HZ=250 kernel; a spinner keeps its tick.
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let result = offline.iter().try_for_each(|&cpu| {
        let f = root.join(format!("cpu{cpu}/online"));
        std::fs::write(&f, "1").map_err(|e| format!("bringing CPU {cpu} online ({}): {e}", f.display()))
    });
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    result.map(|()| Bringup { onlined: offline, took: start.elapsed() })
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
        let b = online_all_in(d.path()).unwrap();
        assert_eq!(b.onlined, vec![1, 3]);
        for c in [1, 3] {
            assert_eq!(std::fs::read_to_string(d.path().join(format!("cpu{c}/online"))).unwrap(), "1");
        }
        assert!(!d.path().join("cpu0/online").exists() && !d.path().join("cpu2/online").exists());
    }

    #[test]
    fn a_cpu_that_cannot_go_online_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("present"), "0-1").unwrap();
        std::fs::write(d.path().join("online"), "0").unwrap();
        let e = online_all_in(d.path()).unwrap_err();
        assert!(e.starts_with("bringing CPU 1 online"), "{e}");
    }
}
