//! Where `app dash` reads from: the repository's `.app/` and database directly ([`Local`]), or
//! an instance's HTTP API ([`Api`]). Either one follows what happens (file-system events and
//! the database event log's new rows; the API's SSE stream) and only then asks for a new
//! overview, through [`refresh`]: debounced. While that following is whole ([`Source::live`])
//! nothing else causes a read; while it is not (a lost stream, a watch that polls, no event
//! log), a periodic read every [`REFRESH`] is the fallback. Nothing is re-read per frame.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::KeyEvent;
use serde::Deserialize;

use super::view::EventLine;
use crate::db::events::{self, EventFilter};
use crate::db::runs;
use crate::db::{Blocking, DbSettings, Location};
use crate::error::{DashError, Result};
use crate::ids::RunId;
use crate::overview::{self, Overview};
use crate::paths::AppPaths;
use crate::time::Timestamp;
use crate::watch::DirWatch;

/// How long pokes are gathered into one read.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The shortest time between two reads, however often things change (every instance's
/// heartbeat rewrites the registry).
const MIN_GAP: Duration = Duration::from_millis(500);
/// A read this often while the source is not [`Source::live`] (and a redraw while it is, so
/// ages move on the screen).
const REFRESH: Duration = Duration::from_secs(5);
/// How often the database event log is asked for new rows (and the `.app/` watch polls where
/// it has no file-system events).
const EVENT_POLL: Duration = Duration::from_millis(500);
/// Events of the log shown when the dashboard starts.
const BACKLOG: i64 = 200;
/// Bytes of a task's log shown (read locally).
const LOG_TAIL: u64 = 64 * 1024;
/// Lines of a task's log shown (read through the API).
const LOG_LINES: usize = 500;
/// Waits between reconnections to the API's event stream, growing to the last.
const RECONNECT: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
];

/// What the dashboard's loop receives.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A key was pressed.
    Key(KeyEvent),
    /// The terminal changed size (or needs a redraw for another reason).
    Redraw,
    /// A new read of everything.
    Overview(Box<Overview>),
    /// Something happened.
    Event(EventLine),
    /// The source's condition (a failed read, a lost stream), for the header.
    Status(String),
    /// A signal asked the dashboard to end.
    Quit,
}

/// A place the dashboard reads from.
pub(crate) trait Source: Send + Sync {
    /// What the header calls it.
    fn describe(&self) -> String;
    /// One read of everything.
    fn overview(&self) -> Result<Overview>;
    /// Sends what happens to `updates` and pokes `pokes` whenever the overview may have
    /// changed; returns once `updates` is closed.
    fn follow(&self, pokes: &Sender<()>, updates: &Sender<Msg>);
    /// Whether `follow` sees every change now (the API's stream is connected; the watch of
    /// `.app/` has file-system events and the event log is open): then only its pokes cause
    /// reads.
    fn live(&self) -> bool;
    /// The tail of a task's log, or a line saying why there is none.
    fn log_tail(&self, run: &str, task: &str) -> String;
}

/// Reads the overview after each burst of pokes, and every [`REFRESH`] while the source is
/// not live; returns once `updates` or `pokes` is closed.
pub(crate) fn refresh(source: &dyn Source, pokes: &Receiver<()>, updates: &Sender<Msg>) {
    refresh_every(source, pokes, updates, REFRESH);
}

fn refresh_every(
    source: &dyn Source,
    pokes: &Receiver<()>,
    updates: &Sender<Msg>,
    period: Duration,
) {
    let mut last = Instant::now();
    loop {
        match pokes.recv_timeout(period) {
            Ok(()) => {
                // A burst (a heartbeat rewriting the registry and an event row) is one read.
                std::thread::sleep(DEBOUNCE.max(MIN_GAP.saturating_sub(last.elapsed())));
                while pokes.try_recv().is_ok() {}
            }
            Err(RecvTimeoutError::Timeout) if source.live() => {
                if updates.send(Msg::Redraw).is_err() {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        last = Instant::now();
        let msg = match source.overview() {
            Ok(overview) => Msg::Overview(Box::new(overview)),
            Err(err) => Msg::Status(format!("read failed: {err}")),
        };
        if updates.send(msg).is_err() {
            return;
        }
    }
}

/// The repository's `.app/` and database, read in this process.
pub(crate) struct Local {
    reader: overview::Source,
    paths: AppPaths,
    database: (Location, DbSettings),
    live: AtomicBool,
}

impl Local {
    /// Reads the repository of `paths` and the database at `database`.
    pub(crate) fn new(
        reader: overview::Source,
        paths: AppPaths,
        database: (Location, DbSettings),
    ) -> Local {
        Local {
            reader,
            paths,
            database,
            live: AtomicBool::new(false),
        }
    }

    /// The event log's rows after `after` of this repository, oldest first.
    fn new_events(&self, db: &Blocking, after: i64) -> Result<Vec<events::Event>> {
        let filter = EventFilter {
            repo_root: Some(self.paths.repo_root().display().to_string()),
            after_id: after,
            ..EventFilter::default()
        };
        db.run(async |db| events::query(db, &filter, 1000).await)
    }

    /// A watch on the state `gather` reads: `.app/` itself (the registries), its locks, its
    /// queue and the agents' activity; not its worktrees, whose edits are the agents' own.
    /// Also the directories it could not cover yet (made again once they exist).
    fn watch(&self) -> Result<(DirWatch, Vec<PathBuf>)> {
        let mut watch = DirWatch::new(self.paths.state_dir(), EVENT_POLL, false)?;
        let mut missing = Vec::new();
        for (dir, recursive) in [
            (self.paths.locks_dir(), true),
            (self.paths.queue_dir(), true),
            (self.paths.activity_dir(), false),
        ] {
            if dir.is_dir() {
                watch.also(&dir, recursive)?;
            } else {
                missing.push(dir);
            }
        }
        Ok((watch, missing))
    }
}

impl Source for Local {
    fn describe(&self) -> String {
        format!("local {}", self.paths.state_dir().display())
    }

    fn overview(&self) -> Result<Overview> {
        overview::gather(&self.reader)
    }

    fn follow(&self, pokes: &Sender<()>, updates: &Sender<Msg>) {
        let (mut watch, mut missing) = match self.watch() {
            Ok(watch) => watch,
            Err(err) => {
                let _ = updates.send(Msg::Status(format!("not watching .app/: {err}")));
                return;
            }
        };
        let mut db: Option<(Blocking, i64)> = None;
        loop {
            if db.is_none() {
                db = self.open_log(updates);
            }
            if missing.iter().any(|dir| dir.is_dir())
                && let Ok(made) = self.watch()
            {
                (watch, missing) = made;
            }
            self.live
                .store(watch.has_events() && db.is_some(), Ordering::SeqCst);
            let changed = watch.wait(EVENT_POLL);
            let mut happened = false;
            if let Some((log, after)) = &mut db {
                match self.new_events(log, *after) {
                    Ok(rows) => {
                        for event in rows {
                            *after = event.id;
                            happened = true;
                            if updates.send(Msg::Event(event_line(event))).is_err() {
                                return;
                            }
                        }
                    }
                    Err(err) => {
                        let _ = updates.send(Msg::Status(format!("event log: {err}")));
                        db = None;
                    }
                }
            }
            if (changed || happened) && pokes.send(()).is_err() {
                return;
            }
        }
    }

    fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    fn log_tail(&self, run: &str, task: &str) -> String {
        // Where the task's row says its log is (a fleet task's differs), else the usual place.
        let (location, settings) = self.database.clone();
        let recorded = Blocking::open(location, settings).and_then(|db| {
            let id = RunId::stored(run.to_string());
            db.run(async |db| runs::tasks(db, &id).await)
        });
        let path = recorded
            .ok()
            .and_then(|rows| rows.into_iter().find(|row| row.task_id == task))
            .and_then(|row| row.log_path)
            .map_or_else(|| self.paths.task_log(run, task), PathBuf::from);
        match std::fs::File::open(&path) {
            Ok(file) => tail(file),
            Err(err) => format!("no log at {}: {err}", path.display()),
        }
    }
}

impl Local {
    /// Opens the event log and sends its last [`BACKLOG`] rows; `None` (said in the header)
    /// when the database is out of reach, to be tried again on the next turn.
    fn open_log(&self, updates: &Sender<Msg>) -> Option<(Blocking, i64)> {
        let (location, settings) = self.database.clone();
        let opened = Blocking::open(location, settings).and_then(|db| {
            let now = Timestamp::now().to_string();
            let latest = db.run(async |db| events::latest_id_before(db, &now).await)?;
            Ok((db, (latest - BACKLOG).max(0)))
        });
        match opened {
            Ok(opened) => Some(opened),
            Err(err) => {
                let _ = updates.send(Msg::Status(format!("event log: {err}")));
                std::thread::sleep(REFRESH);
                None
            }
        }
    }
}

fn event_line(event: events::Event) -> EventLine {
    EventLine {
        id: Some(event.id),
        at: event.at,
        kind: event.kind,
        instance: event.instance,
        detail: event.payload.to_string(),
    }
}

/// The last [`LOG_TAIL`] bytes of a log, from a line start.
fn tail(mut file: std::fs::File) -> String {
    use std::io::{Seek, SeekFrom};
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(LOG_TAIL);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return "the log cannot be read".into();
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = if start > 0 {
        text.split_once('\n').map_or(&*text, |(_, rest)| rest)
    } else {
        &text
    };
    if text.is_empty() {
        "(the log is empty)".into()
    } else {
        text.to_string()
    }
}

/// An instance's HTTP API: `GET /overview`, and `GET /events` followed as server-sent events.
pub(crate) struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    stream: ureq::Agent,
    last_id: Mutex<Option<i64>>,
    /// Whether the event stream is open.
    live: AtomicBool,
}

impl Api {
    /// The API at `url` (plain HTTP: `http://HOST:PORT`, with an optional path prefix), with
    /// its bearer token.
    pub(crate) fn new(url: &str, token: Option<String>) -> Result<Api> {
        let bad = |why: &str| DashError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let uri: ureq::http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "https is not built in; reach it over plain http, e.g. through an SSH tunnel",
                )
                .into());
            }
            _ => return Err(bad("it must start with http://").into()),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("it names no host").into());
        }
        if uri.query().is_some() {
            return Err(bad("it has a query").into());
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        // The stream has no overall timeout: it is meant to last.
        let stream = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(Duration::from_secs(10)))
            .build()
            .into();
        Ok(Api {
            base: url.trim_end_matches('/').to_string(),
            token,
            agent,
            stream,
            last_id: Mutex::new(None),
            live: AtomicBool::new(false),
        })
    }

    fn request(
        &self,
        agent: &ureq::Agent,
        path: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let mut request = agent.get(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        request
    }

    /// A 2xx response to `GET path`; an error naming the API otherwise.
    fn call(
        &self,
        agent: &ureq::Agent,
        path: &str,
        last_id: Option<i64>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let mut request = self.request(agent, path);
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let url = format!("{}{path}", self.base);
        let response = request.call().map_err(|err| DashError::Unreachable {
            url: url.clone(),
            why: err.to_string(),
        })?;
        let status = response.status().as_u16();
        match status {
            200..=299 => Ok(response),
            401 | 403 => Err(DashError::Refused {
                url: self.base.clone(),
                status,
            }
            .into()),
            _ => Err(DashError::Unreachable {
                url,
                why: format!("it answered HTTP {status}"),
            }
            .into()),
        }
    }

    /// Reads the stream until it ends or fails; sends each event and pokes for each.
    fn read_stream(&self, pokes: &Sender<()>, updates: &Sender<Msg>) -> Result<bool> {
        let last_id = *self
            .last_id
            .lock()
            .expect("never poisoned: no panic holds it");
        let response = self.call(&self.stream, "/events", last_id)?;
        self.live.store(true, Ordering::SeqCst);
        let _ = updates.send(Msg::Status("following events".into()));
        // Whatever happened while we were away shows in a fresh read.
        if pokes.send(()).is_err() {
            return Ok(false);
        }
        let reader = BufReader::new(response.into_body().into_reader());
        let mut frame = SseFrame::default();
        for line in reader.lines() {
            let Ok(line) = line else { break };
            let Some(done) = frame.line(&line) else {
                continue;
            };
            if let Some(id) = done.id {
                *self
                    .last_id
                    .lock()
                    .expect("never poisoned: no panic holds it") = Some(id);
            }
            if let Some(event) = done.event()
                && updates.send(Msg::Event(event)).is_err()
            {
                return Ok(false);
            }
            if pokes.send(()).is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Source for Api {
    fn describe(&self) -> String {
        format!("api {}", self.base)
    }

    fn overview(&self) -> Result<Overview> {
        let url = format!("{}/overview", self.base);
        let mut response = self.call(&self.agent, "/overview", None)?;
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|err| DashError::Unreachable {
                url: url.clone(),
                why: err.to_string(),
            })?;
        serde_json::from_str(&body).map_err(|err| {
            DashError::Unreachable {
                url,
                why: format!("its answer is not an overview ({err})"),
            }
            .into()
        })
    }

    fn follow(&self, pokes: &Sender<()>, updates: &Sender<Msg>) {
        let mut failures = 0;
        loop {
            let read = self.read_stream(pokes, updates);
            self.live.store(false, Ordering::SeqCst);
            match read {
                Ok(false) => return,
                Ok(true) => failures = 0,
                Err(err) => {
                    failures += 1;
                    if updates.send(Msg::Status(format!("events: {err}"))).is_err() {
                        return;
                    }
                }
            }
            if updates
                .send(Msg::Status("event stream lost; reconnecting".into()))
                .is_err()
            {
                return;
            }
            std::thread::sleep(RECONNECT[failures.min(RECONNECT.len() - 1)]);
        }
    }

    fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    fn log_tail(&self, run: &str, task: &str) -> String {
        let path = format!("/runs/{run}/tasks/{task}/log?tail={LOG_LINES}");
        let read =
            self.call(&self.agent, &path, None)
                .and_then(|mut response| {
                    let body = response.body_mut().read_to_string().map_err(|err| {
                        DashError::Unreachable {
                            url: format!("{}{path}", self.base),
                            why: err.to_string(),
                        }
                    })?;
                    Ok(serde_json::from_str::<WireLog>(&body).map(|log| log.text))
                });
        match read {
            Ok(Ok(text)) if text.is_empty() => "(the log is empty)".into(),
            Ok(Ok(text)) => text,
            Ok(Err(err)) => format!("the API's answer is not a log: {err}"),
            Err(err) => format!("no log: {err}"),
        }
    }
}

/// The answer of `GET /runs/{run}/tasks/{task}/log`, as far as the dashboard reads it.
#[derive(Debug, Deserialize)]
struct WireLog {
    text: String,
}

/// One event of `GET /events` as the API sends it.
#[derive(Debug, Deserialize)]
struct WireEvent {
    id: Option<i64>,
    kind: String,
    at: String,
    instance: Option<String>,
    #[serde(default)]
    payload: serde_json::Value,
}

/// The fields of one server-sent event, gathered line by line until a blank line ends it.
#[derive(Debug, Default)]
struct SseFrame {
    id: Option<i64>,
    kind: Option<String>,
    data: String,
}

impl SseFrame {
    /// Takes one line; a blank line ends the frame and returns it (an empty frame, a comment
    /// or a keep-alive, returns nothing).
    fn line(&mut self, line: &str) -> Option<SseFrame> {
        if line.is_empty() {
            let frame = std::mem::take(self);
            return (frame.kind.is_some() || !frame.data.is_empty()).then_some(frame);
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.id = value.parse().ok(),
            "event" => self.kind = Some(value.to_string()),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
        None
    }

    /// The timeline line of this frame: the event's JSON, or for a frame that is not one
    /// (`lagged`), its name and data.
    fn event(&self) -> Option<EventLine> {
        if let Ok(wire) = serde_json::from_str::<WireEvent>(&self.data) {
            return Some(EventLine {
                id: wire.id.or(self.id),
                at: wire.at,
                kind: wire.kind,
                instance: wire.instance,
                detail: wire.payload.to_string(),
            });
        }
        let kind = self.kind.clone()?;
        Some(EventLine {
            id: None,
            at: Timestamp::now().to_string(),
            kind,
            instance: None,
            detail: self.data.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_sent_events_are_split_into_frames() {
        let mut frame = SseFrame::default();
        let mut done = Vec::new();
        let stream = ": keep-alive\n\nevent: instance.started\nid: 42\ndata: {\"id\":42,\"kind\":\"instance.started\",\"at\":\"2026-01-01T00:00:00.000Z\",\"instance\":\"aaaa0001\",\"payload\":{\"pid\":7}}\n\nevent: lagged\ndata: {\"missed\":3}\n\n";
        for line in stream.lines() {
            done.extend(frame.line(line));
        }
        assert_eq!(done.len(), 2);
        let started = done[0].event().unwrap();
        assert_eq!(started.id, Some(42));
        assert_eq!(started.kind, "instance.started");
        assert_eq!(started.instance.as_deref(), Some("aaaa0001"));
        assert_eq!(started.detail, r#"{"pid":7}"#);
        let lagged = done[1].event().unwrap();
        assert_eq!(
            (lagged.kind.as_str(), lagged.detail.as_str()),
            ("lagged", r#"{"missed":3}"#)
        );
    }

    /// A source that only counts reads and says whether it is live.
    struct Counted {
        live: AtomicBool,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl Source for Counted {
        fn describe(&self) -> String {
            "counted".into()
        }
        fn overview(&self) -> Result<Overview> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Err(DashError::NotATerminal.into())
        }
        fn follow(&self, _: &Sender<()>, _: &Sender<Msg>) {}
        fn live(&self) -> bool {
            self.live.load(Ordering::SeqCst)
        }
        fn log_tail(&self, _: &str, _: &str) -> String {
            String::new()
        }
    }

    #[test]
    fn a_live_source_is_read_only_when_poked_and_one_that_is_not_also_every_period() {
        let source = std::sync::Arc::new(Counted {
            live: AtomicBool::new(true),
            reads: Default::default(),
        });
        let (pokes, poked) = std::sync::mpsc::channel();
        let (updates, screen) = std::sync::mpsc::channel();
        let refresher = std::sync::Arc::clone(&source);
        let thread = std::thread::spawn(move || {
            refresh_every(&*refresher, &poked, &updates, Duration::from_millis(20));
        });
        let reads = || source.reads.load(Ordering::SeqCst);
        // Proving that no read happens needs a wait: many periods long. The screen is redrawn.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(reads(), 0);
        assert!(matches!(screen.recv().unwrap(), Msg::Redraw));
        pokes.send(()).unwrap();
        let read = screen.iter().find(|msg| matches!(msg, Msg::Status(_)));
        assert!(read.is_some());
        assert_eq!(reads(), 1);
        // Not live: the period reads again, without a poke.
        source.live.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while reads() < 3 {
            assert!(Instant::now() < deadline, "no periodic read");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(pokes);
        drop(screen);
        thread.join().unwrap();
    }

    #[test]
    fn api_urls_are_checked() {
        for bad in [
            "",
            "127.0.0.1:3000",
            "ftp://host",
            "https://host:3000",
            "http://",
            "http://h/?a=1",
        ] {
            let err = Api::new(bad, None)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(err.exit_code(), 2, "{bad:?}: {err}");
        }
        let api = Api::new("http://127.0.0.1:3000/", None).unwrap();
        assert_eq!(api.base, "http://127.0.0.1:3000");
    }
}
