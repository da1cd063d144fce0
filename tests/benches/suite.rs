//! Whole-suite snapshot benchmark: the examples suite's VM tests on every
//! kernel in `KTSTR_BENCH_KERNELS` (`;`-separated images), run end to end
//! by `cargo nextest` three ways in each round: snapshots off, snapshots on
//! with an empty store (this run writes every save it uses), and on again
//! with that store warm (as every later run of the same kernels finds it).
//! Prints each round's wall times and the medians over
//! `KTSTR_BENCH_ROUNDS` rounds (default 3); goal: on ≤ 0.5 × off.
//!
//! `KTSTR_BENCH_KERNELS=a;b cargo bench -p ktstr-tests --bench suite`

#[path = "../../ktstr-runtime/benches/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::median;

/// The suite: the examples binary's VM tests (host-only ones run once
/// either way and are left out).
const FILTER: &str = "test(/^ktstr\\//)";

struct Mode {
    name: &'static str,
    snapshot: &'static str,
}

/// In this order: the warm run finds the saves the empty-store run wrote.
const MODES: [Mode; 3] = [
    Mode { name: "off", snapshot: "0" },
    Mode { name: "on, empty store", snapshot: "1" },
    Mode { name: "on, warm store", snapshot: "1" },
];

/// `label=path;…` with labels `k0`, `k1`, … (the suite's names do not matter here).
fn kernel_list(kernels: &[PathBuf]) -> String {
    kernels.iter().enumerate().map(|(i, k)| format!("k{i}={}", k.display())).collect::<Vec<_>>().join(";")
}

/// One run of the suite with `cache` as the cache root (where saves live);
/// its wall time and how many tests passed, or why it failed.
fn run_suite(list: &str, mode: &Mode, cache: &Path) -> Result<(Duration, usize), String> {
    let t = Instant::now();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["nextest", "run", "-p", "ktstr-tests", "--test", "examples", "--no-fail-fast", "-E", FILTER])
        .env("KTSTR_KERNEL_LIST", list)
        .env("KTSTR_SNAPSHOT", mode.snapshot)
        .env("KTSTR_CACHE_DIR", cache)
        // A skip exits 0: it must not pass for a fast test.
        .env("KTSTR_NO_SKIP_MODE", "1")
        .env_remove("KTSTR_TEST_KERNEL")
        .env_remove("KTSTR_TEST_KERNELS")
        .output()
        .map_err(|e| format!("cargo nextest: {e}"))?;
    let wall = t.elapsed();
    let text = String::from_utf8_lossy(&out.stderr);
    let summary = text.lines().find(|l| l.contains("Summary [")).unwrap_or("").trim().to_string();
    if !out.status.success() {
        return Err(format!("the suite failed ({}):\n{}", mode.name, tail(&text, 30)));
    }
    // "Summary [  14.0s] 16 tests run: 16 passed, 3 skipped"
    let passed = summary
        .split(": ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no nextest summary in the output:\n{}", tail(&text, 10)))?;
    Ok((wall, passed))
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

fn main() {
    let Some(kernels) = common::kernels() else {
        println!("suite bench: set KTSTR_BENCH_KERNELS to ';'-separated kernel images");
        return;
    };
    let rounds: usize = std::env::var("KTSTR_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let list = kernel_list(&kernels);
    for k in &kernels {
        println!("kernel: {}", k.display());
    }
    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); MODES.len()];
    let mut tests = None;
    for round in 1..=rounds {
        // One store per round: "empty" starts it, "warm" reuses it.
        let store = tempfile::tempdir().expect("a temp dir");
        let mut line = format!("round {round}:");
        for (i, mode) in MODES.iter().enumerate() {
            let cache = store.path().join(mode.snapshot);
            match run_suite(&list, mode, &cache) {
                Ok((wall, passed)) => {
                    // Every mode runs the same tests, or the walls do not compare.
                    if *tests.get_or_insert(passed) != passed {
                        eprintln!("suite bench: {} passed {passed} tests, an earlier run {}", mode.name, tests.unwrap_or(0));
                        std::process::exit(1);
                    }
                    walls[i].push(wall);
                    line += &format!("  {} {:.1}s", mode.name, wall.as_secs_f64());
                }
                Err(e) => {
                    eprintln!("suite bench: {e}");
                    std::process::exit(1);
                }
            }
        }
        println!("{line}");
    }
    let off = median(walls[0].clone()).as_secs_f64();
    println!("{:<18} {:>9} {:>7}", "snapshots", "wall", "× off");
    for (mode, w) in MODES.iter().zip(walls) {
        let w = median(w).as_secs_f64();
        println!("{:<18} {:>8.1}s {:>7.2}", mode.name, w, w / off);
    }
    println!(
        "(medians of {rounds} rounds; {} tests each run: the VM tests once per kernel ({} kernels), host-only ones once; as many at a time as nextest runs here; goal: on ≤ 0.50 × off)",
        tests.unwrap_or(0),
        kernels.len()
    );
}
