//! Timeouts stop every vCPU thread and leave no thread or fd behind.
//! Its own test binary, so no other test's threads or fds blur the counts.

use std::time::{Duration, Instant};

use ktstr_runtime::vmm::kvm::asm::Asm;
use ktstr_runtime::vmm::kvm::memory::RAW_CODE;
use ktstr_runtime::vmm::kvm::serial::COM1_BASE;
use ktstr_runtime::vmm::kvm::{Cause, Machine};
use ktstr_runtime::testing;
use ktstr_runtime::vmm::{ExitKind, Topology};

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn kvm_timeout_stops_every_vcpu_without_leaks() {
    let Some(m) = testing::kvm(Machine::new(Topology::cpus(3), 64)) else { return };
    drop(m);
    let (fds, threads) = (fd_count(), thread_count());
    for round in 0..3 {
        let mut m = Machine::new(Topology::cpus(3), 64).unwrap();
        let mut a = Asm::new(RAW_CODE);
        a.puts(COM1_BASE, "spinning\n");
        let l = a.label();
        a.bind(l).jmp(l);
        m.load_raw(&a.finish()).unwrap();
        let t = Instant::now();
        let out = m.run(Duration::from_millis(300)).unwrap();
        let took = t.elapsed();
        assert_eq!(out.exit, ExitKind::Timeout, "{:?}", out.cause);
        assert_eq!(out.cause, Cause::Timeout);
        assert_eq!(out.console, "spinning\n", "console so far is kept");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "round {round}: {took:?}");
        drop(out);
        assert_eq!(thread_count(), threads, "round {round}: vCPU threads left behind");
        assert_eq!(fd_count(), fds, "round {round}: fds left open");
    }
}
