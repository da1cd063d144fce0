//! Example ktstr tests live in tests/.
//! What several test files name lives here.

use ktstr_runtime::prelude::Scheduler;

/// The scx project's schedulers (crates.io, built by scripts/build-scx-rs.sh).
/// They register versioned ops names (`bpfland_1.1.4_x86_64_unknown_linux_gnu`).
pub const BPFLAND: Scheduler = Scheduler::new("scx_bpfland");
/// rusty's userspace load balancer and BPF verification are slow under TCG.
pub const RUSTY: Scheduler = Scheduler::new("scx_rusty").attach_timeout_s(60);
