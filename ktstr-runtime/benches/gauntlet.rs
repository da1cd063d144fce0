//! What `--gauntlet` costs: for each preset, one VM running an empty test
//! body, timed as the body sees it (guest uptime when the body starts:
//! kernel boot, init, bringing CPUs online) and from the host (VM start
//! to power-off, and the whole `--exact` run with initramfs and setup).
//! The backend is whatever this host gives (`KTSTR_VMM`, else KVM when
//! its self-test passes, else QEMU TCG).
//!
//! `KTSTR_TEST_KERNEL=... cargo bench -p ktstr-runtime --bench gauntlet`
//! (`KTSTR_BENCH_PRESETS=tiny,llc4` picks presets; default: up to 64 vCPUs;
//! `KTSTR_BENCH_RUNS=N` repeats each, default 1).

use std::process::Command;
use std::time::Instant;

use ktstr_runtime::prelude::*;
use ktstr_runtime::preset::{self, PRESETS};

/// The body being timed: it only reports when it started.
#[ktstr_test(cpus = 1, timeout_s = 30)]
fn boot_cost(_ctx: &Ctx) -> Result<()> {
    let up = std::fs::read_to_string("/proc/uptime")?;
    println!("ktstr-bench: body at uptime {}", up.split_whitespace().next().unwrap_or("?"));
    Ok(())
}

fn main() {
    let Some(kernel) = std::env::var_os("KTSTR_TEST_KERNEL") else {
        eprintln!("gauntlet bench: set KTSTR_TEST_KERNEL to a kernel image");
        return;
    };
    let presets: Vec<&preset::Preset> = match std::env::var("KTSTR_BENCH_PRESETS") {
        Ok(v) if !v.is_empty() => preset::resolve(&v.split(',').map(String::from).collect::<Vec<_>>()).unwrap(),
        _ => PRESETS.iter().filter(|p| p.cpus() <= 64).collect(),
    };
    let runs: usize = std::env::var("KTSTR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let exe = std::env::current_exe().unwrap();
    let artifacts = tempfile::tempdir().unwrap();
    println!("{:<16} {:>5} {:>7} {:>9} {:>12} {:>10} {:>8}  backend", "preset", "vCPUs", "MiB", "to body", "VM total", "run total", "verdict");
    for p in presets {
        for _ in 0..runs {
            let name = format!("gauntlet/boot_cost/{}", p.name);
            let t0 = Instant::now();
            let out = Command::new(&exe)
                .args(["--exact", &name, "--nocapture"])
                .env("NEXTEST", "1")
                .env("KTSTR_TEST_KERNEL", &kernel)
                .env("KTSTR_ARTIFACT_DIR", artifacts.path())
                .env("NEXTEST_RUN_ID", format!("bench-{}", p.name))
                .output()
                .unwrap();
            let wall = t0.elapsed().as_secs_f64();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let body = stdout
                .lines()
                .chain(stderr.lines())
                .find_map(|l| l.split("ktstr-bench: body at uptime ").nth(1))
                .and_then(|s| s.trim().parse::<f64>().ok());
            let result = stderr
                .lines()
                .find_map(|l| l.strip_prefix("ktstr: artifacts: "))
                .and_then(|dir| std::fs::read_to_string(std::path::Path::new(dir.trim()).join("result.json")).ok())
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
            let vm_total = result.as_ref().and_then(|r| r["timings"]["vm_total_s"].as_f64());
            let backend = result.as_ref().and_then(|r| r["backend"].as_str().map(String::from)).unwrap_or_default();
            let verdict = result.as_ref().and_then(|r| r["outcome"].as_str().map(String::from)).unwrap_or_else(|| format!("exit {:?}", out.status.code()));
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}s"));
            println!(
                "{:<16} {:>5} {:>7} {:>9} {:>12} {:>10} {:>8}  {backend}",
                p.name,
                p.cpus(),
                p.memory_mib(),
                f(body),
                f(vm_total),
                format!("{wall:.2}s"),
                verdict
            );
        }
    }
}
