//! [`fix`]: reclaim what [`diagnose`] found, one doctor at a time (under `doctor.lock`), in
//! passes until nothing fixable is left. Each fix reads again what it acts on: what changed
//! since the diagnosis is left for the next pass or the next run. Instances and interrupted
//! operations are reclaimed through [`crate::reclaim`].

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use git2::{ErrorCode, Repository};

use super::problem::{FleetRefState, Problem};
use super::{Diagnosis, Fixed, Options, diagnose, files, fleet, git};
use crate::coordination::Coordination;
use crate::db::{Blocking, DbSettings, instances};
use crate::error::{Error, Result};
use crate::ids::InstanceId;
use crate::inuse;
use crate::lock::Holder;
use crate::paths::AppPaths;
use crate::process::ProcessIdentity;
use crate::queue::InboxName;
use crate::reclaim::{self, Reclaimer};
use crate::registry::{InstanceRecord, Registry};
use crate::sign::Keys;
use crate::state;
use crate::time;
use crate::worktree::{
    self,
    reflock::{self, RefLock},
};

/// Passes of fixes at most: each one fixes what the one before revealed.
const PASSES: usize = 3;

/// Reclaims what [`diagnose`] found, in passes until nothing fixable is left (fixing one thing,
/// such as unregistering a dead instance, can reveal another, such as its inbox). Returns what
/// was done and the diagnosis of what is left.
#[tracing::instrument(skip_all, fields(repo = %paths.repo_root().display()))]
pub fn fix(paths: &AppPaths, keys: &Keys, options: &Options) -> Result<(Vec<Fixed>, Diagnosis)> {
    // One doctor at a time; a second one waits, then finds what the first left.
    let _one_at_a_time = match paths.state_dir().is_dir() {
        true => Some(state::lock_exclusive(&paths.doctor_lock())?),
        false => None,
    };
    let mut done = Vec::new();
    // The reclaims need the refs whose lock files a writer killed a moment ago left.
    git::await_young_ref_locks(paths);
    let mut diagnosis = diagnose(paths, keys, options)?;
    // Fixes a lock file stopped: they waited for it already, a later pass would wait again.
    let mut locked_out = Vec::new();
    for _ in 0..PASSES {
        if !diagnosis.any_fixable() {
            break;
        }
        let problems: Vec<&Problem> = diagnosis
            .problems
            .iter()
            .filter(|p| p.fixable() && !locked_out.contains(&p.finding()))
            .collect();
        // Described before they are fixed: a finding's text looks at what it is about.
        let findings: Vec<_> = problems.iter().map(|p| p.finding()).collect();
        let outcomes = fix_all(paths, keys, options, &problems);
        for (finding, outcome) in findings.into_iter().zip(outcomes) {
            if outcome.as_ref().is_err_and(ref_locked) {
                locked_out.push(finding.clone());
            }
            done.push(Fixed {
                finding,
                outcome: outcome.map_err(|err| failure(&err)),
            });
        }
        diagnosis = diagnose(paths, keys, options)?;
    }
    Ok((done, diagnosis))
}

/// Fixes `problems` in their order, the outcome of each in the same order. A row of instance
/// reclaims (one worktree each: an in-use proof, a comparison with HEAD, a rescue, a removal)
/// shares the cores: up to [`RECLAIMERS`] threads, each with its own repository handle, take
/// the next one in turn. They are independent: each acts on its own worktree, branch and
/// intent, and the registry, git's refs and the rescue refs take their locks as they do when
/// two processes reclaim.
fn fix_all(
    paths: &AppPaths,
    keys: &Keys,
    options: &Options,
    problems: &[&Problem],
) -> Vec<Result<String>> {
    let mut outcomes = Vec::with_capacity(problems.len());
    let mut rest = problems;
    while let Some(first) = rest.first() {
        let run = rest.iter().take_while(|p| is_reclaim(p)).count();
        if run > 1 {
            outcomes.extend(reclaim_all(paths, keys, options, &rest[..run]));
            rest = &rest[run..];
        } else {
            outcomes.push(fix_one(paths, keys, options, &mut None, first));
            rest = &rest[1..];
        }
    }
    outcomes
}

/// At most this many threads reclaim instances at once (the cores there are, up to it).
const RECLAIMERS: usize = 4;

/// Whether `problem` is fixed by reclaiming an instance's worktree.
fn is_reclaim(problem: &Problem) -> bool {
    matches!(
        problem,
        Problem::DeadInstance { .. } | Problem::OrphanWorktree { .. }
    )
}

/// [`fix_one`] for each of `problems` (instance reclaims), on as many threads as there are
/// cores (at most [`RECLAIMERS`]); the outcomes in the order of `problems`.
fn reclaim_all(
    paths: &AppPaths,
    keys: &Keys,
    options: &Options,
    problems: &[&Problem],
) -> Vec<Result<String>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, RECLAIMERS)
        .min(problems.len());
    let next = AtomicUsize::new(0);
    let outcomes: Vec<Mutex<Option<Result<String>>>> =
        problems.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut reclaimer = None;
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(problem) = problems.get(index) else {
                        break;
                    };
                    let outcome = fix_one(paths, keys, options, &mut reclaimer, problem);
                    *outcomes[index]
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner()) = Some(outcome);
                }
            });
        }
    });
    outcomes
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|poison| poison.into_inner())
                .expect("every problem is taken by a thread")
        })
        .collect()
}

/// The text of a failed fix. git refusing a change for a lock file (which says who holds it
/// and what to do about it, see [`reflock::retry`]) says what to do next.
fn failure(err: &Error) -> String {
    match ref_locked(err) {
        true => format!("{err}, then run 'app doctor --fix' again"),
        false => err.to_string(),
    }
}

/// Whether `err` is git refusing to change a ref because its lock file is there.
fn ref_locked(err: &Error) -> bool {
    matches!(err, Error::Git { source, .. } if source.code() == ErrorCode::Locked)
}

/// Removes the agent-state files of instance `id` that are as they were when judged, after a
/// fresh look that nothing of any instance they may belong to runs.
fn remove_activity(
    paths: &AppPaths,
    keys: &Keys,
    options: &Options,
    id: &str,
    files: &[(std::path::PathBuf, super::problem::FileStamp)],
) -> Result<String> {
    let snapshot = Registry::open_read_only(paths, keys)?.snapshot()?;
    let stale_after = options.settings.timing.stale_after;
    let mut removed = 0;
    let mut kept = Vec::new();
    for (path, stamp) in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let owners = name
            .as_deref()
            .map(files::activity_owners)
            .unwrap_or_default();
        let running = owners
            .iter()
            .find_map(|owner| files::instance_runs(paths, &snapshot, owner, stale_after).ok());
        if let Some(why) = running {
            kept.push(format!("{} ({why})", path.display()));
        } else if super::problem::file_stamp(path).as_ref() != Some(stamp) {
            kept.push(format!("{} (written again since)", path.display()));
        } else {
            state::remove_if_present(path)?;
            removed += 1;
        }
    }
    Ok(match kept.as_slice() {
        [] => format!("removed {removed} file(s) of {id}"),
        _ => format!(
            "removed {removed} file(s) of {id}; left alone: {}",
            kept.join(", ")
        ),
    })
}

/// The reclaimer of this pass (`slot`), opened when it is first needed.
fn open_reclaimer<'s, 'a>(
    paths: &'a AppPaths,
    keys: &Keys,
    slot: &'s mut Option<Reclaimer<'a>>,
) -> Result<&'s Reclaimer<'a>> {
    if slot.is_none() {
        *slot = Some(Reclaimer::open(paths, keys)?);
    }
    Ok(slot.as_ref().expect("opened just above"))
}

/// Fixes one problem; the text says what was done. Reclaims share `reclaimer`.
fn fix_one<'a>(
    paths: &'a AppPaths,
    keys: &Keys,
    options: &Options,
    reclaimer: &mut Option<Reclaimer<'a>>,
    problem: &Problem,
) -> Result<String> {
    let registry = || Registry::open_for_write(paths, keys);
    match problem {
        Problem::MissingSecret => {
            keys.load_or_create()?;
            Ok(format!("created {}", paths.secret().display()))
        }
        Problem::Permissions { path, want, .. } => chmod(path, *want),
        Problem::HalfDone(intent) => reclaim::recover(paths, keys, options.work(), intent),
        Problem::Readopt { id, supervisor, .. } => readopt(paths, keys, options, id, *supervisor),
        Problem::CorruptFile { path, .. } => move_aside(paths, path),
        Problem::UntrustedIntent { path, .. } => {
            state::remove_if_present(path)?;
            Ok("removed".into())
        }
        Problem::ForgedInstance { key, .. } => {
            registry()?.update(|tables| Ok(tables.remove_instance(key)))?;
            Ok("removed the entry".into())
        }
        Problem::DeadInstance { record, .. } => {
            reclaim_dead(open_reclaimer(paths, keys, reclaimer)?, options, record)
        }
        Problem::OrphanWorktree { id, path } => {
            reclaim_orphan(open_reclaimer(paths, keys, reclaimer)?, options, id, path)
        }
        Problem::DanglingMetadata { name, admin } => {
            if worktree::forget_missing(paths, name)? {
                Ok(format!("removed {}", admin.display()))
            } else {
                Ok("its directory is back; left alone".into())
            }
        }
        Problem::IdleBranch { branch } => {
            worktree::delete_branch(&reclaim::open_repo(paths)?, branch)?;
            registry()?.update(|tables| Ok(tables.remove_branch(branch)))?;
            Ok("deleted".into())
        }
        Problem::StaleBranchEntry { branch, .. } => {
            registry()?.update(|tables| Ok(tables.remove_branch(branch)))?;
            Ok("removed the entry".into())
        }
        Problem::LapsedLock { name, .. } => {
            let locks = Coordination::new(paths, &options.settings).locks()?;
            let holder = Holder::process(ProcessIdentity::current());
            locks.release(name, &holder, true)?;
            Ok("released".into())
        }
        Problem::LapsedReservations { .. } => {
            let dropped = Coordination::new(paths, &options.settings)
                .reservations()?
                .prune()?;
            Ok(format!("dropped {dropped}"))
        }
        Problem::OrphanInbox { owner, .. } => retire_inbox(paths, options, owner),
        Problem::Messages { owner, .. } => sweep_inbox(paths, options, owner),
        Problem::StaleRefLock { path } => remove_ref_lock(path),
        Problem::LeftoverActivity { id, files, .. } => {
            remove_activity(paths, keys, options, id, files)
        }
        Problem::DeadWaiter { path, .. } => {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name
                .as_deref()
                .and_then(super::coordination::waiter_gone)
                .is_none()
            {
                return Ok("its process runs; left alone".into());
            }
            state::remove_if_present(path)?;
            Ok("removed".into())
        }
        Problem::TempFile { path } | Problem::StaleSocket { path, .. } => {
            state::remove_if_present(path)?;
            Ok("removed".into())
        }
        Problem::Unmirrored { record } => write_row(paths, options, record),
        Problem::DeadHost { host, .. } => fleet::stop_host(options, host),
        Problem::ExpiredLease { lease } => fleet::hand_back(options, lease),
        Problem::DeadFleetLock { lock, holder, .. } => fleet::free_lock(options, lock, holder),
        Problem::DeadFleetReservation { row, .. } => fleet::drop_reservation(options, row),
        Problem::FleetMessages { recipient, .. } => {
            fleet::sweep_messages(paths, options, recipient)
        }
        Problem::FleetRef {
            name,
            commit,
            state: FleetRefState::Taken { branch, .. },
        } => fleet::delete_taken(paths, name, commit, branch),
        Problem::FleetRef { .. }
        | Problem::InUse { .. }
        | Problem::NeedsUser { .. }
        | Problem::StateDirNotDir { .. }
        | Problem::Unreadable { .. }
        | Problem::Locks { .. }
        | Problem::Database { .. } => Ok("not fixable".into()),
    }
}

/// Sets the mode of `path` to `want`.
fn chmod(path: &Path, want: u32) -> Result<String> {
    match fs::set_permissions(path, fs::Permissions::from_mode(want)) {
        // Another fix (a temp file's) removed it meanwhile.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok("gone".into()),
        Err(err) => Err(Error::io("changing the mode of", path, err)),
        Ok(()) => Ok(format!("chmod {want:o}")),
    }
}

/// Moves the unreadable file at `path` aside to `<name>.corrupt-<time>`, kept for the user.
fn move_aside(paths: &AppPaths, path: &Path) -> Result<String> {
    let aside = path.with_file_name(format!(
        "{}.corrupt-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        time::unix_secs()
    ));
    let _guard = state::lock_exclusive(&paths.registry_lock())?;
    fs::rename(path, &aside).map_err(|err| Error::io("moving aside", path, err))?;
    Ok(format!("moved it to {}", aside.display()))
}

/// Reclaims the dead instance `record`, unless it was restarted since the diagnosis.
fn reclaim_dead(
    reclaimer: &Reclaimer<'_>,
    options: &Options,
    record: &InstanceRecord,
) -> Result<String> {
    // Read again: it may have been restarted since the diagnosis.
    let snapshot = reclaimer.registry().snapshot()?;
    match snapshot.instance(&record.id) {
        Some(current) if current.pid == record.pid && current.start_time == record.start_time => {}
        _ => return Ok("it changed meanwhile; left for the next run".into()),
    }
    reclaimer.reclaim(
        options.work(),
        &record.id,
        record.worktree.as_deref(),
        record.branch.as_deref(),
    )
}

/// Reclaims the orphaned worktree `id` at `path` and the branch checked out in it, unless an
/// instance took it since the diagnosis.
fn reclaim_orphan(
    reclaimer: &Reclaimer<'_>,
    options: &Options,
    id: &InstanceId,
    path: &Path,
) -> Result<String> {
    let snapshot = reclaimer.registry().snapshot()?;
    if snapshot.instance(id).is_some() {
        return Ok("an instance took it meanwhile; left alone".into());
    }
    let branch = Repository::open(path).ok().and_then(|wt| {
        wt.head()
            .ok()
            .filter(|h| h.is_branch())
            .and_then(|h| h.shorthand().ok().map(str::to_string))
    });
    reclaimer.reclaim(options.work(), id, Some(path), branch.as_deref())
}

/// Moves the messages of the gone instance `owner` aside and removes its inbox.
fn retire_inbox(paths: &AppPaths, options: &Options, owner: &InboxName) -> Result<String> {
    let coordination = Coordination::new(paths, &options.settings);
    let key = coordination.keys().load()?;
    let reason = format!("instance {owner} is gone");
    let moved = match owner {
        InboxName::Instance(id) => coordination.messages_with(key).retire(id, &reason)?,
        InboxName::Stray(name) => coordination.stray_inbox(name, key).retire(&reason)?,
    };
    Ok(format!("moved {moved} file(s) aside"))
}

/// Sweeps the expired and untrusted messages out of `owner`'s inbox.
fn sweep_inbox(paths: &AppPaths, options: &Options, owner: &InboxName) -> Result<String> {
    let coordination = Coordination::new(paths, &options.settings);
    let key = coordination.keys().load()?;
    let (_, swept) = match owner {
        InboxName::Instance(id) => coordination.messages_with(key).pending(id)?,
        InboxName::Stray(name) => coordination.stray_inbox(name, key).pending()?,
    };
    Ok(format!(
        "moved {} to dead/ and {} to quarantine/",
        swept.expired, swept.quarantined
    ))
}

/// Removes a ref's lock file a killed writer left.
fn remove_ref_lock(path: &Path) -> Result<String> {
    // Judged again, fresh: a writer holds its lock file open while it works.
    Ok(match reflock::remove_if_left(path)? {
        RefLock::Left | RefLock::Absent => "removed".into(),
        RefLock::Held(users) => format!("held again by {}; left alone", inuse::describe(&users)),
        RefLock::Young(_) | RefLock::Undated => "written again meanwhile; left alone".into(),
    })
}

/// Writes the database row of the live instance `record`.
fn write_row(paths: &AppPaths, options: &Options, record: &InstanceRecord) -> Result<String> {
    let row = instances::InstanceRow::from_record(
        record,
        paths.repo_root(),
        &options.settings.fleet_host,
    );
    Blocking::open_default(options.db.as_deref(), DbSettings::from(&options.settings))?
        .run(async |db| instances::upsert(db, &row).await)?;
    Ok("wrote its row".into())
}

/// Waits (a few heartbeats at most) for the live supervisor of worktree `id` to register it
/// again; its heartbeat re-creates a lost or unverifiable entry.
fn readopt(
    paths: &AppPaths,
    keys: &Keys,
    options: &Options,
    id: &str,
    supervisor: u32,
) -> Result<String> {
    let deadline =
        Instant::now() + options.settings.timing.heartbeat_interval * 3 + Duration::from_secs(1);
    loop {
        let snapshot = Registry::open_read_only(paths, keys)?.snapshot()?;
        if snapshot.instance(id).is_some() {
            return Ok(format!(
                "re-adopted: its supervisor (pid {supervisor}) registered it again"
            ));
        }
        if Instant::now() >= deadline {
            return Err(Error::Failed(format!(
                "its supervisor (pid {supervisor}) did not register it again in time; it is left alone while it is used"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
