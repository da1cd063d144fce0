//! Gauntlet presets: a named ladder of guest topologies every VM test is
//! also listed on (`gauntlet/{test}/{preset}`), and the per-test
//! constraints that keep a test off rungs it cannot run on.

use crate::vmm::{Distances, Topology};

/// Guest RAM of a preset: a floor for the kernel and the test binary,
/// plus per-vCPU memory (per-CPU areas, stacks, the workers' own).
pub const MEMORY_FLOOR_MIB: u64 = 512;
pub const MEMORY_PER_CPU_MIB: u64 = 16;

/// One rung of the ladder.
#[derive(Debug, PartialEq, Eq)]
pub struct Preset {
    /// What test names carry: lowercase letters, digits and `-`.
    pub name: &'static str,
    pub topology: Topology,
    /// One line for `docs/harness.md` and `--help`.
    pub about: &'static str,
}

const fn rung(name: &'static str, nodes: u32, llcs: u32, cores: u32, threads: u32, about: &'static str) -> Preset {
    Preset { name, topology: Topology::new(nodes, llcs, cores, threads), about }
}

/// Two sockets of two nodes each: 16 within a socket, 32 across.
const FAR: Distances = Distances::Grouped { group: 2, near: 16, far: 32 };

/// The ladder, smallest first (nodes × LLCs per node × cores per LLC ×
/// threads per core).
pub static PRESETS: &[Preset] = &[
    rung("tiny", 1, 1, 2, 1, "two cores sharing one LLC"),
    rung("tiny-smt", 1, 1, 2, 2, "two SMT cores, one LLC"),
    rung("llc2", 1, 2, 2, 1, "two LLCs of two cores"),
    rung("numa3", 3, 1, 2, 1, "three nodes (an odd count) of two cores"),
    rung("llc2-smt", 1, 2, 2, 2, "two LLCs of two SMT cores"),
    rung("numa2", 2, 1, 4, 1, "two nodes, one LLC of four cores each"),
    rung("llc3-odd", 1, 3, 3, 1, "three LLCs of three cores: sparse APIC ids"),
    rung("llc4", 1, 4, 4, 1, "four LLCs of four cores"),
    rung("numa2-smt", 2, 2, 2, 2, "two nodes of two LLCs of two SMT cores"),
    Preset {
        name: "numa4-far",
        topology: Topology::new(4, 1, 4, 1).with_distances(FAR),
        about: "four nodes in two pairs: distance 16 within a pair, 32 across",
    },
    rung("llc4-smt", 1, 4, 4, 2, "four LLCs of four SMT cores"),
    rung("numa2-llc4", 2, 4, 8, 1, "two nodes of four LLCs of eight cores (64 vCPUs)"),
    Preset {
        name: "numa4-far-smt",
        topology: Topology::new(4, 2, 8, 2).with_distances(FAR),
        about: "four far/near nodes of two LLCs of eight SMT cores (128 vCPUs)",
    },
    rung("numa4-llc4-smt", 4, 4, 8, 2, "four nodes of four LLCs of eight SMT cores (256 vCPUs, x2APIC)"),
];

impl Preset {
    pub fn cpus(&self) -> u32 {
        self.topology.total_cpus()
    }

    /// Floor plus per-vCPU memory, rounded up to 64 MiB per node so it
    /// splits evenly over the nodes on both backends.
    pub fn memory_mib(&self) -> u64 {
        let nodes = self.topology.numa_nodes as u64;
        (MEMORY_FLOOR_MIB + MEMORY_PER_CPU_MIB * self.cpus() as u64).next_multiple_of(64 * nodes)
    }

    /// Memory for a test on this preset: the preset's, or the test's own
    /// when it asked for more (rounded up to split over the nodes).
    pub fn memory_for(&self, test_mib: u64) -> u64 {
        self.memory_mib().max(test_mib.next_multiple_of(self.topology.numa_nodes as u64))
    }
}

pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// Resolves preset names (for `--gauntlet NAME…`); an unknown one is an
/// error that lists the ladder.
pub fn resolve(names: &[String]) -> Result<Vec<&'static Preset>, String> {
    names
        .iter()
        .map(|n| {
            find(n).ok_or_else(|| {
                format!("unknown gauntlet preset {n:?}; presets: {}", PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))
            })
        })
        .collect()
}

/// Which presets a test runs on (`#[ktstr_test]` keys). `max_cpus` 0
/// means no upper bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Constraints {
    /// `gauntlet = false` lists no variants at all.
    pub gauntlet: bool,
    pub min_cpus: u32,
    pub max_cpus: u32,
    /// Total LLCs over all nodes.
    pub min_llcs: u32,
    pub min_numa_nodes: u32,
    pub requires_smt: bool,
}

impl Constraints {
    pub const DEFAULT: Constraints =
        Constraints { gauntlet: true, min_cpus: 1, max_cpus: 0, min_llcs: 1, min_numa_nodes: 1, requires_smt: false };

    /// Why `p` is outside these constraints, or `None` when it is allowed.
    pub fn excludes(&self, p: &Preset) -> Option<String> {
        let t = &p.topology;
        if !self.gauntlet {
            return Some("gauntlet = false".into());
        }
        if t.total_cpus() < self.min_cpus {
            return Some(format!("{} CPUs < min_cpus {}", t.total_cpus(), self.min_cpus));
        }
        if self.max_cpus != 0 && t.total_cpus() > self.max_cpus {
            return Some(format!("{} CPUs > max_cpus {}", t.total_cpus(), self.max_cpus));
        }
        if t.total_llcs() < self.min_llcs {
            return Some(format!("{} LLCs < min_llcs {}", t.total_llcs(), self.min_llcs));
        }
        if t.numa_nodes < self.min_numa_nodes {
            return Some(format!("{} nodes < min_numa_nodes {}", t.numa_nodes, self.min_numa_nodes));
        }
        if self.requires_smt && !t.smt() {
            return Some("no SMT (requires_smt)".into());
        }
        None
    }

    pub fn allows(&self, p: &Preset) -> bool {
        self.excludes(p).is_none()
    }
}

impl Default for Constraints {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_shape() {
        let first = &PRESETS[0].topology;
        assert_eq!((first.numa_nodes, first.llcs, first.cores, first.threads), (1, 1, 2, 1));
        let last = PRESETS.last().unwrap();
        assert_eq!(last.cpus(), 256);
        let t = last.topology;
        assert_eq!((t.numa_nodes, t.llcs, t.cores, t.threads), (4, 4, 8, 2));
        // Smallest first, every name unique and usable in a test name.
        for w in PRESETS.windows(2) {
            assert!(w[0].cpus() <= w[1].cpus(), "{} before {}", w[0].name, w[1].name);
        }
        for (i, p) in PRESETS.iter().enumerate() {
            assert!(p.topology.validate().is_ok(), "{}", p.name);
            assert!(p.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'), "{}", p.name);
            assert!(PRESETS[..i].iter().all(|o| o.name != p.name && o.topology != p.topology), "{} repeats", p.name);
            assert_eq!(find(p.name), Some(p));
        }
        assert!(PRESETS.iter().any(|p| p.topology.smt()) && PRESETS.iter().any(|p| !p.topology.smt()));
        let far: Vec<_> = PRESETS.iter().filter(|p| !p.topology.distances.is_uniform()).collect();
        assert!(!far.is_empty());
        let t = far[0].topology;
        assert!((0..t.numa_nodes).any(|j| t.distance(0, j) != t.distance(0, t.numa_nodes - 1) && j != 0), "non-uniform");
        assert_eq!(PRESETS.iter().filter(|p| p.cpus() == 64).count(), 1, "one 64-vCPU rung (the slow TCG test)");
    }

    #[test]
    fn memory_grows_with_cpus_and_splits_over_nodes() {
        assert_eq!(find("tiny").unwrap().memory_mib(), 576); // 512 + 2 × 16, to 64
        assert_eq!(find("numa3").unwrap().memory_mib(), 768); // 608 → a multiple of 192
        assert_eq!(find("numa4-llc4-smt").unwrap().memory_mib(), 4608);
        for p in PRESETS {
            let m = p.memory_mib();
            assert!(m >= MEMORY_FLOOR_MIB + MEMORY_PER_CPU_MIB * p.cpus() as u64, "{}", p.name);
            assert!(p.topology.check_memory(m).is_ok(), "{}", p.name);
            assert!(p.topology.check_memory(p.memory_for(1001)).is_ok(), "{}", p.name);
        }
        let numa3 = find("numa3").unwrap();
        assert_eq!(numa3.memory_for(512), 768);
        assert_eq!(numa3.memory_for(1000), 1002, "the test's own larger memory, split over 3 nodes");
    }

    #[test]
    fn constraints_pick_rungs() {
        let names = |c: Constraints| PRESETS.iter().filter(|p| c.allows(p)).map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(names(Constraints::DEFAULT).len(), PRESETS.len());
        assert!(names(Constraints { gauntlet: false, ..Constraints::DEFAULT }).is_empty());
        let smt = names(Constraints { requires_smt: true, ..Constraints::DEFAULT });
        assert!(smt.iter().all(|n| find(n).unwrap().topology.threads == 2) && smt.contains(&"tiny-smt"));
        let small = names(Constraints { max_cpus: 4, ..Constraints::DEFAULT });
        assert_eq!(small, ["tiny", "tiny-smt", "llc2"]);
        let numa = names(Constraints { min_numa_nodes: 3, max_cpus: 16, ..Constraints::DEFAULT });
        assert_eq!(numa, ["numa3", "numa4-far"]);
        let llcs = names(Constraints { min_llcs: 4, min_cpus: 10, max_cpus: 16, ..Constraints::DEFAULT });
        assert_eq!(llcs, ["llc4", "numa2-smt", "numa4-far"]);
        let why = Constraints { min_cpus: 8, ..Constraints::DEFAULT }.excludes(find("tiny").unwrap()).unwrap();
        assert_eq!(why, "2 CPUs < min_cpus 8");
    }

    /// docs/harness.md lists the ladder as it is.
    #[test]
    fn docs_table_matches() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/harness.md")).unwrap();
        for p in PRESETS {
            let t = p.topology;
            let row = format!(
                "| `{}` | {} × {} × {} × {} | {} | {} | {} |",
                p.name,
                t.numa_nodes,
                t.llcs,
                t.cores,
                t.threads,
                p.cpus(),
                p.memory_mib(),
                p.about
            );
            assert!(doc.contains(&row), "docs/harness.md lacks the row {row}");
        }
        let rows = doc.lines().filter(|l| l.starts_with("| `") && l.matches(" × ").count() == 3).count();
        assert_eq!(rows, PRESETS.len(), "docs/harness.md has a preset row too many");
    }

    #[test]
    fn unknown_names_list_the_ladder() {
        assert_eq!(resolve(&["tiny".into(), "llc2".into()]).unwrap().len(), 2);
        let e = resolve(&["huge".into()]).unwrap_err();
        assert!(e.contains("\"huge\"") && e.contains("tiny, tiny-smt"), "{e}");
    }
}
