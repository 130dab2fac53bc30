//! The HTTP API of an instance (`app serve --with-api`, `app run --with-api`): health, the
//! instances of the repository, a live event stream (server-sent events) and messages.
//!
//! Invariants:
//! - Loopback unless told otherwise; any other address needs a bearer token
//!   (`APP_API_TOKEN`), and a token, once set, is checked on every request.
//! - The address is chosen before the instance registers: an explicit address that is taken
//!   is an error that changes nothing; without one the first free port of the range is used,
//!   and when all are taken the instance runs without an API.
//! - The server runs on a thread of its own with a single-threaded runtime; blocking work
//!   (registry, queue) goes through `spawn_blocking`. `ApiServer::shutdown` sends a final
//!   `instance.stopping` event, ends every stream and stops accepting, bounded in time.
//! - Every error is JSON: `{"error": "...", "kind": "..."}`, axum's own rejections (a body over
//!   [`MAX_BODY_BYTES`], one that breaks off) included: `json_errors` rewrites any other error
//!   response into that shape.

pub mod feed;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use self::feed::{ApiEvent, Hub};
use crate::config::{DEFAULT_API_PORT_RANGE, Settings};
use crate::coordination::Coordination;
use crate::db::{DbSettings, Location};
use crate::error::{ApiStartError, EXIT_BUSY, EXIT_USAGE, Error, InstanceError, Result};
use crate::paths::AppPaths;
use crate::queue;
use crate::registry::{Registry, Snapshot};
use crate::sign::Keys;
use crate::stop::{StopToken, Stopper};

/// Events kept for the slowest subscriber before it is told it lagged.
pub const DEFAULT_CAPACITY: usize = 1024;
/// The largest `--api-capacity` (the buffer is allocated up front).
pub const MAX_CAPACITY: usize = 65_536;
/// The last event every stream gets before the server stops.
pub const FINAL_EVENT: &str = "instance.stopping";
/// The largest request body taken, in bytes (2 MiB); a larger one gets 413.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// How long `shutdown` waits for connections to close.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// What `--with-api` was given.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// `--api-addr` (else `APP_API_ADDR`, else the first free port of the range).
    pub addr: Option<String>,
    /// `--api-capacity`: events buffered per subscriber.
    pub capacity: usize,
    /// What serves `GET /overview` (the layers above the API hand it down); without one that
    /// endpoint answers 404.
    pub dashboard: Option<Arc<dyn Dashboard>>,
}

/// What the API serves from the layers above it (it may not import them): the dashboard's
/// data. Every call runs on the blocking pool, so it may read files and the database.
pub trait Dashboard: std::fmt::Debug + Send + Sync {
    /// Everything one screen shows (`GET /overview`), as JSON; `events` is how many events the
    /// server has published so far, so that no read older than the newest event is reused.
    fn overview(&self, context: &ApiContext, events: u64) -> Result<Value>;
    /// Asks live instance `id` to stop, as `app instance stop ID` does, and returns what was
    /// done (the stop goes on in the background); [`InstanceError::Unknown`] for an id the
    /// registry does not have, [`InstanceError::NotRunning`] for a stale one.
    fn stop(&self, context: &ApiContext, id: &str) -> Result<Value>;
}

/// A bound listener, not yet serving.
#[derive(Debug)]
pub struct Binding {
    listener: TcpListener,
    addr: SocketAddr,
    token: Option<String>,
}

impl Binding {
    /// The URL clients use (loopback for a wildcard address).
    pub fn url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.addr.ip()
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }
}

/// How binding went.
#[derive(Debug)]
pub enum Bound {
    /// Listening.
    Listening(Binding),
    /// No address was given and every port of the range is taken.
    AllTaken(RangeInclusive<u16>),
}

/// Binds the API's address: `options.addr`, else `APP_API_ADDR`, else the first free port of
/// `APP_API_PORT_RANGE` on 127.0.0.1 (all three from `settings`).
pub fn bind(options: &ApiOptions, settings: &Settings) -> Result<Bound> {
    let token = settings.api_token.clone();
    let explicit = options
        .addr
        .clone()
        .or_else(|| settings.api_addr.clone())
        .filter(|a| !a.trim().is_empty());
    if options.capacity == 0 || options.capacity > MAX_CAPACITY {
        return Err(ApiStartError::Capacity {
            capacity: options.capacity,
            max: MAX_CAPACITY,
            default: DEFAULT_CAPACITY,
        }
        .into());
    }
    let Some(text) = explicit else {
        let range = settings.api_port_range.clone();
        for port in range.clone() {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
            if let Ok(listener) = TcpListener::bind(addr) {
                return Ok(Bound::Listening(Binding {
                    listener,
                    addr,
                    token,
                }));
            }
        }
        return Ok(Bound::AllTaken(range));
    };
    let addr: SocketAddr = text
        .trim()
        .parse()
        .map_err(|_| ApiStartError::NotAnAddress { text: text.clone() })?;
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(ApiStartError::Reachable { addr }.into());
    }
    let listener = TcpListener::bind(addr).map_err(|err| {
        if err.kind() == std::io::ErrorKind::AddrInUse {
            ApiStartError::Taken {
                addr,
                low: *DEFAULT_API_PORT_RANGE.start(),
                high: *DEFAULT_API_PORT_RANGE.end(),
            }
        } else {
            ApiStartError::Listen { addr, source: err }
        }
    })?;
    let addr = listener.local_addr().unwrap_or(addr);
    Ok(Bound::Listening(Binding {
        listener,
        addr,
        token,
    }))
}

/// What the API serves.
#[derive(Debug, Clone)]
pub struct ApiContext {
    /// The instance the API belongs to.
    pub instance_id: String,
    /// The repository's `.app/` layout.
    pub paths: AppPaths,
    /// Where the repository's signing key comes from.
    pub keys: Keys,
    /// The settings of the `app` that serves it (when an instance counts as stale, how large a
    /// message may be).
    pub settings: Settings,
    /// The shared database whose events are streamed.
    pub database: (Location, DbSettings),
    /// Events buffered per subscriber.
    pub capacity: usize,
    /// What serves `GET /overview`, when anything does.
    pub dashboard: Option<Arc<dyn Dashboard>>,
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    url: String,
    hub: Hub,
    /// Ends the server, its feeds and every stream.
    stop: Stopper,
    done: std::sync::mpsc::Receiver<()>,
}

struct AppState {
    context: ApiContext,
    hub: Hub,
    token: Option<String>,
    /// Bound to a loopback address: requests must name a loopback host.
    loopback: bool,
    stop: StopToken,
}

/// The failure to set up `what` for the server.
fn setup(what: &'static str) -> impl Fn(std::io::Error) -> ApiStartError {
    move |source| ApiStartError::Setup { what, source }
}

/// Starts serving `binding` on a thread of its own.
#[tracing::instrument(skip_all)]
pub fn start(binding: Binding, context: ApiContext) -> Result<ApiServer> {
    let url = binding.url();
    let hub = Hub::new(context.capacity);
    let stop = Stopper::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("start the API's runtime"))?;
    binding
        .listener
        .set_nonblocking(true)
        .map_err(setup("set up the API's socket"))?;
    let state = Arc::new(AppState {
        context,
        hub: hub.clone(),
        token: binding.token,
        loopback: binding.addr.ip().is_loopback(),
        stop: stop.token(),
    });
    // A local database answers synchronously (and may wait out a busy lock): its feed gets a
    // thread and runtime of its own so it never holds up a request. It ends on `stop`.
    {
        let (hub, database, stop) = (hub.clone(), state.context.database.clone(), stop.token());
        let repo_root = state.context.paths.repo_root().display().to_string();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(setup("start the event feed"))?;
        thread::Builder::new()
            .name("api-db-feed".into())
            .spawn(move || runtime.block_on(feed::tail_database(hub, database, repo_root, stop)))
            .map_err(setup("start the event feed"))?;
    }
    let (finished, done) = std::sync::mpsc::channel();
    let (listener, stopped) = (binding.listener, stop.token());
    thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            runtime.block_on(serve(listener, state, stopped));
            let _ = finished.send(());
        })
        .map_err(setup("start the API thread"))?;
    Ok(ApiServer {
        url,
        hub,
        stop,
        done,
    })
}

impl ApiServer {
    /// Where the API listens.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends the final event to every stream, stops accepting and waits (bounded) for the
    /// connections to close.
    pub fn shutdown(self, instance_id: &str, reason: &str) {
        self.hub.publish(ApiEvent::now(
            FINAL_EVENT,
            Some(instance_id),
            json!({ "reason": reason }),
        ));
        self.stop.stop();
        if self.done.recv_timeout(SHUTDOWN_WAIT).is_err() {
            tracing::warn!(url = %self.url, "the API did not close its connections in time");
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<AppState>, stop: StopToken) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(%err, "the API cannot listen");
            return;
        }
    };
    let context = &state.context;
    let local = feed::watch_local(
        state.hub.clone(),
        context.paths.clone(),
        context.settings.clone(),
        stop.clone(),
    );
    let agents = feed::watch_agents(state.hub.clone(), context.paths.clone(), stop.clone());
    let shutdown = async move { stop.stopped().await };
    let server = async {
        if let Err(err) = axum::serve(listener, router(Arc::clone(&state)))
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(%err, "the API server failed");
        }
    };
    tokio::join!(server, local, agents);
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/dashboard", get(dashboard))
        .route("/health", get(health))
        .route("/instances", get(instances))
        .route("/events", get(events))
        .route("/overview", get(overview))
        .route("/runs/{run}/tasks/{task}/log", get(task_log))
        .route("/instances/{id}/stop", post(stop_instance))
        .route("/messages", post(messages))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// Gives an error response that is not JSON yet (axum's rejections are plain text) the
/// documented shape, keeping its status and its text as the message.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // A rejection's text is a line; anything longer is cut, never buffered whole.
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_string()
    } else {
        text
    };
    ApiError::new(status, kind_of(status), message).into_response()
}

/// The `kind` of an error response with `status`.
fn kind_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "busy",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        status if status.is_client_error() => "bad_input",
        _ => "failed",
    }
}

/// A body that could not be read, as an API error.
fn body_error(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the body is over the API's limit of {MAX_BODY_BYTES} bytes; send a smaller message (payloads are limited by APP_MAX_MESSAGE_BYTES)"
        )
    } else {
        format!("the body could not be read: {}", rejection.body_text())
    };
    ApiError::new(status, kind_of(status), message)
}

/// An error as the API returns it.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({ "error": self.message, "kind": self.kind })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        // By the exit-code contract, so every domain's errors map the same way.
        let (status, kind) = match (&err, err.exit_code()) {
            (Error::Instance(InstanceError::Unknown { .. }), _) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            (Error::Instance(InstanceError::NotRunning { .. }), _) => {
                (StatusCode::CONFLICT, "not_running")
            }
            (_, EXIT_USAGE) => (StatusCode::BAD_REQUEST, "bad_input"),
            (_, EXIT_BUSY) => (StatusCode::CONFLICT, "busy"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
        };
        ApiError::new(status, kind, err.to_string())
    }
}

async fn authorize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    // A web page must not reach a loopback API by pointing its own name at 127.0.0.1 (DNS
    // rebinding): the Host header has to name the loopback address itself.
    if state.loopback
        && !headers
            .get(header::HOST)
            .is_some_and(|host| loopback_host(host.as_bytes()))
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the Host header must name a loopback address (127.0.0.1, localhost or [::1])",
        )
        .into_response();
    }
    // The dashboard page holds no data: it is served to anyone who may reach the address, and
    // every request it makes carries the token.
    let page = request.method() == axum::http::Method::GET
        && matches!(request.uri().path(), "/" | "/dashboard");
    if let Some(token) = state.token.as_ref().filter(|_| !page) {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.trim(), token) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token; send 'Authorization: Bearer <APP_API_TOKEN>'",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Whether a Host header names the loopback interface (any port).
fn loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see docs/API.md (GET /health, GET /instances, GET /overview, GET /events, GET /runs/RUN/tasks/TASK/log, POST /messages, POST /instances/ID/stop)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see docs/API.md",
    )
}

/// The web dashboard: one page, its styles and script inline, nothing fetched from elsewhere.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// What the page may do: run its own inline script and styles, talk to this origin only, never
/// be framed.
const DASHBOARD_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "instance_id": state.context.instance_id,
        "subscribers": state.hub.subscribers(),
    }))
}

/// Runs `body` with the registry's current snapshot on the blocking pool.
async fn with_snapshot<T: Send + 'static>(
    state: &AppState,
    body: impl FnOnce(&ApiContext, &Snapshot) -> Result<T> + Send + 'static,
) -> std::result::Result<T, ApiError> {
    let context = state.context.clone();
    tokio::task::spawn_blocking(move || {
        let snapshot = Registry::open_read_only(&context.paths, &context.keys)?.snapshot()?;
        body(&context, &snapshot)
    })
    .await
    .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed", err.to_string()))?
    .map_err(ApiError::from)
}

async fn instances(
    State(state): State<Arc<AppState>>,
) -> std::result::Result<Json<Value>, ApiError> {
    let listing = with_snapshot(&state, |context, snapshot| {
        Ok(Value::Array(
            snapshot
                .valid_instances()
                .into_iter()
                .map(|record| record.to_json(&record.liveness(context.settings.timing.stale_after)))
                .collect(),
        ))
    })
    .await?;
    Ok(Json(listing))
}

async fn overview(
    State(state): State<Arc<AppState>>,
) -> std::result::Result<Json<Value>, ApiError> {
    let Some(dashboard) = state.context.dashboard.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this API serves no overview (it was started without a dashboard)",
        ));
    };
    let (context, events) = (state.context.clone(), state.hub.published());
    let value = tokio::task::spawn_blocking(move || dashboard.overview(&context, events))
        .await
        .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed", err.to_string()))?
        .map_err(ApiError::from)?;
    Ok(Json(value))
}

/// The most database events one reconnect replays; a client further behind gets them, then
/// `lagged` for the rest (as a slow reader does).
pub const MAX_REPLAY: usize = 10_000;

/// `GET /events`: with `Last-Event-ID: N` (or `?last_event_id=N`) the database events after N
/// first, then live ones.
/// The default `?tail=` of a task log, in lines.
const DEFAULT_LOG_LINES: usize = 200;
/// The most of a task log one request reads, from its end, in bytes (256 KiB).
pub const MAX_LOG_BYTES: u64 = 256 * 1024;

/// `GET /runs/{run}/tasks/{task}/log?tail=N`: the last N lines of the task's log, read from the
/// path its row records (never one from the request), at most [`MAX_LOG_BYTES`].
async fn task_log(
    State(state): State<Arc<AppState>>,
    Path((run, task)): Path<(String, String)>,
    uri: axum::http::Uri,
) -> std::result::Result<Json<Value>, ApiError> {
    let lines = match query_param(&uri, "tail") {
        None => DEFAULT_LOG_LINES,
        Some(text) => text.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_input",
                format!("tail={text:?} is not a number of lines; send e.g. ?tail=100"),
            )
        })?,
    };
    let unknown = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("run {run:?} has no task {task:?} with a log; see GET /overview for the runs"),
        )
    };
    let database = state.context.database.clone();
    let (run_id, task_id) = (run.clone(), task.clone());
    let row = tokio::task::spawn_blocking(move || {
        let db = crate::db::Blocking::open(database.0, database.1)?;
        let id = crate::ids::RunId::stored(run_id);
        let tasks = db.run(async |db| crate::db::runs::tasks(db, &id).await)?;
        Ok::<_, Error>(tasks.into_iter().find(|row| row.task_id == task_id))
    })
    .await
    .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed", err.to_string()))?
    .map_err(ApiError::from)?
    .ok_or_else(unknown)?;
    let path = row.log_path.clone().ok_or_else(unknown)?;
    let read_path = std::path::PathBuf::from(&path);
    let tail =
        tokio::task::spawn_blocking(move || feed::tail_lines(&read_path, lines, MAX_LOG_BYTES))
            .await
            .map_err(|err| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed", err.to_string())
            })?;
    let (text, size, truncated) = match tail {
        Ok(tail) => tail,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(unknown()),
        Err(err) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed",
                format!("reading the log {path}: {err}"),
            ));
        }
    };
    Ok(Json(json!({
        "run": run,
        "task": task,
        "status": row.status.to_string(),
        "path": path,
        "size": size,
        "truncated": truncated,
        "text": text,
    })))
}

/// `POST /instances/{id}/stop`: what `app instance stop ID` does, through the dashboard.
async fn stop_instance(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> std::result::Result<(StatusCode, Json<Value>), ApiError> {
    require_json(&headers)?;
    let Some(dashboard) = state.context.dashboard.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this API cannot stop instances (it was started without a dashboard); use 'app instance stop'",
        ));
    };
    let context = state.context.clone();
    let value = tokio::task::spawn_blocking(move || dashboard.stop(&context, &id))
        .await
        .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed", err.to_string()))?
        .map_err(ApiError::from)?;
    Ok((StatusCode::ACCEPTED, Json(value)))
}

/// Refuses a request that is not declared JSON: browsers send other pages' form posts
/// (text/plain, form-encoded) without asking first; JSON they must ask for (CORS), which this
/// API never allows.
fn require_json(headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if json_body {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_input",
            "send the request as JSON with 'Content-Type: application/json'",
        ))
    }
}

async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> std::result::Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>, ApiError>
{
    let resume = last_event_id(&headers, &uri)?;
    // Subscribed before the log is read: an event written meanwhile is in the log, in the
    // receiver, or both (then the replay's copy is the one sent), never in neither.
    let receiver = state.hub.subscribe();
    let (replay, missed) = match resume {
        Some(after) => {
            let (database, repo_root) = (
                state.context.database.clone(),
                state.context.paths.repo_root().display().to_string(),
            );
            tokio::task::spawn_blocking(move || {
                feed::replay(database, &repo_root, after, MAX_REPLAY)
            })
            .await
            .map_err(|err| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed", err.to_string())
            })?
            .map_err(ApiError::from)?
        }
        None => (Vec::new(), false),
    };
    // Live database events up to the last replayed one were sent already.
    let sent_through = replay.last().and_then(|event| event.id).or(resume);
    let mut first: std::collections::VecDeque<Event> = replay.iter().map(sse_event).collect();
    if missed {
        first.push_back(
            Event::default()
                .event("lagged")
                .data(json!({ "missed": null }).to_string()),
        );
    }
    let stop = state.stop.clone();
    let stream = futures_util::stream::unfold(
        (first, receiver, stop, false),
        move |(mut first, mut receiver, stop, ended)| async move {
            if let Some(event) = first.pop_front() {
                return Some((Ok(event), (first, receiver, stop, ended)));
            }
            loop {
                if ended {
                    return None;
                }
                // Events already published come before the stop, so the final one is delivered.
                let next = tokio::select! {
                    biased;
                    received = receiver.recv() => received,
                    () = stop.stopped() => return None,
                };
                return match next {
                    Ok(event) if event.id.is_some() && event.id <= sent_through => continue,
                    Ok(event) => {
                        let last = event.kind == FINAL_EVENT;
                        Some((Ok(sse_event(&event)), (first, receiver, stop, last)))
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => Some((
                        Ok(Event::default()
                            .event("lagged")
                            .data(json!({ "missed": missed }).to_string())),
                        (first, receiver, stop, false),
                    )),
                    Err(broadcast::error::RecvError::Closed) => None,
                };
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The id a client resumes after: the `Last-Event-ID` header, else `?last_event_id=N`.
fn last_event_id(
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> std::result::Result<Option<i64>, ApiError> {
    let given = headers
        .get("last-event-id")
        .map(|value| value.to_str().unwrap_or("?").trim().to_string())
        .or_else(|| query_param(uri, "last_event_id").map(str::to_string));
    let Some(text) = given.filter(|text| !text.is_empty()) else {
        return Ok(None);
    };
    text.parse::<i64>()
        .ok()
        .filter(|id| *id >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_input",
                format!(
                    "the last event id {text:?} is not an event id; send the `id` of the last event received (a whole number), or none to start from now"
                ),
            )
        })
}

/// The value of query parameter `name` (taken as it is: the parameters read are numbers).
fn query_param<'a>(uri: &'a axum::http::Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

fn sse_event(event: &ApiEvent) -> Event {
    let data = serde_json::to_string(event).expect("events serialize");
    let sse = Event::default().event(&event.kind).data(data);
    match event.id {
        Some(id) => sse.id(id.to_string()),
        None => sse,
    }
}

/// The body of `POST /messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    /// An instance id, or `all` for every live instance.
    to: String,
    /// The message type.
    #[serde(rename = "type", default = "text_kind")]
    kind: String,
    /// Any JSON value.
    payload: Value,
    /// Milliseconds before an unacknowledged message expires.
    ttl: Option<u64>,
    /// The sending instance (default: the API's own).
    from: Option<String>,
    /// With `to: all`, also every live instance on the fleet's other hosts.
    #[serde(default)]
    fleet: bool,
}

fn text_kind() -> String {
    "text".into()
}

async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<(StatusCode, Json<Value>), ApiError> {
    require_json(&headers)?;
    let body = body.map_err(body_error)?;
    let request: PostMessage = serde_json::from_slice(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_input",
            format!(
                "the body is not a message ({err}); send {{\"to\": \"<id>|all\", \"type\": \"text\", \"payload\": ...}}"
            ),
        )
    })?;
    let posted = with_snapshot(&state, move |context, snapshot| {
        let (location, db_settings) = &context.database;
        let coordination = Coordination::new(&context.paths, &context.settings)
            .with_database(location, *db_settings);
        coordination.post(
            &*coordination.roster(snapshot),
            queue::Post {
                from: request.from.unwrap_or_else(|| context.instance_id.clone()),
                to: request.to,
                kind: request.kind,
                ttl: request
                    .ttl
                    .map_or(queue::DEFAULT_TTL, Duration::from_millis),
                payload: request.payload,
                fleet: request.fleet,
            },
        )
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": posted.id, "recipients": posted.recipients })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for host in [
            "127.0.0.1:3000",
            "localhost:3000",
            "LOCALHOST",
            "[::1]:3000",
            "127.0.0.2",
        ] {
            assert!(loopback_host(host.as_bytes()), "{host}");
        }
        for host in [
            "evil.example:3000",
            "10.0.0.1:3000",
            "",
            "[::2]:80",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn plain_text_errors_get_the_json_shape_and_the_rest_is_left_alone() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let body_of = |response: Response| {
            runtime.block_on(async {
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                String::from_utf8(bytes.to_vec()).unwrap()
            })
        };
        let plain = (StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded").into_response();
        let converted = runtime.block_on(json_errors(plain));
        assert_eq!(converted.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let value: Value = serde_json::from_str(&body_of(converted)).unwrap();
        assert_eq!(
            value,
            json!({"error": "length limit exceeded", "kind": "too_large"})
        );
        let empty = StatusCode::BAD_GATEWAY.into_response();
        let value: Value =
            serde_json::from_str(&body_of(runtime.block_on(json_errors(empty)))).unwrap();
        assert_eq!(value, json!({"error": "Bad Gateway", "kind": "failed"}));
        let ok = (StatusCode::OK, "fine").into_response();
        assert_eq!(body_of(runtime.block_on(json_errors(ok))), "fine");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }
}
