//! `cargo ktstr`: the Cargo subcommand front end.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod kernel_cmd;

#[derive(Debug, Parser)]
#[command(name = "cargo-ktstr", bin_name = "cargo ktstr", version, about = "Test Linux schedulers in throw-away VMs")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands; each lives in its own module.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build, list and clean cached kernels.
    Kernel(kernel_cmd::KernelArgs),
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
    let cli = Cli::parse_from(args());
    let res = match cli.command {
        Command::Kernel(k) => kernel_cmd::run(k),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the whole context chain, no backtrace.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}
