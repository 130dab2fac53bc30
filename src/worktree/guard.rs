//! The one guarded way to remove a worktree. Exit cleanup, `app ci`, start rollback, journal
//! recovery and doctor all come here; nothing else deletes a worktree's files or git's
//! records of it.
//!
//! Invariants, in the order [`remove`] checks them:
//! - Only `.app/worktrees/<id>` is ever removed, and only while git's admin directory of it
//!   (`.git/worktrees/<id>`) points back at it.
//! - In use means removed never: a live process with its cwd, root, executable or a file
//!   inside, a process started for it, or its recorded supervisor alive ([`crate::inuse`]).
//!   The registry is not asked: it can be lost, this cannot.
//! - A worktree locked with `git worktree lock`, or holding a nested repository or an
//!   initialised submodule, needs its user: it is kept, with the command that resolves it.
//! - Everything on disk that differs from HEAD is saved on `refs/app/rescue/<id>` first
//!   ([`super::changes`]), or the worktree is kept ([`Keep::IfClean`]); only `--force`
//!   discards.
//! - An intent is written before the first destructive step; the working files go before
//!   git's records of them, so a crash in between leaves a record whose directory is gone,
//!   which [`forget_missing`] (doctor) finishes.

use std::fs;
use std::ops::ControlFlow;
use std::path::Path;

use git2::Repository;

use super::changes::{self, Changes};
use crate::error::{Error, Result};
use crate::ids::InstanceId;
use crate::inuse::{self, Scan};
use crate::journal::{self, Intent, Operation};
use crate::paths::AppPaths;
use crate::sign::SigningKey;

/// How old the process scan of the first in-use check may be (doctor reclaims many worktrees
/// in a row); the check right before the files go is always fresh.
const FIRST_LOOK: std::time::Duration = std::time::Duration::from_secs(1);

/// What may happen to what the worktree holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Remove only when it holds nothing beyond its HEAD (on the expected branch): the end of
    /// an instance, whose branch carries its commits.
    IfClean,
    /// Save everything that differs on a rescue ref, then remove (doctor, `app ci`, journal
    /// recovery).
    Rescue,
    /// Like `Rescue`, for undoing a start whose checkout may be half done: files missing from
    /// the disk are not work.
    RescueUndo,
    /// `--force`: discard what it holds (still never while it is in use).
    Discard,
}

/// The worktree to remove.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Instance id: the directory and git's worktree name.
    pub id: &'a InstanceId,
    /// With [`Keep::IfClean`]: the branch its HEAD must be on (elsewhere counts as work).
    pub branch: Option<&'a str>,
}

/// How a guarded removal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Removed; with the rescue ref when something was saved.
    Removed {
        /// `refs/app/rescue/<id>[-n]`, when work was saved.
        rescued_to: Option<String>,
    },
    /// There was no worktree directory (git's dangling record of it, if any, is gone now).
    Absent,
    /// Kept; the text says why.
    Kept {
        /// Why, with what to do about it where that is the user's to do.
        because: String,
        /// Whether only the user can resolve it (locked, nested repository, unreadable).
        needs_user: bool,
    },
}

impl Removal {
    fn kept(because: impl Into<String>) -> Removal {
        Removal::Kept {
            because: because.into(),
            needs_user: false,
        }
    }

    fn needs_user(because: impl Into<String>) -> Removal {
        Removal::Kept {
            because: because.into(),
            needs_user: true,
        }
    }
}

/// Removes worktree `target.id` when that loses nothing and nobody uses it (see the module's
/// invariants). `key` signs the intent.
pub fn remove(
    repo: &Repository,
    paths: &AppPaths,
    key: &SigningKey,
    target: Target<'_>,
    keep: Keep,
) -> Result<Removal> {
    let path = paths.worktree(target.id);
    let admin = paths.git_worktree_admin(target.id);
    let changes = match what_it_holds(repo, paths, target.id, &path, &admin)? {
        ControlFlow::Continue(changes) => changes,
        ControlFlow::Break(removal) => return Ok(removal),
    };
    let rescued_to = match save_work(repo, target, &path, changes, keep)? {
        ControlFlow::Continue(rescued_to) => rescued_to,
        ControlFlow::Break(removal) => return Ok(removal),
    };
    crate::fault::point("remove.rescued");
    remove_files(paths, key, target.id, &path, &admin, rescued_to)
}

/// The checks before anything is saved: gone, in use, empty, the user's to decide, or
/// unreadable ends the removal here; otherwise what the worktree holds.
fn what_it_holds(
    repo: &Repository,
    paths: &AppPaths,
    id: &InstanceId,
    path: &Path,
    admin: &Path,
) -> Result<ControlFlow<Removal, Changes>> {
    if fs::symlink_metadata(path).is_err() {
        forget_missing(paths, id)?;
        return Ok(ControlFlow::Break(Removal::Absent));
    }
    // A first look (at most a second old) decides whether to look further; a fresh one
    // decides the removal below.
    let users = inuse::worktree_users(&Scan::recent(FIRST_LOOK), path, admin);
    if !users.is_empty() {
        return Ok(ControlFlow::Break(Removal::kept(format!(
            "in use by {}",
            inuse::describe(&users)
        ))));
    }
    // A start that crashed before its checkout began leaves an empty directory, or one with
    // only the beginning of the `.git` file it was writing: nothing to lose (rmdir refuses
    // anything else).
    if only_a_partial_dot_git(path, admin) {
        let _ = fs::remove_file(path.join(".git"));
    }
    if fs::remove_dir(path).is_ok() {
        forget_missing(paths, id)?;
        return Ok(ControlFlow::Break(Removal::Absent));
    }
    if let Some(because) = user_must_decide(paths, id) {
        return Ok(ControlFlow::Break(Removal::needs_user(because)));
    }
    let changes = match Changes::read(repo, path) {
        Ok(changes) => changes,
        Err(err) => {
            return Ok(ControlFlow::Break(Removal::needs_user(format!(
                "cannot read what it holds ({err}); look at it and move it out of .app/worktrees/ yourself"
            ))));
        }
    };
    if let Some(nested) = changes.nested.first() {
        let verdict = Verdict::nested(path, nested);
        verdict.save(admin)?;
        return Ok(ControlFlow::Break(Removal::needs_user(verdict.reason)));
    }
    Ok(ControlFlow::Continue(changes))
}

/// What `keep` asks for the work in `changes`: kept when unsaved work must stay, saved on a
/// rescue ref (its name), or nothing to save or discarded (`None`).
fn save_work(
    repo: &Repository,
    target: Target<'_>,
    path: &Path,
    changes: Changes,
    keep: Keep,
) -> Result<ControlFlow<Removal, Option<String>>> {
    let changes = if keep == Keep::RescueUndo {
        changes.without_deletions()
    } else {
        changes
    };
    let rescued_to = match keep {
        Keep::IfClean => {
            if let Some(reason) = unsaved_beyond_branch(repo, &changes, target.branch)? {
                return Ok(ControlFlow::Break(Removal::kept(reason)));
            }
            None
        }
        Keep::Rescue | Keep::RescueUndo => match work_reason(repo, &changes)? {
            Some(reason) => Some(changes::rescue(repo, target.id, path, &changes, &reason)?.0),
            None => None,
        },
        Keep::Discard => None,
    };
    Ok(ControlFlow::Continue(rescued_to))
}

/// The destructive part, under an intent: asks once more whether anyone uses the worktree,
/// then removes its files and git's records of it.
fn remove_files(
    paths: &AppPaths,
    key: &SigningKey,
    id: &InstanceId,
    path: &Path,
    admin: &Path,
    rescued_to: Option<String>,
) -> Result<Removal> {
    let mut intent = Intent::new(Operation::Remove, id);
    intent.worktree = Some(path.to_path_buf());
    journal::begin(paths, key, &intent)?;
    // Asked again right before the files go: whoever came in meanwhile keeps them.
    let users = inuse::worktree_users(&Scan::take(), path, admin);
    if !users.is_empty() {
        journal::end(paths, &intent)?;
        return Ok(Removal::kept(format!(
            "in use by {}",
            inuse::describe(&users)
        )));
    }
    if let Err((failed, err)) = remove_tree(path) {
        // Nothing half-done for recovery to finish: what it held is saved; the rest stays
        // until the user sees to the path that resisted.
        journal::end(paths, &intent)?;
        let verdict = Verdict::new(
            format!(
                "removing it failed at {} ({err}){}; see to that path, then run 'app doctor --fix'",
                failed.display(),
                rescued_to
                    .as_deref()
                    .map(|r| format!(", after its work was saved on {r}"))
                    .unwrap_or_default()
            ),
            &failed,
        );
        verdict.save(admin)?;
        return Ok(Removal::needs_user(verdict.reason));
    }
    crate::fault::point("remove.files-removed");
    forget_missing(paths, id)?;
    journal::end(paths, &intent)?;
    Ok(Removal::Removed { rescued_to })
}

/// Whether the worktree directory `path` holds nothing but part of the `.git` file a start
/// writes (`gitdir: <admin>`, cut short by a kill while it was written): nothing there to
/// lose. A whole `.git`, or anything beside it, is not this.
pub fn only_a_partial_dot_git(path: &Path, admin: &Path) -> bool {
    let Ok(entries) = fs::read_dir(path) else {
        return false;
    };
    let names: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    if names != [".git"] {
        return false;
    }
    let dot_git = path.join(".git");
    if !fs::symlink_metadata(&dot_git).is_ok_and(|meta| meta.is_file()) {
        return false;
    }
    let whole = format!("gitdir: {}\n", admin.display());
    fs::read(&dot_git)
        .is_ok_and(|start| start.len() < whole.len() && whole.as_bytes().starts_with(&start))
}

/// Why only its user can decide what becomes of worktree `id`, if so: git does not record it
/// as this worktree, it is locked with `git worktree lock`, it has initialised submodules
/// (their repositories live in git's record of the worktree), or an earlier look found a
/// repository of its own inside and nothing has moved there since ([`Verdict`]). The text
/// says what to do. Cheap: a few small reads, no walk of the worktree.
pub fn user_must_decide(paths: &AppPaths, id: &InstanceId) -> Option<String> {
    let path = paths.worktree(id);
    let admin = paths.git_worktree_admin(id);
    if !points_back(&admin, &path) {
        return Some(format!(
            "{} is not a worktree git knows as {id}; look at it and move it out of .app/worktrees/ yourself",
            path.display()
        ));
    }
    if let Some(reason) = git_lock(&admin) {
        return Some(format!(
            "locked with 'git worktree lock' ({reason}); run 'git worktree unlock {}' to let app reclaim it",
            path.display()
        ));
    }
    if let Some(point) = mounts_inside(&path).first() {
        return Some(format!(
            "a file system is mounted inside it at {0}; run 'umount {0}', then 'app doctor --fix'",
            point.display()
        ));
    }
    if admin.join("modules").is_dir() {
        return Some(format!(
            "it has initialised submodules, whose repositories would go with it; run 'git -C {} submodule deinit --all' once their work is pushed, then 'app doctor --fix'",
            path.display()
        ));
    }
    Verdict::load(&admin).map(|verdict| verdict.reason)
}

/// Something only the user can resolve, found inside a worktree (a repository of its own, a
/// path the removal could not remove), remembered in git's record of the worktree (`app-kept`)
/// so a later diagnosis says so without walking the worktree again and nothing is retried (or
/// rescued again) until it changes. It holds while the path it is about exists unchanged
/// (same device, inode, mode and mtime): moving it out, `chmod`, `umount` end it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Verdict {
    reason: String,
    watch: std::path::PathBuf,
    fingerprint: (u64, u64, u32, i128),
}

impl Verdict {
    fn file(admin: &Path) -> std::path::PathBuf {
        admin.join("app-kept")
    }

    fn fingerprint(path: &Path) -> Option<(u64, u64, u32, i128)> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::symlink_metadata(path).ok()?;
        let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        Some((meta.dev(), meta.ino(), meta.mode(), mtime))
    }

    fn new(reason: String, watch: &Path) -> Verdict {
        Verdict {
            reason,
            fingerprint: Verdict::fingerprint(watch).unwrap_or_default(),
            watch: watch.to_path_buf(),
        }
    }

    fn nested(worktree: &Path, nested: &Path) -> Verdict {
        let abs = worktree.join(nested);
        Verdict::new(
            format!(
                "it holds a repository of its own at {} (its history would go with the worktree); move it out (mv {} <somewhere>), then run 'app doctor --fix'",
                nested.display(),
                abs.display(),
            ),
            &abs,
        )
    }

    fn load(admin: &Path) -> Option<Verdict> {
        let verdict: Verdict =
            serde_json::from_slice(&fs::read(Verdict::file(admin)).ok()?).ok()?;
        (Verdict::fingerprint(&verdict.watch) == Some(verdict.fingerprint)).then_some(verdict)
    }

    fn save(&self, admin: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).expect("verdicts serialize");
        crate::state::write_atomic(&Verdict::file(admin), &bytes)
    }
}

/// Mount points inside `dir` (from `/proc/self/mountinfo`): removing the worktree would go
/// into another file system, or into a directory bound there from elsewhere.
fn mounts_inside(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| std::path::PathBuf::from(unescape_mount(field)))
        .filter(|point| point.starts_with(dir) && point != dir)
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(field: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(Ok(n)) = field.get(i + 1..i + 4).map(|o| u8::from_str_radix(o, 8))
        {
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Removes the worktree's files, never following a symlink, with its `.git` last: a removal
/// that fails half-way leaves a worktree git and app can still open. Returns the path that
/// could not be removed, with why.
fn remove_tree(root: &Path) -> std::result::Result<(), (std::path::PathBuf, std::io::Error)> {
    fn children(
        dir: &Path,
        root: bool,
    ) -> std::result::Result<(), (std::path::PathBuf, std::io::Error)> {
        let at = |err| (dir.to_path_buf(), err);
        let mut git = None;
        for entry in fs::read_dir(dir).map_err(at)? {
            let entry = entry.map_err(at)?;
            let path = entry.path();
            if root && entry.file_name() == ".git" {
                git = Some(path);
                continue;
            }
            let removed = if entry.file_type().map_err(at)?.is_dir() {
                // std's removal works relative to directory fds and never follows a symlink;
                // when it fails, the walk below finds the path that resisted.
                fs::remove_dir_all(&path).or_else(|_| {
                    children(&path, false)?;
                    fs::remove_dir(&path).map_err(|err| (path.clone(), err))
                })
            } else {
                fs::remove_file(&path).map_err(|err| (path.clone(), err))
            };
            match removed {
                Err((failed, err)) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err((failed, err));
                }
                _ => {}
            }
        }
        if let Some(git) = git {
            fs::remove_file(&git).map_err(|err| (git, err))?;
        }
        Ok(())
    }
    match children(root, true) {
        Err((_, err)) if err.kind() == std::io::ErrorKind::NotFound => {}
        other => other?,
    }
    match fs::remove_dir(root) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err((root.to_path_buf(), err)),
        _ => Ok(()),
    }
}

/// Removes git's record of worktree `id` when its directory (`.app/worktrees/<id>`) is gone,
/// and only then. Records of worktrees elsewhere are not app's to judge.
pub fn forget_missing(paths: &AppPaths, id: &InstanceId) -> Result<bool> {
    let path = paths.worktree(id);
    let admin = paths.git_worktree_admin(id);
    if fs::symlink_metadata(&path).is_ok() || !admin.is_dir() {
        return Ok(false);
    }
    // A record app made but never finished has no gitdir yet; any other must name our path.
    if admin.join("gitdir").exists() && !points_back(&admin, &path) {
        return Ok(false);
    }
    keep_private_refs(paths, id, &admin)?;
    match fs::remove_dir_all(&admin) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("removing", &admin, err))
        }
        _ => Ok(true),
    }
}

/// git's record of a worktree holds refs no other worktree sees: its HEAD (detached, when the
/// directory was moved rather than deleted), `refs/worktree/*`, `refs/bisect/*`. Before the
/// record goes, each that points at a commit no shared ref reaches gets a rescue ref of its
/// own (`refs/app/rescue/<id>-<ref>-<commit>`).
fn keep_private_refs(paths: &AppPaths, id: &InstanceId, admin: &Path) -> Result<()> {
    let mut refs = vec![("head".to_string(), admin.join("HEAD"))];
    let mut dirs = vec![admin.join("refs")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else if let Ok(rel) = path.strip_prefix(admin.join("refs")) {
                let name = rel.to_string_lossy().replace(['/', '.'], "-");
                refs.push((name, path));
            }
        }
    }
    let Ok(repo) = Repository::open(paths.git_common_dir()) else {
        return Ok(());
    };
    for (name, file) in refs {
        let text = fs::read_to_string(&file).unwrap_or_default();
        let Ok(oid) = text.trim().parse::<git2::Oid>() else {
            continue;
        };
        if repo.find_commit(oid).is_err() || changes::reachable_from_refs(&repo, oid)? {
            continue;
        }
        let rescue = format!("refs/app/rescue/{id}-{name}-{}", &oid.to_string()[..12]);
        super::reflock::retry(&repo, &rescue, || {
            repo.reference(
                &rescue,
                oid,
                true,
                "app: a ref only the removed worktree had",
            )
        })
        .map_err(|err| Error::git(format!("creating {rescue}"), err))?;
    }
    Ok(())
}

/// Whether git's admin directory `admin` records the worktree at `path`.
fn points_back(admin: &Path, path: &Path) -> bool {
    fs::read_to_string(admin.join("gitdir"))
        .is_ok_and(|gitdir| Path::new(gitdir.trim()).parent() == Some(path))
}

/// The reason of a `git worktree lock`, when the worktree is locked by someone other than an
/// unfinished checkout of app's own (which writes "initializing").
fn git_lock(admin: &Path) -> Option<String> {
    let reason = fs::read_to_string(admin.join("locked")).ok()?;
    let reason = reason.trim();
    (reason != super::CHECKOUT_LOCK_REASON).then(|| {
        if reason.is_empty() {
            "no reason given".to_string()
        } else {
            reason.to_string()
        }
    })
}

/// Why removing a worktree with `changes` loses something, for [`Keep::IfClean`]: any file,
/// or a HEAD no longer on `branch` (commits there may exist nowhere else).
fn unsaved_beyond_branch(
    repo: &Repository,
    changes: &Changes,
    branch: Option<&str>,
) -> Result<Option<String>> {
    if changes.any_files() {
        return Ok(Some(changes.summary()));
    }
    match (&changes.head_branch, branch) {
        (Some(on), Some(want)) if on != want => Ok(Some(format!(
            "its HEAD is no longer on branch {want} but on {on}"
        ))),
        (None, _) => work_reason(repo, changes),
        _ => Ok(None),
    }
}

/// Why removing the worktree loses something, whatever branch it is on: a changed file, or a
/// detached HEAD no ref reaches.
fn work_reason(repo: &Repository, changes: &Changes) -> Result<Option<String>> {
    if changes.any_files() {
        return Ok(Some(changes.summary()));
    }
    match changes.head {
        Some(head)
            if changes.head_branch.is_none() && !changes::reachable_from_refs(repo, head)? =>
        {
            Ok(Some(format!(
                "its detached HEAD {head} is on no branch, tag or app ref"
            )))
        }
        _ => Ok(None),
    }
}
