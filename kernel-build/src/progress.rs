//! Progress display. One line per kernel being resolved ([`KernelLine`]:
//! phase fetch → configure → build, elapsed, ETA from the previous build)
//! that the download counter ([`ProgressReader`]) and the make output
//! ([`StepLine`]) report into. On a terminal it is an indicatif spinner;
//! otherwise plain `ktstr: [label] phase: …` lines, one per phase change
//! (so CI logs show movement without carriage returns or escape codes).
//! A cache hit never starts a phase, so it prints nothing; `quiet` hides
//! the whole line.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

pub fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// All bars of this process, so parallel kernels each keep their own line.
fn multi() -> &'static MultiProgress {
    static M: OnceLock<MultiProgress> = OnceLock::new();
    M.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Status line for the user; everything human-facing goes to stderr.
/// Printed above any live bars instead of through them.
pub fn note(msg: impl AsRef<str>) {
    multi().suspend(|| eprintln!("ktstr: {}", msg.as_ref()));
}

/// Runs `f` (which prints to stderr) with every live bar cleared first and
/// redrawn after, so its output does not tear a progress line.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    multi().suspend(f)
}

/// What a kernel being resolved is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Download, extract, clone or check out the source.
    Fetch,
    /// Base config + ktstr.kconfig (+ extra fragment).
    Configure,
    /// `make` of the boot image.
    Build,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Fetch => "fetch",
            Phase::Configure => "configure",
            Phase::Build => "build",
        })
    }
}

/// `42s`, `3m07s`, `1h02m`.
/// Bytes as MiB, for "{:.1} MiB" messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The ETA part of a line: time left against the previous build of the
/// same kernel, `None` when there was none. Past it, says so instead of a
/// negative or zero ETA.
pub fn eta_text(previous: Option<Duration>, elapsed: Duration) -> Option<String> {
    let prev = previous?;
    Some(match prev.checked_sub(elapsed) {
        // Rounded up: "ETA 0s" while still short of the previous time would read as done.
        Some(left) if !left.is_zero() => format!("ETA {}", short_duration(Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0)))),
        _ => format!("over the previous build's {}", short_duration(prev)),
    })
}

/// The non-terminal line for a phase change:
/// `ktstr: [6.12.9] build: make -j4 bzImage (1m02s elapsed, ETA 3m10s)`.
pub fn plain_line(label: &str, phase: Phase, detail: &str, elapsed: Duration, eta: Option<&str>) -> String {
    let mut s = format!("ktstr: [{label}] {phase}");
    if !detail.is_empty() {
        let _ = write!(s, ": {detail}");
    }
    let _ = write!(s, " ({} elapsed", short_duration(elapsed));
    if let Some(e) = eta {
        let _ = write!(s, ", {e}");
    }
    s.push(')');
    s
}

/// The state of the kernel line of this thread (one resolve runs on one thread).
struct Line {
    label: String,
    quiet: bool,
    tty: bool,
    previous: Option<Duration>,
    /// Set by the first phase: before it nothing was shown.
    started: Option<Instant>,
    phase: Option<Phase>,
    bar: Option<ProgressBar>,
}

thread_local! {
    static CURRENT: RefCell<Option<Line>> = const { RefCell::new(None) };
}

/// The progress line of one kernel on this thread, from [`KernelLine::begin`]
/// until dropped. Nothing shows until the first [`phase`].
pub struct KernelLine {
    owner: bool,
}

impl KernelLine {
    /// Starts the line for `label`, unless this thread already has one
    /// (a resolve step nested in another keeps the outer line).
    pub fn begin(label: &str, quiet: bool) -> KernelLine {
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_some() {
                return KernelLine { owner: false };
            }
            *c = Some(Line {
                label: label.to_string(),
                quiet,
                tty: stderr_is_tty(),
                previous: None,
                started: None,
                phase: None,
                bar: None,
            });
            KernelLine { owner: true }
        })
    }
}

impl Drop for KernelLine {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        if let Some(Line { bar: Some(b), .. }) = CURRENT.with(|c| c.borrow_mut().take()) {
            b.finish_and_clear();
            multi().remove(&b);
        }
    }
}

fn with_line<T>(f: impl FnOnce(&mut Line) -> T) -> Option<T> {
    CURRENT.with(|c| c.borrow_mut().as_mut().map(f))
}

/// True when this thread has a kernel line: counters and make output
/// report into it rather than drawing their own.
pub fn line_active() -> bool {
    with_line(|_| ()).is_some()
}

/// The previous build's duration of this kernel, for the ETA.
pub fn set_previous(previous: Option<Duration>) {
    with_line(|l| {
        l.previous = previous;
        if let Some(b) = &l.bar {
            b.set_style(spinner_style(previous));
        }
    });
}

/// Whether progress is hidden on this thread (`--quiet`).
pub fn quiet() -> bool {
    with_line(|l| l.quiet).unwrap_or(false)
}

/// The spinner's look; the ETA is recomputed on every tick from the bar's elapsed time.
fn spinner_style(previous: Option<Duration>) -> ProgressStyle {
    let eta = move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
        if let Some(e) = eta_text(previous, s.elapsed()) {
            let _ = write!(w, ", {e}");
        }
    };
    ProgressStyle::with_template("{spinner} [{prefix}] {wide_msg} ({elapsed}{eta_prev})")
        .expect("static template")
        .with_key("eta_prev", eta)
}

fn spinner(label: &str, previous: Option<Duration>, msg: String) -> ProgressBar {
    // Styled and filled before it joins the display: no empty first frame.
    let b = ProgressBar::new_spinner().with_style(spinner_style(previous)).with_prefix(label.to_string()).with_message(msg);
    let b = multi().add(b);
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// Moves this thread's kernel line to `phase`: on a terminal the spinner
/// shows it; otherwise one plain line is printed per phase change.
pub fn phase(phase: Phase, detail: &str) {
    with_line(|l| {
        let started = *l.started.get_or_insert_with(Instant::now);
        if l.quiet || l.phase == Some(phase) {
            if !l.quiet {
                set_detail(l, detail);
            }
            return;
        }
        l.phase = Some(phase);
        if l.tty {
            let msg = if detail.is_empty() { phase.to_string() } else { format!("{phase}: {detail}") };
            match &l.bar {
                Some(b) => b.set_message(msg),
                None => l.bar = Some(spinner(&l.label, l.previous, msg)),
            }
        } else {
            let eta = eta_text(l.previous, started.elapsed());
            eprintln!("{}", plain_line(&l.label, phase, detail, started.elapsed(), eta.as_deref()));
        }
    });
}

fn set_detail(l: &Line, detail: &str) {
    if let (Some(b), Some(p)) = (&l.bar, l.phase) {
        b.set_message(format!("{p}: {detail}"));
    }
}

/// Live detail (bytes fetched, make's latest line) for the current phase:
/// terminal only, since plain output changes once per phase. Returns false
/// when this thread has no kernel line (the caller reports on its own).
pub fn detail(msg: &str) -> bool {
    with_line(|l| {
        if !l.quiet && l.tty {
            set_detail(l, msg);
        }
    })
    .is_some()
}

/// `msg` as the line's detail when there is a kernel line, else as a note.
pub fn detail_or_note(msg: impl AsRef<str>) {
    if !detail(msg.as_ref()) {
        note(msg);
    }
}

/// A closing note (`cached KEY in …`), hidden with `quiet`.
pub fn done(msg: impl AsRef<str>) {
    if !quiet() {
        note(msg);
    }
}

/// Counts bytes through a reader, drawing a bytes/rate/ETA bar.
pub struct ProgressReader<R> {
    inner: R,
    /// Reporting into this thread's kernel line instead of a bar of its own.
    routed: bool,
    next_detail: u64,
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
        let routed = line_active();
        let tty = stderr_is_tty() && !routed;
        let bar = if tty {
            let b = multi().add(ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden()));
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
        ProgressReader { inner, routed, next_detail: 0, bar, tty, total, done: 0, next_line: 0, start: Instant::now(), what: what.to_string(), printed_at: None }
    }

    fn plain_line(&mut self) {
        if self.routed {
            return;
        }
        if self.printed_at == Some(self.done) {
            return;
        }
        self.printed_at = Some(self.done);
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let done = mib(self.done);
        let rate = done / secs;
        match self.total {
            Some(t) if t > 0 => {
                let pct = self.done * 100 / t;
                let eta = if self.done > 0 { (t - self.done.min(t)) as f64 / (self.done as f64 / secs) } else { 0.0 };
                note(format!("{}: {pct}% {done:.1} MiB of {:.1} MiB, {rate:.1} MiB/s, ETA {eta:.0}s", self.what, mib(t)));
            }
            _ => note(format!("{}: {done:.1} MiB, {rate:.1} MiB/s", self.what)),
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
        if self.routed {
            // A line's detail, at most every 4 MiB (or at the end).
            if self.done >= self.next_detail || n == 0 {
                self.next_detail = self.done + (4 << 20);
                let msg = match self.total {
                    Some(t) if t > 0 => format!("{} {}% ({:.0} of {:.0} MiB)", self.what, self.done.min(t) * 100 / t, mib(self.done), mib(t)),
                    _ => format!("{} {:.0} MiB", self.what, mib(self.done)),
                };
                detail(&msg);
            }
        } else if self.tty {
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
    /// Reporting into this thread's kernel line instead of a line of its own.
    routed: bool,
    bar: Option<ProgressBar>,
    start: Instant,
    last_plain: Instant,
    what: String,
}

impl StepLine {
    pub fn new(what: &str) -> Self {
        let routed = line_active();
        let bar = (stderr_is_tty() && !routed).then(|| {
            let b = multi().add(ProgressBar::new_spinner());
            b.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {wide_msg}").unwrap());
            b.set_prefix(what.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        StepLine { routed, bar, start: Instant::now(), last_plain: Instant::now(), what: what.to_string() }
    }

    pub fn step(&mut self, msg: &str) {
        if self.routed {
            detail(msg);
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(Duration::from_millis(900)), "0s");
        assert_eq!(short_duration(Duration::from_secs(59)), "59s");
        assert_eq!(short_duration(Duration::from_secs(187)), "3m07s");
        assert_eq!(short_duration(Duration::from_secs(3599)), "59m59s");
        assert_eq!(short_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn eta_counts_down_from_the_previous_build() {
        let s = Duration::from_secs;
        assert_eq!(eta_text(None, s(10)), None, "no previous build, no ETA");
        assert_eq!(eta_text(Some(s(300)), s(0)).as_deref(), Some("ETA 5m00s"));
        assert_eq!(eta_text(Some(s(300)), s(120)).as_deref(), Some("ETA 3m00s"));
        assert_eq!(eta_text(Some(s(300)), s(299)).as_deref(), Some("ETA 1s"));
        // A part second left rounds up, never to "ETA 0s".
        assert_eq!(eta_text(Some(s(300)), Duration::from_millis(299_900)).as_deref(), Some("ETA 1s"));
        assert_eq!(eta_text(Some(s(300)), Duration::from_millis(100_500)).as_deref(), Some("ETA 3m20s"));
        // At or past the previous duration: never "ETA 0s" or negative.
        assert_eq!(eta_text(Some(s(300)), s(300)).as_deref(), Some("over the previous build's 5m00s"));
        assert_eq!(eta_text(Some(s(300)), s(4000)).as_deref(), Some("over the previous build's 5m00s"));
    }

    #[test]
    fn plain_lines_name_label_phase_detail_elapsed_and_eta() {
        let s = Duration::from_secs;
        assert_eq!(
            plain_line("6.12.9", Phase::Build, "make -j4 bzImage", s(62), Some("ETA 3m10s")),
            "ktstr: [6.12.9] build: make -j4 bzImage (1m02s elapsed, ETA 3m10s)"
        );
        assert_eq!(plain_line("6.12.9", Phase::Fetch, "", s(0), None), "ktstr: [6.12.9] fetch (0s elapsed)");
        assert_eq!(
            plain_line("git_tj_sched_ext_for-next", Phase::Configure, "tinyconfig + ktstr.kconfig", s(5), None),
            "ktstr: [git_tj_sched_ext_for-next] configure: tinyconfig + ktstr.kconfig (5s elapsed)"
        );
        let l = plain_line("x", Phase::Build, "a", s(1), Some("ETA 1s"));
        assert!(!l.contains('\r') && !l.contains('\x1b') && !l.contains('\n'));
    }

    #[test]
    fn the_line_belongs_to_its_thread_and_the_outer_begin() {
        assert!(!line_active());
        {
            let _outer = KernelLine::begin("a", true);
            assert!(line_active() && quiet());
            {
                // Nested: keeps the outer line (and its quiet flag).
                let _inner = KernelLine::begin("b", false);
                assert!(quiet());
            }
            assert!(line_active(), "the nested guard does not end the outer line");
            std::thread::spawn(|| assert!(!line_active(), "other threads have their own")).join().unwrap();
        }
        assert!(!line_active());
        assert!(!detail("no line: the caller reports"));
    }
}
