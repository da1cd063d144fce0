//! `cargo ktstr completions SHELL`: shell completion scripts via clap_complete.

use clap_complete::Shell;

const EXAMPLES: &str = "\
Examples:
  cargo ktstr completions bash > ~/.local/share/bash-completion/completions/cargo-ktstr
  cargo ktstr completions zsh > \"${fpath[1]}/_cargo-ktstr\"
  cargo ktstr completions fish > ~/.config/fish/completions/cargo-ktstr.fish

The scripts complete the `cargo-ktstr` command; cargo's own completion does not
descend into `cargo ktstr`.";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct CompletionsArgs {
    /// Shell to generate completions for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Writes the completion script for `cmd` (the top-level CLI) to stdout.
pub fn run(args: CompletionsArgs, mut cmd: clap::Command) {
    clap_complete::generate(args.shell, &mut cmd, "cargo-ktstr", &mut std::io::stdout());
}
