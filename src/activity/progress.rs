//! How far an instance's work has come ([`Progress`]), kept up to date incrementally.
//!
//! Invariants (docs/AGENT-STATE.md, "Progress"):
//! - Nothing walks the whole worktree on a tick. A recursive inotify watch (`notify`) collects
//!   the paths that changed; only those are diffed against HEAD (with the index's stat data),
//!   and the per-file line counts are kept between ticks.
//! - A full diff of HEAD against the index and worktree happens when HEAD moves, when more
//!   than [`MAX_PATHS`] paths changed at once or the watch overflowed, when a directory changed
//!   (the files of a new one may be written before it is watched), and when no watch could be
//!   set up; never more often than [`FULL_EVERY`] (the changes wait until then), except the
//!   first one and the one after HEAD moved.
//! - Ahead/behind and the committed stat are recomputed only when HEAD or the base branch's
//!   tip moves (two ref reads a tick).
//! - Uncommitted counts tracked and untracked (not ignored) files as `git add -A && git diff
//!   --cached --shortstat HEAD` would: an untracked file's lines are insertions.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use git2::{Diff, DiffOptions, Oid, Patch, Repository};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use super::{DiffStat, Progress};

/// More changed paths than this in one tick are diffed as a whole.
pub(crate) const MAX_PATHS: usize = 256;
/// The shortest time between two full diffs of the worktree.
pub(crate) const FULL_EVERY: Duration = Duration::from_secs(10);

/// What changed in the worktree since it was last asked.
#[derive(Debug, Default)]
struct Changes {
    paths: HashSet<PathBuf>,
    /// Too many, or the watch lost events: everything may have changed.
    overflow: bool,
    /// Something changed (also when `paths` was emptied by an overflow).
    any: bool,
}

/// The recursive watch of a worktree.
pub(crate) struct WorktreeWatch {
    _watcher: Option<RecommendedWatcher>,
    changes: Arc<Mutex<Changes>>,
}

impl WorktreeWatch {
    /// Watches `root` recursively, skipping `.git`; without a watch every look says
    /// "everything may have changed" (polled, at [`FULL_EVERY`] at most).
    pub(crate) fn new(root: &Path) -> WorktreeWatch {
        let changes = Arc::new(Mutex::new(Changes::default()));
        let sink = Arc::clone(&changes);
        let base = root.to_path_buf();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(mut changes) = sink.lock() else { return };
            match event {
                Ok(event) if is_change(&event.kind) => {
                    if event.need_rescan() {
                        changes.any = true;
                        changes.overflow = true;
                    }
                    for path in event.paths {
                        let Ok(relative) = path.strip_prefix(&base) else {
                            continue;
                        };
                        if relative.components().any(|c| c.as_os_str() == ".git") {
                            continue;
                        }
                        changes.any = true;
                        if changes.paths.len() < MAX_PATHS {
                            changes.paths.insert(relative.to_path_buf());
                        } else {
                            changes.overflow = true;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    changes.any = true;
                    changes.overflow = true;
                }
            }
        })
        .and_then(|mut watcher| {
            watcher.watch(root, RecursiveMode::Recursive)?;
            Ok(watcher)
        });
        let watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::warn!(worktree = %root.display(), %err, "no file-system events for this worktree; its changes are diffed every {}s instead", FULL_EVERY.as_secs());
                None
            }
        };
        WorktreeWatch {
            _watcher: watcher,
            changes,
        }
    }

    /// Whether the watch works.
    pub(crate) fn watching(&self) -> bool {
        self._watcher.is_some()
    }

    /// What changed since the last call.
    fn take(&self) -> Changes {
        self.changes
            .lock()
            .map(|mut changes| std::mem::take(&mut *changes))
            .unwrap_or(Changes {
                overflow: true,
                any: true,
                ..Changes::default()
            })
    }
}

/// Only changes: not opening and reading (our own diff reads the files).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The progress of one worktree, and what it needs to be kept up to date.
pub(crate) struct ProgressTracker {
    repo: Repository,
    /// The commit the instance started from.
    base: Oid,
    /// The branch its base is followed on (`refs/heads/main`), when there is one.
    base_ref: Option<String>,
    watch: WorktreeWatch,
    /// HEAD and the base branch's tip when ahead/behind were computed.
    seen: Option<(Option<Oid>, Oid)>,
    progress: Progress,
    /// Lines added and removed per changed file, relative to HEAD.
    files: BTreeMap<PathBuf, (u64, u64)>,
    /// Paths changed but not diffed yet, and whether a full diff is owed.
    pending: HashSet<PathBuf>,
    full_owed: bool,
    last_full: Option<Instant>,
}

impl ProgressTracker {
    /// Opens the worktree at `root` (the watch first, so nothing changes unseen), for an
    /// instance started from `base`, whose base branch is `base_ref`.
    pub(crate) fn open(
        root: &Path,
        base: Oid,
        base_ref: Option<String>,
    ) -> Result<ProgressTracker, git2::Error> {
        let watch = WorktreeWatch::new(root);
        let repo = Repository::open(root)?;
        Ok(ProgressTracker {
            repo,
            base,
            base_ref,
            watch,
            seen: None,
            progress: Progress::default(),
            files: BTreeMap::new(),
            pending: HashSet::new(),
            full_owed: true,
            last_full: None,
        })
    }

    /// Brings the progress up to date. Returns it, and whether the worktree changed since
    /// the last call.
    pub(crate) fn refresh(&mut self) -> (Progress, bool) {
        let changes = self.watch.take();
        let changed = changes.any;
        if changes.overflow || !self.watch.watching() {
            self.full_owed = true;
        }
        self.pending.extend(changes.paths);
        // A new directory's first files may come before the watch of it does: it is diffed
        // as a whole.
        let root = self
            .repo
            .workdir()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if self.pending.len() > MAX_PATHS || self.pending.iter().any(|p| root.join(p).is_dir()) {
            self.full_owed = true;
        }
        let head = self.repo.head().ok().and_then(|h| h.target());
        let tip = self
            .base_ref
            .as_deref()
            .and_then(|name| self.repo.refname_to_id(name).ok())
            .unwrap_or(self.base);
        let head_moved = self.seen.is_none_or(|(h, _)| h != head);
        if self.seen != Some((head, tip)) {
            if let Err(err) = self.committed(head, tip) {
                tracing::debug!(%err, "cannot compute the committed progress");
            }
            self.seen = Some((head, tip));
        }
        let full_allowed = head_moved || self.last_full.is_none_or(|t| t.elapsed() >= FULL_EVERY);
        let result = if self.full_owed && full_allowed {
            self.uncommitted_full(head)
        } else if !self.full_owed && !self.pending.is_empty() {
            self.uncommitted_paths(head)
        } else {
            Ok(())
        };
        if let Err(err) = result {
            tracing::debug!(%err, "cannot compute the uncommitted progress");
        }
        self.progress.uncommitted = self.files.values().fold(
            DiffStat {
                files: self.files.len() as u64,
                ..DiffStat::default()
            },
            |mut stat, (added, removed)| {
                stat.insertions += added;
                stat.deletions += removed;
                stat
            },
        );
        (self.progress, changed)
    }

    /// Ahead/behind of HEAD against the base branch's tip, and the stat of what HEAD adds to
    /// their merge base.
    fn committed(&mut self, head: Option<Oid>, tip: Oid) -> Result<(), git2::Error> {
        let Some(head) = head else {
            self.progress.ahead = 0;
            self.progress.behind = 0;
            self.progress.committed = DiffStat::default();
            return Ok(());
        };
        let (ahead, behind) = self.repo.graph_ahead_behind(head, tip)?;
        self.progress.ahead = ahead as u64;
        self.progress.behind = behind as u64;
        let from = self.repo.merge_base(head, tip).unwrap_or(self.base);
        let old = self.repo.find_commit(from)?.tree()?;
        let new = self.repo.find_commit(head)?.tree()?;
        let diff = self.repo.diff_tree_to_tree(Some(&old), Some(&new), None)?;
        let stats = diff.stats()?;
        self.progress.committed = DiffStat {
            files: stats.files_changed() as u64,
            insertions: stats.insertions() as u64,
            deletions: stats.deletions() as u64,
        };
        Ok(())
    }

    /// Diffs everything against HEAD.
    fn uncommitted_full(&mut self, head: Option<Oid>) -> Result<(), git2::Error> {
        self.last_full = Some(Instant::now());
        self.full_owed = false;
        self.pending.clear();
        let mut options = diff_options();
        let files = per_file(&diff(&self.repo, head, &mut options)?)?;
        self.files = files;
        Ok(())
    }

    /// Diffs only the pending paths against HEAD.
    fn uncommitted_paths(&mut self, head: Option<Oid>) -> Result<(), git2::Error> {
        let mut options = diff_options();
        options.disable_pathspec_match(true);
        for path in &self.pending {
            options.pathspec(path);
            // A path may have been a directory: whatever was under it is diffed again.
            self.files
                .retain(|file, _| !(file == path || file.starts_with(path)));
        }
        self.pending.clear();
        let files = per_file(&diff(&self.repo, head, &mut options)?)?;
        self.files.extend(files);
        Ok(())
    }
}

/// HEAD's tree against the index and the worktree.
fn diff<'r>(
    repo: &'r Repository,
    head: Option<Oid>,
    options: &mut DiffOptions,
) -> Result<Diff<'r>, git2::Error> {
    let tree = match head {
        Some(head) => Some(repo.find_commit(head)?.tree()?),
        None => None,
    };
    repo.diff_tree_to_workdir_with_index(tree.as_ref(), Some(options))
}

fn diff_options() -> DiffOptions {
    let mut options = DiffOptions::new();
    options
        .include_untracked(true)
        .recurse_untracked_dirs(true)
        .show_untracked_content(true)
        .context_lines(0);
    options
}

/// Lines added and removed per file of `diff`.
fn per_file(diff: &Diff<'_>) -> Result<BTreeMap<PathBuf, (u64, u64)>, git2::Error> {
    let mut files = BTreeMap::new();
    for index in 0..diff.deltas().len() {
        let delta = diff
            .get_delta(index)
            .expect("index below the number of deltas");
        let Some(path) = delta.new_file().path().or(delta.old_file().path()) else {
            continue;
        };
        let path = path.to_path_buf();
        let (added, removed) = match Patch::from_diff(diff, index)? {
            Some(patch) => {
                let (_, added, removed) = patch.line_stats()?;
                (added as u64, removed as u64)
            }
            None => (0, 0),
        };
        files.insert(path, (added, removed));
    }
    Ok(files)
}
