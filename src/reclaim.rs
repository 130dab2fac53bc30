//! Crash recovery: finish or undo what a crashed operation left half-done, and take back the
//! worktree and registration of an instance nobody uses any more. `app run` and
//! `orchestrate --resume` run it before they start; `app doctor --fix` runs it for what it
//! finds.
//!
//! Invariants:
//! - Only an intent whose writer is provably gone is recovered, and only what that writer
//!   made: an undone start touches the registry entry it wrote (same pid and start time), the
//!   worktree whose supervisor record carries its nonce and the branch it created (or the
//!   lock file a kill during its creation left, once no live process holds it and it is
//!   [`reflock::STALE_AFTER`] old); a name another instance holds now is left alone.
//! - Every removal goes through [`worktree::remove`], which never takes a worktree in use
//!   and saves uncommitted work on `refs/app/rescue/<id>` unless told to discard it
//!   ([`Work::Discard`], `--force`). A branch is deleted only when app created it and it holds
//!   nothing beyond its base (or with `--force`).
//! - Nothing here diagnoses: callers decide what is dead, this module only makes it so.

use std::path::Path;

use git2::{Oid, Repository};

use crate::error::{GitContext, Result};
use crate::ids::InstanceId;
use crate::inuse::Supervisor;
use crate::journal::{self, Intent, Operation};
use crate::paths::AppPaths;
use crate::registry::{Entry, InstanceRecord, Registry, Snapshot};
use crate::sign::{Keys, SigningKey};
use crate::worktree::{self, BranchFate, Keep, Removal, Target, reflock};

/// What a reclaim does with the work it finds: uncommitted changes in a worktree, commits on
/// a branch beyond its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    /// Save uncommitted changes on `refs/app/rescue/<id>`, keep a branch with commits.
    Save,
    /// `--force`: discard both.
    Discard,
}

impl Work {
    /// How a reclaim removes a worktree.
    fn keep(self) -> Keep {
        match self {
            Work::Save => Keep::Rescue,
            Work::Discard => Keep::Discard,
        }
    }

    /// How an interrupted operation's worktree is removed: its intent is written after its
    /// rescue, so what that saved is safe, and files missing now are the half-done removal's,
    /// not work.
    fn keep_undo(self) -> Keep {
        match self {
            Work::Save => Keep::RescueUndo,
            Work::Discard => Keep::Discard,
        }
    }
}

/// Recovers intents left by crashed operations, quietly; `app run` calls this before it starts.
/// Cheap when the journal is empty (one directory read).
pub(crate) fn recover_journal(paths: &AppPaths, keys: &Keys) -> Result<()> {
    let key = keys.load()?;
    for intent in journal::list(paths, key.as_ref())?.into_iter().flatten() {
        if !intent.writer_alive() {
            match recover(paths, keys, Work::Save, &intent) {
                Ok(done) => {
                    tracing::info!(instance = %intent.instance, done, "recovered an interrupted operation")
                }
                Err(err) => {
                    tracing::warn!(instance = %intent.instance, %err, "recovering an interrupted operation failed; run 'app doctor --fix'")
                }
            }
        }
    }
    Ok(())
}

/// Finishes or undoes an interrupted operation. Only an intent whose writer is provably gone is
/// recovered, and only what that writer made; the intent is ended once it is.
pub(crate) fn recover(
    paths: &AppPaths,
    keys: &Keys,
    work: Work,
    intent: &Intent,
) -> Result<String> {
    if intent.writer_alive() {
        return Ok("its writer still works; left alone".into());
    }
    let done = match intent.operation {
        Operation::Stop => reclaim(
            paths,
            keys,
            work,
            &intent.instance,
            intent.worktree.as_deref(),
            intent.branch.as_deref(),
        )?,
        Operation::Start => undo_start(paths, keys, work, intent)?,
        Operation::Remove => finish_removal(paths, keys, work, intent)?,
    };
    journal::end(paths, intent)?;
    Ok(done)
}

/// Finishes an interrupted removal of app's own worktree of the intent's instance.
fn finish_removal(paths: &AppPaths, keys: &Keys, work: Work, intent: &Intent) -> Result<String> {
    let path = paths.worktree(&intent.instance);
    if intent.worktree.as_deref() != Some(path.as_path()) {
        return Ok("nothing of app's to finish".into());
    }
    let repo = open_repo(paths)?;
    let key = keys.load_or_create()?;
    let target = Target {
        id: &intent.instance,
        branch: None,
    };
    let removal = worktree::remove(&repo, paths, &key, target, work.keep_undo())?;
    Ok(describe_removal(&path, removal))
}

/// Opens the repository app works on.
pub(crate) fn open_repo(paths: &AppPaths) -> Result<Repository> {
    Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))
}

/// The account of a guarded removal of the worktree at `path`.
fn describe_removal(path: &Path, removal: Removal) -> String {
    match removal {
        Removal::Removed {
            rescued_to: Some(name),
        } => format!(
            "saved its uncommitted work on {name} (see it with 'git show --stat {name}', restore it with 'git checkout {name} -- .' in a worktree of your choice); removed {}",
            path.display()
        ),
        Removal::Removed { rescued_to: None } => format!("removed {}", path.display()),
        Removal::Absent => "its worktree was already gone".into(),
        Removal::Kept { because, .. } => format!("kept {}: {because}", path.display()),
    }
}

/// Whether `record` is the registration the writer of `intent` made (same pid and start time).
fn written_by(record: &InstanceRecord, intent: &Intent) -> bool {
    record.pid == intent.pid && record.start_time == intent.start_time
}

/// Undoes an interrupted start, touching only what that start made: the registry entry it
/// wrote (same pid and start time), the worktree whose supervisor record carries its nonce
/// (through the guarded removal, so work found there is saved), and the branch it created
/// while nothing else holds it. A name that another instance holds now is not touched.
fn undo_start(paths: &AppPaths, keys: &Keys, work: Work, intent: &Intent) -> Result<String> {
    let repo = open_repo(paths)?;
    let id = &intent.instance;
    let snapshot = Registry::open_read_only(paths, keys)?
        .snapshot()
        .unwrap_or_default();
    if let Some(record) = snapshot.instance(id)
        && !written_by(record, intent)
    {
        return Ok(format!(
            "instance {id} belongs to pid {} now; nothing of the interrupted start is touched",
            record.pid
        ));
    }
    let mut done = Vec::new();
    undo_branch_lock(&repo, intent, &mut done)?;
    let worktree_gone = undo_worktree(paths, keys, &repo, work, intent, &mut done)?;
    let branch_gone = undo_branch(&repo, &snapshot, intent, worktree_gone, &mut done)?;
    Registry::open_for_write(paths, keys)?.update(|tables| {
        if tables.instance(id).is_some_and(|r| written_by(&r, intent)) {
            tables.remove_instance(id);
        }
        if let Some(branch) = &intent.branch
            && branch_gone
            && tables.branch(branch).is_some_and(|b| &b.instance == id)
        {
            tables.remove_branch(branch);
        }
        Ok(())
    })?;
    done.push("unregistered".into());
    Ok(done.join("; "))
}

/// Removes the lock file a start killed while it created its branch left, which would block
/// the branch for good (the next start of the same name too), unless the branch was made.
fn undo_branch_lock(repo: &Repository, intent: &Intent, done: &mut Vec<String>) -> Result<()> {
    let Some(branch) = intent.branch.as_deref().filter(|_| intent.create_branch) else {
        return Ok(());
    };
    if worktree::branch_tip(repo, branch)?.is_some() {
        return Ok(());
    }
    let lock = reflock::lock_file(repo, &format!("refs/heads/{branch}"));
    if reflock::remove_once_left(&lock)? {
        done.push(format!(
            "removed {}, left by the creation of branch {branch}",
            lock.display()
        ));
    }
    Ok(())
}

/// Removes the worktree an interrupted start made (its supervisor record carries the start's
/// nonce), or git's record of it when its directory is gone. Returns whether it is gone.
fn undo_worktree(
    paths: &AppPaths,
    keys: &Keys,
    repo: &Repository,
    work: Work,
    intent: &Intent,
    done: &mut Vec<String>,
) -> Result<bool> {
    let id = &intent.instance;
    let path = paths.worktree(id);
    let admin = paths.git_worktree_admin(id);
    let made_by_writer = Supervisor::load(&admin).is_some_and(|s| s.created_by == intent.nonce);
    let gone = !path.exists();
    if !intent.reuse && intent.worktree.as_deref() == Some(path.as_path()) && made_by_writer {
        let key = keys.load_or_create()?;
        let target = Target { id, branch: None };
        let removal = worktree::remove(repo, paths, &key, target, work.keep_undo())?;
        let gone = matches!(removal, Removal::Removed { .. } | Removal::Absent);
        done.push(describe_removal(&path, removal));
        return Ok(gone);
    }
    if gone {
        worktree::forget_missing(paths, id)?;
    }
    Ok(gone)
}

/// Deletes the branch an interrupted start created, once its worktree is gone, while no other
/// instance holds it, nothing has it checked out and it holds nothing beyond its base. Returns
/// whether no branch of that start is left.
fn undo_branch(
    repo: &Repository,
    snapshot: &Snapshot,
    intent: &Intent,
    worktree_gone: bool,
    done: &mut Vec<String>,
) -> Result<bool> {
    if !intent.create_branch {
        return Ok(true);
    }
    let base = intent.base.as_deref().and_then(|b| b.parse::<Oid>().ok());
    let branch_is_others = |branch: &str| {
        snapshot.branches.iter().any(|entry| match entry {
            Entry::Valid(b) => b.branch == branch && b.instance != intent.instance,
            Entry::Forged { .. } => false,
        })
    };
    if worktree_gone
        && let (Some(branch), Some(base)) = (&intent.branch, base)
        && !branch_is_others(branch)
        && worktree::checked_out_in(repo, branch)?.is_none()
    {
        match worktree::delete_branch_if_empty(repo, branch, base)? {
            BranchFate::Deleted => {
                done.push(format!("deleted branch {branch}"));
                return Ok(true);
            }
            BranchFate::Gone => return Ok(true),
            BranchFate::Kept(_) => {}
        }
    }
    Ok(false)
}

/// What reclaims work with: the repository, the registry opened for writing and the signing
/// key, opened once for as many reclaims as the caller makes in a row (doctor reclaims a
/// worktree per dead instance). Each reclaim still reads what it acts on again: the worktree
/// on disk, the registry's branch record, and the registry under its lock when it updates it.
pub(crate) struct Reclaimer<'a> {
    paths: &'a AppPaths,
    repo: Repository,
    registry: Registry,
    key: SigningKey,
}

impl<'a> Reclaimer<'a> {
    /// Opens the repository of `paths`, its registry for writing and the signing key from
    /// `keys` (creating `.app/` and the key when missing, as any write does).
    pub(crate) fn open(paths: &'a AppPaths, keys: &Keys) -> Result<Reclaimer<'a>> {
        Ok(Reclaimer {
            paths,
            repo: open_repo(paths)?,
            registry: Registry::open_for_write(paths, keys)?,
            key: keys.load_or_create()?,
        })
    }

    /// The registry, opened for writing.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Takes back the worktree and registration of instance `id`, which nobody uses any
    /// more: the worktree goes through the guarded removal (work saved on a rescue ref, or
    /// discarded with [`Work::Discard`]; kept when in use or when only its user can decide),
    /// the branch is deleted only when it holds nothing beyond its base (or with
    /// [`Work::Discard`]), then it is unregistered. A kept worktree keeps its registration's
    /// branch entry too.
    pub(crate) fn reclaim(
        &self,
        work: Work,
        id: &InstanceId,
        path: Option<&Path>,
        branch: Option<&str>,
    ) -> Result<String> {
        let (paths, repo) = (self.paths, &self.repo);
        let mut done = Vec::new();
        if let Some(path) = path.filter(|p| *p == paths.worktree(id)) {
            let target = Target { id, branch: None };
            let removal = worktree::remove(repo, paths, &self.key, target, work.keep())?;
            let kept = matches!(removal, Removal::Kept { .. });
            done.push(describe_removal(path, removal));
            if kept {
                return Ok(done.join("; "));
            }
        }
        let snapshot = self.registry.snapshot()?;
        let forget_branch = match branch {
            Some(branch) => settle_branch(repo, &snapshot, work, branch, &mut done)?,
            None => false,
        };
        self.registry.update(|tables| {
            tables.remove_instance(id);
            if forget_branch && let Some(branch) = branch {
                tables.remove_branch(branch);
            }
            Ok(())
        })?;
        done.push("unregistered".into());
        Ok(done.join("; "))
    }
}

/// [`Reclaimer::reclaim`] for one instance (the journal recovery, `orchestrate --resume`).
pub(crate) fn reclaim(
    paths: &AppPaths,
    keys: &Keys,
    work: Work,
    id: &InstanceId,
    path: Option<&Path>,
    branch: Option<&str>,
) -> Result<String> {
    Reclaimer::open(paths, keys)?.reclaim(work, id, path, branch)
}

/// Decides the fate of a reclaimed instance's `branch` (unless something has it checked out):
/// deleted when app created it and it holds nothing beyond its base (or with
/// [`Work::Discard`]), else kept. Returns whether its registry entry goes too.
fn settle_branch(
    repo: &Repository,
    snapshot: &Snapshot,
    work: Work,
    branch: &str,
    done: &mut Vec<String>,
) -> Result<bool> {
    let record = snapshot.branches.iter().find_map(|entry| match entry {
        Entry::Valid(r) if r.branch == branch => Some(r.clone()),
        _ => None,
    });
    if worktree::checked_out_in(repo, branch)?.is_some() {
        return Ok(false);
    }
    let created = record.as_ref().is_some_and(|r| r.created_branch);
    let base = record.as_ref().and_then(|r| r.base.parse::<Oid>().ok());
    let fate = match (created, base) {
        (true, _) if work == Work::Discard => match worktree::branch_tip(repo, branch)? {
            Some(_) => {
                worktree::delete_branch(repo, branch)?;
                BranchFate::Deleted
            }
            None => BranchFate::Gone,
        },
        (true, Some(base)) => worktree::delete_branch_if_empty(repo, branch, base)?,
        _ => match worktree::branch_tip(repo, branch)? {
            Some(_) => BranchFate::Kept("app did not create it".into()),
            None => BranchFate::Gone,
        },
    };
    Ok(match fate {
        BranchFate::Gone => true,
        BranchFate::Deleted => {
            done.push(format!("deleted branch {branch}"));
            true
        }
        BranchFate::Kept(reason) => {
            done.push(format!("kept branch {branch} ({reason})"));
            // Its entry keeps the base a later cleanup compares with.
            !created
        }
    })
}
