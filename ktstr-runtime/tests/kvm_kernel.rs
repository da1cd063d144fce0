//! Real kernels through the KVM backend.
//!
//! Loading (image, zero page / PVH start info, command line, entry
//! registers) is checked on any host with /dev/kvm. Booting runs only
//! where the KVM self-test passes; elsewhere it SKIPs with a banner,
//! because such a KVM (kvm_pvm, no nested virtualisation) cannot boot a
//! kernel in useful time.

use std::path::PathBuf;
use std::time::Duration;

use ktstr_runtime::discovery;
use ktstr_runtime::testing;
use ktstr_runtime::vmm::kvm::memory::{CMDLINE, ZERO_PAGE};
use ktstr_runtime::vmm::kvm::{selftest, Machine};
use ktstr_runtime::vmm::{ExitKind, Vm, VmError};
use vm_memory::{Bytes, GuestAddress};

fn kernel() -> Option<PathBuf> {
    match discovery::discover() {
        Ok(found) => Some(found.image),
        Err(e) => {
            testing::skip(&format!("a kernel ({e})"), "set KTSTR_TEST_KERNEL (.ci/run does)");
            None
        }
    }
}

#[test]
fn kvm_loads_a_real_kernel() {
    let Some(image) = kernel() else { return };
    let vm = Vm::builder().kernel(&image).memory_mib(256).cmdline("ktstr.test=1").build().unwrap();
    let mut cfg = vm.config.clone();
    cfg.vmlinux = None; // the bzImage path: 64-bit boot protocol
    let Some(mut m) = testing::kvm(Machine::new(cfg.topology, cfg.memory_mib)) else { return };
    if let Err(VmError::BadImage(e)) = m.load_kernel(&cfg) {
        // An ELF image without a PVH note is a legitimate refusal.
        assert!(e.contains("PVH"), "{e}");
        return;
    }
    let regs = m.bsp().get_regs().unwrap();
    let sregs = m.bsp().get_sregs().unwrap();
    let mem = m.memory();
    let cmd: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x228)).unwrap_or(0);
    if sregs.efer & 0x400 != 0 {
        // 64-bit boot protocol: RSI → zero page with the setup header.
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x202)).unwrap();
        assert_eq!(magic, 0x5372_6448, "HdrS in the zero page");
        assert_eq!(regs.rsi, ZERO_PAGE);
        assert_eq!(cmd as u64, CMDLINE);
        assert_eq!(regs.rip & 0xfff, 0x200, "64-bit entry is startup_32 + 0x200");
        assert_eq!((sregs.cs.selector, sregs.ds.selector, sregs.ss.selector), (0x10, 0x18, 0x18), "__BOOT_CS/__BOOT_DS");
        assert_eq!(sregs.cs.l, 1);
    } else {
        // PVH: RBX → hvm_start_info.
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!(magic, 0x336e_c578);
        assert_eq!(regs.rbx, ZERO_PAGE);
    }
    let mut line = vec![0u8; cfg.cmdline.len()];
    mem.read_slice(&mut line, GuestAddress(CMDLINE)).unwrap();
    assert_eq!(String::from_utf8(line).unwrap(), cfg.cmdline);
    assert!(cfg.cmdline.contains("ktstr.chan="));
}

#[test]
fn kvm_loads_a_real_vmlinux_through_pvh() {
    let Some(image) = kernel() else { return };
    let vm = Vm::builder().kernel(&image).memory_mib(512).build().unwrap();
    let Some(vmlinux) = testing::require(
        vm.config.vmlinux.clone(),
        &format!("a vmlinux beside {}", image.display()),
        "use a ktstr-built kernel (its cache entry keeps vmlinux)",
    ) else {
        return;
    };
    let Some(mut m) = testing::kvm(Machine::new(vm.config.topology, vm.config.memory_mib)) else { return };
    match m.load_kernel(&vm.config) {
        Ok(()) => {}
        Err(e) => panic!("loading {}: {e}", vmlinux.display()),
    }
    let regs = m.bsp().get_regs().unwrap();
    let sregs = m.bsp().get_sregs().unwrap();
    let pvh = sregs.efer & 0x400 == 0;
    if !testing::premise(pvh, &format!("a PVH entry in {} (the bzImage path was used)", vmlinux.display()), "build with CONFIG_PVH=y") {
        return;
    }
    // PVH: 32-bit protected mode, paging off, RBX → hvm_start_info.
    assert_eq!(sregs.cr0 & 0x8000_0001, 1);
    assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
    assert_eq!(regs.rbx, ZERO_PAGE);
    let mem = m.memory();
    let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
    let cmdline: u64 = mem.read_obj(GuestAddress(ZERO_PAGE + 24)).unwrap();
    let rsdp: u64 = mem.read_obj(GuestAddress(ZERO_PAGE + 32)).unwrap();
    assert_eq!((magic, cmdline), (0x336e_c578, CMDLINE));
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
    assert_eq!(&sig, b"RSD PTR ");
}

#[test]
fn kvm_boots_a_kernel_where_the_selftest_passes() {
    let Some(image) = kernel() else { return };
    let Some(verdict) = testing::kvm(selftest::verdict()) else { return };
    // Expected on kvm_pvm hosts (listed in .ci/expected-skips): kernels
    // run under QEMU TCG there.
    if !testing::premise(
        verdict.usable(),
        &format!("a KVM that passes the ktstr self-test ({verdict})"),
        "run on a host with hardware virtualisation",
    ) {
        return;
    }
    // No initramfs: the kernel boots until it cannot mount a root fs and
    // panics, which proves the whole path up to userspace hand-off.
    let vm = Vm::builder()
        .kernel(&image)
        .topology(1, 1, 2, 1)
        .memory_mib(256)
        .timeout(Duration::from_secs(120))
        .backend(ktstr_runtime::vmm::BackendKind::Kvm)
        .build()
        .unwrap();
    let r = vm.run().unwrap();
    assert!(r.console.contains("Linux version"), "{}", r.console_tail(40));
    assert_eq!(r.exit, ExitKind::Panic, "{}", r.console_tail(40));
}

/// Diagnostics: boot whatever KVM does here for KTSTR_KVM_TRY_SECS
/// (default 20) and show the console. `cargo test -- --ignored`.
#[test]
#[ignore]
fn kvm_kernel_boot_attempt() {
    let Some(image) = kernel() else { return };
    let secs = std::env::var("KTSTR_KVM_TRY_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let args = std::env::var("KTSTR_KVM_TRY_ARGS").unwrap_or_default();
    // KTSTR_KVM_TRY_TOPO=nodes,llcs,cores,threads
    let topo: Vec<u32> = std::env::var("KTSTR_KVM_TRY_TOPO")
        .unwrap_or_else(|_| "1,1,1,1".into())
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let mut vm = Vm::builder()
        .kernel(&image)
        .memory_mib(512)
        .cmdline(args)
        .topology(topo[0], topo[1], topo[2], topo[3])
        .build()
        .unwrap();
    if let Some(v) = std::env::var_os("KTSTR_TEST_VMLINUX") {
        vm.config.vmlinux = Some(v.into());
    }
    vm.config.timeout = Duration::from_secs(secs);
    let r = ktstr_runtime::vmm::kvm::run(&vm.config).unwrap();
    eprintln!("exit: {:?}\n--- console ---\n{}", r.exit, r.console_tail(400));
}
