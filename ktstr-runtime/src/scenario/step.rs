//! One scenario step: what it changes, and how it does it in the guest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::cgroup::{self, enable_controllers, move_to, Cgroup};
use crate::cpuset::CpuSet;

/// A cgroup by path, created or not: what steps name. `&Cgroup` converts;
/// [`Cgroup::child`] and [`CgroupRef::child`] name nested ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRef {
    path: PathBuf,
}

impl CgroupRef {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// `self/name` (not created).
    pub fn child(&self, name: &str) -> CgroupRef {
        CgroupRef {
            path: self.path.join(name),
        }
    }
    /// The path below the test's `ktstr-PID` parent (`outer/inner`): how step names show it.
    pub fn name(&self) -> String {
        let parts: Vec<String> = self
            .path
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        match parts.iter().rposition(|p| p.starts_with("ktstr-")) {
            Some(i) if i + 1 < parts.len() => parts[i + 1..].join("/"),
            _ => self.path.display().to_string(),
        }
    }
}

impl From<&Cgroup> for CgroupRef {
    fn from(c: &Cgroup) -> Self {
        CgroupRef::new(c.path())
    }
}

impl From<&CgroupRef> for CgroupRef {
    fn from(c: &CgroupRef) -> Self {
        c.clone()
    }
}

impl Cgroup {
    /// A nested cgroup `self/name` for a [`Step::create`] (not created here).
    pub fn child(&self, name: &str) -> CgroupRef {
        CgroupRef::from(self).child(name)
    }
}

/// What a custom step sees: the run's start and every worker's pid.
pub struct StepCtx<'a> {
    /// The run's clock start (guest CLOCK_MONOTONIC ns), as in `Report::start_ns`.
    pub start_ns: u64,
    pub(crate) workers: &'a [(String, usize, i32)],
}

impl StepCtx<'_> {
    /// Pids of group `label`'s workers, by index.
    pub fn pids(&self, label: &str) -> Vec<i32> {
        self.workers
            .iter()
            .filter(|w| w.0 == label)
            .map(|w| w.2)
            .collect()
    }
}

type CustomFn = Arc<dyn Fn(&StepCtx) -> Result<()> + Send + Sync>;

#[derive(Clone)]
pub(crate) enum Action {
    Cpuset(CgroupRef, CpuSet),
    Weight(CgroupRef, u32),
    Move {
        group: String,
        index: Option<usize>,
        to: CgroupRef,
    },
    Create(CgroupRef),
    Remove(CgroupRef),
    Offline(u32),
    Online(u32),
    Custom(CustomFn),
}

/// One change a scenario makes at its time (see `Ctx::scenario`).
#[derive(Clone)]
pub struct Step {
    pub(crate) name: String,
    pub(crate) action: Action,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Step({})", self.name)
    }
}

impl Step {
    fn new(name: String, action: Action) -> Self {
        Self { name, action }
    }
    /// Sets the cgroup's `cpuset.cpus`.
    pub fn cpuset(cg: impl Into<CgroupRef>, cpus: CpuSet) -> Self {
        let cg = cg.into();
        Self::new(
            format!("cpuset {}={cpus}", cg.name()),
            Action::Cpuset(cg, cpus),
        )
    }
    /// Sets the cgroup's `cpu.weight` (1..=10000).
    pub fn weight(cg: impl Into<CgroupRef>, w: u32) -> Self {
        let cg = cg.into();
        Self::new(format!("weight {}={w}", cg.name()), Action::Weight(cg, w))
    }
    /// Moves every worker of group `label` into the cgroup.
    pub fn move_group(label: &str, to: impl Into<CgroupRef>) -> Self {
        let to = to.into();
        Self::new(
            format!("move {label} -> {}", to.name()),
            Action::Move {
                group: label.to_string(),
                index: None,
                to,
            },
        )
    }
    /// Moves worker `index` of group `label` into the cgroup.
    pub fn move_worker(label: &str, index: usize, to: impl Into<CgroupRef>) -> Self {
        let to = to.into();
        Self::new(
            format!("move {label}[{index}] -> {}", to.name()),
            Action::Move {
                group: label.to_string(),
                index: Some(index),
                to,
            },
        )
    }
    /// Creates the cgroup (its parent must exist and hold no tasks: cpu and
    /// cpuset get enabled for the parent's children). Removed at the end
    /// unless a later step removed it.
    pub fn create(cg: impl Into<CgroupRef>) -> Self {
        let cg = cg.into();
        Self::new(format!("create {}", cg.name()), Action::Create(cg))
    }
    /// Removes the cgroup; fails while tasks are inside.
    pub fn remove(cg: impl Into<CgroupRef>) -> Self {
        let cg = cg.into();
        Self::new(format!("remove {}", cg.name()), Action::Remove(cg))
    }
    /// Takes CPU `cpu` offline (guest CPU hotplug). Brought back at the
    /// end unless a later step did.
    pub fn offline(cpu: u32) -> Self {
        Self::new(format!("offline cpu{cpu}"), Action::Offline(cpu))
    }
    /// Brings CPU `cpu` online and gives it the boot CPU's fair-server
    /// parameters if the kernel left them at 0 (6.12, see `guest::cpus`).
    pub fn online(cpu: u32) -> Self {
        Self::new(format!("online cpu{cpu}"), Action::Online(cpu))
    }
    /// Runs `f`; an `Err` fails the test, naming the step.
    pub fn custom(name: &str, f: impl Fn(&StepCtx) -> Result<()> + Send + Sync + 'static) -> Self {
        Self::new(name.to_string(), Action::Custom(Arc::new(f)))
    }
    /// Renames the step (in records and failures).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Refuses what can never run, before any worker starts.
    pub(crate) fn validate(&self, groups: &[(String, usize)]) -> Result<()> {
        match &self.action {
            Action::Cpuset(_, c) if c.is_empty() => {
                bail!("step {}: empty cpuset; give at least one CPU", self.name)
            }
            Action::Weight(_, w) if !(1..=10000).contains(w) => {
                bail!("step {}: cpu.weight must be 1..=10000", self.name)
            }
            Action::Move { group, index, .. } => {
                let Some((_, n)) = groups.iter().find(|g| g.0 == *group) else {
                    bail!(
                        "step {}: no worker group labelled {group:?} in this run",
                        self.name
                    )
                };
                if index.is_some_and(|i| i >= *n) {
                    bail!("step {}: group {group} has {n} workers", self.name);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Does the step; `undo` learns what the end of the run must reverse.
    pub(crate) fn apply(&self, sc: &StepCtx, undo: &mut Undo) -> Result<()> {
        match &self.action {
            Action::Cpuset(cg, cpus) => cgroup::set_cpus(&cg.path, cpus),
            Action::Weight(cg, w) => cgroup::set_weight(&cg.path, *w),
            Action::Move { group, index, to } => {
                for (i, pid) in sc
                    .pids(group)
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| index.is_none_or(|x| x == *i))
                {
                    move_to(&to.path, pid)
                        .with_context(|| format!("move {group}[{i}] (pid {pid})"))?;
                }
                Ok(())
            }
            Action::Create(cg) => {
                let parent = cg.path.parent().context("a cgroup path needs a parent")?;
                let missing = enable_controllers(parent, &["cpu", "cpuset"]);
                if !missing.is_empty() {
                    bail!("cannot enable {missing:?} for the children of {} (a cgroup with tasks cannot have children with controllers)", parent.display());
                }
                cgroup::mkdir(&cg.path, false)?;
                undo.created.push(cg.path.clone());
                Ok(())
            }
            Action::Remove(cg) => {
                cgroup::rmdir(&cg.path)?;
                undo.created.retain(|p| p != &cg.path);
                Ok(())
            }
            Action::Offline(cpu) => {
                crate::guest::cpus::set_online(*cpu, false).map_err(anyhow::Error::msg)?;
                undo.offlined.push(*cpu);
                Ok(())
            }
            Action::Online(cpu) => {
                crate::guest::cpus::online(&[*cpu]).map_err(anyhow::Error::msg)?;
                undo.offlined.retain(|c| c != cpu);
                Ok(())
            }
            Action::Custom(f) => f(sc),
        }
    }
}

/// What the end of a run reverses: CPUs still offline, cgroups still there.
#[derive(Debug, Default)]
pub(crate) struct Undo {
    pub offlined: Vec<u32>,
    pub created: Vec<PathBuf>,
}

impl Undo {
    /// CPUs back online, created cgroups removed (deepest first). One line per failure.
    pub fn run(&mut self) -> Result<()> {
        let mut errs = Vec::new();
        let cpus = std::mem::take(&mut self.offlined);
        if !cpus.is_empty() {
            if let Err(e) = crate::guest::cpus::online(&cpus) {
                errs.push(format!("bringing CPUs {cpus:?} back online: {e}"));
            }
        }
        let mut created = std::mem::take(&mut self.created);
        created.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in created {
            if let Err(e) = cgroup::rmdir(&p) {
                errs.push(format!("{e:#}"));
            }
        }
        if !errs.is_empty() {
            bail!("{}", errs.join("; "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_validation() {
        let outer = CgroupRef::new("/sys/fs/cgroup/ktstr-42/outer");
        let inner = outer.child("inner");
        assert_eq!(inner.name(), "outer/inner");
        assert_eq!(Step::create(&inner).name(), "create outer/inner");
        assert_eq!(
            Step::cpuset(&outer, CpuSet::first(2)).name(),
            "cpuset outer=0-1"
        );
        assert_eq!(Step::weight(&outer, 300).name(), "weight outer=300");
        assert_eq!(
            Step::move_group("a", &inner).name(),
            "move a -> outer/inner"
        );
        assert_eq!(Step::offline(1).name(), "offline cpu1");
        assert_eq!(Step::online(1).named("back").name(), "back");
        let groups = [("a".to_string(), 2)];
        assert!(Step::move_group("a", &inner).validate(&groups).is_ok());
        assert!(Step::move_worker("a", 2, &inner)
            .validate(&groups)
            .unwrap_err()
            .to_string()
            .contains("group a has 2 workers"));
        assert!(Step::move_group("b", &inner)
            .validate(&groups)
            .unwrap_err()
            .to_string()
            .starts_with("step move b -> outer/inner: no worker group"));
        assert!(Step::cpuset(&outer, CpuSet::empty())
            .validate(&groups)
            .is_err());
        assert!(Step::weight(&outer, 0).validate(&groups).is_err());
    }

    #[test]
    fn undo_removes_deepest_first() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = a.join("b");
        std::fs::create_dir_all(&b).unwrap();
        let mut u = Undo {
            offlined: vec![],
            created: vec![a.clone(), b.clone()],
        };
        u.run().unwrap();
        assert!(!a.exists());
    }
}
