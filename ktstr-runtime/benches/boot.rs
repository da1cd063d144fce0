//! Boot benchmark: for each kernel in `KTSTR_BENCH_KERNELS` (`;`-separated),
//! ktstr's backend booting the probe init (boot → /init, total) side by
//! side with plain `qemu-system-x86_64 -accel tcg` booting the same
//! kernel with a static C init that powers off.
//!
//! `KTSTR_BENCH_KERNELS=... cargo bench -p ktstr-runtime --bench boot`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ktstr_runtime::initramfs::Initramfs;
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
fn plain_qemu(kernel: &Path, initrd: &Path) -> (Duration, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1", "-nographic", "-no-reboot", "-kernel"])
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let Ok(list) = std::env::var("KTSTR_BENCH_KERNELS") else {
        println!("boot bench: set KTSTR_BENCH_KERNELS to ';'-separated kernel images");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let plain = static_initramfs(tmp.path());
    let probe = Initramfs::new(env!("CARGO_BIN_EXE_ktstr-probe-init")).unwrap().build_cached().unwrap();
    println!("{:<48} {:>10} {:>14} {:>10} {:>14} {:>10}", "kernel", "backend", "ktstr→/init", "total", "plain→/init", "total");
    for k in list.split(';').map(PathBuf::from) {
        let (mut ki, mut kt, mut pi, mut pt) = (vec![], vec![], vec![], vec![]);
        let mut backend = String::new();
        for _ in 0..RUNS {
            let r = Vm::builder()
                .kernel(&k)
                .initramfs(&probe)
                .topo(Topology::cpus(1))
                .memory_mib(256)
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap()
                .run()
                .unwrap();
            backend = r.backend.to_string();
            ki.push(r.timings.to_init.expect("probe init never announced itself"));
            kt.push(r.timings.total);
            let (i, t) = plain_qemu(&k, &plain);
            pi.push(i);
            pt.push(t);
        }
        let name = k.file_name().unwrap().to_string_lossy().into_owned();
        let name = if name == "bzImage" { k.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned() } else { name };
        println!(
            "{:<48} {:>10} {:>12}ms {:>8}ms {:>12}ms {:>8}ms",
            name,
            backend,
            median(ki).as_millis(),
            median(kt).as_millis(),
            median(pi).as_millis(),
            median(pt).as_millis()
        );
    }
    println!("(medians of {RUNS} runs, 1 vCPU, 256 MiB)");
}
