//! What the host does with a finished run, whoever started it (nextest's
//! `--exact`, a plain `cargo test` wrapper, an exported `.run`): name the
//! cause, print the body's output, save the artifacts. Saving can fail;
//! that is one warning line and never changes the verdict.

use std::path::PathBuf;

use crate::artifacts::{self, KernelJson, ResultJson, TimingsJson};
use crate::cause::{self, Facts};
use crate::host::Run;
use crate::registry::TestDef;
use crate::verdict::Verdict;

/// `name` is what nextest ran (`ktstr/x[/kernel_y]`). Returns the verdict
/// (with its cause) and the artifact directory, when it was written.
pub fn conclude(name: &str, def: &TestDef, mut run: Run) -> (Verdict, Option<PathBuf>) {
    let at = format!("{}:{}", def.file, def.line);
    let console = run.vm.as_ref().map_or("", |r| r.console.as_str());
    run.verdict.cause =
        cause::classify(&Facts { verdict: &run.verdict, exit: run.vm.as_ref().map(|r| &r.exit), console, test_at: Some(&at) });
    if let Some(note) = contention_note(&run.verdict, vcpu_wait_pct(def, &run)) {
        run.verdict.cause.push_str(&note);
    }
    if !run.output_printed {
        crate::output::print(&run.output);
    }
    // Variants keep their own artifacts: `gauntlet/{name}/{preset}`.
    let base = match def.preset {
        Some(p) => format!("{}{}/{}", crate::nextest::GAUNTLET_PREFIX, def.name, p.name),
        None => format!("ktstr/{}", def.name),
    };
    let kernel_dir = match (&run.kernel, def.host_only) {
        (_, true) => "host".to_string(),
        (Some(k), false) => k.dir.clone(),
        (None, false) => "kernel_unresolved".to_string(),
    };
    let dir = artifacts::dir(&artifacts::root(), &artifacts::run_id(), &base, &kernel_dir, artifacts::repeat());
    let result = result_json(name, def, &run);
    match artifacts::write(&dir, &result, run.vm.as_ref().map(|r| r.console.as_str()), &run.output) {
        Ok(()) => (run.verdict, Some(dir)),
        Err(e) => {
            eprintln!(
                "ktstr: warning: could not save the run artifacts to {}: {e} (set {} to a writable directory)",
                dir.display(),
                artifacts::DIR_ENV
            );
            (run.verdict, None)
        }
    }
}

fn result_json(name: &str, def: &TestDef, run: &Run) -> ResultJson {
    let v = &run.verdict;
    let host_release = || std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let kernel = match (&run.kernel, def.host_only) {
        (_, true) => KernelJson { label: "host".into(), image: None, release: host_release() },
        (Some(k), false) => KernelJson {
            label: k.label.clone(),
            image: k.image.as_ref().map(|p| p.display().to_string()),
            release: v.kernel_release.clone(),
        },
        (None, false) => KernelJson { label: String::new(), image: None, release: String::new() },
    };
    let backend = match (&run.vm, def.host_only) {
        (_, true) => "host".to_string(),
        (Some(r), false) => r.backend.to_string(),
        (None, false) => "none".to_string(),
    };
    let topology = (!def.host_only).then(|| {
        let t = def.topology;
        serde_json::json!({
            "numa_nodes": t.numa_nodes, "llcs": t.llcs, "cores": t.cores, "threads": t.threads,
            "cpus": t.total_cpus(), "memory_mib": def.memory_mib,
            "preset": def.preset.map(|p| p.name), "cpus_override": def.cpus_override,
        })
    });
    let timings = TimingsJson {
        setup_s: run.vm.as_ref().map(|r| r.timings.setup.as_secs_f64()),
        to_init_s: run.vm.as_ref().and_then(|r| r.timings.to_init).map(|d| d.as_secs_f64()),
        vm_total_s: run.vm.as_ref().map(|r| r.timings.total.as_secs_f64()),
        wall_s: run.wall.as_secs_f64(),
        vcpu_wait_pct: vcpu_wait_pct(def, run),
        to_body_s: run.vm.as_ref().and_then(|r| r.timings.to_body).map(|d| d.as_secs_f64()),
    };
    ResultJson {
        schema: artifacts::SCHEMA,
        test: name.to_string(),
        kernel,
        backend,
        topology,
        scheduler: def.scheduler.map(|s| s.name.to_string()),
        outcome: v.outcome,
        cause: v.cause.clone(),
        message: v.message.clone(),
        details: v.details.clone(),
        timings,
        metrics: match &v.metrics {
            Some(m) if m.is_object() => (**m).clone(),
            _ => serde_json::json!({}),
        },
        repeat: artifacts::repeat(),
        start: (!def.host_only).then(|| serde_json::to_value(&run.start).unwrap_or_default()),
    }
}

/// How much of its vCPUs' time the host withheld from this VM, in %.
fn vcpu_wait_pct(def: &TestDef, run: &Run) -> Option<f64> {
    let vm = run.vm.as_ref()?;
    let waited = vm.timings.vcpu_wait?;
    Some(crate::vmm::host_wait::wait_pct(waited, def.topology.total_cpus(), vm.timings.total))
}

/// A FAIL from a VM the host starved says so in its cause: its CPU-time
/// figures are skewed (TCG has no steal time), whatever else it says.
fn contention_note(v: &Verdict, pct: Option<f64>) -> Option<String> {
    let pct = pct.filter(|p| *p > crate::vmm::host_wait::CONTENTION_PCT)?;
    (v.outcome == crate::verdict::Outcome::Fail).then(|| {
        format!(
            " [host contention: the vCPU threads waited {pct:.0}% of the run for a host CPU; TCG has no steal time, so guest CPU-time figures from this run are skewed]"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fail_under_host_contention_names_it() {
        let fail = Verdict::fail("fair_share: CPU time not shared");
        let note = contention_note(&fail, Some(31.4)).unwrap();
        assert!(note.contains("waited 31% of the run") && note.contains("no steal time"), "{note}");
        assert_eq!(contention_note(&fail, Some(4.0)), None, "below the threshold");
        assert_eq!(contention_note(&fail, None), None, "not measured");
        assert_eq!(contention_note(&Verdict::pass(), Some(50.0)), None, "a pass needs no excuse");
    }
}
