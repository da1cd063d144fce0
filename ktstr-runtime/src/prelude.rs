//! `use ktstr_runtime::prelude::*;` — what a test file needs.

pub use crate::cgroup::Cgroup;
pub use crate::checks::Checks;
pub use crate::cpuset::CpuSet;
pub use crate::ctx::{Ctx, SeenTopology};
pub use crate::guest::supervise::Skip;
pub use crate::report::{Report, WorkerReport};
pub use crate::scenario::{CgroupRef, Step, StepCtx, StepRecord, TopoSets};
pub use crate::scheduler::{OpsName, Scheduler};
pub use crate::vmm::Topology;
pub use crate::metrics::Histogram;
pub use crate::policy::Policy;
pub use crate::summary::{GroupMetrics, ReportMetrics, WorkerMetrics};
pub use crate::workers::{Phase, Work, WorkerGroup};
pub use anyhow::{anyhow, bail, ensure, Context as _, Result};
pub use ktstr_macros::ktstr_test;
pub use std::time::Duration;
