//! What dead holders leave in the coordination state: named locks still held, the records of
//! lock waiters that are gone, lapsed or forged reservations, inboxes of instances that are
//! gone, expired and untrusted messages. Dead
//! letters and quarantined files are only noticed: they are kept for the user to read.

use std::fs;

use super::Diagnosis;
use super::problem::Problem;
use crate::config::Settings;
use crate::coordination::Coordination;
use crate::error::Result;
use crate::paths::AppPaths;
use crate::queue::InboxName;
use crate::registry::Snapshot;
use crate::sign::SigningKey;

/// Every coordination problem, then the notices about what was set aside.
pub(super) fn problems(
    paths: &AppPaths,
    key: Option<&SigningKey>,
    snapshot: &Snapshot,
    settings: &Settings,
    found: &mut Diagnosis,
) -> Result<()> {
    let coordination = Coordination::new(paths, settings);
    lock_problems(&coordination, &mut found.problems)?;
    dead_waiters(paths, &mut found.problems);
    reservation_problems(&coordination, &mut found.problems)?;
    inbox_problems(&coordination, key, snapshot, &mut found.problems)?;
    set_aside(paths, &mut found.notices);
    Ok(())
}

/// Named locks whose holder is dead, or a lock state that cannot be read.
fn lock_problems(coordination: &Coordination, problems: &mut Vec<Problem>) -> Result<()> {
    let Some(locks) = coordination.existing_locks()? else {
        return Ok(());
    };
    match locks.list() {
        Ok(all) => {
            for (state, lapsed) in all {
                if let (Some(_), Some(reason)) = (&state.holder, lapsed) {
                    problems.push(Problem::LapsedLock {
                        name: state.name,
                        reason,
                    });
                }
            }
        }
        Err(err) => problems.push(Problem::Locks {
            reason: err.to_string(),
        }),
    }
    Ok(())
}

/// Records in `locks/waiting/` whose process is gone: the file's name is its process's pid and
/// start time (`<pid>-<start>.json`), asked of `/proc`, whatever the file says. A name of
/// another shape is not app's and is left alone.
fn dead_waiters(paths: &AppPaths, problems: &mut Vec<Problem>) {
    let dir = paths.lock_waiters_dir();
    for name in crate::state::visible_names(&dir).unwrap_or_default() {
        if let Some(pid) = waiter_gone(&name) {
            problems.push(Problem::DeadWaiter {
                path: dir.join(name),
                pid,
            });
        }
    }
}

/// The pid of the waiter named `name` when it no longer runs (no process with that pid and
/// start time).
pub(super) fn waiter_gone(name: &str) -> Option<u32> {
    let (pid, start) = name.strip_suffix(".json")?.split_once('-')?;
    let (pid, start): (u32, u64) = (pid.parse().ok()?, start.parse().ok()?);
    (crate::process::start_time(pid) != Some(start)).then_some(pid)
}

/// Reservations that lapsed or do not verify, as one problem.
fn reservation_problems(coordination: &Coordination, problems: &mut Vec<Problem>) -> Result<()> {
    let Some(reservations) = coordination.existing_reservations()? else {
        return Ok(());
    };
    let all = reservations.list()?;
    let lapsed = all
        .iter()
        .filter(|entry| matches!(entry, Ok((_, Some(_)))))
        .count();
    let forged = all.iter().filter(|entry| entry.is_err()).count();
    if lapsed + forged > 0 {
        problems.push(Problem::LapsedReservations {
            count: lapsed,
            forged,
        });
    }
    Ok(())
}

/// Inboxes of instances that are gone, and expired or untrusted messages in the others.
fn inbox_problems(
    coordination: &Coordination,
    key: Option<&SigningKey>,
    snapshot: &Snapshot,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let store = coordination.messages_with(key.cloned());
    for owner in coordination.inbox_names() {
        let (messages, swept) = match &owner {
            InboxName::Instance(id) => store.inspect(id)?,
            InboxName::Stray(name) => coordination.stray_inbox(name, key.cloned()).inspect()?,
        };
        if snapshot.instance(owner.as_str()).is_none() {
            let files = messages.len() + swept.expired + swept.quarantined;
            if files > 0 {
                problems.push(Problem::OrphanInbox { owner, files });
            }
        } else if swept.expired + swept.quarantined > 0 {
            problems.push(Problem::Messages {
                owner,
                expired: swept.expired,
                untrusted: swept.quarantined,
            });
        }
    }
    Ok(())
}

/// Notices of dead letters and quarantined files, kept for the user to read.
fn set_aside(paths: &AppPaths, notices: &mut Vec<String>) {
    for (dir, what) in [
        (paths.dead_letters(), "dead letter(s) in"),
        (paths.quarantine(), "quarantined file(s) in"),
    ] {
        let count = fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| !e.file_name().to_string_lossy().ends_with(".reason"))
                    .count()
            })
            .unwrap_or(0);
        if count > 0 {
            notices.push(format!(
                "{count} {what} {} (kept for you to read)",
                dir.display()
            ));
        }
    }
}
