//! The kinds of problem `doctor` finds, each with the data fixing it needs, and the text
//! reported for each (kind, subject, problem, fix). The texts and kinds are stable: tests and
//! machines read them.

use std::path::{Path, PathBuf};

use super::Finding;
use crate::db::fleet::{Held, HostRow};
use crate::db::holds::{HolderRow, LockRow, ReservationRow};
use crate::ids::{InstanceId, LockName};
use crate::journal::{Intent, Operation};
use crate::queue::InboxName;
use crate::registry::InstanceRecord;
use crate::time::format_age;

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
        id: InstanceId,
        path: PathBuf,
    },
    Unreadable {
        path: PathBuf,
        reason: String,
    },
    DanglingMetadata {
        name: InstanceId,
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
        name: LockName,
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
        owner: InboxName,
        files: usize,
    },
    Messages {
        owner: InboxName,
        expired: usize,
        untrusted: usize,
    },
    StaleSocket {
        path: PathBuf,
        reason: String,
    },
    /// The agent-state files of instance `id` (`.app/activity/`), with what each was when
    /// judged, while nothing of that instance runs.
    LeftoverActivity {
        id: String,
        files: Vec<(PathBuf, FileStamp)>,
        reason: String,
    },
    /// The record of a lock waiter (`locks/waiting/<pid>-<start>.json`) whose process is gone.
    DeadWaiter {
        path: PathBuf,
        pid: u32,
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
    /// A fleet host not stopped whose heartbeat is older than the lease TTL, with the leases
    /// it still holds (`run/task#attempt (token N)`).
    DeadHost {
        host: HostRow,
        ttl_ms: i64,
        holds: Vec<String>,
    },
    /// A lease past its expiry (by the server's clock).
    ExpiredLease {
        lease: Held,
    },
    /// Copies in the fleet's message table for `recipient` on this host and in this
    /// repository, waiting past their TTL.
    FleetMessages {
        recipient: String,
        count: i64,
    },
    /// A fleet lock whose holder is dead (`reason`), as `fleet_holds` judges it.
    DeadFleetLock {
        lock: LockRow,
        holder: HolderRow,
        reason: String,
    },
    /// A fleet reservation whose holder is dead (`reason`).
    DeadFleetReservation {
        row: ReservationRow,
        reason: String,
    },
    /// A task branch or attempt ref on the remote that no run needs any more, or that no run
    /// of the database references.
    FleetRef {
        name: String,
        commit: String,
        state: FleetRefState,
    },
}

/// What tells one version of a file from the next (inode, modification time, size):
/// `write_atomic` renames a new inode in, so a file written again since it was judged differs.
pub(super) type FileStamp = (u64, std::time::SystemTime, u64);

/// The stamp of the file at `path`, if there is one.
pub(super) fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    Some((meta.ino(), meta.modified().ok()?, meta.len()))
}

/// What a task ref on the remote is to the runs of the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FleetRefState {
    /// An attempt ref of finished run `run` whose commit the task branch `branch` on the
    /// remote contains: deleting it loses nothing.
    Taken { run: String, branch: String },
    /// An attempt ref of finished run `run` holding commits its task branch lacks (an attempt
    /// the run did not take: a zombie's, or one whose end never came).
    HoldsWork { run: String, status: String },
    /// A task branch or attempt ref of a run the database does not know.
    NoRun { run: String },
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
                intent.instance.to_string(),
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
                record.id.to_string(),
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
                id.to_string(),
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
                name.to_string(),
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
                name.to_string(),
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
                owner.to_string(),
                format!("{files} message file(s) for an instance that is gone"),
                "move them to dead/ (untrusted ones to quarantine/)".into(),
            ),
            Problem::Messages {
                owner,
                expired,
                untrusted,
            } => (
                "messages",
                owner.to_string(),
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
            Problem::LeftoverActivity { id, files, reason } => (
                "activity",
                id.clone(),
                format!(
                    "{} agent-state file(s) in .app/activity/ of an instance that {reason}",
                    files.len()
                ),
                "remove them (after a fresh look that nothing of it runs and they were not written again)".into(),
            ),
            Problem::DeadWaiter { path, pid } => (
                "lock-waiter",
                path.display().to_string(),
                format!("the record of a lock waiter (pid {pid}) that is gone"),
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
                record.id.to_string(),
                "live instance missing from the database".into(),
                "write its row".into(),
            ),
            Problem::DeadHost {
                host,
                ttl_ms,
                holds,
            } => dead_host(host, *ttl_ms, holds),
            Problem::ExpiredLease { lease } => expired_lease(lease),
            Problem::FleetMessages { recipient, count } => (
                "fleet-messages",
                recipient.clone(),
                format!("{count} message(s) from other hosts waiting past their TTL in the fleet's message table"),
                "move them to dead/ as its receiving side does (untrusted ones to quarantine/); the table keeps its record".into(),
            ),
            Problem::DeadFleetLock {
                lock,
                holder,
                reason,
            } => (
                "fleet-lock",
                lock.name.clone(),
                format!(
                    "held (token {}) by {} on host {}, which is dead: {reason}",
                    lock.token,
                    holder_text(holder),
                    holder.host
                ),
                "release it (only while that holder still holds it under that token and is still dead); the next grant gets a higher token".into(),
            ),
            Problem::DeadFleetReservation { row, reason } => (
                "fleet-reservation",
                row.id.clone(),
                format!(
                    "{} reserved {} by {} on host {}, which is dead: {reason}",
                    if row.shared { "shared" } else { "exclusive" },
                    row.patterns.join(", "),
                    holder_text(&row.holder),
                    row.holder.host
                ),
                "drop it (only while that holder is still dead)".into(),
            ),
            Problem::FleetRef {
                name,
                commit,
                state,
            } => fleet_ref(name, commit, state),
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
                | Problem::ExpiredLease {
                    lease: Held {
                        host_alive: true,
                        ..
                    }
                }
                | Problem::FleetRef {
                    state: FleetRefState::HoldsWork { .. } | FleetRefState::NoRun { .. },
                    ..
                }
        )
    }
}

type Text = (&'static str, String, String, String);

/// "instance 3f9a1c2e (pid 12)" or "pid 12".
fn holder_text(holder: &HolderRow) -> String {
    match &holder.instance {
        Some(instance) => format!("instance {instance} (pid {})", holder.pid),
        None => format!("pid {}", holder.pid),
    }
}

fn dead_host(host: &HostRow, ttl_ms: i64, holds: &[String]) -> Text {
    let age = |ms: i64| format_age(std::time::Duration::from_millis(ms.max(0) as u64));
    let holding = match holds {
        [] => "it holds no lease".to_string(),
        _ => format!("it still holds {}", holds.join(", ")),
    };
    (
        "dead-host",
        host.name.clone(),
        format!(
            "its worker (pid {}, {}) has sent no heartbeat for {} (lease TTL {}) and did not stop; {holding}",
            host.pid,
            host.state,
            age(host.heartbeat_age_ms),
            age(ttl_ms)
        ),
        "mark it stopped (its row is kept: if that worker comes back, its next heartbeat makes it live again); its leases are handed back once expired (expired-lease)".into(),
    )
}

fn expired_lease(lease: &Held) -> Text {
    let ago = format_age(std::time::Duration::from_millis(
        lease.expired_ms.unwrap_or(0).max(0) as u64,
    ));
    let problem = format!(
        "attempt {} on host {} (token {}): its lease expired {ago} ago (server clock)",
        lease.attempt, lease.host, lease.token
    );
    let (problem, fix) = match lease.host_alive {
        true => (
            format!("{problem}, but its host is alive"),
            "none while its host is alive (a live worker renews its leases, or gives them back); if it stays, stop that worker".into(),
        ),
        false => (
            problem,
            "hand the task back to the fleet (offered again, host and token cleared): the next free host runs it as a new attempt; what the dead attempt pushed stays on its ref".into(),
        ),
    };
    (
        "expired-lease",
        format!("{}/{}", lease.run_id, lease.task_id),
        problem,
        fix,
    )
}

fn fleet_ref(name: &str, commit: &str, state: &FleetRefState) -> Text {
    let by_hand = format!(
        "none: it may hold work; look at it (git fetch origin {name} && git log FETCH_HEAD), and delete it yourself when it holds nothing you need: git push --force-with-lease={name}:{commit} origin :{name}"
    );
    let (problem, fix) = match state {
        FleetRefState::Taken { run, branch } => (
            format!("attempt ref of finished run {run}; its commit is on the task branch {branch}"),
            format!(
                "delete it on the remote (only while it still holds {commit}); its work stays on {branch}"
            ),
        ),
        FleetRefState::HoldsWork { run, status } => (
            format!(
                "attempt ref of {status} run {run} holding commits its task branch lacks (an attempt the run did not take)"
            ),
            by_hand,
        ),
        FleetRefState::NoRun { run } => (
            format!("no run {run} in the database references it"),
            by_hand,
        ),
    };
    ("fleet-ref", name.to_string(), problem, fix)
}

/// What `--fix` does about a dead or orphaned instance whose worktree is at `worktree`.
fn reclaim_plan(worktree: Option<&Path>) -> String {
    match worktree {
        Some(path) if path.exists() => "save uncommitted work on refs/app/rescue/<id>, remove the worktree, keep the branch if it has commits, unregister".into(),
        _ => "remove git's record of the worktree, keep the branch if it has commits, unregister".into(),
    }
}
