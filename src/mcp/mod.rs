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

mod args;
mod state;
mod stdio;
mod tools;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, ServiceExt, tool_handler};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::db::Blocking;
use crate::error::{McpError, Result};
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::sign::Keys;

/// The longest JSON-RPC message the server reads; a longer one is dropped unread and answered
/// with a parse error.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

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
    /// Where the repository's signing key comes from (the secret of `settings`, else
    /// `.app/secret`).
    keys: Keys,
    /// The instance this server acts for.
    me: InstanceId,
    settings: Settings,
    /// `--db`, when given; the database opens at the first tool that needs it.
    db_flag: Option<PathBuf>,
    /// The database with its own runtime: the client's futures are not `Send`, so the tools
    /// that use it run it on their blocking thread rather than on the protocol's runtime.
    db: Mutex<Option<Arc<Blocking>>>,
}

/// Serves MCP on stdin/stdout for instance `me` until the client closes the connection.
#[tracing::instrument(skip_all)]
pub fn serve(
    paths: AppPaths,
    me: InstanceId,
    settings: Settings,
    db_flag: Option<PathBuf>,
) -> Result<()> {
    let server = Server::new(paths, me, settings, db_flag);
    // Held here too, so the last drop of the database (and its runtime) happens outside any
    // runtime: after the protocol's runtime below is gone.
    let _state = Arc::clone(&server.state);
    let runtime = crate::db::runtime()?;
    let served = runtime.block_on(async {
        let (read, write) = rmcp::transport::stdio_pipes();
        let (transport, writer) = stdio::transport(read, write, MAX_REQUEST_BYTES);
        let served = async {
            let running = server
                .serve(transport)
                .await
                .map_err(|err| McpError::Initialize(err.to_string()))?;
            running
                .waiting()
                .await
                .map_err(|err| McpError::Stopped(err.to_string()))?;
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
            .unwrap_or_else(|err| Err(McpError::ToolFailed(err.to_string()).into()));
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
