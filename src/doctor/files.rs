//! Files in `.app/` a crash can leave wrong: control sockets of instances that are gone,
//! agent-state files of instances of which nothing runs, temp files of writers that are gone,
//! and modes that let others in. Worktrees are not looked into.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use super::problem::{FileStamp, Problem, file_stamp};
use crate::inuse::{self, Supervisor};
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

/// Agent-state files (`.app/activity/<id>.json`, `<id>.said.json`) of instances of which
/// nothing runs, by ground truth ([`instance_runs`]): one problem per instance.
pub(super) fn leftover_activity(
    paths: &AppPaths,
    snapshot: &Snapshot,
    stale_after: Duration,
    problems: &mut Vec<Problem>,
) {
    let mut by_id: std::collections::BTreeMap<String, Vec<(std::path::PathBuf, FileStamp)>> =
        Default::default();
    let mut reasons = std::collections::BTreeMap::new();
    for name in state::visible_names(&paths.activity_dir()).unwrap_or_default() {
        // `x.said.json` is the report of `x`, or the state of an instance named `x.said`:
        // it is left while either runs.
        let candidates = activity_owners(&name);
        let Some(id) = candidates.first() else {
            continue;
        };
        let mut dead = Vec::new();
        for candidate in &candidates {
            match instance_runs(paths, snapshot, candidate, stale_after) {
                Ok(_) => {
                    dead.clear();
                    break;
                }
                Err(reason) => dead.push(reason),
            }
        }
        let path = paths.activity_dir().join(&name);
        let (Some(reason), Some(stamp)) = (dead.into_iter().next(), file_stamp(&path)) else {
            continue;
        };
        reasons.entry(id.to_string()).or_insert(reason);
        by_id.entry(id.to_string()).or_default().push((path, stamp));
    }
    for (id, files) in by_id {
        let reason = reasons.remove(&id).unwrap_or_default();
        problems.push(Problem::LeftoverActivity { id, files, reason });
    }
}

/// The instances a file of `.app/activity/` may belong to (`<id>.json`, `<id>.said.json`), the
/// report's owner first.
pub(super) fn activity_owners(name: &str) -> Vec<&str> {
    let Some(stem) = name.strip_suffix(".json") else {
        return Vec::new();
    };
    match stem.strip_suffix(".said") {
        Some(reporter) => vec![reporter, stem],
        None => vec![stem],
    }
}

/// `Ok` with why, when something of instance `id` runs on this host: its registration is live,
/// its supervisor or command still runs (`inuse`), its worktree's recorded supervisor runs, or
/// its control socket answers (a supervisor whose registration was lost). `Err` with what was
/// seen otherwise.
pub(super) fn instance_runs(
    paths: &AppPaths,
    snapshot: &Snapshot,
    id: &str,
    stale_after: Duration,
) -> Result<String, String> {
    let seen = match snapshot.instance(id) {
        Some(record) => match record.liveness(stale_after) {
            Liveness::Live => return Ok("it is live".into()),
            Liveness::Stale(why) => match inuse::instance_running(record) {
                Some(running) => return Ok(running),
                None => format!("is dead ({why})"),
            },
        },
        None => "is not registered".to_string(),
    };
    if let Some(supervisor) =
        Supervisor::load(&paths.git_worktree_admin(id)).filter(Supervisor::alive_elsewhere)
    {
        return Ok(format!(
            "its worktree's supervisor (pid {}) runs",
            supervisor.process.pid
        ));
    }
    if std::os::unix::net::UnixStream::connect(paths.control_socket(id)).is_ok() {
        return Ok("its control socket answers".into());
    }
    Err(format!("{seen}, and nothing of it runs"))
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
