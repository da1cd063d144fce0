//! `cargo ktstr`: the Cargo subcommand front end.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod archive_cmd;
mod completions;
mod export_cmd;
mod kernel_cmd;
mod remote_cmd;
mod stats;
mod stats_cmd;
mod shell_cmd;
mod test_cmd;

const EXAMPLES: &str = "\
Examples:
  cargo ktstr test --kernel 6.12 --kernel ../linux     # every VM test once per kernel
  cargo ktstr kernel build /usr/src/linux-source-6.12.tar.xz
  cargo ktstr kernel list
  cargo ktstr export two_cgroups_share_cpu             # writes two_cgroups_share_cpu.run
  cargo ktstr test --kernel A --kernel B --repeat 3 && cargo ktstr stats --compare A B
  cargo ktstr shell --kernel 6.12 --cpus 4             # a shell in a VM; Ctrl-] or `poweroff` ends it

Docs: docs/ in the ktstr repository (kernel specs, env vars, exit codes).";

#[derive(Debug, Parser)]
#[command(
    name = "cargo-ktstr",
    bin_name = "cargo ktstr",
    version,
    about = "Test Linux schedulers in throw-away VMs",
    after_help = EXAMPLES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands; each lives in its own module.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve kernels, then run `cargo nextest run` with them.
    Test(test_cmd::TestArgs),
    /// One file with the test binaries, kernels and schedulers, for `test --archive` elsewhere.
    Archive(archive_cmd::ArchiveArgs),
    /// Build, list and clean cached kernels.
    Kernel(kernel_cmd::KernelArgs),
    /// Write a self-contained NAME.run reproducer of one test.
    Export(export_cmd::ExportArgs),
    /// Tables of a run's figures per test and kernel; compare two kernels.
    Stats(stats_cmd::StatsArgs),
    /// Boot a kernel with a busybox userland: an interactive shell, or one command (--exec).
    Shell(shell_cmd::ShellArgs),
    /// Print shell completions.
    Completions(completions::CompletionsArgs),
}

/// Cargo runs us as `cargo-ktstr ktstr ARGS`: drop that extra word.
fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "ktstr") {
        args.remove(1);
    }
    args
}

fn main() -> ExitCode {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        // This binary is the `/init` of a `cargo ktstr shell` VM.
        ktstr_runtime::shell::guest::init_standalone();
    }
    let cli = Cli::parse_from(args());
    let res = match cli.command {
        Command::Test(t) => test_cmd::run(t),
        Command::Archive(a) => archive_cmd::run(a),
        Command::Kernel(k) => kernel_cmd::run(k).map(|()| 0),
        Command::Export(e) => export_cmd::run(e),
        Command::Stats(s) => stats_cmd::run(s),
        Command::Shell(s) => shell_cmd::run(s),
        Command::Completions(c) => {
            completions::run(c, Cli::command());
            Ok(0)
        }
    };
    match res {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            // One line, the whole context chain, no backtrace.
            let msg = format!("{e:#}").replace('\n', " ");
            // Above any progress line still drawn by a kernel resolve on another thread.
            kernel_build::progress::suspend(|| eprintln!("error: {msg}"));
            ExitCode::from(1)
        }
    }
}
