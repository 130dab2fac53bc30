//! The tool table: each tool's name, description and hints, and the `State` call it makes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};

use super::args::*;
use super::{Server, State};
use crate::config::Settings;
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::sign::Keys;

#[tool_router]
impl Server {
    /// A server acting for instance `me` of the repository at `paths`.
    pub fn new(
        paths: AppPaths,
        me: InstanceId,
        settings: Settings,
        db_flag: Option<PathBuf>,
    ) -> Server {
        Server {
            state: Arc::new(State {
                keys: Keys::from_settings(&paths, &settings),
                paths,
                me,
                settings,
                db_flag,
                db: Mutex::new(None),
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
        description = "Take a named lock for your instance, e.g. around a migration or a lock-file update. Returns a fencing token that grows with every grant. Fails, naming the holder, when another instance holds it (after wait_seconds, default 0). The lock is released by release_lock, when its ttl runs out, or when your instance ends. With fleet true the lock is one across every host of the fleet (a server database)."
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
    async fn list_locks(&self, Parameters(args): Parameters<ListArgs>) -> CallToolResult {
        self.blocking(move |state| state.list_locks(&args)).await
    }

    #[tool(
        description = "Reserve the files you are about to edit (paths or globs relative to the repository root), so other agents see them as taken. Exclusive by default. Fails, naming the holder, when they overlap another instance's exclusive reservation (or any of theirs, for an exclusive one). With fleet true every host's agents see it (a server database)."
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
    async fn list_reservations(&self, Parameters(args): Parameters<ListArgs>) -> CallToolResult {
        self.blocking(move |state| state.list_reservations(&args))
            .await
    }

    #[tool(
        description = "Check files before editing them: 'ok' is false and 'conflicts' names the holder when another live instance reserved any of them exclusively (with a server database, on any host of the fleet too).",
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
        description = "Report your state for the dashboards (as 'app status' does): \"needs-input\" when you wait for your human (say why in message), \"working\" when you resume, \"idle\" when you are done for now. needs-input stays until you report again or work for a while. Returns what was recorded."
    )]
    async fn status(&self, Parameters(args): Parameters<StatusArgs>) -> CallToolResult {
        self.blocking(move |state| state.status(&args)).await
    }

    #[tool(
        description = "The orchestrated run (app orchestrate) your instance works for: the run's status, your task, and every task you depend on with its status and branch (their commits are merged into your starting point). 'run' is null outside a run.",
        annotations(read_only_hint = true)
    )]
    async fn run_status(&self, Parameters(NoArgs {}): Parameters<NoArgs>) -> CallToolResult {
        self.blocking(State::run_status).await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_tool_has_a_description_and_an_object_schema() {
        let router = Server::tool_router();
        let tools = router.list_all();
        assert_eq!(tools.len(), 16);
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
