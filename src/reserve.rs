//! Path reservations: which files an instance says it is editing.
//!
//! Invariants:
//! - All reservations live in one signed document, `locks/reservations.json`, changed only under
//!   the `locks/.mutex` flock with the file reloaded inside it.
//! - An exclusive reservation never coexists with an overlapping one of another live holder (two
//!   globs overlap when some path matches both, see [`crate::glob`]); shared ones may overlap
//!   each other. Reservations of dead holders and run-out TTLs are dropped by the next change.
//! - Callers reach reservations through [`ReservationStore`] (from
//!   [`crate::coordination::Coordination`]); [`Reservations`] is its implementation on this
//!   repository's files.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
pub use crate::error::{Overlap, ReserveError};
use crate::glob::Glob;
use crate::lock::Holder;
use crate::paths::AppPaths;
use crate::registry::{LocalRoster, Registry, Roster};
use crate::sign::{self, Keys, SigningKey};
use crate::state;
use crate::time::{self, Timestamp};

/// A listed reservation with why it lapsed (if it did), or a forged entry as `(id, reason)`.
pub type Listed = std::result::Result<(Reservation, Option<String>), (String, String)>;

/// One reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Unique id (8 hex characters).
    pub id: String,
    /// Who reserved.
    pub holder: Holder,
    /// Globs relative to the repository root.
    pub patterns: Vec<String>,
    /// Shared reservations may overlap each other; exclusive ones overlap nothing.
    pub shared: bool,
    /// Why, for the people reading `app reservations`.
    pub reason: Option<String>,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it runs out by itself (`--ttl`).
    pub expires_at: Option<Timestamp>,
}

impl Reservation {
    /// A new reservation of `patterns` for `holder`, made now, with a fresh id; `ttl` makes it
    /// lapse by itself.
    pub(crate) fn new(
        holder: &Holder,
        patterns: &[Glob],
        shared: bool,
        ttl: Option<Duration>,
        reason: Option<String>,
    ) -> Result<Reservation> {
        let now = Timestamp::now();
        Ok(Reservation {
            id: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            holder: holder.clone(),
            patterns: patterns.iter().map(|g| g.to_string()).collect(),
            shared,
            reason,
            created_at: now,
            expires_at: ttl
                .map(|ttl| time::expiry(now.system_time(), ttl).map(Timestamp::from))
                .transpose()?,
        })
    }

    fn globs(&self) -> Vec<Glob> {
        self.patterns
            .iter()
            .filter_map(|p| Glob::parse(p).ok())
            .collect()
    }

    /// Why it no longer counts, if it does not.
    pub fn lapsed(&self, roster: &dyn Roster) -> Option<String> {
        if let Some(expires) = self.expires_at
            && Timestamp::now() >= expires
        {
            return Some(format!("its ttl ran out at {expires}"));
        }
        self.holder.alive(roster).err()
    }

    fn conflicts_with(&self, globs: &[Glob], shared: bool) -> Option<(String, String)> {
        if self.shared && shared {
            return None;
        }
        for mine in self.globs() {
            for theirs in globs {
                if mine.overlaps(theirs) {
                    return Some((theirs.to_string(), mine.to_string()));
                }
            }
        }
        None
    }
}

/// The path reservations of one repository, as callers use them. Every change first drops
/// what lapsed (dead holders, run-out ttls).
///
/// Refusals are typed: [`ReserveError::NoPatterns`], [`ReserveError::Overlap`],
/// [`ReserveError::Untrusted`], carried in the crate error beside the failures of the store
/// itself (files, database).
pub trait ReservationStore: std::fmt::Debug + Send + Sync {
    /// Reserves `patterns` for `holder`; refused with [`ReserveError::Overlap`] when an
    /// exclusive claim (theirs or this one) overlaps another live holder's.
    fn reserve(
        &self,
        holder: &Holder,
        patterns: &[Glob],
        shared: bool,
        ttl: Option<Duration>,
        reason: Option<String>,
    ) -> Result<Reservation>;
    /// Drops `holder`'s reservations of `patterns` (all of them when empty); returns how many
    /// patterns were released.
    fn release(&self, holder: &Holder, patterns: &[String]) -> Result<usize>;
    /// Every reservation with why it lapsed, if it did; forged entries as `(id, reason)`.
    fn list(&self) -> Result<Vec<Listed>>;
    /// For each of `files` reserved exclusively by a live holder other than `me`, the file and
    /// the reservation.
    fn conflicts(
        &self,
        me: Option<&Holder>,
        files: &[String],
    ) -> Result<Vec<(String, Reservation)>>;
    /// Drops lapsed reservations and entries that do not verify; returns how many it dropped.
    fn prune(&self) -> Result<usize>;
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Doc {
    version: u32,
    entries: BTreeMap<String, Value>,
}

/// The reservations of one repository in `.app/locks/reservations.json`.
#[derive(Debug, Clone)]
pub struct Reservations {
    paths: AppPaths,
    keys: Keys,
    /// `None` until something was ever signed in this repository.
    key: Option<SigningKey>,
    stale_after: Duration,
}

impl Reservations {
    /// The reservations of the repository at `paths`, signed with its key from `keys`.
    /// Creates nothing until the first change.
    pub fn open(paths: &AppPaths, keys: &Keys, stale_after: Duration) -> Result<Reservations> {
        Ok(Reservations {
            paths: paths.clone(),
            keys: keys.clone(),
            key: keys.load()?,
            stale_after,
        })
    }

    fn load(&self) -> Result<Vec<std::result::Result<Reservation, (String, String)>>> {
        let path = self.paths.reservations();
        let doc: Doc = match state::read_optional(&path)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
                path: path.clone(),
                source,
            })?,
            None => Doc::default(),
        };
        Ok(doc
            .entries
            .iter()
            .map(
                |(id, value)| match sign::open::<Reservation>(value, self.key.as_ref()) {
                    Ok(r) if &r.id == id => Ok(r),
                    Ok(_) => Err((id.clone(), "filed under another id".into())),
                    Err(reason) => Err((id.clone(), reason)),
                },
            )
            .collect())
    }

    fn save(&self, key: &SigningKey, live: &[Reservation]) -> Result<()> {
        let doc = Doc {
            version: 1,
            entries: live.iter().map(|r| (r.id.clone(), key.seal(r))).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&doc).expect("reservations serialize");
        state::write_atomic(&self.paths.reservations(), &bytes)
    }

    /// Reads, drops lapsed entries, applies `change`, saves. Entries that do not verify stop
    /// the change (they are for `doctor` to report), unless `drop_forged`: then they go too.
    /// `change` also gets how many entries were dropped.
    fn update<T>(
        &self,
        drop_forged: bool,
        change: impl FnOnce(&mut Vec<Reservation>, usize) -> Result<T>,
    ) -> Result<T> {
        let snapshot = Registry::open_read_only(&self.paths, &self.keys)?.snapshot()?;
        let roster = LocalRoster::new(&snapshot, self.stale_after);
        self.paths.ensure_state_dir()?;
        state::create_private_dir_all(&self.paths.locks_dir())?;
        let key = self.keys.load_or_create()?;
        let _guard = state::lock_exclusive(&self.paths.locks_mutex())?;
        let loaded = Reservations {
            key: Some(key.clone()),
            ..self.clone()
        }
        .load()?;
        if !drop_forged && loaded.iter().any(|entry| entry.is_err()) {
            return Err(ReserveError::Untrusted {
                path: self.paths.reservations(),
            }
            .into());
        }
        let before = loaded.len();
        let mut live: Vec<Reservation> = loaded
            .into_iter()
            .filter_map(|entry| entry.ok())
            .filter(|r| r.lapsed(&roster).is_none())
            .collect();
        let dropped = before - live.len();
        let result = change(&mut live, dropped)?;
        self.save(&key, &live)?;
        Ok(result)
    }
}

impl ReservationStore for Reservations {
    /// Reserves `patterns` for `holder`; refused with [`ReserveError::Overlap`] when an exclusive claim
    /// (theirs or this one) overlaps another live holder's.
    fn reserve(
        &self,
        holder: &Holder,
        patterns: &[Glob],
        shared: bool,
        ttl: Option<Duration>,
        reason: Option<String>,
    ) -> Result<Reservation> {
        if patterns.is_empty() {
            return Err(ReserveError::NoPatterns.into());
        }
        self.update(false, |live, _| {
            refuse_overlap(live, holder, patterns, shared)?;
            let reservation = Reservation::new(holder, patterns, shared, ttl, reason.clone())?;
            live.push(reservation.clone());
            Ok(reservation)
        })
    }

    /// Drops `holder`'s reservations of `patterns` (all of them when empty); returns how many
    /// patterns were released.
    fn release(&self, holder: &Holder, patterns: &[String]) -> Result<usize> {
        self.update(false, |live, _| {
            let mut released = 0;
            for r in live.iter_mut().filter(|r| r.holder.same(holder)) {
                let before = r.patterns.len();
                r.patterns
                    .retain(|p| !patterns.is_empty() && !patterns.contains(p));
                released += before - r.patterns.len();
            }
            live.retain(|r| !r.patterns.is_empty());
            Ok(released)
        })
    }

    /// Every reservation with why it lapsed, if it did; forged entries as `(id, reason)`.
    fn list(&self) -> Result<Vec<Listed>> {
        let snapshot = Registry::open_read_only(&self.paths, &self.keys)?.snapshot()?;
        let roster = LocalRoster::new(&snapshot, self.stale_after);
        Ok(self
            .load()?
            .into_iter()
            .map(|entry| {
                entry.map(|r| {
                    let lapsed = r.lapsed(&roster);
                    (r, lapsed)
                })
            })
            .collect())
    }

    /// For each of `files` reserved exclusively by a live holder other than `me`, the file and
    /// the reservation.
    fn conflicts(
        &self,
        me: Option<&Holder>,
        files: &[String],
    ) -> Result<Vec<(String, Reservation)>> {
        let listed = self.list()?;
        let live = listed.iter().filter_map(|entry| match entry {
            Ok((r, None)) => Some(r),
            _ => None,
        });
        Ok(conflicts_among(live, me, files))
    }

    /// Drops lapsed reservations and entries that do not verify; returns how many it dropped.
    fn prune(&self) -> Result<usize> {
        self.update(true, |_, dropped| Ok(dropped))
    }
}

/// Refuses `patterns` for `holder` with [`ReserveError::Overlap`] when an exclusive claim
/// (theirs or this one) overlaps one of `live` held by another holder: the rule every
/// [`ReservationStore`] applies.
pub(crate) fn refuse_overlap(
    live: &[Reservation],
    holder: &Holder,
    patterns: &[Glob],
    shared: bool,
) -> Result<()> {
    for other in live.iter().filter(|r| !r.holder.same(holder)) {
        if let Some((mine, theirs)) = other.conflicts_with(patterns, shared) {
            return Err(ReserveError::Overlap(Box::new(Overlap {
                mine: mine.to_string(),
                theirs: theirs.to_string(),
                shared: other.shared,
                holder: other.holder.to_string(),
                since: other.created_at.to_string(),
                reason: other.reason.clone(),
            }))
            .into());
        }
    }
    Ok(())
}

/// For each of `files` reserved exclusively by one of `live` held by someone other than `me`,
/// the file and the reservation.
pub(crate) fn conflicts_among<'a>(
    live: impl Iterator<Item = &'a Reservation>,
    me: Option<&Holder>,
    files: &[String],
) -> Vec<(String, Reservation)> {
    let mut found = Vec::new();
    for r in live {
        if r.shared || me.is_some_and(|me| r.holder.same(me)) {
            continue;
        }
        let globs = r.globs();
        for file in files {
            if globs.iter().any(|g| g.matches(file)) {
                found.push((file.clone(), r.clone()));
            }
        }
    }
    found
}
