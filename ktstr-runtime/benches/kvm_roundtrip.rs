//! KVM backend micro-guest round trip: create the VM (RAM, irqchip, PIT,
//! UARTs, vCPU), load a few instructions, run until the guest's PIO exit
//! and power-off, tear down. `cargo bench -p ktstr-runtime --bench kvm_roundtrip`.

use std::time::{Duration, Instant};

use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, S5_POWER_OFF};
use ktstr_runtime::vmm::kvm::asm::Asm;
use ktstr_runtime::vmm::kvm::devices::TEST_PORT;
use ktstr_runtime::vmm::kvm::memory::RAW_CODE;
use ktstr_runtime::vmm::kvm::Machine;
use ktstr_runtime::vmm::{ExitKind, Topology};

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{name:<28} min {:>8.1} µs  median {:>8.1} µs  mean {:>8.1} µs  max {:>8.1} µs  (n={})",
        us(v[0]),
        us(v[v.len() / 2]),
        us(mean),
        us(v[v.len() - 1]),
        v.len()
    );
}

fn main() {
    let iters: usize = std::env::var("KTSTR_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let mut code = Asm::new(RAW_CODE);
    code.outl(TEST_PORT, 0x600d).outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();
    let code = code.finish();

    let (mut total, mut create, mut run, mut first_exit, mut teardown) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..iters + 3 {
        let t0 = Instant::now();
        let mut m = match Machine::new(Topology::cpus(1), 64) {
            Ok(m) => m,
            Err(e) => {
                println!("kvm_roundtrip: skipped, KVM not usable here: {e}");
                return;
            }
        };
        m.load_raw(&code).unwrap();
        let t1 = Instant::now();
        let out = m.run(Duration::from_secs(10)).unwrap();
        let t2 = Instant::now();
        assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
        assert_eq!(out.test_values(), vec![0x600d]);
        let exit_at = out.port_writes[0].at;
        let (stop_seen, td) = (out.run_time, out.teardown);
        drop(out);
        let t3 = Instant::now();
        if i >= 3 {
            // The first rounds warm page caches and the signal handler.
            create.push(t1 - t0);
            run.push(stop_seen);
            teardown.push(td);
            let _ = t2;
            first_exit.push(exit_at - t1);
            total.push(t3 - t0);
        }
    }
    println!("KVM micro-guest round trip (1 vCPU, 64 MiB; create VM -> guest PIO exit -> power-off -> teardown)");
    stats("create + load", create);
    stats("run start -> guest PIO exit", first_exit);
    stats("run start -> power-off seen", run);
    stats("teardown (join, close VM)", teardown);
    stats("round trip total", total);
    let api: Vec<Duration> = (0..10).filter_map(|_| ktstr_runtime::vmm::kvm::micro_guest_roundtrip().ok()).collect();
    if !api.is_empty() {
        stats("kvm::micro_guest_roundtrip()", api);
    }
}
