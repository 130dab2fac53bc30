//! Named locks with fencing tokens.
//!
//! Invariants:
//! - A lock's state is one signed file, `locks/named/<name>.json`, changed only under the
//!   `locks/.mutex` flock with the file reloaded inside it, and replaced atomically.
//! - The fencing token grows strictly with every grant of a name: the file keeps the last token
//!   after release, and a grant is saved (fsynced) before it is handed out.
//! - A lock belongs to a [`Holder`]: an instance (it outlives the CLI call that took it) or a
//!   process (`app lock run`, or the shell that called `app lock acquire` outside any instance).
//!   A dead holder (pid gone or reused, instance unregistered or its heartbeat stale) or a run-out
//!   `--ttl` loses the lock to the next acquirer; nobody has to clean up first.
//! - A process waiting for a lock says so in `locks/waiting/<pid>-<start time>.json` (signed),
//!   removed when its wait ends; a killed waiter's file is never listed (its process is gone)
//!   and is removed by the next waiter (or `app doctor --fix`).
//! - Callers reach locks through [`LockStore`] (from [`crate::coordination::Coordination`]);
//!   [`Locks`] is its implementation on this repository's files.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::error::LockError;
use crate::error::Result;
use crate::ids::{InstanceId, LockName};
use crate::paths::AppPaths;
use crate::process::{self, ProcessIdentity};
use crate::registry::{InstanceRecord, Liveness, LocalRoster, Registry, Roster, Snapshot};
use crate::sign::{self, Keys, SigningKey};
use crate::state;
use crate::time::{self, Timestamp};
use crate::watch::DirWatch;

/// How often a waiting acquirer re-checks a holder that may have died without releasing.
const RECHECK: Duration = Duration::from_millis(100);

/// Who holds a lock or a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The instance, when an instance holds it.
    pub instance: Option<InstanceId>,
    /// The process whose life bounds the hold (an instance's supervisor, or a plain process).
    pub pid: u32,
    /// That process's start time, so a reused pid is not taken for it.
    pub start_time: u64,
    /// The boot the start time belongs to.
    pub boot_id: String,
    /// Host of the process.
    pub host: String,
}

impl Holder {
    /// An instance as holder.
    pub fn instance(record: &InstanceRecord) -> Holder {
        Holder {
            instance: Some(record.id.clone()),
            pid: record.pid,
            start_time: record.start_time,
            boot_id: record.boot_id.clone(),
            host: record.host.clone(),
        }
    }

    /// A process as holder.
    pub fn process(identity: ProcessIdentity) -> Holder {
        Holder {
            instance: None,
            pid: identity.pid,
            start_time: identity.start_time,
            boot_id: identity.boot_id,
            host: process::hostname().to_string(),
        }
    }

    /// `Ok` while the holder lives, as `roster` judges it; else why it is dead.
    pub fn alive(&self, roster: &dyn Roster) -> std::result::Result<(), String> {
        match &self.instance {
            Some(id) => match roster.instance(id) {
                Some(record) if record.pid == self.pid && record.start_time == self.start_time => {
                    match roster.liveness(record) {
                        Liveness::Live => Ok(()),
                        Liveness::Stale(reason) => {
                            Err(format!("instance {id} is stale ({reason})"))
                        }
                    }
                }
                _ => Err(format!("instance {id} is no longer registered")),
            },
            None => {
                let identity = ProcessIdentity {
                    pid: self.pid,
                    start_time: self.start_time,
                    boot_id: self.boot_id.clone(),
                };
                if roster.process_alive(&identity, &self.host) {
                    Ok(())
                } else {
                    Err(format!("process {} is gone", self.pid))
                }
            }
        }
    }

    /// Whether `other` is the same holder (on the same host: fleet holders of several hosts
    /// may share a pid).
    pub fn same(&self, other: &Holder) -> bool {
        if self.host != other.host {
            return false;
        }
        match (&self.instance, &other.instance) {
            (Some(a), Some(b)) => a == b && self.pid == other.pid,
            (None, None) => {
                self.pid == other.pid
                    && self.start_time == other.start_time
                    && self.boot_id == other.boot_id
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.instance {
            Some(id) => write!(f, "instance {id} (pid {})", self.pid),
            None => write!(f, "process {} on {}", self.pid, self.host),
        }
    }
}

/// A lock's stored state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    /// The lock's name.
    pub name: LockName,
    /// The last fencing token granted.
    pub token: u64,
    /// The current holder, if any.
    pub holder: Option<Holder>,
    /// When the current holder got it.
    pub acquired_at: Option<Timestamp>,
    /// When the current hold runs out by itself (`--ttl`).
    pub expires_at: Option<Timestamp>,
}

impl LockState {
    /// Why the current hold no longer counts, if it does not: holder dead or TTL run out.
    pub fn lapsed(&self, roster: &dyn Roster) -> Option<String> {
        let holder = self.holder.as_ref()?;
        if let Some(expires) = self.expires_at
            && Timestamp::now() >= expires
        {
            return Some(format!("its ttl ran out at {expires}"));
        }
        holder.alive(roster).err()
    }
}

/// The named locks of one repository, as callers use them. Fencing tokens grow strictly per
/// name across every store the locks live in; a waiting `acquire` keeps waiting until the
/// lock is free, its hold lapses, or the timeout runs out.
///
/// Refusals are typed: [`LockError::InvalidName`], [`LockError::Held`] (timed out),
/// [`LockError::NotYours`], [`LockError::Untrusted`], carried in the crate error beside the
/// failures of the store itself (files, database).
pub trait LockStore: std::fmt::Debug + Send + Sync {
    /// Waits up to `request.timeout` for the lock; returns its fencing token. Acquiring a lock
    /// the holder already holds returns the same token (and renews a ttl from now).
    fn acquire(&self, request: &Request) -> Result<u64>;
    /// Releases `name` if `holder` holds it (or anyone does, with `force`).
    fn release(&self, name: &LockName, holder: &Holder, force: bool) -> Result<Released>;
    /// Every lock that has ever been granted, by name, with why its hold lapsed if it did.
    fn list(&self) -> Result<Vec<(LockState, Option<String>)>>;
    /// Who waits for a lock now, oldest first (a store that does not record waiters: nobody).
    fn waiters(&self) -> Result<Vec<Waiter>> {
        Ok(Vec::new())
    }
}

/// A process waiting in [`LockStore::acquire`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    /// The lock it waits for.
    pub name: LockName,
    /// Who will hold it.
    pub holder: Holder,
    /// The waiting process (the holder's instance may outlive it).
    pub process: ProcessIdentity,
    /// Since when it waits.
    pub since: Timestamp,
}

/// A waiter's file, removed when the wait ends.
#[derive(Debug)]
struct Waiting(std::path::PathBuf);

impl Drop for Waiting {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Acquires through `locks` and returns a guard that releases on drop.
pub fn hold(locks: Box<dyn LockStore>, request: &Request) -> Result<LockGuard> {
    let token = locks.acquire(request)?;
    Ok(LockGuard {
        locks,
        name: request.name.clone(),
        holder: request.holder.clone(),
        token,
    })
}

/// The locks of one repository in its `.app/locks/` files.
#[derive(Debug, Clone)]
pub struct Locks {
    paths: AppPaths,
    keys: Keys,
    key: SigningKey,
    stale_after: Duration,
}

/// What `acquire` was asked for.
#[derive(Debug, Clone)]
pub struct Request {
    /// Lock name.
    pub name: LockName,
    /// Who will hold it.
    pub holder: Holder,
    /// Let the hold run out by itself after this long.
    pub ttl: Option<Duration>,
    /// How long to wait for a current holder.
    pub timeout: Duration,
}

/// How `release` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The caller held it; now it is free.
    Released,
    /// Nobody held it (or the hold had lapsed).
    NotHeld,
}

impl Locks {
    /// Locks of the repository at `paths`, signed with its key from `keys`.
    pub fn open(paths: &AppPaths, keys: &Keys, stale_after: Duration) -> Result<Locks> {
        paths.ensure_state_dir()?;
        state::create_private_dir_all(&paths.named_locks_dir())?;
        let key = keys.load_or_create()?;
        Ok(Locks {
            paths: paths.clone(),
            keys: keys.clone(),
            key,
            stale_after,
        })
    }

    /// The locks of the repository at `paths` when any can exist (a key and the locks
    /// directory), creating nothing.
    pub fn existing(paths: &AppPaths, keys: &Keys, stale_after: Duration) -> Result<Option<Locks>> {
        if !paths.named_locks_dir().is_dir() {
            return Ok(None);
        }
        Ok(keys.load()?.map(|key| Locks {
            paths: paths.clone(),
            keys: keys.clone(),
            key,
            stale_after,
        }))
    }

    fn snapshot(&self) -> Result<Snapshot> {
        Registry::open_read_only(&self.paths, &self.keys)?.snapshot()
    }

    fn load(&self, name: &str) -> Result<Option<LockState>> {
        let path = self.paths.lock_state(name);
        let Some(bytes) = state::read_optional(&path)? else {
            return Ok(None);
        };
        let forged = |reason: String| LockError::Untrusted {
            name: name.into(),
            path: path.clone(),
            reason,
        };
        let value = serde_json::from_slice(&bytes).map_err(|err| forged(err.to_string()))?;
        let state: LockState = sign::open(&value, Some(&self.key)).map_err(forged)?;
        if state.name != name {
            return Err(forged("it names another lock".into()).into());
        }
        Ok(Some(state))
    }

    fn save(&self, state: &LockState) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(&self.key.seal(state)).expect("lock states serialize");
        state::write_atomic(&self.paths.lock_state(&state.name), &bytes)
    }

    /// Records this process as waiting for `request.name` until the returned guard drops, and
    /// removes the files of waiters that are gone.
    fn wait_as(&self, request: &Request) -> Result<Waiting> {
        let dir = self.paths.lock_waiters_dir();
        state::create_private_dir_all(&dir)?;
        for (path, waiter) in self.load_waiters() {
            if waiter.is_none_or(|w| w.process.presence() != process::Presence::Running) {
                let _ = std::fs::remove_file(path);
            }
        }
        let me = ProcessIdentity::current();
        let path = self.paths.lock_waiter(me.pid, me.start_time);
        let waiter = Waiter {
            name: request.name.clone(),
            holder: request.holder.clone(),
            process: me,
            since: Timestamp::now(),
        };
        let bytes = serde_json::to_vec_pretty(&self.key.seal(&waiter)).expect("waiters serialize");
        state::write_atomic(&path, &bytes)?;
        Ok(Waiting(path))
    }

    /// Every waiter file, with what it says when it verifies.
    fn load_waiters(&self) -> Vec<(std::path::PathBuf, Option<Waiter>)> {
        let dir = self.paths.lock_waiters_dir();
        state::visible_names(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|name| name.ends_with(".json"))
            .map(|name| {
                let path = dir.join(name);
                let waiter = std::fs::read(&path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                    .and_then(|value| sign::open(&value, Some(&self.key)).ok());
                (path, waiter)
            })
            .collect()
    }

    /// One attempt: grants the lock when free, lapsed, or already the caller's (then a ttl in
    /// `request` renews the hold from now). Returns the token, or the current state when
    /// someone else holds it.
    pub fn try_acquire(&self, request: &Request) -> Result<std::result::Result<u64, LockState>> {
        let snapshot = self.snapshot()?;
        let _guard = state::lock_exclusive(&self.paths.locks_mutex())?;
        let current = self.load(&request.name)?.unwrap_or(LockState {
            name: request.name.clone(),
            token: 0,
            holder: None,
            acquired_at: None,
            expires_at: None,
        });
        let lapsed = current.lapsed(&LocalRoster::new(&snapshot, self.stale_after));
        match &current.holder {
            Some(holder) if holder.same(&request.holder) && lapsed.is_none() => {
                // Acquiring again renews the hold: a ttl given now runs from now, same token.
                if let Some(ttl) = request.ttl {
                    let mut renewed = current.clone();
                    renewed.expires_at = Some(Timestamp::from(time::expiry(
                        Timestamp::now().system_time(),
                        ttl,
                    )?));
                    self.save(&renewed)?;
                }
                return Ok(Ok(current.token));
            }
            Some(_) if lapsed.is_none() => return Ok(Err(current)),
            Some(holder) => {
                tracing::info!(lock = %request.name, %holder, reason = lapsed.as_deref(), "taking over a lapsed lock");
            }
            None => {}
        }
        let now = Timestamp::now();
        let granted = LockState {
            name: request.name.clone(),
            token: current.token + 1,
            holder: Some(request.holder.clone()),
            acquired_at: Some(now),
            expires_at: request
                .ttl
                .map(|ttl| time::expiry(now.system_time(), ttl).map(Timestamp::from))
                .transpose()?,
        };
        self.save(&granted)?;
        Ok(Ok(granted.token))
    }
}

impl LockStore for Locks {
    /// Waits up to `request.timeout` for the lock; returns its fencing token. Times out with
    /// [`LockError::Held`] naming the holder.
    #[tracing::instrument(skip_all, fields(lock = %request.name))]
    fn acquire(&self, request: &Request) -> Result<u64> {
        // A timeout past what an Instant can hold never runs out.
        let deadline = Instant::now().checked_add(request.timeout);
        if let Ok(token) = self.try_acquire(request)? {
            return Ok(token);
        }
        // Held: watch for its release. Trying again after the watch is set up catches a
        // release that happened in between.
        let watch = DirWatch::new(&self.paths.named_locks_dir(), RECHECK, false)?;
        // Who waits is shown, not relied on: failing to say so does not stop the wait.
        let _waiting = self
            .wait_as(request)
            .inspect_err(|err| tracing::warn!(%err, "cannot record this wait for the lock"))
            .ok();
        loop {
            let held = match self.try_acquire(request)? {
                Ok(token) => return Ok(token),
                Err(held) => held,
            };
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                let holder = held.holder.expect("a refused request has a holder");
                let since = held
                    .acquired_at
                    .map_or_else(|| "?".into(), |t| t.to_string());
                return Err(LockError::Held {
                    name: request.name.to_string(),
                    holder: holder.to_string(),
                    since,
                }
                .into());
            }
            watch.wait(deadline.map_or(RECHECK, |deadline| deadline - now));
        }
    }

    /// Releases `name` if `holder` holds it (or anyone does, with `force`).
    fn release(&self, name: &LockName, holder: &Holder, force: bool) -> Result<Released> {
        let snapshot = self.snapshot()?;
        let _guard = state::lock_exclusive(&self.paths.locks_mutex())?;
        let Some(mut current) = self.load(name)? else {
            return Ok(Released::NotHeld);
        };
        let lapsed = current
            .lapsed(&LocalRoster::new(&snapshot, self.stale_after))
            .is_some();
        match &current.holder {
            None => return Ok(Released::NotHeld),
            Some(other) if !other.same(holder) && !force && !lapsed => {
                return Err(LockError::NotYours {
                    name: name.to_string(),
                    holder: other.to_string(),
                }
                .into());
            }
            Some(_) => {}
        }
        current.holder = None;
        current.acquired_at = None;
        current.expires_at = None;
        self.save(&current)?;
        Ok(if lapsed {
            Released::NotHeld
        } else {
            Released::Released
        })
    }

    /// Every lock that has ever been granted, by name, with why its hold lapsed if it did.
    fn list(&self) -> Result<Vec<(LockState, Option<String>)>> {
        let snapshot = self.snapshot()?;
        let roster = LocalRoster::new(&snapshot, self.stale_after);
        let dir = self.paths.named_locks_dir();
        let names: Vec<String> = crate::state::visible_names(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|name| name.strip_suffix(".json").map(str::to_string))
            .collect();
        let mut out = Vec::new();
        for name in names {
            if let Some(state) = self.load(&name)? {
                let lapsed = state.lapsed(&roster);
                out.push((state, lapsed));
            }
        }
        Ok(out)
    }

    /// The waiters whose process still runs, oldest first.
    fn waiters(&self) -> Result<Vec<Waiter>> {
        let mut waiters: Vec<Waiter> = self
            .load_waiters()
            .into_iter()
            .filter_map(|(_, waiter)| waiter)
            .filter(|waiter| waiter.process.presence() == process::Presence::Running)
            .collect();
        waiters.sort_by(|a, b| {
            a.since
                .cmp(&b.since)
                .then(a.process.pid.cmp(&b.process.pid))
        });
        Ok(waiters)
    }
}

/// A held lock, released when dropped.
#[derive(Debug)]
pub struct LockGuard {
    locks: Box<dyn LockStore>,
    name: LockName,
    holder: Holder,
    token: u64,
}

impl LockGuard {
    /// The fencing token of this grant.
    pub fn token(&self) -> u64 {
        self.token
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Err(err) = self.locks.release(&self.name, &self.holder, false) {
            tracing::warn!(lock = %self.name, %err, "releasing the lock failed; it lapses with its holder");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A roster that knows one answer for every process, as one shared by many hosts would
    /// for a process on another host.
    struct Fixed(bool);

    impl Roster for Fixed {
        fn instance(&self, _: &str) -> Option<&InstanceRecord> {
            None
        }
        fn live_instances(&self) -> Vec<&InstanceRecord> {
            Vec::new()
        }
        fn liveness(&self, _: &InstanceRecord) -> Liveness {
            Liveness::Stale("unknown".into())
        }
        fn process_alive(&self, _: &ProcessIdentity, host: &str) -> bool {
            self.0 && host == "elsewhere"
        }
    }

    #[test]
    fn a_holder_is_judged_by_the_roster_alone() {
        // No such pid here: only the roster can say it lives.
        let holder = Holder {
            instance: None,
            pid: u32::MAX - 1,
            start_time: 1,
            boot_id: "another boot".into(),
            host: "elsewhere".into(),
        };
        assert_eq!(holder.alive(&Fixed(true)), Ok(()));
        assert_eq!(
            holder.alive(&Fixed(false)),
            Err(format!("process {} is gone", u32::MAX - 1))
        );
        let instance = Holder {
            instance: Some(InstanceId::parse("3f9a1c2e").unwrap()),
            ..holder
        };
        assert_eq!(
            instance.alive(&Fixed(true)),
            Err("instance 3f9a1c2e is no longer registered".into())
        );
    }
}
