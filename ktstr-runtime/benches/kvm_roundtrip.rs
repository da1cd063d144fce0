//! KVM backend micro-guest round trip: create the VM (RAM, irqchip, PIT,
//! UARTs, vCPU), load a few instructions, run until the guest's PIO exit
//! and power-off, tear down; then snapshots of a micro-guest: the save
//! (pause to files written) and the restore (state file to a VM ready to
//! run; and on to the guest's power-off), at 64 MiB and 2 GiB of RAM.
//! `cargo bench -p ktstr-runtime --bench kvm_roundtrip`.

use std::time::{Duration, Instant};

use ktstr_runtime::vmm::kvm::acpi::{PM1A_CNT_PORT, S5_POWER_OFF};
use ktstr_runtime::channel::DOORBELL_PORT;
use ktstr_runtime::vmm::kvm::asm::{Asm, Cond, Reg};
use ktstr_runtime::vmm::kvm::snapshot::Files;
use ktstr_runtime::vmm::kvm::devices::TEST_PORT;
use ktstr_runtime::vmm::kvm::memory::RAW_CODE;
use ktstr_runtime::vmm::kvm::{Machine, SaveAt};
use vm_memory::{Bytes, GuestAddress};
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
    for (cpus, mib) in [(1, 64), (2, 2048)] {
        snapshots(cpus, mib, iters.min(20));
    }
}

const GO: u64 = 0x20_0000;

/// Touches 1 MiB, rings the doorbell, waits for the host's GO word, powers off.
fn snapshot_guest() -> Vec<u8> {
    let mut a = Asm::new(RAW_CODE);
    a.mov64(Reg::Rdi, 0x40_0000).mov32(Reg::Rcx, 256);
    let touch = a.label();
    a.bind(touch).store32(Reg::Rdi, 0, 0x5a5a).bytes(&[0x48, 0x81, 0xc7, 0, 0x10, 0, 0]); // add rdi, 4096
    a.dec32(Reg::Rcx).jcc(Cond::Ne, touch);
    a.outb(DOORBELL_PORT, 1).mov64(Reg::Rdi, GO);
    let spin = a.label();
    a.bind(spin).load64(Reg::Rax, Reg::Rdi, 0).cmp32(Reg::Rax, 0).jcc(Cond::E, spin);
    a.outl(TEST_PORT, 0x600d).outw(PM1A_CNT_PORT, S5_POWER_OFF).halt_forever();
    a.finish()
}

/// Medians of saving and restoring a `cpus`-vCPU, `mib` MiB micro-guest.
fn snapshots(cpus: u32, mib: u64, iters: usize) {
    let dir = tempfile::tempdir().unwrap();
    let f = Files::at(&dir.path().join("state"));
    let code = snapshot_guest();
    let (mut save, mut sizes) = (Vec::new(), None);
    for _ in 0..iters {
        let Ok(mut m) = Machine::new(Topology::cpus(cpus), mib) else {
            println!("kvm snapshots: skipped, KVM not usable here");
            return;
        };
        m.load_raw(&code).unwrap();
        let out = m.run_and_save(Duration::from_secs(30), SaveAt::Doorbells(1), &f).unwrap();
        let s = out.saved.unwrap_or_else(|| panic!("not saved: {:?}", out.cause));
        save.push(s.time);
        sizes = Some(s);
    }
    let (mut restore, mut to_power_off) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        let m = Machine::restore(&f).unwrap();
        restore.push(t.elapsed());
        m.memory().write_obj(1u64, GuestAddress(GO)).unwrap();
        let out = m.run(Duration::from_secs(30)).unwrap();
        assert_eq!(out.exit, ExitKind::PowerOff, "{:?}", out.cause);
        assert_eq!(out.test_values(), vec![0x600d]);
        to_power_off.push(t.elapsed() - out.teardown);
    }
    let s = sizes.unwrap();
    println!(
        "KVM micro-guest snapshot ({cpus} vCPU, {mib} MiB): state file {} B, RAM file {} MiB with {} KiB of data",
        s.state_bytes,
        s.ram_len >> 20,
        s.ram_bytes >> 10
    );
    stats("  save (pause -> files)", save);
    stats("  restore (files -> VM)", restore);
    stats("  restore -> guest power-off", to_power_off);
}
