//! The supervisor's database mirror: a background thread that copies an instance's registry
//! entry and lifecycle events into the shared database.
//!
//! Invariants:
//! - The agent never waits for the database: updates go through a channel, and a database that
//!   is down, locked or misconfigured only produces a warning (once per outage).
//! - Nothing is lost while the database is away: the latest instance row (a full row, so one
//!   write catches up on everything) and every event stay pending and are written in order on
//!   the next attempt, which the next update (at least every heartbeat) triggers.
//! - One flush is one request: the pending row and events in one batch, all or none.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::events::{self, NewEvent};
use super::instances::{self, InstanceRow};
use super::{Db, DbSettings, Location};
use crate::error::Result;
use libsql::Value;

/// A change to mirror.
#[derive(Debug, Clone)]
pub enum Update {
    /// The instance's current row (replaces any pending one).
    Instance(InstanceRow),
    /// An event to append.
    Event(NewEvent),
}

/// What the mirror thread receives: updates, then one `Close` (senders other threads still
/// hold need not be dropped first). The stop travels in the channel, not as a
/// [`crate::stop::StopToken`]: it must come after the last updates (the instance's final row
/// and `instance.stopped`), and it must wake a thread blocked in `recv`; the message does both.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "each message is moved once, never stored"
)]
enum Message {
    Update(Update),
    Close,
}

/// Handle to the mirror thread.
#[derive(Debug)]
pub struct Mirror {
    sender: mpsc::Sender<Message>,
    finished: mpsc::Receiver<bool>,
}

/// A cloneable way to send updates (for the heartbeat thread and the control socket).
#[derive(Debug, Clone)]
pub struct MirrorSender(mpsc::Sender<Message>);

impl MirrorSender {
    /// Queues an update; never blocks. After the mirror closed it is dropped.
    pub fn send(&self, update: Update) {
        let _ = self.0.send(Message::Update(update));
    }
}

/// The longest one flush of the mirror retries a busy or unreachable database.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

impl Mirror {
    /// Starts the mirror thread for the database at `location`. One flush retries a busy or
    /// unreachable database for at most [`FLUSH_DEADLINE`]: it then warns and tries again with
    /// the next update, so a server that is down is said early, and never holds up the agent.
    pub fn start(location: Location, mut settings: DbSettings) -> Mirror {
        settings.retry_deadline = settings.retry_deadline.min(FLUSH_DEADLINE);
        let (sender, updates) = mpsc::channel();
        let (done, finished) = mpsc::channel();
        thread::Builder::new()
            .name("db-mirror".into())
            .spawn(move || {
                let flushed = mirror_loop(location, settings, updates);
                let _ = done.send(flushed);
            })
            .expect("spawning a thread only fails when the system is out of resources");
        Mirror { sender, finished }
    }

    /// A sender for other threads.
    pub fn sender(&self) -> MirrorSender {
        MirrorSender(self.sender.clone())
    }

    /// Queues an update; never blocks.
    pub fn send(&self, update: Update) {
        let _ = self.sender.send(Message::Update(update));
    }

    /// Stops taking updates and waits up to `wait` for the pending ones to be written. Returns
    /// whether everything reached the database.
    pub fn close(self, wait: Duration) -> bool {
        let _ = self.sender.send(Message::Close);
        self.finished.recv_timeout(wait).unwrap_or(false)
    }
}

#[derive(Default)]
struct Pending {
    row: Option<InstanceRow>,
    events: VecDeque<NewEvent>,
}

impl Pending {
    fn absorb(&mut self, update: Update) {
        match update {
            Update::Instance(row) => self.row = Some(row),
            Update::Event(event) => self.events.push_back(event),
        }
    }

    fn is_empty(&self) -> bool {
        self.row.is_none() && self.events.is_empty()
    }
}

/// Runs until every sender is gone; returns whether the last flush succeeded.
fn mirror_loop(location: Location, settings: DbSettings, updates: mpsc::Receiver<Message>) -> bool {
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::warn!(%err, "the database mirror cannot start; the registry stays authoritative");
            return false;
        }
    };
    let mut db: Option<Db> = None;
    let mut pending = Pending::default();
    let mut failing = false;
    loop {
        let mut closed = match updates.recv() {
            Ok(Message::Update(update)) => {
                pending.absorb(update);
                false
            }
            Ok(Message::Close) | Err(mpsc::RecvError) => true,
        };
        while !closed {
            match updates.try_recv() {
                Ok(Message::Update(update)) => pending.absorb(update),
                Ok(Message::Close) | Err(mpsc::TryRecvError::Disconnected) => closed = true,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if !pending.is_empty() {
            match runtime.block_on(flush(&mut db, &location, settings, &mut pending)) {
                Ok(()) => {
                    if failing {
                        tracing::info!(database = %location, "database mirror caught up");
                    }
                    failing = false;
                }
                Err(err) => {
                    if !failing {
                        tracing::warn!(database = %location, %err, "cannot mirror this instance into the database; will retry, the registry stays authoritative");
                    }
                    failing = true;
                    // A broken connection is reopened on the next attempt.
                    db = None;
                }
            }
        }
        if closed {
            return pending.is_empty();
        }
    }
}

async fn flush(
    db: &mut Option<Db>,
    location: &Location,
    settings: DbSettings,
    pending: &mut Pending,
) -> Result<()> {
    if db.is_none() {
        *db = Some(Db::open(location.clone(), settings).await?);
    }
    let db = db.as_ref().expect("opened just above");
    // Everything pending in one request (one transaction: all of it or none, in order; each
    // statement idempotent, so a batch sent again writes nothing twice). An `app run` thus
    // costs the server one write at its start (row and `instance.started`) and one at its
    // end, which its exit waits for, instead of one per row and per event.
    let statements: Vec<(&str, Vec<Value>)> = pending
        .row
        .iter()
        .map(instances::upsert_statement)
        .chain(pending.events.iter().map(events::record_statement))
        .collect();
    db.batch("mirroring an instance", &statements).await?;
    pending.row = None;
    pending.events.clear();
    Ok(())
}
