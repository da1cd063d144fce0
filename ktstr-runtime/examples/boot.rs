//! Boots a kernel with the probe init and prints the console and timings:
//! `cargo run -p ktstr-runtime --example boot -- KERNEL [CPUS] [EXTRA CMDLINE]`

use std::time::Duration;

use ktstr_runtime::initramfs::Initramfs;
use ktstr_runtime::vmm::{Topology, Vm};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let kernel = args.next().ok_or_else(|| anyhow::anyhow!("usage: boot KERNEL [CPUS] [EXTRA CMDLINE]"))?;
    let cpus: u32 = args.next().map(|c| c.parse()).transpose()?.unwrap_or(1);
    let extra: Vec<String> = args.collect();
    let probe = std::env::current_exe()?.parent().unwrap().parent().unwrap().join("ktstr-probe-init");
    let initrd = Initramfs::new(&probe)?.build_cached()?;
    let r = Vm::builder()
        .kernel(kernel)
        .initramfs(initrd)
        .topo(Topology::cpus(cpus))
        .cmdline(extra.join(" "))
        .timeout(Duration::from_secs(120))
        .build()?
        .run()?;
    println!("{}", r.console);
    println!("--- exit={:?} backend={} timings={:?}", r.exit, r.backend, r.timings);
    for m in &r.messages {
        println!("--- message kind={} {:?}", m.kind, m.text().chars().take(120).collect::<String>());
    }
    Ok(())
}
