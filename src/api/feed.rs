//! The live event stream behind `GET /events`: a bounded broadcast hub and the two feeds that
//! fill it.
//!
//! - The database feed tails the shared `events` table of this repository (`instance.started`,
//!   `instance.stopped`, `instance.exec`, ... as every supervisor records them, on this machine
//!   or another one sharing a libSQL server).
//! - The local feed watches this repository's `.app/` state and reports what is only on disk:
//!   instances that went stale, agents whose state changed (`.app/activity/`), messages filed
//!   into inboxes or acknowledged, locks taken and released.
//!
//! Invariants:
//! - Publishing never waits for a subscriber: each one reads from a ring of `capacity` events;
//!   one that falls behind loses the oldest and is told how many (`lagged`), the others are not
//!   slowed down.
//! - Nothing already in the log is replayed unless asked: a subscriber sees what happens after
//!   it connected; one that resumes (`Last-Event-ID`) first gets the log's rows after that id
//!   ([`replay`]).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::activity::{self, AgentState};
use crate::config::Settings;
use crate::coordination::Coordination;
use crate::db::events::{self, EventFilter};
use crate::db::{Db, DbSettings, Location};
use crate::ids::{InstanceId, LockName};
use crate::paths::AppPaths;
use crate::registry::{Liveness, Registry};
use crate::sign::{Keys, SigningKey};
use crate::state::visible_names;
use crate::stop::StopToken;
use crate::time::Timestamp;
use crate::watch::DirWatch;

/// How often the database is asked for new events.
const DATABASE_INTERVAL: Duration = Duration::from_millis(250);
/// How often `.app/` is scanned.
const LOCAL_INTERVAL: Duration = Duration::from_millis(500);
/// Polls of an unchanged local database file before it is queried anyway.
const FORCED_QUERY_EVERY: u32 = 20;
/// How long to wait before opening the database again after it failed.
const REOPEN_AFTER: Duration = Duration::from_secs(5);

/// One event of the stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiEvent {
    /// The event log's row id, for events that come from the database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// What happened: `instance.started`, `message.sent`, `lock.acquired`, ...
    pub kind: String,
    /// When (RFC 3339).
    pub at: String,
    /// The instance it concerns.
    pub instance: Option<String>,
    /// Details.
    pub payload: Value,
}

impl ApiEvent {
    /// An event that happens now.
    pub fn now(kind: &str, instance: Option<&str>, payload: Value) -> Self {
        ApiEvent {
            id: None,
            kind: kind.to_string(),
            at: Timestamp::now().to_string(),
            instance: instance.map(str::to_string),
            payload,
        }
    }
}

/// The broadcast hub every subscriber reads from.
#[derive(Debug, Clone)]
pub struct Hub {
    sender: broadcast::Sender<Arc<ApiEvent>>,
    /// Events published so far.
    published: Arc<AtomicU64>,
}

impl Hub {
    /// A hub that keeps up to `capacity` events for its slowest subscriber.
    pub fn new(capacity: usize) -> Self {
        Hub {
            sender: broadcast::channel(capacity.max(1)).0,
            published: Arc::default(),
        }
    }

    /// Sends `event` to every subscriber; never blocks.
    pub fn publish(&self, event: ApiEvent) {
        // Counted before it is sent, so a client that saw it and asks for the overview
        // never gets a read from before it.
        self.published.fetch_add(1, Ordering::SeqCst);
        // No subscriber is not an error: the event is simply not seen.
        let _ = self.sender.send(Arc::new(event));
    }

    /// How many events were published so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }

    /// A new subscriber, seeing events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ApiEvent>> {
        self.sender.subscribe()
    }

    /// How many subscribers are connected.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }
}

/// The last `lines` lines of the file at `path`, read from at most its last `max_bytes`; its
/// size, and whether the text starts after the file's beginning.
pub(crate) fn tail_lines(
    path: &std::path::Path,
    lines: usize,
    max_bytes: u64,
) -> std::io::Result<(String, u64, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let start = size.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max_bytes).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    // A cut in the middle of a line drops that partial line.
    let whole = if start > 0 {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    } else {
        &text
    };
    let body = whole.strip_suffix('\n').unwrap_or(whole);
    let all: Vec<&str> = if body.is_empty() {
        Vec::new()
    } else {
        body.split('\n').collect()
    };
    let kept = &all[all.len().saturating_sub(lines)..];
    let mut tail = kept.join("\n");
    if !kept.is_empty() && whole.ends_with('\n') {
        tail.push('\n');
    }
    Ok((tail, size, start > 0 || kept.len() < all.len()))
}

/// This repository's database events after id `after`, oldest first, at most `max`; and
/// whether more were left out.
pub(crate) fn replay(
    (location, settings): (Location, DbSettings),
    repo_root: &str,
    after: i64,
    max: usize,
) -> crate::error::Result<(Vec<ApiEvent>, bool)> {
    const PAGE: usize = 500;
    let db = crate::db::Blocking::open(location, settings)?;
    let mut replayed = Vec::new();
    let mut after = after;
    loop {
        let filter = EventFilter {
            after_id: after,
            repo_root: Some(repo_root.to_string()),
            ..EventFilter::default()
        };
        let page = PAGE.min(max + 1 - replayed.len());
        let rows = db.run(async |db| events::query(db, &filter, page as u32).await)?;
        let full = rows.len() == page;
        for row in rows {
            after = row.id;
            replayed.push(ApiEvent {
                id: Some(row.id),
                kind: row.kind,
                at: row.at,
                instance: row.instance,
                payload: row.payload,
            });
        }
        if replayed.len() > max {
            replayed.truncate(max);
            return Ok((replayed, true));
        }
        if !full {
            return Ok((replayed, false));
        }
    }
}

/// Copies this repository's new database events into the hub until the stop.
pub(crate) async fn tail_database(
    hub: Hub,
    (location, settings): (Location, DbSettings),
    repo_root: String,
    stop: StopToken,
) {
    let mut tail = Tail {
        hub,
        location,
        repo_root,
        // The stream carries what happened from now on: an event written while the database
        // was still opening (a fresh file waits for its migrations) is not lost.
        began: Timestamp::now().to_string(),
        warned: false,
        after_id: None,
        last_change: None,
        skipped: 0,
    };
    loop {
        let db = match Db::open(tail.location.clone(), settings).await {
            Ok(db) => db,
            Err(err) => {
                if !tail.warned {
                    tracing::warn!(database = %tail.location, %err, "the event stream cannot read the database; instance events are missing until it can");
                    tail.warned = true;
                }
                if wait_or_stop(&stop, REOPEN_AFTER).await {
                    return;
                }
                continue;
            }
        };
        if tail.follow(&db, &stop).await == Followed::Stopped {
            return;
        }
        if wait_or_stop(&stop, REOPEN_AFTER).await {
            return;
        }
    }
}

/// Where the database feed is in the event log, across reopenings of the database.
struct Tail {
    hub: Hub,
    location: Location,
    repo_root: String,
    /// When the feed began: the first query starts after the last event before it.
    began: String,
    /// Whether a failure was logged and nothing has succeeded since (one warning per outage).
    warned: bool,
    /// The last event copied (or the last one before `began`).
    after_id: Option<i64>,
    /// A local file is only queried after it (or its write-ahead log) changed: most polls are
    /// two `stat` calls instead of a query.
    last_change: Option<[(std::time::SystemTime, u64); 2]>,
    /// Polls skipped since the last query.
    skipped: u32,
}

/// How following an open database ended.
#[derive(Debug, PartialEq, Eq)]
enum Followed {
    /// The stop came.
    Stopped,
    /// Reading failed: the database is opened again.
    Failed,
}

impl Tail {
    /// Polls `db` for new events until the stop or a failed read.
    async fn follow(&mut self, db: &Db, stop: &StopToken) -> Followed {
        loop {
            if !self.unchanged() && self.copy_new(db).await.is_err() {
                self.last_change = None;
                return Followed::Failed;
            }
            if wait_or_stop(stop, DATABASE_INTERVAL).await {
                return Followed::Stopped;
            }
        }
    }

    /// Whether this poll can be skipped: a local file that did not change since the last query.
    /// Every few seconds it is queried anyway, in case a write kept mtime and size.
    fn unchanged(&mut self) -> bool {
        let Location::Local(path) = &self.location else {
            return false;
        };
        let change = file_change(path);
        if self.after_id.is_some()
            && change == self.last_change
            && self.skipped < FORCED_QUERY_EVERY
        {
            self.skipped += 1;
            return true;
        }
        self.last_change = change;
        self.skipped = 0;
        false
    }

    /// Publishes the events after the last one copied; `Err` when the database could not be
    /// read (logged once per outage).
    async fn copy_new(&mut self, db: &Db) -> Result<(), ()> {
        let start = match self.after_id {
            Some(id) => id,
            None => match events::latest_id_before(db, &self.began).await {
                Ok(id) => *self.after_id.insert(id),
                Err(_) => return Err(()),
            },
        };
        let filter = EventFilter {
            after_id: start,
            repo_root: Some(self.repo_root.clone()),
            ..EventFilter::default()
        };
        match events::query(db, &filter, 500).await {
            Ok(rows) => {
                self.warned = false;
                for row in rows {
                    self.after_id = Some(row.id);
                    self.hub.publish(ApiEvent {
                        id: Some(row.id),
                        kind: row.kind,
                        at: row.at,
                        instance: row.instance,
                        payload: row.payload,
                    });
                }
                Ok(())
            }
            Err(err) => {
                if !self.warned {
                    tracing::warn!(database = %self.location, %err, "reading events failed; retrying");
                    self.warned = true;
                }
                Err(())
            }
        }
    }
}

/// The modification times and sizes of a database file and its write-ahead log.
fn file_change(path: &std::path::Path) -> Option<[(std::time::SystemTime, u64); 2]> {
    let stamp = |path: &std::path::Path| {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
            .unwrap_or((std::time::UNIX_EPOCH, 0))
    };
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    Some([stamp(path), stamp(std::path::Path::new(&wal))])
}

/// Scans `.app/` for changes into the hub until the stop: every [`LOCAL_INTERVAL`], and at
/// once (after [`LOCAL_GAP`]) when a file changes in the queue or the locks.
pub(crate) async fn watch_local(hub: Hub, paths: AppPaths, settings: Settings, stop: StopToken) {
    let watched = paths.clone();
    follow_local(
        (&hub, &stop, "scanning .app/"),
        (LocalState::default(), paths, settings),
        move |watch: Option<LocalWatch>| {
            // Made again when a directory it could not cover has appeared since.
            if watch.as_ref().is_none_or(|w| w.incomplete(&watched)) {
                LocalWatch::new(&watched).or(watch)
            } else {
                watch
            }
        },
        |(state, paths, settings)| state.scan(paths, settings),
        LocalWatch::wait,
    )
    .await;
}

/// Follows the agents' state files (`.app/activity/`) into the hub until the stop: woken by
/// their changes (at most every [`LOCAL_GAP`]), and every [`LOCAL_INTERVAL`]. Apart from the
/// other `.app/` scan, so that a supervisor rewriting its file (every few ticks) costs a
/// listing of that directory, not a scan of the registry, the queue and the locks.
pub(crate) async fn watch_agents(hub: Hub, paths: AppPaths, stop: StopToken) {
    let dir = paths.activity_dir();
    follow_local(
        (&hub, &stop, "following the agents' state"),
        (AgentStates::default(), paths),
        move |watch: Option<DirWatch>| {
            // Never made here (an API only reads `.app/`): watched once it exists.
            watch.or_else(|| {
                dir.is_dir()
                    .then(|| DirWatch::new(&dir, LOCAL_INTERVAL, false).ok())
                    .flatten()
            })
        },
        |(agents, paths)| agents.scan(paths),
        |watch, limit| {
            watch.wait(limit);
            watch
        },
    )
    .await;
}

/// The loop of a feed of `.app/`: make (or keep) its watch, scan on a blocking thread, publish,
/// wait for the watch or the interval; the watch is made before the scan, so a change during
/// the scan still wakes the next one.
async fn follow_local<S, W>(
    (hub, stop, what): (&Hub, &StopToken, &str),
    state: S,
    mut rewatch: impl FnMut(Option<W>) -> Option<W>,
    scan: fn(&mut S) -> Vec<ApiEvent>,
    wait: fn(W, Duration) -> W,
) where
    S: Send + 'static,
    W: Send + 'static,
{
    let mut seen = Some(state);
    let mut watch: Option<W> = None;
    loop {
        watch = rewatch(watch.take());
        let Some(mut state) = seen.take() else { return };
        let scanned = tokio::task::spawn_blocking(move || {
            let events = scan(&mut state);
            (state, events)
        })
        .await;
        match scanned {
            Ok((state, events)) => {
                for event in events {
                    hub.publish(event);
                }
                seen = Some(state);
            }
            Err(err) => {
                tracing::warn!(%err, "{what} for the event stream failed; it stops");
                return;
            }
        }
        let stopped = match watch.take() {
            Some(dirs) => {
                let woken = tokio::task::spawn_blocking(move || wait(dirs, LOCAL_INTERVAL));
                tokio::select! {
                    dirs = woken => {
                        watch = dirs.ok();
                        wait_or_stop(stop, LOCAL_GAP).await
                    }
                    () = stop.stopped() => true,
                }
            }
            None => wait_or_stop(stop, LOCAL_INTERVAL).await,
        };
        if stopped {
            return;
        }
    }
}

/// The shortest time between two scans woken by file events (a burst of writes is one scan).
const LOCAL_GAP: Duration = Duration::from_millis(20);

/// A watch on the queue's inboxes and the locks, once `.app/` has them (never made here: an
/// API only reads `.app/`).
struct LocalWatch {
    dirs: DirWatch,
    /// Whether the locks directory existed, and so is watched.
    locks: bool,
}

impl LocalWatch {
    fn new(paths: &AppPaths) -> Option<LocalWatch> {
        let (inboxes, locks) = (paths.inboxes_dir(), paths.locks_dir());
        if !inboxes.is_dir() {
            return None;
        }
        let mut dirs = DirWatch::new(&inboxes, LOCAL_INTERVAL, false).ok()?;
        dirs.also(&inboxes, true).ok()?;
        let locks = locks.is_dir();
        if locks {
            dirs.also(&paths.locks_dir(), true).ok()?;
        }
        Some(LocalWatch { dirs, locks })
    }

    /// Whether the locks directory has appeared since this watch was made without it.
    fn incomplete(&self, paths: &AppPaths) -> bool {
        !self.locks && paths.locks_dir().is_dir()
    }

    fn wait(self, limit: Duration) -> LocalWatch {
        self.dirs.wait(limit);
        self
    }
}

/// Waits `period`; returns true when the stop came first (or had come already).
async fn wait_or_stop(stop: &StopToken, period: Duration) -> bool {
    if stop.is_stopped() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(period) => false,
        () = stop.stopped() => true,
    }
}

/// What the last scan of `.app/` saw; the first scan only records.
#[derive(Debug, Default)]
pub struct LocalState {
    primed: bool,
    /// Instances already reported stale.
    stale: HashSet<InstanceId>,
    /// Message files in inboxes: (recipient, message id).
    messages: HashSet<(String, String)>,
    /// Acknowledged messages, the same way.
    acked: HashSet<(String, String)>,
    /// Locks by name: the last token and whether it was held.
    locks: HashMap<LockName, (u64, bool)>,
}

/// What an `instance.state` event said: the state, since when, and the kind of its reason.
type Announced = (AgentState, Timestamp, String);

/// The kind of a reason: its text up to the first digit. "cpu 43%" and "cpu 97%" are one kind,
/// "started", "cpu 43%" and "the worktree changed" three: a working agent whose reason moves
/// from "started" to its CPU use is news, its CPU use going up and down is not.
fn reason_kind(reason: &str) -> String {
    let cut = reason
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(reason.len());
    reason[..cut].trim_end().to_string()
}

/// What the last look at `.app/activity/` saw; the first one only records.
#[derive(Debug, Default)]
struct AgentStates {
    primed: bool,
    /// Activity files by instance: the file's identity when last read, and what it said (the
    /// tracker rewrites the file for its progress and reason too: only a new state, a new
    /// `since` of the same one, or a new kind of reason is news).
    agents: HashMap<String, (FileStamp, Option<Announced>)>,
}

/// What tells one version of a file from the next: `write_atomic` renames a new inode in.
type FileStamp = (u64, std::time::SystemTime, u64);

fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.modified().ok()?, meta.len()))
}

impl LocalState {
    /// Scans once; returns the changes since the last scan.
    pub fn scan(&mut self, paths: &AppPaths, settings: &Settings) -> Vec<ApiEvent> {
        let mut out = Vec::new();
        let coordination = Coordination::new(paths, settings);
        let keys = coordination.keys();
        self.scan_instances((paths, keys), settings.timing.stale_after, &mut out);
        let key = keys.load().ok().flatten();
        self.scan_messages(&coordination, paths, key, &mut out);
        self.scan_locks(&coordination, &mut out);
        let primed = std::mem::replace(&mut self.primed, true);
        if primed { out } else { Vec::new() }
    }

    fn scan_instances(
        &mut self,
        (paths, keys): (&AppPaths, &Keys),
        stale_after: Duration,
        out: &mut Vec<ApiEvent>,
    ) {
        let Ok(snapshot) = Registry::open_read_only(paths, keys).and_then(|r| r.snapshot()) else {
            return;
        };
        let mut stale = HashSet::new();
        for record in snapshot.valid_instances() {
            if let Liveness::Stale(reason) = record.liveness(stale_after) {
                if !self.stale.contains(&record.id) {
                    out.push(ApiEvent::now(
                        "instance.stale",
                        Some(&record.id),
                        json!({ "pid": record.pid, "reason": reason }),
                    ));
                }
                stale.insert(record.id.clone());
            }
        }
        self.stale = stale;
    }

    fn scan_messages(
        &mut self,
        coordination: &Coordination,
        paths: &AppPaths,
        key: Option<SigningKey>,
        out: &mut Vec<ApiEvent>,
    ) {
        let listed = |dir: fn(&AppPaths, &str) -> PathBuf| {
            let mut found = HashSet::new();
            for recipient in visible_names(&paths.inboxes_dir()).unwrap_or_default() {
                for file in visible_names(&dir(paths, &recipient)).unwrap_or_default() {
                    if let Some(id) = file.strip_suffix(".json") {
                        found.insert((recipient.clone(), id.to_string()));
                    }
                }
            }
            found
        };
        let inbox = listed(AppPaths::inbox);
        let acked = listed(AppPaths::acked);
        let store = coordination.messages_with(key);
        if self.primed {
            // A message acknowledged between two scans is seen in `acked/` only; one moved
            // between the two listings is in both, and announced once.
            let appeared: HashSet<&(String, String)> = inbox
                .iter()
                .chain(&acked)
                .filter(|k| !self.messages.contains(*k) && !self.acked.contains(*k))
                .collect();
            for (recipient, id) in appeared {
                // Only what verifies is announced; the rest is the receiver's to quarantine
                // (all of an inbox whose name is no instance id: no message names it).
                let Ok(recipient) = InstanceId::parse(recipient) else {
                    continue;
                };
                let Some(message) = store.find(&recipient, id) else {
                    continue;
                };
                out.push(ApiEvent::now(
                    "message.sent",
                    Some(&message.from),
                    json!({
                        "id": message.id,
                        "from": message.from,
                        "to": message.to,
                        "recipient": message.recipient,
                        "type": message.kind,
                        "payload": message.payload,
                    }),
                ));
            }
            for (recipient, id) in acked.difference(&self.acked) {
                out.push(ApiEvent::now(
                    "message.acked",
                    Some(recipient),
                    json!({ "id": id, "recipient": recipient }),
                ));
            }
        }
        self.messages = inbox;
        self.acked = acked;
    }

    fn scan_locks(&mut self, coordination: &Coordination, out: &mut Vec<ApiEvent>) {
        let Ok(Some(locks)) = coordination.existing_locks() else {
            return;
        };
        let Ok(list) = locks.list() else { return };
        let mut now = HashMap::new();
        for (state, _) in list {
            let held = state.holder.is_some();
            let before = self.locks.get(&state.name).copied();
            // A new token is a grant; one taken and given back between two scans shows as a
            // new token that is no longer held: both events are sent.
            let granted = before.is_none_or(|(token, _)| token != state.token) && state.token > 0;
            if granted {
                let holder = state.holder.as_ref().and_then(|h| h.instance.clone());
                out.push(ApiEvent::now(
                    "lock.acquired",
                    holder.as_deref(),
                    json!({ "name": state.name, "token": state.token, "holder": state.holder }),
                ));
            }
            if !held && (granted || before == Some((state.token, true))) {
                out.push(ApiEvent::now(
                    "lock.released",
                    None,
                    json!({ "name": state.name, "token": state.token }),
                ));
            }
            now.insert(state.name, (state.token, held));
        }
        self.locks = now;
    }
}

impl AgentStates {
    /// `instance.state` for each agent whose state (or its start, or the kind of its reason)
    /// changed since the last scan, and for one that appeared: its first state.
    fn scan(&mut self, paths: &AppPaths) -> Vec<ApiEvent> {
        let mut out = Vec::new();
        let mut now = HashMap::new();
        for name in visible_names(&paths.activity_dir()).unwrap_or_default() {
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(stamp) = file_stamp(&paths.activity(id)) else {
                continue;
            };
            let before = self.agents.remove(id);
            let known = before.as_ref().and_then(|(_, state)| state.clone());
            if before.as_ref().is_some_and(|(was, _)| *was == stamp) {
                now.insert(id.to_string(), (stamp, known));
                continue;
            }
            // Not an activity (an agent's report, `<id>.said.json`, or a file being replaced):
            // nothing to announce, read again when it changes.
            let Some(activity) = activity::read(paths, id) else {
                now.insert(id.to_string(), (stamp, known));
                continue;
            };
            let agent = activity.agent;
            let state = (agent.state, agent.since, reason_kind(&agent.reason));
            if known.as_ref() != Some(&state) {
                out.push(ApiEvent::now(
                    "instance.state",
                    Some(id),
                    json!({
                        "id": id,
                        "state": agent.state,
                        "since": agent.since,
                        "reason": agent.reason,
                    }),
                ));
            }
            now.insert(id.to_string(), (stamp, Some(state)));
        }
        self.agents = now;
        let primed = std::mem::replace(&mut self.primed, true);
        if primed { out } else { Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reasons_kind_is_its_text_before_the_first_digit() {
        assert_eq!(reason_kind("cpu 43%"), reason_kind("cpu 97%"));
        assert_eq!(reason_kind("started"), "started");
        assert_ne!(reason_kind("started"), reason_kind("cpu 5%"));
        assert_ne!(reason_kind("cpu 5%"), reason_kind("the worktree changed"));
        assert_eq!(
            reason_kind("no cpu and no change for 3s"),
            reason_kind("no cpu and no change for 45s")
        );
        assert_eq!(
            reason_kind("said: waiting for review"),
            "said: waiting for review"
        );
    }

    #[test]
    fn a_log_tail_keeps_whole_lines_within_its_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        let tail = |lines, max| tail_lines(&path, lines, max).unwrap();
        assert_eq!(tail(2, 1024), ("two\nthree\n".to_string(), 14, true));
        assert_eq!(tail(10, 1024), ("one\ntwo\nthree\n".to_string(), 14, false));
        assert_eq!(tail(0, 1024), (String::new(), 14, true));
        // The last 8 bytes are "o\nthree\n": the cut line goes.
        assert_eq!(tail(10, 8), ("three\n".to_string(), 14, true));
        std::fs::write(&path, "no newline").unwrap();
        assert_eq!(tail(1, 1024), ("no newline".to_string(), 10, false));
        std::fs::write(&path, "").unwrap();
        assert_eq!(tail(5, 1024), (String::new(), 0, false));
        assert_eq!(
            tail_lines(&dir.path().join("none"), 1, 1)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::NotFound
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_subscriber_is_told_it_lagged_and_others_are_not() {
        let hub = Hub::new(2);
        let mut slow = hub.subscribe();
        let mut fast = hub.subscribe();
        for n in 0..5 {
            hub.publish(ApiEvent::now("test", None, json!(n)));
            assert_eq!(fast.recv().await.unwrap().payload, json!(n));
        }
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(3))
        ));
        assert_eq!(slow.recv().await.unwrap().payload, json!(3));
        assert_eq!(hub.subscribers(), 2);
    }
}
