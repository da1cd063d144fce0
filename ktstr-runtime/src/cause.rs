//! The one-line first cause of a failed test: what the FAIL banner's first
//! line and `result.json`'s `cause` say. A pure function of the verdict,
//! how the VM ended and the guest console, so recorded consoles test it.

use crate::verdict::{Outcome, Verdict, CONSOLE_MARKER};
use crate::vmm::ExitKind;

/// What a finished run offers the classifier.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub verdict: &'a Verdict,
    /// How the VM ended; `None` for a run on the host.
    pub exit: Option<&'a ExitKind>,
    /// The whole guest console (empty on the host).
    pub console: &'a str,
    /// `file:line` of the test function, named when the body returned an
    /// error (an error, unlike a panic, carries no location of its own).
    pub test_at: Option<&'a str>,
}

/// Console lines that start a kernel crash report, most specific first.
const OOPS_MARKERS: &[&str] = &["Oops:", "general protection fault", "kernel BUG at", "BUG: ", "Unable to handle kernel"];
const PANIC_MARKER: &str = "Kernel panic - not syncing:";
/// The kernel could not write the initramfs into its rootfs (out of memory).
const UNPACK_MARKER: &str = "Initramfs unpacking failed:";
/// How far after an oops line its `RIP:` line may be.
const RIP_WINDOW: usize = 60;

/// The cause line, or `""` for a pass.
pub fn classify(f: &Facts) -> String {
    if f.verdict.outcome == Outcome::Pass {
        return String::new();
    }
    if f.verdict.outcome == Outcome::Fail {
        if let Some(c) = kernel_crash(f.console) {
            return c;
        }
    }
    let msg = f.verdict.message.trim();
    let mut cause = first_line_with_figure(msg);
    if cause.is_empty() {
        cause = format!("{:?} without a message", f.verdict.outcome).to_lowercase();
    }
    if matches!(f.exit, Some(ExitKind::Timeout)) && f.verdict.outcome == Outcome::Fail {
        if let Some(last) = last_console_line(f.console) {
            cause = format!("VM timeout: {cause}; last console line: {last}");
        } else {
            cause = format!("VM timeout: {cause}");
        }
    }
    if let (Some(at), true) = (f.test_at, msg.starts_with("test body returned an error:")) {
        cause = format!("{cause} (test at {at})");
    }
    cause
}

/// The console line without its `[    1.234567] ` printk timestamp.
fn strip_time(l: &str) -> &str {
    let l = l.trim_end_matches('\r');
    match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((t, rest)) if t.trim().chars().all(|c| c.is_ascii_digit() || c == '.') => rest,
        _ => l,
    }
}

/// The first kernel crash on the console: an oops-like line (with its
/// `RIP:` condensed onto it) before any panic, else the panic line.
pub fn kernel_crash(console: &str) -> Option<String> {
    let lines: Vec<&str> =
        console.lines().filter(|l| !l.contains(CONSOLE_MARKER)).map(strip_time).collect();
    let first = lines
        .iter()
        .position(|l| l.contains(PANIC_MARKER) || OOPS_MARKERS.iter().any(|m| l.contains(m)))?;
    let line = lines[first].trim();
    if line.contains(PANIC_MARKER) {
        let start = line.find(PANIC_MARKER).unwrap_or(0);
        let panic = line[start..].trim_end();
        // No init because the archive did not unpack: say why first.
        if let Some(unpack) = lines[..first].iter().find(|l| l.contains(UNPACK_MARKER)) {
            return Some(format!(
                "{} (the initramfs did not fit in guest memory: raise memory_mib, or install binutils so debug info is stripped), then {panic}",
                unpack.trim()
            ));
        }
        return Some(panic.to_string());
    }
    let rip = lines[first + 1..].iter().take(RIP_WINDOW).find_map(|l| {
        let r = l.split("RIP: ").nth(1)?;
        // `0010:func+0x5/0x10` (x86 kernel mode) → `func+0x5/0x10`.
        let r = r.split_once(':').filter(|(cs, _)| cs.len() == 4 && cs.bytes().all(|b| b.is_ascii_hexdigit())).map_or(r, |(_, f)| f);
        Some(r.trim().to_string())
    });
    Some(match rip {
        Some(rip) => format!("{line} at RIP {rip}"),
        None => line.to_string(),
    })
}

/// The message's first line; a line ending in `:` (a check that lists
/// what failed below it) gets the first listed item, so the banner's first
/// line carries the failing figure.
fn first_line_with_figure(msg: &str) -> String {
    let mut lines = msg.lines().map(str::trim).filter(|l| !l.is_empty());
    let Some(first) = lines.next() else { return String::new() };
    match (first.ends_with(':'), lines.next()) {
        (true, Some(item)) => format!("{first} {item}"),
        _ => first.to_string(),
    }
}

/// The last console line with text that is not ktstr's verdict marker.
fn last_console_line(console: &str) -> Option<String> {
    console
        .lines()
        .rev()
        .filter(|l| !l.contains(CONSOLE_MARKER))
        .map(|l| strip_time(l).trim())
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(v: &'a Verdict, exit: Option<&'a ExitKind>, console: &'a str) -> Facts<'a> {
        Facts { verdict: v, exit, console, test_at: Some("tests/tests/x.rs:7") }
    }

    #[test]
    fn passes_have_no_cause() {
        assert_eq!(classify(&facts(&Verdict::pass(), None, "Kernel panic - not syncing: x")), "");
    }

    #[test]
    fn timestamps_are_stripped() {
        assert_eq!(strip_time("[    1.496991] Kernel panic - not syncing: x\r"), "Kernel panic - not syncing: x");
        assert_eq!(strip_time("[x] not a timestamp"), "[x] not a timestamp");
    }

    /// Consoles recorded from the demo tests (tests/tests/examples.rs,
    /// tests/tests/sched_ext.rs) on the ktstr 6.12.117 kernel under QEMU
    /// TCG, unedited: artifact `console.log` files. Each goes through the
    /// host's own path (`host::interpret`, then `classify`).
    #[test]
    fn recorded_consoles() {
        use crate::registry::TestDef;
        use crate::vmm::{BackendKind, Timings, VmResult};
        const EX: &str = "tests/tests/examples.rs";
        const fn def(name: &'static str, timeout_s: u64, line: u32) -> TestDef {
            TestDef { name, timeout_s, file: EX, line, ..TestDef::DEFAULT }
        }
        static PANIC: TestDef = def("demo_kernel_panics", 10, 178);
        static BODY_PANIC: TestDef = def("demo_panics", 10, 157);
        static BODY_ERR: TestDef = def("demo_returns_error", 10, 165);
        static CHECK: TestDef = def("demo_unfair_split_fails", 20, 191);
        static SIGNAL: TestDef = def("demo_killed_by_signal", 10, 176);
        static TIMEOUT: TestDef = def("demo_sleeps_past_timeout", 3, 171);
        static HANG: TestDef = TestDef { topology: crate::vmm::Topology::cpus(1), ..def("demo_guest_hangs", 2, 203) };
        static TOOLS: TestDef = TestDef { name: "guest_has_tool_filesystems", timeout_s: 20, file: EX, line: 98, ..TestDef::DEFAULT };
        static SCX: TestDef = def("demo_scx", 60, 80);
        macro_rules! fixture {
            ($f:literal) => {
                ($f, include_str!(concat!("../tests/fixtures/consoles/", $f)))
            };
        }
        let table: &[(&TestDef, (&str, &str), ExitKind, &str)] = &[
            (&PANIC, fixture!("kernel_panic_no_init.log"), ExitKind::Panic,
             "Kernel panic - not syncing: No working init found.  Try passing init= option to kernel. See Linux Documentation/admin-guide/init.rst for guidance."),
            (&TOOLS, fixture!("initramfs_unpack_failed.log"), ExitKind::Panic,
             "Initramfs unpacking failed: write error (the initramfs did not fit in guest memory: raise memory_mib, or install binutils so debug info is stripped), then Kernel panic - not syncing: No working init found.  Try passing init= option to kernel. See Linux Documentation/admin-guide/init.rst for guidance."),
            (&BODY_PANIC, fixture!("body_panic.log"), ExitKind::PowerOff,
             "test body panicked: demo body panic: the vector was empty (at tests/tests/examples.rs:160)"),
            (&BODY_ERR, fixture!("body_error.log"), ExitKind::PowerOff,
             "test body returned an error: demo body error: step two failed: inner cause 42 (test at tests/tests/examples.rs:165)"),
            (&CHECK, fixture!("check_fair_share.log"), ExitKind::PowerOff,
             "test body returned an error: CPU time not shared within ±10%: crowded[0] got 488.9 ms, -26% off the mean 661.3 ms (test at tests/tests/examples.rs:191)"),
            (&SIGNAL, fixture!("body_signal.log"), ExitKind::PowerOff, "test body was killed by signal 11 (Segmentation fault)"),
            (&TIMEOUT, fixture!("body_timeout.log"), ExitKind::PowerOff,
             "test body did not finish within its timeout of 3s (timeout_s); it was killed"),
            (&HANG, fixture!("vm_timeout_frozen_init.log"), ExitKind::Timeout,
             "VM timeout: the guest did not finish within 62s (timeout_s 2 + 60s for boot, 1 vCPU) before reporting a verdict for demo_guest_hangs; last console line: ktstr: guest: running demo_guest_hangs"),
            (&SCX, fixture!("scx_bpf_error.log"), ExitKind::PowerOff,
             "scheduler scx_qmap_error was ejected by the kernel: sched_ext exit kind error_bpf (scx_bpf_error): qmap: test triggering error; the scheduler process then ended (exit status 0)"),
            (&SCX, fixture!("scx_stall.log"), ExitKind::PowerOff,
             "scheduler scx_qmap_stall was ejected by the kernel: sched_ext exit kind stall (runnable task stall): qmap: init[48] failed to run for 5.060s; the scheduler process then ended (exit status 0)"),
            (&SCX, fixture!("scx_scheduler_killed.log"), ExitKind::PowerOff,
             "scheduler scx_simple died during the test (killed by signal 9 (Killed)); then sched_ext exit kind unreg_user (unregistered from user space)"),
        ];
        for (def, (file, console), exit, want) in table {
            let r = VmResult {
                exit: exit.clone(),
                backend: BackendKind::QemuTcg,
                console: console.to_string(),
                com2: String::new(),
                messages: Vec::new(),
                timings: Timings::default(),
            };
            let v = crate::host::interpret(def, &r);
            assert_eq!(v.outcome, Outcome::Fail, "{file}");
            let at = format!("{}:{}", def.file, def.line);
            let got = classify(&Facts { verdict: &v, exit: Some(exit), console, test_at: Some(&at) });
            assert_eq!(got, *want, "{file}");
            assert!(!got.contains('\n'), "{file}: one line");
        }
    }

    /// No recorded console holds an oops (the ktstr kernel has no sysrq or
    /// LKDTM to provoke one); this checks only the RIP condensing on the
    /// x86 line shapes (`BUG:`/`Oops:` line, then `RIP: 0010:`).
    #[test]
    fn oops_gets_its_rip_and_beats_the_panic_it_causes() {
        let c = "[ 1.0] BUG: kernel NULL pointer dereference, address: 0000000000000000\n[ 1.0] Oops: 0002 [#1] SMP\n[ 1.0] RIP: 0010:f+0x5/0x10\n[ 1.1] Kernel panic - not syncing: Fatal exception\n";
        assert_eq!(kernel_crash(c).unwrap(), "BUG: kernel NULL pointer dereference, address: 0000000000000000 at RIP f+0x5/0x10");
        assert_eq!(kernel_crash("[ 1.1] Kernel panic - not syncing: Fatal exception\n").unwrap(), "Kernel panic - not syncing: Fatal exception");
        assert_eq!(kernel_crash("KTSTR_VERDICT {\"message\":\"Kernel panic - not syncing\"}\n"), None, "the verdict line is not the kernel's");
    }

    #[test]
    fn check_failures_carry_their_first_figure() {
        let v = Verdict::fail("test body returned an error: CPU time not shared within ±10%:\n  a[0] got 1.0 ms, -90% off the mean 10.0 ms\n  b[0] ...");
        assert_eq!(
            classify(&facts(&v, Some(&ExitKind::PowerOff), "")),
            "test body returned an error: CPU time not shared within ±10%: a[0] got 1.0 ms, -90% off the mean 10.0 ms (test at tests/tests/x.rs:7)"
        );
    }
}
