//! What a crash can leave in git: worktrees under `.app/worktrees/` nobody owns, git's records
//! of app's worktrees whose directory is gone, lock files of app's refs nobody holds, and app
//! branches that hold nothing beyond their base. Others' worktrees and branches are not ours to
//! judge.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use git2::{BranchType, Oid, Repository};

use super::diagnose::unregistered_in_use;
use super::problem::Problem;
use crate::error::{GitContext, Result};
use crate::ids::InstanceId;
use crate::inuse::{self, Scan};
use crate::paths::AppPaths;
use crate::registry::{Entry, Liveness, Snapshot};
use crate::worktree::{self, reflock::RefLock};

/// Worktrees under `.app/worktrees/` that no registry entry or intent owns, then git's records
/// of app's worktrees whose directory is gone.
pub(super) fn worktree_problems(
    paths: &AppPaths,
    repo: &Repository,
    snapshot: &Snapshot,
    (scan, journaled): (&Scan, &[InstanceId]),
    stale_after: Duration,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    orphan_worktrees(paths, repo, snapshot, (scan, journaled), problems);
    dangling_metadata(paths, repo, snapshot, journaled, stale_after, problems)
}

/// Directories under `.app/worktrees/` that belong to no registry entry and no intent.
fn orphan_worktrees(
    paths: &AppPaths,
    repo: &Repository,
    snapshot: &Snapshot,
    (scan, journaled): (&Scan, &[InstanceId]),
    problems: &mut Vec<Problem>,
) {
    // Forged entries were judged with their worktree already.
    let owned = |id: &str, path: &Path| {
        snapshot.instances.iter().any(|entry| match entry {
            Entry::Valid(r) => r.worktree.as_deref() == Some(path),
            Entry::Forged { key, .. } => key == id,
        })
    };
    let Ok(entries) = fs::read_dir(paths.worktrees_dir()) else {
        return;
    };
    // A directory there is named after the instance app made it for (a hand-made one with
    // another name is judged as ever: its name is only compared and joined to paths).
    let mut names: Vec<InstanceId> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| InstanceId::stored(e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    for id in names {
        let path = paths.worktree(&id);
        if owned(&id, &path) || journaled.contains(&id) {
            continue;
        }
        if let Some(problem) = unregistered_in_use(paths, scan, &id) {
            problems.push(problem);
            continue;
        }
        problems.push(match Repository::open(&path) {
            Ok(_) if repo.find_worktree(&id).is_ok() => {
                match worktree::user_must_decide(paths, &id) {
                    None => Problem::OrphanWorktree { id, path },
                    Some(reason) => Problem::NeedsUser {
                        id: id.into_string(),
                        reason,
                    },
                }
            }
            // A start killed before it wrote the `.git` (or while it wrote it: only a part of
            // it is there), or a removal killed after it removed it (it goes last), leaves an
            // empty directory, and a lost or untrusted intent
            // leaves nobody to finish it: nothing in it to lose, and the guarded removal takes
            // nothing but an empty directory nobody uses.
            _ if is_empty_dir(&path)
                || worktree::only_a_partial_dot_git(&path, &paths.git_worktree_admin(&id)) =>
            {
                Problem::OrphanWorktree { id, path }
            }
            Ok(_) => Problem::Unreadable {
                path,
                reason: format!("git has no worktree named {id}"),
            },
            Err(err) => Problem::Unreadable {
                path,
                reason: err.message().to_string(),
            },
        });
    }
}

/// Whether `dir` is a directory with nothing in it.
fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

/// git's records of app's worktrees whose directory is gone, unless an intent or a live (or
/// still used) instance owns them; others' records are not ours to judge.
fn dangling_metadata(
    paths: &AppPaths,
    repo: &Repository,
    snapshot: &Snapshot,
    journaled: &[InstanceId],
    stale_after: Duration,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let worktrees = repo
        .worktrees()
        .git_context(|| "listing worktrees".into())?;
    for name in worktrees.iter().flatten().flatten() {
        let admin = repo.path().join("worktrees").join(name);
        let Some(path) = fs::read_to_string(admin.join("gitdir"))
            .ok()
            .and_then(|gitdir| Path::new(gitdir.trim()).parent().map(Path::to_path_buf))
        else {
            continue;
        };
        if path == paths.worktree(name)
            && !path.exists()
            && !journaled.iter().any(|id| id == name)
            && snapshot.instance(name).is_none_or(|r| {
                inuse::instance_running(r).is_none() && r.liveness(stale_after) != Liveness::Live
            })
        {
            problems.push(Problem::DanglingMetadata {
                name: InstanceId::stored(name.to_string()),
                admin,
            });
        }
    }
    Ok(())
}

/// Branch entries that do not verify or describe a branch that is gone, and app branches with
/// no live owner that hold nothing beyond their base.
pub(super) fn branch_problems(
    repo: &Repository,
    snapshot: &Snapshot,
    stale_after: Duration,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let live_owner = |id: &str| {
        snapshot.instance(id).is_some_and(|r| {
            r.liveness(stale_after) == Liveness::Live || inuse::instance_running(r).is_some()
        })
    };
    let mut candidates: Vec<String> = Vec::new();
    for entry in &snapshot.branches {
        match entry {
            Entry::Forged { key, reason } => problems.push(Problem::StaleBranchEntry {
                branch: key.clone(),
                reason: format!("entry does not verify: {reason}"),
            }),
            Entry::Valid(record) => {
                if repo.find_branch(&record.branch, BranchType::Local).is_err() {
                    if !live_owner(&record.instance) {
                        problems.push(Problem::StaleBranchEntry {
                            branch: record.branch.clone(),
                            reason: "the branch it describes is gone".into(),
                        });
                    }
                } else if record.created_branch {
                    candidates.push(record.branch.clone());
                }
            }
        }
    }
    instance_branches(repo, &mut candidates)?;
    candidates.sort();
    for name in candidates {
        let record = snapshot.branches.iter().find_map(|entry| match entry {
            Entry::Valid(record) if record.branch == name => Some(record),
            _ => None,
        });
        if record.is_some_and(|r| live_owner(&r.instance))
            || worktree::checked_out_in(repo, &name)?.is_some()
        {
            continue;
        }
        let base = record.and_then(|r| r.base.parse::<Oid>().ok());
        if holds_nothing_new(repo, &name, base)? {
            problems.push(Problem::IdleBranch { branch: name });
        }
    }
    Ok(())
}

/// Adds the local `app/<id>` branches to `candidates`: an instance's own branch.
/// `app/<run>/<task>` and deeper belong to orchestrated runs, whose branches are their results
/// and are never idle.
fn instance_branches(repo: &Repository, candidates: &mut Vec<String>) -> Result<()> {
    let branches = repo
        .branches(Some(BranchType::Local))
        .git_context(|| "listing branches".into())?;
    for (branch, _) in branches.flatten() {
        if let Ok(Some(name)) = branch.name()
            && name
                .strip_prefix("app/")
                .is_some_and(|id| !id.contains('/'))
            && !candidates.iter().any(|c| c == name)
        {
            candidates.push(name.to_string());
        }
    }
    Ok(())
}

/// Whether branch `name` holds no commit beyond `base` (when unknown: beyond any other local
/// branch).
fn holds_nothing_new(repo: &Repository, name: &str, base: Option<Oid>) -> Result<bool> {
    let Some(tip) = worktree::branch_tip(repo, name)? else {
        return Ok(false);
    };
    if let Some(base) = base {
        return Ok(worktree::commits_beyond(repo, tip, base)? == 0);
    }
    let branches = repo
        .branches(Some(BranchType::Local))
        .git_context(|| "listing branches".into())?;
    for (branch, _) in branches.flatten() {
        if branch.name().ok().flatten() == Some(name) {
            continue;
        }
        if let Some(other) = branch.get().target()
            && worktree::commits_beyond(repo, tip, other)? == 0
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `*.lock` files of app's refs (`refs/heads/app/`, `refs/app/`) that a killed writer left
/// (see [`worktree::reflock`]): they block their ref for good. Young ones are left for a writer that may
/// be about to rename them ([`await_young_ref_locks`] lets them age).
pub(super) fn stale_ref_locks(paths: &AppPaths, scan: &Scan, problems: &mut Vec<Problem>) {
    for path in ref_locks(paths) {
        if RefLock::judge(&path, scan) == RefLock::Left {
            problems.push(Problem::StaleRefLock { path });
        }
    }
}

/// Waits until every lock file of app's refs that no live process holds is old enough for
/// [`stale_ref_locks`] to find, about a second at most: a writer killed a moment ago leaves
/// one, and the reclaims that follow need its ref. Returns at once when there is none.
pub(super) fn await_young_ref_locks(paths: &AppPaths) {
    let locks = ref_locks(paths);
    if locks.is_empty() {
        return;
    }
    let scan = Scan::take();
    let wait = locks
        .iter()
        .filter_map(|path| match RefLock::judge(path, &scan) {
            RefLock::Young(rest) => Some(rest),
            _ => None,
        })
        .max();
    if let Some(wait) = wait {
        tracing::debug!(
            ?wait,
            "letting the lock files a killed writer left on app's refs age"
        );
        std::thread::sleep(wait + Duration::from_millis(50));
    }
}

/// The `*.lock` files of app's refs.
fn ref_locks(paths: &AppPaths) -> Vec<PathBuf> {
    let refs = paths.git_common_dir().join("refs");
    let mut dirs = vec![refs.join("heads/app"), refs.join("app")];
    let mut found = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "lock") {
                found.push(path);
            }
        }
    }
    found
}
