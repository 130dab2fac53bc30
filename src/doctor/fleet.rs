//! The fleet as doctor sees it, when the database is a server (docs/FLEET.md): hosts that
//! stopped heartbeating, leases past their expiry, fleet locks and reservations whose holder is
//! dead, copies of the fleet's message table waiting past their TTL, and task refs on the
//! remote that no run needs or knows.
//!
//! Invariants:
//! - One read of the server ([`fleet::leftovers`]), after one listing of the remote's refs (so
//!   the read also asks for the runs those refs name). A local database is never asked.
//! - Each fix is one guarded request that changes a row only while it is what the diagnosis
//!   saw: a host is marked stopped (never deleted) only while its heartbeat is still stale, so a
//!   worker that comes back is live again at its next heartbeat; a lease is handed back only
//!   while it is the same token, still expired, and no live host holds it; a fleet lock or
//!   reservation is freed only while the same holder holds it (the lock under the same token)
//!   and is still dead (its host's heartbeat stale by the server's clock, or `/proc` of this
//!   host, asked again just before, says it is gone), in a request that renews no heartbeat.
//! - Messages are moved aside only by their receiving side's own code, for this host's
//!   inboxes: their dead letters and quarantined copies are kept as files of this `.app/`.
//!   Copies waiting for other hosts are only noticed: their receivers move them.
//! - Remote work is never lost: the only ref deleted is an attempt ref of a finished run whose
//!   commit its task branch on the remote contains (judged after fetching the objects, and
//!   deleted only while it still holds that commit); every other ref is reported with the
//!   commands to look at it and delete it.

use std::collections::{BTreeMap, BTreeSet};

use git2::{Oid, Repository};

use super::problem::{FleetRefState, Problem};
use super::{Diagnosis, Options};
use crate::coordination::Coordination;
use crate::db::fleet::{self, HandedBack, Held, HostRow, Leftovers};
use crate::db::holds::{self, DeadFreed, HolderRow, LockRow, ReservationRow};
use crate::db::{Blocking, DbSettings, Location};
use crate::error::{Error, GitContext, Result};
use crate::fleet_holds;
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::remote::{Pushed, Remote};

/// The remote whose task refs doctor looks at (the fleet's default).
const REMOTE: &str = "origin";

/// Runs in these states may still take an attempt's end (`--resume` adopts it): their attempt
/// refs are not judged.
const UNFINISHED: [&str; 2] = ["running", "interrupted"];

/// A task branch (`refs/heads/app/<run>/<task>`) or attempt ref
/// (`refs/app/fleet/<run>/<task>/<token>`) on the remote.
#[derive(Debug, Clone)]
struct TaskRef {
    name: String,
    commit: String,
    run: String,
    task: String,
    /// The attempt's token; `None` for a task branch.
    token: Option<i64>,
}

impl TaskRef {
    fn parse(name: &str, commit: &str) -> Option<TaskRef> {
        let (rest, parts) = match name.strip_prefix("refs/heads/app/") {
            Some(rest) => (rest, 2),
            None => (name.strip_prefix("refs/app/fleet/")?, 3),
        };
        let fields: Vec<&str> = rest.split('/').collect();
        if fields.len() != parts || fields.iter().any(|f| f.is_empty()) {
            return None;
        }
        let token = match fields.get(2) {
            Some(token) => Some(token.parse().ok()?),
            None => None,
        };
        Some(TaskRef {
            name: name.to_string(),
            commit: commit.to_string(),
            run: fields[0].to_string(),
            task: fields[1].to_string(),
            token,
        })
    }
}

/// The fleet's problems, read from the server `db`; a failure to read is one problem.
pub(super) fn problems(paths: &AppPaths, db: &Blocking, options: &Options, found: &mut Diagnosis) {
    if let Err(err) = diagnose(paths, db, options, found) {
        found.problems.push(Problem::Database {
            reason: format!("cannot check the fleet: {err}"),
        });
    }
}

fn diagnose(
    paths: &AppPaths,
    db: &Blocking,
    options: &Options,
    found: &mut Diagnosis,
) -> Result<()> {
    let ttl_ms = options.settings.lease_ttl.as_millis() as i64;
    // Without the remote there is no fleet of this repository: only its messages are judged.
    let remote = Remote::open(paths.repo_root(), REMOTE).ok();
    let (refs, branches) = match &remote {
        Some(remote) => remote_refs(remote).unwrap_or_else(|err| {
            found.notices.push(format!(
                "cannot list the task refs of the remote {REMOTE}: {err}"
            ));
            Default::default()
        }),
        None => Default::default(),
    };
    let runs: Vec<String> = refs
        .iter()
        .map(|r| r.run.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let repo = remote.as_ref().map(Remote::repo_key);
    let left = db.run(async |db| fleet::leftovers(db, repo.as_deref(), ttl_ms, &runs).await)?;
    host_problems(&left, ttl_ms, &mut found.problems);
    hold_problems(options, &left, &mut found.problems);
    message_problems(paths, options, &left, found);
    if let Some(remote) = &remote {
        ref_problems(paths, remote, (&refs, &branches), &left, found)?;
    }
    Ok(())
}

/// The remote's task refs, and every branch it has (name without `refs/heads/`, commit).
fn remote_refs(remote: &Remote) -> Result<(Vec<TaskRef>, BTreeMap<String, String>)> {
    let branches: BTreeMap<String, String> = remote
        .list("refs/heads/*")?
        .into_iter()
        .filter_map(|(name, commit)| Some((name.strip_prefix("refs/heads/")?.to_string(), commit)))
        .collect();
    let attempts = remote.list("refs/app/fleet/*")?;
    let refs = branches
        .iter()
        .map(|(branch, commit)| (format!("refs/heads/{branch}"), commit.clone()))
        .chain(attempts)
        .filter_map(|(name, commit)| TaskRef::parse(&name, &commit))
        .collect();
    Ok((refs, branches))
}

/// Dead hosts (with the leases they still hold) and expired leases.
fn host_problems(left: &Leftovers, ttl_ms: i64, problems: &mut Vec<Problem>) {
    let describe = |lease: &Held| {
        format!(
            "{}/{}#{} (token {})",
            lease.run_id, lease.task_id, lease.attempt, lease.token
        )
    };
    for host in &left.dead_hosts {
        problems.push(Problem::DeadHost {
            host: host.clone(),
            ttl_ms,
            holds: left
                .held
                .iter()
                .filter(|lease| lease.host == host.name)
                .map(describe)
                .collect(),
        });
    }
    for lease in left.held.iter().filter(|lease| lease.expired_ms.is_some()) {
        problems.push(Problem::ExpiredLease {
            lease: lease.clone(),
        });
    }
}

/// Fleet locks and reservations whose holder is dead, judged as `fleet_holds` judges them:
/// its host's heartbeat is stale, or it is a process of this host that `/proc` says is gone.
fn hold_problems(options: &Options, left: &Leftovers, problems: &mut Vec<Problem>) {
    let here = (
        options.settings.fleet_host.as_str(),
        options.settings.lease_ttl,
    );
    for lock in &left.locks {
        let Some(holder) = &lock.holder else { continue };
        if let Some(reason) = fleet_holds::dead_holder(holder, lock.host_age_ms, here) {
            problems.push(Problem::DeadFleetLock {
                lock: lock.clone(),
                holder: holder.clone(),
                reason,
            });
        }
    }
    for row in &left.reservations {
        if let Some(reason) = fleet_holds::dead_holder(&row.holder, row.host_age_ms, here) {
            problems.push(Problem::DeadFleetReservation {
                row: row.clone(),
                reason,
            });
        }
    }
}

/// Expired copies for this host's inboxes of this repository are problems; those waiting for
/// other hosts are noticed (their receiving side moves them).
fn message_problems(paths: &AppPaths, options: &Options, left: &Leftovers, found: &mut Diagnosis) {
    let root = paths.repo_root().display().to_string();
    for (host, repo_root, recipient, count) in &left.expired_messages {
        if *host == options.settings.fleet_host && *repo_root == root {
            found.problems.push(Problem::FleetMessages {
                recipient: recipient.clone(),
                count: *count,
            });
        } else {
            found.notices.push(format!(
                "{count} message(s) for {recipient} on host {host} ({repo_root}) wait past their TTL in the fleet's message table; 'app doctor --fix' there moves them to its dead letters"
            ));
        }
    }
}

/// Task refs no run needs: attempt refs of finished runs (deletable when their task branch
/// contains them) and refs of runs the database does not know.
fn ref_problems(
    paths: &AppPaths,
    remote: &Remote,
    (refs, branches): (&[TaskRef], &BTreeMap<String, String>),
    left: &Leftovers,
    found: &mut Diagnosis,
) -> Result<()> {
    let mut judged = Vec::new();
    for task_ref in refs {
        let state = match left.runs.get(&task_ref.run) {
            None => FleetRefState::NoRun {
                run: task_ref.run.clone(),
            },
            Some(status) if task_ref.token.is_none() || UNFINISHED.contains(&status.as_str()) => {
                continue;
            }
            Some(status) => {
                let branch = left
                    .branches
                    .get(&(task_ref.run.clone(), task_ref.task.clone()))
                    .cloned()
                    .unwrap_or_else(|| format!("app/{}/{}", task_ref.run, task_ref.task));
                let tip = branches.get(&branch).cloned();
                judged.push((task_ref, status.clone(), branch, tip));
                continue;
            }
        };
        found.problems.push(fleet_ref(task_ref, state));
    }
    if judged.is_empty() {
        return Ok(());
    }
    let repo = Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))?;
    let wanted: Vec<(&str, &str)> = judged
        .iter()
        .flat_map(|(task_ref, _, branch, tip)| {
            let tip = tip.as_deref().map(|tip| (branch.as_str(), tip));
            std::iter::once((task_ref.name.as_str(), task_ref.commit.as_str())).chain(tip)
        })
        .collect();
    if let Err(err) = fetch_missing(&repo, remote, &wanted) {
        found.notices.push(format!(
            "cannot fetch the attempt refs of finished runs to judge them (left for the next doctor): {err}"
        ));
        return Ok(());
    }
    for (task_ref, status, branch, tip) in judged {
        let state = match tip.is_some_and(|tip| contains(&repo, &tip, &task_ref.commit)) {
            true => FleetRefState::Taken {
                run: task_ref.run.clone(),
                branch,
            },
            false => FleetRefState::HoldsWork {
                run: task_ref.run.clone(),
                status,
            },
        };
        found.problems.push(fleet_ref(task_ref, state));
    }
    Ok(())
}

fn fleet_ref(task_ref: &TaskRef, state: FleetRefState) -> Problem {
    Problem::FleetRef {
        name: task_ref.name.clone(),
        commit: task_ref.commit.clone(),
        state,
    }
}

/// Fetches (objects only, no ref moves) the refs of `wanted` (name, commit) whose commit this
/// repository lacks.
fn fetch_missing(repo: &Repository, remote: &Remote, wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(_, commit)| {
            Oid::from_str(commit)
                .ok()
                .is_none_or(|oid| repo.find_commit(oid).is_err())
        })
        .map(|(name, _)| {
            // A branch name is fetched as its full ref.
            match name.starts_with("refs/") {
                true => name.to_string(),
                false => format!("refs/heads/{name}"),
            }
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    remote.fetch_objects(&missing)
}

/// Whether commit `tip` is or descends from `commit` (both present here).
fn contains(repo: &Repository, tip: &str, commit: &str) -> bool {
    match (Oid::from_str(tip), Oid::from_str(commit)) {
        (Ok(tip), Ok(commit)) => {
            tip == commit || repo.graph_descendant_of(tip, commit).unwrap_or(false)
        }
        _ => false,
    }
}

/// The server database doctor was given.
fn server(options: &Options) -> Result<Blocking> {
    Blocking::open_default(options.db.as_deref(), DbSettings::from(&options.settings))
}

/// Marks the dead `host` stopped, unless it came back.
pub(super) fn stop_host(options: &Options, host: &HostRow) -> Result<String> {
    let ttl_ms = options.settings.lease_ttl.as_millis() as i64;
    let worker = (host.pid, host.start_time);
    let stopped = server(options)?
        .run(async |db| fleet::stop_dead_host(db, &host.name, worker, ttl_ms).await)?;
    Ok(match stopped {
        true => "marked stopped (its row is kept)".into(),
        false => "its heartbeat came back; left alone".into(),
    })
}

/// Hands the expired `lease` back to the fleet, unless it changed.
pub(super) fn hand_back(options: &Options, lease: &Held) -> Result<String> {
    let ttl_ms = options.settings.lease_ttl.as_millis() as i64;
    let done = server(options)?.run(async |db| {
        fleet::hand_back(db, &lease.run_id, &lease.task_id, lease.token, ttl_ms).await
    })?;
    Ok(match done {
        HandedBack::Offered => {
            "handed back: offered again, the next free host runs it as a new attempt".into()
        }
        HandedBack::Moved => "another host took it meanwhile (or it ended); left alone".into(),
        HandedBack::Kept => "its host is alive again (or renewed the lease); left alone".into(),
    })
}

/// Moves the expired copies of `recipient`'s inbox in the table aside, through its receiving
/// side's own code (dead letters and quarantined copies as files of this `.app/`).
pub(super) fn sweep_messages(
    paths: &AppPaths,
    options: &Options,
    recipient: &str,
) -> Result<String> {
    let location = Location::resolve(options.db.as_deref())?;
    let messages = Coordination::new(paths, &options.settings)
        .with_database(&location, DbSettings::from(&options.settings))
        .messages()?;
    // A recipient is a row of the table: its copies go to files named after it.
    let recipient = InstanceId::from_trusted(recipient.to_string(), "the fleet's message table")?;
    let (_, swept) = messages.pending(&recipient)?;
    Ok(format!(
        "moved {} to dead/ and {} to quarantine/",
        swept.expired, swept.quarantined
    ))
}

/// What freeing a dead holder's lock or reservation did, as doctor says it.
fn freed(done: DeadFreed) -> String {
    match done {
        DeadFreed::Freed => "released".into(),
        DeadFreed::Alive => "its holder is alive again; left alone".into(),
        DeadFreed::Moved => "released or taken over meanwhile; nothing to do".into(),
    }
}

/// Frees the fleet `lock` of the dead `holder`, unless it changed or its holder came back.
pub(super) fn free_lock(options: &Options, lock: &LockRow, holder: &HolderRow) -> Result<String> {
    let ttl_ms = options.settings.lease_ttl.as_millis() as i64;
    // Asked afresh: a pid this host reused is a live process, not the holder.
    let dead_here = fleet_holds::dead_here(holder, &options.settings.fleet_host).is_some();
    let done = server(options)?.run(async |db| {
        holds::free_dead_lock(db, (&lock.name, lock.token), holder, (ttl_ms, dead_here)).await
    })?;
    Ok(freed(done))
}

/// Drops the fleet reservation `row` of a dead holder, unless its holder came back.
pub(super) fn drop_reservation(options: &Options, row: &ReservationRow) -> Result<String> {
    let ttl_ms = options.settings.lease_ttl.as_millis() as i64;
    let dead_here = fleet_holds::dead_here(&row.holder, &options.settings.fleet_host).is_some();
    // A tag of this change's own, as every reservation change takes.
    let new = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
    let done = server(options)?.run(async |db| {
        holds::drop_dead_reservation(db, (&row.id, new), &row.holder, (ttl_ms, dead_here)).await
    })?;
    Ok(freed(done))
}

/// Deletes the attempt ref `name` on the remote, only while it still holds `commit` and the
/// remote's task branch `branch` contains that commit (looked at afresh).
pub(super) fn delete_taken(
    paths: &AppPaths,
    name: &str,
    commit: &str,
    branch: &str,
) -> Result<String> {
    let remote = Remote::open(paths.repo_root(), REMOTE)?;
    let full = format!("refs/heads/{branch}");
    let Some((_, tip)) = remote.list(&full)?.into_iter().find(|(n, _)| *n == full) else {
        return Ok(format!(
            "its task branch {branch} is gone from the remote; kept"
        ));
    };
    let repo = Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))?;
    fetch_missing(&repo, &remote, &[(name, commit), (&full, &tip)])?;
    if !contains(&repo, &tip, commit) {
        return Err(Error::Failed(format!(
            "the task branch {branch} on the remote no longer contains {commit}; kept"
        )));
    }
    Ok(match remote.delete(name, commit)? {
        Pushed::Done => format!("deleted on the remote; its commit stays on {branch}"),
        Pushed::Refused(why) => format!("it moved on the remote meanwhile ({why}); kept"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_refs_are_task_branches_and_attempt_refs_only() {
        let parsed = |name: &str| TaskRef::parse(name, "c").map(|r| (r.run, r.task, r.token));
        let some = |run: &str, task: &str, token| Some((run.into(), task.into(), token));
        assert_eq!(
            parsed("refs/heads/app/r-1a2b3c/t"),
            some("r-1a2b3c", "t", None)
        );
        assert_eq!(
            parsed("refs/app/fleet/r-1a2b3c/t/17"),
            some("r-1a2b3c", "t", Some(17))
        );
        for other in [
            "refs/heads/app/3f9a1c2e",
            "refs/heads/app/r/t/extra",
            "refs/heads/main",
            "refs/app/fleet/r/t",
            "refs/app/fleet/r/t/not-a-token",
            "refs/app/fleet/r//1",
            "refs/app/rescue/host1/3f9a1c2e",
        ] {
            assert_eq!(parsed(other), None, "{other}");
        }
    }
}
