//! What a resume finds of a dead run and takes back before the run continues.
//!
//! Invariants:
//! - Everything is looked at before anything changes: an attempt whose command outlived its
//!   supervisor refuses the resume (exit 3) with nothing touched.
//! - A dead attempt's worktree is taken back through [`crate::reclaim::reclaim`] (uncommitted
//!   work saved on `refs/app/rescue/<instance>`, never deleted); a live one is stopped first.
//! - An attempt counts once its command started: a launch the crash cut short before that is
//!   given back to the task.

use git2::Repository;

use super::Progress;
use super::attempt::TASK_STOP_TIMEOUT;
use crate::config::Timing;
use crate::db::instances::MirrorStatus;
use crate::db::runs::{self, RunRow, RunStatus, TaskRow, TaskStatus};
use crate::db::{self, Blocking};
use crate::error::{Result, RunError};
use crate::ids::{InstanceId, RunId};
use crate::paths::AppPaths;
use crate::process::{self, Presence, ProcessIdentity};
use crate::registry::{Liveness, Registry};
use crate::sign::Keys;

/// Run `id` of this repository, unless it is unknown, another repository's, or still
/// orchestrated by a live process (exit 3).
pub(super) fn require_resumable(
    paths: &AppPaths,
    db: &Blocking,
    id: &str,
    ttl: std::time::Duration,
) -> Result<RunRow> {
    // A text that is no run id names no run.
    let found = match RunId::parse(id) {
        Some(id) => db.run(async |db| runs::get(db, &id).await)?,
        None => None,
    };
    let Some(run) = found else {
        return Err(RunError::NotInDatabase { id: id.to_string() }.into());
    };
    // A fleet run is resumed from any clone of its repository (checked against its remote).
    if run.report.get("fleet").is_none() && run.repo_root != paths.repo_root().display().to_string()
    {
        return Err(RunError::OtherRepository {
            id: id.to_string(),
            repo_root: run.repo_root,
        }
        .into());
    }
    if run.report.get("fleet").is_some() && run.status == RunStatus::Running {
        // Its orchestrator may run on any host: it is alive while it heartbeats.
        let age = db.run(async |db| crate::db::fleet::run_heartbeat_age(db, &run.id).await)?;
        if let Some(age_ms) = age.filter(|age| *age < ttl.as_millis() as i64)
            && !(run.host == process::hostname() && run.pid == Some(std::process::id().into()))
        {
            return Err(RunError::StillOrchestratedOnFleet {
                id: id.to_string(),
                host: run.host.clone(),
                age_ms,
            }
            .into());
        }
    }
    if let (Some(pid), Some(start_time)) = (run.pid, run.start_time)
        && run.status == RunStatus::Running
        && run.host == process::hostname()
    {
        let owner = ProcessIdentity {
            pid: pid as u32,
            start_time: start_time as u64,
            boot_id: process::boot_id().to_string(),
        };
        if owner.presence() == Presence::Running && pid as u32 != std::process::id() {
            return Err(RunError::StillOrchestrated {
                id: id.to_string(),
                pid,
            }
            .into());
        }
    }
    Ok(run)
}

/// Takes back what the dead run `id` left (its attempts stopped, their worktrees reclaimed)
/// and returns its task rows with everything that did not succeed pending again.
pub(super) fn take_back(
    paths: &AppPaths,
    keys: &Keys,
    db: &Blocking,
    id: &RunId,
    timing: Timing,
    report: &mut dyn FnMut(Progress),
) -> Result<Vec<TaskRow>> {
    let mut rows = db.run(async |db| runs::tasks(db, id).await)?;
    // Everything is looked at before anything changes: an attempt whose command outlived its
    // supervisor refuses the resume with nothing touched.
    let mut leftovers = Vec::new();
    for row in &rows {
        if row.status == TaskStatus::Succeeded {
            continue;
        }
        if let Some(instance) = &row.instance {
            let instance = InstanceId::stored(instance.clone());
            leftovers.push(survey(paths, keys, db, row, &instance, timing)?);
        }
    }
    // Starts and stops the dead attempts' `app run` left half-done are finished or undone
    // first, as every `app run` does before it starts.
    crate::reclaim::recover_journal(paths, keys)?;
    for leftover in &leftovers {
        if leftover.live {
            // An attempt the dead orchestrator left running is stopped before it is restarted.
            let writer = Registry::open_for_write(paths, keys)?;
            let _ = crate::instance::stop(&writer, &leftover.instance, TASK_STOP_TIMEOUT, timing);
        }
        if let Some(done) = reclaim_attempt(paths, keys, timing, &leftover.instance)? {
            report(Progress::Reclaimed {
                task: leftover.task.clone(),
                instance: leftover.instance.to_string(),
                done,
            });
        }
    }
    for row in &mut rows {
        if row.status == TaskStatus::Succeeded {
            continue;
        }
        let never_started = leftovers
            .iter()
            .any(|l| l.task == row.task_id && !l.started);
        if row.status == TaskStatus::Running && never_started {
            // The launch the crash cut short never ran its command: it used no attempt.
            row.attempts = (row.attempts - 1).max(0);
        }
        row.status = TaskStatus::Pending;
        row.detail = None;
        db.run(async |db| runs::update_task(db, row).await)?;
    }
    Ok(rows)
}

/// A task's last attempt, as a resume finds it.
struct Leftover {
    task: String,
    instance: InstanceId,
    /// Its supervisor still runs (and heartbeats): it is stopped first.
    live: bool,
    /// It got as far as starting its command.
    started: bool,
}

/// Looks at the last attempt of `row`, instance `instance`: whether it still runs, and whether
/// it ever started its command. An attempt whose supervisor is dead but whose command still
/// runs is an error (exit 3): nothing may take its worktree from under it.
fn survey(
    paths: &AppPaths,
    keys: &Keys,
    db: &Blocking,
    row: &TaskRow,
    instance: &InstanceId,
    timing: Timing,
) -> Result<Leftover> {
    let snapshot = Registry::open_read_only(paths, keys)?.snapshot()?;
    let record = snapshot.instance(instance).cloned();
    let live = record
        .as_ref()
        .is_some_and(|r| r.liveness(timing.stale_after) == Liveness::Live);
    if !live
        && let Some(record) = &record
        && let Some(why) = crate::inuse::instance_running(record)
    {
        return Err(RunError::TaskAttemptInUse {
            task: row.task_id.clone(),
            instance: instance.to_string(),
            why,
        }
        .into());
    }
    let started = match &record {
        // The registry is written before the command starts and after it has started.
        Some(record) => record.child_pid.is_some(),
        // Unregistered: it either never registered or ran to its end, and its mirror in the
        // database says which (a registration that never started its command stays `starting`).
        None => db
            .run(async |db| db::instances::history(db, paths.repo_root(), instance).await)?
            .iter()
            .any(|r| r.status != MirrorStatus::Starting),
    };
    Ok(Leftover {
        task: row.task_id.clone(),
        instance: instance.clone(),
        live,
        started,
    })
}

/// Reclaims what the dead attempt `instance` left (through [`crate::reclaim::reclaim`], the
/// path every reclaim takes: uncommitted work saved on `refs/app/rescue/<instance>`, the
/// worktree removed, the registration dropped, the task branch kept). `None` when it left
/// nothing, or when it is still alive (then its worktree is not touched).
fn reclaim_attempt(
    paths: &AppPaths,
    keys: &Keys,
    timing: Timing,
    instance: &InstanceId,
) -> Result<Option<String>> {
    let snapshot = Registry::open_read_only(paths, keys)?.snapshot()?;
    if let Some(record) = snapshot.instance(instance) {
        if record.liveness(timing.stale_after) == Liveness::Live {
            return Err(RunError::AttemptStillRuns {
                instance: instance.to_string(),
                pid: record.pid,
            }
            .into());
        }
        if let Some(why) = crate::inuse::instance_running(record) {
            return Err(RunError::AttemptInUse {
                instance: instance.to_string(),
                why,
            }
            .into());
        }
        let done = crate::reclaim::reclaim(
            paths,
            keys,
            crate::reclaim::Work::Save,
            instance,
            record.worktree.as_deref(),
            record.branch.as_deref(),
        )?;
        return Ok(Some(done));
    }
    // Unregistered, yet its worktree may remain: `app run` keeps a worktree holding
    // uncommitted work, and a crash can leave one behind.
    let path = paths.worktree(instance);
    if !path.exists() {
        return Ok(None);
    }
    let branch = Repository::open(&path).ok().and_then(|wt| {
        wt.head()
            .ok()
            .filter(|head| head.is_branch())
            .and_then(|head| head.shorthand().ok().map(str::to_string))
    });
    crate::reclaim::reclaim(
        paths,
        keys,
        crate::reclaim::Work::Save,
        instance,
        Some(&path),
        branch.as_deref(),
    )
    .map(Some)
}
