//! What a worktree holds that its HEAD does not, byte for byte, and saving it as a rescue
//! commit.
//!
//! Invariants:
//! - [`Changes::read`] compares the files on disk with HEAD's tree. git's status is only the
//!   fast path (its stat cache) for ordinary entries; entries the index asks git to overlook
//!   (skip-worktree, assume-unchanged, as sparse checkouts set them) are hashed from disk
//!   every time. Ignored files are not work.
//! - A nested repository or an initialised submodule inside the worktree is never flattened
//!   into a rescue commit (its history lives in its own `.git`): it is reported so the caller
//!   keeps the worktree for the user.
//! - A rescue commit's parent is the worktree's HEAD, looked up in the repository the commit is
//!   written to, so `git log --stat` of the rescue ref shows only what changed and commits on a
//!   detached HEAD stay reachable. The same content is never rescued twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use git2::{ErrorCode, FileMode, ObjectType, Oid, Repository, Status, StatusOptions};

use crate::error::{Error, GitContext, Result};

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
    /// Reads the worktree at `path`.
    pub fn read(path: &Path) -> Result<Changes> {
        let context = || format!("reading the changes in {}", path.display());
        let wt = Repository::open(path).git_context(context)?;
        let head = wt.head().ok();
        let head_branch = head
            .as_ref()
            .filter(|h| h.is_branch())
            .and_then(|h| h.shorthand().ok().map(str::to_string));
        let head_commit = head.as_ref().and_then(|h| h.peel_to_commit().ok());
        let head_tree = head_commit
            .as_ref()
            .map(|c| c.tree())
            .transpose()
            .git_context(context)?;

        let mut candidates: BTreeSet<PathBuf> = BTreeSet::new();
        let mut options = StatusOptions::new();
        // Ignored directories are listed (not entered) only to find repositories in them.
        options
            .include_untracked(true)
            .recurse_untracked_dirs(true)
            .include_ignored(true)
            .recurse_ignored_dirs(false)
            .exclude_submodules(false);
        let statuses = wt.statuses(Some(&mut options)).git_context(context)?;
        let mut nested = Vec::new();
        for entry in statuses.iter() {
            let rel = PathBuf::from(std::ffi::OsStr::from_bytes(entry.path_bytes()));
            if entry.status() == Status::IGNORED {
                if entry.path_bytes().ends_with(b"/") && path.join(&rel).join(".git").exists() {
                    nested.push(rel.components().collect::<PathBuf>());
                }
            } else if entry.status() != Status::CURRENT {
                candidates.insert(rel);
            }
        }
        // git's status trusts these flags and says nothing: look for ourselves.
        let mut sparse: BTreeSet<PathBuf> = BTreeSet::new();
        let index = wt.index().git_context(context)?;
        for entry in index.iter() {
            let skip = entry.flags_extended & SKIP_WORKTREE != 0;
            if skip || entry.flags & ASSUME_UNCHANGED != 0 {
                let rel = PathBuf::from(std::ffi::OsStr::from_bytes(&entry.path));
                if skip {
                    sparse.insert(rel.clone());
                }
                candidates.insert(rel);
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
        for rel in candidates {
            let rel = PathBuf::from(rel.to_string_lossy().trim_end_matches('/').to_string())
                .components()
                .collect::<PathBuf>();
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
    id: &str,
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
    let baseline = match &parent {
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
                let abs = path.join(rel);
                let bytes = if *mode == FileMode::Link {
                    fs::read_link(&abs)
                        .map(|t| t.as_os_str().as_bytes().to_vec())
                        .map_err(|err| Error::io("reading", &abs, err))?
                } else {
                    match fs::read(&abs) {
                        Ok(bytes) => bytes,
                        // Removed since it was looked at: nothing left to save of it.
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                            if baseline.get_path(rel).is_ok() {
                                update.remove(rel.as_path());
                            }
                            continue;
                        }
                        Err(err) => return Err(Error::io("reading", &abs, err)),
                    }
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
    let tree_id = update
        .create_updated(repo, &baseline)
        .git_context(context)?;
    let tree = repo.find_tree(tree_id).git_context(context)?;
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let parent_ids: Vec<Oid> = parent.iter().map(git2::Commit::id).collect();

    let names = rescue_refs(repo, id);
    for (name, oid) in &names {
        if let Ok(existing) = repo.find_commit(*oid)
            && existing.tree_id() == tree_id
            && existing.parent_ids().collect::<Vec<_>>() == parent_ids
        {
            return Ok((name.clone(), *oid));
        }
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
    for n in 1.. {
        let name = if n == 1 {
            format!("refs/app/rescue/{id}")
        } else {
            format!("refs/app/rescue/{id}-{n}")
        };
        match repo.reference(&name, commit, false, &message) {
            Ok(_) => return Ok((name, commit)),
            Err(err) if err.code() == ErrorCode::Exists => continue,
            Err(err) => return Err(Error::git(format!("creating {name}"), err)),
        }
    }
    unreachable!("some rescue ref name is free")
}

/// The rescue refs of instance `id` and the commits they point at.
fn rescue_refs(repo: &Repository, id: &str) -> Vec<(String, Oid)> {
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
