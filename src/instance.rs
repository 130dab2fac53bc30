//! Instance lifecycle: `app run` (claim an id, make a worktree, register, supervise the command,
//! clean up), and `app instance stop`.
//!
//! Invariants:
//! - All validation happens before the first write: bad input changes nothing on disk.
//! - The id (and the branch) are claimed under the registry lock, so two instances racing for the
//!   same name or branch cannot both win; the worktree checkout runs outside the lock.
//! - The supervisor heartbeats while the command runs; SIGINT, SIGTERM and SIGHUP sent to it are
//!   forwarded to the command, except those the terminal already delivered to the whole
//!   foreground process group (forwarding them would deliver a Ctrl-C twice).
//! - A signal sent to the supervisor itself is a stop request: the command gets it, and is
//!   SIGKILLed when it outlives the stop timeout; a second request kills it at once. `app serve`
//!   has no command: any signal stops it, and a second one forces the stop.
//! - On the way out the API sends its final event and closes, and commands run through the
//!   control socket are stopped (SIGTERM, SIGKILL after the stop timeout or a second request).
//! - On the way out the instance is unregistered and its worktree removed only when that loses
//!   nothing (see [`worktree::remove_if_clean`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use git2::Repository;
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::Cause;

use crate::api::{self, ApiOptions, ApiServer, Bound};
use crate::config::Timing;
use crate::db::events::NewEvent;
use crate::db::instances::InstanceRow;
use crate::db::mirror::{Mirror, MirrorSender, Update};
use crate::db::{DbSettings, Location};
use crate::error::{Error, GitContext, IoContext, Result};
use crate::paths::AppPaths;
use crate::process::{self, Presence, ProcessIdentity};
use crate::registry::{
    BranchRecord, Entry, InstanceRecord, InstanceStatus, Liveness, Registry, Snapshot, Timestamp,
};
use crate::sign::SigningKey;
use crate::worktree::{self, Cleanup, WorktreePlan};
use crate::{control, fault, journal, ports};

/// Checks a user-given instance name: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn validate_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !first_ok || !rest_ok || name.len() > 64 {
        return Err(Error::bad_input(format!(
            "invalid instance name {name:?}: use 1-64 characters from a-z, 0-9, '_' and '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// A fresh random id: 8 lowercase hex characters from a v4 UUID.
fn random_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// Whether `id` was ever used in this repository as far as any trace shows.
fn id_in_use(repo: &Repository, paths: &AppPaths, snapshot: &Snapshot, id: &str) -> bool {
    snapshot.instances.iter().any(|entry| match entry {
        Entry::Valid(record) => record.id == id,
        Entry::Forged { key, .. } => key == id,
    }) || paths.worktree(id).exists()
        || paths.git_worktree_admin(id).exists()
        || repo
            .find_branch(&worktree::default_branch(id), git2::BranchType::Local)
            .is_ok()
}

/// What `app run` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// A name to use as the instance id instead of a random one.
    pub name: Option<String>,
    /// Branch to check out (default `app/<id>`).
    pub branch: Option<String>,
    /// Ref the new branch starts from (default HEAD).
    pub base: Option<String>,
    /// Register in the current directory without a worktree.
    pub no_worktree: bool,
    /// Keep worktree and branch on exit.
    pub keep: bool,
    /// Leave processes the command left behind running (the worktree then stays while they
    /// live); by default they are stopped with the instance.
    pub keep_running: bool,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// The shared database to mirror the instance into (`--db`, else the environment).
    pub db: Option<PathBuf>,
    /// How many TCP ports to lease (`--ports N`).
    pub ports: Option<usize>,
    /// Run no command: wait for a stop request (`app serve`; `command` is only recorded).
    pub serve: bool,
    /// Serve the HTTP API (`--with-api`).
    pub api: Option<ApiOptions>,
    /// How long a stop waits before SIGKILL (default [`DEFAULT_STOP_TIMEOUT`]).
    pub stop_timeout: Option<Duration>,
    /// Told what the person running `app` should see.
    pub notify: Option<fn(&Notice)>,
    /// `app ci`: a branch checked out elsewhere gets a detached worktree, and the worktree is
    /// always removed at the end (uncommitted work saved on `refs/app/rescue/<id>` first).
    pub ci: bool,
    /// Stop the command (a stop request) once it has run this long; `app` then exits 124.
    pub deadline: Option<Duration>,
}

/// `app`'s exit code when the command outlived `--timeout`, as `timeout(1)` has it.
pub const EXIT_TIMED_OUT: u8 = 124;

/// How long a stop request waits for a command before killing it.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Something the person running the instance should know while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The API listens at `url`.
    ApiListening {
        /// The instance.
        id: String,
        /// Where.
        url: String,
    },
    /// Every port of the range was taken; the instance runs without an API.
    ApiUnavailable {
        /// The instance.
        id: String,
        /// The ports tried.
        range: std::ops::RangeInclusive<u16>,
    },
}

/// How an instance ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The instance id.
    pub id: String,
    /// Exit code for `app`: the command's own, or 128+N when it died of signal N.
    pub exit_code: u8,
    /// The worktree, when the instance had one.
    pub worktree: Option<PathBuf>,
    /// The branch, when the instance had one.
    pub branch: Option<String>,
    /// What happened to worktree and branch (`None` with `--keep` or `--no-worktree`).
    pub cleanup: Option<Cleanup>,
}

/// The command as the signal thread sees it, and the stop requests so far.
#[derive(Debug, Default)]
struct ChildSlot {
    /// Signalled only until it is reaped, so a recycled pid is never signalled.
    child: Option<Arc<process::Child>>,
    /// A signal that arrived before the child existed: the run is cancelled.
    pending: Option<i32>,
    /// Stop requests: signals sent to the supervisor itself, or any signal to `app serve`.
    stops: u32,
}

/// The slot shared by the supervisor, the signal thread and the control socket.
#[derive(Debug)]
struct Slot {
    state: Mutex<ChildSlot>,
    /// Notified on every stop request.
    changed: Condvar,
    stop_timeout: Duration,
}

impl Slot {
    fn new(stop_timeout: Duration) -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(ChildSlot::default()),
            changed: Condvar::new(),
            stop_timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ChildSlot> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Whether a second stop request asked to stop at once.
    fn forced(&self) -> bool {
        self.lock().stops >= 2
    }

    /// Blocks until the first stop request (`app serve`).
    fn wait_for_stop(&self) {
        let mut state = self.lock();
        while state.stops == 0 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poison| poison.into_inner());
        }
    }
}

/// Runs `options.command` as a new instance and supervises it until it exits.
pub fn run(cwd: &Path, options: &RunOptions, timing: Timing) -> Result<RunOutcome> {
    if options.command.is_empty() && !options.serve {
        return Err(Error::bad_input(
            "no command given; write it after '--', e.g. app run -- bash",
        ));
    }
    if let Some(name) = &options.name {
        validate_name(name)?;
    }
    if let Some(count) = options.ports {
        ports::validate_count(count)?;
        ports::range()?;
    }
    if options.no_worktree && (options.branch.is_some() || options.base.is_some()) {
        return Err(Error::bad_input(
            "--branch and --base need a worktree; drop them or drop --no-worktree",
        ));
    }
    let database = (
        Location::resolve(options.db.as_deref())?,
        DbSettings::from_env()?,
    );
    let paths = AppPaths::discover(cwd)?;
    let repo = Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))?;

    // Operations a crash interrupted are finished or undone first (one directory read when
    // there are none).
    if paths.journal_dir().is_dir() {
        crate::doctor::recover_journal(&paths, timing)?;
    }

    // Everything below until `open_for_write` only reads.
    let reader = Registry::open_read_only(&paths)?;
    let snapshot = reader.snapshot()?;
    let id = match &options.name {
        Some(name) => {
            refuse_live_holder(&snapshot, name, timing)?;
            name.clone()
        }
        None => (0..16)
            .map(|_| random_id())
            .find(|id| !id_in_use(&repo, &paths, &snapshot, id))
            .ok_or_else(|| Error::Failed("could not find an unused instance id".into()))?,
    };
    let plan = if options.no_worktree {
        None
    } else {
        Some(worktree::plan(
            &repo,
            &paths,
            &id,
            (options.branch.as_deref(), options.base.as_deref()),
            options.ci,
        )?)
    };
    // The API's address is the last check: an explicit one that is taken stops the run here.
    let api = match &options.api {
        None => None,
        Some(api_options) => match api::bind(api_options)? {
            Bound::Listening(binding) => Some(binding),
            Bound::AllTaken(range) => {
                match options.notify {
                    Some(notify) => notify(&Notice::ApiUnavailable {
                        id: id.clone(),
                        range,
                    }),
                    None => {
                        tracing::warn!(instance = %id, "every API port of {}-{} is taken; running without the API", range.start(), range.end())
                    }
                }
                None
            }
        },
    };

    // The command's whole process tree is the instance's: what it leaves behind comes to us.
    process::become_subreaper();
    // From here on, signals are ours: one arriving before the command starts cancels the run.
    let slot = Slot::new(options.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT));
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP])
        .io_context("installing signal handlers for", "app run")?;
    let signal_handle = signals.handle();
    let signal_thread = {
        let slot = Arc::clone(&slot);
        thread::spawn(move || {
            for origin in signals.forever() {
                forward_signal(&slot, origin.signal, &origin.cause);
            }
        })
    };
    let result = supervise(
        &paths, &repo, &id, plan, options, timing, &slot, database, api,
    );
    signal_handle.close();
    let _ = signal_thread.join();
    result
}

fn forward_signal(slot: &Arc<Slot>, signal: i32, cause: &Cause) {
    // A terminal's Ctrl-C or hangup reaches the whole foreground process group, the command
    // included: forwarding it would deliver it twice.
    deliver(slot, signal, matches!(cause, Cause::Kernel));
}

/// Sends `signal` to the command, or cancels the run when there is no command yet. A signal
/// that `reached_group` already is only recorded. A signal meant for the supervisor itself is a
/// stop request: the first arms a SIGKILL after the stop timeout, a second one kills at once.
fn deliver(slot: &Arc<Slot>, signal: i32, reached_group: bool) {
    let mut state = slot.lock();
    let request = !reached_group || state.child.is_none();
    if request {
        state.stops += 1;
        slot.changed.notify_all();
    }
    match &state.child {
        None => {
            state.pending.get_or_insert(signal);
        }
        Some(child) if !reached_group => {
            let signal = if state.stops >= 2 {
                Signal::SIGKILL
            } else {
                match Signal::try_from(signal) {
                    Ok(signal) => signal,
                    Err(_) => return,
                }
            };
            if child.signal(signal) && state.stops == 1 {
                let (child, timeout) = (Arc::clone(child), slot.stop_timeout);
                thread::spawn(move || {
                    thread::sleep(timeout);
                    if !child.reaped() {
                        tracing::warn!(
                            pid = child.id(),
                            "the command outlived the stop timeout; killing it"
                        );
                        child.signal(Signal::SIGKILL);
                    }
                });
            }
        }
        Some(_) => {}
    }
}

fn refuse_live_holder(snapshot: &Snapshot, name: &str, timing: Timing) -> Result<()> {
    if let Some(record) = snapshot.instance(name)
        && record.liveness(timing.stale_after) == Liveness::Live
    {
        return Err(Error::Busy(format!(
            "instance name {name:?} is held by a live instance (pid {}, started {}); pick another --instance or stop it with 'app instance stop {name}'",
            record.pid, record.started_at
        )));
    }
    Ok(())
}

/// Copies the instance's registry entry and lifecycle into the shared database, in the
/// background; see [`crate::db::mirror`].
struct DbMirror {
    mirror: Mirror,
    repo_root: PathBuf,
    /// How long the way out waits for the last writes.
    final_wait: Duration,
}

impl DbMirror {
    fn start(paths: &AppPaths, (location, settings): (Location, DbSettings)) -> Self {
        DbMirror {
            mirror: Mirror::start(location, settings),
            repo_root: paths.repo_root().to_path_buf(),
            final_wait: settings.retry_deadline.min(Duration::from_secs(5)),
        }
    }

    fn instance(&self, record: &InstanceRecord) {
        self.mirror.send(Update::Instance(InstanceRow::from_record(
            record,
            &self.repo_root,
        )));
    }

    fn event(&self, id: &str, kind: &str, payload: serde_json::Value) {
        self.mirror.send(event(&self.repo_root, id, kind, payload));
    }

    /// Records the end of the instance and waits (bounded) for the mirror to catch up.
    fn stopped(self, record: &InstanceRecord, exit_code: Option<u8>, payload: serde_json::Value) {
        let mut row = InstanceRow::from_record(record, &self.repo_root);
        let now = Timestamp::now().to_string();
        row.status = "stopped".into();
        row.last_heartbeat = now.clone();
        row.stopped_at = Some(now);
        row.exit_code = exit_code.map(i64::from);
        self.mirror.send(Update::Instance(row));
        self.event(&record.id, "instance.stopped", payload);
        if !self.mirror.close(self.final_wait) {
            tracing::warn!(instance = %record.id, "the database mirror did not catch up before exit; 'app doctor' reports the gap");
        }
    }
}

fn event(repo_root: &Path, id: &str, kind: &str, payload: serde_json::Value) -> Update {
    Update::Event(NewEvent {
        uid: crate::db::events::new_uid(),
        at: Timestamp::now(),
        repo_root: Some(repo_root.display().to_string()),
        instance: Some(id.to_string()),
        kind: kind.to_string(),
        payload,
    })
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    paths: &AppPaths,
    repo: &Repository,
    id: &str,
    plan: Option<WorktreePlan>,
    options: &RunOptions,
    timing: Timing,
    slot: &Arc<Slot>,
    database: (Location, DbSettings),
    api: Option<api::Binding>,
) -> Result<RunOutcome> {
    let registry = Registry::open_for_write(paths)?;
    let me = ProcessIdentity::current();
    let cwd = match &plan {
        Some(plan) => plan.path.clone(),
        None => std::env::current_dir().io_context("reading", "the current directory")?,
    };
    let now = Timestamp::now();
    let mut record = InstanceRecord {
        id: id.to_string(),
        pid: me.pid,
        start_time: me.start_time,
        boot_id: me.boot_id.clone(),
        host: process::hostname().to_string(),
        started_at: now,
        heartbeat_at: now,
        worktree: plan.as_ref().map(|p| p.path.clone()),
        cwd: cwd.clone(),
        // A detached worktree (`app ci`) holds no branch.
        branch: plan
            .as_ref()
            .filter(|p| !p.detached)
            .map(|p| p.branch.clone()),
        base: plan.as_ref().map(|p| p.base.to_string()),
        command: options.command.clone(),
        child_pid: None,
        child_start_time: None,
        status: InstanceStatus::Starting,
        ports: Vec::new(),
        api_url: api.as_ref().map(api::Binding::url),
    };
    let key = SigningKey::load_or_create(paths)?;
    let start_intent = intent(
        journal::Operation::Start,
        plan.as_ref(),
        plan.as_ref().is_some_and(|p| p.create_branch),
        id,
    );
    if plan.is_some() {
        journal::begin(paths, &key, &start_intent)?;
        fault::point("run.intent-written");
    }
    let mut plan = plan;
    let created_branch = match claim(
        &registry,
        &mut record,
        plan.as_mut(),
        (options.ports, options.ci),
        timing,
    ) {
        Ok(created) => created,
        Err(err) => {
            let _ = journal::end(paths, &start_intent);
            return Err(err);
        }
    };
    fault::point("run.registered");
    let (db_var, db_value) = database.0.export();
    let api_database = database.clone();
    let mirror = DbMirror::start(paths, database);
    mirror.instance(&record);
    mirror.event(
        id,
        "instance.started",
        serde_json::json!({
            "pid": record.pid,
            "command": record.command,
            "worktree": record.worktree,
            "branch": record.branch,
            "base": record.base,
        }),
    );

    if let Some(plan) = &plan
        && let Err(err) = worktree::create(repo, paths, &key, plan, &start_intent.nonce)
    {
        unregister(
            &registry,
            id,
            plan.create_branch.then_some(plan.branch.as_str()),
        );
        let _ = journal::end(paths, &start_intent);
        mirror.stopped(
            &record,
            None,
            serde_json::json!({ "error": err.to_string() }),
        );
        return Err(err);
    }
    if plan.is_some() {
        fault::point("run.checked-out");
        // The start is complete: from here on the worktree may hold the command's work, and a
        // crash is a dead instance for `doctor`, never a start to undo.
        journal::end(paths, &start_intent)?;
    }

    let mut env: Vec<(String, OsString)> = vec![
        ("APP_INSTANCE_ID".into(), id.into()),
        ("APP_REPO_ROOT".into(), paths.repo_root().into()),
        // The command's own `app` calls reach the same database as its supervisor.
        (db_var.into(), db_value.into()),
    ];
    if let Some(first) = record.ports.first() {
        let all: Vec<String> = record.ports.iter().map(u16::to_string).collect();
        env.push(("APP_PORT".into(), first.to_string().into()));
        env.push(("APP_PORTS".into(), all.join(",").into()));
    }
    if let Some(plan) = &plan {
        env.push(("APP_WORKTREE".into(), plan.path.clone().into()));
        if !plan.detached {
            env.push(("APP_BRANCH".into(), plan.branch.clone().into()));
        }
    }
    if let Some(url) = &record.api_url {
        env.push(("APP_API_URL".into(), url.into()));
    }
    // `app instance exec` runs commands in the same place with the same environment.
    let control = match control::serve(
        &paths.control_socket(id),
        control::ExecContext {
            cwd: cwd.clone(),
            env: env.clone(),
            stop: {
                let slot = Arc::clone(slot);
                Arc::new(move || deliver(&slot, SIGTERM, false))
            },
            events: {
                let (sender, repo_root, id) = (
                    mirror.mirror.sender(),
                    mirror.repo_root.clone(),
                    id.to_string(),
                );
                Arc::new(move |kind, payload| {
                    sender.send(event(&repo_root, &id, kind, payload));
                })
            },
        },
    ) {
        Ok(server) => Some(server),
        Err(err) => {
            tracing::warn!(instance = %id, %err, "no control socket; 'app instance exec' cannot reach this instance");
            None
        }
    };

    let api = api.and_then(|binding| {
        let context = api::ApiContext {
            instance_id: id.to_string(),
            paths: paths.clone(),
            stale_after: timing.stale_after,
            database: api_database,
            capacity: options
                .api
                .as_ref()
                .map_or(api::DEFAULT_CAPACITY, |a| a.capacity),
        };
        match api::start(binding, context) {
            Ok(server) => {
                if let Some(notify) = options.notify {
                    notify(&Notice::ApiListening {
                        id: id.to_string(),
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
    });

    let spawned = {
        let mut guard = slot.lock();
        if options.serve {
            Ok(Ok(None))
        } else if let Some(signal) = guard.pending {
            Err(signal)
        } else {
            let mut command = Command::new(&options.command[0]);
            command
                .args(&options.command[1..])
                .current_dir(&cwd)
                .envs(env.iter().map(|(k, v)| (k, v)));
            match process::Child::spawn(&mut command) {
                Ok(child) => {
                    let child = Arc::new(child);
                    guard.child = Some(Arc::clone(&child));
                    Ok(Ok(Some(child)))
                }
                Err(err) => Ok(Err(err)),
            }
        }
    };
    let child = match spawned {
        Ok(Ok(child)) => child,
        Ok(Err(err)) => {
            wind_down(id, api, control, slot, "the command could not start");
            let cleanup = finish(
                repo,
                (&registry, &key),
                &record,
                plan.as_ref(),
                created_branch,
                (options, None),
            );
            mirror.stopped(
                &record,
                None,
                serde_json::json!({ "error": err.to_string(), "cleanup": cleanup.as_ref().ok() }),
            );
            cleanup?;
            return Err(Error::Spawn {
                command: options.command[0].clone(),
                source: err,
            });
        }
        Err(signal) => {
            wind_down(id, api, control, slot, "cancelled by a signal");
            let exit_code = process::signal_exit_code(signal);
            let cleanup = finish(
                repo,
                (&registry, &key),
                &record,
                plan.as_ref(),
                created_branch,
                (options, None),
            );
            mirror.stopped(
                &record,
                Some(exit_code),
                serde_json::json!({ "exit_code": exit_code, "cancelled_by_signal": signal, "cleanup": cleanup.as_ref().ok() }),
            );
            return Ok(outcome(&record, exit_code, cleanup?));
        }
    };

    record.child_pid = child.as_ref().map(|child| child.id());
    record.child_start_time = record.child_pid.and_then(process::start_time);
    record.status = InstanceStatus::Running;
    let child_pid = record.child_pid;
    let child_start_time = record.child_start_time;
    if let Err(err) = registry.update(|tables| {
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
    mirror.instance(&record);

    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let (Some(limit), Some(child)) = (options.deadline, &child) {
        let (slot, timed_out, child) =
            (Arc::clone(slot), Arc::clone(&timed_out), Arc::clone(child));
        thread::spawn(move || {
            thread::sleep(limit);
            if !child.reaped() {
                tracing::debug!(
                    pid = child.id(),
                    "the command outlived its --timeout; stopping it"
                );
                timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                deliver(&slot, SIGTERM, false);
            }
        });
    }
    let (stop_heartbeat, heartbeat) = start_heartbeat(
        (paths.clone(), key.clone()),
        record.clone(),
        timing,
        (mirror.mirror.sender(), mirror.repo_root.clone()),
    );
    let (exit_code, reason) = match &child {
        Some(child) => match child.wait() {
            Ok(status) if timed_out.load(std::sync::atomic::Ordering::SeqCst) => (
                EXIT_TIMED_OUT,
                format!(
                    "the command outlived its timeout ({})",
                    process::exit_code(status)
                ),
            ),
            Ok(status) => {
                let code = process::exit_code(status);
                (code, format!("the command exited with {code}"))
            }
            Err(err) => {
                tracing::error!(instance = %id, %err, "waiting for the command failed");
                (1, format!("waiting for the command failed: {err}"))
            }
        },
        None => {
            slot.wait_for_stop();
            (0, "asked to stop".to_string())
        }
    };
    wind_down(id, api, control, slot, &reason);
    // What the command left behind is stopped (or, asked to, kept with its worktree) before
    // anything looks at the worktree, so nothing writes there after the clean check.
    let still_running = settle_leftovers(slot, options.keep_running);
    drop(stop_heartbeat);
    let _ = heartbeat.join();
    let cleanup = finish(
        repo,
        (&registry, &key),
        &record,
        plan.as_ref(),
        created_branch,
        (options, still_running.as_deref()),
    );
    mirror.stopped(
        &record,
        Some(exit_code),
        serde_json::json!({ "exit_code": exit_code, "cleanup": cleanup.as_ref().ok() }),
    );
    Ok(outcome(&record, exit_code, cleanup?))
}

/// The first steps of every way out: the API's final event and close, then the commands run
/// through the control socket are stopped (see [`control::ControlServer::shutdown`]).
fn wind_down(
    id: &str,
    api: Option<ApiServer>,
    control: Option<control::ControlServer>,
    slot: &Slot,
    reason: &str,
) {
    if let Some(api) = api {
        api.shutdown(id, reason);
    }
    if let Some(control) = control {
        let killed = control.shutdown(slot.stop_timeout, &|| slot.forced());
        if killed > 0 {
            tracing::warn!(instance = %id, killed, "commands run with 'app instance exec' did not stop in time; killed them");
        }
    }
}

fn outcome(record: &InstanceRecord, exit_code: u8, cleanup: Option<Cleanup>) -> RunOutcome {
    RunOutcome {
        id: record.id.clone(),
        exit_code,
        worktree: record.worktree.clone(),
        branch: record.branch.clone(),
        cleanup,
    }
}

/// Registers the instance and claims its branch under the lock. Returns whether the branch is
/// one `app` creates (or created, for a reused worktree).
fn claim(
    registry: &Registry,
    record: &mut InstanceRecord,
    mut plan: Option<&mut WorktreePlan>,
    (ports, ci): (Option<usize>, bool),
    timing: Timing,
) -> Result<bool> {
    registry.update(|tables| {
        if let Some(existing) = tables.instance(&record.id) {
            if existing.liveness(timing.stale_after) == Liveness::Live {
                return Err(Error::Busy(format!(
                    "instance name {:?} is held by a live instance (pid {}); pick another --instance",
                    record.id, existing.pid
                )));
            }
        } else if tables.has_instance_key(&record.id) {
            return Err(Error::Failed(format!(
                "the registry holds an entry for {:?} that does not verify; run 'app doctor' to see it",
                record.id
            )));
        }
        let mut created_branch = false;
        let holder = plan.as_deref().and_then(|plan| {
            tables.instances().into_iter().find_map(|entry| match entry {
                Entry::Valid(other)
                    if other.id != record.id
                        && other.branch.as_deref() == Some(plan.branch.as_str())
                        && other.liveness(timing.stale_after) == Liveness::Live =>
                {
                    Some(other)
                }
                _ => None,
            })
        });
        if let (Some(plan), Some(other)) = (plan.as_deref_mut(), holder) {
            if !ci {
                return Err(Error::Busy(format!(
                    "branch {} is held by live instance {} (pid {}); pick another --branch",
                    plan.branch, other.id, other.pid
                )));
            }
            // `app ci` jobs on one branch never collide: this one tests it detached, at the
            // commit the branch has (or, while another job is creating it, will have).
            plan.detached = true;
            plan.create_branch = false;
            record.branch = None;
        }
        if let Some(plan) = plan.filter(|plan| !plan.detached) {
            // An existing branch app made earlier keeps its provenance: its original base, and
            // app's right to delete it once it holds nothing beyond that base.
            let previous = tables.branch(&plan.branch).filter(|_| !plan.create_branch);
            created_branch = plan.create_branch || previous.as_ref().is_some_and(|b| b.created_branch);
            let base = previous.map_or_else(|| plan.base.to_string(), |b| b.base);
            tables.put_branch(&BranchRecord {
                branch: plan.branch.clone(),
                instance: record.id.clone(),
                worktree: plan.path.clone(),
                base,
                created_at: record.started_at,
                created_branch,
            });
        }
        if let Some(ports) = ports {
            let port_range = ports::range()?;
            let taken: HashSet<u16> = tables
                .instances()
                .into_iter()
                .filter_map(|entry| match entry {
                    Entry::Valid(other)
                        if other.id != record.id
                            && other.liveness(timing.stale_after) == Liveness::Live =>
                    {
                        Some(other.ports)
                    }
                    _ => None,
                })
                .flatten()
                .collect();
            record.ports = ports::lease(ports, &taken, port_range.clone()).ok_or_else(|| {
                Error::Busy(format!(
                    "no {ports} consecutive free ports in {}-{}; ask for fewer or set APP_PORT_RANGE",
                    port_range.start(),
                    port_range.end()
                ))
            })?;
        }
        tables.put_instance(record);
        Ok(created_branch)
    })
}

/// Removes the instance's registry entry, and its branch entry when given.
fn unregister(registry: &Registry, id: &str, branch: Option<&str>) {
    let result = registry.update(|tables| {
        tables.remove_instance(id);
        if let Some(branch) = branch {
            tables.remove_branch(branch);
        }
        Ok(())
    });
    if let Err(err) = result {
        tracing::warn!(instance = %id, %err, "unregistering failed");
    }
}

/// Cleans up the worktree (unless kept, or `still_running` names processes left running
/// under `--keep-running`, which keep it) and unregisters.
fn finish(
    repo: &Repository,
    (registry, key): (&Registry, &SigningKey),
    record: &InstanceRecord,
    plan: Option<&WorktreePlan>,
    created_branch: bool,
    (options, still_running): (&RunOptions, Option<&[ProcessIdentity]>),
) -> Result<Option<Cleanup>> {
    let _ = registry.update(|tables| {
        if let Some(mut current) = tables.instance(&record.id) {
            current.status = InstanceStatus::Stopping;
            tables.put_instance(&current);
        }
        Ok(())
    });
    let Some(plan) = plan.filter(|_| !options.keep) else {
        unregister(registry, &record.id, None);
        return Ok(None);
    };
    if let Some(running) = still_running {
        // The worktree stays theirs: recorded where doctor asks before it removes anything.
        let admin = registry.paths().git_worktree_admin(&record.id);
        if let Some(mut supervisor) = crate::inuse::Supervisor::load(&admin) {
            supervisor.kept = running.to_vec();
            supervisor.save(&admin)?;
        }
        unregister(registry, &record.id, None);
        return Ok(Some(Cleanup {
            worktree_kept_because: Some(format!(
                "--keep-running: {} still running; 'app doctor --fix' reclaims it once they end",
                describe(running)
            )),
            ..Cleanup::default()
        }));
    }
    let paths = registry.paths();
    let stop_intent = intent(
        journal::Operation::Stop,
        Some(plan),
        created_branch,
        &record.id,
    );
    journal::begin(paths, key, &stop_intent)?;
    fault::point("stop.intent-written");
    // The base the branch is compared with is the one recorded when it was first claimed.
    let base = registry
        .snapshot()
        .ok()
        .and_then(|s| {
            s.branches.into_iter().find_map(|b| match b {
                Entry::Valid(b) if b.branch == plan.branch => b.base.parse().ok(),
                _ => None,
            })
        })
        .unwrap_or(plan.base);
    // A detached worktree (`app ci`) holds no branch.
    let branch = (!plan.detached).then_some(plan.branch.as_str());
    let keep = if options.ci {
        worktree::Keep::Rescue
    } else {
        worktree::Keep::IfClean
    };
    let cleanup = worktree::end_instance(
        repo,
        paths,
        key,
        (&plan.id, branch),
        (base, created_branch),
        keep,
    );
    // The branch entry lives as long as the branch it describes (doctor compares it with its
    // base later); a branch app did not create is released with its worktree.
    let forget_branch = match &cleanup {
        // A detached worktree never held its branch: another instance's entry stays.
        Ok(c) => !plan.detached && (c.branch_deleted || (c.worktree_removed && !created_branch)),
        Err(_) => false,
    };
    unregister(
        registry,
        &record.id,
        forget_branch.then_some(plan.branch.as_str()),
    );
    fault::point("stop.unregistered");
    journal::end(paths, &stop_intent)?;
    cleanup.map(Some)
}

/// A new intent of this process for `operation` on instance `id` with worktree `plan`.
fn intent(
    operation: journal::Operation,
    plan: Option<&WorktreePlan>,
    create_branch: bool,
    id: &str,
) -> journal::Intent {
    let mut intent = journal::Intent::new(operation, id);
    if let Some(plan) = plan {
        intent.worktree = Some(plan.path.clone());
        intent.branch = Some(plan.branch.clone());
        intent.base = Some(plan.base.to_string());
        intent.reuse = plan.reuse;
    }
    intent.create_branch = create_branch;
    intent
}

/// Every `heartbeat_interval`, refreshes the instance's heartbeat. The registry is taken as
/// lost, not as a verdict: an entry that is missing or does not verify (`git clean -fdx`, a
/// registry moved aside, a new secret) is written again from `record`, and a deleted secret is
/// restored from the key in memory, so a live instance is never left unregistered.
fn start_heartbeat(
    (paths, key): (AppPaths, SigningKey),
    record: InstanceRecord,
    timing: Timing,
    (mirror, repo_root): (MirrorSender, PathBuf),
) -> (mpsc::Sender<()>, thread::JoinHandle<()>) {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = thread::spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(timing.heartbeat_interval)
        {
            let result = key.restore(&paths).and_then(|_| {
                Registry::open_for_write(&paths)?.update(|tables| {
                    let mut current = tables.instance(&record.id).unwrap_or_else(|| {
                        tracing::warn!(instance = %record.id, "the registry lost this instance's entry; registering it again");
                        record.clone()
                    });
                    current.heartbeat_at = Timestamp::now();
                    tables.put_instance(&current);
                    Ok(current)
                })
            });
            match result {
                Ok(current) => mirror.send(Update::Instance(InstanceRow::from_record(
                    &current, &repo_root,
                ))),
                // A heartbeat that cannot be written never kills the agent.
                Err(err) => tracing::warn!(instance = %record.id, %err, "heartbeat failed"),
            }
        }
    });
    (stop, handle)
}

/// "pid 12 (sh), pid 13 (sleep)".
fn describe(left: &[ProcessIdentity]) -> String {
    left.iter()
        .map(|p| format!("pid {} ({})", p.pid, process::command_name(p.pid)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stops what the command left running (the supervisor is their subreaper, so it finds them
/// all, also those that called `setsid`): SIGTERM, then SIGKILL after the stop timeout (at
/// once on a second stop request), waiting until none is left. With `keep_running` they are
/// left alone; returns them described then.
fn settle_leftovers(slot: &Slot, keep_running: bool) -> Option<Vec<ProcessIdentity>> {
    process::reap_orphans();
    let left = process::descendants();
    if left.is_empty() {
        return None;
    }
    if keep_running {
        return Some(left);
    }
    tracing::debug!(left = %describe(&left), "stopping what the command left behind");
    for (signal, grace) in [
        (Signal::SIGTERM, slot.stop_timeout),
        (Signal::SIGKILL, Duration::from_secs(5)),
    ] {
        for process in process::descendants() {
            process.signal(signal);
        }
        let deadline = Instant::now() + grace;
        loop {
            process::reap_orphans();
            let left = process::descendants();
            if left.is_empty() {
                return None;
            }
            if Instant::now() >= deadline || (signal == Signal::SIGTERM && slot.forced()) {
                if signal == Signal::SIGKILL {
                    tracing::warn!(left = %describe(&left), "processes the command left behind did not stop");
                }
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    None
}

/// How `app instance stop` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The instance stopped after SIGTERM.
    Terminated,
    /// The command had to be killed with SIGKILL.
    Killed,
}

/// How `stop` asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRoute {
    /// Through the instance's control socket.
    Socket,
    /// With a signal to its supervisor (no control socket answered).
    Signal,
}

/// Stops a live instance: asks its supervisor through the control socket to SIGTERM the
/// command (or, when no socket answers, sends SIGTERM to the supervisor, which forwards it),
/// then after `timeout` SIGKILL to the command, and to the supervisor if it still does not exit.
pub fn stop(
    registry: &Registry,
    id: &str,
    timeout: Duration,
    timing: Timing,
) -> Result<(StopOutcome, StopRoute)> {
    let snapshot = registry.snapshot()?;
    let record = snapshot
        .instance(id)
        .ok_or_else(|| Error::UnknownInstance { id: id.to_string() })?
        .clone();
    if let Liveness::Stale(reason) = record.liveness(timing.stale_after) {
        return Err(Error::Failed(format!(
            "instance {id} is not running ({reason}); 'app doctor --fix' reclaims what it left"
        )));
    }
    let supervisor = record.identity();
    let route = match control::request_stop(&registry.paths().control_socket(id)) {
        Ok(()) => StopRoute::Socket,
        Err(err) => {
            tracing::debug!(instance = %id, %err, "no control socket answered; signalling");
            supervisor.signal(Signal::SIGTERM);
            StopRoute::Signal
        }
    };
    if wait_gone(&supervisor, timeout) {
        return Ok((StopOutcome::Terminated, route));
    }
    // A second request forces the supervisor's own stop: it kills its command and what runs
    // through its socket at once instead of waiting out its --stop-timeout.
    let socket = registry.paths().control_socket(id);
    if control::request_stop(&socket).is_err() {
        supervisor.signal(Signal::SIGTERM);
    }
    if let (Some(pid), Some(start_time)) = (record.child_pid, record.child_start_time) {
        let child = ProcessIdentity {
            pid,
            start_time,
            boot_id: record.boot_id.clone(),
        };
        child.signal(Signal::SIGKILL);
    }
    // The supervisor cleans up once its command is gone; give it a moment before forcing.
    if !wait_gone(&supervisor, Duration::from_secs(5)) {
        supervisor.signal(Signal::SIGKILL);
        wait_gone(&supervisor, Duration::from_secs(2));
    }
    Ok((StopOutcome::Killed, route))
}

fn wait_gone(identity: &ProcessIdentity, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if identity.presence() != Presence::Running {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The instance the calling process acts for: the one `APP_INSTANCE_ID` names when it is
/// registered, else the one whose worktree contains `cwd`.
pub fn caller(snapshot: &Snapshot, cwd: &Path) -> Option<InstanceRecord> {
    if let Ok(id) = std::env::var("APP_INSTANCE_ID")
        && let Some(record) = snapshot.instance(&id)
    {
        return Some(record.clone());
    }
    let dir = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_path_buf());
    owner_of(snapshot, &dir)
}

/// The holder of locks and reservations the caller takes: its instance, or outside any
/// instance the process that called `app` (the shell or script, seen through the subshells of
/// `tok=$(app lock acquire X)`: see [`process::caller`]), so the hold ends with it.
pub fn caller_holder(snapshot: &Snapshot, cwd: &Path) -> Result<crate::lock::Holder> {
    if let Some(record) = caller(snapshot, cwd) {
        return Ok(crate::lock::Holder::instance(&record));
    }
    process::caller()
        .map(crate::lock::Holder::process)
        .ok_or_else(|| Error::Failed("cannot read the identity of the calling process".into()))
}

/// The registered instance whose worktree contains `dir`, if any.
pub fn owner_of(snapshot: &Snapshot, dir: &Path) -> Option<InstanceRecord> {
    snapshot
        .valid_instances()
        .into_iter()
        .filter(|record| {
            record
                .worktree
                .as_ref()
                .is_some_and(|worktree| dir.starts_with(worktree))
        })
        .max_by_key(|record| record.worktree.as_ref().map_or(0, |w| w.as_os_str().len()))
        .cloned()
}
