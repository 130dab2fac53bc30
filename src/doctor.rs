//! `app doctor`: find every kind of stale state a crash can leave, and reclaim it without
//! losing anyone's work.
//!
//! Invariants:
//! - [`diagnose`] only reads: the state directory is byte-identical afterwards.
//! - [`fix`] never deletes work: a dirty worktree is first saved on `refs/app/rescue/<id>`
//!   ([`worktree::rescue`]), a branch with commits beyond its base is kept, and only `--force`
//!   discards either. Only worktrees under `.app/worktrees/` and git's records of them are
//!   touched; `git worktree prune` is never run repository-wide.
//! - Anything in use is left alone, and "in use" is asked of the operating system, not only of
//!   the registry (which `git clean -fdx` or a lost secret can take away): a worktree that a
//!   live process uses ([`crate::inuse`]) is never reclaimed, whatever the registry says; one
//!   whose supervisor lives is re-adopted (the supervisor registers it again). An intent
//!   whose writer still works and a temp file whose writer lives are left alone too.
//! - Every removal goes through [`worktree::remove`]. A worktree only its user can decide
//!   about (locked, holding a nested repository) is reported, never retried, so a second
//!   `doctor --fix` finds nothing new. Two `doctor --fix` at once: one waits for the other.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use git2::{BranchType, Oid, Repository};
use serde::Serialize;

use crate::config::Timing;
use crate::db::{self, Db, DbSettings, Location, instances};
use crate::error::{Error, GitContext, Result};
use crate::inuse::{self, Scan, Supervisor};
use crate::journal::{self, Intent, Operation};
use crate::lock::Locks;
use crate::paths::AppPaths;
use crate::process::{self, ProcessIdentity};
use crate::queue::{self, Inbox};
use crate::reclaim::{self, Work};
use crate::registry::{Entry, InstanceRecord, Liveness, Registry, Snapshot};
use crate::reserve::Reservations;
use crate::sign::SigningKey;
use crate::state;
use crate::worktree;

/// How `doctor` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Heartbeat limits, for liveness.
    pub timing: Timing,
    /// Discard instead of rescuing: dirty worktrees go without a rescue commit, branches with
    /// commits beyond their base are deleted.
    pub force: bool,
    /// `--db`, for the database checks.
    pub db: Option<PathBuf>,
}

impl Options {
    /// What a reclaim does with the work it finds.
    fn work(&self) -> Work {
        if self.force {
            Work::Discard
        } else {
            Work::Save
        }
    }
}

/// One finding, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Kind of problem (stable, for machines).
    pub kind: &'static str,
    /// What it is about: an instance id, a path, a branch.
    pub subject: String,
    /// What is wrong.
    pub problem: String,
    /// What `--fix` does about it, or why it cannot.
    pub fix: String,
    /// Whether `--fix` can reclaim it.
    pub fixable: bool,
}

/// What `--fix` did about a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fixed {
    /// The finding.
    pub finding: Finding,
    /// What was done (or the error that stopped it).
    pub outcome: std::result::Result<String, String>,
}

/// A problem with what fixing it needs.
#[derive(Debug, Clone)]
enum Problem {
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
    fn finding(&self) -> Finding {
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

    fn fixable(&self) -> bool {
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

fn reclaim_plan(worktree: Option<&Path>) -> String {
    match worktree {
        Some(path) if path.exists() => "save uncommitted work on refs/app/rescue/<id>, remove the worktree, keep the branch if it has commits, unregister".into(),
        _ => "remove git's record of the worktree, keep the branch if it has commits, unregister".into(),
    }
}

/// What [`diagnose`] found.
#[derive(Debug, Default)]
pub struct Diagnosis {
    problems: Vec<Problem>,
    /// Things worth knowing that need no fixing (dead letters, quarantined files).
    pub notices: Vec<String>,
}

impl Diagnosis {
    /// Every finding, in the order `--fix` handles them.
    pub fn findings(&self) -> Vec<Finding> {
        self.problems.iter().map(Problem::finding).collect()
    }

    /// Whether `--fix` could reclaim anything.
    fn any_fixable(&self) -> bool {
        self.problems.iter().any(Problem::fixable)
    }
}

/// Looks at everything, changes nothing.
pub fn diagnose(paths: &AppPaths, options: &Options) -> Result<Diagnosis> {
    let mut found = Diagnosis::default();
    if !paths.state_dir().is_dir() {
        if fs::symlink_metadata(paths.state_dir()).is_ok() {
            found.problems.push(Problem::StateDirNotDir {
                path: paths.state_dir().to_path_buf(),
            });
        }
        return Ok(found);
    }
    let key = if std::env::var_os("APP_SHARED_SECRET").is_none() && !paths.secret().exists() {
        found.problems.push(Problem::MissingSecret);
        None
    } else {
        SigningKey::load(paths, false)?
    };
    let snapshot = match Registry::open_read_only(paths)?.snapshot() {
        Ok(snapshot) => snapshot,
        // Diagnose the rest as if it were empty: what is in use stays protected by the scan.
        Err(Error::Corrupt { path, source }) => {
            found.problems.push(Problem::CorruptFile {
                path,
                reason: source.to_string(),
            });
            Snapshot::default()
        }
        Err(err) => return Err(err),
    };
    let repo = Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))?;
    let stale_after = options.timing.stale_after;
    let scan = Scan::take();

    // Interrupted operations first: finishing them changes what the rest sees.
    let mut journaled = Vec::new();
    for entry in journal::list(paths, key.as_ref())? {
        match entry {
            Ok(intent) => {
                journaled.push(intent.instance.clone());
                if !intent.writer_alive() {
                    found.problems.push(Problem::HalfDone(intent));
                }
            }
            Err((path, reason)) => found
                .problems
                .push(Problem::UntrustedIntent { path, reason }),
        }
    }

    for entry in &snapshot.instances {
        let record = match entry {
            Entry::Forged { key, reason } => {
                let problem = unregistered_in_use(paths, &scan, key).unwrap_or_else(|| {
                    Problem::ForgedInstance {
                        key: key.clone(),
                        reason: reason.clone(),
                    }
                });
                found.problems.push(problem);
                continue;
            }
            Entry::Valid(record) => record,
        };
        if journaled.contains(&record.id) {
            continue;
        }
        if let Liveness::Stale(reason) = record.liveness(stale_after) {
            let users = record
                .worktree
                .as_deref()
                .filter(|path| *path == paths.worktree(&record.id))
                .map(|path| {
                    inuse::worktree_users(&scan, path, &paths.git_worktree_admin(&record.id))
                })
                .unwrap_or_default();
            let needs_user = record
                .worktree
                .as_deref()
                .filter(|path| *path == paths.worktree(&record.id) && path.exists())
                .and_then(|_| worktree::user_must_decide(paths, &record.id));
            match (inuse::instance_running(record), needs_user) {
                (Some(why), _) => found.problems.push(Problem::InUse {
                    id: record.id.clone(),
                    reason: format!("stale ({reason}) but {why}"),
                }),
                _ if !users.is_empty() => found.problems.push(Problem::InUse {
                    id: record.id.clone(),
                    reason: format!(
                        "stale ({reason}) but its worktree is in use by {}",
                        inuse::describe(&users)
                    ),
                }),
                (None, Some(why)) => found.problems.push(Problem::NeedsUser {
                    id: record.id.clone(),
                    reason: format!("dead instance ({reason}) whose worktree is kept: {why}"),
                }),
                (None, None) => found.problems.push(Problem::DeadInstance {
                    record: record.clone(),
                    reason,
                }),
            }
        }
    }

    worktree_problems(
        paths,
        &repo,
        &snapshot,
        (&scan, &journaled),
        stale_after,
        &mut found,
    )?;
    stale_ref_locks(paths, &scan, &mut found.problems);
    branch_problems(&repo, &snapshot, stale_after, &mut found)?;
    coordination_problems(paths, key.as_ref(), &snapshot, stale_after, &mut found)?;
    stale_sockets(paths, &snapshot, stale_after, &mut found.problems);
    temp_files(paths.state_dir(), paths, &mut found.problems);
    permissions(paths.state_dir(), paths, &mut found.problems);
    database_problems(paths, &snapshot, options, &mut found);
    Ok(found)
}

/// The problem of worktree `id` when a live process uses it although no valid registry entry
/// says so: re-adopted when its supervisor lives, else left alone while it is used.
fn unregistered_in_use(paths: &AppPaths, scan: &Scan, id: &str) -> Option<Problem> {
    let path = paths.worktree(id);
    let admin = paths.git_worktree_admin(id);
    if !path.is_dir() {
        return None;
    }
    let users = inuse::worktree_users(scan, &path, &admin);
    if users.is_empty() {
        return None;
    }
    let described = inuse::describe(&users);
    Some(
        match Supervisor::load(&admin).filter(Supervisor::alive_elsewhere) {
            Some(supervisor) => Problem::Readopt {
                id: id.to_string(),
                users: described,
                supervisor: supervisor.process.pid,
            },
            None => Problem::InUse {
                id: id.to_string(),
                reason: format!(
                    "in use by {described}, not registered and without a live supervisor; left alone while it is used (stop those processes, then run 'app doctor --fix')"
                ),
            },
        },
    )
}

fn worktree_problems(
    paths: &AppPaths,
    repo: &Repository,
    snapshot: &Snapshot,
    (scan, journaled): (&Scan, &[String]),
    stale_after: std::time::Duration,
    found: &mut Diagnosis,
) -> Result<()> {
    // Forged entries were judged with their worktree above.
    let owned = |id: &str, path: &Path| {
        snapshot.instances.iter().any(|entry| match entry {
            Entry::Valid(r) => r.worktree.as_deref() == Some(path),
            Entry::Forged { key, .. } => key == id,
        })
    };
    let dir = paths.worktrees_dir();
    if let Ok(entries) = fs::read_dir(&dir) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for id in names {
            let path = paths.worktree(&id);
            if owned(&id, &path) || journaled.contains(&id) {
                continue;
            }
            if let Some(problem) = unregistered_in_use(paths, scan, &id) {
                found.problems.push(problem);
                continue;
            }
            match Repository::open(&path) {
                Ok(_) if repo.find_worktree(&id).is_ok() => {
                    match worktree::user_must_decide(paths, &id) {
                        None => found.problems.push(Problem::OrphanWorktree { id, path }),
                        Some(reason) => found.problems.push(Problem::NeedsUser { id, reason }),
                    }
                }
                Ok(_) => found.problems.push(Problem::Unreadable {
                    path,
                    reason: format!("git has no worktree named {id}"),
                }),
                Err(err) => found.problems.push(Problem::Unreadable {
                    path,
                    reason: err.message().to_string(),
                }),
            }
        }
    }
    // git's records of app's worktrees whose directory is gone; others' are not ours to judge.
    let worktrees = repo
        .worktrees()
        .git_context(|| "listing worktrees".into())?;
    for name in worktrees.iter().flatten().flatten() {
        let admin = repo.path().join("worktrees").join(name);
        let Some(path) = fs::read_to_string(admin.join("gitdir"))
            .ok()
            .and_then(|gitdir| Path::new(gitdir.trim()).parent().map(Path::to_path_buf))
        else {
            continue;
        };
        if path == paths.worktree(name)
            && !path.exists()
            && !journaled.iter().any(|id| id == name)
            && snapshot.instance(name).is_none_or(|r| {
                inuse::instance_running(r).is_none() && r.liveness(stale_after) != Liveness::Live
            })
        {
            found.problems.push(Problem::DanglingMetadata {
                name: name.to_string(),
                admin,
            });
        }
    }
    Ok(())
}

fn branch_problems(
    repo: &Repository,
    snapshot: &Snapshot,
    stale_after: std::time::Duration,
    found: &mut Diagnosis,
) -> Result<()> {
    let live_owner = |id: &str| {
        snapshot.instance(id).is_some_and(|r| {
            r.liveness(stale_after) == Liveness::Live || inuse::instance_running(r).is_some()
        })
    };
    let mut candidates: Vec<String> = Vec::new();
    for entry in &snapshot.branches {
        match entry {
            Entry::Forged { key, reason } => found.problems.push(Problem::StaleBranchEntry {
                branch: key.clone(),
                reason: format!("entry does not verify: {reason}"),
            }),
            Entry::Valid(record) => {
                if repo.find_branch(&record.branch, BranchType::Local).is_err() {
                    if !live_owner(&record.instance) {
                        found.problems.push(Problem::StaleBranchEntry {
                            branch: record.branch.clone(),
                            reason: "the branch it describes is gone".into(),
                        });
                    }
                } else if record.created_branch {
                    candidates.push(record.branch.clone());
                }
            }
        }
    }
    let branches = repo
        .branches(Some(BranchType::Local))
        .git_context(|| "listing branches".into())?;
    for (branch, _) in branches.flatten() {
        // `app/<id>` is an instance's own branch; `app/<run>/<task>` and deeper belong to
        // orchestrated runs, whose branches are their results and are never idle.
        if let Ok(Some(name)) = branch.name()
            && name
                .strip_prefix("app/")
                .is_some_and(|id| !id.contains('/'))
            && !candidates.iter().any(|c| c == name)
        {
            candidates.push(name.to_string());
        }
    }
    candidates.sort();
    for name in candidates {
        let record = snapshot.branches.iter().find_map(|entry| match entry {
            Entry::Valid(record) if record.branch == name => Some(record),
            _ => None,
        });
        if record.is_some_and(|r| live_owner(&r.instance))
            || worktree::checked_out_in(repo, &name)?.is_some()
        {
            continue;
        }
        let base = record.and_then(|r| r.base.parse::<Oid>().ok());
        if holds_nothing_new(repo, &name, base)? {
            found.problems.push(Problem::IdleBranch { branch: name });
        }
    }
    Ok(())
}

/// Whether branch `name` holds no commit beyond `base` (when unknown: beyond any other local
/// branch).
fn holds_nothing_new(repo: &Repository, name: &str, base: Option<Oid>) -> Result<bool> {
    let Some(tip) = worktree::branch_tip(repo, name)? else {
        return Ok(false);
    };
    if let Some(base) = base {
        return Ok(worktree::commits_beyond(repo, tip, base)? == 0);
    }
    let branches = repo
        .branches(Some(BranchType::Local))
        .git_context(|| "listing branches".into())?;
    for (branch, _) in branches.flatten() {
        if branch.name().ok().flatten() == Some(name) {
            continue;
        }
        if let Some(other) = branch.get().target()
            && worktree::commits_beyond(repo, tip, other)? == 0
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn coordination_problems(
    paths: &AppPaths,
    key: Option<&SigningKey>,
    snapshot: &Snapshot,
    stale_after: std::time::Duration,
    found: &mut Diagnosis,
) -> Result<()> {
    if let Some(locks) = Locks::existing(paths, stale_after)? {
        match locks.list() {
            Ok(all) => {
                for (state, lapsed) in all {
                    if let (Some(_), Some(reason)) = (&state.holder, lapsed) {
                        found.problems.push(Problem::LapsedLock {
                            name: state.name,
                            reason,
                        });
                    }
                }
            }
            Err(err) => found.problems.push(Problem::Locks {
                reason: err.to_string(),
            }),
        }
    }
    let reservations = Reservations::open(paths, stale_after)?;
    if paths.reservations().exists() {
        let all = reservations.list()?;
        let lapsed = all
            .iter()
            .filter(|entry| matches!(entry, Ok((_, Some(_)))))
            .count();
        let forged = all.iter().filter(|entry| entry.is_err()).count();
        if lapsed + forged > 0 {
            found.problems.push(Problem::LapsedReservations {
                count: lapsed,
                forged,
            });
        }
    }
    let max = queue::max_message_bytes()?;
    for owner in subdirectories(&paths.queue_dir().join("inbox")) {
        let inbox = Inbox::new(paths, &owner, key.cloned(), max);
        let (messages, swept) = inbox.inspect()?;
        if snapshot.instance(&owner).is_none() {
            let files = messages.len() + swept.expired + swept.quarantined;
            if files > 0 {
                found.problems.push(Problem::OrphanInbox { owner, files });
            }
        } else if swept.expired + swept.quarantined > 0 {
            found.problems.push(Problem::Messages {
                owner,
                expired: swept.expired,
                untrusted: swept.quarantined,
            });
        }
    }
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
            found.notices.push(format!(
                "{count} {what} {} (kept for you to read)",
                dir.display()
            ));
        }
    }
    Ok(())
}

fn subdirectories(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `*.lock` files of app's refs (`refs/heads/app/`, `refs/app/`) that no live process has
/// open: git and libgit2 hold a ref's lock file open while they change it, so one nobody holds
/// was left by a writer killed half-way, and blocks the ref for good. Young ones are left for
/// a writer that may be about to open them.
fn stale_ref_locks(paths: &AppPaths, scan: &Scan, problems: &mut Vec<Problem>) {
    let refs = paths.git_common_dir().join("refs");
    let mut dirs = vec![refs.join("heads/app"), refs.join("app")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > Duration::from_secs(1)));
            if path.extension().is_some_and(|e| e == "lock") && old && scan.users(&path).is_empty()
            {
                problems.push(Problem::StaleRefLock { path });
            }
        }
    }
}

/// Control sockets whose instance is gone, or was never this socket's owner.
fn stale_sockets(
    paths: &AppPaths,
    snapshot: &Snapshot,
    stale_after: std::time::Duration,
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
fn temp_files(dir: &Path, paths: &AppPaths, problems: &mut Vec<Problem>) {
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
fn permissions(dir: &Path, paths: &AppPaths, problems: &mut Vec<Problem>) {
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

fn database_problems(
    paths: &AppPaths,
    snapshot: &Snapshot,
    options: &Options,
    found: &mut Diagnosis,
) {
    let location = match Location::resolve(options.db.as_deref()) {
        Ok(location) => location,
        Err(err) => {
            found.problems.push(Problem::Database {
                reason: err.to_string(),
            });
            return;
        }
    };
    if let Location::Local(path) = &location
        && !path.exists()
    {
        found
            .notices
            .push(format!("no database at {} yet", path.display()));
        return;
    }
    let checked = (|| -> Result<Vec<Problem>> {
        db::runtime()?.block_on(async {
            let db = Db::open(location.clone(), DbSettings::from_env()?).await?;
            let mut problems = Vec::new();
            let check = db.check(false).await?;
            if check != "ok" {
                problems.push(Problem::Database {
                    reason: format!("quick_check of {location}: {check}"),
                });
            }
            let version = db::schema::version(&db).await?;
            if version > db::schema::LATEST {
                problems.push(Problem::Database {
                    reason: format!(
                        "schema version {version} is newer than this app's ({}); upgrade app",
                        db::schema::LATEST
                    ),
                });
            }
            for record in snapshot.valid_instances() {
                if record.liveness(options.timing.stale_after) == Liveness::Live
                    && instances::history(&db, paths.repo_root(), &record.id)
                        .await?
                        .is_empty()
                {
                    problems.push(Problem::Unmirrored {
                        record: record.clone(),
                    });
                }
            }
            Ok(problems)
        })
    })();
    match checked {
        Ok(problems) => found.problems.extend(problems),
        Err(err) => found.problems.push(Problem::Database {
            reason: format!("cannot check the database: {err}"),
        }),
    }
}

/// Reclaims what [`diagnose`] found, in passes until nothing fixable is left (fixing one thing,
/// such as unregistering a dead instance, can reveal another, such as its inbox). Returns what
/// was done and the diagnosis of what is left.
pub fn fix(paths: &AppPaths, options: &Options) -> Result<(Vec<Fixed>, Diagnosis)> {
    // One doctor at a time; a second one waits, then finds what the first left.
    let _one_at_a_time = match paths.state_dir().is_dir() {
        true => Some(state::lock_exclusive(&paths.doctor_lock())?),
        false => None,
    };
    let mut done = Vec::new();
    let mut diagnosis = diagnose(paths, options)?;
    for _ in 0..3 {
        if !diagnosis.any_fixable() {
            break;
        }
        for problem in diagnosis.problems.iter().filter(|p| p.fixable()) {
            let outcome = fix_one(paths, options, problem).map_err(|err| err.to_string());
            done.push(Fixed {
                finding: problem.finding(),
                outcome,
            });
        }
        diagnosis = diagnose(paths, options)?;
    }
    Ok((done, diagnosis))
}

fn fix_one(paths: &AppPaths, options: &Options, problem: &Problem) -> Result<String> {
    let registry = || Registry::open_for_write(paths);
    let repo = || {
        Repository::open(paths.repo_root())
            .git_context(|| format!("opening {}", paths.repo_root().display()))
    };
    match problem {
        Problem::MissingSecret => {
            SigningKey::load_or_create(paths)?;
            Ok(format!("created {}", paths.secret().display()))
        }
        Problem::Permissions { path, want, .. } => {
            match fs::set_permissions(path, fs::Permissions::from_mode(*want)) {
                // Another fix (a temp file's) removed it meanwhile.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok("gone".into()),
                Err(err) => Err(Error::io("changing the mode of", path, err)),
                Ok(()) => Ok(format!("chmod {want:o}")),
            }
        }
        Problem::HalfDone(intent) => reclaim::recover(paths, options.work(), intent),
        Problem::Readopt { id, supervisor, .. } => readopt(paths, options, id, *supervisor),
        Problem::CorruptFile { path, .. } => {
            let aside = path.with_file_name(format!(
                "{}.corrupt-{}",
                path.file_name().unwrap_or_default().to_string_lossy(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
            ));
            let _guard = state::lock_exclusive(&paths.registry_lock())?;
            fs::rename(path, &aside).map_err(|err| Error::io("moving aside", path, err))?;
            Ok(format!("moved it to {}", aside.display()))
        }
        Problem::UntrustedIntent { path, .. } => {
            state::remove_if_present(path)?;
            Ok("removed".into())
        }
        Problem::ForgedInstance { key, .. } => {
            registry()?.update(|tables| Ok(tables.remove_instance(key)))?;
            Ok("removed the entry".into())
        }
        Problem::DeadInstance { record, .. } => {
            // Read again: it may have been restarted since the diagnosis.
            let snapshot = registry()?.snapshot()?;
            match snapshot.instance(&record.id) {
                Some(current)
                    if current.pid == record.pid && current.start_time == record.start_time => {}
                _ => return Ok("it changed meanwhile; left for the next run".into()),
            }
            reclaim::reclaim(
                paths,
                options.work(),
                &record.id,
                record.worktree.as_deref(),
                record.branch.as_deref(),
            )
        }
        Problem::OrphanWorktree { id, path } => {
            let snapshot = registry()?.snapshot()?;
            if snapshot.instance(id).is_some() {
                return Ok("an instance took it meanwhile; left alone".into());
            }
            let branch = Repository::open(path).ok().and_then(|wt| {
                wt.head()
                    .ok()
                    .filter(|h| h.is_branch())
                    .and_then(|h| h.shorthand().ok().map(str::to_string))
            });
            reclaim::reclaim(paths, options.work(), id, Some(path), branch.as_deref())
        }
        Problem::DanglingMetadata { name, admin } => {
            if worktree::forget_missing(paths, name)? {
                Ok(format!("removed {}", admin.display()))
            } else {
                Ok("its directory is back; left alone".into())
            }
        }
        Problem::IdleBranch { branch } => {
            worktree::delete_branch(&repo()?, branch)?;
            registry()?.update(|tables| Ok(tables.remove_branch(branch)))?;
            Ok("deleted".into())
        }
        Problem::StaleBranchEntry { branch, .. } => {
            registry()?.update(|tables| Ok(tables.remove_branch(branch)))?;
            Ok("removed the entry".into())
        }
        Problem::LapsedLock { name, .. } => {
            let locks = Locks::open(paths, options.timing.stale_after)?;
            let holder = crate::lock::Holder::process(ProcessIdentity::current());
            locks.release(name, &holder, true)?;
            Ok("released".into())
        }
        Problem::LapsedReservations { .. } => {
            let dropped = Reservations::open(paths, options.timing.stale_after)?.prune()?;
            Ok(format!("dropped {dropped}"))
        }
        Problem::OrphanInbox { owner, .. } => {
            let key = SigningKey::load(paths, false)?;
            let inbox = Inbox::new(paths, owner, key, queue::max_message_bytes()?);
            let moved = inbox.retire(&format!("instance {owner} is gone"))?;
            let acked = paths.acked(owner);
            if acked.exists() {
                fs::remove_dir_all(&acked).map_err(|err| Error::io("removing", &acked, err))?;
            }
            let _ = fs::remove_dir(inbox.dir());
            Ok(format!("moved {moved} file(s) aside"))
        }
        Problem::Messages { owner, .. } => {
            let key = SigningKey::load(paths, false)?;
            let (_, swept) =
                Inbox::new(paths, owner, key, queue::max_message_bytes()?).pending()?;
            Ok(format!(
                "moved {} to dead/ and {} to quarantine/",
                swept.expired, swept.quarantined
            ))
        }
        Problem::StaleRefLock { path } => {
            // Asked again, fresh: a writer holds its lock file open while it works.
            let users = Scan::take().users(path);
            if !users.is_empty() {
                return Ok(format!(
                    "held again by {}; left alone",
                    inuse::describe(&users)
                ));
            }
            state::remove_if_present(path)?;
            Ok("removed".into())
        }
        Problem::TempFile { path } | Problem::StaleSocket { path, .. } => {
            state::remove_if_present(path)?;
            Ok("removed".into())
        }
        Problem::Unmirrored { record } => {
            let row = instances::InstanceRow::from_record(record, paths.repo_root());
            db::runtime()?.block_on(async {
                let db = Db::open_default(options.db.as_deref()).await?;
                instances::upsert(&db, &row).await
            })?;
            Ok("wrote its row".into())
        }
        Problem::InUse { .. }
        | Problem::NeedsUser { .. }
        | Problem::StateDirNotDir { .. }
        | Problem::Unreadable { .. }
        | Problem::Locks { .. }
        | Problem::Database { .. } => Ok("not fixable".into()),
    }
}

/// Waits (a few heartbeats at most) for the live supervisor of worktree `id` to register it
/// again; its heartbeat re-creates a lost or unverifiable entry.
fn readopt(paths: &AppPaths, options: &Options, id: &str, supervisor: u32) -> Result<String> {
    let deadline =
        std::time::Instant::now() + options.timing.heartbeat_interval * 3 + Duration::from_secs(1);
    loop {
        let snapshot = Registry::open_read_only(paths)?.snapshot()?;
        if snapshot.instance(id).is_some() {
            return Ok(format!(
                "re-adopted: its supervisor (pid {supervisor}) registered it again"
            ));
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Failed(format!(
                "its supervisor (pid {supervisor}) did not register it again in time; it is left alone while it is used"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
