//! The guest's view of its topology in sysfs (NUMA nodes and their
//! distances, LLC sharing, SMT siblings), what a [`Topology`] should look
//! like there, and the differences between the two.
//!
//! Both backends number CPUs node-major: LLC by LLC, core by core,
//! thread by thread (`Topology::node_of`).

use std::path::Path;

use crate::guest::cpus::parse_list;
use crate::vmm::Topology;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestView {
    pub online: Vec<u32>,
    /// `nodeN/cpulist`, by node.
    pub node_cpus: Vec<Vec<u32>>,
    /// `nodeN/distance`, by node.
    pub distances: Vec<Vec<u32>>,
    /// Per online CPU: `cache/indexN/shared_cpu_list` of its highest
    /// index (the LLC); empty when sysfs has no cache information.
    pub llc: Vec<Vec<u32>>,
    /// Per online CPU: `topology/thread_siblings_list`.
    pub siblings: Vec<Vec<u32>>,
}

fn range(start: u32, len: u32) -> Vec<u32> {
    (start..start + len).collect()
}

/// What a guest booted with `t` shows.
pub fn expected(t: &Topology) -> GuestView {
    let n = t.total_cpus();
    let per_node = t.llcs * t.cores * t.threads;
    let per_llc = t.cores * t.threads;
    GuestView {
        online: range(0, n),
        node_cpus: (0..t.numa_nodes).map(|i| range(i * per_node, per_node)).collect(),
        distances: (0..t.numa_nodes).map(|i| (0..t.numa_nodes).map(|j| t.distance(i, j) as u32).collect()).collect(),
        llc: (0..n).map(|c| range(c - c % per_llc, per_llc)).collect(),
        siblings: (0..n).map(|c| range(c - c % t.threads, t.threads)).collect(),
    }
}

fn read(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p).map(|s| s.trim().to_string()).map_err(|e| format!("reading {}: {e}", p.display()))
}

fn list(p: &Path) -> Result<Vec<u32>, String> {
    parse_list(&read(p)?)
}

/// Reads the view under `root` (`/sys/devices/system` in a guest).
pub fn read_view(root: &Path) -> Result<GuestView, String> {
    let online = list(&root.join("cpu/online"))?;
    // A kernel without CONFIG_NUMA has no node directory: no nodes.
    let mut nodes: Vec<u32> = match std::fs::read_dir(root.join("node")) {
        Ok(d) => d.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("reading {}: {e}", root.join("node").display())),
    };
    nodes.sort_unstable();
    let mut node_cpus = Vec::new();
    let mut distances = Vec::new();
    for n in &nodes {
        let dir = root.join(format!("node/node{n}"));
        node_cpus.push(list(&dir.join("cpulist"))?);
        let d = read(&dir.join("distance"))?;
        distances.push(d.split_whitespace().map(|x| x.parse().map_err(|_| format!("bad distance row {d:?}"))).collect::<Result<_, _>>()?);
    }
    let mut llc = Vec::new();
    let mut siblings = Vec::new();
    for c in &online {
        let dir = root.join(format!("cpu/cpu{c}"));
        let top = (0..8).rev().find(|i| dir.join(format!("cache/index{i}/shared_cpu_list")).exists());
        llc.push(match top {
            Some(i) => list(&dir.join(format!("cache/index{i}/shared_cpu_list")))?,
            None => Vec::new(),
        });
        siblings.push(list(&dir.join("topology/thread_siblings_list"))?);
    }
    Ok(GuestView { online, node_cpus, distances, llc, siblings })
}

fn show(v: &[u32]) -> String {
    v.iter().copied().collect::<crate::cpuset::CpuSet>().to_string()
}

/// Every way `seen` differs from `want`, one line each (at most a few
/// per kind, so a wrong LLC on 64 CPUs stays readable).
pub fn diff(want: &GuestView, seen: &GuestView) -> Vec<String> {
    let mut out = Vec::new();
    if want.online != seen.online {
        out.push(format!("online CPUs {}, want {}", show(&seen.online), show(&want.online)));
    }
    if want.node_cpus.len() != seen.node_cpus.len() {
        out.push(format!("{} NUMA nodes, want {}", seen.node_cpus.len(), want.node_cpus.len()));
    }
    for (i, (w, s)) in want.node_cpus.iter().zip(&seen.node_cpus).enumerate() {
        if w != s {
            out.push(format!("node{i} cpulist {}, want {}", show(s), show(w)));
        }
    }
    for (i, (w, s)) in want.distances.iter().zip(&seen.distances).enumerate() {
        if w != s {
            out.push(format!("node{i} distance {s:?}, want {w:?}"));
        }
    }
    let per_cpu = |what: &str, w: &[Vec<u32>], s: &[Vec<u32>], out: &mut Vec<String>| {
        let bad: Vec<String> = w
            .iter()
            .zip(s)
            .enumerate()
            .filter(|(_, (w, s))| w != s)
            .map(|(c, (w, s))| format!("cpu{c} {what} {}, want {}", show(s), show(w)))
            .collect();
        if bad.len() > 3 {
            out.push(format!("{} CPUs with a wrong {what}, e.g. {}", bad.len(), bad[..3].join("; ")));
        } else {
            out.extend(bad);
        }
    };
    per_cpu("LLC (shared_cpu_list)", &want.llc, &seen.llc, &mut out);
    per_cpu("thread_siblings_list", &want.siblings, &seen.siblings, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::Distances;
    use crate::cpuset::CpuSet;

    #[test]
    fn expected_views() {
        let t = Topology::new(2, 2, 2, 2);
        let v = expected(&t);
        assert_eq!(v.online.len(), 16);
        assert_eq!(v.node_cpus, [range(0, 8), range(8, 8)]);
        assert_eq!(v.distances, [[10, 20], [20, 10]]);
        assert_eq!(v.llc[5], [4, 5, 6, 7]);
        assert_eq!(v.siblings[5], [4, 5]);
        let far = expected(&Topology::new(4, 1, 1, 1).with_distances(Distances::Grouped { group: 2, near: 16, far: 32 }));
        assert_eq!(far.distances[1], [16, 10, 32, 32]);
        let odd = expected(&Topology::new(1, 3, 3, 1));
        assert_eq!((odd.llc[4].clone(), odd.siblings[4].clone()), (vec![3, 4, 5], vec![4]));
    }

    fn write(root: &Path, rel: &str, s: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{s}\n")).unwrap();
    }

    /// A fake sysfs of the shape a 2-node, 1 LLC per node, 2 SMT-thread guest has.
    fn fake(root: &Path, llc_of_cpu3: &str) {
        write(root, "cpu/online", "0-3");
        write(root, "node/node0/cpulist", "0-1");
        write(root, "node/node1/cpulist", "2-3");
        write(root, "node/node0/distance", "10 20");
        write(root, "node/node1/distance", "20 10");
        write(root, "node/possible", "0-1"); // not a node directory
        for c in 0..4 {
            let llc = if c == 3 { llc_of_cpu3.to_string() } else if c < 2 { "0-1".into() } else { "2-3".into() };
            write(root, &format!("cpu/cpu{c}/cache/index0/shared_cpu_list"), &c.to_string());
            write(root, &format!("cpu/cpu{c}/cache/index3/shared_cpu_list"), &llc);
            write(root, &format!("cpu/cpu{c}/topology/thread_siblings_list"), if c < 2 { "0-1" } else { "2-3" });
        }
    }

    #[test]
    fn reads_sysfs_and_names_each_difference() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "2-3");
        let seen = read_view(dir.path()).unwrap();
        assert_eq!(diff(&expected(&Topology::new(2, 1, 1, 2)), &seen), Vec::<String>::new());
        let d = diff(&expected(&Topology::new(2, 1, 2, 1)), &seen);
        assert_eq!(
            d,
            ["4 CPUs with a wrong thread_siblings_list, e.g. cpu0 thread_siblings_list 0-1, want 0; \
              cpu1 thread_siblings_list 0-1, want 1; cpu2 thread_siblings_list 2-3, want 2"]
        );
        fake(dir.path(), "3");
        let d = diff(&expected(&Topology::new(2, 1, 1, 2)), &read_view(dir.path()).unwrap());
        assert_eq!(d, ["cpu3 LLC (shared_cpu_list) 3, want 2-3"]);
        let far = Topology::new(2, 1, 1, 2).with_distances(Distances::Grouped { group: 1, near: 16, far: 32 });
        let d = diff(&expected(&far), &read_view(dir.path()).unwrap());
        assert!(d.contains(&"node0 distance [10, 20], want [10, 32]".to_string()), "{d:?}");
    }

    #[test]
    fn no_node_directory_means_no_nodes() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "2-3");
        std::fs::remove_dir_all(dir.path().join("node")).unwrap();
        let v = read_view(dir.path()).unwrap();
        assert_eq!((v.node_cpus.len(), v.distances.len(), v.online.len()), (0, 0, 4));
        let sets = crate::scenario::TopoSets::from_view(&v);
        assert_eq!(sets.nodes(), [CpuSet::first(4)], "one node of all online CPUs");
    }
}
