//! `app mcp`: the coordination tools as a Model Context Protocol server over stdio (`rmcp`), so
//! an agent can see the other instances, message them, take locks, reserve files, keep notes
//! and read its run without a person relaying anything.
//!
//! The server acts for one instance, fixed at start (`cli::mcp` finds or registers it). Every
//! tool is a thin layer over the same library calls as the CLI; a failure comes back as a tool
//! error carrying the CLI's text, and the server keeps serving.
//!
//! The stdio transport is our own (`stdio`): a line that is not JSON, or is over
//! [`MAX_REQUEST_BYTES`], gets a JSON-RPC parse error instead of silence.

mod stdio;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::Timing;
use crate::db::{Db, notes, runs};
use crate::error::{Error, Result};
use crate::glob::Glob;
use crate::lock::{self, Holder, Locks, Released, Request};
use crate::paths::{self, AppPaths};
use crate::queue::{self, Inbox};
use crate::registry::{InstanceRecord, Liveness, Registry, Snapshot};
use crate::reserve::Reservations;
use crate::sign::SigningKey;
use crate::watch::{self, DirWatch};

/// The longest JSON-RPC message the server reads; a longer one is dropped unread and answered
/// with a parse error.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// The longest a call may wait (`wait_seconds`).
const MAX_WAIT_SECONDS: f64 = 600.0;
/// The longest `ttl_seconds` (30 days).
const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// The most patterns, paths or ids one call may carry.
const MAX_ITEMS: usize = 256;
/// The longest `reason` of a reservation.
const MAX_REASON_BYTES: usize = 1024;
/// The most messages one `receive_messages` returns.
const MAX_RECEIVE: usize = 100;

/// What the model reads first: what `app` is and how the tools fit together.
const INSTRUCTIONS: &str = "app coordinates several agents working on one git repository, each \
in its own worktree and branch (an 'instance'). You are the instance 'whoami' names. Before \
editing files another agent may touch, call check_paths, then reserve_paths; release them when \
done. Take a named lock (acquire_lock) around work only one agent may do at a time (migrations, \
lock files, releases) and release it after. Talk to the other instances with send_message and \
read yours with receive_messages, then ack_message what you handled. remember/recall keep notes \
that outlive you. In an orchestrated run, run_status tells your task and the branches of the \
tasks you depend on.";

/// The MCP server of one instance.
#[derive(Clone)]
pub struct Server {
    state: Arc<State>,
    tool_router: ToolRouter<Server>,
}

/// What every tool reads.
struct State {
    paths: AppPaths,
    /// The instance this server acts for.
    me: String,
    timing: Timing,
    /// `--db`, when given; the database opens at the first tool that needs it.
    db_flag: Option<PathBuf>,
    db: tokio::sync::OnceCell<Db>,
    /// The database client's own runtime: its futures are not `Send`, so the tools that use it
    /// run it on their blocking thread rather than on the protocol's runtime.
    db_runtime: Arc<tokio::runtime::Runtime>,
}

/// Serves MCP on stdin/stdout for instance `me` until the client closes the connection.
pub fn serve(paths: AppPaths, me: String, timing: Timing, db_flag: Option<PathBuf>) -> Result<()> {
    // Held here too, so the last drop of the database's runtime happens outside any runtime.
    let db_runtime = Arc::new(crate::db::runtime()?);
    let server = Server::new(paths, me, timing, db_flag, Arc::clone(&db_runtime));
    let runtime = crate::db::runtime()?;
    let served = runtime.block_on(async {
        let (read, write) = rmcp::transport::stdio_pipes();
        let (transport, writer) = stdio::transport(read, write, MAX_REQUEST_BYTES);
        let served = async {
            let running = server.serve(transport).await.map_err(|err| {
                Error::Failed(format!("MCP: the client's initialize failed: {err}"))
            })?;
            running
                .waiting()
                .await
                .map_err(|err| Error::Failed(format!("MCP: the server stopped: {err}")))?;
            Ok(())
        }
        .await;
        // The last answers are written before the process goes.
        let _ = tokio::time::timeout(Duration::from_secs(5), writer.finish()).await;
        served
    });
    // A tool still waiting (receive_messages, acquire_lock) must not hold up the exit.
    runtime.shutdown_background();
    served
}

/// The arguments of a tool that takes none: an empty object (or none at all).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// Arguments of `list_instances`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListInstancesArgs {
    /// Also list instances whose process is gone or whose heartbeat is stale (default false).
    #[serde(default)]
    pub include_stale: bool,
}

/// Arguments of `send_message`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendArgs {
    /// Recipient: an instance id as list_instances shows it, or "all" for every other live
    /// instance.
    pub to: String,
    /// The content: a string for plain text, or any JSON value. At most APP_MAX_MESSAGE_BYTES
    /// (default 1024) bytes as JSON.
    pub payload: Value,
    /// Message type: a lowercase word such as "text", "question", "handoff" (default "text").
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// How long the message may wait unacknowledged before it expires (default 3600).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// Arguments of `receive_messages`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiveArgs {
    /// Wait up to this many seconds (0-600) for a message when none is pending (default 0:
    /// return at once).
    #[serde(default)]
    pub wait_seconds: Option<f64>,
    /// Acknowledge the returned messages at once, so they are not returned again (default
    /// false: call ack_message after handling them).
    #[serde(default)]
    pub ack: bool,
    /// The most messages to return, oldest first (1-100, default 20).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Arguments of `ack_message`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AckArgs {
    /// Ids of messages receive_messages returned.
    pub ids: Vec<String>,
}

/// Arguments of `acquire_lock`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireArgs {
    /// Lock name: letters, digits, '_', '.', '-' (e.g. "db-schema", "Cargo.lock").
    pub name: String,
    /// Wait up to this many seconds (0-600) while another instance holds it (default 0: fail
    /// at once, naming the holder).
    #[serde(default)]
    pub wait_seconds: Option<f64>,
    /// Let the hold run out by itself after this many seconds (default: held until released
    /// or this instance ends).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// Arguments of `release_lock`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseLockArgs {
    /// Lock name, as acquired.
    pub name: String,
}

/// Arguments of `reserve_paths`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveArgs {
    /// Paths or globs relative to the repository root: "src/db/**", "Cargo.lock", "docs/".
    pub patterns: Vec<String>,
    /// Shared: other shared reservations may overlap it; exclusive ones may not (default
    /// false: exclusive).
    #[serde(default)]
    pub shared: bool,
    /// Let the reservation run out by itself after this many seconds (default: until
    /// released or this instance ends).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Why, for the other agents (at most 1024 bytes).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Arguments of `release_paths`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleasePathsArgs {
    /// The patterns to release, exactly as reserved (default: every reservation of this
    /// instance).
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// Arguments of `check_paths`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckPathsArgs {
    /// Files relative to the repository root (or absolute inside this instance's worktree).
    pub paths: Vec<String>,
}

/// Arguments of `remember`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RememberArgs {
    /// Namespace: letters, digits and '_ . : / @ -', e.g. "project:myapp" or "global".
    pub namespace: String,
    /// The note (at most 64 KiB).
    pub content: String,
}

/// Arguments of `recall`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecallArgs {
    /// Namespace to search.
    pub namespace: String,
    /// Words that must all occur in a note.
    pub query: String,
    /// The most notes to return, best first (default 10).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[tool_router]
impl Server {
    /// A server acting for instance `me` of the repository at `paths`.
    pub fn new(
        paths: AppPaths,
        me: String,
        timing: Timing,
        db_flag: Option<PathBuf>,
        db_runtime: Arc<tokio::runtime::Runtime>,
    ) -> Server {
        Server {
            state: Arc::new(State {
                paths,
                me,
                timing,
                db_flag,
                db: tokio::sync::OnceCell::new(),
                db_runtime,
            }),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Who you are: your instance id, branch, worktree, status and process. Call this first; run_status tells the orchestrated run you work for, if any.",
        annotations(read_only_hint = true)
    )]
    async fn whoami(&self, Parameters(NoArgs {}): Parameters<NoArgs>) -> CallToolResult {
        self.blocking(State::whoami).await
    }

    #[tool(
        description = "The instances (agents) working in this repository: id, branch, worktree, status, liveness, command. 'me' marks yours. Use the ids with send_message.",
        annotations(read_only_hint = true)
    )]
    async fn list_instances(
        &self,
        Parameters(args): Parameters<ListInstancesArgs>,
    ) -> CallToolResult {
        self.blocking(move |state| state.list_instances(&args))
            .await
    }

    #[tool(
        description = "Send a message to another instance (or \"all\" live ones). It waits in their inbox until they acknowledge it or its ttl runs out. Returns the message id and the recipients."
    )]
    async fn send_message(&self, Parameters(args): Parameters<SendArgs>) -> CallToolResult {
        self.blocking(move |state| state.send_message(args)).await
    }

    #[tool(
        description = "Your pending messages, oldest first, each with id, from, type, payload, sent_at and broadcast (sent to all). With wait_seconds, waits for one to arrive. Messages stay pending until acknowledged: call ack_message after handling them (or pass ack: true)."
    )]
    async fn receive_messages(&self, Parameters(args): Parameters<ReceiveArgs>) -> CallToolResult {
        self.blocking(move |state| state.receive_messages(&args))
            .await
    }

    #[tool(
        description = "Acknowledge messages you handled, by id; they are not returned again. Acknowledging twice is harmless; an id that is not one of your messages fails the call and acknowledges none."
    )]
    async fn ack_message(&self, Parameters(args): Parameters<AckArgs>) -> CallToolResult {
        self.blocking(move |state| state.ack_message(&args)).await
    }

    #[tool(
        description = "Take a named lock for your instance, e.g. around a migration or a lock-file update. Returns a fencing token that grows with every grant. Fails, naming the holder, when another instance holds it (after wait_seconds, default 0). The lock is released by release_lock, when its ttl runs out, or when your instance ends."
    )]
    async fn acquire_lock(&self, Parameters(args): Parameters<AcquireArgs>) -> CallToolResult {
        self.blocking(move |state| state.acquire_lock(&args)).await
    }

    #[tool(
        description = "Release a lock you hold. 'released' is false when nobody held it (or the hold had lapsed); a lock another instance holds is refused, naming the holder.",
        annotations(idempotent_hint = true)
    )]
    async fn release_lock(&self, Parameters(args): Parameters<ReleaseLockArgs>) -> CallToolResult {
        self.blocking(move |state| state.release_lock(&args)).await
    }

    #[tool(
        description = "Every named lock: holder, last fencing token, since when; 'lapsed' is null while the hold counts, else why it no longer does (holder gone, ttl out).",
        annotations(read_only_hint = true)
    )]
    async fn list_locks(&self, Parameters(NoArgs {}): Parameters<NoArgs>) -> CallToolResult {
        self.blocking(State::list_locks).await
    }

    #[tool(
        description = "Reserve the files you are about to edit (paths or globs relative to the repository root), so other agents see them as taken. Exclusive by default. Fails, naming the holder, when they overlap another instance's exclusive reservation (or any of theirs, for an exclusive one)."
    )]
    async fn reserve_paths(&self, Parameters(args): Parameters<ReserveArgs>) -> CallToolResult {
        self.blocking(move |state| state.reserve_paths(args)).await
    }

    #[tool(
        description = "Release your path reservations: the given patterns, or all of yours without patterns. Returns how many patterns were released.",
        annotations(idempotent_hint = true)
    )]
    async fn release_paths(
        &self,
        Parameters(args): Parameters<ReleasePathsArgs>,
    ) -> CallToolResult {
        self.blocking(move |state| state.release_paths(&args)).await
    }

    #[tool(
        description = "Every path reservation: id, patterns, shared or exclusive, holder, reason, since when; 'lapsed' is null while it counts, else why it no longer does.",
        annotations(read_only_hint = true)
    )]
    async fn list_reservations(&self, Parameters(NoArgs {}): Parameters<NoArgs>) -> CallToolResult {
        self.blocking(State::list_reservations).await
    }

    #[tool(
        description = "Check files before editing them: 'ok' is false and 'conflicts' names the holder when another live instance reserved any of them exclusively.",
        annotations(read_only_hint = true)
    )]
    async fn check_paths(&self, Parameters(args): Parameters<CheckPathsArgs>) -> CallToolResult {
        self.blocking(move |state| state.check_paths(&args)).await
    }

    #[tool(
        description = "Store a note in the shared database under a namespace (e.g. \"project:myapp\"), for other agents and later sessions: decisions, where things are, what failed."
    )]
    async fn remember(&self, Parameters(args): Parameters<RememberArgs>) -> CallToolResult {
        self.blocking(move |state| state.remember(&args)).await
    }

    #[tool(
        description = "Search the notes of a namespace for ones containing every word of the query, best first.",
        annotations(read_only_hint = true)
    )]
    async fn recall(&self, Parameters(args): Parameters<RecallArgs>) -> CallToolResult {
        self.blocking(move |state| state.recall(&args)).await
    }

    #[tool(
        description = "The orchestrated run (app orchestrate) your instance works for: the run's status, your task, and every task you depend on with its status and branch (their commits are merged into your starting point). 'run' is null outside a run.",
        annotations(read_only_hint = true)
    )]
    async fn run_status(&self, Parameters(NoArgs {}): Parameters<NoArgs>) -> CallToolResult {
        self.blocking(State::run_status).await
    }
}

impl Server {
    /// Runs a tool's work off the protocol's thread (it may wait); its JSON becomes structured
    /// content (and text), an error a tool error with the CLI's text.
    async fn blocking(
        &self,
        work: impl FnOnce(&State) -> Result<Value> + Send + 'static,
    ) -> CallToolResult {
        let state = Arc::clone(&self.state);
        let result = tokio::task::spawn_blocking(move || work(&state))
            .await
            .unwrap_or_else(|err| Err(Error::Failed(format!("the tool failed: {err}"))));
        match result {
            Ok(value) => CallToolResult::structured(value),
            Err(err) => CallToolResult::error(vec![ContentBlock::text(err.to_string())]),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("app", env!("CARGO_PKG_VERSION"))
                    .with_title("app: coordination of agents on one git repository"),
            )
            .with_instructions(INSTRUCTIONS)
    }
}

impl State {
    fn snapshot(&self) -> Result<Snapshot> {
        Registry::open_read_only(&self.paths)?.snapshot()
    }

    /// This server's instance as it is registered now.
    fn record(&self, snapshot: &Snapshot) -> Result<InstanceRecord> {
        snapshot
            .instance(&self.me)
            .cloned()
            .ok_or_else(|| Error::UnknownInstance {
                id: self.me.clone(),
            })
    }

    fn holder(&self) -> Result<Holder> {
        Ok(Holder::instance(&self.record(&self.snapshot()?)?))
    }

    /// Runs `body` with the database, opened at the first call.
    fn with_db<T>(&self, body: impl AsyncFnOnce(&Db) -> Result<T>) -> Result<T> {
        self.db_runtime.block_on(async {
            let db = self
                .db
                .get_or_try_init(|| Db::open_default(self.db_flag.as_deref()))
                .await?;
            body(db).await
        })
    }

    fn whoami(&self) -> Result<Value> {
        let record = self.record(&self.snapshot()?)?;
        let liveness = record.liveness(self.timing.stale_after);
        let mut value = record.to_json(&liveness);
        value["repo_root"] = json!(self.paths.repo_root());
        Ok(value)
    }

    fn list_instances(&self, args: &ListInstancesArgs) -> Result<Value> {
        let snapshot = self.snapshot()?;
        let instances: Vec<Value> = snapshot
            .valid_instances()
            .into_iter()
            .map(|record| (record, record.liveness(self.timing.stale_after)))
            .filter(|(_, liveness)| args.include_stale || *liveness == Liveness::Live)
            .map(|(record, liveness)| {
                let mut value = record.to_json(&liveness);
                value["me"] = json!(record.id == self.me);
                value
            })
            .collect();
        Ok(json!({ "instances": instances }))
    }

    fn send_message(&self, args: SendArgs) -> Result<Value> {
        let ttl = ttl(args.ttl_seconds)?.unwrap_or(queue::DEFAULT_TTL);
        let posted = queue::post(
            &self.paths,
            &self.snapshot()?,
            self.timing.stale_after,
            queue::Post {
                from: self.me.clone(),
                to: args.to,
                kind: args.kind.unwrap_or_else(|| "text".into()),
                ttl,
                payload: args.payload,
            },
        )?;
        Ok(json!({ "id": posted.id, "recipients": posted.recipients }))
    }

    fn receive_messages(&self, args: &ReceiveArgs) -> Result<Value> {
        let limit = args.limit.unwrap_or(20);
        if !(1..=MAX_RECEIVE).contains(&limit) {
            return Err(Error::bad_input(format!(
                "limit {limit} is out of range; give 1 to {MAX_RECEIVE}"
            )));
        }
        let deadline = Instant::now() + wait(args.wait_seconds)?;
        let key = SigningKey::load(&self.paths, false)?;
        let inbox = Inbox::new(&self.paths, &self.me, key, queue::max_message_bytes()?);
        let poll = watch::poll_interval()?;
        // Watch before the first scan, so nothing arriving in between is missed.
        let watch = if deadline > Instant::now() {
            Some(DirWatch::new(&inbox.dir(), poll, false)?)
        } else {
            None
        };
        let mut messages = loop {
            let (messages, _) = inbox.pending()?;
            let left = deadline.saturating_duration_since(Instant::now());
            match &watch {
                Some(watch) if messages.is_empty() && !left.is_zero() => watch.wait(left.min(poll)),
                _ => break messages,
            }
        };
        messages.truncate(limit);
        if args.ack {
            for message in &messages {
                inbox.ack(&message.id)?;
            }
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "from": m.from,
                    "broadcast": m.to.is_none(),
                    "type": m.kind,
                    "payload": m.payload,
                    "sent_at": m.timestamp,
                })
            })
            .collect();
        Ok(json!({ "messages": messages, "acknowledged": args.ack }))
    }

    fn ack_message(&self, args: &AckArgs) -> Result<Value> {
        check_count("ids", args.ids.len())?;
        for id in &args.ids {
            queue::validate_id(id)?;
        }
        let key = SigningKey::load(&self.paths, false)?;
        let inbox = Inbox::new(&self.paths, &self.me, key, queue::max_message_bytes()?);
        // All or nothing: every id must be one of this instance's messages.
        let unknown: Vec<&str> = args
            .ids
            .iter()
            .filter(|id| inbox.find(id).is_none())
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(Error::bad_input(format!(
                "no message {} waits for instance {} (none was acknowledged); receive_messages lists them",
                unknown.join(", "),
                self.me
            )));
        }
        let (mut acknowledged, mut before) = (Vec::new(), Vec::new());
        for id in &args.ids {
            if inbox.ack(id)? {
                acknowledged.push(id);
            } else {
                before.push(id);
            }
        }
        Ok(json!({ "acknowledged": acknowledged, "already_acknowledged": before }))
    }

    fn acquire_lock(&self, args: &AcquireArgs) -> Result<Value> {
        lock::validate_name(&args.name)?;
        let request = Request {
            name: args.name.clone(),
            holder: self.holder()?,
            ttl: ttl(args.ttl_seconds)?,
            timeout: wait(args.wait_seconds)?,
        };
        let token = Locks::open(&self.paths, self.timing.stale_after)?.acquire(&request)?;
        Ok(json!({ "name": args.name, "token": token }))
    }

    fn release_lock(&self, args: &ReleaseLockArgs) -> Result<Value> {
        lock::validate_name(&args.name)?;
        let locks = Locks::open(&self.paths, self.timing.stale_after)?;
        let released = locks.release(&args.name, &self.holder()?, false)?;
        Ok(json!({ "name": args.name, "released": released == Released::Released }))
    }

    fn list_locks(&self) -> Result<Value> {
        let locks = Locks::open(&self.paths, self.timing.stale_after)?;
        let values: Vec<Value> = locks
            .list()?
            .into_iter()
            .map(|(state, lapsed)| {
                let mut value = serde_json::to_value(&state).expect("lock states serialize");
                value["holder_text"] = json!(state.holder.as_ref().map(ToString::to_string));
                value["lapsed"] = json!(lapsed);
                value
            })
            .collect();
        Ok(json!({ "locks": values }))
    }

    fn reserve_paths(&self, args: ReserveArgs) -> Result<Value> {
        check_count("patterns", args.patterns.len())?;
        if args
            .reason
            .as_ref()
            .is_some_and(|r| r.len() > MAX_REASON_BYTES)
        {
            return Err(Error::bad_input(format!(
                "the reason is longer than {MAX_REASON_BYTES} bytes; shorten it"
            )));
        }
        let globs = args
            .patterns
            .iter()
            .map(|p| Glob::parse(p))
            .collect::<Result<Vec<_>>>()?;
        let ttl = ttl(args.ttl_seconds)?;
        let reservations = Reservations::open(&self.paths, self.timing.stale_after)?;
        let reservation =
            reservations.reserve(&self.holder()?, &globs, args.shared, ttl, args.reason)?;
        Ok(json!({
            "id": reservation.id,
            "patterns": reservation.patterns,
            "shared": reservation.shared,
        }))
    }

    fn release_paths(&self, args: &ReleasePathsArgs) -> Result<Value> {
        check_count("patterns", args.patterns.len())?;
        let reservations = Reservations::open(&self.paths, self.timing.stale_after)?;
        let released = reservations.release(&self.holder()?, &args.patterns)?;
        Ok(json!({ "released": released }))
    }

    fn list_reservations(&self) -> Result<Value> {
        let reservations = Reservations::open(&self.paths, self.timing.stale_after)?;
        let values: Vec<Value> = reservations
            .list()?
            .into_iter()
            .filter_map(Result::ok)
            .map(|(r, lapsed)| {
                let mut value = serde_json::to_value(&r).expect("reservations serialize");
                value["holder_text"] = json!(r.holder.to_string());
                value["lapsed"] = json!(lapsed);
                value
            })
            .collect();
        Ok(json!({ "reservations": values }))
    }

    fn check_paths(&self, args: &CheckPathsArgs) -> Result<Value> {
        check_count("paths", args.paths.len())?;
        let snapshot = self.snapshot()?;
        let record = self.record(&snapshot)?;
        let root = record
            .worktree
            .clone()
            .unwrap_or_else(|| self.paths.repo_root().to_path_buf());
        let relative = args
            .paths
            .iter()
            .map(|path| paths::relative_to(&root, &root, path))
            .collect::<Result<Vec<_>>>()?;
        let reservations = Reservations::open(&self.paths, self.timing.stale_after)?;
        let conflicts: Vec<Value> = reservations
            .conflicts(Some(&Holder::instance(&record)), &relative)?
            .into_iter()
            .map(|(path, r)| {
                json!({
                    "path": path,
                    "holder": r.holder.instance,
                    "holder_text": r.holder.to_string(),
                    "patterns": r.patterns,
                    "reason": r.reason,
                    "since": r.created_at,
                    "reservation": r.id,
                })
            })
            .collect();
        Ok(json!({ "ok": conflicts.is_empty(), "conflicts": conflicts }))
    }

    fn remember(&self, args: &RememberArgs) -> Result<Value> {
        notes::validate_namespace(&args.namespace)?;
        notes::validate_content(&args.content)?;
        let note = self.with_db(async |db| {
            notes::add(
                db,
                &args.namespace,
                &args.content,
                Some(&self.me),
                Some(self.paths.repo_root()),
            )
            .await
        })?;
        Ok(json!({ "note": note }))
    }

    fn recall(&self, args: &RecallArgs) -> Result<Value> {
        let limit = args.limit.unwrap_or(10);
        notes::validate_namespace(&args.namespace)?;
        notes::validate_limit(limit)?;
        notes::fts_query(&args.query)?;
        let found =
            self.with_db(async |db| notes::search(db, &args.namespace, &args.query, limit).await)?;
        Ok(json!({ "notes": found }))
    }

    fn run_status(&self) -> Result<Value> {
        self.with_db(async |db| self.run_status_in(db).await)
    }

    async fn run_status_in(&self, db: &Db) -> Result<Value> {
        let task = match (env_var("APP_RUN_ID"), env_var("APP_TASK_ID")) {
            (Some(run), Some(task)) => runs::tasks(db, &run)
                .await?
                .into_iter()
                .find(|row| row.task_id == task),
            _ => runs::task_of_instance(db, &self.me).await?,
        };
        let Some(task) = task else {
            return Ok(json!({
                "run": null,
                "note": format!("instance {} is not a task of an orchestrated run", self.me),
            }));
        };
        let run = runs::get(db, &task.run_id)
            .await?
            .ok_or_else(|| Error::Failed(format!("run {} is not in the database", task.run_id)))?;
        let tasks = runs::tasks(db, &run.id).await?;
        let depends_on = run.plan["tasks"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["id"] == task.task_id.as_str()))
            .and_then(|t| t["depends_on"].as_array())
            .cloned()
            .unwrap_or_default();
        let dependencies: Vec<Value> = depends_on
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|id| tasks.iter().find(|t| t.task_id == id))
            .map(|t| json!({ "task_id": t.task_id, "status": t.status, "branch": t.branch }))
            .collect();
        Ok(json!({
            "run": {
                "id": run.id,
                "name": run.name,
                "status": run.status,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "integration": run.plan.get("integration"),
            },
            "task": task,
            "dependencies": dependencies,
        }))
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// `wait_seconds` as a duration: 0 to [`MAX_WAIT_SECONDS`].
fn wait(seconds: Option<f64>) -> Result<Duration> {
    let seconds = seconds.unwrap_or(0.0);
    if !(0.0..=MAX_WAIT_SECONDS).contains(&seconds) {
        return Err(Error::bad_input(format!(
            "wait_seconds {seconds} is out of range; give 0 to {MAX_WAIT_SECONDS}"
        )));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `ttl_seconds` as a duration: 1 to [`MAX_TTL_SECONDS`].
fn ttl(seconds: Option<u64>) -> Result<Option<Duration>> {
    match seconds {
        None => Ok(None),
        Some(s) if (1..=MAX_TTL_SECONDS).contains(&s) => Ok(Some(Duration::from_secs(s))),
        Some(s) => Err(Error::bad_input(format!(
            "ttl_seconds {s} is out of range; give 1 to {MAX_TTL_SECONDS}"
        ))),
    }
}

fn check_count(what: &str, count: usize) -> Result<()> {
    if count > MAX_ITEMS {
        return Err(Error::bad_input(format!(
            "{count} {what} in one call; give at most {MAX_ITEMS}"
        )));
    }
    Ok(())
}

/// The snippet that adds `app mcp` to an MCP client's configuration, for the binary at `app`.
pub fn client_config(app: &Path) -> Value {
    json!({
        "mcpServers": {
            "app": {
                "command": app,
                "args": ["mcp"],
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_and_ttls_are_bounded() {
        assert_eq!(wait(None).unwrap(), Duration::ZERO);
        assert_eq!(wait(Some(1.5)).unwrap(), Duration::from_millis(1500));
        assert!(wait(Some(-1.0)).is_err());
        assert!(wait(Some(601.0)).is_err());
        assert!(wait(Some(f64::NAN)).is_err());
        assert_eq!(ttl(None).unwrap(), None);
        assert!(ttl(Some(0)).is_err());
        assert!(ttl(Some(MAX_TTL_SECONDS + 1)).is_err());
        assert!(check_count("paths", MAX_ITEMS).is_ok());
        assert!(check_count("paths", MAX_ITEMS + 1).is_err());
    }

    #[test]
    fn every_tool_has_a_description_and_an_object_schema() {
        let router = Server::tool_router();
        let tools = router.list_all();
        assert_eq!(tools.len(), 15);
        for tool in tools {
            assert!(
                tool.description.as_ref().is_some_and(|d| d.len() > 40),
                "{} has no useful description",
                tool.name
            );
            assert_eq!(tool.input_schema.get("type"), Some(&json!("object")));
        }
    }
}
