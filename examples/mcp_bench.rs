//! Per-call latency of `app mcp` over stdio against the same operation through the CLI, for
//! `scripts/bench-mcp.sh`.
//!
//!   mcp_bench APP CALLS TO
//!
//! Run from inside an instance's worktree. Starts `APP mcp`, initializes it with raw JSON-RPC
//! lines (no client library in the measured path), then times CALLS calls each of
//! `list_instances` and `send_message` (to instance TO), one at a time: request written to the
//! answer read. The baseline times CALLS runs each of `APP instance list --json` and
//! `APP send --to TO TEXT` (a process per call, as an agent without MCP would do). Prints one
//! line per measure: `NAME MEDIAN_US P90_US`.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, app, calls, to] = args.as_slice() else {
        eprintln!("usage: mcp_bench APP CALLS TO");
        std::process::exit(2);
    };
    let calls: usize = calls.parse().expect("CALLS is a number");

    let mut server = Command::new(app)
        .arg("mcp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start app mcp");
    let mut session = Session {
        input: server.stdin.take().unwrap(),
        output: BufReader::new(server.stdout.take().unwrap()),
        next_id: 0,
    };
    session.request(
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "mcp_bench", "version": "0"}}),
    );
    session.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let start = Instant::now();
    session.tool("whoami", json!({}));
    eprintln!("mcp_bench: first call {:?}", start.elapsed());

    let mcp_list = time(calls, || session.tool("list_instances", json!({})));
    let mcp_send = time(calls, || {
        session.tool("send_message", json!({"to": to, "payload": "benchmark"}))
    });
    drop(session);
    let status = server.wait().expect("wait for app mcp");
    assert!(status.success(), "app mcp exited with {status}");

    let cli = |args: &[&str]| {
        let status = Command::new(app)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("run app");
        assert!(status.success(), "app {args:?} failed");
    };
    let cli_list = time(calls, || cli(&["instance", "list", "--json"]));
    let cli_send = time(calls, || cli(&["send", "--to", to, "benchmark"]));

    for (name, samples) in [
        ("mcp_list_instances", mcp_list),
        ("mcp_send_message", mcp_send),
        ("cli_instance_list", cli_list),
        ("cli_send", cli_send),
    ] {
        println!(
            "{name} {} {}",
            percentile(&samples, 50).as_micros(),
            percentile(&samples, 90).as_micros()
        );
    }
}

/// A connection to `app mcp` over its stdin and stdout, one request at a time.
struct Session {
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    next_id: u64,
}

impl Session {
    fn send(&mut self, message: Value) {
        writeln!(self.input, "{message}").expect("write to app mcp");
        self.input.flush().unwrap();
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        self.send(
            json!({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}),
        );
        let mut answer = String::new();
        self.output
            .read_line(&mut answer)
            .expect("read from app mcp");
        let answer: Value = serde_json::from_str(&answer).expect("a JSON-RPC answer");
        assert_eq!(
            answer["id"], self.next_id,
            "answers come in order: {answer}"
        );
        assert!(answer.get("error").is_none(), "{method} failed: {answer}");
        answer["result"].clone()
    }

    fn tool(&mut self, name: &str, arguments: Value) {
        let result = self.request("tools/call", json!({"name": name, "arguments": arguments}));
        assert_ne!(result["isError"], true, "{name} failed: {result}");
    }
}

/// The duration of each of `calls` runs of `body`, sorted.
fn time(calls: usize, mut body: impl FnMut()) -> Vec<Duration> {
    let mut samples: Vec<Duration> = (0..calls)
        .map(|_| {
            let start = Instant::now();
            body();
            start.elapsed()
        })
        .collect();
    samples.sort_unstable();
    samples
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}
