//! `app worker`: a host of the fleet. It registers a host row, leases tasks of fleet runs its
//! labels allow, runs each as the same `app run` a local attempt is, and reports back under
//! the lease's fencing token (docs/FLEET.md).
//!
//! Invariants:
//! - One heartbeat request renews the host row and every lease it holds; a lease missing from
//!   the answer was lost, and its attempt is stopped (SIGTERM to its `app run`, which saves
//!   its work as on any exit). Its reports are refused by the database anyway.
//! - A task runs from the commit the orchestrator offered (this clone's, or fetched from the
//!   remote and checked against the offer); a local branch holding other work is saved under
//!   `refs/app/attempts/` first.
//! - What an attempt made is pushed to its own ref, `refs/app/fleet/<run>/<task>/<token>`,
//!   before its end is reported; rescue refs of this host go to `refs/app/rescue/<host>/<id>`.
//! - The first stop signal drains (no new leases, running tasks finish); the second stops the
//!   tasks and gives their leases back.
//! - Only specs signed with the shared secret run; an idle host reads (no write lock) at most
//!   every [`IDLE_POLL`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use git2::{Oid, Repository};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::db::fleet::{self, Ask, Beat, Claimed, HostRow, Labels, LeaseKey, Report};
use crate::db::holds::Member;
use crate::db::{Blocking, DbSettings, Location};
use crate::error::{Error, GitContext, IoContext, Result};
use crate::fleet_holds::HostFlock;
use crate::ids::RunId;
use crate::instance::{self, Hosted, Mode, RunOptions};
use crate::orchestrate::attempt::{self, AttemptSpec};
use crate::orchestrate::fleet::{
    TIMED_OUT, attempt_ref, require_server_at, secret_check, shared_key,
};
use crate::paths::AppPaths;
use crate::process::{self, ProcessIdentity};
use crate::remote::{Pushed, Remote, Update};
use crate::sign::SigningKey;
use crate::time::Timestamp;

/// Longest wait between two looks for tasks while nothing happens.
pub const IDLE_POLL: Duration = Duration::from_secs(2);
/// The wait between two looks for tasks shortly after something happened.
const BUSY_POLL: Duration = Duration::from_millis(250);
/// How long after the last activity the host keeps looking at [`BUSY_POLL`].
const BUSY_FOR: Duration = Duration::from_secs(5);
/// How much of a task's log its end report carries.
const OUTPUT_TAIL: usize = 2000;

/// What `app worker` was asked to do.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The host's name in the fleet (default: the host name).
    pub name: String,
    /// Tasks run at once.
    pub capacity: usize,
    /// Labels tasks may require.
    pub labels: Labels,
    /// The git remote the fleet shares.
    pub remote: String,
    /// `--db`, passed on to every task.
    pub db: Option<PathBuf>,
    /// The settings read at the start of the command.
    pub settings: Settings,
    /// The instance id to register under (`--instance`; default a generated one).
    pub instance: Option<crate::ids::InstanceId>,
    /// What the instance records as its command (`app instance list`).
    pub command: Vec<String>,
}

/// What happened, for the person watching.
#[derive(Debug, Clone)]
pub enum WorkerEvent {
    /// The host is registered and takes tasks.
    Registered {
        /// Its name.
        host: String,
        /// The repository it serves.
        repo: String,
        /// Its instance id (`app instance list`, `app instance stop`).
        instance: String,
    },
    /// A task was leased and starts.
    Took {
        /// `run/task#attempt`.
        attempt: String,
        /// Its lease's token.
        token: i64,
    },
    /// A task ended.
    Ended {
        /// `run/task#attempt`.
        attempt: String,
        /// Its exit code.
        exit_code: Option<i64>,
        /// Why it failed.
        detail: Option<String>,
        /// Whether the run took the report (false: the lease was lost).
        accepted: bool,
    },
    /// A lease was lost (it expired and another host took the task, or the run withdrew it).
    Lost {
        /// `run/task#attempt`.
        attempt: String,
    },
    /// The first signal: no new tasks.
    Draining {
        /// Tasks still running.
        running: usize,
    },
}

/// A leased task running on this host.
struct Slot {
    name: String,
    process: Arc<Mutex<Option<Arc<process::Child>>>>,
    lost: Arc<AtomicBool>,
}

/// What every task thread shares.
struct Shared {
    paths: AppPaths,
    remote: Remote,
    /// The attempts' result pushes, gathered.
    pushes: Pushes,
    db: Mutex<Blocking>,
    key: SigningKey,
    host: String,
    /// The host row as registered.
    row: HostRow,
    exe: PathBuf,
    db_flag: Option<PathBuf>,
}

/// The result pushes of this worker's attempts, gathered: an attempt that ends while
/// another's push is under way waits for it and then goes with every attempt that waited in
/// one `git push` (one connection to the remote, each ref still only over its expected value).
/// A lone attempt's push starts at once, so this only ever saves pushes.
#[derive(Default)]
struct Pushes {
    state: Mutex<Gathered>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct Gathered {
    /// The updates waiting for the next push, by ticket.
    waiting: Vec<(u64, Vec<Update>)>,
    /// How each pushed ticket ended (an error as its message, shared by its push).
    answers: HashMap<u64, std::result::Result<Vec<Pushed>, String>>,
    pushing: bool,
    next: u64,
}

impl Pushes {
    fn state(&self) -> std::sync::MutexGuard<'_, Gathered> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes `updates` to `remote`, with whatever other attempts wait meanwhile; how each of
    /// `updates` ended, in order.
    fn push(&self, remote: &Remote, updates: Vec<Update>) -> Result<Vec<Pushed>> {
        let mut state = self.state();
        let ticket = state.next;
        state.next += 1;
        state.waiting.push((ticket, updates));
        loop {
            if let Some(answer) = state.answers.remove(&ticket) {
                return answer.map_err(Error::Failed);
            }
            if state.pushing {
                state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.pushing = true;
            let batch = std::mem::take(&mut state.waiting);
            drop(state);
            let all: Vec<Update> = batch.iter().flat_map(|(_, u)| u.iter().cloned()).collect();
            let at = Instant::now();
            let pushed = remote.push_all(&all);
            tracing::debug!(
                attempts = batch.len(),
                refs = all.len(),
                ms = crate::time::elapsed_ms(at),
                "worker: pushed results"
            );
            state = self.state();
            match pushed {
                Ok(answers) => {
                    let mut answers = answers.into_iter();
                    for (each, updates) in batch {
                        let mine = answers.by_ref().take(updates.len()).collect();
                        state.answers.insert(each, Ok(mine));
                    }
                }
                Err(err) => {
                    let message = err.to_string();
                    for (each, _) in batch {
                        state.answers.insert(each, Err(message.clone()));
                    }
                }
            }
            state.pushing = false;
            self.done.notify_all();
        }
    }
}

impl Shared {
    fn db<T>(&self, body: impl AsyncFnOnce(&crate::db::Db) -> Result<T>) -> Result<T> {
        self.db.lock().unwrap_or_else(|p| p.into_inner()).run(body)
    }
}

/// Runs the worker in the repository at `cwd` until it is stopped: a registered in-place
/// instance ([`instance::host`], as `app serve` is one) whose loop takes and runs tasks. Its
/// stop requests (signals, `app instance stop`) drain it, a second one stops its tasks.
/// Returns `app`'s exit code: 0 after a drain, 128+N when a second signal N stopped tasks.
pub fn run(cwd: &Path, options: &WorkerOptions, report: &mut dyn FnMut(WorkerEvent)) -> Result<u8> {
    let shared = Arc::new(Shared::prepare(cwd, options)?);
    let host = &shared.row;
    let run_options = RunOptions {
        name: options.instance.clone(),
        mode: Mode::Serve,
        command: options.command.clone(),
        db: options.db.clone(),
        // Tasks a failing worker leaves running end as they would without it (their leases
        // are recorded and pushed when it runs again).
        keep_running: true,
        ..RunOptions::default()
    };
    let outcome = instance::host(cwd, &run_options, &options.settings, |hosted| {
        push_leftovers(&shared);
        push_rescues(&shared);
        report(WorkerEvent::Registered {
            host: host.name.clone(),
            repo: host.repo.clone(),
            instance: hosted.id().to_string(),
        });
        Worker::new(Arc::clone(&shared), options, host).serve(hosted, report)?;
        Ok(match hosted.last_signal() {
            Some(signal) if hosted.stop_requests() > 1 => process::signal_exit_code(signal),
            _ => 0,
        })
    });
    let (pid, start_time) = (host.pid, host.start_time);
    let stopped = shared.db(async |db| fleet::stop_host(db, &host.name, pid, start_time).await);
    let outcome = outcome?;
    stopped?;
    Ok(outcome.exit_code)
}

impl Shared {
    /// Checks what the worker needs (a server database, the shared secret, the remote) before
    /// anything is written, then registers the host row.
    fn prepare(cwd: &Path, options: &WorkerOptions) -> Result<Shared> {
        let paths = AppPaths::discover(cwd)?;
        // Bad settings change nothing: checked before .app/ or a database is made.
        let location = Location::resolve(options.db.as_deref())?;
        require_server_at(&location)?;
        let key = shared_key(&paths, &options.settings)?;
        let remote = Remote::open(paths.repo_root(), &options.remote)?;
        paths.ensure_state_dir()?;
        let db = Blocking::open(location, DbSettings::from(&options.settings))?;
        let me = ProcessIdentity::current();
        let ttl_ms = options.settings.lease_ttl.as_millis() as i64;
        let row = HostRow {
            name: options.name.clone(),
            repo: remote.repo_key(),
            capacity: options.capacity as i64,
            labels: options.labels.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: me.pid.into(),
            start_time: me.start_time as i64,
            started_at: Timestamp::now().to_string(),
            heartbeat_age_ms: 0,
            state: "running".into(),
            running: 0,
            load: load(),
            secret_check: secret_check(&key),
            note: None,
        };
        let holder = db.run(async |db| fleet::register_host(db, &row, ttl_ms).await)?;
        if (holder.pid, holder.start_time) != (row.pid, row.start_time) {
            return Err(Error::bad_input(format!(
                "the fleet host name {:?} is taken by a live worker (pid {}, last heartbeat {} ms ago); give this one another --name",
                row.name, holder.pid, holder.heartbeat_age_ms
            )));
        }
        Ok(Shared {
            exe: std::env::current_exe().io_context("finding", "the app executable")?,
            paths,
            remote,
            pushes: Pushes::default(),
            db: Mutex::new(db),
            key,
            host: row.name.clone(),
            row,
            db_flag: options.db.clone(),
        })
    }
}

/// The worker's loop state.
struct Worker<'a> {
    shared: Arc<Shared>,
    options: &'a WorkerOptions,
    host: &'a HostRow,
    /// The leases it runs, by their key (a claim's tasks share one token).
    slots: HashMap<LeaseKey, Slot>,
    ended: mpsc::Receiver<(LeaseKey, WorkerEvent)>,
    ended_tx: mpsc::Sender<(LeaseKey, WorkerEvent)>,
    last_beat: Instant,
    last_look: Option<Instant>,
    last_activity: Instant,
    /// A task just ended here: the next look claims at once, without the read first (a run
    /// offers its ready tasks ahead, so another one is likely waiting).
    claim_next: bool,
    draining: bool,
    /// The right to write this host's fleet heartbeat, folded into the worker's own.
    host_flock: Option<HostFlock>,
}

impl<'a> Worker<'a> {
    fn new(shared: Arc<Shared>, options: &'a WorkerOptions, host: &'a HostRow) -> Self {
        let (ended_tx, ended) = mpsc::channel();
        Worker {
            shared,
            options,
            host,
            slots: HashMap::new(),
            ended,
            ended_tx,
            last_beat: Instant::now(),
            last_look: None,
            last_activity: Instant::now(),
            claim_next: false,
            draining: false,
            host_flock: HostFlock::new(&options.settings.fleet_host)
                .inspect_err(|err| tracing::warn!(%err, "no fleet heartbeat from this worker"))
                .ok(),
        }
    }

    fn serve(&mut self, stop: &Hosted, report: &mut dyn FnMut(WorkerEvent)) -> Result<()> {
        let beat_every = self.options.settings.lease_ttl / 3;
        let mut signals_seen = 0;
        loop {
            if stop.stop_requests() > signals_seen {
                signals_seen = stop.stop_requests();
                self.draining = true;
                if signals_seen == 1 {
                    report(WorkerEvent::Draining {
                        running: self.slots.len(),
                    });
                } else {
                    self.stop_tasks()?;
                }
                self.beat(report)?;
            }
            let draining = self.draining;
            if draining && self.slots.is_empty() {
                return Ok(());
            }
            if self.last_beat.elapsed() >= beat_every {
                self.beat(report)?;
            }
            if !draining && self.slots.len() < self.options.capacity && self.look_due() {
                self.take(report)?;
            }
            match self.ended.recv_timeout(Duration::from_millis(100)) {
                Ok((lease, event)) => {
                    self.slots.remove(&lease);
                    self.last_activity = Instant::now();
                    self.last_look = None;
                    self.claim_next = true;
                    report(event);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    unreachable!("the loop holds a sender")
                }
            }
        }
    }

    fn look_due(&self) -> bool {
        let every = if self.last_activity.elapsed() < BUSY_FOR {
            BUSY_POLL
        } else {
            IDLE_POLL
        };
        self.last_look.is_none_or(|at| at.elapsed() >= every)
    }

    /// One heartbeat; stops the attempts whose lease was lost.
    fn beat(&mut self, report: &mut dyn FnMut(WorkerEvent)) -> Result<()> {
        self.last_beat = Instant::now();
        let leases: Vec<(LeaseKey, Option<String>)> = self
            .slots
            .keys()
            .map(|lease| (lease.clone(), None))
            .collect();
        let beat = Beat {
            host: &self.host.name,
            pid: self.host.pid,
            start_time: self.host.start_time,
            state: if self.draining { "draining" } else { "running" },
            running: self.slots.len() as i64,
            load: load(),
            leases: &leases,
            ttl_ms: self.options.settings.lease_ttl.as_millis() as i64,
            member: self
                .host_flock
                .as_mut()
                .is_some_and(HostFlock::hold)
                .then_some(Member {
                    host: &self.options.settings.fleet_host,
                    pid: self.host.pid,
                    start_time: self.host.start_time,
                    secret_check: &self.host.secret_check,
                }),
        };
        let held = self
            .shared
            .db(async |db| fleet::heartbeat(db, &beat).await)?;
        for (lease, slot) in &self.slots {
            if !held.contains(lease) && !slot.lost.swap(true, Ordering::SeqCst) {
                report(WorkerEvent::Lost {
                    attempt: slot.name.clone(),
                });
                signal(slot, Signal::SIGTERM);
            }
        }
        Ok(())
    }

    /// Leases what fits and starts it.
    fn take(&mut self, report: &mut dyn FnMut(WorkerEvent)) -> Result<()> {
        self.last_look = Some(Instant::now());
        let ask = Ask {
            host: &self.host.name,
            repo: &self.host.repo,
            labels: &self.host.labels,
            secret_check: &self.host.secret_check,
            limit: (self.options.capacity - self.slots.len()) as i64,
            ttl_ms: self.options.settings.lease_ttl.as_millis() as i64,
        };
        let at = Instant::now();
        if !std::mem::take(&mut self.claim_next)
            && !self.shared.db(async |db| fleet::any_for(db, &ask).await)?
        {
            tracing::debug!(
                ms = crate::time::elapsed_ms(at),
                "worker: looked, nothing for this host"
            );
            return Ok(());
        }
        let looked = crate::time::elapsed_ms(at);
        let at = Instant::now();
        let uid = uuid::Uuid::new_v4().simple().to_string();
        let claimed = self
            .shared
            .db(async |db| fleet::claim(db, &ask, &uid).await)?;
        tracing::debug!(
            look_ms = looked,
            ms = crate::time::elapsed_ms(at),
            limit = ask.limit,
            took = claimed.len(),
            "worker: claimed"
        );
        if !claimed.is_empty() {
            self.last_activity = Instant::now();
        }
        for task in claimed {
            let name = format!("{}/{}#{}", task.run_id, task.task_id, task.attempt);
            report(WorkerEvent::Took {
                attempt: name.clone(),
                token: task.token,
            });
            let lease = LeaseKey {
                run_id: task.run_id.clone(),
                task_id: task.task_id.clone(),
                token: task.token,
            };
            let slot = Slot {
                name,
                process: Arc::default(),
                lost: Arc::default(),
            };
            let job = Job {
                shared: Arc::clone(&self.shared),
                process: Arc::clone(&slot.process),
                lost: Arc::clone(&slot.lost),
                name: slot.name.clone(),
                task,
            };
            let tx = self.ended_tx.clone();
            self.slots.insert(lease.clone(), slot);
            thread::spawn(move || {
                let event = job.run();
                let _ = tx.send((lease, event));
            });
        }
        Ok(())
    }

    /// The second signal: every attempt stopped, its lease given back.
    fn stop_tasks(&mut self) -> Result<()> {
        let leases: Vec<LeaseKey> = self.slots.keys().cloned().collect();
        for slot in self.slots.values() {
            slot.lost.store(true, Ordering::SeqCst);
            signal(slot, Signal::SIGTERM);
        }
        let host = self.host.name.clone();
        self.shared
            .db(async |db| fleet::release(db, &host, &leases).await)
    }
}

fn signal(slot: &Slot, signal: Signal) {
    if let Some(process) = slot
        .process
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        process.signal(signal);
    }
}

/// How an attempt ended on this host.
struct Ended {
    exit_code: Option<i64>,
    /// The commit it ended on, pushed to its attempt ref.
    tip: Option<String>,
    detail: Option<String>,
}

/// One leased attempt, run on a thread of its own.
struct Job {
    shared: Arc<Shared>,
    process: Arc<Mutex<Option<Arc<process::Child>>>>,
    lost: Arc<AtomicBool>,
    name: String,
    task: Claimed,
}

impl Job {
    fn run(self) -> WorkerEvent {
        let Ended {
            exit_code,
            tip,
            detail,
        } = match self.execute() {
            Ok(Some(ended)) => ended,
            Ok(None) => {
                return WorkerEvent::Lost {
                    attempt: self.name.clone(),
                };
            }
            Err(err) => Ended {
                exit_code: None,
                tip: None,
                detail: Some(err.to_string()),
            },
        };
        let log = self
            .shared
            .paths
            .task_log(self.task.run_id.as_str(), &self.task.task_id);
        let ended = Report {
            started_at: None,
            finished_at: Some(Timestamp::now().to_string()),
            exit_code,
            tip,
            detail: detail.clone(),
            output: tail(&log),
        };
        let (run, task, token) = (&self.task.run_id, &self.task.task_id, self.task.token);
        let at = Instant::now();
        let accepted = self
            .shared
            .db(async |db| fleet::report(db, run, task, token, &ended).await)
            .unwrap_or(false);
        tracing::debug!(task = %self.name, ms = crate::time::elapsed_ms(at), "worker: reported the end");
        WorkerEvent::Ended {
            attempt: self.name.clone(),
            exit_code,
            detail,
            accepted,
        }
    }

    /// Prepares and runs the attempt; `None` when the lease was lost before it started, else
    /// its exit code, the commit it ended on (pushed), and why it failed.
    fn execute(&self) -> Result<Option<Ended>> {
        let spec = self.verified_spec()?;
        let shared = &self.shared;
        let lease = Lease {
            run: spec.run.clone(),
            task: spec.task.clone(),
            branch: spec.branch.clone(),
            token: self.task.token,
            worker: ProcessIdentity::current(),
        };
        lease.record(&shared.paths)?;
        let start = spec
            .start
            .clone()
            .ok_or_else(|| Error::Failed("the offer names no start commit".into()))?;
        let at = Instant::now();
        self.check_out_start(&spec, &start)?;
        tracing::debug!(task = %self.name, ms = crate::time::elapsed_ms(at), "worker: checked out the start");
        let started = Report {
            started_at: Some(Timestamp::now().to_string()),
            ..Report::default()
        };
        let (run, task, token) = (&self.task.run_id, &self.task.task_id, self.task.token);
        let at = Instant::now();
        if !shared.db(async |db| fleet::report(db, run, task, token, &started).await)? {
            lease.forget(&shared.paths);
            return Ok(None);
        }
        tracing::debug!(task = %self.name, ms = crate::time::elapsed_ms(at), "worker: reported the start");
        let at = Instant::now();
        let instance = format!("{}{}", spec.instance_prefix, self.task.attempt);
        let log = shared.paths.task_log(run.as_str(), task);
        let output = attempt::open_log(&log, self.task.attempt, &spec.argv)?;
        let mut command = spec.command(
            &shared.exe,
            shared.db_flag.as_deref(),
            &instance,
            shared.paths.repo_root(),
        );
        command
            .stdin(Stdio::null())
            .stdout(output.try_clone().io_context("opening", &log)?)
            .stderr(output);
        let child = process::Child::spawn_group(&mut command).map_err(|err| Error::Spawn {
            command: shared.exe.display().to_string(),
            source: err,
        })?;
        let child = Arc::new(child);
        *self.process.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&child));
        if self.lost.load(Ordering::SeqCst) {
            child.signal(Signal::SIGTERM);
        }
        let outcome = attempt::await_attempt(&child, task.clone(), spec.timeout());
        tracing::debug!(task = %self.name, ms = crate::time::elapsed_ms(at), "worker: app run ended");
        let at = Instant::now();
        let tip = self.push_result(&spec, &instance)?;
        tracing::debug!(task = %self.name, ms = crate::time::elapsed_ms(at), "worker: pushed the result");
        lease.forget(&shared.paths);
        let detail = if outcome.timed_out {
            Some(TIMED_OUT.to_string())
        } else {
            outcome.error
        };
        Ok(Some(Ended {
            exit_code: outcome.exit_code,
            tip,
            detail,
        }))
    }

    /// The offer's spec, if the shared secret signed it.
    fn verified_spec(&self) -> Result<AttemptSpec> {
        if !self
            .shared
            .key
            .verify(self.task.spec.as_bytes(), &self.task.sig)
        {
            return Err(Error::Failed(
                "the offer's signature does not verify with this host's APP_SHARED_SECRET; not run"
                    .into(),
            ));
        }
        serde_json::from_str(&self.task.spec)
            .map_err(|err| Error::Failed(format!("the offer cannot be read: {err}")))
    }

    /// Points the task's local branch at the offered start (fetched from the remote unless
    /// this clone has that commit already: the signed offer names it by its hash); other work
    /// on that branch is saved first.
    fn check_out_start(&self, spec: &AttemptSpec, start: &str) -> Result<()> {
        let shared = &self.shared;
        let repo = Repository::open(shared.paths.repo_root())
            .git_context(|| format!("opening {}", shared.paths.repo_root().display()))?;
        let start_id = Oid::from_str(start).git_context(|| format!("reading {start}"))?;
        if repo.find_commit(start_id).is_ok() {
            tracing::debug!(task = %self.name, %start, "worker: has the start, not fetched");
        } else {
            let incoming = format!("refs/app/fleet/{}/{}/start", spec.run, spec.task);
            let fetched = shared
                .remote
                .fetch(&format!("refs/heads/{}", spec.branch), &incoming)?;
            if fetched.as_deref() != Some(start) {
                return Err(Error::Failed(format!(
                    "the remote's branch {} holds {}, not the offered start {start}",
                    spec.branch,
                    fetched.as_deref().unwrap_or("nothing")
                )));
            }
        }
        let start = start_id;
        let target = format!("refs/heads/{}", spec.branch);
        if let Some(path) = crate::worktree::checked_out_in(&repo, &spec.branch)? {
            return Err(Error::Failed(format!(
                "its branch {} is checked out in {} on this host",
                spec.branch,
                path.display()
            )));
        }
        if let Ok(old) = repo.refname_to_id(&target)
            && old != start
            && !repo.graph_descendant_of(start, old).unwrap_or(false)
        {
            let keep = format!(
                "refs/app/attempts/{}/{}/{}",
                spec.run,
                spec.task,
                self.task.attempt - 1
            );
            repo.reference(&keep, old, true, "app worker: an earlier attempt's work")
                .git_context(|| format!("saving {keep}"))?;
        }
        repo.reference(&target, start, true, "app worker: start of a fleet task")
            .git_context(|| format!("pointing {} at its start", spec.branch))?;
        Ok(())
    }

    /// Pushes the branch's tip to the attempt's own ref (and this instance's rescue ref, when
    /// its end saved one); returns the tip.
    fn push_result(&self, spec: &AttemptSpec, instance: &str) -> Result<Option<String>> {
        let shared = &self.shared;
        let repo = Repository::open(shared.paths.repo_root())
            .git_context(|| format!("opening {}", shared.paths.repo_root().display()))?;
        let Ok(tip) = repo.refname_to_id(&format!("refs/heads/{}", spec.branch)) else {
            return Ok(None);
        };
        let tip = tip.to_string();
        let mut updates = vec![Update {
            commit: tip.clone(),
            target: attempt_ref(&spec.run, &spec.task, self.task.token),
            expected: None,
        }];
        if let Ok(rescue) = repo.refname_to_id(&format!("refs/app/rescue/{instance}")) {
            updates.push(Update {
                commit: rescue.to_string(),
                target: format!("refs/app/rescue/{}/{instance}", shared.host),
                expected: None,
            });
        }
        shared.pushes.push(&shared.remote, updates)?;
        Ok(Some(tip))
    }
}

/// A lease this host's worker took, recorded in `.app/fleet/leases/` until what its attempt
/// made was pushed: a worker killed in between pushes it when it runs again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    run: RunId,
    task: String,
    branch: String,
    token: i64,
    /// The worker that holds it: while it lives, the lease is its own business.
    worker: ProcessIdentity,
}

impl Lease {
    fn file(&self, paths: &AppPaths) -> PathBuf {
        paths
            .fleet_leases_dir()
            .join(format!("{}.json", self.token))
    }

    fn record(&self, paths: &AppPaths) -> Result<()> {
        crate::state::create_private_dir_all(&paths.fleet_leases_dir())?;
        let bytes = serde_json::to_vec(self).expect("leases serialize");
        crate::state::write_atomic(&self.file(paths), &bytes)
    }

    fn forget(&self, paths: &AppPaths) {
        let _ = std::fs::remove_file(self.file(paths));
    }
}

/// Pushes what the attempts of a dead worker of this host made (their task branches, as the
/// leases it recorded name them) to their leases' own refs; their reports were never made, so
/// the runs do not take them, but nothing is lost. Failures are logged and retried next time.
fn push_leftovers(shared: &Shared) {
    let dir = shared.paths.fleet_leases_dir();
    let Ok(names) = crate::state::visible_names(&dir) else {
        return;
    };
    for name in names {
        let path = dir.join(&name);
        let Some(lease) = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Lease>(&bytes).ok())
        else {
            continue;
        };
        if lease.worker.presence() == process::Presence::Running {
            continue;
        }
        let pushed = (|| -> Result<()> {
            let repo = Repository::open(shared.paths.repo_root())
                .git_context(|| format!("opening {}", shared.paths.repo_root().display()))?;
            if let Ok(tip) = repo.refname_to_id(&format!("refs/heads/{}", lease.branch)) {
                let target = attempt_ref(&lease.run, &lease.task, lease.token);
                shared.remote.push(&tip.to_string(), &target, None)?;
            }
            Ok(())
        })();
        match pushed {
            Ok(()) => lease.forget(&shared.paths),
            Err(err) => {
                tracing::warn!(error = %err, lease = %name, "pushing a dead attempt's work failed; it stays here")
            }
        }
    }
}

/// Pushes every rescue ref of this host the remote lacks to `refs/app/rescue/<host>/<id>`:
/// what `doctor --fix` or a dead attempt's end saved reaches the fleet. Failures are logged;
/// the refs stay here and the next call tries again.
fn push_rescues(shared: &Shared) {
    let result = (|| -> Result<()> {
        let repo = Repository::open(shared.paths.repo_root())
            .git_context(|| format!("opening {}", shared.paths.repo_root().display()))?;
        let prefix = format!("refs/app/rescue/{}/", shared.host);
        let there: HashMap<String, String> = shared
            .remote
            .list(&format!("{prefix}*"))?
            .into_iter()
            .collect();
        let refs = repo
            .references_glob("refs/app/rescue/*")
            .git_context(|| "listing rescue refs".into())?;
        for reference in refs.flatten() {
            let (Some(name), Some(oid)) = (reference.name().ok(), reference.target()) else {
                continue;
            };
            let id = name.trim_start_matches("refs/app/rescue/");
            let target = format!("{prefix}{id}");
            if !id.contains('/') && !there.contains_key(&target) {
                shared.remote.push(&oid.to_string(), &target, None)?;
            }
        }
        Ok(())
    })();
    if let Err(err) = result {
        tracing::warn!(error = %err, "pushing this host's rescue refs failed; they stay here");
    }
}

/// The end of a task's log, at most [`OUTPUT_TAIL`] bytes.
fn tail(log: &Path) -> Option<String> {
    let bytes = std::fs::read(log).ok()?;
    let from = bytes.len().saturating_sub(OUTPUT_TAIL);
    Some(String::from_utf8_lossy(&bytes[from..]).into_owned())
}

/// The one-minute load average.
fn load() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
