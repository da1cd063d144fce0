//! TCG stress: boots each kernel many times at 2 and 4 vCPUs under the QEMU
//! TCG backend with a spinner body on every vCPU, and counts guest crashes.
//! Hunts the rare multi-vCPU `Oops: int3` (docs/vmm.md) in either TCG mode:
//! `KTSTR_TCG_THREAD=single|multi` (default multi), and under multi either
//! boot mode: `KTSTR_TCG_BOOT_CPUS=one` (default: `maxcpus=1`, init onlines
//! the rest) or `all` (every CPU at boot, as before the fix).
//!
//! `KTSTR_BENCH_KERNELS="a;b" [KTSTR_STRESS_BOOTS=100] [KTSTR_STRESS_CPUS=2,4]
//!  [KTSTR_STRESS_SPIN_MS=300] cargo bench -p ktstr-runtime --bench tcg_stress`
//!
//! Exits 1 when any boot did not end in a clean power-off with every vCPU
//! having spun, so it can gate a release.

mod common;

use std::time::Duration;

use ktstr_runtime::initramfs::Initramfs;
use ktstr_runtime::vmm::qemu::{BootCpus, TcgThread};
use ktstr_runtime::vmm::{BackendKind, Topology, Vm};
use ktstr_runtime::vmm::{ExitKind, VmResult};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `None` when the boot is clean; else a one-line reason.
fn verdict(r: &VmResult, cpus: u32) -> Option<String> {
    let spin = r.console.lines().find(|l| l.contains("ktstr-probe: spin "));
    match (&r.exit, spin) {
        (ExitKind::PowerOff, Some(l)) => {
            let counts = l.split("iterations=[").nth(1).unwrap_or("").trim_end_matches(']');
            let n: Vec<u64> = counts.split(", ").filter_map(|c| c.trim().parse().ok()).collect();
            (n.len() != cpus as usize || n.contains(&0)).then(|| format!("spin counts wrong: {l}"))
        }
        (ExitKind::PowerOff, None) => Some("powered off without the spin line".into()),
        (other, _) => {
            let cause = r
                .console
                .lines()
                .find(|l| l.contains("Oops") || l.contains("BUG:") || l.contains("Kernel panic") || l.contains("RIP:"))
                .unwrap_or("(no oops line)");
            Some(format!("{other:?}: {}", cause.trim()))
        }
    }
}


fn main() {
    let Some(kernels) = common::kernels() else {
        eprintln!("tcg_stress: set KTSTR_BENCH_KERNELS to ';'-separated kernel images");
        std::process::exit(2);
    };
    let boots: usize = env_or("KTSTR_STRESS_BOOTS", 100);
    let spin_ms: u64 = env_or("KTSTR_STRESS_SPIN_MS", 300);
    let cpu_list = std::env::var("KTSTR_STRESS_CPUS").unwrap_or_else(|_| "2,4".into());
    let mode = TcgThread::from_env().unwrap_or_else(|e| panic!("{e}"));
    let boot = BootCpus::tcg_from_env().unwrap_or_else(|e| panic!("{e}"));
    let probe = Initramfs::new(env!("CARGO_BIN_EXE_ktstr-probe-init")).unwrap().build_cached().unwrap();
    println!("TCG stress: {boots} boots per kernel and vCPU count, spinner body {spin_ms} ms on every vCPU, TCG {mode:?}, boot CPUs {boot:?}");
    println!("{:<44} {:>5} {:>6} {:>6} {:>12} {:>12}", "kernel", "vcpus", "boots", "bad", "median ms", "max ms");
    let mut total_bad = 0;
    for k in kernels {
        for cpus in cpu_list.split(',').filter_map(|c| c.trim().parse::<u32>().ok()) {
            let mut times = Vec::with_capacity(boots);
            let mut bad = Vec::new();
            for i in 0..boots {
                let r = Vm::builder()
                    .kernel(&k)
                    .initramfs(&probe)
                    .topo(Topology::cpus(cpus))
                    .memory_mib(512)
                    .cmdline(format!("probe.spin_ms={spin_ms}"))
                    .timeout(Duration::from_secs(120))
                    .backend(BackendKind::QemuTcg)
                    .build()
                    .unwrap()
                    .run()
                    .unwrap();
                times.push(r.timings.total);
                if let Some(why) = verdict(&r, cpus) {
                    eprintln!("  {} x{cpus} boot {i}: {why}", common::label(&k));
                    if std::env::var_os("KTSTR_STRESS_KEEP").is_some() {
                        let f = std::env::temp_dir().join(format!("tcg-stress-{}-{cpus}-{i}.log", common::label(&k)));
                        let _ = std::fs::write(&f, &r.console);
                        eprintln!("  console saved to {}", f.display());
                    }
                    bad.push(why);
                }
            }
            times.sort();
            println!(
                "{:<44} {:>5} {:>6} {:>6} {:>12} {:>12}",
                common::label(&k),
                cpus,
                boots,
                bad.len(),
                times[times.len() / 2].as_millis(),
                times.last().unwrap().as_millis()
            );
            total_bad += bad.len();
        }
    }
    println!("total bad boots: {total_bad}");
    if total_bad > 0 {
        std::process::exit(1);
    }
}
