//! [`diagnose`]: look at everything, change nothing. The checks run in the order `--fix`
//! handles what they find: lock files a killed writer left on app's refs first (the fixes after
//! them change those refs), then interrupted operations (finishing them changes what the rest
//! sees), then instances, git's state, coordination, files (sockets before agent-state files,
//! which a socket that answers keeps), the database.

use std::fs;
use std::path::Path;
use std::time::Duration;

use git2::Repository;

use super::problem::Problem;
use super::{Diagnosis, Options, coordination, database, files, git};
use crate::error::{Error, GitContext, Result};
use crate::ids::InstanceId;
use crate::inuse::{self, Scan, Supervisor};
use crate::journal;
use crate::paths::AppPaths;
use crate::registry::{Entry, InstanceRecord, Liveness, Registry, Snapshot};
use crate::sign::{Keys, SigningKey};
use crate::worktree;

/// Looks at everything, changes nothing; entries are verified with the key from `keys`.
#[tracing::instrument(skip_all, fields(repo = %paths.repo_root().display()))]
pub fn diagnose(paths: &AppPaths, keys: &Keys, options: &Options) -> Result<Diagnosis> {
    let mut found = Diagnosis::default();
    if !paths.state_dir().is_dir() {
        if fs::symlink_metadata(paths.state_dir()).is_ok() {
            found.problems.push(Problem::StateDirNotDir {
                path: paths.state_dir().to_path_buf(),
            });
        }
        return Ok(found);
    }
    let key = signing_key(paths, keys, &mut found.problems)?;
    let snapshot = registry_snapshot(paths, keys, &mut found.problems)?;
    let repo = Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))?;
    let stale_after = options.settings.timing.stale_after;
    let scan = Scan::take();

    // Lock files a killed writer left on app's refs first: the fixes after them change refs.
    git::stale_ref_locks(paths, &scan, &mut found.problems);
    // Then interrupted operations: finishing them changes what the rest sees.
    let journaled = journal_problems(paths, key.as_ref(), &mut found.problems)?;
    for record in &snapshot.instances {
        if let Some(problem) = instance_problem(paths, &scan, &journaled, record, stale_after) {
            found.problems.push(problem);
        }
    }
    git::worktree_problems(
        paths,
        &repo,
        &snapshot,
        (&scan, &journaled),
        stale_after,
        &mut found.problems,
    )?;
    git::branch_problems(&repo, &snapshot, stale_after, &mut found.problems)?;
    coordination::problems(
        paths,
        key.as_ref(),
        &snapshot,
        &options.settings,
        &mut found,
    )?;
    files::stale_sockets(paths, &snapshot, stale_after, &mut found.problems);
    files::leftover_activity(paths, &snapshot, stale_after, &mut found.problems);
    files::temp_files(paths.state_dir(), paths, &mut found.problems);
    files::permissions(paths.state_dir(), paths, &mut found.problems);
    database::problems(paths, &snapshot, options, &mut found);
    Ok(found)
}

/// The signing key, or `None` with a problem when there is none to load.
fn signing_key(
    paths: &AppPaths,
    keys: &Keys,
    problems: &mut Vec<Problem>,
) -> Result<Option<SigningKey>> {
    if !keys.configured() && !paths.secret().exists() {
        problems.push(Problem::MissingSecret);
        return Ok(None);
    }
    keys.load()
}

/// The registry as it is; a registry that cannot be read is a problem, and the rest is
/// diagnosed as if it were empty: what is in use stays protected by the scan.
fn registry_snapshot(
    paths: &AppPaths,
    keys: &Keys,
    problems: &mut Vec<Problem>,
) -> Result<Snapshot> {
    match Registry::open_read_only(paths, keys)?.snapshot() {
        Ok(snapshot) => Ok(snapshot),
        Err(Error::Corrupt { path, source }) => {
            problems.push(Problem::CorruptFile {
                path,
                reason: source.to_string(),
            });
            Ok(Snapshot::default())
        }
        Err(err) => Err(err),
    }
}

/// Intents of interrupted operations whose writer is gone, and intents that cannot be trusted.
/// Returns the instances the journal names, whose state is the recovery's to settle.
fn journal_problems(
    paths: &AppPaths,
    key: Option<&SigningKey>,
    problems: &mut Vec<Problem>,
) -> Result<Vec<InstanceId>> {
    let mut journaled = Vec::new();
    for entry in journal::list(paths, key)? {
        match entry {
            Ok(intent) => {
                journaled.push(intent.instance.clone());
                if !intent.writer_alive() {
                    problems.push(Problem::HalfDone(intent));
                }
            }
            Err((path, reason)) => problems.push(Problem::UntrustedIntent { path, reason }),
        }
    }
    Ok(journaled)
}

/// The problem of one registry entry, if it has one: forged, or stale (then dead, in use, or
/// holding a worktree only its user can decide about).
fn instance_problem(
    paths: &AppPaths,
    scan: &Scan,
    journaled: &[InstanceId],
    entry: &Entry<InstanceRecord>,
    stale_after: Duration,
) -> Option<Problem> {
    let record = match entry {
        Entry::Forged { key, reason } => {
            return Some(unregistered_in_use(paths, scan, key).unwrap_or_else(|| {
                Problem::ForgedInstance {
                    key: key.clone(),
                    reason: reason.clone(),
                }
            }));
        }
        Entry::Valid(record) => record,
    };
    if journaled.contains(&record.id) {
        return None;
    }
    let Liveness::Stale(reason) = record.liveness(stale_after) else {
        return None;
    };
    Some(stale_instance(paths, scan, record, reason))
}

/// What a stale registration is: still in use (by its own processes or by anyone in its
/// worktree), kept for its user, or dead and reclaimable.
fn stale_instance(
    paths: &AppPaths,
    scan: &Scan,
    record: &InstanceRecord,
    reason: String,
) -> Problem {
    let own = |path: &&Path| *path == paths.worktree(&record.id);
    let users = record
        .worktree
        .as_deref()
        .filter(own)
        .map(|path| inuse::worktree_users(scan, path, &paths.git_worktree_admin(&record.id)))
        .unwrap_or_default();
    let needs_user = record
        .worktree
        .as_deref()
        .filter(|path| own(path) && path.exists())
        .and_then(|_| worktree::user_must_decide(paths, &record.id));
    match (inuse::instance_running(record), needs_user) {
        (Some(why), _) => Problem::InUse {
            id: record.id.to_string(),
            reason: format!("stale ({reason}) but {why}"),
        },
        _ if !users.is_empty() => Problem::InUse {
            id: record.id.to_string(),
            reason: format!(
                "stale ({reason}) but its worktree is in use by {}",
                inuse::describe(&users)
            ),
        },
        (None, Some(why)) => Problem::NeedsUser {
            id: record.id.to_string(),
            reason: format!("dead instance ({reason}) whose worktree is kept: {why}"),
        },
        (None, None) => Problem::DeadInstance {
            record: record.clone(),
            reason,
        },
    }
}

/// The problem of worktree `id` when a live process uses it although no valid registry entry
/// says so: re-adopted when its supervisor lives, else left alone while it is used.
pub(super) fn unregistered_in_use(paths: &AppPaths, scan: &Scan, id: &str) -> Option<Problem> {
    let path = paths.worktree(id);
    let admin = paths.git_worktree_admin(id);
    if !path.is_dir() {
        return None;
    }
    let users = inuse::worktree_users(scan, &path, &admin);
    if users.is_empty() {
        return None;
    }
    let described = inuse::describe(&users);
    Some(
        match Supervisor::load(&admin).filter(Supervisor::alive_elsewhere) {
            Some(supervisor) => Problem::Readopt {
                id: id.to_string(),
                users: described,
                supervisor: supervisor.process.pid,
            },
            None => Problem::InUse {
                id: id.to_string(),
                reason: format!(
                    "in use by {described}, not registered and without a live supervisor; left alone while it is used (stop those processes, then run 'app doctor --fix')"
                ),
            },
        },
    )
}
