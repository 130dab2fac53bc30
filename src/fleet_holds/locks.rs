//! Fleet locks: one `fleet_locks` row per name, tokens growing with every grant.

use std::time::Instant;

use super::{FIRST_POLL, Fleet, MAX_POLL, from_now, holder_of};
use crate::db::holds::{self, HolderRow, LockAsk, LockReleased, LockRow};
use crate::error::{LockError, Result};
use crate::ids::LockName;
use crate::lock::{Holder, LockState, LockStore, Released, Request};
use crate::time::Timestamp;

/// The named locks every host of the fleet shares.
#[derive(Debug, Clone)]
pub(crate) struct FleetLocks {
    fleet: Fleet,
}

impl FleetLocks {
    /// The locks of `fleet`.
    pub(crate) fn new(fleet: Fleet) -> FleetLocks {
        FleetLocks { fleet }
    }

    /// One attempt (one request); `dead` names a holder of this host `/proc` says is gone.
    fn take(
        &self,
        request: &Request,
        holder: &HolderRow,
        dead: Option<(i64, i64)>,
    ) -> Result<LockRow> {
        let ttl_ms = request
            .ttl
            .map(|ttl| {
                crate::time::expiry(Timestamp::now().system_time(), ttl)
                    .map(|_| ttl.as_millis() as i64)
            })
            .transpose()?;
        let member = self.fleet.member();
        let acquired_at = Timestamp::now().to_string();
        let ask = LockAsk {
            name: &request.name,
            holder,
            ttl_ms,
            lease_ttl_ms: self.fleet.lease_ttl_ms(),
            dead,
            acquired_at: &acquired_at,
            member: &member,
        };
        self.fleet
            .db
            .run(async |db| holds::take_lock(db, &ask).await)
    }

    /// Whether an attempt may succeed now: the lock is free or its hold lapsed.
    fn takeable(&self, row: &LockRow) -> bool {
        row.holder.as_ref().is_none_or(|holder| {
            self.fleet
                .lapsed(holder, row.expires_in_ms, row.host_age_ms)
                .is_some()
        })
    }

    /// A stored lock as the lock types name it, and why its hold no longer counts if it
    /// does not.
    pub(crate) fn state(&self, row: &LockRow) -> (LockState, Option<String>) {
        let lapsed = row.holder.as_ref().and_then(|holder| {
            self.fleet
                .lapsed(holder, row.expires_in_ms, row.host_age_ms)
        });
        let state = LockState {
            name: LockName::stored(row.name.clone()),
            token: u64::try_from(row.token).unwrap_or(0),
            holder: row.holder.as_ref().map(holder_of),
            acquired_at: row.acquired_at.as_deref().and_then(|at| at.parse().ok()),
            expires_at: row.expires_in_ms.map(from_now),
        };
        (state, lapsed)
    }
}

impl LockStore for FleetLocks {
    fn acquire(&self, request: &Request) -> Result<u64> {
        let holder = self.fleet.row(&request.holder);
        // A timeout past what an Instant can hold never runs out.
        let deadline = Instant::now().checked_add(request.timeout);
        let mut row = self.take(request, &holder, None)?;
        let mut poll = FIRST_POLL;
        loop {
            if row.holder.as_ref() == Some(&holder) {
                return Ok(u64::try_from(row.token).unwrap_or(0));
            }
            // A holder of this host that /proc says is gone lapses at once: take it over now.
            if let Some(dead) = row
                .holder
                .as_ref()
                .and_then(|other| super::dead_here(other, &self.fleet.host))
            {
                row = self.take(request, &holder, Some(dead))?;
                if row.holder.as_ref() == Some(&holder) {
                    continue;
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                let (state, _) = self.state(&row);
                return Err(LockError::Held {
                    name: request.name.to_string(),
                    holder: state
                        .holder
                        .map_or_else(|| "nobody".into(), |h| h.to_string()),
                    since: state
                        .acquired_at
                        .map_or_else(|| "?".into(), |t| t.to_string()),
                }
                .into());
            }
            // The server cannot notify: read, backing off, until a take may succeed.
            std::thread::sleep(deadline.map_or(poll, |deadline| poll.min(deadline - now)));
            poll = (poll * 3 / 2).min(MAX_POLL);
            row = match self
                .fleet
                .db
                .run(async |db| holds::lock(db, &request.name).await)?
            {
                Some(read) if !self.takeable(&read) => read,
                read => {
                    let dead = read
                        .and_then(|read| read.holder)
                        .and_then(|holder| super::dead_here(&holder, &self.fleet.host));
                    self.take(request, &holder, dead)?
                }
            };
        }
    }

    fn release(&self, name: &LockName, holder: &Holder, force: bool) -> Result<Released> {
        let holder = self.fleet.row(holder);
        let member = self.fleet.member();
        let release = |dead: Option<(i64, i64)>| {
            let ask = LockAsk {
                name,
                holder: &holder,
                ttl_ms: None,
                lease_ttl_ms: self.fleet.lease_ttl_ms(),
                dead,
                acquired_at: "",
                member: &member,
            };
            self.fleet
                .db
                .run(async |db| holds::release_lock(db, &ask, force).await)
        };
        let mut released = release(None)?;
        // A holder of this host that is gone lapses at once, as its host sees it.
        if let LockReleased::NotYours(other) = &released
            && let Some(dead) = super::dead_here(other, &self.fleet.host)
        {
            released = release(Some(dead))?;
        }
        match released {
            LockReleased::Released => Ok(Released::Released),
            LockReleased::NotHeld => Ok(Released::NotHeld),
            LockReleased::NotYours(other) => Err(LockError::NotYours {
                name: name.to_string(),
                holder: holder_of(&other).to_string(),
            }
            .into()),
        }
    }

    fn list(&self) -> Result<Vec<(LockState, Option<String>)>> {
        let rows = self.fleet.db.run(async |db| holds::locks(db).await)?;
        Ok(rows.iter().map(|row| self.state(row)).collect())
    }
}
