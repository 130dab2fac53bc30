//! The named locks and path reservations an instance holds while its command runs (`app run
//! --lock NAME --reserve GLOB`; every task of `app orchestrate` with `locks` or `reserve`).
//!
//! Invariants:
//! - They are taken after the instance registered and before its command starts: the locks
//!   first, in name order (so two instances never wait for each other's), each waited for as
//!   long as it takes; then the paths, reserved exclusively for the instance.
//! - A lock is held by the supervisor's process, as `app lock run` holds one: it lapses when
//!   the supervisor dies. The reservation is held by the instance, as `app reserve` inside it
//!   would hold it.
//! - A signal (or a stop request) while a lock is awaited cancels the run; a refused or failed
//!   hold ends the run with that error. Either way nothing was started.
//! - What was taken is given back on every way out of the instance: the locks once the
//!   command ended, in the reverse order, the reservation just before the instance is
//!   unregistered (see [`super::supervisor`]).
//! - The command sees `APP_LOCK_NAME` and `APP_LOCK_TOKEN` of the last lock in name order (as
//!   nested `app lock run`s showed it), and `APP_LOCKS`, every `name=token`, comma-separated,
//!   in name order.

use std::ffi::OsString;
use std::time::Duration;

use super::Notice;
use super::signals::Slot;
use crate::coordination::Coordination;
use crate::error::{Error, LockError, Result};
use crate::glob::Glob;
use crate::ids::LockName;
use crate::lock::{self, Holder, LockGuard, Request};
use crate::process::ProcessIdentity;
use crate::registry::InstanceRecord;
use crate::reserve::ReservationStore;

/// How long one wait for a lock lasts before the supervisor looks for a signal that cancels
/// the run.
const CANCEL_CHECK: Duration = Duration::from_millis(200);

/// What an instance holds while its command runs (`app run --lock`, `--reserve`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds {
    /// Named locks, taken in name order.
    pub locks: Vec<LockName>,
    /// Path globs relative to the repository root, reserved exclusively.
    pub reserve: Vec<String>,
    /// Why the paths are reserved, for `app reservations`.
    pub reason: Option<String>,
}

impl Holds {
    /// Whether there is nothing to hold.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty() && self.reserve.is_empty()
    }

    /// Checks the globs: bad input (exit 2) before anything is written.
    pub(super) fn validate(&self) -> Result<()> {
        for pattern in &self.reserve {
            Glob::parse(pattern)?;
        }
        Ok(())
    }

    /// The lock names in the order they are taken: sorted, each once.
    fn lock_order(&self) -> Vec<LockName> {
        let mut names = self.locks.clone();
        names.sort();
        names.dedup();
        names
    }
}

/// What an instance holds, as its agent state's `stuck` asks it (docs/AGENT-STATE.md): the
/// locks of `--lock` (held by the supervisor), the locks its agent took itself (holder: the
/// instance), and the orchestrated task it is an attempt of (`APP_RUN_ID`/`APP_TASK_ID` the
/// orchestrator gave its `app run`). Asked only when the agent has been idle that long.
pub(super) fn what_is_held(
    paths: &crate::paths::AppPaths,
    settings: &crate::config::Settings,
    record: &InstanceRecord,
    holds: &Holds,
) -> crate::activity::HoldsFn {
    let coordination = Coordination::new(paths, settings);
    let own: Vec<String> = holds.lock_order().into_iter().map(String::from).collect();
    let id = record.id.to_string();
    let task = match (&settings.caller.run_id, &settings.caller.task_id) {
        (Some(run), Some(task)) if !run.is_empty() && !task.is_empty() => {
            Some(format!("task {task} of run {run}"))
        }
        _ => None,
    };
    Box::new(move || {
        let mut names = own.clone();
        if let Ok(Some(locks)) = coordination.existing_locks()
            && let Ok(states) = locks.list()
        {
            names.extend(states.into_iter().filter_map(|(state, _)| {
                let holder = state.holder?;
                (holder.instance.as_deref() == Some(id.as_str())).then(|| state.name.to_string())
            }));
        }
        names.sort();
        names.dedup();
        let mut what = Vec::new();
        if !names.is_empty() {
            what.push(format!("lock {}", names.join(", ")));
        }
        what.extend(task.clone());
        (!what.is_empty()).then(|| what.join(" and "))
    })
}

/// How taking the holds went.
pub(super) enum Taken {
    /// Everything is held.
    Held(Held),
    /// A signal arrived while a lock was awaited: the run is cancelled (what was taken is
    /// given back when `Held` drops).
    Cancelled(i32),
}

/// The locks and the reservation taken for one instance; given back by
/// [`Held::release_locks`] and [`Held::release_reservation`], or at the latest when dropped.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// In the order taken.
    locks: Vec<(LockGuard, LockName)>,
    reservation: Option<(Box<dyn ReservationStore>, Holder)>,
}

/// Takes `holds` for the instance `record`: its locks (waiting, unless a signal in `slot`
/// cancels the run), then its reservation. Refusals and failures are the error.
pub(super) fn take(
    holds: &Holds,
    coordination: &Coordination,
    record: &InstanceRecord,
    (slot, notify): (&Slot, Option<fn(&Notice)>),
) -> Result<Taken> {
    let mut held = Held::default();
    let holder = Holder::process(ProcessIdentity::current());
    for name in holds.lock_order() {
        match take_lock(coordination, &name, &holder, slot)? {
            Ok(guard) => held.locks.push((guard, name)),
            Err(signal) => return Ok(Taken::Cancelled(signal)),
        }
    }
    if !holds.reserve.is_empty() {
        let globs = holds
            .reserve
            .iter()
            .map(|p| Glob::parse(p))
            .collect::<Result<Vec<_>>>()?;
        let holder = Holder::instance(record);
        let store = coordination.reservations()?;
        let reservation = store.reserve(&holder, &globs, false, None, holds.reason.clone())?;
        let notice = Notice::Reserved {
            patterns: reservation.patterns.clone(),
            holder: holder.to_string(),
        };
        match notify {
            Some(notify) => notify(&notice),
            None => tracing::info!(instance = %record.id, ?notice, "paths reserved"),
        }
        held.reservation = Some((store, holder));
    }
    Ok(Taken::Held(held))
}

/// Waits for lock `name` for `holder` until it is granted, or a signal in `slot` cancels the
/// run (`Ok(Err(signal))`).
fn take_lock(
    coordination: &Coordination,
    name: &LockName,
    holder: &Holder,
    slot: &Slot,
) -> Result<std::result::Result<LockGuard, i32>> {
    let request = Request {
        name: name.clone(),
        holder: holder.clone(),
        ttl: None,
        timeout: CANCEL_CHECK,
    };
    loop {
        if let Some(signal) = slot.cancelled() {
            return Ok(Err(signal));
        }
        match lock::hold(coordination.locks()?, &request) {
            Ok(guard) => return Ok(Ok(guard)),
            Err(Error::Lock(LockError::Held { .. })) => {}
            Err(err) => return Err(err),
        }
    }
}

impl Held {
    /// The variables the command gets for its locks (none without locks).
    pub(super) fn environment(&self) -> Vec<(String, OsString)> {
        let Some((last, name)) = self.locks.last() else {
            return Vec::new();
        };
        let all: Vec<String> = self
            .locks
            .iter()
            .map(|(guard, name)| format!("{name}={}", guard.token()))
            .collect();
        vec![
            ("APP_LOCK_NAME".into(), name.into()),
            ("APP_LOCK_TOKEN".into(), last.token().to_string().into()),
            ("APP_LOCKS".into(), all.join(",").into()),
        ]
    }

    /// Gives the locks back, the last taken first.
    pub(super) fn release_locks(&mut self) {
        while let Some((guard, _)) = self.locks.pop() {
            drop(guard);
        }
    }

    /// Gives the reservation back.
    pub(super) fn release_reservation(&mut self) {
        if let Some((store, holder)) = self.reservation.take()
            && let Err(err) = store.release(&holder, &[])
        {
            tracing::warn!(%holder, %err, "releasing the reservation failed; it lapses with the instance");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release_locks();
        self.release_reservation();
    }
}
