//! Full-kernel boots through the QEMU TCG backend with the probe init.
//! Kernels come from `KTSTR_TEST_KERNELS` (`;`-separated image paths, set
//! by .ci/run); without it these tests skip (and fail under
//! KTSTR_NO_SKIP_MODE=1).

use std::path::PathBuf;
use std::time::Duration;

use ktstr_runtime::initramfs::Initramfs;
use ktstr_runtime::testing;
use ktstr_runtime::vmm::{BackendKind, ExitKind, Topology, Vm, VmResult};

/// The kernels to boot, or `None` (a skip) when none are named.
fn kernels() -> Option<Vec<PathBuf>> {
    let list = std::env::var("KTSTR_TEST_KERNELS").ok().filter(|v| !v.is_empty());
    let ks = list.map(|v| v.split(';').filter(|s| !s.is_empty()).map(PathBuf::from).collect::<Vec<_>>());
    testing::require(ks, "kernels in KTSTR_TEST_KERNELS", "set KTSTR_TEST_KERNELS=img1;img2 (.ci/run does)")
}

fn probe_initramfs() -> PathBuf {
    Initramfs::new(env!("CARGO_BIN_EXE_ktstr-probe-init")).unwrap().build_cached().unwrap()
}

fn boot(kernel: &PathBuf, topo: Topology, mem: u64, extra: &str, timeout: u64) -> VmResult {
    Vm::builder()
        .kernel(kernel)
        .initramfs(probe_initramfs())
        .topo(topo)
        .memory_mib(mem)
        .channel_mib(if extra.contains("blob") { 20 } else { 4 })
        .cmdline(extra)
        .timeout(Duration::from_secs(timeout))
        .backend(BackendKind::QemuTcg)
        .build()
        .unwrap()
        .run()
        .unwrap()
}

fn probe_line(r: &VmResult) -> String {
    r.messages
        .iter()
        .map(|m| m.text())
        .find(|t| t.starts_with("ktstr-probe:"))
        .unwrap_or_else(|| panic!("no probe line; exit {:?}; console tail:\n{}", r.exit, r.console_tail(30)))
}

#[test]
fn boots_with_requested_topology() {
    let Some(ks) = kernels() else { return };
    for k in ks {
        for (topo, cpus, nodes) in [
            (Topology::cpus(1), 1, 1),
            (Topology::cpus(2), 2, 1),
            (Topology::new(1, 2, 2, 1), 4, 1),
            (Topology::new(2, 1, 2, 1), 4, 2),
        ] {
            let r = boot(&k, topo, 512, "", 120);
            assert_eq!(r.exit, ExitKind::PowerOff, "{}: console:\n{}", k.display(), r.console_tail(30));
            let line = probe_line(&r);
            assert!(line.contains(&format!("cpus={cpus} ")), "{}: {line}", k.display());
            assert!(line.contains(&format!("nodes={nodes} ")), "{}: {line}", k.display());
            assert!(r.timings.to_init.is_some());
            eprintln!(
                "{} {topo:?}: to_init={:?} total={:?}",
                k.display(),
                r.timings.to_init.unwrap(),
                r.timings.total
            );
        }
    }
}

#[test]
fn sixteen_mib_over_the_channel() {
    let Some(ks) = kernels() else { return };
    for k in ks.into_iter().take(1) {
        let r = boot(&k, Topology::cpus(1), 512, "probe.blob_mib=16", 180);
        assert_eq!(r.exit, ExitKind::PowerOff, "console:\n{}", r.console_tail(30));
        let blobs: Vec<_> = r.messages.iter().filter(|m| m.kind == ktstr_runtime::channel::kind::BLOB).collect();
        assert_eq!(blobs.len(), 16, "console:\n{}", r.console_tail(30));
        for (i, b) in blobs.iter().enumerate() {
            assert_eq!(b.payload, pattern(i as u32, 1 << 20), "blob {i} differs");
        }
    }
}

#[test]
fn panic_hang_and_reboot_end_with_the_right_kind() {
    let Some(ks) = kernels() else { return };
    for k in ks.into_iter().take(1) {
        let r = boot(&k, Topology::cpus(1), 256, "probe.mode=panic", 120);
        assert_eq!(r.exit, ExitKind::Panic, "console:\n{}", r.console_tail(30));
        assert!(r.console_tail(40).contains("Kernel panic"));

        let t0 = std::time::Instant::now();
        let r = boot(&k, Topology::cpus(1), 256, "probe.mode=hang", 15);
        assert_eq!(r.exit, ExitKind::Timeout);
        assert!(t0.elapsed() < Duration::from_secs(25), "timeout took {:?}", t0.elapsed());
        assert!(r.console.contains("ktstr-probe:"), "console so far is returned");

        let r = boot(&k, Topology::cpus(1), 256, "probe.mode=reboot", 120);
        assert_eq!(r.exit, ExitKind::Reboot, "console:\n{}", r.console_tail(30));
    }
}

// Same generator as the probe init (kept in sync by the blob test itself).
fn pattern(chunk: u32, len: usize) -> Vec<u8> {
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

/// The backend measures how long the host kept the vCPU threads waiting
/// (TCG has no steal time): a VM whose vCPUs spin while this process runs
/// twice as many busy threads as the host has CPUs must show well over
/// the 10 % that makes a FAIL name host contention.
#[test]
fn host_contention_is_measured() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(ks) = kernels() else { return };
    let k = &ks[0];
    let quiet = boot(k, Topology::cpus(2), 512, "probe.spin_ms=500", 120);
    assert_eq!(quiet.exit, ExitKind::PowerOff, "console:\n{}", quiet.console_tail(30));
    let qw = quiet.timings.vcpu_wait.expect("the vCPU threads were sampled");
    println!("no hogs: vCPUs waited {qw:?} of {:?}", quiet.timings.total);

    let stop = Arc::new(AtomicBool::new(false));
    let n = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<_> = (0..n)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let busy = boot(k, Topology::cpus(2), 512, "probe.spin_ms=2000", 240);
    stop.store(true, Ordering::Relaxed);
    hogs.into_iter().for_each(|h| h.join().unwrap());
    assert_eq!(busy.exit, ExitKind::PowerOff, "console:\n{}", busy.console_tail(30));
    let waited = busy.timings.vcpu_wait.expect("sampled");
    let pct = ktstr_runtime::vmm::host_wait::wait_pct(waited, 2, busy.timings.total);
    println!("host contention: vCPUs waited {waited:?} of {:?} ({pct:.0}%)", busy.timings.total);
    assert!(pct > ktstr_runtime::vmm::host_wait::CONTENTION_PCT, "{n} host hogs, yet the vCPUs waited only {pct:.1}%");
}
