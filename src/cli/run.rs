//! `app run`.

use std::path::Path;

use clap::Args;

use crate::config::Timing;
use crate::error::Result;
use crate::instance::{self, RunOptions};

/// Arguments of `app run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Use NAME as the instance id instead of a random one ([a-z0-9][a-z0-9_-]{0,63}).
    #[arg(long = "instance", value_name = "NAME")]
    name: Option<String>,
    /// Branch to work on (default app/<id>); an existing branch is checked out as it is.
    #[arg(long, value_name = "BRANCH")]
    branch: Option<String>,
    /// Ref the new branch starts from (default: the repository's HEAD).
    #[arg(long, value_name = "REF")]
    base: Option<String>,
    /// Register in the current directory, without a worktree or branch.
    #[arg(long)]
    no_worktree: bool,
    /// Keep the worktree and branch when the command exits.
    #[arg(long)]
    keep: bool,
    /// Lease N consecutive free TCP ports for the command (APP_PORT, APP_PORTS).
    #[arg(long, value_name = "N")]
    ports: Option<usize>,
    /// The command to run, after '--'.
    #[arg(value_name = "CMD", required = true, trailing_var_arg = true)]
    command: Vec<String>,
}

pub(super) fn run(args: RunArgs, db: Option<std::path::PathBuf>) -> Result<u8> {
    let timing = Timing::from_env()?;
    let options = RunOptions {
        name: args.name,
        branch: args.branch,
        base: args.base,
        no_worktree: args.no_worktree,
        keep: args.keep,
        command: args.command,
        db,
        ports: args.ports,
    };
    let cwd = super::current_dir()?;
    let outcome = instance::run(&cwd, &options, timing)?;
    let shown = |path: &Path| path.display().to_string();
    if let (Some(cleanup), Some(worktree), Some(branch)) =
        (&outcome.cleanup, &outcome.worktree, &outcome.branch)
    {
        if let Some(reason) = &cleanup.worktree_kept_because {
            eprintln!(
                "app: kept worktree {} on branch {branch} ({reason}); resume with 'cd {}' or 'app run --instance {} -- ...'",
                shown(worktree),
                shown(worktree),
                outcome.id
            );
        }
        if let Some(reason) = &cleanup.branch_kept_because {
            eprintln!("app: kept branch {branch} ({reason})");
        }
    } else if options.keep
        && let (Some(worktree), Some(branch)) = (&outcome.worktree, &outcome.branch)
    {
        eprintln!(
            "app: kept worktree {} on branch {branch} (--keep)",
            shown(worktree)
        );
    }
    Ok(outcome.exit_code)
}
