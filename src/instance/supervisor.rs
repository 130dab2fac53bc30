//! The supervisor of one instance: [`Supervisor::run`] is the lifecycle's table of contents.
//!
//! Invariants:
//! - Once the instance is registered, every way out goes through [`Supervisor::end`]: the
//!   command's exit, a stop request to `app serve`, a command that could not start (127/126),
//!   a run a signal cancelled before its command started (128+N), a lock or reservation that
//!   was refused, and a worktree that could not be made.
//! - The locks and reservations of `--lock` and `--reserve` are taken after the start and
//!   before the spawn ([`super::holds`]), with the heartbeat already running, since a lock may
//!   be awaited for long.
//! - `end` first gives the locks back, sends the API's final event and closes it and stops the
//!   commands run through the control socket, then stops what the command left behind, gives
//!   the reservation back, then unregisters the instance and removes its worktree only when
//!   that loses nothing (see [`super::cleanup`]).
//! - A start is journalled from before the claim until the worktree is checked out, so a crash
//!   in between is undone by the journal recovery; after that the worktree may hold the
//!   command's work and a crash is a dead instance for `doctor`.

use std::ffi::OsString;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use git2::Repository;

use super::claim::{self, Claim};
use super::cleanup::{self, Teardown};
use super::heartbeat::Heartbeat;
use super::holds::{self, Held, Taken};
use super::leftovers;
use super::mirror::{self, DbMirror};
use super::signals::{Slot, Spawned};
use super::{EXIT_TIMED_OUT, Hosted, HostedBody, Mode, Notice, RunOptions, RunOutcome};
use crate::activity;
use crate::api::{self, ApiServer};
use crate::config::Settings;
use crate::control::{self, ControlServer};
use crate::coordination::Coordination;
use crate::db::{DbSettings, Location};
use crate::error::{Error, IoContext, Result};
use crate::fleet_holds::{BeatTarget, HostBeat};
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::process::{self, ProcessIdentity};
use crate::registry::{InstanceRecord, InstanceStatus, Registry};
use crate::sign::{Keys, SigningKey};
use crate::time::Timestamp;
use crate::worktree::{self, Cleanup, WorktreePlan};
use crate::{fault, journal};

/// What the supervisor starts from: everything validated, nothing written yet.
pub(super) struct Launch<'a> {
    pub paths: &'a AppPaths,
    pub keys: &'a Keys,
    pub repo: &'a Repository,
    pub id: InstanceId,
    pub plan: Option<WorktreePlan>,
    pub options: &'a RunOptions,
    pub settings: &'a Settings,
    pub slot: Arc<Slot>,
    pub database: (Location, DbSettings),
    pub api: Option<api::Binding>,
    /// The loop run in place of a command ([`super::host`]).
    pub body: Option<HostedBody<'a>>,
}

/// A registered instance and what serves it.
pub(super) struct Supervisor<'a> {
    paths: &'a AppPaths,
    repo: &'a Repository,
    options: &'a RunOptions,
    settings: &'a Settings,
    slot: Arc<Slot>,
    database: (Location, DbSettings),
    registry: Registry,
    keys: &'a Keys,
    key: SigningKey,
    record: InstanceRecord,
    plan: Option<WorktreePlan>,
    /// Whether the branch is one `app` created (and may delete once it holds nothing).
    created_branch: bool,
    start_intent: journal::Intent,
    mirror: DbMirror,
    /// The API's address, until the API starts.
    binding: Option<api::Binding>,
    api: Option<ApiServer>,
    control: Option<ControlServer>,
    heartbeat: Option<Heartbeat>,
    /// This host's fleet heartbeat, when the database is a server (see
    /// [`crate::fleet_holds::HostBeat`]).
    host_beat: Option<HostBeat>,
    /// The locks and reservation of `--lock` and `--reserve`, once taken.
    held: Option<Held>,
    /// The agent-state thread, while the command runs.
    activity: Option<activity::Tracker>,
    /// The loop run in place of a command, until it runs.
    body: Option<HostedBody<'a>>,
    /// Whether the instance runs such a loop.
    hosted: bool,
}

/// How an instance ends.
enum Ending {
    /// The worktree could not be made (`worktree::create` rolled it back).
    StartFailed(Error),
    /// The start's intent could not be closed: everything is left as a crash would leave it,
    /// for the journal recovery to undo.
    Abandoned(Error),
    /// A lock or reservation of `--lock`/`--reserve` was refused, or could not be taken.
    Refused(Error),
    /// The command could not be started.
    SpawnFailed(std::io::Error),
    /// The hosted loop failed.
    Failed(Error),
    /// A signal arrived before the command started.
    Cancelled(i32),
    /// The command exited (or `app serve` was asked to stop), with `app`'s exit code.
    Exited { code: u8, reason: String },
}

impl Supervisor<'_> {
    /// Registers the instance, starts it, waits for it and ends it.
    pub(super) fn run(launch: Launch<'_>) -> Result<RunOutcome> {
        let mut supervisor = Supervisor::register(launch)?;
        let started = supervisor.start().and_then(|env| supervisor.hold(env));
        let ending = match started.and_then(|env| supervisor.spawn(&env)) {
            Ok(child) => supervisor.wait(child.as_ref()),
            Err(ending) => ending,
        };
        supervisor.end(ending)
    }
}

impl<'a> Supervisor<'a> {
    /// Claims the id (and branch and ports) in the registry, journalling the start first when
    /// there is a worktree to make, and starts the database mirror. A failure here leaves
    /// nothing registered.
    fn register(launch: Launch<'a>) -> Result<Supervisor<'a>> {
        let Launch {
            paths,
            keys,
            repo,
            id,
            mut plan,
            options,
            settings,
            slot,
            database,
            api,
            body,
        } = launch;
        let registry = Registry::open_for_write(paths, keys)?;
        let mut record = new_record(&id, plan.as_ref(), options, api.as_ref())?;
        let key = keys.load_or_create()?;
        let create_branch = plan.as_ref().is_some_and(|p| p.create_branch);
        let start_intent =
            cleanup::intent(journal::Operation::Start, plan.as_ref(), create_branch, &id);
        if plan.is_some() {
            journal::begin(paths, &key, &start_intent)?;
            fault::point("run.intent-written");
        }
        let claim = Claim {
            plan: plan.as_mut(),
            ports: options
                .ports
                .map(|count| (count, settings.port_range.clone())),
            ci: options.ci(),
        };
        let created_branch = match claim::claim(&registry, &mut record, claim, settings.timing) {
            Ok(created) => created,
            Err(err) => {
                let _ = journal::end(paths, &start_intent);
                return Err(err);
            }
        };
        fault::point("run.registered");
        let mirror = DbMirror::start(paths, database.clone(), &settings.fleet_host);
        // A hosted loop (`app worker`) folds this host's fleet heartbeat into its own requests.
        let host_beat = host_beat(settings, &database).filter(|_| body.is_none());
        mirror.instance(&record);
        mirror.event(
            &id,
            "instance.started",
            serde_json::json!({
                "pid": record.pid,
                "command": record.command,
                "worktree": record.worktree,
                "branch": record.branch,
                "base": record.base,
            }),
        );
        Ok(Supervisor {
            paths,
            repo,
            options,
            settings,
            slot,
            database,
            registry,
            keys,
            key,
            record,
            plan,
            created_branch,
            start_intent,
            mirror,
            binding: api,
            api: None,
            control: None,
            heartbeat: None,
            host_beat,
            held: None,
            activity: None,
            hosted: body.is_some(),
            body,
        })
    }

    /// Makes the worktree, then serves the control socket and the API. Returns the
    /// environment the command (and every `app instance exec`) gets.
    fn start(&mut self) -> Result<Vec<(String, OsString)>, Ending> {
        if let Some(plan) = &self.plan {
            let nonce = &self.start_intent.nonce;
            worktree::create(self.repo, self.paths, &self.key, plan, nonce)
                .map_err(Ending::StartFailed)?;
            fault::point("run.checked-out");
            // The start is complete: from here on the worktree may hold the command's work,
            // and a crash is a dead instance for `doctor`, never a start to undo.
            journal::end(self.paths, &self.start_intent).map_err(Ending::Abandoned)?;
        }
        let env = self.environment();
        self.control = self.serve_control(&env);
        self.api = self.start_api();
        Ok(env)
    }

    /// Takes the locks and the reservation of `--lock` and `--reserve`, with the heartbeat
    /// running while a lock is awaited. Returns `env` with the lock variables added.
    fn hold(
        &mut self,
        mut env: Vec<(String, OsString)>,
    ) -> Result<Vec<(String, OsString)>, Ending> {
        let holds = &self.options.holds;
        if holds.is_empty() {
            return Ok(env);
        }
        self.heartbeat = Some(self.start_heartbeat());
        let coordination = Coordination::new(self.paths, self.settings);
        let context = (self.slot.as_ref(), self.options.notify);
        match holds::take(holds, &coordination, &self.record, context) {
            Ok(Taken::Held(held)) => {
                env.extend(held.environment());
                self.held = Some(held);
                Ok(env)
            }
            Ok(Taken::Cancelled(signal)) => Err(Ending::Cancelled(signal)),
            Err(err) => Err(Ending::Refused(err)),
        }
    }

    fn start_heartbeat(&self) -> Heartbeat {
        let (sender, repo_root) = self.mirror.sender();
        let timing = self.settings.timing;
        // A hosted loop (`app worker`) is frugal with a server: its database row is renewed
        // only as often as keeps it live for other hosts (a third of the stale age).
        let mirror_every = if self.hosted {
            timing.heartbeat_interval.max(timing.stale_after / 3)
        } else {
            timing.heartbeat_interval
        };
        Heartbeat::start(
            (self.paths.clone(), self.keys.clone(), self.key.clone()),
            self.record.clone(),
            (timing, mirror_every),
            (sender, repo_root, self.mirror.host().to_string()),
        )
    }

    /// The `APP_*` variables of the instance.
    fn environment(&self) -> Vec<(String, OsString)> {
        let (db_var, db_value) = self.database.0.export();
        let mut env: Vec<(String, OsString)> = vec![
            ("APP_INSTANCE_ID".into(), self.record.id.as_str().into()),
            ("APP_REPO_ROOT".into(), self.paths.repo_root().into()),
            // The command's own `app` calls reach the same database as its supervisor.
            (db_var.into(), db_value.into()),
        ];
        let ports = &self.record.ports;
        if let Some(first) = ports.first() {
            let all: Vec<String> = ports.iter().map(u16::to_string).collect();
            env.push(("APP_PORT".into(), first.to_string().into()));
            env.push(("APP_PORTS".into(), all.join(",").into()));
        }
        if let Some(plan) = &self.plan {
            env.push(("APP_WORKTREE".into(), plan.path.clone().into()));
            if !plan.detached {
                env.push(("APP_BRANCH".into(), plan.branch.clone().into()));
            }
        }
        if let Some(url) = &self.record.api_url {
            env.push(("APP_API_URL".into(), url.into()));
        }
        env
    }

    /// The control socket, through which `app instance exec` runs commands in the same place
    /// with the same environment; without one the instance still runs.
    fn serve_control(&self, env: &[(String, OsString)]) -> Option<ControlServer> {
        let id = &self.record.id;
        let context = control::ExecContext {
            cwd: self.record.cwd.clone(),
            env: env.to_vec(),
            stop: {
                let slot = Arc::clone(&self.slot);
                Arc::new(move || slot.request_stop())
            },
            events: {
                let ((sender, repo_root), id) = (self.mirror.sender(), id.clone());
                Arc::new(move |kind, payload| {
                    sender.send(mirror::event(&repo_root, &id, kind, payload));
                })
            },
        };
        match control::serve(&self.paths.control_socket(id), context) {
            Ok(server) => Some(server),
            Err(err) => {
                tracing::warn!(instance = %id, %err, "no control socket; 'app instance exec' cannot reach this instance");
                None
            }
        }
    }

    /// The HTTP API on the address bound before the run, when asked for; without it the
    /// instance still runs.
    fn start_api(&mut self) -> Option<ApiServer> {
        let binding = self.binding.take()?;
        let id = &self.record.id;
        let context = api::ApiContext {
            instance_id: id.to_string(),
            paths: self.paths.clone(),
            keys: self.keys.clone(),
            settings: self.settings.clone(),
            database: self.database.clone(),
            capacity: self
                .options
                .api
                .as_ref()
                .map_or(api::DEFAULT_CAPACITY, |a| a.capacity),
            dashboard: self.options.api.as_ref().and_then(|a| a.dashboard.clone()),
        };
        match api::start(binding, context) {
            Ok(server) => {
                if let Some(notify) = self.options.notify {
                    notify(&Notice::ApiListening {
                        id: id.clone(),
                        url: server.url().to_string(),
                    });
                }
                Some(server)
            }
            Err(err) => {
                tracing::warn!(instance = %id, %err, "the API did not start; running without it");
                None
            }
        }
    }

    /// Starts the command (none for `app serve`) and records it: status `running`.
    fn spawn(&mut self, env: &[(String, OsString)]) -> Result<Option<Arc<process::Child>>, Ending> {
        let child = if matches!(self.options.mode, Mode::Serve) {
            None
        } else {
            // The agent's state is watched, and written once, before the command starts:
            // nothing it writes is missed, and it never waits for the first diff of its
            // worktree before the registry shows it running.
            let probe = self.probe();
            let argv = &self.options.command;
            let mut command = Command::new(&argv[0]);
            command
                .args(&argv[1..])
                .current_dir(&self.record.cwd)
                .envs(env.iter().map(|(k, v)| (k, v)));
            match self.slot.spawn(&mut command) {
                Spawned::Running(child) => {
                    let reaped = Arc::clone(&child);
                    let exited: activity::ExitedFn = Box::new(move || reaped.reaped());
                    self.activity = Some(activity::Tracker::start(probe, exited));
                    Some(child)
                }
                Spawned::Failed(err) => {
                    probe.discard();
                    return Err(Ending::SpawnFailed(err));
                }
                Spawned::Cancelled(signal) => {
                    probe.discard();
                    return Err(Ending::Cancelled(signal));
                }
            }
        };
        self.record.child_pid = child.as_ref().map(|child| child.id());
        self.record.child_start_time = self.record.child_pid.and_then(process::start_time);
        self.record.status = InstanceStatus::Running;
        let (id, child_pid, child_start_time) = (
            &self.record.id,
            self.record.child_pid,
            self.record.child_start_time,
        );
        if let Err(err) = self.registry.update(|tables| {
            if let Some(mut current) = tables.instance(id) {
                current.child_pid = child_pid;
                current.child_start_time = child_start_time;
                current.status = InstanceStatus::Running;
                tables.put_instance(&current);
            }
            Ok(())
        }) {
            tracing::warn!(instance = %id, %err, "recording the command's pid failed");
        }
        self.mirror.instance(&self.record);
        Ok(child)
    }

    /// The agent-state probe of the command about to start (docs/AGENT-STATE.md), ticked once.
    fn probe(&self) -> activity::Probe {
        let watched = activity::Watched {
            paths: self.paths.clone(),
            id: self.record.id.to_string(),
            worktree: self.record.worktree.clone(),
            base: self.plan.as_ref().map(|plan| plan.base),
            timing: self.settings.activity,
            started: self.record.started_at,
        };
        let holds = super::holds::what_is_held(
            self.paths,
            self.settings,
            &self.record,
            &self.options.holds,
        );
        let mut probe = activity::Probe::new(watched, Box::new(|| false), holds);
        probe.tick();
        probe
    }

    /// Heartbeats until the command exits (or, for `app serve`, until a stop request).
    fn wait(&mut self, child: Option<&Arc<process::Child>>) -> Ending {
        let timed_out = match (self.options.deadline, child) {
            (Some(limit), Some(child)) => Some(self.slot.arm_deadline(child, limit)),
            _ => None,
        };
        // A heartbeat that ran while the locks were awaited knew the record before the spawn.
        if let Some(early) = self.heartbeat.take() {
            early.stop();
        }
        self.heartbeat = Some(self.start_heartbeat());
        let Some(child) = child else {
            if let Some(body) = self.body.take() {
                let hosted = Hosted {
                    id: self.record.id.clone(),
                    slot: Arc::clone(&self.slot),
                };
                return match body(&hosted) {
                    Ok(code) => Ending::Exited {
                        code,
                        reason: format!("it ended with {code}"),
                    },
                    Err(err) => Ending::Failed(err),
                };
            }
            self.slot.wait_for_stop();
            return Ending::Exited {
                code: 0,
                reason: "asked to stop".to_string(),
            };
        };
        match child.wait() {
            Ok(status) if timed_out.is_some_and(|flag| flag.load(Ordering::SeqCst)) => {
                Ending::Exited {
                    code: EXIT_TIMED_OUT,
                    reason: format!(
                        "the command outlived its timeout ({})",
                        process::exit_code(status)
                    ),
                }
            }
            Ok(status) => {
                let code = process::exit_code(status);
                Ending::Exited {
                    code,
                    reason: format!("the command exited with {code}"),
                }
            }
            Err(err) => {
                tracing::error!(instance = %self.record.id, %err, "waiting for the command failed");
                Ending::Exited {
                    code: 1,
                    reason: format!("waiting for the command failed: {err}"),
                }
            }
        }
    }

    /// The one way out: the API's final event, the control socket's commands stopped, what the
    /// command left behind stopped (or kept), the worktree cleaned up and the instance
    /// unregistered, the end mirrored; then `app`'s result.
    fn end(mut self, ending: Ending) -> Result<RunOutcome> {
        // The locks are the command's: they go with it, as `app lock run` let them go.
        if let Some(held) = &mut self.held {
            held.release_locks();
        }
        if let Ending::Abandoned(err) = ending {
            return Err(err);
        }
        self.wind_down(ending.reason());
        // What the command left behind is stopped (or, asked to, kept with its worktree)
        // before anything looks at the worktree, so nothing writes there after the clean check.
        let still_running = match &ending {
            Ending::Exited { .. } | Ending::Failed(_) => {
                leftovers::settle(&self.slot, self.options.keep_running)
            }
            _ => None,
        };
        if let Some(tracker) = self.activity.take() {
            tracker.stop();
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.stop();
        }
        if let Some(beat) = self.host_beat.take() {
            beat.stop();
        }
        if let Some(mut held) = self.held.take() {
            held.release_reservation();
        }
        let cleanup = match &ending {
            Ending::StartFailed(_) => {
                self.teardown().undo_start(&self.start_intent);
                Ok(None)
            }
            _ => self.teardown().finish(still_running.as_deref()),
        };
        let (exit_code, payload) = ending.report(cleanup.as_ref().ok());
        self.mirror.stopped(&self.record, exit_code, payload);
        ending.into_result(cleanup, &self.record)
    }

    /// The first steps of every way out: the API's final event and close, then the commands
    /// run through the control socket are stopped (see [`ControlServer::shutdown`]).
    fn wind_down(&mut self, reason: &str) {
        let id = &self.record.id;
        if let Some(api) = self.api.take() {
            api.shutdown(id, reason);
        }
        if let Some(control) = self.control.take() {
            let slot = &self.slot;
            let killed = control.shutdown(slot.stop_timeout, &|| slot.forced());
            if killed > 0 {
                tracing::warn!(instance = %id, killed, "commands run with 'app instance exec' did not stop in time; killed them");
            }
        }
    }

    fn teardown(&self) -> Teardown<'_> {
        Teardown {
            repo: self.repo,
            registry: &self.registry,
            key: &self.key,
            record: &self.record,
            plan: self.plan.as_ref(),
            created_branch: self.created_branch,
            options: self.options,
        }
    }
}

impl Ending {
    /// Why the instance ends, as the API's final event says.
    fn reason(&self) -> &str {
        match self {
            Ending::StartFailed(_) | Ending::Abandoned(_) => "the instance could not start",
            Ending::Refused(_) => "a lock or reservation was refused",
            Ending::SpawnFailed(_) => "the command could not start",
            Ending::Failed(_) => "it failed",
            Ending::Cancelled(_) => "cancelled by a signal",
            Ending::Exited { reason, .. } => reason,
        }
    }

    /// The exit code and the payload of the `instance.stopped` event.
    fn report(&self, cleanup: Option<&Option<Cleanup>>) -> (Option<u8>, serde_json::Value) {
        use serde_json::json;
        match self {
            Ending::StartFailed(err) | Ending::Abandoned(err) => {
                (None, json!({ "error": err.to_string() }))
            }
            Ending::Refused(err) | Ending::Failed(err) => (
                Some(err.exit_code()),
                json!({ "exit_code": err.exit_code(), "error": err.to_string(), "cleanup": cleanup }),
            ),
            Ending::SpawnFailed(err) => (
                None,
                json!({ "error": err.to_string(), "cleanup": cleanup }),
            ),
            Ending::Cancelled(signal) => {
                let code = process::signal_exit_code(*signal);
                (
                    Some(code),
                    json!({ "exit_code": code, "cancelled_by_signal": signal, "cleanup": cleanup }),
                )
            }
            Ending::Exited { code, .. } => (
                Some(*code),
                json!({ "exit_code": code, "cleanup": cleanup }),
            ),
        }
    }

    /// `app`'s result: the outcome, or the error that ended the start.
    fn into_result(
        self,
        cleanup: Result<Option<Cleanup>>,
        record: &InstanceRecord,
    ) -> Result<RunOutcome> {
        let outcome = |exit_code, cleanup| RunOutcome {
            id: record.id.clone(),
            exit_code,
            worktree: record.worktree.clone(),
            branch: record.branch.clone(),
            cleanup,
        };
        match self {
            Ending::StartFailed(err) | Ending::Abandoned(err) => Err(err),
            Ending::Refused(err) | Ending::Failed(err) => {
                cleanup?;
                Err(err)
            }
            Ending::SpawnFailed(source) => {
                cleanup?;
                Err(Error::Spawn {
                    command: record.command[0].clone(),
                    source,
                })
            }
            Ending::Cancelled(signal) => Ok(outcome(process::signal_exit_code(signal), cleanup?)),
            Ending::Exited { code, .. } => Ok(outcome(code, cleanup?)),
        }
    }
}

/// The registry entry of a new instance of this process, status `starting`.
fn new_record(
    id: &InstanceId,
    plan: Option<&WorktreePlan>,
    options: &RunOptions,
    api: Option<&api::Binding>,
) -> Result<InstanceRecord> {
    let me = ProcessIdentity::current();
    let cwd = match plan {
        Some(plan) => plan.path.clone(),
        None => std::env::current_dir().io_context("reading", "the current directory")?,
    };
    let now = Timestamp::now();
    Ok(InstanceRecord {
        id: id.clone(),
        pid: me.pid,
        start_time: me.start_time,
        boot_id: me.boot_id.clone(),
        host: process::hostname().to_string(),
        started_at: now,
        heartbeat_at: now,
        worktree: plan.map(|p| p.path.clone()),
        cwd,
        // A detached worktree (`app ci`) holds no branch.
        branch: plan.filter(|p| !p.detached).map(|p| p.branch.clone()),
        base: plan.map(|p| p.base.to_string()),
        command: options.command.clone(),
        child_pid: None,
        child_start_time: None,
        status: InstanceStatus::Starting,
        ports: Vec::new(),
        api_url: api.map(api::Binding::url),
    })
}

/// With a server database, this host's fleet heartbeat for as long as the instance lives: its
/// supervisor is a process of the fleet that keeps the host's holds alive.
fn host_beat(
    settings: &Settings,
    (location, db_settings): &(Location, DbSettings),
) -> Option<HostBeat> {
    if let Location::Local(_) = location {
        return None;
    }
    HostBeat::start(BeatTarget {
        location: location.clone(),
        settings: *db_settings,
        host: settings.fleet_host.clone(),
        lease_ttl: settings.lease_ttl,
        secret_check: String::new(),
    })
    .inspect_err(|err| tracing::warn!(%err, "cannot start this host's fleet heartbeat"))
    .ok()
}
