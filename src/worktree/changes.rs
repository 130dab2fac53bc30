//! What a worktree holds that its HEAD does not, byte for byte, and saving it as a rescue
//! commit.
//!
//! Invariants:
//! - [`Changes::read`] compares the files on disk with HEAD's tree. The index's stat data are
//!   only the fast path for ordinary entries (as git uses them, racy entries included);
//!   entries the index asks git to overlook (skip-worktree, assume-unchanged, as sparse
//!   checkouts set them) are hashed from disk every time. Untracked files are found by one
//!   walk of the worktree; ignored files are not work and ignored directories are not entered.
//! - A nested repository or an initialised submodule inside the worktree is never flattened
//!   into a rescue commit (its history lives in its own `.git`): it is reported so the caller
//!   keeps the worktree for the user.
//! - A rescue commit's parent is the worktree's HEAD, looked up in the repository the commit is
//!   written to, so `git log --stat` of the rescue ref shows only what changed and commits on a
//!   detached HEAD stay reachable. The same content is never rescued twice.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use git2::{ErrorCode, FileMode, ObjectType, Oid, Repository};

use crate::error::{Error, GitContext, Result, WorktreeError};
use crate::ids::InstanceId;

/// Index flag: assume-unchanged (`GIT_INDEX_ENTRY_VALID`).
const ASSUME_UNCHANGED: u16 = 0x8000;
/// Extended index flag: skip-worktree (`GIT_INDEX_ENTRY_SKIP_WORKTREE`).
const SKIP_WORKTREE: u16 = 1 << 14;

/// One path whose state on disk differs from HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A regular file or symlink with other content or mode than HEAD has (or none in HEAD).
    Written {
        /// Relative to the worktree.
        path: PathBuf,
        /// git's file mode for it.
        mode: FileMode,
    },
    /// HEAD has the path; the disk does not.
    Deleted {
        /// Relative to the worktree.
        path: PathBuf,
    },
}

impl Change {
    /// The path, relative to the worktree.
    pub fn path(&self) -> &Path {
        match self {
            Change::Written { path, .. } | Change::Deleted { path } => path,
        }
    }
}

/// What a worktree holds beyond its HEAD.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// HEAD's commit (`None` on an unborn branch).
    pub head: Option<Oid>,
    /// The branch HEAD is on, `None` when detached.
    pub head_branch: Option<String>,
    /// Files that differ from HEAD.
    pub files: Vec<Change>,
    /// Nested repositories and initialised submodules (relative paths).
    pub nested: Vec<PathBuf>,
}

impl Changes {
    /// Reads the worktree at `path`, a worktree of `repo`. HEAD's trees are read through
    /// `repo`, whose object cache a caller that reads many worktrees of one base (doctor)
    /// keeps warm; the worktree's own handle gives its HEAD, index and ignore rules.
    pub fn read(repo: &Repository, path: &Path) -> Result<Changes> {
        let context = || format!("reading the changes in {}", path.display());
        let wt = Repository::open(path).git_context(context)?;
        let head = wt.head().ok();
        let head_branch = head
            .as_ref()
            .filter(|h| h.is_branch())
            .and_then(|h| h.shorthand().ok().map(str::to_string));
        let head_commit = head
            .as_ref()
            .and_then(|h| h.peel_to_commit().ok())
            .map(|c| repo.find_commit(c.id()))
            .transpose()
            .git_context(context)?;
        let head_tree = head_commit
            .as_ref()
            .map(|c| c.tree())
            .transpose()
            .git_context(context)?;

        let index = wt.index().git_context(context)?;
        let (mut candidates, sparse) = candidates_from_index(path, &wt, &index)?;
        let mut nested = Vec::new();
        untracked(
            &wt,
            path,
            &tracked_dirs(&index),
            (&mut candidates, &mut nested),
        )?;
        // What is staged but no longer on disk as staged (or staged and then changed back).
        let staged = repo
            .diff_tree_to_index(head_tree.as_ref(), Some(&index), None)
            .git_context(context)?;
        for delta in staged.deltas() {
            for file in [delta.old_file(), delta.new_file()] {
                if let Some(rel) = file.path() {
                    candidates.insert(rel.to_path_buf());
                }
            }
        }

        let mut changes = Changes {
            head: head_commit.as_ref().map(git2::Commit::id),
            head_branch,
            nested,
            ..Changes::default()
        };
        let in_head = |rel: &Path| -> Option<(Oid, i32)> {
            let entry = head_tree.as_ref()?.get_path(rel).ok()?;
            Some((entry.id(), entry.filemode()))
        };
        // Paths stay bytes all the way (a name need not be UTF-8).
        for rel in candidates {
            changes.look_at(path, &rel, &in_head, &sparse)?;
        }
        changes.files.dedup();
        Ok(changes)
    }

    fn look_at(
        &mut self,
        root: &Path,
        rel: &Path,
        in_head: &dyn Fn(&Path) -> Option<(Oid, i32)>,
        sparse: &BTreeSet<PathBuf>,
    ) -> Result<()> {
        let abs = root.join(rel);
        let meta = match fs::symlink_metadata(&abs) {
            Ok(meta) => meta,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                // A sparse checkout leaves skip-worktree files off the disk: not a deletion.
                if in_head(rel).is_some() && !sparse.contains(rel) {
                    self.files.push(Change::Deleted {
                        path: rel.to_path_buf(),
                    });
                }
                return Ok(());
            }
            Err(err) => return Err(Error::io("reading", &abs, err)),
        };
        let (oid, mode) = if meta.file_type().is_symlink() {
            let target = fs::read_link(&abs).map_err(|err| Error::io("reading", &abs, err))?;
            let oid = Oid::hash_object(ObjectType::Blob, target.as_os_str().as_bytes())
                .git_context(|| format!("hashing {}", abs.display()))?;
            (oid, FileMode::Link)
        } else if meta.is_dir() {
            if abs.join(".git").exists() {
                self.nested.push(rel.to_path_buf());
                return Ok(());
            }
            // An untracked directory git did not descend into: every file in it is new.
            let mut entries: Vec<_> = fs::read_dir(&abs)
                .map_err(|err| Error::io("reading", &abs, err))?
                .filter_map(|e| e.ok())
                .map(|e| rel.join(e.file_name()))
                .collect();
            entries.sort();
            for entry in entries {
                self.look_at(root, &entry, in_head, sparse)?;
            }
            return Ok(());
        } else if meta.is_file() {
            let oid = Oid::hash_file(ObjectType::Blob, &abs)
                .git_context(|| format!("hashing {}", abs.display()))?;
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                FileMode::BlobExecutable
            } else {
                FileMode::Blob
            };
            (oid, mode)
        } else {
            // Sockets, fifos, devices: nothing git could hold.
            return Ok(());
        };
        if in_head(rel) != Some((oid, i32::from(mode))) {
            self.files.push(Change::Written {
                path: rel.to_path_buf(),
                mode,
            });
        }
        Ok(())
    }

    /// Whether any file differs.
    pub fn any_files(&self) -> bool {
        !self.files.is_empty()
    }

    /// A short account: "3 changed files (a.txt, b/c, ...)".
    pub fn summary(&self) -> String {
        let n = self.files.len();
        let names: Vec<String> = self
            .files
            .iter()
            .take(3)
            .map(|c| c.path().display().to_string())
            .collect();
        let more = if n > 3 { ", ..." } else { "" };
        format!(
            "{n} uncommitted or untracked change{} ({}{more})",
            if n == 1 { "" } else { "s" },
            names.join(", ")
        )
    }

    /// The files that are not simply missing (a half-made checkout misses files, and that is
    /// not work).
    pub fn without_deletions(mut self) -> Changes {
        self.files.retain(|c| matches!(c, Change::Written { .. }));
        self
    }
}

/// The index entries that may differ from the disk, found as git finds them: an entry whose
/// file's stat data (size, mtime, ctime, inode, mode) still match what the index recorded, and
/// was written before the index was, is unchanged; any other is hashed later. Entries the
/// index says to overlook (skip-worktree, assume-unchanged) and unmerged ones are always
/// candidates. Returns the candidates and the skip-worktree paths (sparse: absent is no
/// deletion).
fn candidates_from_index(
    root: &Path,
    wt: &Repository,
    index: &git2::Index,
) -> Result<(BTreeSet<PathBuf>, BTreeSet<PathBuf>)> {
    use std::os::unix::fs::MetadataExt;
    let index_written = fs::metadata(wt.path().join("index"))
        .ok()
        .map(|m| (m.mtime(), m.mtime_nsec()));
    let mut candidates = BTreeSet::new();
    let mut sparse = BTreeSet::new();
    for entry in index.iter() {
        let rel = PathBuf::from(std::ffi::OsStr::from_bytes(&entry.path));
        let skip = entry.flags_extended & SKIP_WORKTREE != 0;
        if skip {
            sparse.insert(rel.clone());
        }
        let stage = (entry.flags >> 12) & 0x3;
        if skip || entry.flags & ASSUME_UNCHANGED != 0 || stage != 0 {
            candidates.insert(rel);
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(root.join(&rel)) else {
            candidates.insert(rel);
            continue;
        };
        let mtime = (
            i64::from(entry.mtime.seconds()),
            i64::from(entry.mtime.nanoseconds()),
        );
        let same = u64::from(entry.file_size) == (meta.len() & 0xffff_ffff)
            && mtime == (meta.mtime(), meta.mtime_nsec())
            && (
                i64::from(entry.ctime.seconds()),
                i64::from(entry.ctime.nanoseconds()),
            ) == (meta.ctime(), meta.ctime_nsec())
            && u64::from(entry.ino) == (meta.ino() & 0xffff_ffff)
            && entry.mode == git_mode(&meta);
        // "Racy git": a file changed in the same instant the index was written looks clean.
        let racy = index_written.is_none_or(|written| mtime >= written);
        if !same || racy {
            candidates.insert(rel);
        }
    }
    Ok((candidates, sparse))
}

/// git's mode for a file with `meta`: 0o100644, 0o100755, 0o120000, or 0 for anything else.
fn git_mode(meta: &fs::Metadata) -> u32 {
    let kind = meta.file_type();
    if kind.is_symlink() {
        0o120000
    } else if kind.is_file() {
        if meta.permissions().mode() & 0o100 != 0 {
            0o100755
        } else {
            0o100644
        }
    } else if kind.is_dir() {
        // A submodule's directory, or a file replaced by one.
        0o040000
    } else {
        0
    }
}

/// Every directory that holds a tracked path (relative, "" for the root), and the tracked
/// paths themselves, as the index's bytes (hashed: the walk asks about every entry it meets).
fn tracked_dirs(index: &git2::Index) -> (HashSet<Vec<u8>>, HashSet<Vec<u8>>) {
    let mut dirs = HashSet::new();
    let mut paths = HashSet::with_capacity(index.len());
    dirs.insert(Vec::new());
    for entry in index.iter() {
        let mut dir = entry.path.as_slice();
        while let Some(slash) = dir.iter().rposition(|b| *b == b'/') {
            dir = &dir[..slash];
            if !dirs.insert(dir.to_vec()) {
                break;
            }
        }
        paths.insert(entry.path);
    }
    (dirs, paths)
}

/// Walks the worktree for files the index does not track and git does not ignore (added to
/// `candidates`), and for repositories of their own (`nested`: a `.git` anywhere below the
/// root, ignored directories included: they are entered only to look for one, which costs no
/// more than removing them does).
fn untracked(
    wt: &Repository,
    root: &Path,
    (dirs, tracked): &(HashSet<Vec<u8>>, HashSet<Vec<u8>>),
    (candidates, nested): (&mut BTreeSet<PathBuf>, &mut Vec<PathBuf>),
) -> Result<()> {
    // (directory, whether git ignores it)
    let mut stack = vec![(PathBuf::new(), false)];
    while let Some((dir, in_ignored)) = stack.pop() {
        let abs = root.join(&dir);
        let entries = match fs::read_dir(&abs) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(Error::io("reading", &abs, err)),
        };
        for entry in entries {
            let entry = entry.map_err(|err| Error::io("reading", &abs, err))?;
            let name = entry.file_name();
            if name == ".git" {
                if !dir.as_os_str().is_empty() {
                    nested.push(dir.clone());
                }
                continue;
            }
            let rel = dir.join(&name);
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if in_ignored {
                if is_dir {
                    stack.push((rel, true));
                }
                continue;
            }
            let bytes = rel.as_os_str().as_bytes();
            if tracked.contains(bytes) {
                continue;
            }
            if is_dir && dirs.contains(bytes) {
                stack.push((rel, false));
                continue;
            }
            let ignored = wt
                .status_should_ignore(&rel)
                .git_context(|| format!("checking whether {} is ignored", rel.display()))?;
            match (is_dir, ignored) {
                (true, _) => stack.push((rel, ignored)),
                (false, true) => {}
                (false, false) => {
                    candidates.insert(rel);
                }
            }
        }
    }
    Ok(())
}

/// Whether `commit` is reachable from a local branch, a tag or one of app's refs (so a worktree
/// whose detached HEAD is there loses no commit when it goes).
pub fn reachable_from_refs(repo: &Repository, commit: Oid) -> Result<bool> {
    let refs = repo
        .references()
        .git_context(|| "listing references".into())?;
    let mut tips = Vec::new();
    for reference in refs.flatten() {
        let name = reference.name().unwrap_or_default();
        if !(name.starts_with("refs/heads/")
            || name.starts_with("refs/tags/")
            || name.starts_with("refs/app/"))
        {
            continue;
        }
        if let Ok(tip) = reference.peel_to_commit() {
            if tip.id() == commit {
                return Ok(true);
            }
            tips.push(tip.id());
        }
    }
    for tip in tips {
        if repo
            .graph_descendant_of(tip, commit)
            .git_context(|| format!("comparing {tip} with {commit}"))?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Saves `changes` of the worktree at `path` as a commit on `refs/app/rescue/<id>` (or
/// `<id>-2`, ... when taken) in `repo`, whose parent is the worktree's HEAD. When a rescue ref
/// of `id` already holds exactly this (same tree, same parent), that one is returned.
pub fn rescue(
    repo: &Repository,
    id: &InstanceId,
    path: &Path,
    changes: &Changes,
    reason: &str,
) -> Result<(String, Oid)> {
    // A concurrent `git gc --prune=now` may delete the new objects before the ref holds them:
    // look them up again once it does, and write them again if they went.
    for _ in 0..3 {
        let (name, commit) = rescue_once(repo, id, path, changes, reason)?;
        if saved_whole(repo, commit, changes) {
            return Ok((name, commit));
        }
        tracing::warn!(instance = %id, "objects of the rescue commit vanished (a concurrent 'git gc --prune=now'?); saving again");
        let _ = repo.find_reference(&name).and_then(|mut r| r.delete());
    }
    Err(WorktreeError::RescueLost {
        path: path.to_path_buf(),
    }
    .into())
}

/// Whether `commit` and every object the rescue wrote for `changes` are in the object store.
fn saved_whole(repo: &Repository, commit: Oid, changes: &Changes) -> bool {
    let Ok(odb) = repo.odb() else {
        return false;
    };
    let Some(tree) = repo.find_commit(commit).ok().and_then(|c| c.tree().ok()) else {
        return false;
    };
    changes.files.iter().all(|change| match change {
        Change::Written { path, .. } => tree
            .get_path(path)
            .is_ok_and(|entry| odb.exists(entry.id())),
        Change::Deleted { .. } => true,
    })
}

fn rescue_once(
    repo: &Repository,
    id: &InstanceId,
    path: &Path,
    changes: &Changes,
    reason: &str,
) -> Result<(String, Oid)> {
    let context = || format!("saving the work in {}", path.display());
    let parent = changes
        .head
        .map(|head| repo.find_commit(head))
        .transpose()
        .git_context(context)?;
    let tree_id = rescue_tree(repo, path, changes, parent.as_ref())?;
    let tree = repo.find_tree(tree_id).git_context(context)?;
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let parent_ids: Vec<Oid> = parent.iter().map(git2::Commit::id).collect();
    if let Some(existing) = existing_rescue(repo, id, tree_id, &parent_ids) {
        return Ok(existing);
    }
    let signature = repo
        .signature()
        .or_else(|_| git2::Signature::now("app", "app@localhost"))
        .git_context(context)?;
    let message = format!(
        "app: rescued work of instance {id}\n\nFrom worktree {} ({reason}).\n",
        path.display()
    );
    let commit = repo
        .commit(None, &signature, &signature, &message, &tree, &parents)
        .git_context(context)?;
    let name = create_rescue_ref(repo, id, commit, &message)?;
    Ok((name, commit))
}

/// Writes the tree of `parent` (or the empty tree) with `changes` applied from the files in
/// `path` as they are now.
fn rescue_tree(
    repo: &Repository,
    path: &Path,
    changes: &Changes,
    parent: Option<&git2::Commit>,
) -> Result<Oid> {
    let context = || format!("saving the work in {}", path.display());
    let baseline = match parent {
        Some(parent) => parent.tree().git_context(context)?,
        None => {
            let empty = repo
                .treebuilder(None)
                .and_then(|b| b.write())
                .git_context(context)?;
            repo.find_tree(empty).git_context(context)?
        }
    };
    let mut update = git2::build::TreeUpdateBuilder::new();
    for change in &changes.files {
        match change {
            Change::Written { path: rel, mode } => {
                let Some(bytes) = written_bytes(&path.join(rel), *mode)? else {
                    // Removed since it was looked at: nothing left to save of it.
                    if baseline.get_path(rel).is_ok() {
                        update.remove(rel.as_path());
                    }
                    continue;
                };
                let blob = repo.blob(&bytes).git_context(context)?;
                update.upsert(rel.as_path(), blob, *mode);
            }
            Change::Deleted { path: rel } => {
                if baseline.get_path(rel).is_ok() {
                    update.remove(rel.as_path());
                }
            }
        }
    }
    update.create_updated(repo, &baseline).git_context(context)
}

/// What a written file holds now (a symlink's target); `None` when a regular file was
/// removed since it was looked at.
fn written_bytes(abs: &Path, mode: FileMode) -> Result<Option<Vec<u8>>> {
    if mode == FileMode::Link {
        return fs::read_link(abs)
            .map(|t| Some(t.as_os_str().as_bytes().to_vec()))
            .map_err(|err| Error::io("reading", abs, err));
    }
    match fs::read(abs) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(Error::io("reading", abs, err)),
    }
}

/// A rescue ref of `id` that already holds this tree on these parents (a rescue done twice).
fn existing_rescue(
    repo: &Repository,
    id: &InstanceId,
    tree_id: Oid,
    parent_ids: &[Oid],
) -> Option<(String, Oid)> {
    rescue_refs(repo, id).into_iter().find(|(_, oid)| {
        repo.find_commit(*oid).is_ok_and(|existing| {
            existing.tree_id() == tree_id && existing.parent_ids().collect::<Vec<_>>() == parent_ids
        })
    })
}

/// Points the first free name of `refs/app/rescue/<id>[-n]` at `commit`; returns the name.
fn create_rescue_ref(
    repo: &Repository,
    id: &InstanceId,
    commit: Oid,
    message: &str,
) -> Result<String> {
    for n in 1.. {
        let name = if n == 1 {
            format!("refs/app/rescue/{id}")
        } else {
            format!("refs/app/rescue/{id}-{n}")
        };
        match super::reflock::retry(repo, &name, || {
            repo.reference(&name, commit, false, message)
        }) {
            Ok(_) => return Ok(name),
            Err(err) if err.code() == ErrorCode::Exists => continue,
            Err(err) => return Err(Error::git(format!("creating {name}"), err)),
        }
    }
    unreachable!("some rescue ref name is free")
}

/// The rescue refs of instance `id` and the commits they point at.
fn rescue_refs(repo: &Repository, id: &InstanceId) -> Vec<(String, Oid)> {
    let mut found = BTreeMap::new();
    let first = format!("refs/app/rescue/{id}");
    let more = format!("{first}-");
    if let Ok(refs) = repo.references_glob(&format!("{first}*")) {
        for reference in refs.flatten() {
            if let (Ok(name), Some(oid)) = (reference.name(), reference.target())
                && (name == first
                    || name
                        .strip_prefix(&more)
                        .is_some_and(|n| n.parse::<u32>().is_ok()))
            {
                found.insert(name.to_string(), oid);
            }
        }
    }
    found.into_iter().collect()
}
