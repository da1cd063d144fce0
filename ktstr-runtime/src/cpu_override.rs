//! `KTSTR_CPUS=N`: run a VM test at N vCPUs instead of its declared count
//! (the nested-KVM rig runs every test at 1, 2 and 4). The host resizes
//! the test's topology with [`crate::vmm::Topology::with_cpus`] and passes
//! `ktstr.cpus=N` to the guest, which resizes it the same way, so
//! `ctx.topology()` and every topology assertion see what actually booted.
//! `host_only` tests and gauntlet variants (whose name fixes their
//! topology) ignore it.

use crate::preset::MEMORY_PER_CPU_MIB;
use crate::registry::TestDef;

pub const ENV: &str = "KTSTR_CPUS";
/// Guest command-line argument carrying the override.
pub const GUEST_ARG: &str = "ktstr.cpus";

/// The override in `value` (unset or empty: none).
pub fn parse(value: Option<&str>) -> Result<Option<u32>, String> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else { return Ok(None) };
    match v.parse::<u32>() {
        Ok(n) if (1..=crate::vmm::topology::MAX_CPUS).contains(&n) => Ok(Some(n)),
        _ => {
            Err(format!("{ENV}={v}: want a vCPU count from 1 to {} (or unset it to run each test at its own count)", crate::vmm::topology::MAX_CPUS))
        }
    }
}

/// The override in the environment.
pub fn from_env() -> Result<Option<u32>, String> {
    parse(std::env::var(ENV).ok().as_deref())
}

/// `def` at `n` vCPUs: its topology resized, and 16 MiB more memory per
/// vCPU beyond its declared count (never less than it declared), split
/// evenly over the nodes.
pub fn resize(def: &TestDef, n: u32) -> Result<TestDef, String> {
    let topology = def.topology.with_cpus(n).map_err(|e| format!("{ENV}: {}: {e}", def.name))?;
    let extra = u64::from(n.saturating_sub(def.topology.total_cpus())) * MEMORY_PER_CPU_MIB;
    let memory_mib = (def.memory_mib + extra).next_multiple_of(u64::from(topology.numa_nodes));
    Ok(TestDef { topology, memory_mib, cpus_override: Some(n), ..*def })
}

/// Why `def` cannot run at `n` vCPUs: outside its `min_cpus`..`max_cpus`
/// (a body that names CPU 1; a scheduler that works on one CPU only).
/// Such a run is a SKIP (it never ran), not a vacuous pass or a known
/// failure; the other gauntlet keys only pick presets, and a resized run
/// ignores them.
pub fn refusal(def: &TestDef, n: Option<u32>) -> Option<String> {
    let n = n?;
    if def.host_only || def.preset.is_some() {
        return None;
    }
    let (min, max) = (def.gauntlet.min_cpus, def.gauntlet.max_cpus);
    if n < min {
        return Some(format!("{ENV}={n}: {} needs at least {min} vCPUs (its min_cpus); run it at {min} or more", def.name));
    }
    if max != 0 && n > max {
        return Some(format!("{ENV}={n}: {} runs on at most {max} vCPUs (its max_cpus); run it at {max} or fewer", def.name));
    }
    None
}

/// One run of `def` under `KTSTR_CPUS`: the test to run (resized, or as
/// declared) and, when its bounds refuse the count, the skip reason.
/// `Err` is a fail: a bad value, or a topology that cannot be resized.
pub fn for_run(def: &'static TestDef) -> Result<(&'static TestDef, Option<String>), String> {
    let n = from_env()?;
    let refused = refusal(def, n);
    if refused.is_some() {
        return Ok((def, refused));
    }
    Ok((apply(def, n)?, None))
}

/// What one run of `def` boots under the override `n`: `def` itself for a
/// `host_only` test, a gauntlet variant, or no override; else the resized
/// test, leaked for the rest of this process (one run per process).
pub fn apply(def: &'static TestDef, n: Option<u32>) -> Result<&'static TestDef, String> {
    match n {
        Some(n) if !def.host_only && def.preset.is_none() => Ok(Box::leak(Box::new(resize(def, n)?))),
        _ => Ok(def),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::Topology;

    #[test]
    fn parse_accepts_counts_and_names_the_fix() {
        assert_eq!(parse(None), Ok(None));
        assert_eq!(parse(Some(" ")), Ok(None));
        assert_eq!(parse(Some("4")), Ok(Some(4)));
        for bad in ["0", "257", "two", "-1"] {
            let e = parse(Some(bad)).unwrap_err();
            assert!(e.starts_with(&format!("KTSTR_CPUS={bad}: want a vCPU count from 1 to 256")), "{e}");
        }
    }

    static PLAIN: TestDef = TestDef { name: "plain", topology: Topology::cpus(2), memory_mib: 256, ..TestDef::DEFAULT };
    static NUMA: TestDef = TestDef { name: "numa", topology: Topology::new(2, 1, 2, 1), memory_mib: 512, ..TestDef::DEFAULT };
    static HOST: TestDef = TestDef { name: "host", host_only: true, ..TestDef::DEFAULT };

    #[test]
    fn apply_resizes_vm_tests_only() {
        let d = apply(&PLAIN, Some(4)).unwrap();
        assert_eq!((d.topology, d.memory_mib, d.cpus_override), (Topology::cpus(4), 256 + 2 * 16, Some(4)));
        let d = apply(&PLAIN, Some(1)).unwrap();
        assert_eq!((d.topology, d.memory_mib), (Topology::cpus(1), 256), "fewer vCPUs keep the declared memory");
        let d = apply(&NUMA, Some(2)).unwrap();
        assert_eq!((d.topology, d.memory_mib), (Topology::new(2, 1, 1, 1), 512));
        assert!(std::ptr::eq(apply(&PLAIN, None).unwrap(), &PLAIN));
        assert!(std::ptr::eq(apply(&HOST, Some(4)).unwrap(), &HOST), "host_only tests boot no VM");
        let variant = PLAIN.leak_variant(&crate::preset::PRESETS[0]);
        assert!(std::ptr::eq(apply(variant, Some(4)).unwrap(), variant), "a gauntlet variant keeps its preset");
        static TWO: TestDef = TestDef {
            name: "two",
            gauntlet: crate::preset::Constraints { min_cpus: 2, ..crate::preset::Constraints::DEFAULT },
            ..TestDef::DEFAULT
        };
        assert_eq!(refusal(&TWO, Some(1)).unwrap(), "KTSTR_CPUS=1: two needs at least 2 vCPUs (its min_cpus); run it at 2 or more");
        assert_eq!(refusal(&TWO, Some(2)), None);
        assert_eq!(refusal(&TWO, None), None);
        assert_eq!(refusal(&PLAIN, Some(1)), None, "min_cpus defaults to 1");
        assert_eq!(refusal(&PLAIN, Some(256)), None, "max_cpus 0 is no bound");
        static ONE: TestDef = TestDef {
            name: "one",
            gauntlet: crate::preset::Constraints { max_cpus: 1, ..crate::preset::Constraints::DEFAULT },
            ..TestDef::DEFAULT
        };
        assert_eq!(refusal(&ONE, Some(2)).unwrap(), "KTSTR_CPUS=2: one runs on at most 1 vCPUs (its max_cpus); run it at 1 or fewer");
        assert_eq!(refusal(&ONE, Some(1)), None);
        // A node count the memory does not split over rounds the memory up.
        static ODD: TestDef = TestDef { name: "odd", topology: Topology::new(3, 1, 1, 1), memory_mib: 512, ..TestDef::DEFAULT };
        assert_eq!(apply(&ODD, Some(6)).unwrap().memory_mib, (512 + 3 * 16u64).next_multiple_of(3));
    }
}
