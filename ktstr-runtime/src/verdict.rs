//! Verdicts, their exit codes, and the SKIP/FAIL banners.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
    Inconclusive,
}

/// What the guest sends on the data channel (kind RESULT) and prints on
/// the console after [`CONSOLE_MARKER`] as a fallback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub outcome: Outcome,
    /// One-line reason (the body's error, the panic message, ...).
    pub message: String,
    /// Multi-line details (worker reports, scheduler output, ...).
    #[serde(default)]
    pub details: String,
    /// `uname -r` of the kernel that ran the test (guest side).
    #[serde(default)]
    pub kernel_release: String,
    /// The report figures of the body's `ctx.run` calls (`result.json`'s
    /// `metrics`); boxed to keep `Verdict` small in `Result`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Box<serde_json::Value>>,
    /// One-line first cause of a failure, filled in on the host by
    /// [`crate::cause::classify`]; the FAIL banner's first line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cause: String,
}

pub const CONSOLE_MARKER: &str = "KTSTR_VERDICT ";

impl Verdict {
    pub fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            outcome,
            message: message.into(),
            details: String::new(),
            kernel_release: String::new(),
            metrics: None,
            cause: String::new(),
        }
    }
    pub fn pass() -> Self {
        Self::new(Outcome::Pass, "")
    }
    pub fn fail(m: impl Into<String>) -> Self {
        Self::new(Outcome::Fail, m)
    }
    pub fn skip(m: impl Into<String>) -> Self {
        Self::new(Outcome::Skip, m)
    }
    pub fn with_details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }

    /// Last verdict marker line on a console, if any.
    pub fn from_console(console: &str) -> Option<Self> {
        console
            .lines()
            .rev()
            .filter_map(|l| l.find(CONSOLE_MARKER).map(|i| &l[i + CONSOLE_MARKER.len()..]))
            .find_map(|j| serde_json::from_str(j.trim()).ok())
    }
}

/// `KTSTR_NO_SKIP_MODE=1`: skips become failures.
pub fn no_skip_mode() -> bool {
    std::env::var("KTSTR_NO_SKIP_MODE").is_ok_and(|v| v == "1")
}

/// The exit code a test binary returns for one test.
pub fn exit_code(outcome: Outcome, no_skip: bool) -> i32 {
    match outcome {
        Outcome::Pass => 0,
        Outcome::Skip if no_skip => 1,
        Outcome::Skip => 0,
        Outcome::Fail => 1,
        Outcome::Inconclusive => 2,
    }
}

/// The stderr banner for a verdict (`None` for a pass). A failure's first
/// line is its cause (or the message's first line), then the rest of the
/// message, the details (console tail), and the artifact directory last.
pub fn banner(v: &Verdict, no_skip: bool, artifacts: Option<&std::path::Path>) -> Option<String> {
    let first = if v.cause.is_empty() { v.message.lines().next().unwrap_or("") } else { v.cause.as_str() };
    let mut s = match v.outcome {
        Outcome::Pass => return None,
        Outcome::Skip if no_skip => format!("ktstr: FAIL: skip not allowed (KTSTR_NO_SKIP_MODE=1): {first}"),
        Outcome::Skip => format!("ktstr: SKIP: {first}"),
        Outcome::Fail => format!("ktstr: FAIL: {first}"),
        Outcome::Inconclusive => format!("ktstr: INCONCLUSIVE: {first}"),
    };
    let rest = v.message.trim_end();
    if rest != first && !rest.is_empty() {
        s.push('\n');
        s.push_str(rest.strip_prefix(first).map(|r| r.trim_start_matches('\n')).unwrap_or(rest));
    }
    if !v.details.is_empty() {
        s.push('\n');
        s.push_str(v.details.trim_end());
    }
    if let Some(dir) = artifacts {
        s.push_str(&format!("\nktstr: artifacts: {}", dir.display()));
    }
    Some(s)
}

/// Prints the banner and returns the exit code.
pub fn finish(v: &Verdict, artifacts: Option<&std::path::Path>) -> i32 {
    let no_skip = no_skip_mode();
    match (banner(v, no_skip, artifacts), artifacts) {
        (Some(b), _) => eprintln!("{b}"),
        (None, Some(dir)) => eprintln!("ktstr: artifacts: {}", dir.display()),
        (None, None) => {}
    }
    exit_code(v.outcome, no_skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_table() {
        for (o, normal, strict) in [
            (Outcome::Pass, 0, 0),
            (Outcome::Skip, 0, 1),
            (Outcome::Fail, 1, 1),
            (Outcome::Inconclusive, 2, 2),
        ] {
            assert_eq!(exit_code(o, false), normal, "{o:?}");
            assert_eq!(exit_code(o, true), strict, "{o:?} under KTSTR_NO_SKIP_MODE");
        }
    }

    #[test]
    fn banners() {
        assert_eq!(banner(&Verdict::pass(), false, None), None);
        assert_eq!(banner(&Verdict::skip("no kernel"), false, None).unwrap(), "ktstr: SKIP: no kernel");
        assert!(banner(&Verdict::skip("no kernel"), true, None).unwrap().starts_with("ktstr: FAIL: "));
        let f = Verdict::fail("boom").with_details("tail\n");
        assert_eq!(banner(&f, false, None).unwrap(), "ktstr: FAIL: boom\ntail");
        // Cause first, then the whole message, details, and the artifacts last.
        let mut f = Verdict::fail("the guest kernel panicked").with_details("console tail");
        f.cause = "Kernel panic - not syncing: x".into();
        let dir = std::path::Path::new("/t/ktstr/run/ktstr__a/kernel_6_12");
        assert_eq!(
            banner(&f, false, Some(dir)).unwrap(),
            "ktstr: FAIL: Kernel panic - not syncing: x\nthe guest kernel panicked\nconsole tail\nktstr: artifacts: /t/ktstr/run/ktstr__a/kernel_6_12"
        );
        // A multi-line message whose first line is the cause is not repeated.
        let mut f = Verdict::fail("CPU time not shared:\n  a[0] got 1 ms");
        f.cause = "CPU time not shared:".into();
        assert_eq!(banner(&f, false, None).unwrap(), "ktstr: FAIL: CPU time not shared:\n  a[0] got 1 ms");
    }

    #[test]
    fn console_fallback() {
        let v = Verdict::fail("x");
        let console = format!("noise\r\n[ 1.0] {CONSOLE_MARKER}{}\r\nmore\n", serde_json::to_string(&v).unwrap());
        assert_eq!(Verdict::from_console(&console), Some(v));
        assert_eq!(Verdict::from_console("nothing"), None);
    }
}
