//! Requested guest CPU topology.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    pub numa_nodes: u32,
    /// Last-level caches per NUMA node (one socket-like group each).
    pub llcs: u32,
    /// Cores per LLC.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

impl Topology {
    pub const fn new(numa_nodes: u32, llcs: u32, cores: u32, threads: u32) -> Self {
        Self { numa_nodes, llcs, cores, threads }
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
        if self.total_cpus() > 64 {
            return Err(format!("topology asks for {} CPUs; ktstr supports at most 64", self.total_cpus()));
        }
        Ok(())
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
        assert!(Topology::cpus(65).validate().is_err());
        assert!(Topology::new(3, 1, 1, 1).check_memory(512).unwrap_err().contains("multiple of 3"));
        assert!(Topology::new(2, 1, 1, 1).check_memory(512).is_ok());
    }
}
