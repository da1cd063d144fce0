//! `Ctx`: what a test body gets, in the guest (or on the host for
//! `host_only` tests).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cgroup::{enable_controllers, Cgroup, CGROUP_ROOT};
use crate::cpuset::CpuSet;
use crate::registry::TestDef;
use crate::report::Report;
use crate::vmm::Topology;
use crate::workers::{self, Work, WorkerGroup};

/// The topology the guest kernel reports in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenTopology {
    pub online: CpuSet,
    pub numa_nodes: u32,
    /// Distinct last-level caches; `None` when sysfs has no cache info.
    pub llcs: Option<u32>,
    /// Distinct (package, core) pairs.
    pub cores: u32,
    /// Threads per core (largest sibling set).
    pub threads_per_core: u32,
}

fn read(p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

impl SeenTopology {
    pub fn read() -> Result<Self> {
        let sys = Path::new("/sys/devices/system");
        let online = CpuSet::parse(&read(sys.join("cpu/online")).context("read /sys/devices/system/cpu/online")?)
            .map_err(anyhow::Error::msg)?;
        let numa_nodes = std::fs::read_dir(sys.join("node"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("node").is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .count() as u32
            })
            .unwrap_or(1)
            .max(1);
        let mut llcs = BTreeSet::new();
        let mut cores = BTreeSet::new();
        let mut threads = 1;
        for cpu in online.iter() {
            let dir = sys.join(format!("cpu/cpu{cpu}"));
            // The highest cache index is the last level.
            let llc = (0..8).rev().find_map(|i| read(dir.join(format!("cache/index{i}/shared_cpu_list"))));
            if let Some(l) = llc {
                llcs.insert(l);
            }
            let pkg = read(dir.join("topology/physical_package_id")).unwrap_or_default();
            let core = read(dir.join("topology/core_id")).unwrap_or_else(|| cpu.to_string());
            cores.insert((pkg, core));
            if let Some(s) = read(dir.join("topology/thread_siblings_list")).and_then(|s| CpuSet::parse(&s).ok()) {
                threads = threads.max(s.len());
            }
        }
        Ok(Self {
            online,
            numa_nodes,
            llcs: if llcs.is_empty() { None } else { Some(llcs.len() as u32) },
            cores: cores.len() as u32,
            threads_per_core: threads,
        })
    }
}

pub struct Ctx {
    def: &'static TestDef,
    in_guest: bool,
    cgroup_parent: RefCell<Option<PathBuf>>,
    /// Figures of every `run` so far, for `result.json`.
    runs: RefCell<Vec<serde_json::Value>>,
}

impl Ctx {
    pub(crate) fn new(def: &'static TestDef, in_guest: bool) -> Self {
        Self { def, in_guest, cgroup_parent: RefCell::new(None), runs: RefCell::new(Vec::new()) }
    }

    /// The test's name (without `ktstr/` or a kernel suffix).
    pub fn name(&self) -> &'static str {
        self.def.name
    }

    /// True inside the VM, false for `host_only` tests.
    pub fn in_guest(&self) -> bool {
        self.in_guest
    }

    /// The topology this run boots: the test's own, its gauntlet preset's,
    /// or its own resized by `KTSTR_CPUS` ([`crate::cpu_override`]).
    pub fn topology(&self) -> Topology {
        self.def.topology
    }

    /// The vCPU count `KTSTR_CPUS` resized this run to; `None` otherwise.
    pub fn cpus_override(&self) -> Option<u32> {
        self.def.cpus_override
    }

    /// The gauntlet preset this run boots (`gauntlet/{name}/{preset}`);
    /// `None` on the test's own topology. `topology()` is the preset's.
    pub fn preset(&self) -> Option<&'static crate::preset::Preset> {
        self.def.preset
    }

    /// What the running kernel reports in sysfs.
    pub fn seen_topology(&self) -> Result<SeenTopology> {
        SeenTopology::read()
    }

    /// Fails unless the guest sees the CPUs, nodes and (when sysfs has
    /// cache info) LLCs and threads per core the test asked for.
    pub fn assert_topology(&self) -> Result<SeenTopology> {
        let want = self.topology();
        let seen = self.seen_topology()?;
        let mut bad = Vec::new();
        if seen.online.len() != want.total_cpus() {
            bad.push(format!("{} CPUs online, asked {}", seen.online.len(), want.total_cpus()));
        }
        if seen.numa_nodes != want.numa_nodes {
            bad.push(format!("{} NUMA nodes, asked {}", seen.numa_nodes, want.numa_nodes));
        }
        if seen.llcs.is_some_and(|l| l != want.total_llcs()) {
            bad.push(format!("{} LLCs, asked {}", seen.llcs.unwrap_or(0), want.total_llcs()));
        }
        if seen.threads_per_core != want.threads {
            bad.push(format!("{} threads per core, asked {}", seen.threads_per_core, want.threads));
        }
        if !bad.is_empty() {
            bail!("guest topology differs from the request: {} (seen {seen:?})", bad.join("; "));
        }
        Ok(seen)
    }

    /// Every CPU this test may use.
    pub fn all_cpus(&self) -> CpuSet {
        workers::affinity()
    }

    /// Guest path of a file named in `include_files` (by its file name).
    pub fn include(&self, file_name: &str) -> Result<PathBuf> {
        let (i, host) = self
            .def
            .include_files
            .iter()
            .enumerate()
            .find(|(_, f)| Path::new(f).file_name().is_some_and(|n| n == file_name))
            .with_context(|| format!("{file_name} is not in this test's include_files"))?;
        // An exported .run extracts include files into KTSTR_INCLUDE_DIR.
        Ok(match std::env::var_os("KTSTR_INCLUDE_DIR") {
            _ if self.in_guest => PathBuf::from(TestDef::guest_include_path(host)),
            Some(dir) => PathBuf::from(dir).join(file_name),
            None => self.def.include_source(i).with_context(|| format!("include file {host}"))?,
        })
    }

    /// Path of a program named in `host_tools` (by its file name): in the
    /// guest `/ktstr/bin/{name}` (also first on the guest's `PATH`); on the
    /// host (`host_only`, an exported `.run`) wherever the host has it, and
    /// a [`Skip`](crate::guest::supervise::Skip) when it has not.
    pub fn tool(&self, name: &str) -> Result<PathBuf> {
        let tool = self
            .def
            .host_tools
            .iter()
            .find(|t| crate::host_tools::name(t) == name)
            .with_context(|| format!("{name} is not in this test's host_tools"))?;
        if self.in_guest {
            let p = PathBuf::from(crate::host_tools::guest_path(tool));
            if !p.is_file() {
                bail!("{} is not in the guest: the host did not pack host tool {tool}", p.display());
            }
            return Ok(p);
        }
        crate::host_tools::find(tool).map_err(|m| crate::guest::supervise::Skip(m.to_string()).into())
    }

    fn parent(&self) -> Result<PathBuf> {
        if let Some(p) = self.cgroup_parent.borrow().as_ref() {
            return Ok(p.clone());
        }
        let root = Path::new(CGROUP_ROOT);
        if !root.join("cgroup.controllers").exists() {
            bail!("no cgroup v2 hierarchy at {CGROUP_ROOT}");
        }
        // One parent per test process keeps host_only runs apart.
        let p = root.join(format!("ktstr-{}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("create cgroup {}", p.display())),
        }
        let missing = enable_controllers(&p, &["cpu", "cpuset"]);
        if !missing.is_empty() {
            bail!("cgroup controllers {missing:?} not available under {}", p.display());
        }
        *self.cgroup_parent.borrow_mut() = Some(p.clone());
        Ok(p)
    }

    /// Creates a cgroup (cpu and cpuset controllers enabled) for this test.
    pub fn cgroup(&self, name: &str) -> Result<Cgroup> {
        Cgroup::create(&self.parent()?, name)
    }

    /// `n` CPU spinners outside any test cgroup.
    pub fn workers(&self, n: usize) -> WorkerGroup {
        WorkerGroup::new("workers", None, n, Work::Spin)
    }

    /// `n` sleep/wake workers outside any test cgroup.
    pub fn sleepers(&self, n: usize, run: Duration, sleep: Duration) -> WorkerGroup {
        WorkerGroup::new("sleepers", None, n, Work::SleepWake { run, sleep })
    }

    /// `n` workers of any work type outside any test cgroup, labelled by
    /// the work type's name (`.label()` renames them).
    pub fn work(&self, n: usize, work: Work) -> WorkerGroup {
        WorkerGroup::new(work.name(), None, n, work)
    }

    /// Runs every group's workers at once for `dur` and collects reports,
    /// records their metrics for `result.json`, then applies the
    /// checks the test declared in its attribute.
    pub fn run(&self, groups: &[WorkerGroup], dur: Duration) -> Result<Report> {
        self.run_plan(groups, dur, crate::scenario::Plan::default())
    }

    /// A run with steps at given times: `ctx.scenario().at(t, Step::…)…run(&groups, dur)`
    /// (see [`crate::scenario`]).
    pub fn scenario(&self) -> crate::scenario::Scenario<'_> {
        crate::scenario::Scenario::new(self)
    }

    /// Cpusets from the topology the guest reports: per LLC, per NUMA
    /// node, halves, sets overlapping by N CPUs.
    pub fn cpusets(&self) -> Result<crate::scenario::TopoSets> {
        crate::scenario::TopoSets::read()
    }

    pub(crate) fn run_plan(&self, groups: &[WorkerGroup], dur: Duration, plan: crate::scenario::Plan) -> Result<Report> {
        if !self.in_guest && plan.has_hotplug() {
            bail!("CPU hotplug steps run only in the guest; this test runs on the host (host_only or an exported .run)");
        }
        let r = workers::run_plan(groups, dur, plan)?;
        self.runs.borrow_mut().push(serde_json::to_value(r.metrics()).unwrap_or_default());
        if let Some(e) = crate::scenario::failure(&r.steps, r.cleanup_error.as_deref()) {
            bail!("{e}");
        }
        r.check(&self.def.checks)?;
        Ok(r)
    }

    /// `{"runs": [...]}`, one entry per `run` (`Report::metrics`).
    pub(crate) fn metrics(&self) -> serde_json::Value {
        serde_json::json!({ "runs": *self.runs.borrow() })
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if let Some(p) = self.cgroup_parent.borrow().as_ref() {
            let _ = std::fs::remove_dir(p);
        }
    }
}
