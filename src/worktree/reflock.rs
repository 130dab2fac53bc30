//! The lock files of git refs (`<ref>.lock`), and the ones a killed writer left behind.
//!
//! Invariants:
//! - git and libgit2 create a ref's lock file, hold it open while they write it, and rename
//!   it over the ref when done. A lock file that no live process has open (asked of `/proc`
//!   through [`crate::inuse::Scan`]) and that is [`STALE_AFTER`] old was left by a writer
//!   killed half-way, and blocks its ref for good: only such a one is ever removed, judged
//!   again on a fresh scan right before it goes.
//! - A lock file a live process holds is its holder's: it is waited for (a while, as for any
//!   writer), never removed, and a failure names the holder and what to do.
//! - One rule for every caller: the end of an instance, `app ci`, start and its undo, journal
//!   recovery and doctor all judge lock files here.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use git2::{ErrorCode, Repository};

use crate::error::Result;
use crate::inuse::{Scan, User};

/// How old a lock file of a ref that no live process holds must be to count as left by a
/// killed writer: a writer closes its lock file just before it renames it over the ref, and
/// may be preempted in between.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(1);

/// How long a change of a ref waits for its lock file to be let go of: many instances ending
/// at once contend for git's lock files, and libgit2, unlike the git CLI, does not wait itself.
const PATIENCE: Duration = Duration::from_secs(10);

/// What a ref's lock file is, judged by one process scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RefLock {
    /// There is no such file.
    Absent,
    /// Live processes have it open: it is theirs.
    Held(Vec<User>),
    /// Nobody has it open, but a writer may be about to rename it: it counts as left once
    /// this much longer has passed.
    Young(Duration),
    /// Nobody has it open and its age is unknown (dated in the future): not judged by age.
    Undated,
    /// Nobody has it open and it is [`STALE_AFTER`] old: a killed writer left it.
    Left,
}

impl RefLock {
    /// Judges the lock file at `path` by `scan`.
    pub(crate) fn judge(path: &Path, scan: &Scan) -> RefLock {
        // Open files show in /proc by their canonical path.
        let (Ok(canonical), Ok(meta)) = (fs::canonicalize(path), fs::symlink_metadata(path)) else {
            return RefLock::Absent;
        };
        let users = scan.users(&canonical);
        if !users.is_empty() {
            return RefLock::Held(users);
        }
        match meta.modified().ok().and_then(|at| at.elapsed().ok()) {
            None => RefLock::Undated,
            Some(age) => match STALE_AFTER.checked_sub(age) {
                Some(rest) if !rest.is_zero() => RefLock::Young(rest),
                _ => RefLock::Left,
            },
        }
    }

    /// What to do about this lock file at `path`, for a failure it caused; `None` when it is
    /// gone.
    fn advice(&self, path: &Path) -> Option<String> {
        let path = path.display();
        match self {
            RefLock::Absent => None,
            RefLock::Held(users) => {
                let users: Vec<String> = users
                    .iter()
                    .map(|u| format!("pid {} ({})", u.pid, u.command))
                    .collect();
                Some(format!(
                    "{path} is held by {}: let it finish or stop it",
                    users.join(", ")
                ))
            }
            RefLock::Young(_) | RefLock::Undated | RefLock::Left => Some(format!(
                "{path} is in the way: if no git command works in this repository, remove that lock file"
            )),
        }
    }
}

/// The lock file of `reference` (a full ref name) in `repo`.
pub(crate) fn lock_file(repo: &Repository, reference: &str) -> PathBuf {
    repo.commondir().join(format!("{reference}.lock"))
}

/// Removes the lock file at `path` when a killed writer left it, judged on a fresh scan.
/// Returns how it was judged: it was removed when [`RefLock::Left`].
pub(crate) fn remove_if_left(path: &Path) -> Result<RefLock> {
    let judged = RefLock::judge(path, &Scan::take());
    if judged == RefLock::Left {
        crate::state::remove_if_present(path)?;
    }
    Ok(judged)
}

/// Like [`remove_if_left`], but a young lock file nobody holds first gets the rest of
/// [`STALE_AFTER`] (about a second at most). Returns whether it removed it.
pub(crate) fn remove_once_left(path: &Path) -> Result<bool> {
    if let RefLock::Young(rest) = RefLock::judge(path, &Scan::take()) {
        std::thread::sleep(rest + Duration::from_millis(50));
    }
    Ok(remove_if_left(path)? == RefLock::Left)
}

/// Runs `op`, a change of `reference` in `repo`, again while git refuses it for a lock file
/// ([`ErrorCode::Locked`]): the ref's own lock file is removed once a killed writer left it
/// (then `op` runs again at once); any other is waited for, up to [`PATIENCE`]. A failure for
/// a lock file says who holds it and what to do (still [`ErrorCode::Locked`]).
pub(crate) fn retry<T>(
    repo: &Repository,
    reference: &str,
    mut op: impl FnMut() -> std::result::Result<T, git2::Error>,
) -> std::result::Result<T, git2::Error> {
    let lock = lock_file(repo, reference);
    let started = Instant::now();
    let mut delay = Duration::from_millis(2);
    let mut judged_at: Option<Instant> = None;
    loop {
        let err = match op() {
            Err(err) if err.code() == ErrorCode::Locked => err,
            other => return other,
        };
        // A scan costs a walk of /proc: only for a lock file old enough to be left, and at
        // most every quarter second.
        let old = fs::symlink_metadata(&lock)
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age >= STALE_AFTER));
        if old && judged_at.is_none_or(|at| at.elapsed() >= Duration::from_millis(250)) {
            judged_at = Some(Instant::now());
            if remove_if_left(&lock).is_ok_and(|judged| judged == RefLock::Left) {
                tracing::info!(lock = %lock.display(), "removed a ref lock file a killed writer left");
                continue;
            }
        }
        if started.elapsed() >= PATIENCE {
            return Err(blocked(&lock, err));
        }
        // Jitter keeps the waiters from retrying in lockstep.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let jitter = Duration::from_nanos(u64::from(nanos) % delay.as_nanos().max(1) as u64);
        tracing::debug!(%err, ?delay, "git lock held; retrying");
        std::thread::sleep(delay + jitter);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// `err` (git refusing a change for a lock file) with what is in the way and what to do.
fn blocked(lock: &Path, err: git2::Error) -> git2::Error {
    let Some(advice) = RefLock::judge(lock, &Scan::take()).advice(lock) else {
        return err;
    };
    let message = format!("{}; {advice}", err.message().trim_end_matches([':', ' ']));
    git2::Error::new(err.code(), err.class(), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_file_nobody_holds_is_left_once_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.lock");
        let scan = Scan::default();
        assert_eq!(RefLock::judge(&path, &scan), RefLock::Absent);
        let file = fs::File::create(&path).unwrap();
        assert!(matches!(RefLock::judge(&path, &scan), RefLock::Young(_)));
        file.set_modified(SystemTime::now() - STALE_AFTER).unwrap();
        assert_eq!(RefLock::judge(&path, &scan), RefLock::Left);
        file.set_modified(SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        assert_eq!(RefLock::judge(&path, &scan), RefLock::Undated);
    }

    #[test]
    fn a_held_lock_file_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.lock");
        fs::File::create(&path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        let mut holder = std::process::Command::new("sh")
            .args(["-c", "exec 3>>\"$0\" && echo ready && exec sleep 600"])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        let judged = remove_if_left(&path).unwrap();
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(
            matches!(&judged, RefLock::Held(users) if users.iter().any(|u| u.pid == holder.id())),
            "{judged:?}"
        );
        assert!(path.exists());
    }
}
