//! QEMU backend exit classification with a hand-made boot image: a
//! minimal bzImage whose real-mode entry loads an empty IDT and raises
//! INT3, which the CPU can only answer with a triple fault. Needs no
//! kernel, so it always runs where qemu-system-x86_64 is installed.

use std::time::{Duration, Instant};

use ktstr_runtime::testing;
use ktstr_runtime::vmm::{BackendKind, ExitKind, Vm};

/// 1 setup sector after the boot sector, header fields per the x86 boot
/// protocol (setup_sects at 0x1f1, "HdrS" at 0x202, version at 0x206).
fn triple_fault_bzimage() -> Vec<u8> {
    let mut img = vec![0u8; 1536];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe] = 0x55;
    img[0x1ff] = 0xaa;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    // Real-mode entry at 0x200 is the 2-byte jump; point it at 0x280.
    img[0x200] = 0xeb;
    img[0x201] = (0x280 - 0x202) as u8;
    // cli; lidt [0x300] (6 zero bytes: limit 0); int3; hlt
    let code = [0xfa, 0x0f, 0x01, 0x1e, 0x00, 0x03, 0xcc, 0xf4];
    img[0x280..0x280 + code.len()].copy_from_slice(&code);
    img
}

fn have_qemu() -> bool {
    std::process::Command::new("qemu-system-x86_64").arg("--version").output().is_ok()
}

// One test function: the second half changes PATH, which is process-wide.
#[test]
fn triple_fault_and_missing_qemu() {
    triple_fault_is_classified();
    missing_qemu_is_one_clear_error();
}

fn triple_fault_is_classified() {
    if !testing::premise(have_qemu(), "qemu-system-x86_64", "apt-get install qemu-system-x86") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("bzImage");
    std::fs::write(&k, triple_fault_bzimage()).unwrap();
    let t0 = Instant::now();
    let r = Vm::builder()
        .kernel(&k)
        .memory_mib(128)
        .timeout(Duration::from_secs(30))
        .backend(BackendKind::QemuTcg)
        .build()
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(r.exit, ExitKind::TripleFault, "console: {}", r.console);
    assert!(t0.elapsed() < Duration::from_secs(20));
    eprintln!("triple fault classified in {:?}", t0.elapsed());
    assert!(r.messages.is_empty());
}

fn missing_qemu_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("bzImage");
    std::fs::write(&k, triple_fault_bzimage()).unwrap();
    let vm = Vm::builder().kernel(&k).memory_mib(128).backend(BackendKind::QemuTcg).build().unwrap();
    let old = std::env::var_os("PATH");
    std::env::set_var("PATH", dir.path());
    let err = vm.run().unwrap_err().to_string();
    if let Some(p) = old {
        std::env::set_var("PATH", p);
    }
    assert!(err.contains("qemu-system-x86_64 not found") && err.contains("apt-get install qemu-system-x86"), "{err}");
}
