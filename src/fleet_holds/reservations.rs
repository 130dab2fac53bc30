//! Fleet reservations: `fleet_reservations` rows, changed under the `reservations` change tag
//! so that two overlapping exclusive claims made at once cannot both succeed.

use std::time::Duration;

use super::{Fleet, from_now, holder_of};
use crate::db::holds::{self, ReservationChange, ReservationRow, ReservationsRead};
use crate::error::{Error, Result};
use crate::glob::Glob;
use crate::lock::Holder;
use crate::reserve::{self, Listed, Reservation, ReservationStore, ReserveError};
use crate::time::Timestamp;

/// How many times a change is tried again when other hosts changed the reservations between
/// its read and its write.
const ATTEMPTS: usize = 50;

/// The path reservations every host of the fleet shares.
#[derive(Debug, Clone)]
pub(crate) struct FleetReservations {
    fleet: Fleet,
}

/// What a change makes of the live reservations.
enum Step<T> {
    /// Nothing to write.
    Done(T),
    /// Write this.
    Change(ReservationChange, T),
}

impl FleetReservations {
    /// The reservations of `fleet`.
    pub(crate) fn new(fleet: Fleet) -> FleetReservations {
        FleetReservations { fleet }
    }

    fn read(&self) -> Result<ReservationsRead> {
        self.fleet.db.run(async |db| holds::reservations(db).await)
    }

    /// A stored reservation as the reservation types name it, and why it no longer counts
    /// if it does not.
    pub(crate) fn judge(&self, row: &ReservationRow) -> (Reservation, Option<String>) {
        (reservation(row), self.lapsed(row))
    }

    fn lapsed(&self, row: &ReservationRow) -> Option<String> {
        self.fleet
            .lapsed(&row.holder, row.expires_in_ms, row.host_age_ms)
    }

    /// Reads, applies `plan` to the live reservations (and how many lapsed) and writes what it says under the tag
    /// read, dropping the lapsed ones in the same write; reads again when another host
    /// changed them meanwhile.
    fn update<T>(
        &self,
        mut plan: impl FnMut(&[ReservationRow], usize) -> Result<Step<T>>,
    ) -> Result<T> {
        for _ in 0..ATTEMPTS {
            let read = self.read()?;
            let (lapsed, live): (Vec<ReservationRow>, Vec<ReservationRow>) = read
                .rows
                .into_iter()
                .partition(|row| self.lapsed(row).is_some());
            let (mut change, value) = match plan(&live, lapsed.len())? {
                Step::Done(value) if lapsed.is_empty() => return Ok(value),
                Step::Done(value) => (ReservationChange::default(), value),
                Step::Change(change, value) => (change, value),
            };
            change.delete.extend(lapsed.into_iter().map(|row| row.id));
            // A tag of this change's own: a resent request finds it and applies the same rows.
            let new = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
            let member = self.fleet.member();
            if self.fleet.db.run(async |db| {
                holds::change_reservations(db, &member, (read.tag, new), &change).await
            })? {
                return Ok(value);
            }
        }
        Err(Error::Busy(format!(
            "the fleet reservations changed under every one of {ATTEMPTS} attempts; retry"
        )))
    }
}

fn reservation(row: &ReservationRow) -> Reservation {
    Reservation {
        id: row.id.clone(),
        holder: holder_of(&row.holder),
        patterns: row.patterns.clone(),
        shared: row.shared,
        reason: row.reason.clone(),
        created_at: row.created_at.parse().unwrap_or_else(|_| Timestamp::now()),
        expires_at: row.expires_in_ms.map(from_now),
    }
}

impl ReservationStore for FleetReservations {
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
        let made = Reservation::new(holder, patterns, shared, ttl, reason)?;
        let row = ReservationRow {
            id: made.id.clone(),
            holder: self.fleet.row(holder),
            patterns: made.patterns.clone(),
            shared,
            reason: made.reason.clone(),
            created_at: made.created_at.to_string(),
            expires_in_ms: ttl.map(|ttl| ttl.as_millis() as i64),
            host_age_ms: None,
        };
        // The holder as every host reads it back from the row.
        let made = Reservation {
            holder: holder_of(&row.holder),
            ..made
        };
        self.update(|live, _| {
            // Made already, by a write whose answer was lost.
            if live.iter().any(|r| r.id == row.id) {
                return Ok(Step::Done(made.clone()));
            }
            let live: Vec<Reservation> = live.iter().map(reservation).collect();
            reserve::refuse_overlap(&live, holder, patterns, shared)?;
            let change = ReservationChange {
                delete: Vec::new(),
                put: vec![row.clone()],
            };
            Ok(Step::Change(change, made.clone()))
        })
    }

    fn release(&self, holder: &Holder, patterns: &[String]) -> Result<usize> {
        self.update(|live, _| {
            let mut change = ReservationChange::default();
            let mut released = 0;
            for row in live.iter().filter(|r| holder_of(&r.holder).same(holder)) {
                let kept: Vec<String> = row
                    .patterns
                    .iter()
                    .filter(|p| !patterns.is_empty() && !patterns.contains(p))
                    .cloned()
                    .collect();
                released += row.patterns.len() - kept.len();
                if kept.is_empty() {
                    change.delete.push(row.id.clone());
                } else if kept.len() < row.patterns.len() {
                    change.put.push(ReservationRow {
                        patterns: kept,
                        ..row.clone()
                    });
                }
            }
            Ok(if change.delete.is_empty() && change.put.is_empty() {
                Step::Done(released)
            } else {
                Step::Change(change, released)
            })
        })
    }

    fn list(&self) -> Result<Vec<Listed>> {
        Ok(self
            .read()?
            .rows
            .iter()
            .map(|row| Ok((reservation(row), self.lapsed(row))))
            .collect())
    }

    fn conflicts(
        &self,
        me: Option<&Holder>,
        files: &[String],
    ) -> Result<Vec<(String, Reservation)>> {
        let live: Vec<Reservation> = self
            .read()?
            .rows
            .iter()
            .filter(|row| self.lapsed(row).is_none())
            .map(reservation)
            .collect();
        Ok(reserve::conflicts_among(live.iter(), me, files))
    }

    fn prune(&self) -> Result<usize> {
        self.update(|_, lapsed| Ok(Step::Done(lapsed)))
    }
}
