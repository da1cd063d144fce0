//! Requested guest CPU topology.

/// Most vCPUs a VM may have: x2APIC ids, `CONFIG_NR_CPUS` in `ktstr.kconfig`.
pub const MAX_CPUS: u32 = 256;

/// ACPI SLIT distance of a node to itself; remote distances are larger.
pub const LOCAL_DISTANCE: u8 = 10;
/// What firmware reports between two nodes when nothing says otherwise.
pub const REMOTE_DISTANCE: u8 = 20;

/// NUMA distances between distinct nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distances {
    /// Every remote node at [`REMOTE_DISTANCE`].
    #[default]
    Uniform,
    /// Nodes in the same run of `group` consecutive nodes are `near`,
    /// others `far` (two sockets of two dies each, say).
    Grouped { group: u32, near: u8, far: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    pub numa_nodes: u32,
    /// Last-level caches per NUMA node (one socket-like group each).
    pub llcs: u32,
    /// Cores per LLC.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
    /// Distances between nodes (SLIT, QEMU `-numa dist`).
    #[serde(default, skip_serializing_if = "Distances::is_uniform")]
    pub distances: Distances,
}

impl Distances {
    pub fn is_uniform(&self) -> bool {
        *self == Distances::Uniform
    }
}

impl Topology {
    pub const fn new(numa_nodes: u32, llcs: u32, cores: u32, threads: u32) -> Self {
        Self { numa_nodes, llcs, cores, threads, distances: Distances::Uniform }
    }

    /// The same topology with non-uniform node distances.
    pub const fn with_distances(mut self, d: Distances) -> Self {
        self.distances = d;
        self
    }

    /// SLIT distance from node `from` to node `to`.
    pub fn distance(&self, from: u32, to: u32) -> u8 {
        if from == to {
            return LOCAL_DISTANCE;
        }
        match self.distances {
            Distances::Uniform => REMOTE_DISTANCE,
            Distances::Grouped { group, near, far } => {
                if from / group.max(1) == to / group.max(1) {
                    near
                } else {
                    far
                }
            }
        }
    }

    /// True with more than one thread per core.
    pub const fn smt(&self) -> bool {
        self.threads > 1
    }

    /// `n` CPUs: one node, one LLC, `n` single-thread cores.
    pub const fn cpus(n: u32) -> Self {
        Self::new(1, 1, n, 1)
    }

    pub const fn total_cpus(&self) -> u32 {
        self.numa_nodes * self.llcs * self.cores * self.threads
    }

    /// Total LLC groups across all nodes (QEMU "sockets").
    pub const fn total_llcs(&self) -> u32 {
        self.numa_nodes * self.llcs
    }

    /// NUMA node of a CPU index (CPUs are numbered node-major).
    pub fn node_of(&self, cpu: u32) -> u32 {
        cpu / (self.llcs * self.cores * self.threads)
    }

    /// Every backend splits guest RAM evenly over the NUMA nodes (QEMU
    /// takes whole MiB per node).
    pub fn check_memory(&self, memory_mib: u64) -> Result<(), String> {
        let nodes = self.numa_nodes.max(1) as u64;
        if !memory_mib.is_multiple_of(nodes) {
            return Err(format!(
                "{memory_mib} MiB of memory does not split evenly over {nodes} NUMA nodes; use a memory_mib that is a multiple of {nodes}"
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.numa_nodes == 0 || self.llcs == 0 || self.cores == 0 || self.threads == 0 {
            return Err(format!("topology {self:?}: every dimension must be at least 1"));
        }
        if self.total_cpus() > MAX_CPUS {
            return Err(format!("topology asks for {} CPUs; ktstr supports at most {MAX_CPUS}", self.total_cpus()));
        }
        if let Distances::Grouped { group, near, far } = self.distances {
            if group == 0 || near <= LOCAL_DISTANCE || far < near {
                return Err(format!(
                    "topology {self:?}: grouped distances need group >= 1 and {LOCAL_DISTANCE} < near <= far"
                ));
            }
        }
        Ok(())
    }
}

impl Topology {
    /// This topology resized to `n` CPUs (`KTSTR_CPUS`): unchanged at its
    /// own count; else nodes, LLCs per node and threads per core are kept
    /// and only cores per LLC change, when `n` is a multiple of their
    /// product; else the largest structure that divides `n` is kept,
    /// preferring SMT, then NUMA nodes, then LLCs (so 2 nodes of 2 cores
    /// become 2 nodes of 1 core at 2 CPUs, and 2 LLCs of one 2-thread core
    /// become one 2-thread core). Node distances survive only while the
    /// node count does.
    pub fn with_cpus(&self, n: u32) -> Result<Topology, String> {
        if n == 0 || n > MAX_CPUS {
            return Err(format!("{n} CPUs: want 1 to {MAX_CPUS}"));
        }
        if n == self.total_cpus() {
            return Ok(*self);
        }
        let fits = |nodes: u32, llcs: u32, threads: u32| n.is_multiple_of(nodes * llcs * threads);
        let (nodes, llcs, threads) = if fits(self.numa_nodes, self.llcs, self.threads) {
            (self.numa_nodes, self.llcs, self.threads)
        } else {
            (1..=self.threads)
                .rev()
                .flat_map(|t| (1..=self.numa_nodes).rev().flat_map(move |d| (1..=self.llcs).rev().map(move |l| (d, l, t))))
                .find(|&(d, l, t)| fits(d, l, t))
                .unwrap_or((1, 1, 1))
        };
        let mut t = Topology::new(nodes, llcs, n / (nodes * llcs * threads), threads);
        if nodes == self.numa_nodes {
            t.distances = self.distances;
        }
        Ok(t)
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::cpus(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let t = Topology::new(2, 2, 2, 2);
        assert_eq!(t.total_cpus(), 16);
        assert_eq!(t.total_llcs(), 4);
        assert_eq!(t.node_of(7), 0);
        assert_eq!(t.node_of(8), 1);
        assert!(Topology::new(1, 0, 1, 1).validate().is_err());
        assert!(Topology::cpus(256).validate().is_ok());
        assert!(Topology::cpus(257).validate().unwrap_err().contains("at most 256"));
        assert!(Topology::new(3, 1, 1, 1).check_memory(512).unwrap_err().contains("multiple of 3"));
        assert!(Topology::new(2, 1, 1, 1).check_memory(512).is_ok());
    }

    #[test]
    fn distances() {
        let u = Topology::new(3, 1, 1, 1);
        assert_eq!((u.distance(0, 0), u.distance(0, 2), u.distance(2, 1)), (10, 20, 20));
        let g = Topology::new(4, 1, 1, 1).with_distances(Distances::Grouped { group: 2, near: 16, far: 32 });
        let row = |i| (0..4).map(|j| g.distance(i, j)).collect::<Vec<_>>();
        assert_eq!(row(0), [10, 16, 32, 32]);
        assert_eq!(row(3), [32, 32, 16, 10]);
        assert!(g.validate().is_ok());
        let bad = Topology::new(2, 1, 1, 1).with_distances(Distances::Grouped { group: 1, near: 10, far: 20 });
        assert!(bad.validate().unwrap_err().contains("near"));
        // Uniform distances keep result.json's topology shape unchanged.
        assert!(!serde_json::to_string(&u).unwrap().contains("distances"));
        assert!(serde_json::to_string(&g).unwrap().contains("\"grouped\""));
    }

    #[test]
    fn with_cpus_resizes_cores_first_then_keeps_smt_nodes_llcs() {
        let t = |n, l, c, th| Topology::new(n, l, c, th);
        // A plain `cpus = N` test becomes `cpus(n)`; its own count is a no-op.
        assert_eq!(Topology::cpus(2).with_cpus(1).unwrap(), Topology::cpus(1));
        assert_eq!(Topology::cpus(2).with_cpus(4).unwrap(), Topology::cpus(4));
        assert_eq!(Topology::cpus(2).with_cpus(2).unwrap(), Topology::cpus(2));
        // 2 nodes of 2 cores: cores per LLC change while the count divides.
        let numa = t(2, 1, 2, 1);
        assert_eq!(numa.with_cpus(2).unwrap(), t(2, 1, 1, 1));
        assert_eq!(numa.with_cpus(8).unwrap(), t(2, 1, 4, 1));
        assert_eq!(numa.with_cpus(1).unwrap(), t(1, 1, 1, 1));
        assert_eq!(numa.with_cpus(3).unwrap(), t(1, 1, 3, 1));
        // 2 LLCs of one 2-thread core: SMT outlives the LLCs.
        let smt = t(1, 2, 1, 2);
        assert_eq!(smt.with_cpus(2).unwrap(), t(1, 1, 1, 2));
        assert_eq!(smt.with_cpus(1).unwrap(), t(1, 1, 1, 1));
        assert_eq!(smt.with_cpus(8).unwrap(), t(1, 2, 2, 2));
        assert_eq!(smt.with_cpus(6).unwrap(), t(1, 1, 3, 2));
        // Distances stay with the node count, else become uniform.
        let far = Distances::Grouped { group: 2, near: 16, far: 32 };
        let g = t(4, 1, 4, 1).with_distances(far);
        assert_eq!(g.with_cpus(8).unwrap().distances, far);
        assert_eq!(g.with_cpus(2).unwrap(), t(2, 1, 1, 1));
        for n in 1..=64 {
            for base in [numa, smt, g, t(2, 2, 2, 2), t(3, 1, 2, 1)] {
                let r = base.with_cpus(n).unwrap();
                assert_eq!(r.total_cpus(), n, "{base:?} at {n}: {r:?}");
                assert!(r.validate().is_ok(), "{r:?}");
            }
        }
        assert!(numa.with_cpus(0).unwrap_err().contains("want 1 to 256"));
        assert!(numa.with_cpus(257).is_err());
    }
}
