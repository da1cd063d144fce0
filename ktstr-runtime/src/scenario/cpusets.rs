//! Cpusets derived from the topology the guest kernel reports: one per
//! LLC, one per NUMA node, two halves that do not overlap, two sets that
//! share N CPUs.

use anyhow::{bail, Result};

use crate::cpuset::CpuSet;
use crate::topo_view::GuestView;

/// The online CPUs grouped as sysfs groups them (`ctx.cpusets()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopoSets {
    online: CpuSet,
    llcs: Vec<CpuSet>,
    nodes: Vec<CpuSet>,
}

fn set(cpus: &[u32]) -> CpuSet {
    cpus.iter().copied().collect()
}

impl TopoSets {
    pub fn from_view(v: &GuestView) -> Self {
        let online = set(&v.online);
        let mut llcs: Vec<CpuSet> = Vec::new();
        for (i, l) in v.llc.iter().enumerate() {
            // No cache info: every CPU is its own LLC.
            let l = if l.is_empty() {
                set(&v.online[i..=i])
            } else {
                set(l).and(&online)
            };
            if !l.is_empty() && !llcs.contains(&l) {
                llcs.push(l);
            }
        }
        llcs.sort_by_key(|s| s.iter().next());
        let mut nodes: Vec<CpuSet> = v
            .node_cpus
            .iter()
            .map(|n| set(n).and(&online))
            .filter(|s| !s.is_empty())
            .collect();
        if nodes.is_empty() {
            nodes.push(online.clone());
        }
        Self {
            online,
            llcs,
            nodes,
        }
    }

    /// Reads `/sys/devices/system` (in the guest).
    pub fn read() -> Result<Self> {
        Ok(Self::from_view(
            &crate::topo_view::read_view(std::path::Path::new("/sys/devices/system"))
                .map_err(anyhow::Error::msg)?,
        ))
    }

    pub fn online(&self) -> &CpuSet {
        &self.online
    }

    /// One set per last-level cache, in CPU order.
    pub fn llcs(&self) -> &[CpuSet] {
        &self.llcs
    }

    /// One set per NUMA node with online CPUs, in node order.
    pub fn nodes(&self) -> &[CpuSet] {
        &self.nodes
    }

    /// The online CPUs cut in two in CPU order (the first gets the odd
    /// one): on both backends CPUs are numbered node by node and LLC by
    /// LLC, so with an even count of nodes or LLCs the halves follow them.
    pub fn halves(&self) -> Result<(CpuSet, CpuSet)> {
        let cpus: Vec<u32> = self.online.iter().collect();
        if cpus.len() < 2 {
            bail!(
                "halves need at least 2 online CPUs, the guest has {}",
                cpus.len()
            );
        }
        let mid = cpus.len().div_ceil(2);
        Ok((set(&cpus[..mid]), set(&cpus[mid..])))
    }

    /// Two sets that share exactly `n` CPUs and together cover every online
    /// CPU: the first takes the low CPUs, the second the high ones, and the
    /// `n` in the middle are in both.
    pub fn overlapping(&self, n: u32) -> Result<(CpuSet, CpuSet)> {
        let cpus: Vec<u32> = self.online.iter().collect();
        let len = cpus.len() as u32;
        if len < 2 || n >= len - 1 {
            bail!("overlapping({n}): {len} online CPUs leave each set no CPU of its own; ask for at most {}", len.saturating_sub(2));
        }
        let own = len - n;
        let a_own = own.div_ceil(2) as usize;
        let a = set(&cpus[..a_own + n as usize]);
        let b = set(&cpus[a_own..]);
        Ok((a, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topo_view::expected;
    use crate::vmm::Topology;

    #[test]
    fn from_the_topology() {
        let t = TopoSets::from_view(&expected(&Topology::new(2, 2, 2, 1)));
        let s = |v: &[CpuSet]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert_eq!(s(t.llcs()), ["0-1", "2-3", "4-5", "6-7"]);
        assert_eq!(s(t.nodes()), ["0-3", "4-7"]);
        let (a, b) = t.halves().unwrap();
        assert_eq!((a.to_string(), b.to_string()), ("0-3".into(), "4-7".into()));
        assert!(a.and(&b).is_empty());
        let (a, b) = t.overlapping(2).unwrap();
        assert_eq!((a.to_string(), b.to_string()), ("0-4".into(), "3-7".into()));
        assert_eq!(a.and(&b).len(), 2);
        let (a, b) = t.overlapping(0).unwrap();
        assert_eq!((a.to_string(), b.to_string()), ("0-3".into(), "4-7".into()));
        assert_eq!(
            t.overlapping(6)
                .unwrap()
                .0
                .and(&t.overlapping(6).unwrap().1)
                .len(),
            6
        );
        assert!(t
            .overlapping(7)
            .unwrap_err()
            .to_string()
            .contains("ask for at most 6"));
    }

    #[test]
    fn odd_counts_missing_cache_info_and_offline_cpus() {
        let mut v = expected(&Topology::new(1, 1, 3, 1));
        let (a, b) = TopoSets::from_view(&v).halves().unwrap();
        assert_eq!((a.to_string(), b.to_string()), ("0-1".into(), "2".into()));
        let (a, b) = TopoSets::from_view(&v).overlapping(1).unwrap();
        assert_eq!((a.to_string(), b.to_string()), ("0-1".into(), "1-2".into()));
        v.llc.iter_mut().for_each(|l| l.clear());
        assert_eq!(
            TopoSets::from_view(&v).llcs().len(),
            3,
            "no cache info: one LLC per CPU"
        );
        // CPU 1 offline: it is in no set.
        let mut v = expected(&Topology::new(1, 1, 2, 1));
        v.online = vec![0];
        v.llc = vec![vec![0, 1]];
        let t = TopoSets::from_view(&v);
        assert_eq!(t.llcs()[0].to_string(), "0");
        assert_eq!(t.nodes()[0].to_string(), "0");
        assert!(t.halves().is_err());
    }
}
