//! Running `make`: parallel build with a step/elapsed display, the full log
//! kept on disk, and the log's tail shown when something fails.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use anyhow::{anyhow, bail, Context, Result};

use crate::progress::{self, note, StepLine};
use crate::tree;

/// Lines of the log shown when a command fails.
const TAIL_LINES: usize = 25;

/// How `make` is invoked: job count and compiler (ccache when available).
#[derive(Debug, Clone)]
pub struct Make {
    pub jobs: usize,
    /// ccache directory when ccache is used.
    pub ccache_dir: Option<PathBuf>,
}

/// `KTSTR_NO_CCACHE=1` turns ccache off (benchmarks want cold compiles).
pub const NO_CCACHE_ENV: &str = "KTSTR_NO_CCACHE";

fn find_in_path(exe: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(exe)).find(|p| p.is_file())
}

/// `~/.cache/ktstr/ccache` (or under `$XDG_CACHE_HOME`), shared by all builds.
pub fn ccache_dir() -> PathBuf {
    crate::cache::user_cache_home().join("ktstr/ccache")
}

impl Make {
    /// `jobs` defaults to the CPU count; ccache is used when installed unless disabled.
    pub fn new(jobs: Option<usize>, use_ccache: bool) -> Make {
        let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        let disabled = std::env::var(NO_CCACHE_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        let ccache_dir = (use_ccache && !disabled && find_in_path("ccache").is_some()).then(ccache_dir);
        Make { jobs, ccache_dir }
    }

    /// `make` in `src` with the compiler settings; the same for every step so
    /// kconfig's recorded compiler matches the build's.
    pub fn command(&self, src: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("make");
        cmd.current_dir(src);
        if let Some(dir) = &self.ccache_dir {
            // NOHASHDIR + BASEDIR: the same source elsewhere (another temp dir,
            // a git checkout) still hits the cache.
            cmd.arg("CC=ccache gcc").arg("HOSTCC=ccache gcc");
            cmd.env("CCACHE_DIR", dir).env("CCACHE_NOHASHDIR", "1").env("CCACHE_BASEDIR", src);
        }
        cmd.args(args);
        cmd
    }

    /// Runs `make ARGS` in `src`, appending output to `log`.
    pub fn run(&self, src: &Path, args: &[&str], log: &Path, what: &str) -> Result<()> {
        run_logged(self.command(src, args), log, what)
    }
}

/// Runs `cmd`, appending stdout+stderr to `log` and showing the latest line
/// with the elapsed time. On failure prints the log's last lines and fails
/// with one line naming the log.
pub fn run_logged(mut cmd: Command, log: &Path, what: &str) -> Result<()> {
    let mut logf = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening build log {}", log.display()))?;
    writeln!(logf, "### {what}: {cmd:?}")?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // If we are killed (even -9), make must not keep writing into a build dir
    // that the next run deletes as stale.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                if tx.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut step = StepLine::new(what);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    for line in rx {
        let _ = writeln!(logf, "{line}");
        step.step(line.trim());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait()?;
    step.finish();
    if !status.success() {
        progress::suspend(|| {
            eprintln!("ktstr: last lines of {}:", log.display());
            for l in &tail {
                eprintln!("  {l}");
            }
        });
        let code = status.code().map(|c| format!("exit {c}")).unwrap_or_else(|| "killed by a signal".into());
        bail!("{what} failed ({code}); full log: {}", log.display());
    }
    Ok(())
}

/// What a successful build produced, inside the source tree.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub image: PathBuf,
    pub vmlinux: Option<PathBuf>,
    pub config: PathBuf,
}

/// `make -jN bzImage` (vmlinux comes with it) in a configured tree.
pub fn build(src: &Path, make: &Make, log: &Path) -> Result<Artifacts> {
    let (target, rel) = tree::image_target();
    let jobs = format!("-j{}", make.jobs);
    let what = format!(
        "make {jobs} {target}{} in {}; log: {}",
        if make.ccache_dir.is_some() { " (ccache)" } else { "" },
        src.display(),
        log.display()
    );
    // With a kernel line (every resolve) this is its build phase; bare callers get a note.
    let line = progress::line_active();
    if line {
        progress::phase(progress::Phase::Build, &what);
    } else {
        note(what);
    }
    let started = std::time::Instant::now();
    make.run(src, &[&jobs, target], log, &format!("make {target}"))?;
    let image = src.join(rel);
    if !image.is_file() {
        return Err(anyhow!("make finished but {} is missing; full log: {}", image.display(), log.display()));
    }
    if !line {
        note(format!("built {} in {:.1} min", image.display(), started.elapsed().as_secs_f64() / 60.0));
    }
    let vmlinux = Some(src.join("vmlinux")).filter(|p| p.is_file());
    Ok(Artifacts { image, vmlinux, config: src.join(".config") })
}
