//! Whom a caller of `app` acts for: its instance (by the `APP_INSTANCE_ID` it claims, read
//! into [`Caller`] at the edge, or by the worktree it is in), or outside any instance the shell
//! or script that called it.

use std::path::Path;

use crate::config::Caller;
use crate::error::{Error, Result};
use crate::process;
use crate::registry::{InstanceRecord, Snapshot};

/// The instance the calling process acts for: the one it claims (`APP_INSTANCE_ID`) when
/// that is registered, else the one whose worktree contains `cwd`.
pub fn caller(snapshot: &Snapshot, claim: &Caller, cwd: &Path) -> Option<InstanceRecord> {
    if let Some(id) = &claim.instance_id
        && let Some(record) = snapshot.instance(id)
    {
        return Some(record.clone());
    }
    let dir = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_path_buf());
    owner_of(snapshot, &dir)
}

/// The holder of locks and reservations the caller takes: its instance, or outside any
/// instance the process that called `app` (the shell or script, seen through the subshells of
/// `tok=$(app lock acquire X)`: see [`process::caller`]), so the hold ends with it.
pub fn caller_holder(
    snapshot: &Snapshot,
    claim: &Caller,
    cwd: &Path,
) -> Result<crate::lock::Holder> {
    if let Some(record) = caller(snapshot, claim, cwd) {
        return Ok(crate::lock::Holder::instance(&record));
    }
    process::caller()
        .map(crate::lock::Holder::process)
        .ok_or_else(|| Error::Failed("cannot read the identity of the calling process".into()))
}

/// The registered instance whose worktree contains `dir`, if any.
pub fn owner_of(snapshot: &Snapshot, dir: &Path) -> Option<InstanceRecord> {
    snapshot
        .valid_instances()
        .into_iter()
        .filter(|record| {
            record
                .worktree
                .as_ref()
                .is_some_and(|worktree| dir.starts_with(worktree))
        })
        .max_by_key(|record| record.worktree.as_ref().map_or(0, |w| w.as_os_str().len()))
        .cloned()
}
