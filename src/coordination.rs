//! The one place that chooses where the coordination state of a repository lives: named locks
//! ([`LockStore`]), path reservations ([`ReservationStore`]), the message queue
//! ([`MessageStore`]) and who is alive ([`Roster`]).
//!
//! Invariants:
//! - Callers obtain every store here and use only its trait, so a store shared by many hosts
//!   (a database) can be chosen here beside the files of `.app/` without changing them.
//! - [`Coordination::in_fleet`] chooses the stores of the shared database for locks and
//!   reservations ([`crate::fleet_holds`]); without it every store is the file one.
//! - Choosing a store changes nothing on disk; each store creates what it needs at its first
//!   change, as its module documents ([`crate::lock`], [`crate::reserve`], [`crate::queue`]).

use std::time::Duration;

use crate::config::Settings;
use crate::error::Result;
use crate::fleet_holds::{Fleet, FleetLocks, FleetReservations};
use crate::lock::{LockStore, Locks};
use crate::paths::AppPaths;
use crate::queue::{self, FileQueue, MessageStore, Post, Posted};
use crate::registry::{LocalRoster, Roster, Snapshot};
use crate::reserve::{ReservationStore, Reservations};
use crate::sign::SigningKey;

/// The coordination state of one repository.
#[derive(Debug, Clone)]
pub struct Coordination {
    paths: AppPaths,
    /// A holder whose instance has had no heartbeat for this long is dead.
    stale_after: Duration,
    /// The largest message payload (`APP_MAX_MESSAGE_BYTES`).
    max_message_bytes: usize,
    /// The fleet whose database holds the locks and reservations, when chosen.
    fleet: Option<Fleet>,
}

impl Coordination {
    /// The coordination state of the repository at `paths`, judged with `settings` (when a
    /// holder is dead, how large a message may be).
    pub fn new(paths: &AppPaths, settings: &Settings) -> Coordination {
        Coordination {
            paths: paths.clone(),
            stale_after: settings.timing.stale_after,
            max_message_bytes: settings.max_message_bytes,
            fleet: None,
        }
    }

    /// The same coordination with its locks and reservations in `fleet`'s database, shared by
    /// every host (`--fleet`).
    pub(crate) fn in_fleet(self, fleet: Fleet) -> Coordination {
        Coordination {
            fleet: Some(fleet),
            ..self
        }
    }

    /// The fleet's reservations, when this coordination is in a fleet.
    pub(crate) fn fleet_reservations(&self) -> Option<Box<dyn ReservationStore>> {
        self.fleet
            .clone()
            .map(|fleet| Box::new(FleetReservations::new(fleet)) as Box<dyn ReservationStore>)
    }

    /// The named locks, ready to be taken (creates the locks directory and the key).
    pub fn locks(&self) -> Result<Box<dyn LockStore>> {
        if let Some(fleet) = &self.fleet {
            return Ok(Box::new(FleetLocks::new(fleet.clone())));
        }
        Ok(Box::new(Locks::open(&self.paths, self.stale_after)?))
    }

    /// The named locks when any can exist, creating nothing; `None` where no lock was ever
    /// taken.
    pub fn existing_locks(&self) -> Result<Option<Box<dyn LockStore>>> {
        if self.fleet.is_some() {
            return self.locks().map(Some);
        }
        Ok(Locks::existing(&self.paths, self.stale_after)?
            .map(|locks| Box::new(locks) as Box<dyn LockStore>))
    }

    /// The path reservations (creates nothing until the first change).
    pub fn reservations(&self) -> Result<Box<dyn ReservationStore>> {
        if let Some(fleet) = self.fleet_reservations() {
            return Ok(fleet);
        }
        Ok(Box::new(Reservations::open(&self.paths, self.stale_after)?))
    }

    /// The path reservations when any were ever made; `None` otherwise.
    pub fn existing_reservations(&self) -> Result<Option<Box<dyn ReservationStore>>> {
        if let Some(fleet) = self.fleet_reservations() {
            return Ok(Some(fleet));
        }
        let reservations = self.reservations()?;
        Ok(self.paths.reservations().exists().then_some(reservations))
    }

    /// The message queue, verifying what it reads with the repository's key (none yet:
    /// nothing verifies) and bounding payloads by `APP_MAX_MESSAGE_BYTES`.
    pub fn messages(&self) -> Result<Box<dyn MessageStore>> {
        let key = SigningKey::load(&self.paths, false)?;
        Ok(self.messages_with(key))
    }

    /// The message queue read with `key`, for a caller that has it already.
    pub fn messages_with(&self, key: Option<SigningKey>) -> Box<dyn MessageStore> {
        Box::new(FileQueue::new(&self.paths, key, self.max_message_bytes))
    }

    /// Who is alive, judged from `snapshot` of this repository's registry.
    pub fn roster<'a>(&self, snapshot: &'a Snapshot) -> Box<dyn Roster + 'a> {
        Box::new(LocalRoster::new(snapshot, self.stale_after))
    }

    /// Validates `post` whole against `roster` ([`queue::route`]), then files it: what
    /// `app send`, the MCP `send_message` tool and `POST /messages` do. Bad input changes
    /// nothing.
    pub fn post(&self, roster: &dyn Roster, post: Post) -> Result<Posted> {
        let (outgoing, recipients) = queue::route(roster, post, self.max_message_bytes)?;
        let id = self.messages()?.send(&outgoing, &recipients)?;
        Ok(Posted { id, recipients })
    }
}
