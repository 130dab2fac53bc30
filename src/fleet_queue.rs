//! The coordination queue across the hosts of a fleet: [`FleetQueue`], a [`MessageStore`] over
//! this repository's file queue ([`FileQueue`]) and the server database's `messages` table
//! ([`crate::db::messages`]).
//!
//! Invariants:
//! - A message for an instance live on this host goes through the files exactly as without a
//!   server; only an instance live on another host (per the `instances` mirror, by its fleet
//!   host name) is reached through the table. `to: all` reaches the other hosts only when the
//!   post asks for the fleet.
//! - Every copy in the table is signed for its recipient with `APP_SHARED_SECRET`, which a
//!   sender to another host must have. A receiver delivers a copy only when it verifies, names
//!   this recipient and this id, and fits the size limit; anything else is quarantined, and a
//!   copy past its TTL (by the server's clock) goes to the dead letters: both in the table and
//!   as files of this host's `.app/` (the shapes [`crate::queue`] writes), so `app doctor`
//!   reports them as it does for the files.
//! - Delivery is at least once, as for the files: a copy is handed out, then acknowledged; a
//!   copy has one row, so it is never handed out again once acknowledged.
//! - Frugal with the server: a send is one request; a receiver polls the table with one read,
//!   every [`POLL_FASTEST`] for [`BUSY_FOR`] after it started, something arrived or it sent to
//!   another host, then doubling to [`POLL_SLOWEST`] while idle; acknowledging what one poll
//!   delivered is one request. An unreachable server is a warning: the files keep working.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::db::instances::{self, InstanceRow};
use crate::db::messages::{self, Address, Aside, Copy, Waiting};
use crate::db::{Blocking, DbSettings, Location};
use crate::error::{Error, QueueError, Result};
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::queue::{
    self, Arrivals, ENVELOPE_BYTES, FileQueue, Message, MessageStore, Outgoing, Post, Posted, Swept,
};
use crate::registry::{Liveness, Roster};
use crate::sign::{self, Keys, SigningKey};
use crate::time::Timestamp;

/// The time between two polls of the table while the receiver is busy ([`BUSY_FOR`]).
pub(crate) const POLL_FASTEST: Duration = Duration::from_millis(125);
/// How long a receiver stays busy, polling every [`POLL_FASTEST`], after it started, after a
/// poll found something and after it sent to another host: the next message of a burst, or
/// the reply, is seen within that interval instead of the backed-off one.
pub(crate) const BUSY_FOR: Duration = Duration::from_secs(2);
/// The longest time between two polls of the table: while nothing arrives.
pub(crate) const POLL_SLOWEST: Duration = Duration::from_secs(2);

/// Where the other hosts are: the server database, and this host's name in the fleet.
#[derive(Debug, Clone)]
pub(crate) struct Server {
    /// The server database.
    pub location: Location,
    /// How it is retried.
    pub settings: DbSettings,
    /// This machine's name in the fleet (`APP_FLEET_HOST`).
    pub host: String,
}

/// The error of a fleet option where the database is not a server.
pub(crate) fn no_server(location: Option<&Location>) -> Error {
    let what = location.map_or_else(
        || "a local database".to_string(),
        |location| format!("the local file {location}"),
    );
    Error::bad_input(format!(
        "messages to the fleet's other hosts need a libSQL server database every host reaches, not {what}: set APP_DB_URL=http://HOST:PORT on every host (docs/FLEET.md), or drop the fleet option"
    ))
}

/// When the table is polled next.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    next: Instant,
    interval: Duration,
    /// Until when polls come every [`POLL_FASTEST`].
    busy_until: Instant,
}

/// An instance live on another host, as the `instances` mirror holds it.
#[derive(Debug, Clone)]
struct Elsewhere {
    id: InstanceId,
    host: String,
    repo_root: String,
}

impl Elsewhere {
    /// The row's instance; `None` (and a warning) when its id is none, so one bad row of
    /// another host does not stop a send.
    fn from_row(row: InstanceRow) -> Option<Elsewhere> {
        match InstanceId::from_trusted(row.id, "the fleet's instances table") {
            Ok(id) => Some(Elsewhere {
                id,
                host: row.host,
                repo_root: row.repo_root,
            }),
            Err(err) => {
                tracing::warn!(%err, host = %row.host, "skipped a row of the instances table");
                None
            }
        }
    }
}

impl Schedule {
    fn new(now: Instant) -> Schedule {
        Schedule {
            next: now,
            interval: POLL_FASTEST,
            busy_until: now + BUSY_FOR,
        }
    }

    /// After a poll at `now` that found something or not: busy for [`BUSY_FOR`] after a find,
    /// then each empty poll doubles the wait up to [`POLL_SLOWEST`].
    fn polled(&mut self, now: Instant, found: bool) {
        if found {
            self.busy_until = now + BUSY_FOR;
        }
        self.interval = if now < self.busy_until {
            POLL_FASTEST
        } else {
            (self.interval * 2).min(POLL_SLOWEST)
        };
        self.next = now + self.interval;
    }

    /// This receiver sent to another host at `now`: a reply may come soon.
    fn sent(&mut self, now: Instant) {
        self.busy_until = now + BUSY_FOR;
        self.interval = POLL_FASTEST;
        self.next = self.next.min(now + POLL_FASTEST);
    }
}

/// The queue of one repository on a host of a fleet.
pub(crate) struct FleetQueue {
    files: FileQueue,
    paths: AppPaths,
    /// What reads verify with (`APP_SHARED_SECRET` when set).
    key: Option<SigningKey>,
    max_bytes: usize,
    keys: Keys,
    stale_after: Duration,
    server: Server,
    repo_root: String,
    db: Mutex<Option<Arc<Blocking>>>,
    schedule: Arc<Mutex<Schedule>>,
    /// The ids this store delivered from the table, so their acknowledgement goes there.
    from_table: Mutex<HashSet<String>>,
    warned: AtomicBool,
}

impl std::fmt::Debug for FleetQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetQueue")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`FleetQueue`] besides its server: the key reads verify with, the largest
/// payload, and when an instance is stale.
pub(crate) type Limits = (Option<SigningKey>, usize, Duration);

impl FleetQueue {
    /// The queue of the repository at `paths` on the fleet of `server`.
    pub(crate) fn new(
        paths: &AppPaths,
        keys: &Keys,
        server: Server,
        (key, max_bytes, stale): Limits,
    ) -> Self {
        FleetQueue {
            files: FileQueue::new(paths, keys, key.clone(), max_bytes),
            paths: paths.clone(),
            keys: keys.clone(),
            key,
            max_bytes,
            stale_after: stale,
            repo_root: paths.repo_root().display().to_string(),
            server,
            db: Mutex::new(None),
            schedule: Arc::new(Mutex::new(Schedule::new(Instant::now()))),
            from_table: Mutex::new(HashSet::new()),
            warned: AtomicBool::new(false),
        }
    }

    /// The server database, opened at the first call.
    fn db(&self) -> Result<Arc<Blocking>> {
        let mut slot = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = &*slot {
            return Ok(Arc::clone(db));
        }
        let db = Arc::new(Blocking::open(
            self.server.location.clone(),
            self.server.settings,
        )?);
        *slot = Some(Arc::clone(&db));
        Ok(db)
    }

    fn address<'a>(&'a self, owner: &'a InstanceId) -> Address<'a> {
        Address {
            host: &self.server.host,
            repo_root: &self.repo_root,
            recipient: owner,
        }
    }

    /// Validates `post` whole, then files it where its recipients are: the files for this
    /// host's, the table for other hosts'. Bad input changes nothing.
    pub(crate) fn post(&self, roster: &dyn Roster, post: Post) -> Result<Posted> {
        let addressed = queue::validate(&post, self.max_bytes)?;
        if post.fleet {
            self.keys.shared()?;
        }
        let Some(to) = addressed.to else {
            return self.broadcast(roster, post);
        };
        let live_here = roster
            .instance(&to)
            .is_some_and(|record| roster.liveness(record) == Liveness::Live);
        if !live_here && let Some(posted) = self.post_elsewhere(&post, addressed.from, to)? {
            return Ok(posted);
        }
        let (outgoing, recipients) = queue::route(roster, post, self.max_bytes)?;
        let id = self.files.send(&outgoing, &recipients)?;
        Ok(Posted { id, recipients })
    }

    /// Files `post` for its recipient where it runs on another host; `None` when it runs on
    /// none (nothing was filed).
    fn post_elsewhere(
        &self,
        post: &Post,
        from: InstanceId,
        to: InstanceId,
    ) -> Result<Option<Posted>> {
        let db = self.db()?;
        let key = match self.keys.shared() {
            Ok(key) => key,
            Err(err) => {
                // Without the fleet's secret nothing can go to another host; say so only
                // when one is what the sender asked for.
                let elsewhere = self.live_elsewhere(&db)?;
                return match elsewhere.iter().find(|row| row.id == to) {
                    Some(row) => Err(Error::bad_input(format!(
                        "instance {} runs on host {}: {err}",
                        row.id, row.host
                    ))),
                    None => Ok(None),
                };
            }
        };
        let id = queue::new_id();
        let outgoing = queue::outgoing(post.clone(), from, Some(to.clone()));
        let copy = self.copy(&key, &outgoing, (&id, Timestamp::now()), &to);
        let live_since = instances::live_since(self.stale_after);
        let landed = db.run(async |db| messages::file_for(db, &copy, &to, &live_since).await)?;
        Ok(landed.map(|host| {
            tracing::debug!(message = %id, recipient = %to, %host, "sent to another host");
            self.sent_elsewhere();
            Posted {
                id,
                recipients: vec![to],
            }
        }))
    }

    fn copy<'a>(
        &'a self,
        key: &SigningKey,
        outgoing: &'a Outgoing,
        (id, timestamp): (&'a str, Timestamp),
        recipient: &InstanceId,
    ) -> Copy<'a> {
        let message = outgoing.copy(id, timestamp, recipient);
        Copy {
            id,
            sender: (&outgoing.from, &self.server.host),
            body: serde_json::to_string(&key.seal(&message)).expect("messages serialize"),
            ttl_ms: i64::try_from(message.ttl_ms).unwrap_or(i64::MAX),
        }
    }

    /// Every instance live on another host, once each.
    fn live_elsewhere(&self, db: &Blocking) -> Result<Vec<Elsewhere>> {
        let rows = db.run(async |db| instances::live_everywhere(db, self.stale_after).await)?;
        let mut seen = HashSet::new();
        Ok(rows
            .into_iter()
            .rev()
            .filter(|row| row.host != self.server.host)
            .filter(|row| seen.insert((row.host.clone(), row.repo_root.clone(), row.id.clone())))
            .filter_map(Elsewhere::from_row)
            .collect())
    }

    /// `to: all`: this host's live instances through the files and, for the fleet, every
    /// instance live on another host through the table, all as one message id.
    fn broadcast(&self, roster: &dyn Roster, post: Post) -> Result<Posted> {
        let fleet = post.fleet;
        let from = post.from.clone();
        let (outgoing, local) = queue::route(roster, post, self.max_bytes)?;
        let mut recipients = local.clone();
        let id = queue::new_id();
        let timestamp = Timestamp::now();
        if fleet {
            let key = self.keys.shared()?;
            let db = self.db()?;
            let elsewhere: Vec<Elsewhere> = self
                .live_elsewhere(&db)?
                .into_iter()
                .filter(|row| row.id != from)
                .collect();
            let copies: Vec<(Address, Copy)> = elsewhere
                .iter()
                .map(|row| {
                    let to = Address {
                        host: &row.host,
                        repo_root: &row.repo_root,
                        recipient: &row.id,
                    };
                    (to, self.copy(&key, &outgoing, (&id, timestamp), &row.id))
                })
                .collect();
            if !copies.is_empty() {
                db.run(async |db| messages::file(db, &copies).await)?;
                self.sent_elsewhere();
            }
            recipients.extend(elsewhere.iter().map(|row| row.id.clone()));
        }
        // As the file queue's send: the first message of a repository creates its key.
        self.paths.ensure_state_dir()?;
        let key = self.keys.load_or_create()?;
        queue::send_as(&self.paths, &key, &outgoing, (&id, timestamp), &local)?;
        Ok(Posted { id, recipients })
    }

    /// Polls fast for a while: this store just sent to another host.
    fn sent_elsewhere(&self) {
        self.schedule
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sent(Instant::now());
    }

    /// The copies of `owner` in the table, delivered or moved aside; nothing when the table
    /// is not due for a poll.
    fn poll(&self, owner: &InstanceId) -> (Vec<Message>, Swept) {
        let now = Instant::now();
        {
            let schedule = self.schedule.lock().unwrap_or_else(PoisonError::into_inner);
            if schedule.next > now {
                return Default::default();
            }
        }
        let polled = self.read_table(owner);
        let found = polled
            .as_ref()
            .is_ok_and(|(m, s)| !m.is_empty() || s != &Swept::default());
        self.schedule
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .polled(Instant::now(), found);
        match polled {
            Ok(polled) => {
                self.warned.store(false, Ordering::Relaxed);
                polled
            }
            Err(err) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%err, "cannot read messages from other hosts; retrying, local messages still arrive");
                }
                Default::default()
            }
        }
    }

    fn read_table(&self, owner: &InstanceId) -> Result<(Vec<Message>, Swept)> {
        let db = self.db()?;
        let at = self.address(owner);
        let waiting = db.run(async |db| messages::waiting(db, at).await)?;
        let mut delivered = Vec::new();
        let mut swept = Swept::default();
        let mut aside = Vec::new();
        for copy in waiting {
            match self.open(owner, &copy) {
                Ok(message) if copy.expired => {
                    let reason =
                        format!("not acknowledged within its TTL of {} ms", message.ttl_ms);
                    queue::dead_letter(&self.paths, owner, &message, &reason)?;
                    aside.push((copy.id, Aside::Dead, reason));
                    swept.expired += 1;
                }
                Ok(message) => delivered.push(message),
                Err(reason) => {
                    let reason = format!("from the fleet's message table: {reason}");
                    let name = format!("{}.json", copy.id);
                    queue::quarantine_copy(
                        &self.paths,
                        owner,
                        &name,
                        copy.body.as_bytes(),
                        &reason,
                    )?;
                    aside.push((copy.id, Aside::Quarantined, reason));
                    swept.quarantined += 1;
                }
            }
        }
        if !aside.is_empty() {
            db.run(async |db| messages::set_aside(db, at, &aside).await)?;
        }
        let mut from_table = self
            .from_table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        from_table.extend(delivered.iter().map(|m| m.id.clone()));
        Ok((delivered, swept))
    }

    /// The message a copy holds, when it can be trusted: the reason when not.
    fn open(&self, owner: &InstanceId, copy: &Waiting) -> std::result::Result<Message, String> {
        let len = copy.body.len();
        if len > self.max_bytes + ENVELOPE_BYTES {
            return Err(format!(
                "copy of {len} bytes is over the message size limit"
            ));
        }
        let value: Value =
            serde_json::from_str(&copy.body).map_err(|err| format!("not JSON: {err}"))?;
        let message: Message = sign::open(&value, self.key.as_ref())?;
        if message.recipient != *owner || message.id != copy.id {
            return Err("filed for another recipient or under another id than its own".into());
        }
        queue::check_payload(&message.payload, self.max_bytes).map_err(|err| err.to_string())?;
        Ok(message)
    }

    fn ack_in_table(&self, owner: &InstanceId, ids: &[String]) -> Result<Vec<bool>> {
        let db = self.db()?;
        let at = self.address(owner);
        db.run(async |db| messages::ack(db, at, ids).await)
    }

    fn find_in_table(&self, owner: &InstanceId, id: &str) -> Result<Option<(Message, bool)>> {
        let db = self.db()?;
        let at = self.address(owner);
        let found = db.run(async |db| messages::find(db, at, id).await)?;
        Ok(found.and_then(|(body, waiting)| {
            let copy = Waiting {
                id: id.to_string(),
                body,
                expired: false,
            };
            self.open(owner, &copy)
                .ok()
                .map(|message| (message, waiting))
        }))
    }

    fn is_from_table(&self, id: &str) -> bool {
        self.from_table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }
}

impl MessageStore for FleetQueue {
    fn send(&self, outgoing: &Outgoing, recipients: &[InstanceId]) -> Result<String> {
        self.files.send(outgoing, recipients)
    }

    fn pending(&self, owner: &InstanceId) -> Result<(Vec<Message>, Swept)> {
        let (mut found, mut swept) = self.files.pending(owner)?;
        let (remote, remote_swept) = self.poll(owner);
        found.extend(remote);
        found.sort_by(|a, b| a.id.cmp(&b.id));
        swept.expired += remote_swept.expired;
        swept.quarantined += remote_swept.quarantined;
        Ok((found, swept))
    }

    fn inspect(&self, owner: &InstanceId) -> Result<(Vec<Message>, Swept)> {
        self.files.inspect(owner)
    }

    fn find(&self, owner: &InstanceId, id: &str) -> Option<Message> {
        self.files.find(owner, id).or_else(|| {
            self.find_in_table(owner, id)
                .ok()
                .flatten()
                .map(|(message, _)| message)
        })
    }

    fn ack(&self, owner: &InstanceId, id: &str) -> Result<bool> {
        queue::validate_id(id)?;
        if !self.is_from_table(id) {
            match self.files.ack(owner, id) {
                Err(Error::Queue(QueueError::NotWaiting { .. })) => {}
                other => return other,
            }
        }
        if self.ack_in_table(owner, &[id.to_string()])?[0] {
            return Ok(true);
        }
        match self.find_in_table(owner, id)? {
            Some(_) => Ok(false),
            None => Err(QueueError::NotWaiting {
                id: id.into(),
                owner: owner.to_string(),
            }
            .into()),
        }
    }

    fn ack_all(&self, owner: &InstanceId, ids: &[String]) -> Result<Vec<bool>> {
        let (table, files): (Vec<&String>, Vec<&String>) =
            ids.iter().partition(|id| self.is_from_table(id));
        let mut acked: std::collections::HashMap<&String, bool> = std::collections::HashMap::new();
        for id in files {
            acked.insert(id, self.ack(owner, id)?);
        }
        if !table.is_empty() {
            let table_ids: Vec<String> = table.iter().map(|id| id.to_string()).collect();
            for (id, done) in table.into_iter().zip(self.ack_in_table(owner, &table_ids)?) {
                acked.insert(id, done);
            }
        }
        Ok(ids.iter().map(|id| acked[id]).collect())
    }

    fn retire(&self, owner: &InstanceId, reason: &str) -> Result<usize> {
        self.files.retire(owner, reason)
    }

    fn owners(&self) -> Vec<InstanceId> {
        self.files.owners()
    }

    fn arrivals(
        &self,
        owner: &InstanceId,
        poll: Duration,
        poll_only: bool,
    ) -> Result<Box<dyn Arrivals>> {
        Ok(Box::new(FleetArrivals {
            files: self.files.arrivals(owner, poll, poll_only)?,
            schedule: Arc::clone(&self.schedule),
        }))
    }
}

/// Wakes on the inbox's file events, and when the table is due for its next poll.
struct FleetArrivals {
    files: Box<dyn Arrivals>,
    schedule: Arc<Mutex<Schedule>>,
}

impl Arrivals for FleetArrivals {
    fn wait(&self, limit: Duration) {
        let next = self
            .schedule
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next;
        let until_poll = next.saturating_duration_since(Instant::now());
        self.files.wait(limit.min(until_poll));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The intervals of `polls` empty polls, each at the time the one before scheduled.
    fn empty_polls(schedule: &mut Schedule, polls: usize) -> Vec<u128> {
        (0..polls)
            .map(|_| {
                schedule.polled(schedule.next, false);
                schedule.interval.as_millis()
            })
            .collect()
    }

    #[test]
    fn polls_stay_fast_while_busy_back_off_while_idle_and_speed_up_when_something_arrives() {
        let start = Instant::now();
        let mut schedule = Schedule::new(start);
        assert_eq!(schedule.next, start);
        // Busy for BUSY_FOR after the start: every poll in it comes POLL_FASTEST after the last.
        let fast = usize::try_from(BUSY_FOR.as_millis() / POLL_FASTEST.as_millis()).unwrap();
        let busy = empty_polls(&mut schedule, fast);
        assert!(
            busy.iter().all(|&ms| ms == POLL_FASTEST.as_millis()),
            "{busy:?}"
        );
        // Then the waits double up to POLL_SLOWEST.
        assert_eq!(
            empty_polls(&mut schedule, 6),
            [250, 500, 1000, 2000, 2000, 2000]
        );
        // A find makes the receiver busy again.
        let now = schedule.next;
        schedule.polled(now, true);
        assert_eq!(schedule.next, now + POLL_FASTEST);
        let again = empty_polls(&mut schedule, fast - 1);
        assert!(
            again.iter().all(|&ms| ms == POLL_FASTEST.as_millis()),
            "{again:?}"
        );
        assert_eq!(empty_polls(&mut schedule, 2), [250, 500]);
        // So does a send to another host, and its next poll comes no later than POLL_FASTEST.
        let now = schedule.next - Duration::from_millis(10);
        schedule.sent(now);
        assert!(schedule.next <= now + POLL_FASTEST);
        schedule.polled(now + POLL_FASTEST, false);
        assert_eq!(schedule.interval, POLL_FASTEST);
    }
}
