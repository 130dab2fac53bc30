//! A run whose attempts run on the fleet (`app orchestrate --fleet`): the orchestrator offers
//! each attempt in the database and watches; `app worker`s lease and run them
//! (`crate::worker`), and the work travels through the repository's git remote.
//!
//! Invariants:
//! - An attempt's start is made here, exactly as for a local attempt, and pushed to the remote's
//!   task branch only over the value the orchestrator last saw there; the host fetches it.
//! - A host pushes what an attempt made to `refs/app/fleet/<run>/<task>/<token>`, a ref of that
//!   lease alone: a host that lost its lease cannot push over the attempt that replaced it.
//! - Only a finished report the database accepted (its token still current) is taken: the
//!   attempt ref is fetched, the local branch moved forward to it, and the remote's task branch
//!   pushed over the start it held.
//! - Killing the orchestrator stops nothing on the hosts; a stop takes back only offers no host
//!   took, and `--resume` adopts the attempts still running.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use git2::Oid;

use super::Progress;
use super::attempt::{Outcome, Running, instance_prefix};
use super::plan::Task;
use super::scheduler::Orchestrator;
use crate::config::Settings;
use crate::db::fleet::{self, FleetTask, LeaseState, Offer};
use crate::db::runs::TaskStatus;
use crate::db::{Blocking, Location};
use crate::error::{Error, GitContext, Result};
use crate::ids::RunId;
use crate::paths::AppPaths;
use crate::remote::{Pushed, Remote, Update};
use crate::sign::{Keys, SigningKey};
use crate::time::elapsed_ms;

/// The remote a fleet run uses unless told (`--remote`).
pub const DEFAULT_REMOTE: &str = "origin";

/// How often the orchestrator reads its run's fleet rows.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The detail a host reports for an attempt stopped at its timeout.
pub const TIMED_OUT: &str = "timed out";

/// The text every fleet member signs to show which secret it holds: equal checks mean the
/// same `APP_SHARED_SECRET`.
const SECRET_CHECK: &[u8] = b"app fleet: secret check v1";

/// The fleet's key: `APP_SHARED_SECRET`, which every host must share (a generated
/// `.app/secret` differs on each host, so hosts would refuse each other).
pub fn shared_key(paths: &AppPaths, settings: &Settings) -> Result<SigningKey> {
    Keys::from_settings(paths, settings).shared()
}

/// The check of `key` every fleet member publishes (see [`SECRET_CHECK`]).
pub fn secret_check(key: &SigningKey) -> String {
    key.sign(SECRET_CHECK)
}

/// Refuses a local database: the fleet needs a server every host reaches.
pub fn require_server(db: &Blocking) -> Result<()> {
    require_server_at(db.location())
}

/// Refuses a local database before opening it (which would create the file).
pub fn require_server_at(location: &Location) -> Result<()> {
    if let Location::Local(_) = location {
        return Err(Error::bad_input(format!(
            "the fleet needs a libSQL server database every host reaches, not the local file {location}: set APP_DB_URL=http://HOST:PORT on every host (scripts/start-sqld.sh starts one; docs/FLEET.md)"
        )));
    }
    Ok(())
}

/// The ref a host pushes attempt `token` of `task` in `run` to.
pub fn attempt_ref(run: &RunId, task: &str, token: i64) -> String {
    format!("refs/app/fleet/{run}/{task}/{token}")
}

/// An accepted end that names a commit: the task, the commit, and its attempt's ref.
struct End {
    task: Task,
    tip: String,
    source: String,
}

/// The attempt of a task last reported as started.
#[derive(Debug, Clone)]
struct Seen {
    attempt: i64,
    host: String,
    /// Whether its end was seen: its report taken, or its lease's expiry said.
    ended: bool,
}

/// The fleet side of a run being driven.
pub(super) struct FleetRun {
    pub(super) remote: Remote,
    key: SigningKey,
    secret_check: String,
    repo: String,
    /// What the remote's task branches hold, as last pushed or seen (`None`: absent).
    remote_tips: HashMap<String, Option<String>>,
    /// Per task, the attempt last reported as started.
    seen: HashMap<String, Seen>,
    last_poll: Option<Instant>,
    /// Offers made in this pass, sent together by `send_offers`: (task, start).
    queued: Vec<(String, String)>,
    /// When this orchestrator last said it is alive (`runs.heartbeat_ms`).
    last_beat: Option<Instant>,
}

impl FleetRun {
    /// The fleet side of a run in the repository at `paths`, through `remote`.
    pub(super) fn open(
        paths: &AppPaths,
        remote: &str,
        settings: &Settings,
        db: &Blocking,
    ) -> Result<FleetRun> {
        require_server(db)?;
        let key = shared_key(paths, settings)?;
        let remote = Remote::open(paths.repo_root(), remote)?;
        let remote_tips = remote
            .list("refs/heads/*")?
            .into_iter()
            .map(|(name, commit)| {
                let branch = name
                    .strip_prefix("refs/heads/")
                    .unwrap_or(&name)
                    .to_string();
                (branch, Some(commit))
            })
            .collect();
        Ok(FleetRun {
            secret_check: secret_check(&key),
            repo: remote.repo_key(),
            key,
            remote,
            remote_tips,
            seen: HashMap::new(),
            last_poll: None,
            queued: Vec::new(),
            last_beat: None,
        })
    }

    /// What [`FleetRun::open`] requires, checked without writing anything: a server database,
    /// the shared secret, the remote.
    pub(super) fn preflight(
        paths: &AppPaths,
        remote: &str,
        options: &super::Options,
    ) -> Result<()> {
        require_server_at(&Location::resolve(options.db.as_deref())?)?;
        shared_key(paths, &options.settings)?;
        Remote::open(paths.repo_root(), remote).map(drop)
    }

    /// The fleet side of a run being resumed, as `described` in its row (see
    /// [`FleetRun::describe`]); `--remote` overrides the remote's name.
    pub(super) fn reopen(
        paths: &AppPaths,
        described: &serde_json::Value,
        options: &super::Options,
        db: &Blocking,
    ) -> Result<FleetRun> {
        let remote = options
            .fleet
            .clone()
            .or_else(|| described["remote"].as_str().map(str::to_string))
            .unwrap_or_else(|| DEFAULT_REMOTE.to_string());
        let fleet = FleetRun::open(paths, &remote, &options.settings, db)?;
        if described["repo"].as_str() != Some(fleet.repo.as_str()) {
            return Err(Error::bad_input(format!(
                "the run belongs to the repository {}, and this one's remote {} is {}; resume it from a clone of that one",
                described["repo"].as_str().unwrap_or("?"),
                fleet.remote.name(),
                fleet.repo
            )));
        }
        Ok(fleet)
    }

    /// What the run's row records of the fleet side: the remote, the repository, and the
    /// run's cap, which the server keeps when hosts lease its tasks.
    pub(super) fn describe(&self, max_concurrent: usize) -> serde_json::Value {
        serde_json::json!({
            "remote": self.remote.name(),
            "repo": self.repo,
            "max_concurrent": max_concurrent,
        })
    }

    /// How long until the next poll of the run's rows is due (at least a millisecond).
    pub(super) fn until_poll(&self) -> Duration {
        self.last_poll
            .map_or(Duration::ZERO, |at| {
                POLL_INTERVAL.saturating_sub(at.elapsed())
            })
            .max(Duration::from_millis(1))
    }

    /// Whether the remote has a branch of this name.
    pub(super) fn has_branch(&self, branch: &str) -> bool {
        self.remote_tips.get(branch).is_some_and(Option::is_some)
    }
}

impl Orchestrator {
    fn fleet(&mut self) -> &mut FleetRun {
        self.fleet.as_mut().expect("a fleet run")
    }

    /// Queues the offer of the next attempt of `task`, whose branch is at `start`; sent with
    /// the others of this pass by [`Orchestrator::send_offers`].
    pub(super) fn queue_offer(&mut self, task: &Task, start: Oid) {
        self.fleet()
            .queued
            .push((task.id.clone(), start.to_string()));
    }

    /// Sends the queued offers: every start pushed to its task branch on the remote in one
    /// push (each only over the value last seen there), then the offers in one request. A
    /// task whose branch moved on the remote fails without using an attempt.
    pub(super) fn send_offers(&mut self, report: &mut dyn FnMut(Progress)) -> Result<()> {
        let queued = std::mem::take(&mut self.fleet().queued);
        if queued.is_empty() {
            return Ok(());
        }
        let tasks: Vec<Task> = queued
            .iter()
            .map(|(id, _)| {
                self.plan
                    .task(id)
                    .expect("queued tasks are plan tasks")
                    .clone()
            })
            .collect();
        let fleet = self.fleet();
        let updates: Vec<Update> = tasks
            .iter()
            .zip(&queued)
            .map(|(task, (_, start))| Update {
                commit: start.clone(),
                target: format!("refs/heads/{}", task.branch),
                expected: fleet.remote_tips.get(&task.branch).cloned().flatten(),
            })
            .filter(|update| update.expected.as_deref() != Some(update.commit.as_str()))
            .collect();
        let at = Instant::now();
        let pushed = fleet.remote.push_all(&updates)?;
        tracing::debug!(
            ms = elapsed_ms(at),
            refs = updates.len(),
            "orchestrate: pushed the starts"
        );
        let mut refused = HashMap::new();
        for (update, answer) in updates.iter().zip(pushed) {
            let branch = update.target.trim_start_matches("refs/heads/").to_string();
            match answer {
                Pushed::Done => {
                    fleet
                        .remote_tips
                        .insert(branch, Some(update.commit.clone()));
                }
                Pushed::Refused(why) => {
                    refused.insert(branch, why);
                }
            }
        }
        let mut specs = Vec::new();
        for (task, (_, start)) in tasks.iter().zip(&queued) {
            if let Some(why) = refused.get(&task.branch) {
                self.running.remove(&task.id);
                let detail = format!(
                    "the remote's branch {} moved ({why}); app never pushes over work it did not see: look at it, then resume",
                    task.branch
                );
                self.fail_unstarted(
                    task,
                    detail,
                    crate::time::Timestamp::now().to_string(),
                    report,
                )?;
                continue;
            }
            let spec = serde_json::to_string(&self.spec(task, Some(start.clone())))
                .expect("specs serialize");
            let sig = self.fleet().key.sign(spec.as_bytes());
            specs.push((task, spec, sig));
        }
        let fleet = self.fleet.as_ref().expect("a fleet run");
        let offers: Vec<Offer> = specs
            .iter()
            .map(|(task, spec, sig)| Offer {
                run_id: &self.run.id,
                task_id: &task.id,
                repo: &fleet.repo,
                spec,
                sig,
                secret_check: &fleet.secret_check,
                needs: &task.on,
            })
            .collect();
        let at = Instant::now();
        self.db.run(async |db| fleet::offer(db, &offers).await)?;
        tracing::debug!(
            ms = elapsed_ms(at),
            offers = offers.len(),
            "orchestrate: offered"
        );
        Ok(())
    }

    /// Reads the run's fleet rows (at most every [`POLL_INTERVAL`]): attempts hosts started are
    /// reported, accepted ends become outcomes.
    pub(super) fn poll_fleet(&mut self, report: &mut dyn FnMut(Progress)) -> Result<Vec<Outcome>> {
        let fleet = self.fleet();
        if fleet
            .last_poll
            .is_some_and(|at| at.elapsed() < POLL_INTERVAL)
        {
            return Ok(Vec::new());
        }
        fleet.last_poll = Some(Instant::now());
        let beat_due = fleet
            .last_beat
            .is_none_or(|at| at.elapsed() >= self.options.settings.lease_ttl / 3);
        let run = self.run.id.clone();
        if beat_due {
            self.db
                .run(async |db| fleet::run_heartbeat(db, &run).await)?;
            self.fleet().last_beat = Some(Instant::now());
        }
        let at = Instant::now();
        let rows = self.db.run(async |db| fleet::run_tasks(db, &run).await)?;
        let read = elapsed_ms(at);
        let at = Instant::now();
        let mut finished = Vec::new();
        for row in rows {
            if !self.running.contains_key(&row.task_id) {
                continue;
            }
            match row.state {
                LeaseState::Leased | LeaseState::Started => self.observe(&row, report)?,
                LeaseState::Finished => {
                    // An attempt that started and ended between two polls is recorded first.
                    let known = self.fleet().seen.get(&row.task_id).map_or(0, |s| s.attempt);
                    if row.attempt > known {
                        self.observe(&row, report)?;
                    }
                    finished.push(row);
                }
                LeaseState::Offered | LeaseState::Withdrawn => {}
            }
        }
        let observed = elapsed_ms(at);
        let at = Instant::now();
        let outcomes = self.accept(&finished)?;
        tracing::debug!(
            read_ms = read,
            observe_ms = observed,
            accept_ms = elapsed_ms(at),
            ended = finished.len(),
            "orchestrate: polled"
        );
        for row in &finished {
            if let Some(seen) = self.fleet().seen.get_mut(&row.task_id) {
                seen.ended = true;
            }
        }
        Ok(outcomes)
    }

    /// Records that a host runs attempt `row.attempt`, and says so once; says once when its
    /// lease expired (the host died or slept: another host takes the task as a new attempt).
    fn observe(&mut self, row: &FleetTask, report: &mut dyn FnMut(Progress)) -> Result<()> {
        let host = row.host.clone().unwrap_or_default();
        let seen = self.fleet().seen.get(&row.task_id).cloned();
        let moved = |from: &Seen| {
            format!(
                "host {} stopped renewing its lease on attempt {}; another host takes the task as a new attempt",
                from.host, from.attempt
            )
        };
        match seen {
            Some(seen) if row.attempt <= seen.attempt => {
                if row.expired && !seen.ended && row.state != LeaseState::Finished {
                    report(Progress::Moved {
                        task: row.task_id.clone(),
                        because: moved(&seen),
                    });
                    self.fleet().seen.insert(
                        row.task_id.clone(),
                        Seen {
                            ended: true,
                            ..seen
                        },
                    );
                }
                return Ok(());
            }
            Some(seen) if !seen.ended => report(Progress::Moved {
                task: row.task_id.clone(),
                because: moved(&seen),
            }),
            _ => {}
        }
        let log = PathBuf::from(format!(
            "{host}:{}",
            self.paths
                .task_log(self.run.id.as_str(), &row.task_id)
                .display()
        ));
        let task = self
            .rows
            .get_mut(&row.task_id)
            .expect("every task has a row");
        task.attempts = task.attempts.max(row.attempt);
        task.instance = Some(format!(
            "{}{}@{host}",
            instance_prefix(&self.run.id, &row.task_id),
            row.attempt
        ));
        task.log_path = Some(log.display().to_string());
        task.status = TaskStatus::Running;
        let task = task.clone();
        self.save_task(&task)?;
        self.fleet().seen.insert(
            row.task_id.clone(),
            Seen {
                attempt: row.attempt,
                host,
                ended: false,
            },
        );
        // Its time runs from here: offered early, it may have waited for a host.
        if let Some(running) = self.running.get_mut(&row.task_id) {
            running.started = Instant::now();
        }
        report(Progress::Started {
            task: row.task_id.clone(),
            attempt: row.attempt,
            log,
        });
        Ok(())
    }

    /// Takes accepted ends: the attempts' commits fetched (one fetch) and made their task
    /// branches' tips, on the remote (one push, each over the start it held) and here.
    fn accept(&mut self, rows: &[FleetTask]) -> Result<Vec<Outcome>> {
        let mut outcomes: Vec<Outcome> = rows
            .iter()
            .map(|row| Outcome {
                task: row.task_id.clone(),
                exit_code: row.report.exit_code,
                timed_out: row.report.detail.as_deref() == Some(TIMED_OUT),
                error: row
                    .report
                    .exit_code
                    .is_none()
                    .then(|| row.report.detail.clone().unwrap_or_default()),
            })
            .collect();
        let fetched = self.fetch_ends(rows)?;
        let mut taken = Vec::new();
        for (i, end) in fetched {
            match end {
                Ok(end) => taken.push((i, end)),
                Err(why) => outcomes[i].fail(why),
            }
        }
        let pushed = self.push_ends(taken.iter().map(|(_, end)| end))?;
        for ((i, end), refused) in taken.into_iter().zip(pushed) {
            if let Some(why) = refused {
                outcomes[i].fail(format!(
                    "the remote's branch {} moved ({why}); the attempt's work is kept on {}",
                    end.task.branch, end.source
                ));
                continue;
            }
            let oid = Oid::from_str(&end.tip).git_context(|| format!("reading {}", end.tip))?;
            let message = format!(
                "app orchestrate: task {} of run {} on the fleet",
                end.task.id, self.run.id
            );
            self.repo
                .reference(
                    &format!("refs/heads/{}", end.task.branch),
                    oid,
                    true,
                    &message,
                )
                .git_context(|| format!("updating {}", end.task.branch))?;
        }
        Ok(outcomes)
    }

    /// Fetches the attempt refs of the ends in `rows` that name a commit, in one fetch; per
    /// such row (by index), the end, or why it cannot be taken.
    fn fetch_ends(
        &mut self,
        rows: &[FleetTask],
    ) -> Result<Vec<(usize, std::result::Result<End, String>)>> {
        let ends: Vec<(usize, End)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, row)| {
                let (tip, token) = (row.report.tip.clone()?, row.token?);
                let task = self
                    .plan
                    .task(&row.task_id)
                    .expect("fleet tasks are plan tasks");
                let source = attempt_ref(&self.run.id, &row.task_id, token);
                Some((
                    i,
                    End {
                        task: task.clone(),
                        tip,
                        source,
                    },
                ))
            })
            .collect();
        let pairs: Vec<(String, String)> = ends
            .iter()
            .map(|(_, end)| (end.source.clone(), end.source.clone()))
            .collect();
        let at = Instant::now();
        let fetched = self.fleet().remote.fetch_all(&pairs)?;
        tracing::debug!(
            ms = elapsed_ms(at),
            refs = pairs.len(),
            "orchestrate: fetched the ends"
        );
        Ok(ends
            .into_iter()
            .zip(fetched)
            .map(|((i, end), fetched)| {
                let checked = match fetched {
                    None => Err(format!(
                        "its host reported {} but never pushed {}",
                        end.tip, end.source
                    )),
                    Some(commit) if commit != end.tip => Err(format!(
                        "{} holds {commit}, not the {} its host reported",
                        end.source, end.tip
                    )),
                    Some(_) => Ok(end),
                };
                (i, checked)
            })
            .collect())
    }

    /// Pushes each end's commit to its task branch on the remote, over the start it held, in
    /// one push; per end, why it was refused.
    fn push_ends<'a>(
        &mut self,
        ends: impl Iterator<Item = &'a End>,
    ) -> Result<Vec<Option<String>>> {
        let fleet = self.fleet();
        let updates: Vec<Update> = ends
            .map(|end| Update {
                commit: end.tip.clone(),
                target: format!("refs/heads/{}", end.task.branch),
                expected: fleet.remote_tips.get(&end.task.branch).cloned().flatten(),
            })
            .collect();
        let pushing: Vec<Update> = updates
            .iter()
            .filter(|u| u.expected.as_deref() != Some(u.commit.as_str()))
            .cloned()
            .collect();
        let at = Instant::now();
        let answers = fleet.remote.push_all(&pushing)?;
        tracing::debug!(
            ms = elapsed_ms(at),
            refs = pushing.len(),
            "orchestrate: pushed the ends"
        );
        let mut refused = HashMap::new();
        for (update, answer) in pushing.iter().zip(answers) {
            match answer {
                Pushed::Done => {
                    let branch = update.target.trim_start_matches("refs/heads/").to_string();
                    fleet
                        .remote_tips
                        .insert(branch, Some(update.commit.clone()));
                }
                Pushed::Refused(why) => {
                    refused.insert(update.target.clone(), why);
                }
            }
        }
        Ok(updates
            .iter()
            .map(|update| refused.get(&update.target).cloned())
            .collect())
    }

    /// A stop: the offers no host took are taken back and their tasks cancelled; attempts hosts
    /// run go on (`--resume` adopts them).
    pub(super) fn withdraw_offers(&mut self) -> Result<()> {
        self.withdraw_untaken()?;
        // What hosts still run stays `running` in the run's rows.
        self.running.clear();
        Ok(())
    }

    /// Takes back the offers no host took: their tasks are pending again (and, the run
    /// stopping, never start); the attempts hosts leased stay in flight.
    pub(super) fn withdraw_untaken(&mut self) -> Result<()> {
        let run = self.run.id.clone();
        self.db.run(async |db| fleet::withdraw(db, &run).await)?;
        let rows = self.db.run(async |db| fleet::run_tasks(db, &run).await)?;
        for row in rows {
            if row.state == LeaseState::Withdrawn && self.running.remove(&row.task_id).is_some() {
                let task = self
                    .rows
                    .get_mut(&row.task_id)
                    .expect("every task has a row");
                task.status = TaskStatus::Pending;
            }
        }
        Ok(())
    }

    /// Takes every task a dead orchestrator left on the fleet back into the run: running ones
    /// are adopted (their ends are read as they come), the rest offered again.
    pub(super) fn adopt(&mut self) -> Result<()> {
        let run = self.run.id.clone();
        let rows = self.db.run(async |db| fleet::run_tasks(db, &run).await)?;
        let by_task: HashMap<String, FleetTask> = rows
            .into_iter()
            .map(|row| (row.task_id.clone(), row))
            .collect();
        for task in self.plan.tasks.clone() {
            let status = self.rows[&task.id].status;
            if status == TaskStatus::Succeeded {
                // Integration happens here: the task's branch as the remote has it.
                let target = format!("refs/heads/{}", task.branch);
                self.fleet().remote.fetch(&target, &target)?;
                continue;
            }
            if status != TaskStatus::Running {
                // What did not succeed runs again, as after a local run's resume.
                self.pend(&task.id)?;
                continue;
            }
            match by_task.get(&task.id).map(|row| row.state) {
                Some(LeaseState::Leased | LeaseState::Started | LeaseState::Finished) => {
                    let row = &by_task[&task.id];
                    let seen = Seen {
                        attempt: row.attempt,
                        host: row.host.clone().unwrap_or_default(),
                        ended: false,
                    };
                    self.fleet().seen.insert(task.id.clone(), seen);
                    self.running.insert(
                        task.id.clone(),
                        Running {
                            process: None,
                            started: Instant::now(),
                        },
                    );
                }
                Some(LeaseState::Offered) => {
                    self.running.insert(
                        task.id.clone(),
                        Running {
                            process: None,
                            started: Instant::now(),
                        },
                    );
                }
                _ => self.pend(&task.id)?,
            }
        }
        Ok(())
    }

    /// Makes task `id` pending again, with its row saved.
    fn pend(&mut self, id: &str) -> Result<()> {
        let row = self.rows.get_mut(id).expect("every task has a row");
        row.status = TaskStatus::Pending;
        row.detail = None;
        let row = row.clone();
        self.save_task(&row)
    }
}
