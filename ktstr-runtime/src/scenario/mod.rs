//! Scenarios: steps that change cgroups, move workers or hot-plug CPUs
//! at given times while `ctx.run`'s workers run.
//!
//! ```ignore
//! let a = ctx.cgroup("a")?.cpus(CpuSet::first(2))?;
//! let r = ctx
//!     .scenario()
//!     .at(ms(500), Step::cpuset(&a, CpuSet::first(1)))
//!     .at(ms(1000), Step::offline(1))
//!     .run(&[a.workers(2)], Duration::from_secs(2))?;
//! let shrink = r.step("cpuset a=0")?; // when it really ran (guest ns)
//! ```
//!
//! A thread of the test process sleeps until each step's time (from the
//! instant the workers start), runs it and records when it ran; the
//! first failing step stops the rest and fails the run with one line
//! naming it. At the end CPUs taken offline come back online and cgroups
//! the steps created are removed.

pub mod cpusets;
pub mod step;

use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub use cpusets::TopoSets;
pub use step::{CgroupRef, Step, StepCtx};

use crate::ctx::Ctx;
use crate::report::Report;
use crate::work::tally::now_ns;
use crate::workers::WorkerGroup;

/// When a step ran: guest CLOCK_MONOTONIC ns, like worker traces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    /// When it was asked for, from the run's start.
    pub at_ms: f64,
    /// When it started and ended (guest monotonic ns).
    pub start_ns: u64,
    pub end_ns: u64,
    /// When it started, from the run's start (lateness = this − `at_ms`).
    pub offset_ms: f64,
    pub took_ms: f64,
    /// Set when it failed; later steps did not run.
    pub error: Option<String>,
}

/// Steps in time order (equal times keep the order given).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub(crate) steps: Vec<(Duration, Step)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether a step takes a CPU offline or online (never on a host).
    pub(crate) fn has_hotplug(&self) -> bool {
        self.steps.iter().any(|(_, s)| matches!(s.action, step::Action::Offline(_) | step::Action::Online(_)))
    }

    /// Sorts the steps and refuses any past the run's end or naming a group
    /// the run does not have.
    pub(crate) fn prepare(&mut self, groups: &[WorkerGroup], dur: Duration) -> Result<()> {
        self.steps.sort_by_key(|(t, _)| *t);
        let shape: Vec<(String, usize)> = groups.iter().map(|g| (g.label.clone(), g.n)).collect();
        for (t, s) in &self.steps {
            if *t >= dur {
                bail!(
                    "step {} at {} ms is not before the run's end ({} ms)",
                    s.name,
                    t.as_millis(),
                    dur.as_millis()
                );
            }
            s.validate(&shape)?;
        }
        Ok(())
    }

    /// Runs every step at `start_ns + its time`; stops at the first failure.
    pub(crate) fn execute(
        &self,
        start_ns: u64,
        workers: &[(String, usize, i32)],
        undo: &mut step::Undo,
    ) -> Vec<StepRecord> {
        let sc = StepCtx { start_ns, workers };
        let mut out = Vec::new();
        for (t, s) in &self.steps {
            sleep_until(start_ns + t.as_nanos() as u64);
            let t0 = now_ns();
            // A panicking closure fails its step like an error does.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.apply(&sc, undo))).unwrap_or_else(|p| {
                let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                Err(anyhow::anyhow!("panicked: {}", msg.unwrap_or_default()))
            });
            let t1 = now_ns();
            let error = r.err().map(|e| format!("{e:#}"));
            let failed = error.is_some();
            out.push(StepRecord {
                name: s.name.clone(),
                at_ms: t.as_secs_f64() * 1e3,
                start_ns: t0,
                end_ns: t1,
                offset_ms: t0.saturating_sub(start_ns) as f64 / 1e6,
                took_ms: (t1 - t0) as f64 / 1e6,
                error,
            });
            if failed {
                break;
            }
        }
        out
    }
}

fn sleep_until(at: u64) {
    let ts = libc::timespec {
        tv_sec: (at / 1_000_000_000) as i64,
        tv_nsec: (at % 1_000_000_000) as i64,
    };
    // SAFETY: an absolute CLOCK_MONOTONIC sleep; retried on EINTR.
    while unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    } == libc::EINTR
    {}
}

/// The first failed step, else the failed cleanup, as the run's one-line error.
pub(crate) fn failure(records: &[StepRecord], cleanup_error: Option<&str>) -> Option<String> {
    records
        .iter()
        .find_map(|r| {
            r.error.as_ref().map(|e| {
                format!(
                    "scenario step `{}` (at {:.0} ms, ran at {:.0} ms) failed: {e}",
                    r.name, r.at_ms, r.offset_ms
                )
            })
        })
        .or_else(|| cleanup_error.map(|e| format!("scenario cleanup after the run failed: {e}")))
}

/// A run with steps; built by [`Ctx::scenario`].
pub struct Scenario<'c> {
    ctx: &'c Ctx,
    plan: Plan,
}

impl<'c> Scenario<'c> {
    pub(crate) fn new(ctx: &'c Ctx) -> Self {
        Self {
            ctx,
            plan: Plan::default(),
        }
    }
    /// Runs `step` at `t` from the run's start.
    pub fn at(mut self, t: Duration, step: Step) -> Self {
        self.plan.steps.push((t, step));
        self
    }
    /// Like `ctx.run`, with the steps; `Report::steps` says when each ran.
    pub fn run(self, groups: &[WorkerGroup], dur: Duration) -> Result<Report> {
        self.ctx.run_plan(groups, dur, self.plan)
    }
}

impl Report {
    /// The record of the step named `name` (see `Step::name`).
    pub fn step(&self, name: &str) -> Result<&StepRecord> {
        self.steps.iter().find(|s| s.name == name).ok_or_else(|| {
            let have: Vec<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
            anyhow::anyhow!("no step named {name:?} in this report; it has {have:?}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::Work;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn steps_run_in_time_order_and_stop_at_a_failure() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = |name: &'static str, ok: bool| {
            let log = log.clone();
            Step::custom(name, move |_| {
                log.lock().unwrap().push(name);
                if ok {
                    Ok(())
                } else {
                    bail!("boom")
                }
            })
        };
        let mut p = Plan {
            steps: vec![
                (ms(30), l("c", true)),
                (ms(10), l("a", true)),
                (ms(10), l("b", true)),
                (ms(40), l("d", false)),
                (ms(45), l("e", true)),
            ],
        };
        let g = [WorkerGroup::new("w", None, 1, Work::Spin)];
        p.prepare(&g, ms(50)).unwrap();
        let start = now_ns();
        let mut undo = step::Undo::default();
        let recs = p.execute(start, &[], &mut undo);
        let mut q = Plan { steps: vec![(ms(1), Step::custom("p", |_| panic!("oops")))] };
        q.prepare(&g, ms(50)).unwrap();
        let rq = q.execute(now_ns(), &[], &mut undo);
        assert_eq!(rq[0].error.as_deref(), Some("panicked: oops"));
        assert_eq!(
            *log.lock().unwrap(),
            ["a", "b", "c", "d"],
            "equal times keep their order; nothing after a failure"
        );
        assert_eq!(recs.len(), 4);
        assert!(recs[0].start_ns >= start + 10_000_000 && recs[2].start_ns >= start + 30_000_000);
        assert!(recs.windows(2).all(|w| w[0].end_ns <= w[1].start_ns));
        assert_eq!(recs[0].at_ms, 10.0);
        let f = failure(&recs, None).unwrap();
        // How late the step ran depends on host load: only its bound is fixed.
        assert!(
            f.starts_with("scenario step `d` (at 40 ms, ran at ") && f.ends_with("failed: boom"),
            "{f}"
        );
        assert!(recs[3].offset_ms >= 40.0, "{f}");
        assert_eq!(
            failure(&recs, Some("x")).as_deref(),
            Some(f.as_str()),
            "a failed step comes before a failed cleanup"
        );
        assert_eq!(
            failure(&recs[..3], Some("removing cgroup y: busy")).as_deref(),
            Some("scenario cleanup after the run failed: removing cgroup y: busy")
        );
        assert_eq!(failure(&recs[..3], None), None);
    }

    #[test]
    fn steps_past_the_end_or_naming_unknown_groups_are_refused() {
        let g = [WorkerGroup::new("w", None, 1, Work::Spin)];
        let mut p = Plan {
            steps: vec![(ms(50), Step::offline(1))],
        };
        assert!(p.has_hotplug(), "refused on a host");
        assert!(!Plan { steps: vec![(ms(5), Step::weight(CgroupRef::new("/c"), 5))] }.has_hotplug());
        assert_eq!(
            p.prepare(&g, ms(50)).unwrap_err().to_string(),
            "step offline cpu1 at 50 ms is not before the run's end (50 ms)"
        );
        let mut p = Plan {
            steps: vec![(
                ms(5),
                Step::move_group("x", CgroupRef::new("/c/ktstr-1/a")),
            )],
        };
        assert!(p
            .prepare(&g, ms(50))
            .unwrap_err()
            .to_string()
            .contains("no worker group labelled \"x\""));
    }
}
