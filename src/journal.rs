//! Intents of multi-step operations, so a crash between two steps can be finished or undone.
//!
//! Invariants:
//! - An operation writes its intent (`journal/<instance>.<nonce>.json`, signed, atomic) before
//!   its first step and removes it after its last. An intent names its writer (pid, start time,
//!   boot, and a nonce of its own), so two operations on one instance name never share or
//!   remove each other's file. An intent on disk whose writer is provably gone marks an
//!   operation a crash interrupted; `doctor` (and the next `app run`) recovers it, and only
//!   what that writer made (see `reclaim::recover`).
//! - Starting an instance (register, branch, worktree, checkout) is undone: its intent is
//!   removed before the command is spawned, so an interrupted start never handed its worktree
//!   to anyone and holds nothing but its base's files. Stopping one (worktree, branch,
//!   unregister) is finished, with the rescue rules of every cleanup.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::process::{Presence, ProcessIdentity};
use crate::sign::{self, SigningKey};
use crate::state;
use crate::time::Timestamp;

/// Which operation an intent belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Register, create branch and worktree, check out.
    Start,
    /// Remove worktree and branch when that loses nothing, unregister.
    Stop,
    /// One guarded worktree removal (`worktree::remove`): rescue, files, git's records.
    Remove,
}

/// One intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The operation.
    pub operation: Operation,
    /// The instance it is about.
    pub instance: InstanceId,
    /// The process doing it.
    pub pid: u32,
    /// That process's start time.
    pub start_time: u64,
    /// Its boot.
    pub boot_id: String,
    /// Random, per intent: names its file and what it made (the worktree's supervisor record
    /// carries the nonce of the start that created it). Empty in intents of older versions.
    #[serde(default)]
    pub nonce: String,
    /// The instance's worktree, when it has one.
    pub worktree: Option<PathBuf>,
    /// The instance's branch, when it has one.
    pub branch: Option<String>,
    /// The commit the branch starts from.
    pub base: Option<String>,
    /// Whether this start creates the branch.
    pub create_branch: bool,
    /// Whether this start reuses a kept worktree (which must then never be removed).
    pub reuse: bool,
    /// When the intent was written.
    pub written_at: Timestamp,
}

impl Intent {
    /// A new intent of the calling process for `operation` on `instance`, with a fresh nonce
    /// and no worktree, branch or base.
    pub fn new(operation: Operation, instance: &InstanceId) -> Intent {
        let me = ProcessIdentity::current();
        Intent {
            operation,
            instance: instance.clone(),
            pid: me.pid,
            start_time: me.start_time,
            boot_id: me.boot_id,
            nonce: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            worktree: None,
            branch: None,
            base: None,
            create_branch: false,
            reuse: false,
            written_at: Timestamp::now(),
        }
    }

    /// The writer's identity.
    pub fn writer(&self) -> ProcessIdentity {
        ProcessIdentity {
            pid: self.pid,
            start_time: self.start_time,
            boot_id: self.boot_id.clone(),
        }
    }

    /// Whether the process that wrote the intent is still at work.
    pub fn writer_alive(&self) -> bool {
        self.writer().presence() == Presence::Running
    }
}

/// Writes `intent` before the operation's first step.
pub fn begin(paths: &AppPaths, key: &SigningKey, intent: &Intent) -> Result<()> {
    let dir = paths.journal_dir();
    state::create_private_dir_all(&dir)?;
    let bytes = serde_json::to_vec_pretty(&key.seal(intent)).expect("intents serialize");
    state::write_atomic(&paths.intent(&intent.instance, &intent.nonce), &bytes)
}

/// Removes `intent` (and no other) after the operation's last step.
pub fn end(paths: &AppPaths, intent: &Intent) -> Result<()> {
    state::remove_if_present(&paths.intent(&intent.instance, &intent.nonce))
}

/// An intent as found on disk: trusted, or with why not.
pub type Found = std::result::Result<Intent, (PathBuf, String)>;

/// Every intent on disk, by file name.
pub fn list(paths: &AppPaths, key: Option<&SigningKey>) -> Result<Vec<Found>> {
    let dir = paths.journal_dir();
    let mut names = crate::state::visible_names(&dir)?;
    names.retain(|name| name.ends_with(".json"));
    let mut found = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let Some(bytes) = state::read_optional(&path)? else {
            continue;
        };
        let intent = serde_json::from_slice(&bytes)
            .map_err(|err| err.to_string())
            .and_then(|value| sign::open::<Intent>(&value, key))
            .and_then(|intent: Intent| {
                let own = paths.intent(&intent.instance, &intent.nonce);
                if own.file_name().is_some_and(|own| own == name.as_str()) {
                    Ok(intent)
                } else {
                    Err("filed under another instance's name".into())
                }
            });
        found.push(intent.map_err(|reason| (path, reason)));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An intent exactly as the versions whose `instance` was a `String` wrote it (the bytes
    /// its signature covers, then the signature added to the object).
    const OLD: &str = r#"{"operation":"start","instance":"agent-1","pid":4242,"start_time":17,"boot_id":"b00t","nonce":"0123456789ab","worktree":"/r/.app/worktrees/agent-1","branch":"app/agent-1","base":"4b825dc642cb6eb9a060e54bf8d69288fbee4904","create_branch":true,"reuse":false,"written_at":"2026-12-02T13:00:00.123Z"}"#;

    #[test]
    fn an_intent_of_the_string_id_versions_opens_and_writes_the_same_bytes() {
        let key = SigningKey::from_bytes(b"k".to_vec());
        let mut sealed: serde_json::Value = serde_json::from_str(OLD).unwrap();
        sealed["signature"] = key.sign(OLD.as_bytes()).into();
        let intent: Intent = sign::open(&sealed, Some(&key)).expect("the old intent verifies");
        assert_eq!(intent.instance, "agent-1");
        assert_eq!(intent.operation, Operation::Start);
        assert_eq!(serde_json::to_string(&intent).unwrap(), OLD);
        assert_eq!(key.seal(&intent), sealed);
    }
}
