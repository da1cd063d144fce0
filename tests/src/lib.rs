//! Example ktstr tests live in tests/.
//! What several test files name lives here.

use ktstr_runtime::prelude::Scheduler;

/// The scx project's schedulers (crates.io, built by scripts/build-scx-rs.sh).
/// They register versioned ops names (`bpfland_1.1.4_x86_64_unknown_linux_gnu`).
pub const BPFLAND: Scheduler = Scheduler::new("scx_bpfland");
/// rusty's userspace load balancer and BPF verification are slow under TCG.
pub const RUSTY: Scheduler = Scheduler::new("scx_rusty").attach_timeout_s(60);

/// Drives the running test binary like nextest does (`NEXTEST=1 --exact
/// NAME`), for tests that check another test's verdict and output.
pub mod driver {
    use std::process::Command;

    use ktstr_runtime::testing;

    /// A child run's exit code and stderr.
    pub struct Run {
        pub code: i32,
        pub stderr: String,
    }

    /// The Debian cloud image named by `KTSTR_DEBIAN_KERNEL`; `None` when
    /// unset, a missing premise (`what` says which), so the caller fails
    /// under KTSTR_NO_SKIP_MODE=1 instead of passing.
    pub fn debian_kernel(what: &str) -> Option<String> {
        let deb = std::env::var("KTSTR_DEBIAN_KERNEL").ok().filter(|v| !v.is_empty());
        testing::require(deb, what, "set it to the Debian 6.12 cloud vmlinuz (.ci/run does)")
    }

    /// `name` in a child of this binary, with our environment minus the
    /// skip settings (so a skip shows as one, whatever the caller's mode),
    /// changed by `env` (an empty value removes the variable). Its stderr
    /// is echoed indented, so its SKIP lines are not taken for ours.
    pub fn child(name: &str, env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", name, "--ignored", "--nocapture"]).env("NEXTEST", "1");
        for k in ["KTSTR_NO_SKIP_MODE", "KTSTR_SKIP_LOG", "KTSTR_EXPECTED_SKIPS"] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let out = cmd.output().unwrap();
        let r = Run { code: out.status.code().unwrap_or(-1), stderr: String::from_utf8_lossy(&out.stderr).into_owned() };
        eprintln!("{name}: exit {}", r.code);
        for l in r.stderr.lines() {
            eprintln!("  | {l}");
        }
        r
    }

    /// Runs one ktstr test of this binary in single-kernel mode (the first
    /// kernel of a multi-kernel run). `None` when it skipped (no kernel,
    /// or one without sched_ext): a missing premise of the caller, so the
    /// caller fails under KTSTR_NO_SKIP_MODE=1 instead of passing.
    pub fn run_exact(name: &str) -> Option<Run> {
        let first = std::env::var("KTSTR_KERNEL_LIST").ok().and_then(|list| {
            list.split(';').find(|e| !e.is_empty()).and_then(|e| e.split_once('=')).map(|(_, p)| p.to_string())
        });
        let r = match &first {
            Some(p) => child(name, &[("KTSTR_KERNEL_LIST", ""), ("KTSTR_KERNEL", p), ("KTSTR_TEST_KERNEL", "")]),
            None => child(name, &[]),
        };
        let skipped = r.stderr.lines().find_map(|l| l.strip_prefix("ktstr: SKIP: "));
        if let (0, Some(why)) = (r.code, skipped) {
            testing::skip(
                &format!("{name} to run (it skipped: {why})"),
                "point KTSTR_TEST_KERNEL at a ktstr-built kernel with sched_ext (.ci/run does)",
            );
            return None;
        }
        Some(r)
    }
}
