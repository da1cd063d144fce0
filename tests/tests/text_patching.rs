//! Creating and removing cgroups patches no kernel text once init has run.
//!
//! Multi-threaded TCG can run a stale int3 after the kernel patches a live
//! site with every vCPU online (`Oops: int3`, docs/vmm.md). The first child
//! memcg or cpuset flips static keys, so guest init flips them while one
//! CPU is online (`guest::static_keys`). The check reads the kernel's text
//! through `/proc/kcore` before and after a cgroup comes and goes. It needs
//! a kernel with jump labels and kcore, the Debian cloud image (ktstr's own
//! kernel has neither), so the driver test below runs it there.

use std::io::{Read, Seek, SeekFrom};

use ktstr_runtime::prelude::*;

/// Bytes of the kernel's `_stext.._etext`, read through `/proc/kcore`.
fn kernel_text() -> Result<Vec<u8>> {
    let syms = std::fs::read_to_string("/proc/kallsyms")?;
    let addr = |name: &str| -> Result<u64> {
        let line = syms.lines().find(|l| l.split_whitespace().nth(2) == Some(name)).with_context(|| format!("no {name} in /proc/kallsyms"))?;
        let a = u64::from_str_radix(&line[..16], 16)?;
        ensure!(a != 0, "/proc/kallsyms hides addresses (kptr_restrict)");
        Ok(a)
    };
    let (start, end) = (addr("_stext")?, addr("_etext")?);
    let mut f = std::fs::File::open("/proc/kcore").context("/proc/kcore (CONFIG_PROC_KCORE)")?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)?;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(&eh, 32), u16_at(&eh, 54) as usize, u16_at(&eh, 56) as usize);
    let mut ph = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff))?;
    f.read_exact(&mut ph)?;
    for p in ph.chunks(phentsize) {
        let (kind, offset, vaddr, size) = (u32::from_le_bytes(p[0..4].try_into().unwrap()), u64_at(p, 8), u64_at(p, 16), u64_at(p, 32));
        if kind == 1 && vaddr <= start && end <= vaddr + size {
            let mut text = vec![0u8; (end - start) as usize];
            f.seek(SeekFrom::Start(offset + (start - vaddr)))?;
            f.read_exact(&mut text)?;
            return Ok(text);
        }
    }
    bail!("no /proc/kcore segment holds the kernel text {start:#x}..{end:#x}")
}

/// Run by the driver on the Debian kernel (`demo_`: not listed for a plain run).
#[ktstr_test(cpus = 2, memory_mib = 512, timeout_s = 60)]
fn demo_cgroups_patch_no_kernel_text(_ctx: &Ctx) -> Result<()> {
    let before = kernel_text()?;
    let cg = std::path::Path::new("/sys/fs/cgroup/ktstr-text-probe");
    std::fs::create_dir(cg).with_context(|| format!("create {}", cg.display()))?;
    let controllers = std::fs::read_to_string(cg.join("cgroup.controllers"))?;
    std::fs::remove_dir(cg)?;
    let after = kernel_text()?;
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    println!("kernel text {} bytes; a cgroup with {:?} came and went; {changed} bytes changed", before.len(), controllers.trim());
    ensure!(controllers.contains("memory") && controllers.contains("cpuset"), "the probe cgroup had controllers {:?}", controllers.trim());
    ensure!(changed == 0, "{changed} bytes of kernel text changed while a cgroup came and went: a static key was patched with every CPU online");
    Ok(())
}

mod driver {
    use ktstr_tests::driver::{child, debian_kernel};

    #[test]
    fn cgroups_patch_no_kernel_text_on_debian() {
        let Some(deb) = debian_kernel("a kernel with jump labels and /proc/kcore in KTSTR_DEBIAN_KERNEL") else { return };
        let name = "ktstr/demo_cgroups_patch_no_kernel_text";
        let r = child(name, &[("KTSTR_KERNEL_LIST", ""), ("KTSTR_KERNEL", ""), ("KTSTR_TEST_KERNEL", &deb)]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stderr.contains(&format!("ktstr: PASS: {name}")), "{}", r.stderr);
    }
}
