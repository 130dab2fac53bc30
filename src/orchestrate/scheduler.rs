//! The run loop: which tasks are ready, the cap on parallelism, skips after a failure, cancels
//! after a stop, retries, and the rows in the database kept current at every change.
//!
//! Invariants:
//! - A task starts only when every dependency succeeded, and never more than `max_concurrent`
//!   run at once.
//! - Every change of a task's row is saved before it is reported.
//! - The first signal stops starting tasks and asks the running ones to stop (SIGTERM); the
//!   second kills them. What never ran is cancelled (a stop) or skipped (a failure upstream).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use git2::Repository;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::attempt::{Outcome, Running};
use super::fleet::FleetRun;
use super::plan::{Plan, Task};
use super::{Options, Progress, StopFlag, Summary, refs};
use crate::db::Blocking;
use crate::db::runs::{self, RunRow, RunStatus, TaskRow, TaskStatus};
use crate::error::{IoContext, Result};
use crate::paths::AppPaths;
use crate::time::Timestamp;

/// One run being driven: its plan, its rows, its attempts in flight.
pub(super) struct Orchestrator {
    pub(super) paths: AppPaths,
    pub(super) repo: Repository,
    pub(super) plan: Plan,
    pub(super) options: Options,
    pub(super) run: RunRow,
    pub(super) rows: HashMap<String, TaskRow>,
    /// Attempts started by this orchestrator, for the retry budget.
    pub(super) tries: HashMap<String, u32>,
    pub(super) running: HashMap<String, Running>,
    pub(super) conflicts: Vec<Value>,
    pub(super) db: Blocking,
    pub(super) exe: PathBuf,
    /// The fleet side, when the run's attempts run on the fleet.
    pub(super) fleet: Option<FleetRun>,
}

impl Orchestrator {
    pub(super) fn new(
        paths: &AppPaths,
        plan: Plan,
        options: &Options,
        run: RunRow,
        rows: Vec<TaskRow>,
        db: Blocking,
        fleet: Option<FleetRun>,
    ) -> Result<Self> {
        let exe = std::env::current_exe().io_context("finding", "the app executable")?;
        Ok(Orchestrator {
            paths: paths.clone(),
            repo: refs::open(paths)?,
            plan,
            options: options.clone(),
            run,
            rows: rows.into_iter().map(|r| (r.task_id.clone(), r)).collect(),
            tries: HashMap::new(),
            running: HashMap::new(),
            conflicts: Vec::new(),
            db,
            exe,
            fleet,
        })
    }

    /// Runs every task it can, then closes the run: what never ran marked, the integration
    /// branch updated, the run's row written.
    pub(super) fn execute(
        &mut self,
        stop: &StopFlag,
        report: &mut dyn FnMut(Progress),
    ) -> Result<Summary> {
        let done = self
            .rows
            .values()
            .filter(|r| r.status == TaskStatus::Succeeded)
            .count();
        report(Progress::Began {
            run: self.run.id.clone(),
            tasks: self.plan.tasks.len(),
            done,
        });
        let stopping = self.drive(stop, report)?;
        self.mark_never_ran(stopping)?;
        self.close(stop, report)
    }

    /// Starts what is ready and records what ends until nothing runs any more; returns whether
    /// the run was stopping (a signal, or `--fail-fast` after a failure).
    fn drive(&mut self, stop: &StopFlag, report: &mut dyn FnMut(Progress)) -> Result<bool> {
        let (outcomes, finished) = mpsc::channel::<Outcome>();
        let mut stopping = false;
        let mut signals_seen = 0;
        loop {
            if stop.count() > signals_seen {
                signals_seen = stop.count();
                stopping = true;
                if self.fleet.is_some() {
                    // Hosts' attempts go on; `--resume` adopts them.
                    self.withdraw_offers()?;
                    return Ok(true);
                }
                let signal = if signals_seen > 1 {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                self.signal_running(signal);
            }
            if !stopping {
                let at = std::time::Instant::now();
                self.skip_blocked(report)?;
                self.start_ready(&outcomes, report)?;
                if self.fleet.is_some() {
                    self.send_offers(report)?;
                }
                let took = crate::time::elapsed_ms(at);
                if took > 0 {
                    tracing::debug!(ms = took, "orchestrate: started what is ready");
                }
            }
            if self.running.is_empty() {
                return Ok(stopping);
            }
            if self.fleet.is_some() {
                for outcome in self.poll_fleet(report)? {
                    let failed = self.finish(outcome, stopping, report)?;
                    if failed && self.options.fail_fast && !stopping {
                        stopping = true;
                        // What no host took yet never starts; leased attempts end as they do.
                        self.withdraw_untaken()?;
                    }
                }
            }
            // A fleet run's ends come from its polls: wait for the next one, not longer.
            let wait = match &self.fleet {
                Some(fleet) => fleet.until_poll(),
                None => Duration::from_millis(100),
            };
            match finished.recv_timeout(wait) {
                Ok(outcome) => {
                    let failed = self.finish(outcome, stopping, report)?;
                    if failed && self.options.fail_fast && !stopping {
                        stopping = true;
                        self.signal_running(Signal::SIGTERM);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(stopping),
            }
        }
    }

    fn signal_running(&self, signal: Signal) {
        for process in self.running.values().filter_map(|r| r.process.as_ref()) {
            process.signal(signal);
        }
    }

    /// What never ran is cancelled (a stop) or skipped (after a failure upstream).
    fn mark_never_ran(&mut self, stopping: bool) -> Result<()> {
        let now = Timestamp::now().to_string();
        for task in self.plan.tasks.clone() {
            let row = self.rows.get_mut(&task.id).expect("every task has a row");
            if row.status == TaskStatus::Pending {
                row.status = if stopping {
                    TaskStatus::Cancelled
                } else {
                    TaskStatus::Skipped
                };
                row.detail
                    .get_or_insert_with(|| "the run stopped before it started".into());
                row.finished_at = Some(now.clone());
                let row = row.clone();
                self.save_task(&row)?;
            }
        }
        Ok(())
    }

    /// Integrates (unless stopped by a signal) and writes the run's final row.
    fn close(&mut self, stop: &StopFlag, report: &mut dyn FnMut(Progress)) -> Result<Summary> {
        let mut report_value = json!({ "conflicts": self.conflicts });
        if let Some(fleet) = self.run.report.get("fleet") {
            report_value["fleet"] = fleet.clone();
        }
        if stop.count() == 0
            && let Some(branch) = self.plan.integration.clone()
        {
            report_value["integration"] = self.integrate(&branch, report)?;
        }
        let all_ok = self
            .rows
            .values()
            .all(|r| r.status == TaskStatus::Succeeded);
        self.run.status = if stop.count() > 0 {
            RunStatus::Interrupted
        } else if all_ok {
            RunStatus::Succeeded
        } else {
            RunStatus::Failed
        };
        self.run.finished_at = Some(Timestamp::now().to_string());
        self.run.pid = None;
        self.run.start_time = None;
        self.run.report = report_value;
        let run = &self.run;
        self.db.run(async |db| runs::update_run(db, run).await)?;
        Ok(Summary {
            run: self.run.clone(),
            tasks: self
                .plan
                .tasks
                .iter()
                .map(|t| self.rows[&t.id].clone())
                .collect(),
        })
    }

    pub(super) fn save_task(&self, row: &TaskRow) -> Result<()> {
        self.db.run(async |db| runs::update_task(db, row).await)
    }

    /// Marks pending tasks whose dependencies can no longer succeed as skipped.
    fn skip_blocked(&mut self, report: &mut dyn FnMut(Progress)) -> Result<()> {
        loop {
            let mut changed = false;
            for task in self.plan.tasks.clone() {
                if self.rows[&task.id].status != TaskStatus::Pending {
                    continue;
                }
                let blocker = task
                    .depends_on
                    .iter()
                    .find(|dep| self.rows[dep.as_str()].status.did_not_succeed());
                if let Some(blocker) = blocker {
                    let because = format!("{blocker} did not succeed");
                    let row = self.rows.get_mut(&task.id).expect("every task has a row");
                    row.status = TaskStatus::Skipped;
                    row.detail = Some(because.clone());
                    row.finished_at = Some(Timestamp::now().to_string());
                    let row = row.clone();
                    self.save_task(&row)?;
                    report(Progress::Skipped {
                        task: task.id.clone(),
                        because,
                    });
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
        }
    }

    fn start_ready(
        &mut self,
        outcomes: &mpsc::Sender<Outcome>,
        report: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        for task in self.plan.tasks.clone() {
            // A fleet run offers every ready task; the server leases no more than
            // max_concurrent of them at once (`db::fleet::claim`). With --fail-fast it offers
            // only what may run now, so no host starts a task after a failure it did not see.
            let offers_ahead = self.fleet.is_some() && !self.options.fail_fast;
            if !offers_ahead && self.running.len() >= self.plan.max_concurrent {
                return Ok(());
            }
            let ready = self.rows[&task.id].status == TaskStatus::Pending
                && task
                    .depends_on
                    .iter()
                    .all(|dep| self.rows[dep.as_str()].status == TaskStatus::Succeeded);
            if ready {
                self.start_task(&task, outcomes, report)?;
            }
        }
        Ok(())
    }

    /// Records an attempt's end; returns whether the task failed for good.
    fn finish(
        &mut self,
        outcome: Outcome,
        stopping: bool,
        report: &mut dyn FnMut(Progress),
    ) -> Result<bool> {
        let Some(running) = self.running.remove(&outcome.task) else {
            return Ok(false);
        };
        let task = self
            .plan
            .task(&outcome.task)
            .expect("running tasks are plan tasks")
            .clone();
        let elapsed = running.started.elapsed();
        let succeeded = outcome.exit_code == Some(0) && outcome.error.is_none();
        let retry = !succeeded
            && !stopping
            && self.tries.get(&task.id).copied().unwrap_or(0) <= task.retries;
        let detail = (!succeeded).then(|| failure(&task, &outcome, stopping));
        let status = match (succeeded, retry, stopping) {
            (true, _, _) => TaskStatus::Succeeded,
            (false, true, _) => TaskStatus::Pending,
            (false, false, true) => TaskStatus::Cancelled,
            (false, false, false) => TaskStatus::Failed,
        };
        let row = self.rows.get_mut(&task.id).expect("every task has a row");
        row.status = status;
        row.exit_code = outcome.exit_code;
        row.detail = detail.clone();
        row.finished_at = Some(Timestamp::now().to_string());
        let row = row.clone();
        self.save_task(&row)?;
        report(Progress::Finished {
            task: task.id.clone(),
            status: if retry { None } else { Some(status) },
            exit_code: outcome.exit_code,
            elapsed,
            detail,
        });
        if succeeded {
            let at = std::time::Instant::now();
            self.check_siblings(&task, report)?;
            tracing::debug!(task = %task.id, ms = crate::time::elapsed_ms(at), "orchestrate: checked the siblings");
        }
        Ok(status == TaskStatus::Failed)
    }

    /// Whether `task` depends on `id`, directly or through others.
    pub(super) fn depends(&self, task: &Task, id: &str) -> bool {
        let mut seen = HashSet::new();
        let mut stack: Vec<&str> = task.depends_on.iter().map(String::as_str).collect();
        while let Some(next) = stack.pop() {
            if next == id {
                return true;
            }
            if seen.insert(next)
                && let Some(dep) = self.plan.task(next)
            {
                stack.extend(dep.depends_on.iter().map(String::as_str));
            }
        }
        false
    }
}

/// Why an attempt of `task` failed.
fn failure(task: &Task, outcome: &Outcome, stopping: bool) -> String {
    if let Some(error) = &outcome.error {
        error.clone()
    } else if outcome.timed_out {
        format!(
            "timed out after {}",
            crate::time::format_age(task.timeout.unwrap_or_default())
        )
    } else if stopping {
        "stopped by a signal to the orchestrator".into()
    } else {
        format!("exited with {}", outcome.exit_code.unwrap_or(-1))
    }
}
