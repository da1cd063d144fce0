//! Guest CPUID: KVM's supported set with the topology leaves rewritten
//! so the guest sees the requested NUMA/LLC/core/thread layout.
//!
//! APIC ids are packed as `package | core | thread` bit fields, one
//! package per LLC (node-major CPU numbering, as `Topology::node_of`).

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::vmm::Topology;

/// Bits needed to number `n` things (ceil(log2 n)).
pub fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub apic_id: u32,
    pub package: u32,
    pub core: u32,
    pub thread: u32,
    pub node: u32,
}

pub fn thread_bits(t: &Topology) -> u32 {
    bits_for(t.threads)
}

/// Bits below the package field of an APIC id.
pub fn package_shift(t: &Topology) -> u32 {
    bits_for(t.threads) + bits_for(t.cores)
}

pub fn placement(t: &Topology, cpu: u32) -> Placement {
    let thread = cpu % t.threads;
    let core = (cpu / t.threads) % t.cores;
    let package = cpu / (t.threads * t.cores);
    Placement {
        apic_id: (package << package_shift(t)) | (core << thread_bits(t)) | thread,
        package,
        core,
        thread,
        node: t.node_of(cpu),
    }
}

pub fn apic_id(t: &Topology, cpu: u32) -> u32 {
    placement(t, cpu).apic_id
}

fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Sharing mask for a cache level: L1/L2 per core, L3 per package (LLC).
fn cache_sharing(t: &Topology, level: u32) -> u32 {
    if level >= 3 {
        (1 << package_shift(t)) - 1
    } else {
        (1 << thread_bits(t)) - 1
    }
}

/// The entries for vCPU `cpu`, derived from KVM_GET_SUPPORTED_CPUID's.
pub fn for_vcpu(base: &[kvm_cpuid_entry2], t: &Topology, cpu: u32) -> Vec<kvm_cpuid_entry2> {
    let p = placement(t, cpu);
    let per_pkg = t.threads * t.cores;
    let tb = thread_bits(t);
    let shift = package_shift(t);
    let max_basic = base.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(base.len() + 3);
    for e in base {
        let mut e = *e;
        match e.function {
            0 => e.eax = e.eax.max(0xb),
            1 => {
                // The initial APIC id is 8 bits; leaves 0xb/0x1f carry all 32.
                e.ebx = (e.ebx & 0xffff) | ((1u32 << shift).max(per_pkg) << 16 & 0x00ff_0000) | ((p.apic_id & 0xff) << 24);
                e.edx |= 1 << 28; // HTT: EBX[23:16] is valid
                e.ecx |= 1 << 31; // running under a hypervisor
                e.ecx |= 1 << 21; // x2APIC: the in-kernel LAPIC emulates it
                // TSC-deadline timer: the in-kernel LAPIC emulates it, but
                // KVM_GET_SUPPORTED_CPUID leaves it to the VMM. Without it
                // Linux calibrates the LAPIC timer against the PIT, and
                // where that fails (slow or nested hosts) it has no per-CPU
                // timer and APs wait on broadcast ticks.
                e.ecx |= 1 << 24;
            }
            4 => {
                let level = (e.eax >> 5) & 7;
                if e.eax & 0x1f != 0 {
                    e.eax = (e.eax & 0x3fff) | (cache_sharing(t, level) << 14) | (((1 << bits_for(t.cores)) - 1) << 26);
                }
            }
            // Rebuilt below for every vCPU.
            0xb | 0x1f | 0x8000_0026 => continue,
            0x8000_0008 => e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (per_pkg - 1),
            0x8000_001d => {
                let level = (e.eax >> 5) & 7;
                if e.eax & 0x1f != 0 {
                    e.eax = (e.eax & !(0xfff << 14)) | (cache_sharing(t, level) << 14);
                }
            }
            0x8000_001e => {
                e.eax = p.apic_id;
                e.ebx = (e.ebx & !0xffff) | ((t.threads - 1) << 8) | (p.apic_id >> tb);
                e.ecx = (e.ecx & !0x7ff) | p.node;
            }
            _ => {}
        }
        out.push(e);
    }
    let levels = |leaf: u32| {
        [
            entry(leaf, 0, [tb, t.threads, 0x100, p.apic_id]),
            entry(leaf, 1, [shift, per_pkg, 0x201, p.apic_id]),
            entry(leaf, 2, [0, 0, 2, p.apic_id]),
        ]
    };
    out.extend(levels(0xb));
    if max_basic >= 0x1f {
        out.extend(levels(0x1f));
    }
    out
}

/// Reads the fields Linux derives topology from, for tests and debugging.
pub fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    entries.iter().copied().find(|e| e.function == function && e.index == index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<kvm_cpuid_entry2> {
        let mut v = vec![
            entry(0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            entry(1, 0, [0x00a0_0f11, 0x0000_0800, 0x8000_0000, 0x0000_0001]),
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0x8000_0008, 0, [0x3030, 0, 0x7003, 0]),
            entry(0x8000_001e, 0, [9, 0x100, 0, 0]),
        ];
        // L1d, L1i, L2, L3 in 0x8000001D and leaf 4 form.
        for (i, (ty, lvl)) in [(1, 1), (2, 1), (3, 2), (3, 3)].into_iter().enumerate() {
            let eax = ty | (lvl << 5) | (0x7 << 14);
            v.push(entry(0x8000_001d, i as u32, [eax, 0, 63, 0]));
            v.push(entry(4, i as u32, [eax, 0, 63, 0]));
        }
        v
    }

    #[test]
    fn apic_ids_pack_fields() {
        let t = Topology::new(2, 2, 3, 2); // 24 CPUs, 3 cores → 2 core bits
        assert_eq!(package_shift(&t), 3);
        assert_eq!(apic_id(&t, 0), 0);
        assert_eq!(apic_id(&t, 1), 1);
        assert_eq!(apic_id(&t, 2), 2);
        assert_eq!(apic_id(&t, 5), 5);
        assert_eq!(apic_id(&t, 6), 8); // second package
        let p = placement(&t, 23);
        assert_eq!((p.package, p.core, p.thread, p.node, p.apic_id), (3, 2, 1, 1, 29));
    }

    #[test]
    fn leaves_rewritten() {
        let t = Topology::new(2, 2, 2, 2);
        let cpu = 13; // node 1, package 3, core 0, thread 1
        let e = for_vcpu(&base(), &t, cpu);
        let id = apic_id(&t, cpu);
        assert_eq!(id, 13);
        let l1 = find(&e, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, id);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size kept");
        assert!(l1.edx & (1 << 28) != 0 && l1.ecx & (1 << 31) != 0);
        assert!(l1.ecx & (1 << 24) != 0, "TSC-deadline timer offered");
        let smt = find(&e, 0xb, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (1, 2, 0x100, id));
        let core = find(&e, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, id));
        assert_eq!(find(&e, 0xb, 2).unwrap().ecx, 2);
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
        assert!(find(&e, 0x1f, 0).is_none(), "0x1f only when the max basic leaf has it");
        let amd = find(&e, 0x8000_001e, 0).unwrap();
        assert_eq!((amd.eax, amd.ebx & 0xff, (amd.ebx >> 8) & 0xff, amd.ecx & 0xff), (13, 6, 1, 1));
        let size = find(&e, 0x8000_0008, 0).unwrap();
        assert_eq!((size.ecx & 0xff, (size.ecx >> 12) & 0xf), (3, 2));
        for leaf in [4, 0x8000_001d] {
            let l1d = find(&e, leaf, 0).unwrap();
            let l3 = find(&e, leaf, 3).unwrap();
            assert_eq!((l1d.eax >> 14) & 0xfff, 1, "L1 shared by the 2 threads of a core");
            assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by the 4 CPUs of the LLC");
            assert_eq!(l3.eax & 0x3fff, 3 | (3 << 5), "type and level kept");
        }
        assert_eq!(find(&e, 4, 0).unwrap().eax >> 26, 1);
    }

    #[test]
    fn x2apic_ids_for_256_cpus() {
        let t = Topology::new(4, 4, 8, 2);
        assert_eq!((thread_bits(&t), package_shift(&t)), (1, 4));
        let ids: Vec<u32> = (0..256).map(|c| apic_id(&t, c)).collect();
        assert_eq!(ids, (0..256).collect::<Vec<_>>(), "dense: power-of-two cores and threads");
        let mut b = base();
        b[0].eax = 0x1f;
        let e = for_vcpu(&b, &t, 255);
        let l1 = find(&e, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 0xff);
        assert!(l1.ecx & (1 << 21) != 0, "x2APIC offered");
        for leaf in [0xb, 0x1f] {
            let smt = find(&e, leaf, 0).unwrap();
            let core = find(&e, leaf, 1).unwrap();
            assert_eq!((smt.eax, smt.ebx, smt.edx), (1, 2, 255));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (4, 16, 0x201, 255));
        }
        // Sparse ids past 255: 6 cores per LLC leave gaps.
        let odd = Topology::new(4, 5, 6, 2);
        assert_eq!(apic_id(&odd, 239), (19 << 4) | (5 << 1) | 1);
        let e = for_vcpu(&b, &odd, 239);
        assert_eq!(find(&e, 0xb, 1).unwrap().edx, 315);
        assert_eq!(find(&e, 1, 0).unwrap().ebx >> 24, 315 & 0xff);
    }

    #[test]
    fn single_cpu_and_x2apic_leaf() {
        let mut b = base();
        b[0].eax = 0x1f;
        let e = for_vcpu(&b, &Topology::cpus(1), 0);
        assert_eq!(find(&e, 0x1f, 1).unwrap().ebx, 1);
        assert_eq!(find(&e, 0xb, 0).unwrap().eax, 0);
        assert_eq!(find(&e, 1, 0).unwrap().ebx >> 24, 0);
    }
}
