//! cgroup v2 helpers: create, set a cpuset or weight, move tasks, remove.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cpuset::CpuSet;
use crate::workers::{Work, WorkerGroup};

/// Where cgroup2 is mounted (the guest init mounts it here too).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("write {value:?} to {}", path.display()))
}

/// Writes `dir`'s `cpuset.cpus`.
pub(crate) fn set_cpus(dir: &Path, cpus: &CpuSet) -> Result<()> {
    write(&dir.join("cpuset.cpus"), &cpus.to_string())
}

/// Writes `dir`'s `cpu.weight`, refusing values the kernel would reject.
pub(crate) fn set_weight(dir: &Path, w: u32) -> Result<()> {
    if !(1..=10000).contains(&w) {
        anyhow::bail!("cpu.weight {w} for {}: must be 1..=10000", dir.display());
    }
    write(&dir.join("cpu.weight"), &w.to_string())
}

/// Creates the cgroup directory; with `reuse`, an existing one is fine.
pub(crate) fn mkdir(path: &Path, reuse: bool) -> Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if !(reuse && e.kind() == std::io::ErrorKind::AlreadyExists) => {
            Err(e).with_context(|| format!("create cgroup {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes the cgroup directory; fails while tasks are inside.
pub(crate) fn rmdir(path: &Path) -> Result<()> {
    std::fs::remove_dir(path).with_context(|| format!("remove cgroup {}", path.display()))
}

/// Enables every controller in `want` that `dir` offers to its children.
/// Returns those it could not enable (absent from the kernel, say).
pub fn enable_controllers(dir: &Path, want: &[&str]) -> Vec<String> {
    let avail = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let mut missing = Vec::new();
    for c in want {
        let ok = avail.split_whitespace().any(|a| a == *c)
            && std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")).is_ok();
        if !ok {
            missing.push(c.to_string());
        }
    }
    missing
}

/// One cgroup under the test's parent cgroup. Removed on drop unless
/// [`Cgroup::keep`] was called (best effort: tasks must have left).
#[derive(Debug)]
pub struct Cgroup {
    name: String,
    path: PathBuf,
    keep: bool,
}

impl Cgroup {
    /// Creates `parent/name` (an existing directory is reused).
    pub(crate) fn create(parent: &Path, name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') || name.starts_with("cgroup.") {
            anyhow::bail!("bad cgroup name {name:?}: use a plain name without `/`");
        }
        let path = parent.join(name);
        mkdir(&path, true)?;
        Ok(Self { name: name.to_string(), path, keep: false })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets `cpuset.cpus`.
    pub fn cpus(self, cpus: CpuSet) -> Result<Self> {
        if cpus.is_empty() {
            anyhow::bail!("cgroup {}: empty cpuset", self.name);
        }
        set_cpus(&self.path, &cpus)?;
        Ok(self)
    }

    /// Sets `cpu.weight` (1..=10000, default 100).
    pub fn weight(self, w: u32) -> Result<Self> {
        set_weight(&self.path, w)?;
        Ok(self)
    }

    /// `cpuset.cpus.effective`: the CPUs its tasks may really use.
    pub fn effective_cpus(&self) -> Result<CpuSet> {
        let p = self.path.join("cpuset.cpus.effective");
        let s = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        CpuSet::parse(&s).map_err(anyhow::Error::msg)
    }

    /// Moves a process (all its threads) into this cgroup.
    pub fn add(&self, pid: i32) -> Result<()> {
        move_to(&self.path, pid)
    }

    /// Tasks currently in the cgroup.
    pub fn procs(&self) -> Result<Vec<i32>> {
        let s = std::fs::read_to_string(self.path.join("cgroup.procs"))?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// `n` CPU spinners in this cgroup.
    pub fn workers(&self, n: usize) -> WorkerGroup {
        WorkerGroup::new(&self.name, Some(self.path.clone()), n, Work::Spin)
    }

    /// `n` workers that run for `run`, sleep for `sleep`, and repeat.
    pub fn sleepers(&self, n: usize, run: std::time::Duration, sleep: std::time::Duration) -> WorkerGroup {
        WorkerGroup::new(&self.name, Some(self.path.clone()), n, Work::SleepWake { run, sleep })
    }

    /// `n` workers of any work type in this cgroup.
    pub fn work(&self, n: usize, work: Work) -> WorkerGroup {
        WorkerGroup::new(&self.name, Some(self.path.clone()), n, work)
    }

    /// Leaves the cgroup in place after the test.
    pub fn keep(mut self) -> Self {
        self.keep = true;
        self
    }

    /// Removes the cgroup; fails while tasks are still inside.
    pub fn remove(mut self) -> Result<()> {
        self.keep = true;
        rmdir(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

pub(crate) fn move_to(dir: &Path, pid: i32) -> Result<()> {
    write(&dir.join("cgroup.procs"), &pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_range_and_mkdir_reuse() {
        let d = tempfile::tempdir().unwrap();
        let e = set_weight(d.path(), 0).unwrap_err().to_string();
        assert!(e.starts_with("cpu.weight 0 for ") && e.ends_with("must be 1..=10000"), "{e}");
        assert!(set_weight(d.path(), 10001).is_err());
        set_weight(d.path(), 300).unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("cpu.weight")).unwrap(), "300");
        let c = d.path().join("c");
        mkdir(&c, false).unwrap();
        mkdir(&c, true).unwrap();
        let e = format!("{:#}", mkdir(&c, false).unwrap_err());
        assert!(e.starts_with(&format!("create cgroup {}", c.display())), "{e}");
        rmdir(&c).unwrap();
        assert!(rmdir(&c).unwrap_err().to_string().starts_with("remove cgroup "));
    }
}
