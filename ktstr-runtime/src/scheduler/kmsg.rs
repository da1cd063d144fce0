//! The kernel log as `/dev/kmsg` gives it, and the sched_ext lines in it.
//!
//! A `/dev/kmsg` read returns one record: `LEVEL,SEQ,TS_USEC,FLAGS;TEXT\n`
//! followed by optional ` KEY=VALUE` continuation lines.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use super::{ExitKind, KernelExit};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Syslog priority (facility bits masked off).
    pub level: u8,
    pub seq: u64,
    pub ts_us: u64,
    pub text: String,
}

/// Parses one `/dev/kmsg` record; `None` when malformed.
pub fn parse_record(raw: &str) -> Option<Record> {
    let (head, rest) = raw.split_once(';')?;
    let mut f = head.split(',');
    let prio: u32 = f.next()?.trim().parse().ok()?;
    let seq = f.next()?.parse().ok()?;
    let ts_us = f.next()?.parse().ok()?;
    let text = rest.split('\n').next().unwrap_or("").to_string();
    Some(Record { level: (prio & 7) as u8, seq, ts_us, text })
}

/// A sched_ext event in one kernel log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScxLine {
    /// `sched_ext: BPF scheduler "OPS" enabled[ (partial)]`
    Enabled { ops: String, partial: bool },
    /// `sched_ext: BPF scheduler "OPS" disabled (REASON)`
    Disabled { ops: String, kind: ExitKind },
    /// `sched_ext: OPS: MSG` (the exit message printed after an error disable).
    Message { ops: String, msg: String },
    /// Any other `sched_ext:` line.
    Other(String),
}

pub fn parse_scx_line(text: &str) -> Option<ScxLine> {
    let body = text.trim_end().strip_prefix("sched_ext: ")?;
    if let Some(r) = body.strip_prefix("BPF scheduler \"") {
        if let Some((ops, tail)) = r.rsplit_once('"') {
            if let Some(t) = tail.strip_prefix(" enabled") {
                return Some(ScxLine::Enabled { ops: ops.to_string(), partial: t.contains("partial") });
            }
            if let Some(reason) = tail.strip_prefix(" disabled (").and_then(|t| t.strip_suffix(')')) {
                return Some(ScxLine::Disabled { ops: ops.to_string(), kind: ExitKind::from_reason(reason) });
            }
        }
        return Some(ScxLine::Other(body.to_string()));
    }
    // Ops names are C identifiers-ish; anything with spaces before ':' is prose.
    if let Some((ops, msg)) = body.split_once(": ") {
        if !ops.is_empty() && !ops.contains([' ', '"']) {
            return Some(ScxLine::Message { ops: ops.to_string(), msg: msg.to_string() });
        }
    }
    Some(ScxLine::Other(body.to_string()))
}

/// Lines of the kernel log kept after a disable line (message, backtrace).
const EXIT_LOG_LINES: usize = 40;

/// Folds kernel log lines into sched_ext facts: the sched_ext lines seen
/// and the first disable with its message.
#[derive(Debug, Default, Clone)]
pub struct ScxLog {
    /// Every `sched_ext:` line, in order.
    pub lines: Vec<String>,
    /// The first disable logged (and what followed it).
    pub exit: Option<KernelExit>,
    pub enabled: Option<String>,
}

impl ScxLog {
    pub fn push(&mut self, text: &str) {
        if let Some(exit) = self.exit.as_mut() {
            if exit.log.len() < EXIT_LOG_LINES {
                exit.log.push(text.to_string());
            }
        }
        let Some(ev) = parse_scx_line(text) else { return };
        self.lines.push(text.to_string());
        match ev {
            ScxLine::Enabled { ops, .. } => self.enabled = Some(ops),
            ScxLine::Disabled { ops, kind } if self.exit.is_none() => {
                self.exit = Some(KernelExit { ops, kind, msg: None, log: vec![text.to_string()] });
            }
            ScxLine::Message { ops, msg } => {
                if let Some(e) = self.exit.as_mut() {
                    if e.ops == ops && e.msg.is_none() {
                        e.msg = Some(msg);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Non-blocking reader of `/dev/kmsg` from "now" on.
pub struct Kmsg {
    file: Option<std::fs::File>,
}

impl Kmsg {
    /// Opens the log positioned at its end, so only new records are read.
    /// Without `/dev/kmsg` (no devtmpfs) a private node is made in /tmp.
    pub fn open_at_end() -> std::io::Result<Self> {
        let open = |p: &str| {
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(p)
        };
        let file = match open("/dev/kmsg") {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let node = "/tmp/.ktstr-kmsg";
                let c = std::ffi::CString::new(node).unwrap();
                // SAFETY: mknod(2) with a valid path; /dev/kmsg is char 1:11.
                unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 11)) };
                open(node)?
            }
            Err(e) => return Err(e),
        };
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on our fd; SEEK_END on /dev/kmsg skips to the newest record.
        unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        Ok(Self { file: Some(file) })
    }

    /// A reader that never yields (when the log cannot be opened).
    pub fn none() -> Self {
        Self { file: None }
    }

    /// Every record available now.
    pub fn drain(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        let Some(f) = self.file.as_mut() else { return out };
        let mut buf = vec![0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(r) = parse_record(&String::from_utf8_lossy(&buf[..n])) {
                        out.push(r);
                    }
                }
                // EPIPE: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        let r = parse_record("6,339,5140900,-;sched_ext: BPF scheduler \"simple\" enabled\n SUBSYSTEM=x\n").unwrap();
        assert_eq!(r, Record { level: 6, seq: 339, ts_us: 5140900, text: "sched_ext: BPF scheduler \"simple\" enabled".into() });
        // Facility bits are masked; extra header fields are tolerated.
        let r = parse_record("11,2,3,c,caller=T1;msg; with semicolon").unwrap();
        assert_eq!((r.level, r.text.as_str()), (3, "msg; with semicolon"));
        assert_eq!(parse_record("garbage"), None);
        assert_eq!(parse_record("x,1,2,-;t"), None);
    }

    #[test]
    fn scx_lines() {
        assert_eq!(
            parse_scx_line("sched_ext: BPF scheduler \"simple\" enabled"),
            Some(ScxLine::Enabled { ops: "simple".into(), partial: false })
        );
        assert_eq!(
            parse_scx_line("sched_ext: BPF scheduler \"qmap\" enabled (partial)"),
            Some(ScxLine::Enabled { ops: "qmap".into(), partial: true })
        );
        assert_eq!(
            parse_scx_line("sched_ext: BPF scheduler \"qmap\" disabled (runnable task stall)"),
            Some(ScxLine::Disabled { ops: "qmap".into(), kind: ExitKind::Stall })
        );
        assert_eq!(
            parse_scx_line("sched_ext: BPF scheduler \"qmap\" disabled (scx_bpf_error)"),
            Some(ScxLine::Disabled { ops: "qmap".into(), kind: ExitKind::ErrorBpf })
        );
        assert_eq!(
            parse_scx_line("sched_ext: qmap: test triggering error"),
            Some(ScxLine::Message { ops: "qmap".into(), msg: "test triggering error".into() })
        );
        assert!(matches!(
            parse_scx_line("sched_ext: \"simple\" does not implement cgroup cpu.weight"),
            Some(ScxLine::Other(_))
        ));
        assert!(matches!(parse_scx_line("sched_ext: BPF scheduler not yet used"), Some(ScxLine::Other(_))));
        assert_eq!(parse_scx_line("random: crng init done"), None);
    }

    #[test]
    fn log_folds_first_exit_with_message_and_trace() {
        let mut l = ScxLog::default();
        for t in [
            "sched_ext: BPF scheduler \"qmap\" enabled",
            "unrelated line",
            "sched_ext: BPF scheduler \"qmap\" disabled (runnable task stall)",
            "sched_ext: qmap: kworker/u8:1[33] failed to run for 5.432s",
            "   scx_watchdog_workfn+0x1b2/0x1f0",
            "sched_ext: BPF scheduler \"qmap\" disabled (scx_bpf_error)",
        ] {
            l.push(t);
        }
        assert_eq!(l.enabled.as_deref(), Some("qmap"));
        let e = l.exit.unwrap();
        assert_eq!(e.kind, ExitKind::Stall);
        assert_eq!(e.msg.as_deref(), Some("kworker/u8:1[33] failed to run for 5.432s"));
        assert!(e.log.iter().any(|x| x.contains("scx_watchdog_workfn")));
        assert_eq!(l.lines.len(), 4);
        assert_eq!(
            e.to_string_for_test(),
            "sched_ext exit kind stall (runnable task stall): qmap: kworker/u8:1[33] failed to run for 5.432s"
        );
    }

    #[test]
    fn message_of_another_ops_is_not_taken() {
        let mut l = ScxLog::default();
        l.push("sched_ext: BPF scheduler \"qmap\" disabled (scx_bpf_error)");
        l.push("sched_ext: other: not ours");
        l.push("sched_ext: qmap: test triggering error");
        assert_eq!(l.exit.unwrap().msg.as_deref(), Some("test triggering error"));
    }

    impl KernelExit {
        fn to_string_for_test(&self) -> String {
            self.to_string()
        }
    }
}
