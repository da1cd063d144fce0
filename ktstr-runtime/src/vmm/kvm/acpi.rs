//! ACPI tables: RSDP, XSDT, FADT, DSDT, MADT, and SRAT + SLIT for NUMA.
//!
//! Distro kernels find CPUs and the power-off path only through ACPI
//! (no MP table), so these are what makes a guest see its topology.

use crate::vmm::Topology;

use super::cpuid;
use super::memory::{ram_ranges, IOAPIC_ADDR, LAPIC_ADDR};

/// PM1a event block (status + enable, 4 bytes).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// PM1a control block (2 bytes); the VMM watches it for SLP_EN + S5.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// FADT reset register (the PCI reset-control port) and its value.
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;
/// SLP_TYP the DSDT's `\_S5` package tells the guest to write.
pub const SLP_TYP_S5: u16 = 5;
pub const SLP_EN: u16 = 1 << 13;
pub const SCI_IRQ: u8 = 9;
/// PM1 control value a guest writes to power off.
pub const S5_POWER_OFF: u16 = SLP_EN | (SLP_TYP_S5 << 10);

const OEM_ID: &[u8; 6] = b"KTSTR ";
const OEM_TABLE: &[u8; 8] = b"KTSTRVM ";

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A table under construction: header first, body appended.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(sig: &[u8; 4], revision: u8) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(sig);
        v.extend_from_slice(&[0; 4]); // length, filled in by finish
        v.push(revision);
        v.push(0); // checksum
        v.extend_from_slice(OEM_ID);
        v.extend_from_slice(OEM_TABLE);
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(b"KTST");
        v.extend_from_slice(&1u32.to_le_bytes());
        Sdt(v)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// Generic Address Structure in system I/O space.
    fn gas_io(&mut self, port: u16, bits: u8, access: u8) -> &mut Self {
        self.u8(1).u8(bits).u8(0).u8(access).u64(port.into())
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// Minimal AML: `Name (_S5, Package () { 5, 5, 0, 0 })`.
pub fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, SLP_TYP_S5 as u8, 0x0a, SLP_TYP_S5 as u8, 0x00, 0x00]);
    t.finish()
}

/// FACS: a full-hardware (non-reduced) ACPI platform has one; nothing
/// in it is used (no S3, no global lock contention).
pub fn facs() -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&64u32.to_le_bytes());
    v[32] = 2; // version
    v
}

pub fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut t = Sdt::new(b"FACP", 6);
    t.u32(facs_addr as u32) // FIRMWARE_CTRL (X_FIRMWARE_CTRL stays 0)
        .u32(dsdt_addr as u32)
        .u8(0)
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ.into())
        .u32(0) // SMI_CMD 0: ACPI mode is always on, nothing to enable
        .bytes(&[0, 0, 0, 0])
        .u32(PM1A_EVT_PORT.into())
        .u32(0)
        .u32(PM1A_CNT_PORT.into())
        .u32(0)
        .u32(0) // PM2
        .u32(0) // PM timer: none, the guest uses TSC/kvm-clock
        .u32(0)
        .u32(0)
        .bytes(&[4, 2, 0, 0, 0, 0, 0, 0]) // PM1_EVT_LEN, PM1_CNT_LEN, ...
        .u16(101) // C2 latency > 100: no C2
        .u16(1001) // C3 latency > 1000: no C3
        .u16(0)
        .u16(0)
        .bytes(&[0, 0, 0, 0, 0])
        .u16(1 << 2) // IAPC_BOOT_ARCH: no VGA
        .u8(0)
        // WBINVD, C1 on all CPUs, power/sleep buttons absent, RESET_REG_SUP
        .u32(1 | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 10))
        .gas_io(RESET_PORT, 8, 1)
        .u8(RESET_VALUE)
        .u16(0)
        .u8(0) // FADT minor version
        .u64(0)
        .u64(dsdt_addr)
        .gas_io(PM1A_EVT_PORT, 32, 3)
        .bytes(&[0; 12])
        .gas_io(PM1A_CNT_PORT, 16, 2)
        .bytes(&[0; 12 * 5]) // PM1b_CNT, PM2, PM_TMR, GPE0, GPE1
        .bytes(&[0; 12 * 2]) // sleep control/status: not HW-reduced
        .bytes(b"KTSTRKVM");
    let v = t.finish();
    debug_assert_eq!(v.len(), 276);
    v
}

/// APIC ids from here on need x2APIC (0xff is the xAPIC broadcast id):
/// MADT and SRAT describe those CPUs with their x2APIC structures.
pub const X2APIC_FROM: u32 = 0xff;

pub fn madt(t: &Topology) -> Vec<u8> {
    let mut m = Sdt::new(b"APIC", 4);
    m.u32(LAPIC_ADDR as u32).u32(1); // PCAT_COMPAT: dual 8259s present
    // ACPI processor UIDs are the CPU indexes; ids only grow with the
    // index, so every CPU past 254 is an x2APIC one.
    let mut x2apic = false;
    for cpu in 0..t.total_cpus() {
        let id = cpuid::apic_id(t, cpu);
        if id < X2APIC_FROM {
            m.u8(0).u8(8).u8(cpu as u8).u8(id as u8).u32(1);
        } else {
            m.u8(9).u8(16).u16(0).u32(id).u32(1).u32(cpu);
            x2apic = true;
        }
    }
    m.u8(1).u8(12).u8(0).u8(0).u32(IOAPIC_ADDR as u32).u32(0);
    // No override for ISA IRQ0: KVM's default GSI routing sends the
    // in-kernel PIT (GSI 0) to IOAPIC pin 0, so IRQ0 is GSI 0 here. An
    // IRQ0 → GSI 2 override (what PC firmware says) would point the guest
    // at a pin nothing raises and its timer check falls back to the 8259.
    // SCI: level-triggered, active high.
    m.u8(2).u8(10).u8(0).u8(SCI_IRQ).u32(SCI_IRQ.into()).u16(0xd);
    // LINT1 of every local APIC is NMI.
    m.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    if x2apic {
        // The same for the x2APIC CPUs (UID 0xffffffff: all of them).
        m.u8(0xa).u8(12).u16(0).u32(u32::MAX).u8(1).bytes(&[0; 3]);
    }
    m.finish()
}

/// Memory of each NUMA node: RAM split evenly (2 MiB granularity) in
/// address order, the last node taking the remainder.
pub fn node_memory(t: &Topology, memory_mib: u64) -> Vec<(u32, u64, u64)> {
    let nodes = t.numa_nodes as u64;
    let total: u64 = ram_ranges(memory_mib).iter().map(|r| r.1).sum();
    let share = (total / nodes) & !((2 << 20) - 1);
    let mut out = Vec::new();
    let mut node = 0u64;
    let mut left = share;
    for (mut start, size) in ram_ranges(memory_mib) {
        let end = start + size;
        while start < end {
            let take = if node == nodes - 1 { end - start } else { left.min(end - start) };
            out.push((node as u32, start, take));
            start += take;
            left -= take.min(left);
            if left == 0 && node < nodes - 1 {
                node += 1;
                left = share;
            }
        }
    }
    out
}

pub fn srat(t: &Topology, memory_mib: u64) -> Vec<u8> {
    let mut s = Sdt::new(b"SRAT", 3);
    s.u32(1).u64(0);
    for cpu in 0..t.total_cpus() {
        let p = cpuid::placement(t, cpu);
        if p.apic_id < X2APIC_FROM {
            // Proximity domain bits 7:0, APIC id, flags, SAPIC EID, domain bits 31:8, clock domain.
            s.u8(0).u8(16).u8(p.node as u8).u8(p.apic_id as u8).u32(1).u8(0).bytes(&(p.node >> 8).to_le_bytes()[..3]).u32(0);
        } else {
            // Processor Local x2APIC Affinity.
            s.u8(2).u8(24).u16(0).u32(p.node).u32(p.apic_id).u32(1).u32(0).u32(0);
        }
    }
    for (node, base, len) in node_memory(t, memory_mib) {
        s.u8(1).u8(40).u32(node).u16(0).u64(base).u64(len).u32(0).u32(1).u64(0);
    }
    s.finish()
}

pub fn slit(t: &Topology) -> Vec<u8> {
    let n = t.numa_nodes as usize;
    let mut s = Sdt::new(b"SLIT", 1);
    s.u64(n as u64);
    for i in 0..n {
        for j in 0..n {
            s.u8(t.distance(i as u32, j as u32));
        }
    }
    s.finish()
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(OEM_ID);
    r.push(2);
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT: XSDT only
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.extend_from_slice(&[0; 4]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// All tables laid out from `base` (RSDP first, 16-byte aligned tables).
pub struct Tables {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl Tables {
    pub fn rsdp_addr(&self) -> u64 {
        self.base
    }
}

pub fn build(t: &Topology, memory_mib: u64, base: u64) -> Tables {
    let mut bytes = vec![0u8; 64]; // RSDP slot
    let place = |bytes: &mut Vec<u8>, table: Vec<u8>| -> u64 {
        bytes.resize((bytes.len() + 15) & !15, 0);
        let at = base + bytes.len() as u64;
        bytes.extend_from_slice(&table);
        at
    };
    // The FACS must be 64-byte aligned.
    bytes.resize((bytes.len() + 63) & !63, 0);
    let facs_addr = base + bytes.len() as u64;
    bytes.extend_from_slice(&facs());
    let dsdt_addr = place(&mut bytes, dsdt());
    let mut entries = vec![place(&mut bytes, fadt(dsdt_addr, facs_addr)), place(&mut bytes, madt(t))];
    if t.numa_nodes > 1 {
        entries.push(place(&mut bytes, srat(t, memory_mib)));
        entries.push(place(&mut bytes, slit(t)));
    }
    let mut x = Sdt::new(b"XSDT", 1);
    for e in &entries {
        x.u64(*e);
    }
    let xsdt_addr = place(&mut bytes, x.finish());
    bytes[..36].copy_from_slice(&rsdp(xsdt_addr));
    Tables { base, bytes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
    use std::ptr::NonNull;

    /// "Physical memory" for the parser: the table blob at its base.
    #[derive(Clone)]
    struct Blob(std::rc::Rc<Tables>);

    impl AcpiHandler for Blob {
        unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
            let off = phys - self.0.base as usize;
            assert!(off + size <= self.0.bytes.len(), "parser read past the tables: {phys:#x}+{size}");
            let ptr = self.0.bytes.as_ptr().add(off) as *mut T;
            PhysicalMapping::new(phys, NonNull::new(ptr).unwrap(), size, size, self.clone())
        }
        fn unmap_physical_region<T>(_: &PhysicalMapping<Self, T>) {}
    }

    #[repr(C, packed)]
    struct Raw {
        header: acpi::sdt::SdtHeader,
    }
    macro_rules! raw_table {
        ($name:ident, $sig:expr) => {
            #[repr(transparent)]
            struct $name(Raw);
            unsafe impl AcpiTable for $name {
                const SIGNATURE: acpi::sdt::Signature = $sig;
                fn header(&self) -> &acpi::sdt::SdtHeader {
                    &self.0.header
                }
            }
        };
    }
    raw_table!(Srat, acpi::sdt::Signature::SRAT);
    raw_table!(Slit, acpi::sdt::Signature::SLIT);

    fn parse(t: Topology, mib: u64) -> (Blob, AcpiTables<Blob>) {
        let blob = Blob(std::rc::Rc::new(build(&t, mib, 0xe_0000)));
        let tables = unsafe { AcpiTables::from_rsdp(blob.clone(), 0xe_0000) }.expect("RSDP/XSDT parse");
        (blob, tables)
    }

    #[test]
    fn madt_and_fadt_parse_back() {
        let t = Topology::new(1, 2, 2, 2);
        let (_blob, tables) = parse(t, 256);
        assert_eq!(tables.revision(), 2);
        let madt = tables.find_table::<acpi::madt::Madt>().expect("MADT with a valid checksum");
        let lapic_addr = madt.get().local_apic_address;
        assert_eq!(lapic_addr as u64, LAPIC_ADDR);
        assert!(madt.get().supports_8259());
        let (mut ids, mut ioapics, mut isos, mut nmis) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for e in madt.get().entries() {
            match e {
                acpi::madt::MadtEntry::LocalApic(l) => {
                    let flags = l.flags;
                    assert_eq!(flags & 1, 1, "enabled");
                    ids.push((l.processor_id, l.apic_id));
                }
                acpi::madt::MadtEntry::IoApic(io) => ioapics.push(io.io_apic_address),
                acpi::madt::MadtEntry::InterruptSourceOverride(i) => isos.push((i.irq, i.global_system_interrupt, i.flags)),
                acpi::madt::MadtEntry::LocalApicNmi(n) => {
                    assert_eq!((n.processor_id, n.nmi_line), (0xff, 1));
                    nmis += 1;
                }
                other => panic!("unexpected MADT entry {other:?}"),
            }
        }
        let want: Vec<(u8, u8)> = (0..8).map(|c| (c as u8, cpuid::apic_id(&t, c) as u8)).collect();
        assert_eq!(ids, want);
        assert_eq!(ioapics, vec![IOAPIC_ADDR as u32]);
        assert_eq!(isos, vec![(9, 9, 0xd)], "IRQ0 is GSI 0: KVM routes the PIT to IOAPIC pin 0");
        assert_eq!(nmis, 1);

        let fadt = tables.find_table::<acpi::fadt::Fadt>().unwrap();
        let cnt = fadt.pm1a_control_block().unwrap();
        assert_eq!((cnt.address, cnt.bit_width), (PM1A_CNT_PORT as u64, 16));
        assert_eq!(fadt.pm1a_event_block().unwrap().address, PM1A_EVT_PORT as u64);
        let reset = fadt.reset_register().unwrap();
        assert_eq!((reset.address, fadt.reset_value), (RESET_PORT as u64, RESET_VALUE));
        let facs = fadt.facs_address().unwrap();
        assert_eq!(facs % 64, 0);
        assert_eq!(&_blob.0.bytes[facs - 0xe_0000..][..4], b"FACS");
        let flags = fadt.flags;
        assert!(flags.supports_system_reset_via_fadt());
        assert!(!flags.system_is_hw_reduced_acpi());
        let sci = fadt.sci_interrupt;
        assert_eq!(sci, SCI_IRQ as u16);

        let dsdt = tables.dsdt().unwrap();
        let aml = &_blob.0.bytes[dsdt.address - 0xe_0000..][..dsdt.length as usize];
        assert_eq!(&aml[..5], &[0x08, b'_', b'S', b'5', b'_'], "\\_S5 object");
        assert_eq!(aml[9], SLP_TYP_S5 as u8);
        assert!(tables.find_table::<Srat>().is_err(), "no SRAT on one node");
    }

    #[test]
    fn numa_tables() {
        let t = Topology::new(2, 1, 2, 1);
        let (blob, tables) = parse(t, 512);
        let srat = tables.find_table::<Srat>().expect("SRAT with a valid checksum");
        let slit = tables.find_table::<Slit>().expect("SLIT with a valid checksum");
        let off = |p: usize| p - 0xe_0000;
        let s = &blob.0.bytes[off(srat.physical_start())..][..srat.region_length()];
        // CPU affinity entries: 4 CPUs, nodes 0,0,1,1.
        let cpu_nodes: Vec<(u8, u8)> = (0..4).map(|i| (s[48 + 16 * i + 2], s[48 + 16 * i + 3])).collect();
        assert_eq!(cpu_nodes, vec![(0, 0), (0, 1), (1, 2), (1, 3)]);
        let mems = node_memory(&t, 512);
        assert_eq!(mems, vec![(0, 0, 256 << 20), (1, 256 << 20, 256 << 20)]);
        let l = &blob.0.bytes[off(slit.physical_start())..][..slit.region_length()];
        assert_eq!(&l[36..], &[2, 0, 0, 0, 0, 0, 0, 0, 10, 20, 20, 10]);
    }

    /// Every table of a layout, by signature, found through RSDP → XSDT
    /// → FADT (DSDT, FACS), as `iasl -d` wants them one per file.
    fn table_files(t: Topology, mib: u64) -> Vec<(String, Vec<u8>)> {
        let base = 0xe_0000u64;
        let tables = build(&t, mib, base);
        let b = &tables.bytes;
        let at = |addr: u64| (addr - base) as usize;
        let len = |off: usize| u32::from_le_bytes(b[off + 4..off + 8].try_into().unwrap()) as usize;
        let sig = |off: usize| String::from_utf8_lossy(&b[off..off + 4]).into_owned();
        let mut out = vec![("RSDP".to_string(), b[..36].to_vec())];
        let xsdt = at(u64::from_le_bytes(b[24..32].try_into().unwrap()));
        out.push(("XSDT".into(), b[xsdt..xsdt + len(xsdt)].to_vec()));
        for e in (xsdt + 36..xsdt + len(xsdt)).step_by(8) {
            let off = at(u64::from_le_bytes(b[e..e + 8].try_into().unwrap()));
            out.push((sig(off), b[off..off + len(off)].to_vec()));
            if &b[off..off + 4] == b"FACP" {
                let facs = at(u32::from_le_bytes(b[off + 36..off + 40].try_into().unwrap()).into());
                let dsdt = at(u32::from_le_bytes(b[off + 40..off + 44].try_into().unwrap()).into());
                out.push(("FACS".into(), b[facs..facs + 64].to_vec()));
                out.push(("DSDT".into(), b[dsdt..dsdt + len(dsdt)].to_vec()));
            }
        }
        out
    }

    /// `KTSTR_ACPI_DUMP=DIR` writes each table of the largest preset to
    /// DIR/SIG.dat, for looking at with ACPICA's disassembler (`iasl -d`).
    #[test]
    fn dump_for_iasl() {
        let Some(dir) = std::env::var_os("KTSTR_ACPI_DUMP") else { return };
        let p = crate::preset::PRESETS.last().unwrap();
        for (sig, bytes) in table_files(p.topology, p.memory_mib()) {
            std::fs::write(std::path::Path::new(&dir).join(format!("{sig}.dat")), bytes).unwrap();
        }
    }

    /// The largest preset's tables (x2APIC MADT and SRAT entries, a 4×4
    /// SLIT) and the far/near preset's SLIT disassemble without a single
    /// error, warning or unknown field.
    #[test]
    fn tables_disassemble_cleanly_with_iasl() {
        let have = std::process::Command::new("iasl").arg("-v").output().is_ok_and(|o| o.status.success());
        if !crate::testing::premise(have, "ACPICA's iasl", "apt-get install acpica-tools (scripts/setup.sh does)") {
            return;
        }
        let largest = crate::preset::PRESETS.last().unwrap();
        let far = crate::preset::find("numa4-far").unwrap();
        for p in [largest, far] {
            let dir = tempfile::tempdir().unwrap();
            let files = table_files(p.topology, p.memory_mib());
            let sigs: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
            assert_eq!(sigs, ["RSDP", "XSDT", "FACP", "FACS", "DSDT", "APIC", "SRAT", "SLIT"], "{}", p.name);
            // iasl (20200925) cannot read an RSDP from a file; `parse` checks its checksums.
            for (sig, bytes) in files.iter().filter(|f| f.0 != "RSDP") {
                let dat = dir.path().join(format!("{sig}.dat"));
                std::fs::write(&dat, bytes).unwrap();
                let out = std::process::Command::new("iasl").arg("-d").arg(&dat).current_dir(dir.path()).output().unwrap();
                let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                assert!(out.status.success(), "{} {sig}: iasl -d failed:\n{log}", p.name);
                let dsl = std::fs::read_to_string(dir.path().join(format!("{sig}.dsl"))).unwrap();
                for bad in ["Error", "Warning", "Unknown", "Invalid", "Incorrect"] {
                    assert!(!log.contains(bad) && !dsl.contains(bad), "{} {sig}: {bad} in iasl's output:\n{log}\n{dsl}", p.name);
                }
                if sig == "SLIT" {
                    let row0 = dsl.lines().find(|l| l.contains("Locality   0")).unwrap_or_default().to_string();
                    let want: String = (0..p.topology.numa_nodes).map(|j| format!("{:02X} ", p.topology.distance(0, j))).collect();
                    assert!(row0.contains(want.trim_end()), "{}: SLIT row 0 {row0:?}, want {want:?}\n{dsl}", p.name);
                }
                if sig == "APIC" && p.cpus() == 256 {
                    assert_eq!(dsl.matches("Processor Local x2APIC").count(), 1, "{dsl}");
                    assert!(dsl.contains("Processor x2Apic ID : 000000FF"), "{dsl}");
                }
                if sig == "SRAT" && p.cpus() == 256 {
                    assert_eq!(dsl.matches("Processor Local x2APIC Affinity").count(), 1, "{dsl}");
                }
            }
        }
    }

    #[test]
    fn x2apic_entries_past_254() {
        let p = crate::preset::PRESETS.last().unwrap();
        let t = p.topology;
        assert_eq!(cpuid::apic_id(&t, 255), 0xff);
        let (blob, tables) = parse(t, p.memory_mib());
        let madt = tables.find_table::<acpi::madt::Madt>().unwrap();
        let (mut xapic, mut x2apic, mut x2nmi) = (0, Vec::new(), 0);
        for e in madt.get().entries() {
            match e {
                acpi::madt::MadtEntry::LocalApic(_) => xapic += 1,
                acpi::madt::MadtEntry::LocalX2Apic(x) => x2apic.push((x.x2apic_id, x.processor_uid, x.flags)),
                acpi::madt::MadtEntry::X2ApicNmi(n) => {
                    assert_eq!((n.processor_uid, n.nmi_line), (u32::MAX, 1));
                    x2nmi += 1
                }
                _ => {}
            }
        }
        assert_eq!((xapic, x2apic, x2nmi), (255, vec![(0xff, 255, 1)], 1));
        let srat = tables.find_table::<Srat>().unwrap();
        let s = &blob.0.bytes[srat.physical_start() - 0xe_0000..][..srat.region_length()];
        // 255 16-byte xAPIC entries, then the x2APIC one: type 2, node 3, id 0xff.
        let x = 48 + 255 * 16;
        assert_eq!((s[x], s[x + 1]), (2, 24));
        assert_eq!(u32::from_le_bytes(s[x + 4..x + 8].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(s[x + 8..x + 12].try_into().unwrap()), 0xff);
        let slit = tables.find_table::<Slit>().unwrap();
        let l = &blob.0.bytes[slit.physical_start() - 0xe_0000..][..slit.region_length()];
        assert_eq!(&l[44..48], &[10, 20, 20, 20]);
        let far = crate::preset::find("numa4-far").unwrap();
        let (blob, tables) = parse(far.topology, far.memory_mib());
        let slit = tables.find_table::<Slit>().unwrap();
        let l = &blob.0.bytes[slit.physical_start() - 0xe_0000..][..slit.region_length()];
        assert_eq!(&l[44..], &[10, 16, 32, 32, 16, 10, 32, 32, 32, 32, 10, 16, 32, 32, 16, 10]);
    }

    #[test]
    fn numa_memory_spans_the_hole() {
        let t = Topology::new(3, 1, 1, 1);
        let m = node_memory(&t, 4096);
        let total: u64 = m.iter().map(|x| x.2).sum();
        assert_eq!(total, 4096 << 20);
        assert_eq!(m.iter().map(|x| x.0).max(), Some(2));
        assert!(m.iter().all(|&(_, b, l)| b + l <= 3 << 30 || b >= 4 << 30));
    }
}
