//! Files in `.app/` a crash can leave wrong: control sockets of instances that are gone,
//! temp files of writers that are gone, and modes that let others in. Worktrees are not
//! looked into.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use super::problem::Problem;
use crate::inuse;
use crate::paths::AppPaths;
use crate::process;
use crate::registry::{Liveness, Snapshot};
use crate::state;

/// Control sockets whose instance is gone, or was never this socket's owner.
pub(super) fn stale_sockets(
    paths: &AppPaths,
    snapshot: &Snapshot,
    stale_after: Duration,
    problems: &mut Vec<Problem>,
) {
    let Ok(entries) = fs::read_dir(paths.run_dir()) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".sock") else {
            continue;
        };
        let reason = match snapshot.instance(id) {
            None => "is no longer registered".to_string(),
            Some(record) => match record.liveness(stale_after) {
                Liveness::Live => continue,
                Liveness::Stale(_) if inuse::instance_running(record).is_some() => continue,
                Liveness::Stale(why) => format!("is dead ({why})"),
            },
        };
        problems.push(Problem::StaleSocket {
            path: entry.path(),
            reason,
        });
    }
}

/// Leftover temp files of `state::write_atomic` (`.<name>.tmp.<pid>.<n>`) whose writer is gone.
pub(super) fn temp_files(dir: &Path, paths: &AppPaths, problems: &mut Vec<Problem>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path == paths.worktrees_dir() {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            temp_files(&path, paths, problems);
            continue;
        }
        let writer = state::temp_file_writer(&entry.file_name().to_string_lossy());
        if let Some(pid) = writer
            && process::start_time(pid).is_none()
        {
            problems.push(Problem::TempFile { path });
        }
    }
}

/// Directories of `.app/` looser than 0700 and files looser than 0600 (not inside worktrees).
pub(super) fn permissions(dir: &Path, paths: &AppPaths, problems: &mut Vec<Problem>) {
    let check = |path: &Path, meta: &fs::Metadata, problems: &mut Vec<Problem>| {
        let mode = meta.permissions().mode() & 0o777;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode & 0o077 != 0 {
            problems.push(Problem::Permissions {
                path: path.to_path_buf(),
                mode,
                want,
            });
        }
    };
    if dir == paths.state_dir()
        && let Ok(meta) = fs::symlink_metadata(dir)
    {
        check(dir, &meta, problems);
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        check(&path, &meta, problems);
        if meta.is_dir() && path != paths.worktrees_dir() {
            permissions(&path, paths, problems);
        }
    }
}
