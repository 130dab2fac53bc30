//! The command line: argument definitions (`clap` derive) and everything printed to the
//! terminal. The only module that prints; the rest of the library returns values.

mod instance;
mod run;

use clap::{Parser, Subcommand};

use crate::error::Result;

/// Coordinate many agents working on one git repository at once.
#[derive(Debug, Parser)]
#[command(name = "app", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command as a new instance in its own worktree and branch.
    Run(run::RunArgs),
    /// List, inspect and stop instances.
    #[command(subcommand)]
    Instance(instance::InstanceCommand),
    /// Print the id of the instance whose worktree contains the current directory.
    Whoami,
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Instance(command) => instance::run(command),
        Command::Whoami => instance::whoami(),
    }
}

fn current_dir() -> Result<std::path::PathBuf> {
    use crate::error::IoContext;
    std::env::current_dir().io_context("reading", "the current directory")
}
