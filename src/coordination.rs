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
//! - Messages reach other hosts only when the caller named a server database
//!   ([`Coordination::with_database`]): then the queue is a [`FleetQueue`], the files for this
//!   host and the server's table for the others; without one, a fleet option is refused.

use std::time::Duration;

use crate::config::Settings;
use crate::db::{DbSettings, Location};
use crate::error::Result;
use crate::fleet_holds::{Fleet, FleetLocks, FleetReservations};
use crate::fleet_queue::{self, FleetQueue, Server};
use crate::lock::{LockStore, Locks};
use crate::paths::AppPaths;
use crate::queue::{self, FileQueue, Inbox, InboxName, MessageStore, Post, Posted};
use crate::registry::{LocalRoster, Roster, Snapshot};
use crate::reserve::{ReservationStore, Reservations};
use crate::sign::{Keys, SigningKey};

/// The coordination state of one repository.
#[derive(Debug, Clone)]
pub struct Coordination {
    paths: AppPaths,
    /// Where the key that signs and verifies every store comes from.
    keys: Keys,
    /// A holder whose instance has had no heartbeat for this long is dead.
    stale_after: Duration,
    /// The largest message payload (`APP_MAX_MESSAGE_BYTES`).
    max_message_bytes: usize,
    /// This machine's name in the fleet (`APP_FLEET_HOST`).
    fleet_host: String,
    /// The database the caller named, when it did ([`Coordination::with_database`]).
    database: Option<(Location, DbSettings)>,
    /// The fleet whose database holds the locks and reservations, when chosen.
    fleet: Option<Fleet>,
}

impl Coordination {
    /// The coordination state of the repository at `paths`, judged with `settings` (when a
    /// holder is dead, how large a message may be, which key signs).
    pub fn new(paths: &AppPaths, settings: &Settings) -> Coordination {
        Coordination {
            paths: paths.clone(),
            keys: Keys::from_settings(paths, settings),
            stale_after: settings.timing.stale_after,
            max_message_bytes: settings.max_message_bytes,
            fleet_host: settings.fleet_host.clone(),
            database: None,
            fleet: None,
        }
    }

    /// Where the key that signs and verifies every store comes from.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The same, with the shared database at `location`: when it is a server, messages also
    /// reach (and come from) instances on the fleet's other hosts.
    pub fn with_database(mut self, location: &Location, settings: DbSettings) -> Coordination {
        self.database = Some((location.clone(), settings));
        self
    }

    /// The fleet's server, when the database is one.
    fn server(&self) -> Option<Server> {
        match &self.database {
            Some((location @ Location::Remote { .. }, settings)) => Some(Server {
                location: location.clone(),
                settings: *settings,
                host: self.fleet_host.clone(),
            }),
            _ => None,
        }
    }

    fn fleet_queue(&self, key: Option<SigningKey>) -> Option<FleetQueue> {
        let limits = (key, self.max_message_bytes, self.stale_after);
        self.server()
            .map(|server| FleetQueue::new(&self.paths, &self.keys, server, limits))
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
        Ok(Box::new(Locks::open(
            &self.paths,
            &self.keys,
            self.stale_after,
        )?))
    }

    /// The named locks when any can exist, creating nothing; `None` where no lock was ever
    /// taken.
    pub fn existing_locks(&self) -> Result<Option<Box<dyn LockStore>>> {
        if self.fleet.is_some() {
            return self.locks().map(Some);
        }
        Ok(Locks::existing(&self.paths, &self.keys, self.stale_after)?
            .map(|locks| Box::new(locks) as Box<dyn LockStore>))
    }

    /// The path reservations (creates nothing until the first change).
    pub fn reservations(&self) -> Result<Box<dyn ReservationStore>> {
        if let Some(fleet) = self.fleet_reservations() {
            return Ok(fleet);
        }
        Ok(Box::new(Reservations::open(
            &self.paths,
            &self.keys,
            self.stale_after,
        )?))
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
        let key = self.keys.load()?;
        Ok(self.messages_with(key))
    }

    /// The message queue read with `key`, for a caller that has it already.
    pub fn messages_with(&self, key: Option<SigningKey>) -> Box<dyn MessageStore> {
        match self.fleet_queue(key.clone()) {
            Some(queue) => Box::new(queue),
            None => Box::new(FileQueue::new(
                &self.paths,
                &self.keys,
                key,
                self.max_message_bytes,
            )),
        }
    }

    /// The stray inbox directory `name` ([`InboxName::Stray`]), read with `key`: `app doctor`
    /// reports and retires it as an inbox of an instance that is gone.
    pub(crate) fn stray_inbox(&self, name: &str, key: Option<SigningKey>) -> Inbox {
        Inbox::stray(&self.paths, name, key, self.max_message_bytes)
    }

    /// The inbox directories of this repository, sorted ([`queue::inbox_names`]).
    pub(crate) fn inbox_names(&self) -> Vec<InboxName> {
        queue::inbox_names(&self.paths)
    }

    /// Who is alive, judged from `snapshot` of this repository's registry.
    pub fn roster<'a>(&self, snapshot: &'a Snapshot) -> Box<dyn Roster + 'a> {
        Box::new(LocalRoster::new(snapshot, self.stale_after))
    }

    /// Validates `post` whole against `roster` ([`queue::route`]), then files it: what
    /// `app send`, the MCP `send_message` tool and `POST /messages` do. Bad input changes
    /// nothing.
    pub fn post(&self, roster: &dyn Roster, post: Post) -> Result<Posted> {
        if let Some(queue) = self.fleet_queue(self.keys.load()?) {
            return queue.post(roster, post);
        }
        if post.fleet {
            queue::validate(&post, self.max_message_bytes)?;
            let location = self.database.as_ref().map(|(location, _)| location);
            return Err(fleet_queue::no_server(location));
        }
        let (outgoing, recipients) = queue::route(roster, post, self.max_message_bytes)?;
        let id = self.messages()?.send(&outgoing, &recipients)?;
        Ok(Posted { id, recipients })
    }
}
