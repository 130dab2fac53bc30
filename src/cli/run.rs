//! `app run` and `app serve`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::context::Context;
use crate::api::{ApiOptions, DEFAULT_CAPACITY};
use crate::error::{Error, Result};
use crate::ids::{InstanceId, LockName};
use crate::instance::{self, Holds, Mode, Notice, RunOptions, WorktreeKind, WorktreeOptions};
use crate::overview::ApiDashboard;
use crate::ports;
use crate::time::parse_duration;

/// The HTTP API and stop options `app run` and `app serve` share.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve the HTTP API (health, instances, events, messages; docs/API.md).
    #[arg(long)]
    with_api: bool,
    /// Address of the API (default: APP_API_ADDR, else the first free port of 3000-3010 on
    /// 127.0.0.1). Any non-loopback address needs APP_API_TOKEN.
    #[arg(long, value_name = "ADDR", requires = "with_api")]
    api_addr: Option<String>,
    /// Events the API buffers per subscriber before it tells a slow one it lagged.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CAPACITY, requires = "with_api")]
    api_capacity: usize,
    /// How long a stop request waits for commands before killing them (e.g. 500ms, 10s).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    stop_timeout: Duration,
}

impl ServeArgs {
    fn api(&self) -> Option<ApiOptions> {
        self.with_api.then(|| ApiOptions {
            addr: self.api_addr.clone(),
            capacity: self.api_capacity,
            dashboard: Some(Arc::new(ApiDashboard::new())),
        })
    }
}

/// Prints what the person running the instance should see while it runs.
fn notify(notice: &Notice) {
    match notice {
        Notice::ApiListening { id, url } => eprintln!("API server [{id}] listening on {url}"),
        Notice::ApiUnavailable { id, range } => eprintln!(
            "app: warning: every API port of {}-{} is taken; instance {id} runs without the API (set APP_API_PORT_RANGE or --api-addr)",
            range.start(),
            range.end()
        ),
        Notice::Reserved { patterns, holder } => eprintln!(
            "app: reserved {} (exclusive) for {holder}",
            patterns.join(" ")
        ),
    }
}

/// Arguments of `app serve`.
#[derive(Debug, Args)]
pub struct ServeCommandArgs {
    /// Use NAME as the instance id instead of a random one.
    #[arg(long = "instance", value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Arguments of `app ci`.
#[derive(Debug, Args)]
pub struct CiArgs {
    /// The branch to test: created from --base when it does not exist; checked out detached
    /// when another worktree has it.
    #[arg(long, value_name = "NAME")]
    branch: String,
    /// Where a new branch starts (default HEAD).
    #[arg(long, value_name = "REF")]
    base: Option<String>,
    /// Stop the command after this long (SIGTERM, then SIGKILL after --stop-timeout); exit 124.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// How long a stop waits before SIGKILL.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    stop_timeout: Duration,
    /// The command to run, after '--'.
    #[arg(value_name = "CMD", required = true, trailing_var_arg = true)]
    command: Vec<String>,
}

pub(super) fn ci(ctx: &Context, args: CiArgs) -> Result<u8> {
    let options = RunOptions {
        mode: Mode::Worktree(WorktreeOptions {
            branch: Some(args.branch),
            base: args.base,
            kind: WorktreeKind::Ci,
        }),
        command: args.command,
        db: ctx.db.clone(),
        stop_timeout: Some(args.stop_timeout),
        notify: Some(notify),
        deadline: args.timeout,
        ..RunOptions::default()
    };
    let outcome = instance::run(&super::current_dir()?, &options, &ctx.settings)?;
    if outcome.exit_code == instance::EXIT_TIMED_OUT {
        eprintln!(
            "app: the command outlived --timeout {} and was stopped",
            crate::time::format_age(options.deadline.unwrap_or_default())
        );
    }
    if let Some(cleanup) = &outcome.cleanup {
        if let Some(rescued) = &cleanup.rescued_to {
            eprintln!(
                "app: what the job left (changed files or commits on its detached HEAD) was saved on {rescued} before its worktree was removed"
            );
        }
        if let (Some(reason), Some(branch)) = (&cleanup.branch_kept_because, &outcome.branch) {
            eprintln!("app: kept branch {branch} ({reason})");
        }
    }
    Ok(outcome.exit_code)
}

pub(super) fn serve(ctx: &Context, args: ServeCommandArgs) -> Result<u8> {
    let cwd = super::current_dir()?;
    let options = RunOptions {
        name: args.name.as_deref().map(InstanceId::parse).transpose()?,
        mode: Mode::Serve,
        command: vec!["app".into(), "serve".into()],
        db: ctx.db.clone(),
        api: args.serve.api(),
        stop_timeout: Some(args.serve.stop_timeout),
        notify: Some(notify),
        ..RunOptions::default()
    };
    let outcome = instance::run(&cwd, &options, &ctx.settings)?;
    eprintln!("app: instance {} stopped", outcome.id);
    Ok(outcome.exit_code)
}

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
    /// Leave processes the command started in the background running when it exits (the
    /// worktree then stays while they live); by default they are stopped with it.
    #[arg(long)]
    keep_running: bool,
    /// Lease N consecutive free TCP ports for the command (APP_PORT, APP_PORTS).
    #[arg(long, value_name = "N")]
    ports: Option<usize>,
    /// Hold the named lock NAME while the command runs, waiting for it as long as it takes
    /// (repeatable; taken in name order; APP_LOCK_NAME, APP_LOCK_TOKEN, APP_LOCKS).
    #[arg(long = "lock", value_name = "NAME", hide = true)]
    locks: Vec<String>,
    /// Reserve GLOB exclusively for the instance while the command runs (repeatable; refused,
    /// exit 3, when another live holder has it).
    #[arg(long = "reserve", value_name = "GLOB", hide = true)]
    reserve: Vec<String>,
    /// Why the paths of --reserve are reserved, for 'app reservations'.
    #[arg(long, value_name = "TEXT", requires = "reserve", hide = true)]
    reserve_reason: Option<String>,
    #[command(flatten)]
    serve: ServeArgs,
    /// The command to run, after '--'.
    #[arg(value_name = "CMD", required = true, trailing_var_arg = true)]
    command: Vec<String>,
}

pub(super) fn run(ctx: &Context, args: RunArgs) -> Result<u8> {
    let cwd = super::current_dir()?;
    let keep = args.keep && !args.no_worktree;
    let mode = mode(&args)?;
    let (name, locks) = parsed(&args)?;
    let options = RunOptions {
        mode,
        name,
        keep_running: args.keep_running,
        command: args.command,
        db: ctx.db.clone(),
        ports: args.ports,
        api: args.serve.api(),
        stop_timeout: Some(args.serve.stop_timeout),
        notify: Some(notify),
        deadline: None,
        holds: Holds {
            locks,
            reserve: args.reserve,
            reason: args.reserve_reason,
        },
    };
    let outcome = instance::run(&cwd, &options, &ctx.settings)?;
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
    } else if keep && let (Some(worktree), Some(branch)) = (&outcome.worktree, &outcome.branch) {
        eprintln!(
            "app: kept worktree {} on branch {branch} (--keep)",
            shown(worktree)
        );
    }
    Ok(outcome.exit_code)
}

/// The instance name and the lock names of `app run`'s flags, parsed; in the order
/// `instance::run` checks the rest (the name, the port count, the locks, then the globs), so
/// a command line with several faults gets the same first error as ever.
fn parsed(args: &RunArgs) -> Result<(Option<InstanceId>, Vec<LockName>)> {
    let name = args.name.as_deref().map(InstanceId::parse).transpose()?;
    if let Some(count) = args.ports {
        ports::validate_count(count)?;
    }
    let locks = args
        .locks
        .iter()
        .map(|lock| LockName::parse(lock))
        .collect::<Result<_>>()?;
    Ok((name, locks))
}

/// The mode `app run`'s flags ask for. `--no-worktree` leaves no room for `--branch` or
/// `--base`: refused after the checks `instance::run` makes first (the name, the port count),
/// so a command line with several faults gets the same first error as ever.
fn mode(args: &RunArgs) -> Result<Mode> {
    if !args.no_worktree {
        return Ok(Mode::Worktree(WorktreeOptions {
            branch: args.branch.clone(),
            base: args.base.clone(),
            kind: if args.keep {
                WorktreeKind::Kept
            } else {
                WorktreeKind::Agent
            },
        }));
    }
    if args.branch.is_none() && args.base.is_none() {
        return Ok(Mode::InPlace);
    }
    if let Some(name) = &args.name {
        InstanceId::parse(name)?;
    }
    if let Some(count) = args.ports {
        ports::validate_count(count)?;
    }
    Err(Error::bad_input(
        "--branch and --base need a worktree; drop them or drop --no-worktree",
    ))
}
