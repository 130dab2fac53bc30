//! One read of everything a dashboard shows: instances with their agent state and progress,
//! runs with their task graphs, locks, reservations, messages, doctor's findings, host health,
//! and the attention strip that puts what needs a human first. The web dashboard reads it as
//! `GET /overview`, `app dash` reads it locally or through `--api URL`.
//!
//! Invariants:
//! - Read only: nothing here writes to `.app/` or the database (messages are inspected, never
//!   moved; doctor diagnoses, never fixes).
//! - Cheap to poll: one [`Source`] runs one gather at a time, hands a gather younger than
//!   [`REUSE_FOR`] to every caller that asks meanwhile, and runs doctor at most every
//!   [`FINDINGS_EVERY`].
//! - A database that cannot be read costs the runs, not the rest: the screen still shows the
//!   instances and coordination state, with the failure in the attention strip.

mod fleet;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::activity::{self, AgentState, Progress, StateReport};
use crate::api::{ApiContext, Dashboard};
use crate::config::Settings;
use crate::coordination::Coordination;
use crate::db::runs::{self, RunRow, RunStatus, RunningAttempt, TaskRow, TaskStatus};
use crate::db::{Blocking, DbSettings, Location};
use crate::doctor;
use crate::error::{InstanceError, Result};
use crate::instance;
use crate::lock::{LockState, Waiter};
use crate::paths::AppPaths;
use crate::process;
use crate::queue::Message;
use crate::registry::{InstanceRecord, Liveness, Registry};
use crate::reserve::Reservation;
use crate::sign::Keys;
use crate::time::Timestamp;

pub use fleet::{FleetHostView, FleetView, LeaseView};

/// How many runs the overview shows (the newest).
pub const RUNS_SHOWN: u32 = 10;
/// Doctor's findings are computed at most this often.
pub const FINDINGS_EVERY: Duration = Duration::from_secs(5);
/// A gather this young is handed out again instead of reading everything anew.
pub const REUSE_FOR: Duration = Duration::from_millis(250);

/// Everything one screen shows, read at `generated_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// When it was read.
    pub generated_at: Timestamp,
    /// The repository's main root.
    pub repo_root: String,
    /// The host that read it.
    pub host: HostHealth,
    /// What needs a human, most urgent first.
    pub attention: Vec<Attention>,
    /// Every verified registry entry, live and stale.
    pub instances: Vec<InstanceView>,
    /// The most recent runs (newest first), each with its tasks.
    pub runs: Vec<RunView>,
    /// Every named lock with a holder or waiters.
    pub locks: Vec<LockView>,
    /// Every reservation.
    pub reservations: Vec<ReservationView>,
    /// Pending and dead-lettered messages.
    pub messages: Vec<MessageView>,
    /// Doctor's findings (read only, never fixed from here).
    pub findings: Vec<FindingView>,
    /// The fleet (hosts, leases), when the database is a server; `None` for a local file.
    /// Its locks, reservations and other hosts' instances are in the lists above.
    #[serde(default)]
    pub fleet: Option<FleetView>,
}

/// The reading host's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostHealth {
    /// Host name.
    pub name: String,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Memory, total and available, in bytes.
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// The file system of `.app/`, total and free, in bytes.
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// The database: `file` or `server`, and how long one trivial read took.
    pub db_kind: String,
    pub db_latency_ms: Option<f64>,
}

/// One item of the attention strip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    /// `needs-input`, `stuck`, `failed-task`, `dead-instance` or `finding`.
    pub kind: String,
    /// What it is about: an instance id, `run/task`, a finding's subject.
    pub subject: String,
    /// One line for a human.
    pub text: String,
    /// Since when, where known.
    pub since: Option<Timestamp>,
}

/// An instance as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// The registry entry, fields at the top level as in `app instance list --json`.
    #[serde(flatten)]
    pub record: InstanceRecord,
    /// `live` or `stale`.
    pub liveness: String,
    /// Why it is stale.
    pub reason: Option<String>,
    /// What the agent is doing (live instances).
    pub agent: Option<StateReport>,
    /// How far its work has come (instances with a worktree).
    pub progress: Option<Progress>,
    /// The run and task it is an attempt of.
    pub run: Option<String>,
    pub task: Option<String>,
    /// Its host's name in the fleet, when the database is a server.
    #[serde(default)]
    pub fleet_host: Option<String>,
    /// Whether it runs on another fleet host: read from the database's `instances` mirror,
    /// not this host's registry, live while its heartbeat is fresh.
    #[serde(default)]
    pub elsewhere: bool,
}

/// A run and its task graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub name: String,
    /// Host of the orchestrator.
    pub host: String,
    /// `running`, `succeeded`, `failed`, `interrupted`, ... as `app runs show` prints it.
    pub status: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Every task, in plan order.
    pub tasks: Vec<TaskView>,
}

/// One task of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    /// The tasks it waits for (the graph's edges).
    pub depends_on: Vec<String>,
    /// `pending`, `running`, `succeeded`, `failed`, `skipped`, ... as `app runs show` prints it.
    pub status: String,
    pub attempts: i64,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i64>,
    pub branch: String,
    /// The instance of the last attempt.
    pub instance: Option<String>,
    /// Why it failed or was skipped.
    pub detail: Option<String>,
}

/// A named lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockView {
    /// The stored state (name, last token, holder, acquired, expiry).
    #[serde(flatten)]
    pub lock: LockState,
    /// Why the hold no longer counts, if it does not.
    pub lapsed: Option<String>,
    /// Who waits for it (instance ids, or `pid N on HOST`).
    pub waiters: Vec<String>,
    /// `local` or `fleet`.
    pub scope: String,
}

/// A reservation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReservationView {
    #[serde(flatten)]
    pub reservation: Reservation,
    /// Why it no longer counts, if it does not.
    pub lapsed: Option<String>,
    /// `local` or `fleet`.
    pub scope: String,
}

/// A message waiting in an inbox, or dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    #[serde(flatten)]
    pub message: Message,
    /// `pending` or `dead`.
    pub state: String,
    /// Why a dead letter was moved aside, as its file records it.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One of doctor's findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingView {
    pub kind: String,
    pub subject: String,
    pub problem: String,
    pub fix: String,
    pub fixable: bool,
}

/// What the database gives an overview: the runs, and the fleet when it is a server.
type DatabaseRead = (Vec<RunView>, Vec<RunningAttempt>, Option<fleet::FleetRead>);

/// Where an overview is read from, and what the last reads left to reuse.
#[derive(Debug)]
pub struct Source {
    paths: AppPaths,
    keys: Keys,
    settings: Settings,
    database: (Location, DbSettings),
    /// Doctor's findings and when they were computed.
    findings: Mutex<Option<(Instant, Vec<FindingView>)>>,
    /// The last overview, when it was read and how many events its reader had seen then;
    /// held while a gather runs, so gathers never overlap.
    last: Mutex<Option<(Instant, u64, Overview)>>,
}

impl Source {
    /// The overview of the repository at `paths`, judged with `settings`, with its runs in the
    /// database at `database`.
    pub fn new(paths: &AppPaths, settings: &Settings, database: (Location, DbSettings)) -> Source {
        Source {
            paths: paths.clone(),
            keys: Keys::from_settings(paths, settings),
            settings: settings.clone(),
            database,
            findings: Mutex::new(None),
            last: Mutex::new(None),
        }
    }

    /// Everything one screen shows, now (or as read less than [`REUSE_FOR`] ago).
    pub fn gather(&self) -> Result<Overview> {
        self.gather_after(0)
    }

    /// Everything one screen shows, now, or as read less than [`REUSE_FOR`] ago when no event
    /// came since: `events` counts the events the caller has seen (an API's published ones),
    /// and a read from before the newest is never handed out again (a client refreshing on
    /// `instance.stopped` must not get the read that still lists the instance).
    pub fn gather_after(&self, events: u64) -> Result<Overview> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, seen, overview)) = last.as_ref()
            && at.elapsed() < REUSE_FOR
            && *seen == events
        {
            return Ok(overview.clone());
        }
        let overview = self.read()?;
        *last = Some((Instant::now(), events, overview.clone()));
        Ok(overview)
    }

    fn read(&self) -> Result<Overview> {
        let snapshot = Registry::open_read_only(&self.paths, &self.keys)?.snapshot()?;
        let coordination = Coordination::new(&self.paths, &self.settings)
            .with_database(&self.database.0, self.database.1);
        let stale_after = self.settings.timing.stale_after;
        let mut instances: Vec<InstanceView> = snapshot
            .valid_instances()
            .into_iter()
            .map(|record| instance_view(&self.paths, record, &record.liveness(stale_after)))
            .collect();
        let (read, host_db) = self.database_read();
        let (runs, running, fleet, db_failure) = match read {
            Ok((runs, running, fleet)) => (runs, running, fleet, None),
            Err(err) => (Vec::new(), Vec::new(), None, Some(err.to_string())),
        };
        attach_tasks(&mut instances, &runs, &running);
        let mut locks: Vec<LockView> = match coordination.existing_locks()? {
            Some(store) => {
                let waiters = store.waiters()?;
                store
                    .list()?
                    .into_iter()
                    .map(|listed| lock_view(listed, &waiters))
                    .collect()
            }
            None => Vec::new(),
        };
        let mut reservations: Vec<ReservationView> = match coordination.existing_reservations()? {
            Some(store) => store
                .list()?
                .into_iter()
                .filter_map(|listed| listed.ok())
                .map(|(reservation, lapsed)| ReservationView {
                    reservation,
                    lapsed,
                    scope: "local".into(),
                })
                .collect(),
            None => Vec::new(),
        };
        let messages = messages(&coordination, &self.paths)?;
        let findings = self.findings();
        let host = host_health(&self.paths, &self.database.0, host_db);
        let mut fleet_items = Vec::new();
        let fleet = fleet.map(|read| {
            for view in &mut instances {
                view.fleet_host = Some(read.view.host.clone());
            }
            instances.extend(read.instances);
            locks.extend(read.locks);
            reservations.extend(read.reservations);
            fleet_items = fleet::attention(&read.view);
            read.view
        });
        let attention = attention(&instances, &runs, &findings, db_failure, fleet_items);
        Ok(Overview {
            generated_at: Timestamp::now(),
            repo_root: self.paths.repo_root().display().to_string(),
            host,
            attention,
            instances,
            runs,
            locks,
            reservations,
            messages,
            findings,
            fleet,
        })
    }

    /// The newest runs with their tasks and, against a server, the fleet, all in one read (one
    /// batch request against a server); and how long one trivial read took.
    fn database_read(&self) -> (Result<DatabaseRead>, Option<f64>) {
        let db = match Blocking::open(self.database.0.clone(), self.database.1) {
            Ok(db) => Arc::new(db),
            Err(err) => return (Err(err), None),
        };
        let started = Instant::now();
        let latency = db
            .run(async |db| db.query_rows("timing a read", "SELECT 1", Vec::new()).await)
            .ok()
            .map(|_| started.elapsed().as_secs_f64() * 1000.0);
        let repo_root = self.paths.repo_root().display().to_string();
        let mut statements: Vec<(String, Vec<libsql::Value>)> =
            runs::newest_statements(&repo_root, RUNS_SHOWN).into();
        statements.push(runs::running_attempts_statement(&repo_root));
        let in_fleet = !db.is_local();
        if in_fleet {
            statements.extend(fleet::statements(&self.settings.fleet_host));
        }
        let read = db
            .run(async |db| {
                let statements: Vec<(&str, Vec<libsql::Value>)> = statements
                    .iter()
                    .map(|(sql, params)| (sql.as_str(), params.clone()))
                    .collect();
                db.read_all("reading the overview", &statements).await
            })
            .and_then(|results| {
                let runs = runs::newest_from(&results[0], &results[1])?
                    .into_iter()
                    .map(|(run, tasks)| run_view(&run, tasks))
                    .collect();
                let running = runs::running_attempts_from(&results[2]);
                let fleet = if in_fleet {
                    Some(fleet::read(&results[3..], &db, &self.settings)?)
                } else {
                    None
                };
                Ok((runs, running, fleet))
            });
        (read, latency)
    }

    /// Doctor's findings, computed again when the last are older than [`FINDINGS_EVERY`].
    fn findings(&self) -> Vec<FindingView> {
        let mut cached = self.findings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, findings)) = cached.as_ref()
            && at.elapsed() < FINDINGS_EVERY
        {
            return findings.clone();
        }
        let options = doctor::Options {
            settings: self.settings.clone(),
            force: false,
            db: match &self.database.0 {
                Location::Local(path) => Some(path.clone()),
                Location::Remote { .. } => None,
            },
        };
        let findings = match doctor::diagnose(&self.paths, &self.keys, &options) {
            Ok(diagnosis) => diagnosis
                .findings()
                .into_iter()
                .map(|finding| FindingView {
                    kind: finding.kind.to_string(),
                    subject: finding.subject,
                    problem: finding.problem,
                    fix: finding.fix,
                    fixable: finding.fixable,
                })
                .collect(),
            Err(err) => vec![FindingView {
                kind: "doctor-failed".into(),
                subject: self.paths.repo_root().display().to_string(),
                problem: format!("doctor could not look: {err}"),
                fix: "run 'app doctor' to see the error".into(),
                fixable: false,
            }],
        };
        *cached = Some((Instant::now(), findings.clone()));
        findings
    }
}

/// Everything one screen shows for `source`, now.
pub fn gather(source: &Source) -> Result<Overview> {
    source.gather()
}

/// What an API serves as its dashboard: the overview of its repository, from a [`Source`]
/// made on the first request (one per server, so its caches are shared by every client).
#[derive(Debug, Default)]
pub struct ApiDashboard {
    source: OnceLock<Source>,
}

impl ApiDashboard {
    /// A dashboard for an API that has not served yet.
    pub fn new() -> ApiDashboard {
        ApiDashboard::default()
    }

    fn source(&self, context: &ApiContext) -> &Source {
        self.source.get_or_init(|| {
            Source::new(&context.paths, &context.settings, context.database.clone())
        })
    }
}

impl Dashboard for ApiDashboard {
    fn overview(&self, context: &ApiContext, events: u64) -> Result<serde_json::Value> {
        let overview = self.source(context).gather_after(events)?;
        Ok(serde_json::to_value(overview).expect("overviews serialize"))
    }

    fn stop(&self, context: &ApiContext, id: &str) -> Result<serde_json::Value> {
        let registry = Registry::open_read_only(&context.paths, &context.keys)?;
        let timing = context.settings.timing;
        // What `instance::stop` would refuse is refused now, with its error; the stop itself
        // (the request, the wait, SIGKILL after the timeout) goes on without the caller, so a
        // request never waits out a stop timeout, and the API can stop its own instance.
        let record = registry
            .snapshot()?
            .instance(id)
            .cloned()
            .ok_or_else(|| InstanceError::Unknown { id: id.to_string() })?;
        if let Liveness::Stale(reason) = record.liveness(timing.stale_after) {
            return Err(InstanceError::NotRunning {
                id: id.to_string(),
                reason,
            }
            .into());
        }
        // The record was found under `id`: its id is that one, typed.
        let owned = record.id.clone();
        std::thread::Builder::new()
            .name("api-stop".into())
            .spawn(move || {
                match instance::stop(&registry, &owned, instance::DEFAULT_STOP_TIMEOUT, timing) {
                    Ok((outcome, _)) => {
                        tracing::info!(instance = %owned, ?outcome, "stopped through the API");
                    }
                    Err(err) => {
                        tracing::warn!(instance = %owned, %err, "a stop through the API failed")
                    }
                }
            })
            .map_err(|source| crate::error::Error::Io {
                action: "starting the stop of",
                path: context.paths.control_socket(id),
                source,
            })?;
        Ok(serde_json::json!({
            "id": id,
            "stopping": true,
            "timeout_ms": instance::DEFAULT_STOP_TIMEOUT.as_millis() as u64,
        }))
    }
}

fn instance_view(paths: &AppPaths, record: &InstanceRecord, liveness: &Liveness) -> InstanceView {
    let activity = activity::live(paths, record, liveness);
    let (liveness, reason) = match liveness {
        Liveness::Live => ("live", None),
        Liveness::Stale(reason) => ("stale", Some(reason.clone())),
    };
    InstanceView {
        record: record.clone(),
        liveness: liveness.into(),
        reason,
        agent: activity.as_ref().map(|a| a.agent.clone()),
        progress: activity.and_then(|a| a.progress),
        run: None,
        task: None,
        fleet_host: None,
        elsewhere: false,
    }
}

/// Names the run and task of every instance that is the last attempt of a task shown or runs
/// an attempt of any run of the repository (not only of the runs shown).
fn attach_tasks(instances: &mut [InstanceView], runs: &[RunView], running: &[RunningAttempt]) {
    let shown = runs.iter().flat_map(|run| {
        run.tasks.iter().filter_map(move |task| {
            let instance = task.instance.as_deref()?;
            Some((instance, (run.id.as_str(), task.id.as_str())))
        })
    });
    let attempts: HashMap<&str, (&str, &str)> = shown
        .chain(
            running
                .iter()
                .map(|(run, task, instance)| (instance.as_str(), (run.as_str(), task.as_str()))),
        )
        .collect();
    for view in instances {
        if let Some((run, task)) = attempts.get(view.record.id.as_str()) {
            view.run = Some(run.to_string());
            view.task = Some(task.to_string());
        }
    }
}

/// A run with its tasks in plan order, each with its edges from the stored plan.
fn run_view(run: &RunRow, tasks: Vec<TaskRow>) -> RunView {
    let planned: Vec<(String, Vec<String>)> = run.plan["tasks"]
        .as_array()
        .map(|tasks| {
            tasks
                .iter()
                .map(|task| {
                    let id = task["id"].as_str().unwrap_or_default().to_string();
                    let deps = task["depends_on"]
                        .as_array()
                        .map(|deps| {
                            deps.iter()
                                .filter_map(|d| d.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    (id, deps)
                })
                .collect()
        })
        .unwrap_or_default();
    let order: HashMap<&str, usize> = planned
        .iter()
        .enumerate()
        .map(|(at, (id, _))| (id.as_str(), at))
        .collect();
    let mut tasks: Vec<TaskView> = tasks
        .into_iter()
        .map(|row| TaskView {
            depends_on: order
                .get(row.task_id.as_str())
                .map(|&at| planned[at].1.clone())
                .unwrap_or_default(),
            id: row.task_id,
            status: row.status.to_string(),
            attempts: row.attempts,
            started_at: row.started_at,
            finished_at: row.finished_at,
            exit_code: row.exit_code,
            branch: row.branch,
            instance: row.instance,
            detail: row.detail,
        })
        .collect();
    tasks.sort_by_key(|task| (order.get(task.id.as_str()).copied(), task.id.clone()));
    RunView {
        id: run.id.to_string(),
        name: run.name.clone(),
        host: run.host.clone(),
        status: run.status.to_string(),
        started_at: run.started_at.clone(),
        finished_at: run.finished_at.clone(),
        tasks,
    }
}

fn lock_view((lock, lapsed): (LockState, Option<String>), waiters: &[Waiter]) -> LockView {
    let waiters = waiters
        .iter()
        .filter(|waiter| waiter.name == lock.name)
        .map(|waiter| match &waiter.holder.instance {
            Some(id) => id.to_string(),
            None => format!("pid {} on {}", waiter.holder.pid, waiter.holder.host),
        })
        .collect();
    LockView {
        lock,
        lapsed,
        waiters,
        scope: "local".into(),
    }
}

/// Every inbox's deliverable messages (inspected, nothing moved), then the dead letters.
fn messages(coordination: &Coordination, paths: &AppPaths) -> Result<Vec<MessageView>> {
    let store = coordination.messages()?;
    let mut views = Vec::new();
    for owner in store.owners() {
        let (pending, _) = store.inspect(&owner)?;
        views.extend(pending.into_iter().map(|message| MessageView {
            message,
            state: "pending".into(),
            reason: None,
        }));
    }
    let mut dead: Vec<(Message, Option<String>)> =
        crate::state::visible_names(&paths.dead_letters())
            .unwrap_or_default()
            .into_iter()
            .filter(|name| name.ends_with(".json"))
            .filter_map(|name| {
                let bytes = std::fs::read(paths.dead_letters().join(name)).ok()?;
                let record: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
                let message = serde_json::from_value(record["message"].clone()).ok()?;
                Some((message, record["reason"].as_str().map(str::to_string)))
            })
            .collect();
    dead.sort_by(|(a, _), (b, _)| a.id.cmp(&b.id));
    views.extend(dead.into_iter().map(|(message, reason)| MessageView {
        message,
        state: "dead".into(),
        reason,
    }));
    Ok(views)
}

/// This host's load, memory and disk, and the database's latency as measured.
fn host_health(paths: &AppPaths, location: &Location, db_latency_ms: Option<f64>) -> HostHealth {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut averages = load.split_whitespace().map(|n| n.parse().unwrap_or(0.0));
    let load = [(); 3].map(|()| averages.next().unwrap_or(0.0));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |field: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .map_or(0, |kib: u64| kib * 1024)
    };
    let (disk_total_bytes, disk_free_bytes) = disk(if paths.state_dir().is_dir() {
        paths.state_dir()
    } else {
        paths.repo_root()
    });
    HostHealth {
        name: process::hostname().to_string(),
        load,
        mem_total_bytes: kib("MemTotal"),
        mem_available_bytes: kib("MemAvailable"),
        disk_total_bytes,
        disk_free_bytes,
        db_kind: match location {
            Location::Local(_) => "file",
            Location::Remote { .. } => "server",
        }
        .into(),
        db_latency_ms,
    }
}

/// The size and the space left to unprivileged users of the file system holding `dir`.
fn disk(dir: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(stat) => {
            let unit = stat.fragment_size();
            (stat.blocks() * unit, stat.blocks_available() * unit)
        }
        Err(_) => (0, 0),
    }
}

/// The attention strip: what needs a human, most urgent kind first, the longest waiting first
/// within a kind.
fn attention(
    instances: &[InstanceView],
    runs: &[RunView],
    findings: &[FindingView],
    db_failure: Option<String>,
    fleet: Vec<(u8, Attention)>,
) -> Vec<Attention> {
    let mut items: Vec<(u8, Attention)> = fleet;
    for view in instances {
        let id = view.record.id.to_string();
        if let Some(report) = &view.agent {
            let rank = match report.state {
                AgentState::NeedsInput => Some((0, "needs-input")),
                AgentState::Stuck => Some((1, "stuck")),
                _ => None,
            };
            if let Some((rank, kind)) = rank {
                items.push((rank, attention_item(kind, &id, &report.reason, report)));
            }
        }
        if view.liveness == "stale" {
            let text = view.reason.clone().unwrap_or_else(|| "stale".into());
            let text = match view.elsewhere {
                true => format!(
                    "{text}; 'app doctor --fix' on {} reclaims it",
                    view.record.host
                ),
                false => text,
            };
            items.push((
                3,
                Attention {
                    kind: "dead-instance".into(),
                    subject: id,
                    text: match view.elsewhere {
                        true => text,
                        false => format!("{text}; 'app doctor --fix' reclaims it"),
                    },
                    since: Some(view.record.heartbeat_at),
                },
            ));
        }
    }
    // Failures of runs still going, and of the newest run however it ended.
    for (at, run) in runs.iter().enumerate() {
        if at > 0 && run.status != RunStatus::Running.to_string() {
            continue;
        }
        for task in &run.tasks {
            if task.status == TaskStatus::Failed.to_string() {
                let exit = task
                    .exit_code
                    .map_or(String::new(), |c| format!(" (exit {c})"));
                let detail = task.detail.clone().unwrap_or_default();
                items.push((
                    2,
                    Attention {
                        kind: "failed-task".into(),
                        subject: format!("{}/{}", run.id, task.id),
                        text: format!("task {} failed{exit}. {detail}", task.id)
                            .trim()
                            .to_string(),
                        since: task.finished_at.as_deref().and_then(|t| t.parse().ok()),
                    },
                ));
            }
        }
    }
    let dead: Vec<&str> = items
        .iter()
        .filter(|(rank, _)| *rank == 3)
        .map(|(_, item)| item.subject.as_str())
        .collect();
    let findings: Vec<(u8, Attention)> = findings
        .iter()
        .filter(|finding| !dead.contains(&finding.subject.as_str()))
        .map(|finding| {
            (
                4,
                Attention {
                    kind: "finding".into(),
                    subject: finding.subject.clone(),
                    text: format!("{} ({})", finding.problem, finding.fix),
                    since: None,
                },
            )
        })
        .collect();
    items.extend(findings);
    if let Some(failure) = db_failure {
        items.push((
            4,
            Attention {
                kind: "finding".into(),
                subject: "database".into(),
                text: format!("the runs cannot be read: {failure}"),
                since: None,
            },
        ));
    }
    items.sort_by(|(a, x), (b, y)| a.cmp(b).then(x.since.cmp(&y.since)));
    items.into_iter().map(|(_, item)| item).collect()
}

fn attention_item(kind: &str, id: &str, reason: &str, report: &StateReport) -> Attention {
    Attention {
        kind: kind.into(),
        subject: id.into(),
        text: reason.into(),
        since: Some(report.since),
    }
}
