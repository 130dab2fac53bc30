//! `app worker` and `app fleet`.

use clap::Args;
use serde_json::json;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use super::context::Context;
use super::output::{self, Table, outln};
use crate::db::fleet::{self, FleetTask, HostRow, Overview};
use crate::db::{Blocking, DbSettings, Location};
use crate::error::{IoContext, Result};
use crate::ids;
use crate::orchestrate::StopFlag;
use crate::orchestrate::fleet::{DEFAULT_REMOTE, require_server_at, secret_check, shared_key};
use crate::paths::AppPaths;
use crate::process;
use crate::time::Timestamp;
use crate::worker::{self, WorkerEvent, WorkerOptions};

/// Arguments of `app worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Tasks run at once.
    #[arg(long, value_name = "N", default_value_t = 1)]
    capacity: usize,
    /// This host's name in the fleet (default: APP_FLEET_HOST, else the host name).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Labels tasks may require ("on" in a plan), as k=v,k2=v2.
    #[arg(long, value_name = "K=V,...", default_value = "")]
    labels: String,
    /// The git remote the fleet shares.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_REMOTE)]
    remote: String,
    /// Use NAME as the worker's instance id instead of a random one.
    #[arg(long = "instance", value_name = "NAME")]
    instance: Option<String>,
}

/// Arguments of `app fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Signals counted into `stop` until the returned handle is closed.
pub(super) fn count_signals(stop: &StopFlag) -> Result<(Handle, std::thread::JoinHandle<()>)> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .io_context("installing signal handlers for", "app")?;
    let handle = signals.handle();
    let stop = stop.clone();
    let watcher = std::thread::spawn(move || {
        for signal in signals.forever() {
            stop.raise(signal);
        }
    });
    Ok((handle, watcher))
}

pub(super) fn worker(ctx: &Context, args: WorkerArgs) -> Result<u8> {
    if args.capacity == 0 {
        return Err(crate::Error::bad_input("--capacity must be at least 1"));
    }
    let name = args.name.unwrap_or_else(|| process::hostname().to_string());
    ids::validate_host_name(&name)?;
    // A bad instance name is refused before the host row is written.
    let instance = args
        .instance
        .as_deref()
        .map(ids::InstanceId::parse)
        .transpose()?;
    let mut command = vec!["app".to_string(), "worker".to_string()];
    command.extend(["--capacity".to_string(), args.capacity.to_string()]);
    if !args.labels.is_empty() {
        command.extend(["--labels".to_string(), args.labels.clone()]);
    }
    let options = WorkerOptions {
        name,
        capacity: args.capacity,
        labels: ids::parse_labels(&args.labels)?,
        remote: args.remote,
        db: ctx.db.clone(),
        settings: ctx.settings.clone(),
        instance,
        command,
    };
    let mut report = |event: WorkerEvent| eprintln!("[{}] {}", Timestamp::now(), describe(&event));
    worker::run(&super::current_dir()?, &options, &mut report)
}

fn describe(event: &WorkerEvent) -> String {
    match event {
        WorkerEvent::Registered {
            host,
            repo,
            instance,
        } => {
            format!("worker {host} (instance {instance}): taking tasks of fleet runs of {repo}")
        }
        WorkerEvent::Took { attempt, token } => format!("{attempt}: leased (token {token})"),
        WorkerEvent::Ended {
            attempt,
            exit_code,
            detail,
            accepted,
        } => {
            let mut line = format!(
                "{attempt}: ended, exit {}",
                exit_code.map_or("-".to_string(), |c| c.to_string())
            );
            if let Some(detail) = detail {
                line.push_str(&format!(" ({detail})"));
            }
            if !accepted {
                line.push_str(
                    "; the report was refused (the lease was lost), its work is on its own ref",
                );
            }
            line
        }
        WorkerEvent::Lost { attempt } => {
            format!("{attempt}: lease lost (another host took the task); stopping it")
        }
        WorkerEvent::Draining { running } => format!(
            "draining: no new tasks, waiting for {running} running (a second signal stops them)"
        ),
    }
}

pub(super) fn fleet(ctx: &Context, args: FleetArgs) -> Result<u8> {
    let location = Location::resolve(ctx.db.as_deref())?;
    require_server_at(&location)?;
    let db = Blocking::open(location, DbSettings::from(&ctx.settings))?;
    let paths = AppPaths::discover(&super::current_dir()?).ok();
    let mine = match &paths {
        Some(paths) => shared_key(paths, &ctx.settings)
            .ok()
            .map(|key| secret_check(&key)),
        None => None,
    };
    let overview = db.run(async |db| fleet::overview(db).await)?;
    let view = View {
        hosts: &overview.hosts,
        ttl_ms: ctx.settings.lease_ttl.as_millis() as i64,
        secret: mine.as_deref(),
    };
    if args.json {
        output::json(&json!({
            "hosts": overview.hosts.iter().map(|h| json!({
                "host": h, "alive": view.alive(h), "refused": view.refused(h),
            })).collect::<Vec<_>>(),
            "running": overview.running,
            "waiting": overview.waiting.iter().map(|t| json!({
                "task": t, "why": view.why_waiting(t),
            })).collect::<Vec<_>>(),
        }));
    } else {
        view.print(&overview);
    }
    Ok(0)
}

/// How `app fleet` judges the rows it shows.
struct View<'a> {
    hosts: &'a [HostRow],
    ttl_ms: i64,
    secret: Option<&'a str>,
}

impl View<'_> {
    fn print(&self, overview: &Overview) {
        if overview.hosts.is_empty() {
            outln!("no hosts: start 'app worker' on each host (docs/FLEET.md)");
        } else {
            let mut table = Table::new(&[
                "HOST",
                "STATE",
                "CAPACITY",
                "RUNNING",
                "LOAD",
                "HEARTBEAT",
                "LABELS",
            ]);
            for host in &overview.hosts {
                let labels: Vec<String> = host
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let state = if self.refused(host) {
                    "refused (another APP_SHARED_SECRET)"
                } else {
                    self.state(host)
                };
                table.row(vec![
                    host.name.clone(),
                    state.into(),
                    host.capacity.to_string(),
                    host.running.to_string(),
                    host.load.map_or("-".into(), |l| format!("{l:.2}")),
                    format!("{}s ago", host.heartbeat_age_ms / 1000),
                    labels.join(","),
                ]);
            }
            table.print();
        }
        for task in &overview.running {
            outln!(
                "running: {}/{} attempt {} on {} (token {})",
                task.run_id,
                task.task_id,
                task.attempt,
                task.host.as_deref().unwrap_or("?"),
                task.token.unwrap_or(0)
            );
        }
        for task in &overview.waiting {
            outln!(
                "waiting: {}/{}: {}",
                task.run_id,
                task.task_id,
                self.why_waiting(task)
            );
        }
    }

    fn alive(&self, host: &HostRow) -> bool {
        host.state != "stopped" && host.heartbeat_age_ms <= self.ttl_ms
    }

    fn state(&self, host: &HostRow) -> &'static str {
        match (self.alive(host), host.state.as_str()) {
            (false, "stopped") => "stopped",
            (false, _) => "dead",
            (true, "draining") => "draining",
            (true, _) => "running",
        }
    }

    /// A host whose secret differs from ours: we refuse its work and it refuses ours.
    fn refused(&self, host: &HostRow) -> bool {
        self.secret.is_some_and(|mine| mine != host.secret_check)
    }

    fn why_waiting(&self, task: &FleetTask) -> String {
        let able: Vec<&HostRow> = self
            .hosts
            .iter()
            .filter(|h| self.alive(h) && !self.refused(h))
            .filter(|h| task.needs.iter().all(|(k, v)| h.labels.get(k) == Some(v)))
            .collect();
        let needs: Vec<String> = task.needs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if able.is_empty() && !needs.is_empty() {
            format!(
                "no live host has the labels {}; start 'app worker --labels {}' on one",
                needs.join(","),
                needs.join(",")
            )
        } else if able.is_empty() {
            "no live host; start 'app worker' on one".into()
        } else if task.expired {
            format!(
                "its host {} stopped renewing the lease; the next free host takes it",
                task.host.as_deref().unwrap_or("?")
            )
        } else {
            "waiting for a free host".into()
        }
    }
}
