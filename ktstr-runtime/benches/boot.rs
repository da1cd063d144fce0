//! Boot benchmark: for each kernel in `KTSTR_BENCH_KERNELS` (`;`-separated)
//! and vCPU count in `KTSTR_BENCH_CPUS` (default `1,2,4`), ktstr's backend
//! booting the probe init (boot → /init, total) side by side with plain
//! `qemu-system-x86_64` booting the same kernel with a static C init that
//! powers off. Under TCG, multi-vCPU rows run three ways: multi-threaded
//! TCG booting one CPU and onlining the rest from init (ktstr's default,
//! `boot=one`), multi-threaded with every CPU at boot (`boot=all`, before
//! the `Oops: int3` fix), and single-threaded (`KTSTR_TCG_THREAD=single`).
//!
//! `KTSTR_BENCH_KERNELS=... cargo bench -p ktstr-runtime --bench boot`

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::median;

use ktstr_runtime::initramfs::Initramfs;
use ktstr_runtime::vmm::qemu::{BootCpus, TcgThread, TCG_BOOT_CPUS_ENV, TCG_THREAD_ENV};
use ktstr_runtime::vmm::{Topology, Vm};

const RUNS: usize = 3;

const STATIC_INIT: &str = r#"
#include <stdio.h>
#include <unistd.h>
#include <sys/reboot.h>
int main(void) { puts("plain-init-reached"); fflush(stdout); reboot(RB_POWER_OFF); return 0; }
"#;

fn static_initramfs(dir: &Path) -> PathBuf {
    let src = dir.join("init.c");
    std::fs::write(&src, STATIC_INIT).unwrap();
    let bin = dir.join("init");
    let ok = Command::new("cc").args(["-static", "-O2", "-o"]).arg(&bin).arg(&src).status().unwrap();
    assert!(ok.success(), "cc -static failed (install libc6-dev)");
    let cpio = dir.join("plain.cpio");
    let bytes = Initramfs::new(&bin).unwrap().build().unwrap();
    std::fs::write(&cpio, bytes).unwrap();
    cpio
}

/// Plain QEMU: time to the init's line on the console, and to exit.
fn plain_qemu(kernel: &Path, initrd: &Path, cpus: u32, mode: TcgThread) -> (Duration, Duration) {
    let accel = mode.accel();
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-cpu", "max", "-m", "256", "-smp", &cpus.to_string(), "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let mut to_init = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        if line.contains("plain-init-reached") && to_init.is_none() {
            to_init = Some(t0.elapsed());
        }
    }
    child.wait().unwrap();
    (to_init.expect("plain init never ran"), t0.elapsed())
}


fn main() {
    let Some(kernels) = common::kernels() else {
        println!("boot bench: set KTSTR_BENCH_KERNELS to ';'-separated kernel images");
        return;
    };
    let cpu_list = common::cpu_counts("KTSTR_BENCH_CPUS", "1,2,4");
    let tmp = tempfile::tempdir().unwrap();
    let plain = static_initramfs(tmp.path());
    let probe = Initramfs::new(env!("CARGO_BIN_EXE_ktstr-probe-init")).unwrap().build_cached().unwrap();
    println!(
        "{:<40} {:>5} {:>14} {:>10} {:>13} {:>9} {:>13} {:>9}",
        "kernel", "vcpus", "tcg", "backend", "ktstr→/init", "total", "plain→/init", "total"
    );
    for k in kernels {
        for &cpus in &cpu_list {
            let modes: &[(TcgThread, BootCpus)] = if cpus > 1 {
                &[(TcgThread::Single, BootCpus::All), (TcgThread::Multi, BootCpus::All), (TcgThread::Multi, BootCpus::One)]
            } else {
                &[(TcgThread::Single, BootCpus::All)]
            };
            for &(mode, boot) in modes {
                // The backend reads the mode from the environment; nothing else runs yet.
                std::env::set_var(TCG_THREAD_ENV, if mode == TcgThread::Single { "single" } else { "multi" });
                std::env::set_var(TCG_BOOT_CPUS_ENV, if boot == BootCpus::One { "one" } else { "all" });
                let (mut ki, mut kt, mut pi, mut pt) = (vec![], vec![], vec![], vec![]);
                let mut backend = String::new();
                for _ in 0..RUNS {
                    let r = Vm::builder()
                        .kernel(&k)
                        .initramfs(&probe)
                        .topo(Topology::cpus(cpus))
                        .memory_mib(256)
                        .timeout(Duration::from_secs(120))
                        .build()
                        .unwrap()
                        .run()
                        .unwrap();
                    backend = r.backend.to_string();
                    ki.push(r.timings.to_init.expect("probe init never announced itself"));
                    kt.push(r.timings.total);
                    let (i, t) = plain_qemu(&k, &plain, cpus, mode);
                    pi.push(i);
                    pt.push(t);
                }
                let name = common::label(&k);
                println!(
                    "{:<40} {:>5} {:>14} {:>10} {:>11}ms {:>7}ms {:>11}ms {:>7}ms",
                    name,
                    cpus,
                    format!("{mode:?},boot={boot:?}").to_lowercase(),
                    backend,
                    median(ki).as_millis(),
                    median(kt).as_millis(),
                    median(pi).as_millis(),
                    median(pt).as_millis()
                );
            }
        }
    }
    std::env::remove_var(TCG_THREAD_ENV);
    std::env::remove_var(TCG_BOOT_CPUS_ENV);
    println!("(medians of {RUNS} runs, 256 MiB; `tcg` is QEMU's TCG threading, for ktstr and plain alike; boot= applies to ktstr only, plain QEMU brings up every CPU at boot)");
}
