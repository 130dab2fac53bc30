//! The HTTP API of `app serve --with-api` and `app run --with-api`, driven with a real HTTP
//! client over TCP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::support::{Running, TestRepo, code, hermetic, kill, stderr, stdout, wait_for};

/// `n` consecutive ports that are free now, in 12000-19999: below both the kernel's ephemeral
/// range and the default range of `--ports` leases.
pub(crate) fn free_ports(n: u16) -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    for attempt in 0..500u64 {
        let base = 12000
            + ((seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(attempt * 7919))
                % 7900) as u16;
        if (base..base + n).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

/// `app` with the API's port range set to `base..base+len-1`.
fn with_range(repo: &TestRepo, args: &[&str], base: u16, len: u16) -> std::process::Command {
    let mut command = repo.app(args);
    command.env("APP_API_PORT_RANGE", format!("{base}-{}", base + len - 1));
    command
}

/// Waits until instance `id` is registered as running; returns its record's API URL.
fn wait_serving(repo: &TestRepo, run: &mut Running, id: &str) -> Option<String> {
    let mut url = None;
    wait_for(
        &format!("instance {id} to run"),
        Duration::from_secs(30),
        || {
            run.assert_running();
            match repo.instances().into_iter().find(|r| r.id == id) {
                Some(record) if record.status.to_string() == "running" => {
                    url = Some(record.api_url);
                    true
                }
                _ => false,
            }
        },
    );
    url.unwrap()
}

/// The client every request goes through: no proxy taken from the environment, error statuses
/// returned as responses (the tests assert them), and a new connection per request, closed after
/// its response, so no idle connection outlives a request into a server's shutdown.
/// `app run --no-worktree --instance ID -- COMMAND`, once it is registered.
/// `app serve --with-api --instance dash` on a free loopback port, once it serves, and its URL.
fn serve_dash(repo: &TestRepo) -> (Running, String) {
    let port = free_ports(1);
    let mut server = repo.spawn_app(&[
        "serve",
        "--with-api",
        "--api-addr",
        &format!("127.0.0.1:{port}"),
        "--instance",
        "dash",
    ]);
    let url = wait_serving(repo, &mut server, "dash").unwrap();
    (server, url)
}

fn start_in_place(repo: &TestRepo, id: &str, command: &[&str]) -> Running {
    let mut args = vec!["run", "--no-worktree", "--instance", id, "--"];
    args.extend_from_slice(command);
    let mut running = repo.spawn_app(&args);
    wait_serving(repo, &mut running, id);
    running
}

fn client(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .max_idle_connections(0)
        .max_idle_connections_per_host(0)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(timeout)
        .build()
        .into()
}

/// One HTTP/1.1 request; returns the status and the body. Content-Type is JSON unless the test
/// gives its own; Host is the URL's unless the test gives its own.
pub(crate) fn http(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let mut request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"));
    let given = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !given("Content-Type") {
        request = request.header("Content-Type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let agent = client(Some(Duration::from_secs(10)));
    let response = match body.unwrap_or("") {
        "" => agent.run(request.body(()).unwrap()),
        body => agent.run(request.body(body).unwrap()),
    }
    .unwrap_or_else(|err| panic!("{method} {url}{path}: {err}"));
    let status = response.status().as_u16();
    let body = response.into_body().read_to_string().unwrap();
    (status, body)
}

pub(crate) fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|err| panic!("not JSON ({err}): {body}"))
}

/// A server-sent-events subscription: a thread reads the stream and hands over its lines; the
/// channel disconnects when the server ends the stream.
struct Events {
    lines: mpsc::Receiver<String>,
}

impl Events {
    /// Subscribes to `url`/events and waits until the server counts the subscriber.
    fn subscribe(url: &str) -> Events {
        Events::subscribe_to(url, "/events", None, 1)
    }

    /// Subscribes to `url``path`, sending `Last-Event-ID: last` when given, and waits until
    /// the server counts `subscribers` streams.
    fn subscribe_to(url: &str, path: &str, last: Option<i64>, subscribers: usize) -> Events {
        let (sender, lines) = mpsc::channel();
        let events_url = format!("{url}{path}");
        std::thread::spawn(move || {
            let mut request = client(None).get(&events_url);
            if let Some(last) = last {
                request = request.header("Last-Event-ID", last.to_string());
            }
            let Ok(response) = request.call() else {
                return;
            };
            let stream = BufReader::new(response.into_body().into_reader());
            for line in stream.lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let events = Events { lines };
        wait_for(
            "the subscriber to be counted",
            Duration::from_secs(10),
            || {
                json_of(&http(url, "GET", "/health", &[], None).1)["subscribers"]
                    == json!(subscribers)
            },
        );
        events
    }

    /// Reads events until one of kind `kind` matches `want`; returns its data. Every event
    /// read on the way is appended to `seen`.
    fn until(
        &mut self,
        kind: &str,
        seen: &mut Vec<(String, Value)>,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut event = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("no {kind} event; saw {seen:?}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the stream ended before a {kind} event; saw {seen:?}")
                }
            };
            if let Some(name) = line.strip_prefix("event: ") {
                event = name.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let data = json_of(data);
                seen.push((event.clone(), data.clone()));
                if event == kind && want(&data) {
                    return data;
                }
            }
        }
    }

    /// Whether the server closes the stream within `timeout`.
    fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
                Err(mpsc::RecvTimeoutError::Disconnected) => return true,
            }
        }
    }
}

#[test]
fn two_serves_take_consecutive_ports_a_stream_sees_a_third_and_a_full_range_runs_without_api() {
    let repo = TestRepo::new();
    let base = free_ports(2);
    let mut first = repo.spawn(with_range(
        &repo,
        &["serve", "--with-api", "--instance", "one"],
        base,
        2,
    ));
    let url_one = wait_serving(&repo, &mut first, "one").expect("one has an API");
    let mut second = repo.spawn(with_range(
        &repo,
        &["serve", "--with-api", "--instance", "two"],
        base,
        2,
    ));
    let url_two = wait_serving(&repo, &mut second, "two").expect("two has an API");
    assert_eq!(url_one, format!("http://127.0.0.1:{base}"));
    assert_eq!(url_two, format!("http://127.0.0.1:{}", base + 1));

    for (url, id) in [(&url_one, "one"), (&url_two, "two")] {
        let (status, body) = http(url, "GET", "/health", &[], None);
        assert_eq!(status, 200);
        let health = json_of(&body);
        assert_eq!(health["status"], "ok");
        assert_eq!(health["instance_id"], id);
        assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    }

    let mut events = Events::subscribe(&url_one);
    // Every port is taken now: the third instance warns and runs without an API.
    let mut third = repo.spawn(with_range(
        &repo,
        &["serve", "--with-api", "--instance", "three"],
        base,
        2,
    ));
    assert_eq!(wait_serving(&repo, &mut third, "three"), None);
    let mut seen = Vec::new();
    let started = events.until("instance.started", &mut seen, |data| {
        data["instance"] == "three"
    });
    assert_eq!(started["kind"], "instance.started");
    assert!(started["id"].as_i64().is_some(), "{started}");

    let list = repo.run_app(&["instance", "list", "--long"]);
    let text = stdout(&list);
    assert!(text.lines().next().unwrap().contains("API"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("one ") && l.contains(&url_one)),
        "{text}"
    );
    let listed = json_of(&http(&url_two, "GET", "/instances", &[], None).1);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{listed}");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["liveness"] == "live")
    );

    let third_output = third.wait_after(Signal::SIGTERM, Duration::from_secs(30));
    assert!(
        stderr(&third_output).contains("every API port of"),
        "{}",
        stderr(&third_output)
    );
    drop(events);
}

#[test]
fn messages_post_through_the_queue_and_errors_are_json() {
    let repo = TestRepo::new();
    let base = free_ports(1);
    let mut server = repo.spawn(with_range(
        &repo,
        &["serve", "--with-api", "--instance", "hub"],
        base,
        1,
    ));
    let url = wait_serving(&repo, &mut server, "hub").unwrap();
    let mut events = Events::subscribe(&url);
    let agent = repo.spawn_app(&["run", "--instance", "agent", "--", "sleep", "300"]);
    repo.wait_running(agent.pid());

    let (status, body) = http(
        &url,
        "POST",
        "/messages",
        &[],
        Some(r#"{"to": "agent", "type": "review", "payload": {"pr": 7}}"#),
    );
    assert_eq!(status, 201, "{body}");
    let id = json_of(&body)["id"].as_str().unwrap().to_string();
    assert_eq!(json_of(&body)["recipients"], json!(["agent"]));
    let received = repo.run_app(&["recv", "--instance", "agent", "--json"]);
    assert_eq!(code(&received), 0, "{}", stderr(&received));
    let message = json_of(stdout(&received).lines().next().unwrap());
    assert_eq!(message["id"], id.as_str());
    assert_eq!(message["from"], "hub");
    assert_eq!(message["type"], "review");
    assert_eq!(message["payload"], json!({"pr": 7}));
    let mut seen = Vec::new();
    events.until("message.sent", &mut seen, |data| {
        data["payload"]["id"] == id.as_str()
    });

    for (method, path, body, want, kind) in [
        (
            "POST",
            "/messages",
            r#"{"to": "nobody", "payload": 1}"#,
            404,
            "not_found",
        ),
        (
            "POST",
            "/messages",
            r#"{"to": "agent", "type": "Bad Type", "payload": 1}"#,
            400,
            "bad_input",
        ),
        ("POST", "/messages", r#"{"to": "agent"#, 400, "bad_input"),
        (
            "POST",
            "/messages",
            r#"{"to": "agent", "payload": 1, "extra": 2}"#,
            400,
            "bad_input",
        ),
        ("GET", "/no-such-thing", "", 404, "not_found"),
        ("DELETE", "/health", "", 405, "method_not_allowed"),
    ] {
        let (status, response) = http(&url, method, path, &[], Some(body));
        assert_eq!(status, want, "{method} {path} {body}: {response}");
        let error = json_of(&response);
        assert_eq!(error["kind"], kind, "{response}");
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{response}"
        );
    }
    // Another page's form post (text/plain), and a name other than loopback in Host (DNS
    // rebinding), are refused.
    let (status, response) = http(
        &url,
        "POST",
        "/messages",
        &[("Content-Type", "text/plain")],
        Some(r#"{"to": "agent", "payload": 1}"#),
    );
    assert_eq!(status, 415, "{response}");
    let (status, response) = http(
        &url,
        "GET",
        "/instances",
        &[("Host", "evil.example:80")],
        None,
    );
    assert_eq!(status, 403, "{response}");
    assert_eq!(json_of(&response)["kind"], "forbidden");
    // Nothing but the one good message was filed, and no inbox was made for "nobody".
    let inboxes = repo.state_dir().join("coordination_queue/inbox");
    assert_eq!(
        std::fs::read_dir(inboxes.join("agent"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    assert!(!inboxes.join("nobody").exists());

    // A lock taken and released shows in the stream.
    let locked = repo.run_app(&["lock", "run", "deploy", "--", "true"]);
    assert_eq!(code(&locked), 0, "{}", stderr(&locked));
    events.until("lock.acquired", &mut seen, |data| {
        data["payload"]["name"] == "deploy"
    });
    events.until("lock.released", &mut seen, |data| {
        data["payload"]["name"] == "deploy"
    });
}

#[test]
fn a_token_guards_every_request_and_bad_addresses_change_nothing() {
    let repo = TestRepo::new();
    let port = free_ports(1);
    let address = format!("127.0.0.1:{port}");
    let mut command = repo.app(&[
        "serve",
        "--with-api",
        "--api-addr",
        &address,
        "--instance",
        "guarded",
    ]);
    command.env("APP_API_TOKEN", "s3cret");
    let mut server = repo.spawn(command);
    let url = wait_serving(&repo, &mut server, "guarded").unwrap();
    for (token, want) in [(None, 401), (Some("wrong"), 401), (Some("s3cret"), 200)] {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        let (status, body) = http(&url, "GET", "/health", &headers, None);
        assert_eq!(status, want, "{body}");
        if want == 401 {
            assert_eq!(json_of(&body)["kind"], "unauthorized");
        }
    }
    let (status, _) = http(&url, "GET", "/instances", &[], None);
    assert_eq!(status, 401);

    let before = repo.instances();
    // The address is taken by the server above: busy, and nothing registered.
    let taken = repo.run_app(&[
        "serve",
        "--with-api",
        "--api-addr",
        &address,
        "--instance",
        "late",
    ]);
    assert_eq!(code(&taken), 3, "{}", stderr(&taken));
    assert!(stderr(&taken).contains("is taken"), "{}", stderr(&taken));
    // Off loopback without a token: bad input.
    let open = repo.run_app(&[
        "serve",
        "--with-api",
        "--api-addr",
        "0.0.0.0:1",
        "--instance",
        "open",
    ]);
    assert_eq!(code(&open), 2, "{}", stderr(&open));
    assert!(stderr(&open).contains("APP_API_TOKEN"), "{}", stderr(&open));
    let garbled = repo.run_app(&["run", "--with-api", "--api-addr", "localhost", "--", "true"]);
    assert_eq!(code(&garbled), 2, "{}", stderr(&garbled));
    let huge = repo.run_app(&["serve", "--with-api", "--api-capacity", "100000000"]);
    assert_eq!(code(&huge), 2, "{}", stderr(&huge));
    assert_eq!(repo.instances(), before);
    assert!(!repo.state_dir().join("run/late.sock").exists());
}

#[test]
fn run_with_api_gives_the_command_its_url() {
    let repo = TestRepo::new();
    let base = free_ports(1);
    let file = repo.scratch().join("url");
    let script = format!("echo \"$APP_API_URL\" > {}; exec sleep 300", file.display());
    let mut run = repo.spawn(with_range(
        &repo,
        &[
            "run",
            "--with-api",
            "--instance",
            "worker",
            "--",
            "sh",
            "-c",
            &script,
        ],
        base,
        1,
    ));
    let record = repo.wait_running(run.pid());
    wait_for(
        "the command to write its URL",
        Duration::from_secs(30),
        || {
            run.assert_running();
            std::fs::read_to_string(&file).is_ok_and(|s| s.ends_with('\n'))
        },
    );
    let url = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(Some(url.clone()), record.api_url);
    let health = json_of(&http(&url, "GET", "/health", &[], None).1);
    assert_eq!(health["instance_id"], "worker");
    let output = run.wait_after(Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(code(&output), 143, "{}", stderr(&output));
}

#[test]
fn stopping_serve_sends_a_final_event_and_ends_exec_commands_after_the_timeout_or_a_second_signal()
{
    let repo = TestRepo::new();
    let base = free_ports(1);
    for (timeout, signals) in [("1s", 1), ("60s", 2)] {
        let id = format!("daemon{signals}");
        let mut server = repo.spawn(with_range(
            &repo,
            &[
                "serve",
                "--with-api",
                "--instance",
                &id,
                "--stop-timeout",
                timeout,
            ],
            base,
            1,
        ));
        let url = wait_serving(&repo, &mut server, &id).unwrap();
        let mut events = Events::subscribe(&url);
        // A pipeline that ignores SIGTERM, started through the control socket: its whole
        // process group has to go.
        let marker = repo.scratch().join(format!("started-{signals}"));
        let script = format!(
            "trap '' TERM; touch {}; sleep 300 | sleep 301",
            marker.display()
        );
        let exec = repo.spawn(repo.app(&["instance", "exec", &id, "--", "sh", "-c", &script]));
        wait_for(
            "the exec'd command to start",
            Duration::from_secs(30),
            || marker.exists(),
        );
        let mut seen = Vec::new();
        events.until("instance.exec", &mut seen, |data| {
            data["instance"] == id.as_str()
        });

        kill(server.pid(), Signal::SIGTERM);
        let last = events.until("instance.stopping", &mut seen, |_| true);
        assert_eq!(last["instance"], id.as_str());
        assert!(
            events.ends_within(Duration::from_secs(10)),
            "the stream stayed open"
        );
        if signals == 2 {
            // The stop timeout is a minute: the command is still being waited for.
            std::thread::sleep(Duration::from_millis(500));
            server.assert_running();
            kill(server.pid(), Signal::SIGTERM);
        }
        let output = server.wait(Duration::from_secs(30));
        assert_eq!(code(&output), 0, "{}", stderr(&output));
        // The exec'd shell was killed (its client reports 128+9), and its pipeline with it.
        let exec_output = exec.wait(Duration::from_secs(30));
        assert_eq!(code(&exec_output), 137, "{}", stderr(&exec_output));
        assert!(repo.instances().is_empty(), "{:?}", repo.instances());
        assert!(!repo.state_dir().join(format!("run/{id}.sock")).exists());
    }
    let leftovers = hermetic("pgrep").args(["-f", "sleep 30[01]"]).output();
    if let Ok(output) = leftovers {
        let ours: Vec<String> = stdout(&output)
            .lines()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.contains(&repo.root().display().to_string()))
            })
            .map(str::to_string)
            .collect();
        assert!(
            ours.is_empty(),
            "pipeline processes outlived the instance: {ours:?}"
        );
    }
}

#[test]
fn a_stop_request_kills_a_command_that_outlives_the_stop_timeout_or_a_second_request() {
    let repo = TestRepo::new();
    for (timeout, signals) in [("1s", 1), ("60s", 2)] {
        // The marker says SIGTERM is ignored now; a signal before that would end `sh` itself.
        let marker = repo.scratch().join(format!("ready-{signals}"));
        let script = format!("trap '' TERM; touch {}; exec sleep 300", marker.display());
        let run = repo.spawn_app(&["run", "--stop-timeout", timeout, "--", "sh", "-c", &script]);
        let record = repo.wait_running(run.pid());
        wait_for(
            "the command to ignore SIGTERM",
            Duration::from_secs(30),
            || marker.exists(),
        );
        for _ in 0..signals {
            kill(record.pid, Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(200));
        }
        let output = run.wait(Duration::from_secs(30));
        assert_eq!(
            code(&output),
            137,
            "--stop-timeout {timeout}: {}",
            stderr(&output)
        );
    }
    assert!(repo.instances().is_empty());
}

/// Sends `head` (request line and headers, through the blank line) and then `body` from another
/// thread, ignoring write errors: the server may answer and close before it has read it all.
/// Returns the status and the response body.
fn raw_request(url: &str, head: &str, body: Vec<u8>) -> (u16, String) {
    let address = url.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        for chunk in body.chunks(64 * 1024) {
            if writer.write_all(chunk).is_err() {
                break;
            }
        }
    });
    let mut response = Vec::new();
    let mut buffer = [0u8; 8192];
    // Until the server closes (or resets) the connection.
    while let Ok(n) = stream.read(&mut buffer) {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..n]);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    sending.join().unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    assert!(response.len() > 12, "no response: {response:?}");
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn an_oversized_or_broken_body_gets_the_json_error_shape() {
    let repo = TestRepo::new();
    let mut server = repo.spawn(repo.app(&[
        "serve",
        "--with-api",
        "--api-addr",
        "127.0.0.1:0",
        "--instance",
        "hub",
    ]));
    let url = wait_serving(&repo, &mut server, "hub").unwrap();
    let address = url.strip_prefix("http://").unwrap();

    // Over the 2 MiB limit: 413, as JSON.
    let body = vec![b' '; 3 * 1024 * 1024];
    let head = format!(
        "POST /messages HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (status, response) = raw_request(&url, &head, body);
    assert_eq!(status, 413, "{response}");
    let error = json_of(&response);
    assert_eq!(error["kind"], "too_large", "{response}");
    assert!(
        error["error"].as_str().unwrap().contains("2097152 bytes"),
        "{response}"
    );

    // A chunked body that breaks off: 400, as JSON.
    let head = format!(
        "POST /messages HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    );
    let (status, response) = raw_request(&url, &head, Vec::new());
    assert_eq!(status, 400, "{response}");
    assert_eq!(json_of(&response)["kind"], "bad_input", "{response}");

    // The server is still there.
    let (status, response) = http(&url, "GET", "/health", &[], None);
    assert_eq!(status, 200, "{response}");
}

#[test]
fn overview_shows_instances_runs_locks_reservations_and_messages_behind_the_token() {
    let repo = TestRepo::new();
    // A run first: a fails nothing, b fails after a, c runs after a.
    let plan = repo.scratch().join("graph.json");
    std::fs::write(
        &plan,
        json!({"name": "graph", "tasks": [
            {"id": "a", "command": "true"},
            {"id": "b", "command": "false", "depends_on": ["a"]},
            {"id": "c", "command": "true", "depends_on": ["a"]},
        ]})
        .to_string(),
    )
    .unwrap();
    let run = repo.run_app(&["orchestrate", "--plan", plan.to_str().unwrap(), "--json"]);
    assert_eq!(code(&run), 1, "{}", stderr(&run));
    let run_id = json_of(&stdout(&run))["run"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let port = free_ports(1);
    let mut command = repo.app(&[
        "serve",
        "--with-api",
        "--api-addr",
        &format!("127.0.0.1:{port}"),
        "--instance",
        "dash",
    ]);
    command.env("APP_API_TOKEN", "t0ken");
    let mut server = repo.spawn(command);
    let url = wait_serving(&repo, &mut server, "dash").unwrap();
    let worker = start_in_place(&repo, "w1", &["sleep", "300"]);
    // An instance whose supervisor died: stale. Its orphaned command is ended at the end.
    let doomed = start_in_place(&repo, "gone", &["sleep", "300"]);
    let orphan = repo
        .instances()
        .into_iter()
        .find(|r| r.id == "gone")
        .and_then(|r| r.child_pid)
        .unwrap();
    doomed.kill_now();

    let as_w1 = |args: &[&str]| {
        repo.app(args)
            .env("APP_INSTANCE_ID", "w1")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let lock = as_w1(&["lock", "acquire", "gpu"]);
    assert_eq!(code(&lock), 0, "{}", stderr(&lock));
    let token: u64 = stdout(&lock).trim().parse().unwrap();
    let reserve = as_w1(&["reserve", "src/**", "--reason", "refactor"]);
    assert_eq!(code(&reserve), 0, "{}", stderr(&reserve));
    let send = repo.run_app(&["send", "--from", "dash", "--to", "w1", "hello"]);
    assert_eq!(code(&send), 0, "{}", stderr(&send));

    for headers in [vec![], vec![("Authorization", "Bearer wrong")]] {
        let (status, body) = http(&url, "GET", "/overview", &headers, None);
        assert_eq!(status, 401, "{body}");
        assert_eq!(json_of(&body)["kind"], "unauthorized");
    }
    let auth = [("Authorization", "Bearer t0ken")];
    let (status, body) = http(&url, "GET", "/overview", &auth, None);
    assert_eq!(status, 200, "{body}");
    let overview = json_of(&body);
    // It is the contract's type, whole.
    let typed: app::overview::Overview = serde_json::from_value(overview.clone()).unwrap();
    assert_eq!(typed.repo_root, repo.root().display().to_string());

    let liveness = |id: &str| {
        overview["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .map(|i| i["liveness"].clone())
    };
    assert_eq!(liveness("dash"), Some(json!("live")), "{overview:#}");
    assert_eq!(liveness("w1"), Some(json!("live")), "{overview:#}");
    assert_eq!(liveness("gone"), Some(json!("stale")), "{overview:#}");

    let run = &overview["runs"][0];
    assert_eq!(run["id"], run_id.as_str());
    assert_eq!(run["status"], "failed");
    let tasks: Vec<(String, Value, String)> = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                t["depends_on"].clone(),
                t["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        tasks,
        [
            ("a".into(), json!([]), "succeeded".into()),
            ("b".into(), json!(["a"]), "failed".into()),
            ("c".into(), json!(["a"]), "succeeded".into()),
        ]
    );

    let lock = &overview["locks"][0];
    assert_eq!(lock["name"], "gpu");
    assert_eq!(lock["token"], token);
    assert_eq!(lock["holder"]["instance"], "w1");
    assert_eq!(lock["lapsed"], Value::Null);
    let reservation = &overview["reservations"][0];
    assert_eq!(reservation["patterns"], json!(["src/**"]));
    assert_eq!(reservation["holder"]["instance"], "w1");
    assert_eq!(reservation["reason"], "refactor");
    let message = &overview["messages"][0];
    assert_eq!(
        (
            &message["recipient"],
            &message["state"],
            &message["payload"]
        ),
        (&json!("w1"), &json!("pending"), &json!("hello")),
        "{overview:#}"
    );

    // What needs a human: the failed task and the dead instance, the failure first.
    let attention: Vec<(String, String)> = overview["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap().to_string(),
                a["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let failed = attention
        .iter()
        .position(|a| *a == ("failed-task".to_string(), format!("{run_id}/b")));
    let dead = attention
        .iter()
        .position(|a| *a == ("dead-instance".to_string(), "gone".to_string()));
    assert!(
        failed.is_some() && dead.is_some() && failed < dead,
        "{attention:?}"
    );
    assert!(overview["host"]["mem_total_bytes"].as_u64().unwrap() > 0);
    assert!(overview["host"]["disk_total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(overview["host"]["db_kind"], "file");
    assert_eq!(overview["fleet"], Value::Null, "a local file has no fleet");
    assert!(overview["host"]["db_latency_ms"].is_number());

    kill(orphan, Signal::SIGKILL);
    let output = worker.wait_after(Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(code(&output), 143, "{}", stderr(&output));
    let output = server.wait_after(Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(code(&output), 0, "{}", stderr(&output));
}

/// The ids of the database events among `seen`.
fn logged_ids(seen: &[(String, Value)]) -> Vec<i64> {
    seen.iter()
        .filter_map(|(_, data)| data["id"].as_i64())
        .collect()
}

#[test]
fn a_stream_resumed_after_its_last_event_id_gets_exactly_the_missed_events_in_order() {
    let repo = TestRepo::new();
    let port = free_ports(1);
    let mut server = repo.spawn_app(&[
        "serve",
        "--with-api",
        "--api-addr",
        &format!("127.0.0.1:{port}"),
        "--instance",
        "hub",
    ]);
    let url = wait_serving(&repo, &mut server, "hub").unwrap();
    let run = |id: &str| {
        let output = repo.run_app(&["run", "--no-worktree", "--instance", id, "--", "true"]);
        assert_eq!(code(&output), 0, "{}", stderr(&output));
    };
    let stopped = |id: &'static str| move |data: &Value| data["instance"] == id;

    let mut first = Events::subscribe(&url);
    run("x1");
    let mut seen = Vec::new();
    first.until("instance.stopped", &mut seen, stopped("x1"));
    let last = *logged_ids(&seen).last().unwrap();
    drop(first);
    // Missed while disconnected.
    run("x2");
    wait_for("the closed stream to go", Duration::from_secs(30), || {
        json_of(&http(&url, "GET", "/health", &[], None).1)["subscribers"] == json!(0)
    });
    run("x3");

    let mut resumed = Events::subscribe_to(&url, "/events", Some(last), 1);
    let mut seen = Vec::new();
    resumed.until("instance.stopped", &mut seen, stopped("x3"));
    // And live after the switch.
    run("x4");
    resumed.until("instance.stopped", &mut seen, stopped("x4"));
    let got = logged_ids(&seen);

    let listed = repo.run_app(&["events", "--json"]);
    assert_eq!(code(&listed), 0, "{}", stderr(&listed));
    let logged: Vec<Value> = stdout(&listed).lines().map(json_of).collect();
    let through = *got.last().unwrap();
    let want: Vec<i64> = logged
        .iter()
        .filter_map(|event| event["id"].as_i64())
        .filter(|id| *id > last && *id <= through)
        .collect();
    assert_eq!(got, want, "{seen:?}");
    for id in ["x2", "x3", "x4"] {
        for kind in ["instance.started", "instance.stopped"] {
            assert!(
                seen.iter().any(|(k, d)| k == kind && d["instance"] == id),
                "no {kind} of {id}: {seen:?}"
            );
        }
    }

    // The same through the query for clients that cannot set the header.
    let mut by_query =
        Events::subscribe_to(&url, &format!("/events?last_event_id={last}"), None, 2);
    let mut again = Vec::new();
    by_query.until("instance.stopped", &mut again, stopped("x4"));
    assert_eq!(logged_ids(&again), want);
    for bad in ["?last_event_id=soon", "?last_event_id=-1"] {
        let (status, body) = http(&url, "GET", &format!("/events{bad}"), &[], None);
        assert_eq!(status, 400, "{body}");
        assert_eq!(json_of(&body)["kind"], "bad_input");
    }
    drop((resumed, by_query));
    let output = server.wait_after(Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(code(&output), 0, "{}", stderr(&output));
}

#[test]
fn a_task_log_is_read_from_its_row_and_an_instance_is_stopped_behind_the_token() {
    let repo = TestRepo::new();
    let plan = repo.scratch().join("logs.json");
    std::fs::write(
        &plan,
        json!({"name": "logs", "tasks": [
            {"id": "talk", "command": ["sh", "-c", "echo one; echo two; echo three"]},
        ]})
        .to_string(),
    )
    .unwrap();
    let run = repo.run_app(&["orchestrate", "--plan", plan.to_str().unwrap(), "--json"]);
    assert_eq!(code(&run), 0, "{}", stderr(&run));
    let run_id = json_of(&stdout(&run))["run"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let port = free_ports(1);
    let mut command = repo.app(&[
        "serve",
        "--with-api",
        "--api-addr",
        &format!("127.0.0.1:{port}"),
        "--instance",
        "dash",
    ]);
    command.env("APP_API_TOKEN", "t0ken");
    let mut server = repo.spawn(command);
    let url = wait_serving(&repo, &mut server, "dash").unwrap();
    let auth = ("Authorization", "Bearer t0ken");

    let log = format!("/runs/{run_id}/tasks/talk/log?tail=2");
    assert_eq!(http(&url, "GET", &log, &[], None).0, 401);
    let (status, body) = http(&url, "GET", &log, &[auth], None);
    assert_eq!(status, 200, "{body}");
    let tail = json_of(&body);
    assert!(
        tail["text"].as_str().unwrap().ends_with("two\nthree\n"),
        "{tail}"
    );
    assert!(!tail["text"].as_str().unwrap().contains("one"), "{tail}");
    assert_eq!(tail["truncated"], true);
    assert_eq!(tail["status"], "succeeded");
    let whole = json_of(
        &http(
            &url,
            "GET",
            &log.replace("tail=2", "tail=100"),
            &[auth],
            None,
        )
        .1,
    );
    let size = whole["size"].as_u64().unwrap();
    assert_eq!(
        whole["text"].as_str().unwrap().len() as u64,
        size,
        "{whole}"
    );
    for (path, want) in [
        (format!("/runs/{run_id}/tasks/mute/log"), 404),
        ("/runs/nothing-abcdef/tasks/talk/log".to_string(), 404),
        (format!("/runs/{run_id}/tasks/talk/log?tail=many"), 400),
    ] {
        let (status, body) = http(&url, "GET", &path, &[auth], None);
        assert_eq!(status, want, "{path}: {body}");
        assert!(json_of(&body)["error"].is_string(), "{body}");
    }

    let mut victim = start_in_place(&repo, "victim", &["sleep", "300"]);
    let stop = "/instances/victim/stop";
    assert_eq!(http(&url, "POST", stop, &[], Some("{}")).0, 401);
    let plain = [auth, ("Content-Type", "text/plain")];
    let (status, body) = http(&url, "POST", stop, &plain, Some("{}"));
    assert_eq!(
        status, 415,
        "a form post from another page must not stop anything: {body}"
    );
    let (status, body) = http(&url, "POST", "/instances/ghost/stop", &[auth], None);
    assert_eq!(
        (status, &json_of(&body)["kind"]),
        (404, &json!("not_found")),
        "{body}"
    );
    // Refused requests stopped nothing.
    victim.assert_running();
    let (status, body) = http(&url, "POST", stop, &[auth], None);
    assert_eq!(status, 202, "{body}");
    assert_eq!(json_of(&body)["id"], "victim");
    let output = victim.wait(Duration::from_secs(30));
    assert_eq!(code(&output), 128 + 15, "the command got SIGTERM");
    assert!(repo.instances().iter().all(|r| r.id != "victim"));
    let (status, _) = http(&url, "POST", stop, &[auth], None);
    assert_eq!(status, 404);

    let output = server.wait_after(Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(code(&output), 0, "{}", stderr(&output));
}

/// The overview carries what each supervisor derived: a busy loop is `working`, an agent that
/// said it waits for its human is `needs-input`, with its words, first in the attention strip.
#[test]
fn overview_shows_each_agents_state_and_puts_one_that_needs_input_first() {
    let repo = TestRepo::new();
    let (server, url) = serve_dash(&repo);
    let busy = start_in_place(&repo, "busy", &["sh", "-c", "while :; do :; done"]);
    let asks = start_in_place(&repo, "asks", &["sleep", "300"]);
    let said = repo
        .app(&["status", "needs-input", "review the schema please"])
        .env("APP_INSTANCE_ID", "asks")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&said), 0, "{}", stderr(&said));

    let state_of = |overview: &Value, id: &str| {
        overview["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .map(|i| i["agent"].clone())
            .unwrap_or(Value::Null)
    };
    let mut overview = Value::Null;
    wait_for(
        "busy working and asks needing input",
        Duration::from_secs(20),
        || {
            let (status, body) = http(&url, "GET", "/overview", &[], None);
            assert_eq!(status, 200, "{body}");
            overview = json_of(&body);
            state_of(&overview, "busy")["state"] == "working"
                && state_of(&overview, "asks")["state"] == "needs-input"
        },
    );
    assert_eq!(
        state_of(&overview, "asks")["reason"],
        "said: review the schema please",
        "{overview:#}"
    );
    let first = &overview["attention"][0];
    assert_eq!(
        (&first["kind"], &first["subject"]),
        (&json!("needs-input"), &json!("asks")),
        "{overview:#}"
    );
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .contains("review the schema please"),
        "{first}"
    );

    for (running, code_expected) in [(busy, 143), (asks, 143), (server, 0)] {
        let output = running.wait_after(Signal::SIGTERM, Duration::from_secs(30));
        assert_eq!(code(&output), code_expected, "{}", stderr(&output));
    }
}

#[test]
fn an_agents_state_change_is_an_event_and_a_rewrite_of_the_same_state_is_not() {
    let repo = TestRepo::new();
    let (server, url) = serve_dash(&repo);
    let mut events = Events::subscribe(&url);
    // The command reports for itself, as an agent's hook does; ticks every 50 ms rewrite its
    // activity file every 500 ms with the same state.
    let mut command = repo.app(&[
        "run",
        "--no-worktree",
        "--instance",
        "asks",
        "--",
        "sh",
        "-c",
        "\"$APP_BIN\" status needs-input 'which schema?' && exec sleep 300",
    ]);
    command.env("APP_ACTIVITY_INTERVAL", "50ms");
    let mut asks = repo.spawn(command);
    wait_serving(&repo, &mut asks, "asks");

    let mut seen = Vec::new();
    let event = events.until("instance.state", &mut seen, |e| {
        e["instance"] == "asks" && e["payload"]["state"] == "needs-input"
    });
    let payload = &event["payload"];
    assert_eq!(payload["id"], "asks", "{event}");
    assert_eq!(payload["reason"], "said: which schema?", "{event}");
    let file = repo.state_dir().join("activity/asks.json");
    let on_disk = json_of(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(on_disk["agent"]["since"], payload["since"], "{on_disk}");

    // The tracker rewrites the file (a new inode each time) with the same state: twice, then
    // a message marks a later scan, and no instance.state came in between.
    use std::os::unix::fs::MetadataExt;
    let inode = || std::fs::metadata(&file).map(|m| m.ino()).unwrap_or(0);
    for _ in 0..2 {
        let before = inode();
        wait_for(
            "a rewrite of the activity file",
            Duration::from_secs(20),
            || inode() != before,
        );
    }
    let send = repo.run_app(&[
        "send",
        "--from",
        "dash",
        "--to",
        "asks",
        "after the rewrites",
    ]);
    assert_eq!(code(&send), 0, "{}", stderr(&send));
    let mut between = Vec::new();
    events.until("message.sent", &mut between, |e| {
        e["payload"]["payload"] == "after the rewrites"
    });
    let repeated: Vec<_> = between
        .iter()
        .filter(|(kind, e)| kind == "instance.state" && e["instance"] == "asks")
        .collect();
    assert!(
        repeated.is_empty(),
        "state events for rewrites: {repeated:?}"
    );

    for (running, code_expected) in [(asks, 143), (server, 0)] {
        let output = running.wait_after(Signal::SIGTERM, Duration::from_secs(30));
        assert_eq!(code(&output), code_expected, "{}", stderr(&output));
    }
}

#[test]
fn an_attempt_of_a_run_older_than_the_runs_shown_still_names_its_run_and_task() {
    let repo = TestRepo::new();
    let started = repo.scratch().join("started");
    let plan = |name: &str, command: Value| {
        let path = repo.scratch().join(format!("{name}.json"));
        std::fs::write(
            &path,
            json!({"name": name, "tasks": [{"id": "only", "command": command}]}).to_string(),
        )
        .unwrap();
        path
    };
    let long = plan(
        "long",
        json!([
            "sh",
            "-c",
            format!("touch {} && exec sleep 600", started.display())
        ]),
    );
    let _long = repo.spawn_app(&["orchestrate", "--plan", long.to_str().unwrap()]);
    wait_for("the long task to start", Duration::from_secs(30), || {
        started.exists()
    });
    // Enough newer runs that the long one is no longer among the runs an overview shows.
    for i in 0..app::overview::RUNS_SHOWN {
        let quick = plan(&format!("quick-{i}"), json!(["true"]));
        let out = repo.run_app(&["orchestrate", "--plan", quick.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let (_server, url) = serve_dash(&repo);
    let (status, body) = http(&url, "GET", "/overview", &[], None);
    assert_eq!(status, 200, "{body}");
    let overview = json_of(&body);
    let shown: Vec<&str> = overview["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["name"].as_str().unwrap())
        .collect();
    assert!(!shown.contains(&"long"), "{overview:#}");
    let attempt = overview["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["run"].is_string())
        .unwrap_or_else(|| panic!("no instance names a run: {overview:#}"));
    assert_eq!(attempt["task"], "only", "{overview:#}");
    let out = repo.run_app(&["runs", "show", attempt["run"].as_str().unwrap(), "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        json_of(&stdout(&out))["run"]["name"],
        "long",
        "{overview:#}"
    );
}
