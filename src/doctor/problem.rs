//! The kinds of problem `doctor` finds, each with the data fixing it needs, and the text
//! reported for each (kind, subject, problem, fix). The texts and kinds are stable: tests and
//! machines read them.

use std::path::{Path, PathBuf};

use super::Finding;
use crate::journal::{Intent, Operation};
use crate::registry::InstanceRecord;

/// A problem with what fixing it needs.
#[derive(Debug, Clone)]
pub(super) enum Problem {
    MissingSecret,
    Permissions {
        path: PathBuf,
        mode: u32,
        want: u32,
    },
    HalfDone(Intent),
    UntrustedIntent {
        path: PathBuf,
        reason: String,
    },
    ForgedInstance {
        key: String,
        reason: String,
    },
    DeadInstance {
        record: InstanceRecord,
        reason: String,
    },
    InUse {
        id: String,
        reason: String,
    },
    /// A worktree in use whose registration is missing or does not verify, with its
    /// supervisor alive: it registers it again at its next heartbeat.
    Readopt {
        id: String,
        users: String,
        supervisor: u32,
    },
    NeedsUser {
        id: String,
        reason: String,
    },
    StateDirNotDir {
        path: PathBuf,
    },
    StaleRefLock {
        path: PathBuf,
    },
    CorruptFile {
        path: PathBuf,
        reason: String,
    },
    OrphanWorktree {
        id: String,
        path: PathBuf,
    },
    Unreadable {
        path: PathBuf,
        reason: String,
    },
    DanglingMetadata {
        name: String,
        admin: PathBuf,
    },
    IdleBranch {
        branch: String,
    },
    StaleBranchEntry {
        branch: String,
        reason: String,
    },
    LapsedLock {
        name: String,
        reason: String,
    },
    Locks {
        reason: String,
    },
    LapsedReservations {
        count: usize,
        forged: usize,
    },
    OrphanInbox {
        owner: String,
        files: usize,
    },
    Messages {
        owner: String,
        expired: usize,
        untrusted: usize,
    },
    StaleSocket {
        path: PathBuf,
        reason: String,
    },
    TempFile {
        path: PathBuf,
    },
    Database {
        reason: String,
    },
    Unmirrored {
        record: InstanceRecord,
    },
}

impl Problem {
    /// The finding as reported: the text table of every kind.
    pub(super) fn finding(&self) -> Finding {
        let (kind, subject, problem, fix): (&str, String, String, String) = match self {
            Problem::MissingSecret => (
                "secret",
                ".app/secret".into(),
                "the signing key is missing (and APP_SHARED_SECRET is not set)".into(),
                "create a new key; entries signed with the old one then show as forged".into(),
            ),
            Problem::Permissions { path, mode, want } => (
                "permissions",
                path.display().to_string(),
                format!("mode {mode:o} lets others in"),
                format!("chmod {want:o}"),
            ),
            Problem::HalfDone(intent) => (
                "journal",
                intent.instance.clone(),
                format!(
                    "a {} of instance {} was interrupted (pid {} is gone)",
                    match intent.operation {
                        Operation::Start => "start",
                        Operation::Stop => "stop",
                        Operation::Remove => "worktree removal",
                    },
                    intent.instance,
                    intent.pid
                ),
                match intent.operation {
                    Operation::Start => {
                        "undo what that start made (work found in it is saved first)"
                    }
                    Operation::Stop => "finish it: rescue work, remove the worktree, unregister",
                    Operation::Remove => "finish it: rescue work, remove the worktree",
                }
                .into(),
            ),
            Problem::UntrustedIntent { path, reason } => (
                "journal",
                path.display().to_string(),
                format!("an intent that cannot be trusted: {reason}"),
                "remove the file (nothing is done from it)".into(),
            ),
            Problem::ForgedInstance { key, reason } => (
                "forged-instance",
                key.clone(),
                format!("registry entry does not verify: {reason}"),
                "remove the entry".into(),
            ),
            Problem::DeadInstance { record, reason } => (
                "dead-instance",
                record.id.clone(),
                format!("registered but dead: {reason}"),
                reclaim_plan(record.worktree.as_deref()),
            ),
            Problem::InUse { id, reason } => (
                "stale-instance",
                id.clone(),
                reason.clone(),
                "none while it runs: stop it (app instance stop, or kill), then run doctor again"
                    .into(),
            ),
            Problem::Readopt {
                id,
                users,
                supervisor,
            } => (
                "unregistered-instance",
                id.clone(),
                format!("in use by {users}, but not registered (or its entry does not verify)"),
                format!(
                    "re-adopt it: its supervisor (pid {supervisor}) registers it again at its next heartbeat"
                ),
            ),
            Problem::NeedsUser { id, reason } => (
                "orphan-worktree",
                id.clone(),
                reason.clone(),
                "none: this one is yours to resolve (see the problem)".into(),
            ),
            Problem::StaleRefLock { path } => (
                "git-lock",
                path.display().to_string(),
                "a lock file of one of app's refs that no live process holds (left by a crash); git refuses to change the ref while it is there".into(),
                "remove it".into(),
            ),
            Problem::StateDirNotDir { path } => (
                "state-dir",
                path.display().to_string(),
                "is not a directory, so app cannot keep its state there".into(),
                format!(
                    "none: move it aside (mv {0} {0}.bak), then run app again",
                    path.display()
                ),
            ),
            Problem::CorruptFile { path, reason } => (
                "corrupt-file",
                path.display().to_string(),
                format!("cannot be read: {reason}"),
                "move it aside (to <name>.corrupt-<time>, kept for you to read); live instances register again at their next heartbeat".into(),
            ),
            Problem::OrphanWorktree { id, path } => (
                "orphan-worktree",
                id.clone(),
                format!("{} belongs to no registered instance", path.display()),
                reclaim_plan(Some(path)),
            ),
            Problem::Unreadable { path, reason } => (
                "orphan-worktree",
                path.display().to_string(),
                format!("not a worktree app can read: {reason}"),
                "none: look at it and move it out of .app/worktrees/ yourself".into(),
            ),
            Problem::DanglingMetadata { name, admin } => (
                "worktree-metadata",
                name.clone(),
                format!(
                    "git still lists worktree {name} ({}) whose directory is gone",
                    admin.display()
                ),
                "remove git's record of this one worktree (a detached HEAD in it is kept on refs/app/rescue/); if you moved the directory yourself, run 'git worktree repair <new path>' instead".into(),
            ),
            Problem::IdleBranch { branch } => (
                "idle-branch",
                branch.clone(),
                "no live owner and no commits beyond its base".into(),
                "delete the branch (it holds nothing its base lacks)".into(),
            ),
            Problem::StaleBranchEntry { branch, reason } => (
                "branch-entry",
                branch.clone(),
                reason.clone(),
                "remove the entry".into(),
            ),
            Problem::LapsedLock { name, reason } => (
                "lapsed-lock",
                name.clone(),
                format!("held by a dead holder: {reason}"),
                "release it (its fencing token is kept)".into(),
            ),
            Problem::Locks { reason } => (
                "locks",
                ".app/locks/named".into(),
                reason.clone(),
                "none: look at the file named".into(),
            ),
            Problem::LapsedReservations { count, forged } => (
                "reservations",
                ".app/locks/reservations.json".into(),
                format!("{count} lapsed and {forged} forged reservation(s)"),
                "drop them".into(),
            ),
            Problem::OrphanInbox { owner, files } => (
                "messages",
                owner.clone(),
                format!("{files} message file(s) for an instance that is gone"),
                "move them to dead/ (untrusted ones to quarantine/)".into(),
            ),
            Problem::Messages {
                owner,
                expired,
                untrusted,
            } => (
                "messages",
                owner.clone(),
                format!("{expired} expired and {untrusted} untrusted message(s) in its inbox"),
                "move them to dead/ and quarantine/".into(),
            ),
            Problem::TempFile { path } => (
                "temp-file",
                path.display().to_string(),
                "left by a writer that is gone".into(),
                "remove it".into(),
            ),
            Problem::StaleSocket { path, reason } => (
                "socket",
                path.display().to_string(),
                format!("control socket of an instance that {reason}"),
                "remove it".into(),
            ),
            Problem::Database { reason } => (
                "database",
                "database".into(),
                reason.clone(),
                "none: see 'app db status' and docs/DATABASE.md".into(),
            ),
            Problem::Unmirrored { record } => (
                "database",
                record.id.clone(),
                "live instance missing from the database".into(),
                "write its row".into(),
            ),
        };
        Finding {
            kind,
            subject,
            problem,
            fix,
            fixable: self.fixable(),
        }
    }

    /// Whether `--fix` can do anything about it (else it is the user's to resolve).
    pub(super) fn fixable(&self) -> bool {
        !matches!(
            self,
            Problem::InUse { .. }
                | Problem::NeedsUser { .. }
                | Problem::StateDirNotDir { .. }
                | Problem::Unreadable { .. }
                | Problem::Locks { .. }
                | Problem::Database { .. }
        )
    }
}

/// What `--fix` does about a dead or orphaned instance whose worktree is at `worktree`.
fn reclaim_plan(worktree: Option<&Path>) -> String {
    match worktree {
        Some(path) if path.exists() => "save uncommitted work on refs/app/rescue/<id>, remove the worktree, keep the branch if it has commits, unregister".into(),
        _ => "remove git's record of the worktree, keep the branch if it has commits, unregister".into(),
    }
}
