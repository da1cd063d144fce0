//! sched_ext schedulers under test: what a test names
//! ([`Scheduler`]), where the host finds the binary ([`host`]), and how
//! the guest starts it, proves it attached, watches it and stops it
//! ([`guest`]).
//!
//! ```ignore
//! const SIMPLE: Scheduler = Scheduler::new("scx_simple").binary("scx_simple").args(&["-f"]);
//! ```

// Failures carry the scheduler's output; they happen once per test, size is no concern.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

pub mod guest;
pub mod host;
pub mod kmsg;

use std::fmt;

/// Where the host packs the scheduler binary in the initramfs.
pub const GUEST_DIR: &str = "/ktstr/sched";

/// A sched_ext scheduler a test runs under. All builders are `const fn`
/// so tests declare schedulers as `const`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduler {
    /// Name used in messages and in the guest path.
    pub name: &'static str,
    /// Binary: a bare name (looked up, see [`host::find_binary`]) or a
    /// path (contains `/`).
    pub binary: &'static str,
    pub args: &'static [&'static str],
    /// The name `/sys/kernel/sched_ext/root/ops` is expected to show once
    /// attached (see [`Scheduler::classify_ops`]); `None` expects `name`
    /// or `name` without its `scx_` prefix. Informational: attach is
    /// judged by sched_ext enabling after the start, whatever the name.
    pub ops_name: Option<&'static str>,
    /// Bound on start → `enabled`. BPF verification under TCG is slow.
    pub attach_timeout_s: u64,
    /// Bound on SIGINT → process exit → `disabled`.
    pub stop_timeout_s: u64,
}

impl Scheduler {
    pub const fn new(name: &'static str) -> Self {
        Self { name, binary: name, args: &[], ops_name: None, attach_timeout_s: 30, stop_timeout_s: 15 }
    }
    pub const fn binary(mut self, binary: &'static str) -> Self {
        self.binary = binary;
        self
    }
    pub const fn args(mut self, args: &'static [&'static str]) -> Self {
        self.args = args;
        self
    }
    pub const fn ops_name(mut self, ops: &'static str) -> Self {
        self.ops_name = Some(ops);
        self
    }
    pub const fn attach_timeout_s(mut self, s: u64) -> Self {
        self.attach_timeout_s = s;
        self
    }
    pub const fn stop_timeout_s(mut self, s: u64) -> Self {
        self.stop_timeout_s = s;
        self
    }

    /// How an ops name sched_ext reports (`root/ops` or the kernel's
    /// `BPF scheduler "X" enabled` line) relates to the declared name.
    pub fn classify_ops(&self, ops: &str) -> OpsName {
        let ops = ops.trim();
        if ops.is_empty() {
            return OpsName::Absent;
        }
        let bases: &[&str] = match self.ops_name {
            Some(want) => &[want],
            None => &[self.name, self.name.strip_prefix("scx_").unwrap_or(self.name)],
        };
        if bases.contains(&ops) {
            return OpsName::Exact;
        }
        // scx_utils names ops `BASE_VERSION_TARGET` (bpfland_1.1.4_x86_64_unknown_linux_gnu).
        let versioned = |b: &&str| {
            ops.strip_prefix(*b).and_then(|r| r.strip_prefix('_')).is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        };
        if bases.iter().any(versioned) {
            OpsName::Versioned
        } else {
            OpsName::Unexpected
        }
    }

    /// Whether `ops` names this scheduler, exactly or in the versioned form.
    pub fn ops_matches(&self, ops: &str) -> bool {
        matches!(self.classify_ops(ops), OpsName::Exact | OpsName::Versioned)
    }

    /// Path of the binary inside the guest (named after the scheduler, so
    /// two schedulers sharing a binary basename cannot collide).
    pub fn guest_path(&self) -> String {
        let safe: String =
            self.name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
        format!("{GUEST_DIR}/{safe}")
    }
}

/// How a reported ops name relates to a scheduler's declared name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsName {
    /// The declared ops name, the scheduler name, or the name without `scx_`.
    Exact,
    /// One of those followed by `_VERSION…`, as the scx project's
    /// schedulers register (`bpfland_1.1.4_x86_64_unknown_linux_gnu`).
    Versioned,
    /// Something else: still our scheduler if it enabled after our start.
    Unexpected,
    /// Empty: nothing is loaded.
    Absent,
}

/// Why sched_ext disabled a scheduler: the kernel's `enum scx_exit_kind`,
/// recognised by the reason string it logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// "unregistered from user space": the scheduler detached itself.
    UnregUser,
    /// "unregistered from BPF": the BPF side called `scx_bpf_exit()`.
    UnregBpf,
    /// "unregistered from the main kernel".
    UnregKernel,
    /// "disabled by sysrq-S".
    SysRq,
    /// "runtime error": the kernel caught the scheduler misbehaving.
    Error,
    /// "scx_bpf_error": the BPF scheduler reported an error itself.
    ErrorBpf,
    /// "runnable task stall": the watchdog found a task not run in time.
    Stall,
    /// A reason this version does not know.
    Other(String),
}

impl ExitKind {
    pub fn from_reason(reason: &str) -> Self {
        match reason {
            "unregistered from user space" => Self::UnregUser,
            "unregistered from BPF" => Self::UnregBpf,
            "unregistered from the main kernel" => Self::UnregKernel,
            "disabled by sysrq-S" => Self::SysRq,
            "runtime error" => Self::Error,
            "scx_bpf_error" => Self::ErrorBpf,
            "runnable task stall" => Self::Stall,
            other => Self::Other(other.to_string()),
        }
    }

    /// The kernel's reason string.
    pub fn reason(&self) -> &str {
        match self {
            Self::UnregUser => "unregistered from user space",
            Self::UnregBpf => "unregistered from BPF",
            Self::UnregKernel => "unregistered from the main kernel",
            Self::SysRq => "disabled by sysrq-S",
            Self::Error => "runtime error",
            Self::ErrorBpf => "scx_bpf_error",
            Self::Stall => "runnable task stall",
            Self::Other(s) => s,
        }
    }

    /// `SCX_EXIT_ERROR` and above (the kernel logs these with pr_err).
    pub fn is_error(&self) -> bool {
        matches!(self, Self::Error | Self::ErrorBpf | Self::Stall | Self::Other(_))
    }
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self {
            Self::UnregUser => "unreg_user",
            Self::UnregBpf => "unreg_bpf",
            Self::UnregKernel => "unreg_kernel",
            Self::SysRq => "sysrq",
            Self::Error => "error",
            Self::ErrorBpf => "error_bpf",
            Self::Stall => "stall",
            Self::Other(_) => "unknown",
        };
        write!(f, "{tag} ({})", self.reason())
    }
}

/// One sched_ext disable the kernel logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelExit {
    /// The ops name in the message.
    pub ops: String,
    pub kind: ExitKind,
    /// The `sched_ext: OPS: MSG` line after it (e.g. the scx_bpf_error text).
    pub msg: Option<String>,
    /// The kernel log from the disable line on (message, backtrace).
    pub log: Vec<String>,
}

impl fmt::Display for KernelExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sched_ext exit kind {}", self.kind)?;
        if let Some(m) = &self.msg {
            write!(f, ": {}: {m}", self.ops)?;
        }
        Ok(())
    }
}

/// What the scheduler process printed, kept for failure details.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    /// sched_ext lines from the kernel log since the scheduler started.
    pub kernel: Vec<String>,
}

const STDOUT_TAIL_LINES: usize = 30;

impl Output {
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.kernel.is_empty() {
            s.push_str("--- kernel log (sched_ext) ---\n");
            for l in &self.kernel {
                s.push_str(l);
                s.push('\n');
            }
        }
        // stderr carries libbpf errors and the "EXIT:" line with the sched_ext dump.
        s.push_str("--- scheduler stderr ---\n");
        s.push_str(if self.stderr.trim().is_empty() { "(empty)\n" } else { &self.stderr });
        if !s.ends_with('\n') {
            s.push('\n');
        }
        let lines: Vec<&str> = self.stdout.lines().collect();
        let skip = lines.len().saturating_sub(STDOUT_TAIL_LINES);
        s.push_str(&format!("--- scheduler stdout (last {} of {} lines) ---\n", lines.len() - skip, lines.len()));
        for l in &lines[skip..] {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

/// How a running scheduler was lost during the test body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EjectKind {
    /// The kernel disabled it and logged why.
    Kernel(KernelExit),
    /// The process died (status given); the kernel logged no error, at
    /// most the plain detach that follows a process exit.
    ProcessDied { status: String, kernel: Option<KernelExit> },
    /// sched_ext left `enabled` (now this state) without a kernel message.
    StateChanged(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    pub scheduler: String,
    pub kind: EjectKind,
    /// Exit status of the scheduler process, if it has exited.
    pub process: Option<String>,
    pub output: Output,
}

impl fmt::Display for Ejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            EjectKind::Kernel(k) if k.kind.is_error() => {
                write!(f, "scheduler {} was ejected by the kernel: {k}", self.scheduler)?
            }
            EjectKind::Kernel(k) => write!(f, "scheduler {} left sched_ext during the test: {k}", self.scheduler)?,
            EjectKind::ProcessDied { status, kernel: None } => {
                write!(f, "scheduler {} died during the test ({status}); the kernel logged no sched_ext exit", self.scheduler)?
            }
            EjectKind::ProcessDied { status, kernel: Some(k) } => {
                write!(f, "scheduler {} died during the test ({status}); then {k}", self.scheduler)?
            }
            EjectKind::StateChanged(st) => {
                write!(f, "scheduler {} lost: /sys/kernel/sched_ext/state became {st:?}", self.scheduler)?
            }
        }
        if let (Some(p), EjectKind::Kernel(_)) = (&self.process, &self.kind) {
            write!(f, "; the scheduler process then ended ({p})")?;
        }
        Ok(())
    }
}

/// A scheduler problem that fails the test.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchedFail {
    #[error("scheduler {name}: binary `{binary}` not found; looked in: {}", looked.join(", "))]
    BinaryNotFound { name: String, binary: String, looked: Vec<String> },
    #[error("scheduler {name}: cannot start {path}: {error}")]
    Spawn { name: String, path: String, error: String },
    #[error("scheduler {name}: sched_ext is already in use before it started (state {state:?}, ops {ops:?})")]
    Busy { name: String, state: String, ops: String },
    #[error("scheduler {name}: exited before attaching ({status}){}", kernel.as_ref().map(|k| format!("; kernel: {k}")).unwrap_or_default())]
    ExitedBeforeAttach { name: String, status: String, kernel: Option<KernelExit>, output: Output },
    #[error("scheduler {name}: did not attach within {waited_ms} ms (sched_ext state {state:?}, ops {ops:?}); killed it")]
    AttachTimeout { name: String, waited_ms: u128, state: String, ops: String, output: Output },
    #[error("{0}")]
    Ejected(Ejection),
    #[error("scheduler {name}: did not stop cleanly: {why}")]
    StopFailed { name: String, why: String, output: Output },
    #[error("scheduler {name}: {what}")]
    Io { name: String, what: String },
}

impl SchedFail {
    /// Multi-line details for the verdict (scheduler and kernel output).
    pub fn details(&self) -> String {
        match self {
            Self::ExitedBeforeAttach { output, .. }
            | Self::AttachTimeout { output, .. }
            | Self::StopFailed { output, .. } => output.render(),
            Self::Ejected(e) => {
                let mut s = String::new();
                if let EjectKind::Kernel(k) = &e.kind {
                    if !k.log.is_empty() {
                        s.push_str("--- kernel log at the ejection ---\n");
                        for l in &k.log {
                            s.push_str(l);
                            s.push('\n');
                        }
                    }
                }
                s + &e.output.render()
            }
            _ => String::new(),
        }
    }
}

/// `Running::start` either skips (kernel without sched_ext) or fails.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Skip(String),
    #[error("{0}")]
    Fail(#[from] SchedFail),
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: Scheduler = Scheduler::new("scx_simple").binary("scx_simple").args(&["-f"]);

    #[test]
    fn const_builder_and_ops_matching() {
        assert_eq!(SIMPLE.args, &["-f"]);
        assert!(SIMPLE.ops_matches("simple\n"));
        assert!(SIMPLE.ops_matches("scx_simple"));
        assert!(!SIMPLE.ops_matches("qmap"));
        const Q: Scheduler = Scheduler::new("mine").ops_name("qmap");
        assert!(Q.ops_matches("qmap") && !Q.ops_matches("mine"));
        assert_eq!(Scheduler::new("a b/c").guest_path(), "/ktstr/sched/a_b_c");
    }

    #[test]
    fn ops_names_exact_versioned_unexpected_absent() {
        const BPFLAND: Scheduler = Scheduler::new("scx_bpfland");
        let c = |s: &Scheduler, ops: &str| s.classify_ops(ops);
        assert_eq!(c(&BPFLAND, "bpfland"), OpsName::Exact);
        assert_eq!(c(&BPFLAND, "scx_bpfland\n"), OpsName::Exact);
        assert_eq!(c(&BPFLAND, "bpfland_1.1.4_x86_64_unknown_linux_gnu"), OpsName::Versioned);
        assert_eq!(c(&BPFLAND, "scx_bpfland_1.0.0_gdeadbeef_aarch64"), OpsName::Versioned);
        // A longer name sharing the prefix is not a version of it.
        assert_eq!(c(&BPFLAND, "bpfland_next"), OpsName::Unexpected);
        assert_eq!(c(&BPFLAND, "rusty_1.1.4_x86_64_unknown_linux_gnu"), OpsName::Unexpected);
        assert_eq!(c(&BPFLAND, ""), OpsName::Absent);
        assert_eq!(c(&BPFLAND, " \n"), OpsName::Absent);
        // A declared ops name replaces the name-derived ones.
        const Q: Scheduler = Scheduler::new("scx_mine").ops_name("qmap");
        assert_eq!(c(&Q, "qmap_2.0_x86_64"), OpsName::Versioned);
        assert_eq!(c(&Q, "mine"), OpsName::Unexpected);
        assert!(BPFLAND.ops_matches("bpfland_1.1.4_x86_64_unknown_linux_gnu") && !BPFLAND.ops_matches(""));
    }

    #[test]
    fn exit_kinds_round_trip() {
        for k in [
            ExitKind::UnregUser,
            ExitKind::UnregBpf,
            ExitKind::UnregKernel,
            ExitKind::SysRq,
            ExitKind::Error,
            ExitKind::ErrorBpf,
            ExitKind::Stall,
        ] {
            assert_eq!(ExitKind::from_reason(k.reason()), k);
        }
        assert!(ExitKind::Stall.is_error() && ExitKind::ErrorBpf.is_error());
        assert!(!ExitKind::UnregUser.is_error());
        assert_eq!(ExitKind::from_reason("new reason"), ExitKind::Other("new reason".into()));
    }

    #[test]
    fn failure_lines_name_scheduler_kind_and_message() {
        let k = KernelExit {
            ops: "qmap".into(),
            kind: ExitKind::Stall,
            msg: Some("init[47] failed to run for 7.360s".into()),
            log: vec!["sched_ext: BPF scheduler \"qmap\" disabled (runnable task stall)".into(), "  trace+0x1".into()],
        };
        let e = Ejection {
            scheduler: "scx_qmap_stall".into(),
            kind: EjectKind::Kernel(k.clone()),
            process: Some("exit status 0".into()),
            output: Output { stderr: "EXIT: runnable task stall\n".into(), ..Default::default() },
        };
        let f = SchedFail::Ejected(e);
        assert_eq!(
            f.to_string(),
            "scheduler scx_qmap_stall was ejected by the kernel: sched_ext exit kind stall (runnable task stall): \
             qmap: init[47] failed to run for 7.360s; the scheduler process then ended (exit status 0)"
        );
        let d = f.details();
        assert!(d.contains("  trace+0x1") && d.contains("EXIT: runnable task stall"), "{d}");

        let f = SchedFail::ExitedBeforeAttach {
            name: "exits_at_once".into(),
            status: "exit status 1".into(),
            kernel: None,
            output: Output::default(),
        };
        assert_eq!(f.to_string(), "scheduler exits_at_once: exited before attaching (exit status 1)");
        let died = Ejection {
            scheduler: "s".into(),
            kind: EjectKind::ProcessDied { status: "killed by signal 9".into(), kernel: None },
            process: Some("killed by signal 9".into()),
            output: Output::default(),
        };
        assert_eq!(died.to_string(), "scheduler s died during the test (killed by signal 9); the kernel logged no sched_ext exit");
    }

    #[test]
    fn output_keeps_stdout_tail() {
        let o = Output {
            stdout: (0..100).map(|i| format!("line{i}\n")).collect(),
            stderr: "EXIT: boom\n".into(),
            kernel: vec!["sched_ext: x".into()],
        };
        let r = o.render();
        assert!(r.contains("line99") && !r.contains("line69\n") && r.contains("line70"));
        assert!(r.contains("EXIT: boom") && r.contains("sched_ext: x"));
    }
}
