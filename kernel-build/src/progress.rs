//! Progress display: indicatif on a terminal, sparse plain lines otherwise
//! (so CI and test logs still show that something is moving).

use std::io::{IsTerminal, Read};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// Status line for the user; everything human-facing goes to stderr.
pub fn note(msg: impl AsRef<str>) {
    eprintln!("ktstr: {}", msg.as_ref());
}

/// Counts bytes through a reader, drawing a bytes/rate/ETA bar.
pub struct ProgressReader<R> {
    inner: R,
    bar: ProgressBar,
    tty: bool,
    total: Option<u64>,
    done: u64,
    next_line: u64,
    start: Instant,
    what: String,
    printed_at: Option<u64>,
}

impl<R: Read> ProgressReader<R> {
    pub fn new(inner: R, total: Option<u64>, what: &str) -> Self {
        let tty = stderr_is_tty();
        let bar = if tty {
            let b = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let tmpl = if total.is_some() {
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
            } else {
                "{msg} {bytes} {bytes_per_sec} {elapsed}"
            };
            b.set_style(ProgressStyle::with_template(tmpl).unwrap().progress_chars("=> "));
            b.set_message(what.to_string());
            b
        } else {
            ProgressBar::hidden()
        };
        ProgressReader { inner, bar, tty, total, done: 0, next_line: 0, start: Instant::now(), what: what.to_string(), printed_at: None }
    }

    fn plain_line(&mut self) {
        if self.printed_at == Some(self.done) {
            return;
        }
        self.printed_at = Some(self.done);
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let mib = self.done as f64 / (1 << 20) as f64;
        let rate = mib / secs;
        match self.total {
            Some(t) if t > 0 => {
                let pct = self.done * 100 / t;
                let eta = if self.done > 0 { (t - self.done.min(t)) as f64 / (self.done as f64 / secs) } else { 0.0 };
                note(format!("{}: {pct}% {mib:.1} MiB of {:.1} MiB, {rate:.1} MiB/s, ETA {eta:.0}s", self.what, t as f64 / (1 << 20) as f64));
            }
            _ => note(format!("{}: {mib:.1} MiB, {rate:.1} MiB/s", self.what)),
        }
    }

    pub fn finish(&mut self) {
        if self.tty {
            self.bar.finish_and_clear();
        }
        self.plain_line();
    }
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.tty {
            self.bar.inc(n as u64);
        } else if self.done >= self.next_line {
            // Every 10% of a known size, else every 32 MiB.
            let step = self.total.map(|t| (t / 10).max(1)).unwrap_or(32 << 20);
            if self.done > 0 {
                self.plain_line();
            }
            self.next_line = (self.done / step + 1) * step;
        }
        Ok(n)
    }
}

/// A one-line "current step, elapsed" display for long commands.
pub struct StepLine {
    bar: Option<ProgressBar>,
    start: Instant,
    last_plain: Instant,
    what: String,
}

impl StepLine {
    pub fn new(what: &str) -> Self {
        let bar = stderr_is_tty().then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {wide_msg}").unwrap());
            b.set_prefix(what.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        StepLine { bar, start: Instant::now(), last_plain: Instant::now(), what: what.to_string() }
    }

    pub fn step(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None => {
                // Plain mode: at most one line a minute.
                if self.last_plain.elapsed() >= Duration::from_secs(60) {
                    self.last_plain = Instant::now();
                    note(format!("{} [{}s]: {msg}", self.what, self.start.elapsed().as_secs()));
                }
            }
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
