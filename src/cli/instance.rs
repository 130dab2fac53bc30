//! `app instance list | info | stop` and `app whoami`.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::context::{Context, RepoContext};
use super::output::{self, Fields, Table, outln};
use crate::activity;
use crate::config::Timing;
use crate::db::instances;
use crate::error::{EXIT_FAILURE, InstanceError, Result};
use crate::ids::InstanceId;
use crate::instance::{self, StopOutcome, StopRoute};
use crate::paths::AppPaths;
use crate::registry::{Entry, InstanceRecord, InstanceStatus, Liveness, Registry, Snapshot};
use crate::sign::Keys;
use crate::time::{self, format_age};

/// Subcommands of `app instance`.
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// List instances: one ID:PID line per live instance, oldest first.
    List(ListArgs),
    /// Show one instance.
    Info {
        /// Instance id or name.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a running instance: its directory and environment, output streamed
    /// back, exits with the command's code.
    Exec {
        /// Instance id or name.
        id: String,
        /// The command, after '--'.
        #[arg(value_name = "CMD", required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Stop an instance: SIGTERM, then SIGKILL after the timeout.
    Stop {
        /// Instance id or name.
        id: String,
        /// How long to wait after SIGTERM before killing (e.g. 500ms, 10s, 1m).
        #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// Arguments of `app broadcast`.
#[derive(Debug, Args)]
pub struct BroadcastArgs {
    /// Only these instances (default: every live one).
    #[arg(long, value_name = "ID,...", value_delimiter = ',')]
    instances: Vec<String>,
    /// The command, after '--'.
    #[arg(value_name = "CMD", required = true, trailing_var_arg = true)]
    command: Vec<String>,
}

/// Arguments of `app instance list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// A table: id, pid, status, age, heartbeat age, branch, worktree, api, command, agent
    /// state, progress.
    #[arg(long)]
    long: bool,
    /// Include stale and forged entries, marked as such.
    #[arg(long)]
    all: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Live instances of every repository and host, from the shared database.
    #[arg(long, conflicts_with = "all")]
    everywhere: bool,
}

pub(super) fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    time::parse_duration(text).map_err(|err| err.to_string())
}

/// A `--ttl` value: a duration of at most [`time::MAX_TTL`].
pub(super) fn parse_ttl(text: &str) -> std::result::Result<Duration, String> {
    time::parse_ttl(text).map_err(|err| err.to_string())
}

pub(super) fn run(ctx: &Context, command: InstanceCommand) -> Result<u8> {
    // An id no instance can have is bad input, not an unknown instance ("no instance  is
    // registered" for an empty one).
    let named = match &command {
        InstanceCommand::Info { id, .. }
        | InstanceCommand::Exec { id, .. }
        | InstanceCommand::Stop { id, .. } => Some(InstanceId::parse(id)?),
        InstanceCommand::List(_) => None,
    };
    let timing = ctx.settings.timing;
    if let InstanceCommand::List(args) = &command
        && args.everywhere
    {
        return list_everywhere(ctx, args);
    }
    let repo = ctx.repo()?;
    let (paths, registry) = (&repo.paths, repo.registry()?);
    match command {
        InstanceCommand::List(args) => list(paths, &registry, &args, timing),
        InstanceCommand::Info { id, json } => info(paths, &registry, &id, json, timing),
        InstanceCommand::Exec { id, command } => {
            let snapshot = registry.snapshot()?;
            let record = snapshot
                .instance(&id)
                .ok_or_else(|| InstanceError::Unknown { id: id.clone() })?;
            if let Liveness::Stale(reason) = record.liveness(timing.stale_after) {
                return Err(InstanceError::NotRunningForExec { id, reason }.into());
            }
            let stale_after = timing.stale_after;
            crate::control::exec(&paths.control_socket(&id), &command, &mut || {
                still_starting(paths, &repo.keys, &id, stale_after)
            })
        }
        InstanceCommand::Stop { timeout, .. } => {
            let id = named.expect("a stop names its instance, parsed above");
            let (outcome, route) = instance::stop(&registry, &id, timeout, timing)?;
            let how = match route {
                StopRoute::Socket => "asked through its control socket",
                StopRoute::Signal => "no control socket answered; sent SIGTERM",
            };
            match outcome {
                StopOutcome::Terminated => eprintln!("app: instance {id} stopped ({how})"),
                StopOutcome::Killed => eprintln!(
                    "app: instance {id} did not stop within {} ({how}); killed it",
                    format_age(timeout)
                ),
            }
            Ok(0)
        }
    }
}

/// One row of a listing: a verified record with its liveness, or a forged entry.
enum Row<'a> {
    Valid(&'a InstanceRecord, Liveness),
    Forged { key: &'a str, reason: &'a str },
}

fn list(paths: &AppPaths, registry: &Registry, args: &ListArgs, timing: Timing) -> Result<u8> {
    let snapshot = registry.snapshot()?;
    let mut rows: Vec<Row> = snapshot
        .valid_instances()
        .into_iter()
        .map(|record| Row::Valid(record, record.liveness(timing.stale_after)))
        .filter(|row| args.all || matches!(row, Row::Valid(_, Liveness::Live)))
        .collect();
    if args.all {
        rows.extend(snapshot.instances.iter().filter_map(|entry| match entry {
            Entry::Forged { key, reason } => Some(Row::Forged { key, reason }),
            Entry::Valid(_) => None,
        }));
    }
    if args.json {
        let values: Vec<Value> = rows.iter().map(|row| row_json(paths, row)).collect();
        output::json(&values);
    } else if args.long {
        print_table(paths, &rows);
    } else {
        for row in &rows {
            match row {
                Row::Valid(record, Liveness::Live) => outln!("{}:{}", record.id, record.pid),
                Row::Valid(record, Liveness::Stale(reason)) => {
                    outln!("{}:{} stale ({reason})", record.id, record.pid)
                }
                Row::Forged { key, reason } => outln!("{key}:? forged ({reason})"),
            }
        }
    }
    Ok(0)
}

/// A row's JSON: the record's keys, then `agent` and `progress` (null when its supervisor
/// wrote none: another host's instance, a stale one, or no command).
fn row_json(paths: &AppPaths, row: &Row) -> Value {
    match row {
        Row::Valid(record, liveness) => {
            let mut value = record.to_json(liveness);
            let activity = activity::live(paths, record, liveness);
            if let Value::Object(map) = &mut value {
                map.insert("agent".into(), json!(activity.as_ref().map(|a| &a.agent)));
                map.insert(
                    "progress".into(),
                    json!(activity.as_ref().and_then(|a| a.progress)),
                );
            }
            value
        }
        Row::Forged { key, reason } => json!({"id": key, "liveness": "forged", "reason": reason}),
    }
}

fn list_everywhere(ctx: &Context, args: &ListArgs) -> Result<u8> {
    let stale_after = ctx.settings.timing.stale_after;
    let rows = ctx.with_db(async |db| instances::live_everywhere(db, stale_after).await)?;
    if args.json {
        output::json(&rows);
    } else if args.long {
        let mut table = Table::new(&[
            "ID",
            "PID",
            "HOST",
            "STATUS",
            "HEARTBEAT",
            "BRANCH",
            "REPO",
            "COMMAND",
        ]);
        for row in &rows {
            table.row(vec![
                row.id.clone(),
                row.pid.to_string(),
                row.host.clone(),
                row.status.to_string(),
                row.last_heartbeat.clone(),
                row.branch.clone().unwrap_or_else(|| "-".into()),
                row.repo_root.clone(),
                row.command.join(" "),
            ]);
        }
        table.print();
    } else {
        for row in &rows {
            outln!("{}:{} {} {}", row.id, row.pid, row.host, row.repo_root);
        }
    }
    Ok(0)
}

fn print_table(paths: &AppPaths, rows: &[Row]) {
    let header = [
        "ID",
        "PID",
        "STATUS",
        "AGE",
        "HEARTBEAT",
        "BRANCH",
        "WORKTREE",
        "API",
        "COMMAND",
        "STATE",
        "PROGRESS",
    ];
    let mut table = Table::new(&header);
    for row in rows {
        table.row(match row {
            Row::Valid(record, liveness) => {
                let activity = activity::live(paths, record, liveness);
                vec![
                    record.id.to_string(),
                    record.pid.to_string(),
                    match liveness {
                        Liveness::Live => record.status.to_string(),
                        Liveness::Stale(_) => "stale".to_string(),
                    },
                    format_age(record.started_at.age()),
                    format_age(record.heartbeat_at.age()),
                    record.branch.clone().unwrap_or_else(|| "-".into()),
                    record
                        .worktree
                        .as_ref()
                        .map_or_else(|| "-".into(), |w| w.display().to_string()),
                    record.api_url.clone().unwrap_or_else(|| "-".into()),
                    record.command.join(" "),
                    activity
                        .as_ref()
                        .map_or_else(|| "-".into(), |a| a.agent.state.to_string()),
                    activity
                        .as_ref()
                        .and_then(|a| a.progress)
                        .map_or_else(|| "-".into(), |p| p.compact()),
                ]
            }
            Row::Forged { key, .. } => {
                let mut cells = vec![key.to_string(), "?".into(), "forged".into()];
                cells.resize(header.len(), "-".into());
                cells
            }
        });
    }
    table.print();
}

/// Whether instance `id` is live and still `starting`: registered, its socket not served yet.
fn still_starting(paths: &AppPaths, keys: &Keys, id: &str, stale_after: Duration) -> bool {
    Registry::open_read_only(paths, keys)
        .and_then(|registry| registry.snapshot())
        .is_ok_and(|snapshot| {
            snapshot.instance(id).is_some_and(|record| {
                record.status == InstanceStatus::Starting
                    && matches!(record.liveness(stale_after), Liveness::Live)
            })
        })
}

fn info(paths: &AppPaths, registry: &Registry, id: &str, json: bool, timing: Timing) -> Result<u8> {
    let snapshot = registry.snapshot()?;
    let record = snapshot
        .instance(id)
        .ok_or_else(|| InstanceError::Unknown { id: id.to_string() })?;
    let liveness = record.liveness(timing.stale_after);
    if json {
        output::json(&row_json(paths, &Row::Valid(record, liveness)));
        return Ok(0);
    }
    let activity = activity::live(paths, record, &liveness);
    let state = match &liveness {
        Liveness::Live => format!("live ({})", record.status),
        Liveness::Stale(reason) => format!("stale ({reason})"),
    };
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".into());
    let mut fields = Fields::new(2);
    fields
        .field("id", &record.id)
        .field("state", state)
        .field("pid", record.pid)
        .field(
            "child pid",
            or_dash(record.child_pid.map(|p| p.to_string())),
        )
        .field("host", &record.host)
        .field(
            "started",
            format!(
                "{} ({} ago)",
                record.started_at,
                format_age(record.started_at.age())
            ),
        )
        .field(
            "heartbeat",
            format!(
                "{} ({} ago)",
                record.heartbeat_at,
                format_age(record.heartbeat_at.age())
            ),
        )
        .field(
            "worktree",
            or_dash(record.worktree.as_ref().map(|w| w.display().to_string())),
        )
        .field("cwd", record.cwd.display())
        .field("branch", or_dash(record.branch.clone()))
        .field("base", or_dash(record.base.clone()));
    if !record.ports.is_empty() {
        let ports: Vec<String> = record.ports.iter().map(u16::to_string).collect();
        fields.field("ports", ports.join(","));
    }
    fields
        .field("api", or_dash(record.api_url.clone()))
        .field("command", record.command.join(" "));
    if let Some(activity) = &activity {
        let agent = &activity.agent;
        fields.field(
            "agent",
            format!(
                "{} since {} ({} ago): {}",
                agent.state,
                agent.since,
                format_age(agent.since.age()),
                agent.reason
            ),
        );
        if let Some(p) = activity.progress {
            fields.field(
                "progress",
                format!(
                    "{} ahead, {} behind; committed {}; uncommitted {}",
                    p.ahead, p.behind, p.committed, p.uncommitted
                ),
            );
        }
    }
    fields.print();
    Ok(0)
}

pub(super) fn whoami(ctx: &Context) -> Result<u8> {
    let repo = ctx.repo()?;
    let snapshot = repo.snapshot()?;
    let dir = std::fs::canonicalize(&repo.cwd).unwrap_or(repo.cwd);
    match instance::owner_of(&snapshot, &dir) {
        Some(record) => {
            outln!("{}", record.id);
            Ok(0)
        }
        None => {
            eprintln!(
                "app: {} is not inside the worktree of a registered instance",
                dir.display()
            );
            Ok(EXIT_FAILURE)
        }
    }
}

/// `app broadcast`: runs the command in every chosen instance at once, then prints each one's
/// output under its id and a summary. Exit 0 only when every one succeeded.
pub(super) fn broadcast(ctx: &Context, args: BroadcastArgs) -> Result<u8> {
    let stale_after = ctx.settings.timing.stale_after;
    let repo = ctx.repo()?;
    let snapshot = repo.snapshot()?;
    let targets = broadcast_targets(&snapshot, &args.instances, stale_after)?;
    let runs: Vec<_> = targets
        .into_iter()
        .map(|(id, liveness)| {
            let handle = start_broadcast_run(&repo, &id, liveness, &args.command, stale_after);
            (id, handle)
        })
        .collect();
    Ok(report_broadcast(runs))
}

/// The instances a broadcast runs in, with their liveness: the named ones (each must be
/// registered), else every live one.
fn broadcast_targets(
    snapshot: &Snapshot,
    named: &[String],
    stale_after: Duration,
) -> Result<Vec<(String, Liveness)>> {
    for id in named {
        InstanceId::parse(id)?;
        if snapshot.instance(id).is_none() {
            return Err(InstanceError::Unknown { id: id.clone() }.into());
        }
    }
    let targets: Vec<(String, Liveness)> = if named.is_empty() {
        snapshot
            .valid_instances()
            .into_iter()
            .map(|r| (r.id.to_string(), r.liveness(stale_after)))
            .filter(|(_, liveness)| *liveness == Liveness::Live)
            .collect()
    } else {
        named
            .iter()
            .map(|id| {
                let record = snapshot.instance(id).expect("checked above");
                (id.clone(), record.liveness(stale_after))
            })
            .collect()
    };
    if targets.is_empty() {
        return Err(InstanceError::NoneLive.into());
    }
    Ok(targets)
}

/// What one instance's run of a broadcast gave: its exit code or why it did not run, and its
/// output and error output.
type BroadcastRun = (std::result::Result<u8, String>, Vec<u8>, Vec<u8>);

/// Runs `command` in instance `id` through its control socket, on a thread of its own.
fn start_broadcast_run(
    repo: &RepoContext<'_>,
    id: &str,
    liveness: Liveness,
    command: &[String],
    stale_after: Duration,
) -> std::thread::JoinHandle<BroadcastRun> {
    let socket = repo.paths.control_socket(id);
    let command = command.to_vec();
    let (paths, keys) = (repo.paths.clone(), repo.keys.clone());
    let target = id.to_string();
    std::thread::spawn(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut starting = || still_starting(&paths, &keys, &target, stale_after);
        let result = match liveness {
            Liveness::Stale(reason) => Err(format!("not running ({reason})")),
            Liveness::Live => {
                crate::control::run_in(&socket, &command, false, &mut out, &mut err, &mut starting)
                    .map_err(|e| e.to_string())
            }
        };
        (result, out, err)
    })
}

/// Prints each run's output under its id, in the order started, and the summary; the exit
/// code: 0 only when every one succeeded.
fn report_broadcast(runs: Vec<(String, std::thread::JoinHandle<BroadcastRun>)>) -> u8 {
    let mut failed = Vec::new();
    let total = runs.len();
    for (id, handle) in runs {
        let (result, out, err) = handle
            .join()
            .unwrap_or_else(|_| (Err("the runner panicked".into()), Vec::new(), Vec::new()));
        let status = match &result {
            Ok(code) => format!("exit {code}"),
            Err(why) => why.clone(),
        };
        outln!("== {id} ({status}) ==");
        let _ = output::bytes(&out);
        use std::io::Write;
        let _ = std::io::stderr().write_all(&err);
        if result != Ok(0) {
            failed.push(format!("{id} ({status})"));
        }
    }
    if failed.is_empty() {
        eprintln!("app broadcast: succeeded in all {total} instance(s)");
        0
    } else {
        eprintln!(
            "app broadcast: {} of {total} succeeded; failed: {}",
            total - failed.len(),
            failed.join(", ")
        );
        EXIT_FAILURE
    }
}
