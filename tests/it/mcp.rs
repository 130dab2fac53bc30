//! `app mcp`: the real server as a child process over stdio, driven by `rmcp`'s client, and by
//! the independent Python `mcp` client (tests/mcp/client.py).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

use app::paths::AppPaths;

use crate::support::{self, TestRepo};

/// Every test here ends within this, whatever the server does.
const LIMIT: Duration = Duration::from_secs(90);

type Client = RunningService<RoleClient, ()>;

/// `app mcp` started in `dir`, with the repository's isolated environment, connected.
async fn connect(repo: &TestRepo, dir: &Path, args: &[&str]) -> Client {
    connect_with(repo, dir, args, &[]).await
}

/// [`connect`] with `env` set too.
async fn connect_with(repo: &TestRepo, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Client {
    let mut command = repo.app(&["mcp"]);
    command
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env_remove("APP_INSTANCE_ID");
    let transport = TokioChildProcess::builder(tokio::process::Command::from(command))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn app mcp")
        .0;
    ().serve(transport).await.expect("initialize app mcp")
}

async fn call(client: &Client, tool: &str, arguments: Value) -> CallToolResult {
    let Value::Object(arguments) = arguments else {
        panic!("arguments must be an object")
    };
    client
        .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(arguments))
        .await
        .unwrap_or_else(|err| panic!("{tool}: protocol error {err}"))
}

/// The structured result of a call that must succeed.
async fn ok(client: &Client, tool: &str, arguments: Value) -> Value {
    let result = call(client, tool, arguments.clone()).await;
    assert_ne!(
        result.is_error,
        Some(true),
        "{tool} {arguments} failed: {:?}",
        result.content
    );
    result.structured_content.expect("structured content")
}

/// The error text of a call that must fail as a tool error.
async fn refused(client: &Client, tool: &str, arguments: Value) -> String {
    let result = call(client, tool, arguments.clone()).await;
    assert_eq!(
        result.is_error,
        Some(true),
        "{tool} {arguments} should fail: {result:?}"
    );
    result.content[0]
        .as_text()
        .map(|text| text.text.clone())
        .expect("an error text")
}

/// Two instances in their own worktrees, each running `sleep`.
fn two_instances(repo: &TestRepo) -> Vec<(support::Running, app::registry::InstanceRecord)> {
    ["alice", "bob"]
        .into_iter()
        .map(|name| {
            let running = repo.spawn_app(&["run", "--instance", name, "--", "sleep", "300"]);
            let record = repo.wait_running(running.pid());
            (running, record)
        })
        .collect()
}

#[tokio::test]
async fn two_agents_coordinate_through_the_tools() {
    tokio::time::timeout(LIMIT, async {
        let repo = TestRepo::new();
        let instances = two_instances(&repo);
        let (a_dir, b_dir) = (
            instances[0].1.worktree.clone().unwrap(),
            instances[1].1.worktree.clone().unwrap(),
        );
        let a = connect(&repo, &a_dir.join("src"), &[]).await;
        let b = connect(&repo, &b_dir, &[]).await;

        let tools = a.list_all_tools().await.unwrap();
        let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "ack_message",
                "acquire_lock",
                "check_paths",
                "list_instances",
                "list_locks",
                "list_reservations",
                "recall",
                "receive_messages",
                "release_lock",
                "release_paths",
                "remember",
                "reserve_paths",
                "run_status",
                "send_message",
                "status",
                "whoami"
            ]
        );

        // Each server acts for the instance whose worktree it was started in.
        let me = ok(&a, "whoami", json!({})).await;
        assert_eq!(me["id"], "alice");
        assert_eq!(me["branch"], "app/alice");
        assert_eq!(ok(&b, "whoami", json!({})).await["id"], "bob");
        let listed = ok(&a, "list_instances", json!({})).await;
        let listed = listed["instances"].as_array().unwrap();
        assert_eq!(listed.len(), 2);
        for instance in listed {
            assert_eq!(instance["me"], instance["id"] == "alice", "{instance}");
        }

        // A message from alice reaches bob, stays until acknowledged, then is gone.
        let sent = ok(
            &a,
            "send_message",
            json!({"to": "bob", "type": "question", "payload": {"hello": "from alice"}}),
        )
        .await;
        assert_eq!(sent["recipients"], json!(["bob"]));
        let got = ok(&b, "receive_messages", json!({"wait_seconds": 5})).await;
        let messages = got["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 1, "{got}");
        assert_eq!(messages[0]["from"], "alice");
        assert_eq!(messages[0]["type"], "question");
        assert_eq!(messages[0]["payload"], json!({"hello": "from alice"}));
        assert_eq!(messages[0]["id"], sent["id"]);
        let again = ok(&b, "receive_messages", json!({})).await;
        assert_eq!(again["messages"].as_array().unwrap().len(), 1);
        // An id that is not bob's fails the whole call: nothing is acknowledged.
        let stranger = "0".repeat(20);
        let error = refused(&b, "ack_message", json!({"ids": [sent["id"], stranger]})).await;
        assert!(error.contains("none was acknowledged"), "{error}");
        let still = ok(&b, "receive_messages", json!({})).await;
        assert_eq!(still["messages"].as_array().unwrap().len(), 1);
        let acked = ok(&b, "ack_message", json!({"ids": [sent["id"]]})).await;
        assert_eq!(acked["acknowledged"], json!([sent["id"]]));
        let empty = ok(&b, "receive_messages", json!({})).await;
        assert_eq!(empty["messages"], json!([]));

        // A waiting receive returns as soon as a message arrives.
        let waiting = b.call_tool(
            CallToolRequestParams::new("receive_messages").with_arguments(
                json!({"wait_seconds": 30, "ack": true})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        );
        let send_later = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            ok(&a, "send_message", json!({"to": "all", "payload": "done"})).await
        };
        let (waited, sent) = tokio::join!(waiting, send_later);
        let waited = waited.unwrap().structured_content.unwrap();
        assert_eq!(waited["messages"][0]["id"], sent["id"], "{waited}");
        assert_eq!(waited["messages"][0]["payload"], "done");
        assert_eq!(
            ok(&b, "receive_messages", json!({})).await["messages"],
            json!([])
        );

        // Locks: the loser is told who holds it; after the release it wins.
        let token = ok(&a, "acquire_lock", json!({"name": "schema"})).await["token"].clone();
        let error = refused(&b, "acquire_lock", json!({"name": "schema"})).await;
        assert!(
            error.contains("\"schema\" is held by instance alice"),
            "{error}"
        );
        let locks = ok(&b, "list_locks", json!({})).await;
        assert_eq!(locks["locks"][0]["holder"]["instance"], "alice");
        let error = refused(&b, "release_lock", json!({"name": "schema"})).await;
        assert!(error.contains("not by you"), "{error}");
        assert_eq!(
            ok(&a, "release_lock", json!({"name": "schema"})).await["released"],
            true
        );
        let next = ok(&b, "acquire_lock", json!({"name": "schema"})).await["token"].clone();
        assert!(next.as_u64() > token.as_u64());

        // Reservations: bob sees alice's and cannot take an overlapping one.
        ok(
            &a,
            "reserve_paths",
            json!({"patterns": ["src/**"], "reason": "refactor"}),
        )
        .await;
        let all = ok(&b, "list_reservations", json!({})).await;
        assert_eq!(all["reservations"][0]["holder"]["instance"], "alice");
        assert_eq!(all["reservations"][0]["reason"], "refactor");
        let check = ok(
            &b,
            "check_paths",
            json!({"paths": ["src/lib.txt", "README.md"]}),
        )
        .await;
        assert_eq!(check["ok"], false);
        assert_eq!(check["conflicts"].as_array().unwrap().len(), 1);
        assert_eq!(check["conflicts"][0]["path"], "src/lib.txt");
        assert_eq!(check["conflicts"][0]["holder"], "alice");
        // Paths are the repository's, whatever directory the server started in.
        let own = ok(&a, "check_paths", json!({"paths": ["src/lib.txt"]})).await;
        assert_eq!(own["ok"], true);
        let error = refused(&b, "reserve_paths", json!({"patterns": ["src/lib.txt"]})).await;
        assert!(error.contains("reserved by instance alice"), "{error}");
        assert_eq!(ok(&a, "release_paths", json!({})).await["released"], 1);
        assert_eq!(
            ok(&b, "check_paths", json!({"paths": ["src/lib.txt"]})).await["ok"],
            true
        );

        // Notes, through the shared database.
        let note = ok(
            &a,
            "remember",
            json!({"namespace": "test:mcp", "content": "the schema lives in db/"}),
        )
        .await;
        assert_eq!(note["note"]["author"], "alice");
        let found = ok(
            &b,
            "recall",
            json!({"namespace": "test:mcp", "query": "schema"}),
        )
        .await;
        assert_eq!(found["notes"][0]["content"], "the schema lives in db/");
        assert_eq!(ok(&a, "run_status", json!({})).await["run"], Value::Null);

        a.cancel().await.unwrap();
        b.cancel().await.unwrap();
    })
    .await
    .expect("the test ran too long");
}

#[tokio::test]
async fn bad_arguments_are_tool_errors_and_the_server_goes_on() {
    tokio::time::timeout(LIMIT, async {
        let repo = TestRepo::new();
        let instances = two_instances(&repo);
        let a = connect(&repo, instances[0].1.worktree.as_ref().unwrap(), &[]).await;

        let missing = refused(&a, "send_message", json!({"payload": "no recipient"})).await;
        assert!(missing.contains("missing field `to`"), "{missing}");
        let unknown = refused(&a, "whoami", json!({"verbose": true})).await;
        assert!(unknown.contains("unknown field `verbose`"), "{unknown}");
        let extra = refused(&a, "acquire_lock", json!({"name": "x", "timeout": 5})).await;
        assert!(extra.contains("unknown field `timeout`"), "{extra}");
        let nobody = refused(&a, "send_message", json!({"to": "carol", "payload": "hi"})).await;
        assert!(
            nobody.contains("no instance carol is registered"),
            "{nobody}"
        );
        let big = refused(
            &a,
            "send_message",
            json!({"to": "bob", "payload": "x".repeat(5000)}),
        )
        .await;
        assert!(big.contains("APP_MAX_MESSAGE_BYTES"), "{big}");
        let name = refused(&a, "acquire_lock", json!({"name": "../etc"})).await;
        assert!(name.contains("lock name"), "{name}");
        let wait = refused(&a, "receive_messages", json!({"wait_seconds": 10_000})).await;
        assert!(wait.contains("wait_seconds"), "{wait}");
        let outside = refused(&a, "check_paths", json!({"paths": ["/etc/passwd"]})).await;
        assert!(outside.contains("outside the worktree"), "{outside}");
        let many = refused(&a, "reserve_paths", json!({"patterns": vec!["a"; 1000]})).await;
        assert!(many.contains("at most"), "{many}");
        // Nothing of that was written.
        let inbox = AppPaths::discover(repo.root()).unwrap().inbox("bob");
        let filed = std::fs::read_dir(&inbox).map_or(0, |dir| {
            dir.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "json")
            })
            .count()
        });
        assert_eq!(
            filed,
            0,
            "a refused message was filed in {}",
            inbox.display()
        );
        assert_eq!(
            ok(&a, "list_reservations", json!({})).await["reservations"],
            json!([])
        );

        // A request longer than the limit is dropped unread (its id is never answered, only a
        // parse error with id null); the next one is answered.
        let huge = json!({"namespace": "n", "content": "y".repeat(app::mcp::MAX_REQUEST_BYTES)});
        let dropped =
            tokio::time::timeout(Duration::from_secs(2), call(&a, "remember", huge)).await;
        assert!(dropped.is_err(), "an oversized request got an answer");
        assert_eq!(ok(&a, "whoami", json!({})).await["id"], "alice");
        a.cancel().await.unwrap();
    })
    .await
    .expect("the test ran too long");
}

#[tokio::test]
async fn outside_an_instance_it_registers_itself_until_the_client_leaves() {
    tokio::time::timeout(LIMIT, async {
        let repo = TestRepo::new();
        let solo = connect(&repo, repo.root(), &["--name", "solo"]).await;
        let me = ok(&solo, "whoami", json!({})).await;
        assert_eq!(me["id"], "solo");
        assert_eq!(me["worktree"], Value::Null);
        assert_eq!(me["liveness"], "live");
        // The others can reach it.
        let instances = two_instances(&repo);
        let other = connect(&repo, instances[0].1.worktree.as_ref().unwrap(), &[]).await;
        ok(
            &other,
            "send_message",
            json!({"to": "solo", "payload": "hi"}),
        )
        .await;
        let got = ok(&solo, "receive_messages", json!({"wait_seconds": 5})).await;
        assert_eq!(got["messages"][0]["from"], "alice");
        assert!(repo.instances().iter().any(|r| r.id == "solo"));

        solo.cancel().await.unwrap();
        support::wait_for("solo to unregister", Duration::from_secs(15), || {
            !repo.instances().iter().any(|r| r.id == "solo")
        });
        other.cancel().await.unwrap();
    })
    .await
    .expect("the test ran too long");
}

#[tokio::test]
async fn run_status_names_the_task_and_its_dependencies_branches() {
    tokio::time::timeout(LIMIT, async {
        let repo = TestRepo::new();
        let go = repo.scratch().join("go");
        let plan = repo.scratch().join("plan.json");
        std::fs::write(
            &plan,
            json!({
                "name": "mcp",
                "integration": "off",
                "tasks": [
                    {"id": "first", "command": "echo one > one.txt && git add one.txt && git commit -qm one"},
                    {"id": "second", "depends_on": ["first"],
                     "command": format!("while [ ! -e {} ]; do sleep 0.05; done", go.display())}
                ]
            })
            .to_string(),
        )
        .unwrap();
        let mut orchestrator = repo.app(&["orchestrate", "--plan", plan.to_str().unwrap(), "--progress", "none"]);
        orchestrator.stdin(Stdio::null());
        let orchestrator = repo.spawn(orchestrator);
        let mut second = None;
        support::wait_for("the second task to run", Duration::from_secs(30), || {
            second = repo
                .instances()
                .into_iter()
                .find(|r| r.id.contains("-second-") && r.child_pid.is_some());
            second.is_some()
        });
        let worktree = second.unwrap().worktree.unwrap();
        let agent = connect(&repo, &worktree, &[]).await;
        let status = ok(&agent, "run_status", json!({})).await;
        assert_eq!(status["run"]["name"], "mcp", "{status}");
        assert_eq!(status["run"]["status"], "running");
        assert_eq!(status["task"]["task_id"], "second");
        assert_eq!(status["task"]["status"], "running");
        assert_eq!(
            status["dependencies"],
            json!([{"task_id": "first", "status": "succeeded", "branch": format!("app/{}/first", status["run"]["id"].as_str().unwrap())}])
        );
        agent.cancel().await.unwrap();
        std::fs::write(&go, "").unwrap();
        let output = orchestrator.wait(Duration::from_secs(30));
        assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    })
    .await
    .expect("the test ran too long");
}

#[test]
fn print_config_names_this_binary() {
    let repo = TestRepo::new();
    let output = repo.run_app(&["mcp", "--print-config"]);
    assert_eq!(support::code(&output), 0);
    let config: Value = serde_json::from_str(&support::stdout(&output)).unwrap();
    assert_eq!(config["mcpServers"]["app"]["command"], support::APP);
    assert_eq!(config["mcpServers"]["app"]["args"], json!(["mcp"]));
}

/// The independent client: the official Python SDK (installed by scripts/install-mcp-client.sh,
/// which CI runs first) drives every tool between two agents in two worktrees.
#[test]
fn the_python_sdk_client_runs_the_whole_scenario() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let install = support::provisioning("bash")
        .arg(root.join("scripts/install-mcp-client.sh"))
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/install-mcp-client.sh");
    assert!(
        install.status.success(),
        "scripts/install-mcp-client.sh failed (it needs PyPI): {}",
        support::stderr(&install)
    );
    let python = support::stdout(&install).trim().to_string();

    let repo = TestRepo::new();
    let instances = two_instances(&repo);
    let mut client = repo.command(&python);
    client
        .arg(root.join("tests/mcp/client.py"))
        .arg(support::APP)
        .arg(instances[0].1.worktree.as_ref().unwrap())
        .arg(instances[1].1.worktree.as_ref().unwrap())
        .env("MCP_CLIENT_TIMEOUT", "60");
    let output = repo.spawn(client).wait(LIMIT);
    assert_eq!(
        support::code(&output),
        0,
        "tests/mcp/client.py failed:\n{}\n{}",
        support::stdout(&output),
        support::stderr(&output)
    );
    assert!(
        support::stdout(&output).contains("ok: "),
        "{}",
        support::stdout(&output)
    );
}

/// `app mcp` as a plain child with piped stdin and stdout, for raw lines; its process group is
/// killed on drop.
struct RawServer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl RawServer {
    fn start(repo: &TestRepo) -> RawServer {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut command = repo.app(&["mcp", "--name", "raw"]);
        let mut child = command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn app mcp");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        RawServer {
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, line: &[u8]) {
        use std::io::Write;
        self.stdin.write_all(line).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next line the server writes, as JSON.
    fn reply(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .expect("an answer from app mcp");
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn garbage_and_oversized_lines_get_a_parse_error_and_serving_goes_on() {
    let repo = TestRepo::new();
    let mut server = RawServer::start(&repo);
    server.send(
        br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#,
    );
    assert_eq!(server.reply()["id"], 1);
    server.send(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);

    server.send(b"this is not json");
    let error = server.reply();
    assert_eq!(error["jsonrpc"], "2.0", "{error}");
    assert_eq!(error["id"], Value::Null, "{error}");
    assert_eq!(error["error"]["code"], -32700, "{error}");

    let mut huge = br#"{"jsonrpc":"2.0","id":2,"method":"ping","params":{"pad":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', app::mcp::MAX_REQUEST_BYTES));
    huge.extend(br#""}}"#);
    server.send(&huge);
    let error = server.reply();
    assert_eq!(error["id"], Value::Null, "{error}");
    assert_eq!(error["error"]["code"], -32700, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit"),
        "{error}"
    );

    // JSON that is no JSON-RPC message is an invalid request, with its id when it has one.
    server.send(br#"{"id": 7, "what": "no method"}"#);
    let error = server.reply();
    assert_eq!(error["error"]["code"], -32600, "{error}");

    server.send(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"whoami","arguments":{}}}"#);
    let answer = server.reply();
    assert_eq!(answer["id"], 3, "{answer}");
    assert_eq!(
        answer["result"]["structuredContent"]["id"], "raw",
        "{answer}"
    );
}

#[tokio::test]
async fn the_lock_and_reservation_tools_take_the_fleet_option() {
    tokio::time::timeout(LIMIT, async {
        let repo = TestRepo::new();
        let Some(sqld) = support::Sqld::start() else {
            return;
        };
        let server = [("APP_DB_URL", sqld.url()), ("APP_FLEET_HOST", "mcphost")];
        let mut run = repo.app(&["run", "--instance", "alice", "--", "sleep", "300"]);
        run.envs(server);
        let alice = repo.spawn(run);
        let record = repo.wait_running(alice.pid());
        let dir = record.worktree.unwrap();
        let client = connect_with(&repo, &dir, &[], &server).await;
        let token = ok(
            &client,
            "acquire_lock",
            json!({"name": "db-schema", "fleet": true}),
        )
        .await;
        assert_eq!(token["token"], 1);
        // The local store never saw it; the fleet's names this host.
        let local = ok(&client, "list_locks", json!({})).await;
        assert_eq!(local["locks"], json!([]));
        let fleet = ok(&client, "list_locks", json!({"fleet": true})).await;
        assert_eq!(fleet["locks"][0]["holder"]["instance"], "alice", "{fleet}");
        assert_eq!(fleet["locks"][0]["holder"]["host"], "mcphost", "{fleet}");
        let reserved = ok(
            &client,
            "reserve_paths",
            json!({"patterns": ["src/**"], "fleet": true}),
        )
        .await;
        let listed = ok(&client, "list_reservations", json!({"fleet": true})).await;
        assert_eq!(listed["reservations"][0]["id"], reserved["id"], "{listed}");
        // Another host's check sees it.
        let mut check = repo.app(&["check-paths", "src/lib.txt"]);
        check.envs([("APP_DB_URL", sqld.url()), ("APP_FLEET_HOST", "other")]);
        let out = check.output().unwrap();
        assert_eq!(support::code(&out), 1, "{}", support::stderr(&out));
        let released = ok(&client, "release_paths", json!({"fleet": true})).await;
        assert_eq!(released["released"], 1);
        let released = ok(
            &client,
            "release_lock",
            json!({"name": "db-schema", "fleet": true}),
        )
        .await;
        assert_eq!(released["released"], true);
        // Without a server the option is refused and nothing changes.
        let local = connect(&repo, &dir, &[]).await;
        let text = refused(&local, "acquire_lock", json!({"name": "x", "fleet": true})).await;
        assert!(text.contains("APP_DB_URL"), "{text}");
        drop(alice);
    })
    .await
    .expect("within the limit");
}

#[tokio::test]
async fn the_status_tool_reports_the_agents_state() {
    tokio::time::timeout(LIMIT, async {
        let repo = TestRepo::new();
        let instances = two_instances(&repo);
        let dir = instances[0].1.worktree.clone().unwrap();
        let a = connect(&repo, &dir, &[]).await;
        let said = ok(
            &a,
            "status",
            json!({"state": "needs-input", "message": "which schema?"}),
        )
        .await;
        assert_eq!(
            (&said["id"], &said["state"]),
            (&json!("alice"), &json!("needs-input"))
        );
        let error = refused(&a, "status", json!({"state": "sleepy"})).await;
        assert!(error.contains("working, idle, needs-input"), "{error}");
        let mut agent = Value::Null;
        support::wait_for("the supervisor to take the report", LIMIT, || {
            let listed = repo.run_app(&["instance", "list", "--json"]);
            let rows: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
            agent = rows
                .into_iter()
                .find(|row| row["id"] == "alice")
                .map(|row| row["agent"].clone())
                .unwrap_or_default();
            agent["state"] == "needs-input"
        });
        assert_eq!(agent["reason"], "said: which schema?");
        let listed = ok(&a, "list_instances", json!({})).await;
        let mine = listed["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["me"] == true)
            .unwrap()
            .clone();
        assert_eq!(mine["agent"]["state"], "needs-input", "{mine}");
        assert!(mine["progress"].is_object(), "{mine}");
    })
    .await
    .expect("within the time limit");
}
