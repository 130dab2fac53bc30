//! The web dashboard (`GET /` of `app serve --with-api`) in a real headless Chromium, driven
//! over WebDriver: what it lists, how it follows the event stream, its actions, and its token.
//! Each test keeps one screenshot under target/dashboard-test/.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::browser::Browser;
use crate::support::{Running, TestRepo, code, stderr, stdout, wait_for};

/// How long the page may take to show what a test waits for, where the issue sets no bound.
const PAGE_WAIT: Duration = Duration::from_secs(30);
/// The bound: a new or stopped instance shows on the page within 2 s, without a reload.
const LIVE_WAIT: Duration = Duration::from_secs(2);

/// `app serve --with-api --instance ID` on an ephemeral loopback port (or `addr`), with `env`;
/// returns it and its API's URL once it is registered.
fn serve(repo: &TestRepo, id: &str, addr: &str, env: &[(&str, &str)]) -> (Running, String) {
    let mut command = repo.app(&["serve", "--with-api", "--instance", id, "--api-addr", addr]);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut server = repo.spawn(command);
    let mut url = None;
    wait_for(&format!("{id} to serve its API"), PAGE_WAIT, || {
        server.assert_running();
        url = repo
            .instances()
            .into_iter()
            .find(|r| r.id == id && r.status.to_string() == "running")
            .and_then(|r| r.api_url);
        url.is_some()
    });
    (server, url.unwrap())
}

/// `app run --instance ID -- sleep 600`, once its command runs.
fn agent(repo: &TestRepo, id: &str) -> Running {
    let agent = repo.spawn_app(&["run", "--instance", id, "--", "sleep", "600"]);
    repo.wait_running(agent.pid());
    agent
}

/// GET `url``path` with an optional bearer token: status and body.
fn get(url: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut request = agent.get(format!("{url}{path}"));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let response = request
        .call()
        .unwrap_or_else(|err| panic!("GET {url}{path}: {err}"));
    let status = response.status().as_u16();
    // A stream that answers 200 is not read to its end.
    let body = if path == "/events" && status == 200 {
        String::new()
    } else {
        response.into_body().read_to_string().unwrap()
    };
    (status, body)
}

/// The instance rows the page shows now: id → data-state.
const ROWS: &str = "return Object.fromEntries([...document.querySelectorAll('#instance-rows tr[data-instance]')].map(r => [r.dataset.instance, r.dataset.state]));";

/// The rows as a map.
fn rows(browser: &Browser) -> serde_json::Map<String, Value> {
    browser
        .execute(ROWS, json!([]))
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the page shows a row for each of `ids`.
fn wait_rows(browser: &Browser, ids: &[&str], timeout: Duration) {
    let script = format!(
        "const rows = (function () {{ {ROWS} }})(); return {ids}.every(id => id in rows) ? rows : null;",
        ids = json!(ids)
    );
    browser.wait_for(&format!("rows for {ids:?}"), timeout, &script);
}

/// Asserts the page logged no error and its script caught none.
fn assert_no_errors(browser: &Browser) {
    let errors = browser.errors();
    assert!(errors.is_empty(), "the page had errors: {errors:#?}");
}

/// The state the page should show for an instance of `GET /overview`: the agent's, else the
/// record's liveness/status (as the page documents it).
fn expected_state(instance: &Value) -> String {
    if instance["liveness"] == "stale" {
        return "stale".into();
    }
    instance["agent"]["state"]
        .as_str()
        .or(instance["status"].as_str())
        .unwrap_or("live")
        .to_string()
}

#[test]
fn the_page_lists_instances_with_their_states_and_follows_starts_and_stops_live() {
    let Some(browser) = Browser::start("dashboard instances") else {
        return;
    };
    let repo = TestRepo::new();
    let (_server, url) = serve(&repo, "hub", "127.0.0.1:0", &[]);
    let _one = agent(&repo, "one");
    let two = agent(&repo, "two");

    browser.navigate(&format!("{url}/"));
    wait_rows(&browser, &["hub", "one", "two"], PAGE_WAIT);
    // The hook scripts/bench-dash.sh times the first render by: set once rows are shown.
    let first = browser.execute("return window.dashboard.firstRenderMs;", json!([]));
    assert!(
        first.as_f64().is_some_and(|ms| ms > 0.0),
        "firstRenderMs is a time since navigation start: {first}"
    );
    // Each row's state is what the overview says of that instance.
    let (status, body) = get(&url, "/overview", None);
    assert_eq!(status, 200, "{body}");
    let overview: Value = serde_json::from_str(&body).unwrap();
    let shown = rows(&browser);
    for instance in overview["instances"].as_array().unwrap() {
        let id = instance["id"].as_str().unwrap();
        if let Some(state) = shown.get(id) {
            assert_eq!(state, &json!(expected_state(instance)), "{id}: {instance}");
        }
    }
    for id in ["hub", "one", "two"] {
        assert!(
            !shown[id].as_str().unwrap().is_empty(),
            "{id} has a state: {shown:?}"
        );
    }
    // Sorted by id; a click on the header reverses it; a state filter shows only that state.
    let order =
        "return [...document.querySelectorAll('#instance-rows tr')].map(r => r.dataset.instance);";
    assert_eq!(
        browser.execute(order, json!([])),
        json!(["hub", "one", "two"])
    );
    browser.click(&browser.find("#instances th[data-sort='id']"));
    assert_eq!(
        browser.execute(order, json!([])),
        json!(["two", "one", "hub"])
    );
    browser.click(&browser.find("#instances th[data-sort='id']"));
    let hub_state = shown["hub"].as_str().unwrap();
    let filtered = browser.execute(
        "const s = document.getElementById('filter-state'); s.value = arguments[0]; s.dispatchEvent(new Event('change')); return [...document.querySelectorAll('#instance-rows tr')].map(r => r.dataset.state);",
        json!([hub_state]),
    );
    assert!(
        filtered.as_array().unwrap().iter().all(|s| s == hub_state)
            && !filtered.as_array().unwrap().is_empty(),
        "{filtered}"
    );
    browser.execute(
        "const s = document.getElementById('filter-state'); s.value = ''; s.dispatchEvent(new Event('change'));",
        json!([]),
    );
    // The page is not reloaded from here on: this mark would go with a reload.
    browser.execute("window.__kept = 'no reload';", json!([]));

    let three = agent(&repo, "three");
    wait_rows(&browser, &["three"], LIVE_WAIT);
    drop(two.wait_after(Signal::SIGTERM, Duration::from_secs(30)));
    browser.wait_for(
        "two's row to go",
        LIVE_WAIT,
        &format!("const rows = (function () {{ {ROWS} }})(); return !('two' in rows);"),
    );

    // Stop from the page: the confirmation first, then the instance goes.
    browser.click(&browser.find("tr[data-instance='three'] button[data-action='stop']"));
    let mut dialog = None;
    wait_for("the stop confirmation", PAGE_WAIT, || {
        dialog = browser.dialog_text();
        dialog.is_some()
    });
    assert!(dialog.unwrap().contains("three"));
    browser.accept_dialog();
    let stopped = three.wait(PAGE_WAIT);
    assert!(stopped.status.code().is_some(), "{}", stderr(&stopped));
    browser.wait_for(
        "three's row to go after the page stopped it",
        PAGE_WAIT,
        &format!("const rows = (function () {{ {ROWS} }})(); return !('three' in rows);"),
    );
    assert_eq!(
        browser.execute("return window.__kept;", json!([])),
        json!("no reload")
    );
    let timeline = browser.execute(
        "return [...document.querySelectorAll('#event-list li')].map(li => li.dataset.eventKind);",
        json!([]),
    );
    assert!(
        timeline
            .as_array()
            .unwrap()
            .contains(&json!("instance.started")),
        "{timeline}"
    );
    assert_no_errors(&browser);
    browser.screenshot("instances");
    // At a phone's width the page still lays out (the tables scroll inside their cards).
    browser.resize(390, 844);
    let overflow = browser.execute(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
        json!([]),
    );
    assert_eq!(
        overflow,
        json!(0),
        "the page is wider than a phone's screen"
    );
    browser.screenshot("instances-phone");
    assert_no_errors(&browser);
}

#[test]
fn a_live_page_reads_the_overview_only_when_an_event_arrives() {
    let Some(browser) = Browser::start("dashboard idle") else {
        return;
    };
    let repo = TestRepo::new();
    let (_server, url) = serve(&repo, "hub", "127.0.0.1:0", &[]);
    browser.navigate(&format!("{url}/"));
    wait_rows(&browser, &["hub"], PAGE_WAIT);
    browser.wait_for(
        "the stream to be live",
        PAGE_WAIT,
        "return window.dashboard.connected || null;",
    );
    let reads = || {
        browser
            .execute("return window.dashboard.overviews;", json!([]))
            .as_u64()
            .unwrap()
    };
    // Let the reads of the connect settle: nothing happens in this repository from here on.
    let mut before = reads();
    wait_for("the connect's reads to settle", PAGE_WAIT, || {
        std::thread::sleep(Duration::from_millis(300));
        let now = reads();
        std::mem::replace(&mut before, now) == now
    });
    // Proving that no read happens needs a wait: longer than the fallback's 5 s period.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(reads(), before, "an idle live page read the overview again");
    assert_eq!(
        browser.execute("return window.dashboard.connected;", json!([])),
        json!(true)
    );
    // An event is what makes it read.
    let send = repo.run_app(&["send", "--from", "hub", "--to", "hub", "poke"]);
    assert_eq!(code(&send), 0, "{}", stderr(&send));
    browser.wait_for(
        "a read after the message's event",
        PAGE_WAIT,
        &format!("return window.dashboard.overviews > {before} || null;"),
    );
    assert!(
        timeline(&browser, "message.sent").contains(&"hub".to_string()),
        "{:?}",
        timeline(&browser, "message.sent")
    );
    assert_no_errors(&browser);
}

/// Writes `plan` to the scratch directory; returns its path.
fn write_plan(repo: &TestRepo, plan: &Value) -> PathBuf {
    let path = repo.scratch().join("plan.json");
    fs::write(&path, plan.to_string()).unwrap();
    path
}

#[test]
fn a_runs_graph_shows_each_tasks_state_and_opens_its_log() {
    let Some(browser) = Browser::start("dashboard runs") else {
        return;
    };
    let repo = TestRepo::new();
    let plan = write_plan(
        &repo,
        &json!({
            "name": "graph",
            "integration": "merged",
            "tasks": [
                {"id": "first", "command": "echo hello-from-first"},
                {"id": "bad", "command": "echo going-wrong; exit 3"},
                {"id": "second", "command": "true", "depends_on": ["first"]},
                {"id": "after-bad", "command": "true", "depends_on": ["bad"]},
            ]
        }),
    );
    let output = repo.run_app(&[
        "orchestrate",
        "--plan",
        plan.to_str().unwrap(),
        "--json",
        "--progress",
        "plain",
    ]);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    let summary: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let run_id = summary["run"]["id"].as_str().unwrap().to_string();
    let (_server, url) = serve(&repo, "hub", "127.0.0.1:0", &[]);

    browser.navigate(&format!("{url}/"));
    let script = format!(
        "const tasks = [...document.querySelectorAll('[data-run=\"{run_id}\"] [data-task]')]; return tasks.length === 4 ? Object.fromEntries(tasks.map(t => [t.dataset.task, [t.dataset.status, t.closest('[data-wave]').dataset.wave]])) : null;"
    );
    let shown = browser.wait_for("the run's four tasks", PAGE_WAIT, &script);
    // Each task's state is what `app runs show` says, and each waits in a later wave than
    // what it depends on.
    for task in summary["tasks"].as_array().unwrap() {
        let id = task["task_id"].as_str().unwrap();
        assert_eq!(shown[id][0], task["status"], "{id}: {shown}");
    }
    assert_eq!(shown["first"][0], "succeeded");
    assert_eq!(shown["bad"][0], "failed");
    assert_eq!(shown["after-bad"][0], "skipped");
    assert_eq!(shown["first"][1], "0");
    assert_eq!(shown["second"][1], "1");
    assert_eq!(shown["after-bad"][1], "1");

    browser.click(&browser.find(&format!("[data-run='{run_id}'] [data-task='first']")));
    browser.wait_for(
        "the log of first",
        PAGE_WAIT,
        "const p = document.getElementById('log-panel'); return !p.hidden && document.getElementById('log-text').textContent.includes('hello-from-first');",
    );
    assert_no_errors(&browser);
    browser.screenshot("runs");
}

#[test]
fn a_message_sent_from_the_page_is_received_by_app_recv() {
    let Some(browser) = Browser::start("dashboard message") else {
        return;
    };
    let repo = TestRepo::new();
    let (_server, url) = serve(&repo, "hub", "127.0.0.1:0", &[]);
    let _target = agent(&repo, "target");
    browser.navigate(&format!("{url}/"));
    wait_rows(&browser, &["hub", "target"], PAGE_WAIT);

    browser.click(&browser.find("tr[data-instance='target'] button[data-action='message']"));
    assert_eq!(
        browser.execute("return document.getElementById('msg-to').value;", json!([])),
        json!("target")
    );
    let text = format!("review please {}", std::process::id());
    browser.type_into(&browser.find("#msg-text"), &text);
    browser.click(&browser.find("#msg-send"));
    let sent = browser.wait_for(
        "the page to say the message was sent",
        PAGE_WAIT,
        "return document.getElementById('msg-result').dataset.sent || null;",
    );

    let received = repo.run_app(&["recv", "--instance", "target", "--json"]);
    assert_eq!(code(&received), 0, "{}", stderr(&received));
    let message: Value = serde_json::from_str(stdout(&received).lines().next().unwrap()).unwrap();
    assert_eq!(message["id"], sent);
    assert_eq!(message["payload"], json!(text));
    assert_eq!(message["type"], "text");
    assert_eq!(message["from"], "hub");
    assert_no_errors(&browser);
    browser.screenshot("message");
}

#[test]
fn without_the_token_an_off_loopback_page_gets_nothing() {
    let Some(netns) = crate::fleet::Netns::create() else {
        return;
    };
    let Some(browser) = Browser::start("dashboard token") else {
        return;
    };
    let repo = TestRepo::new();
    let token = format!("secret-{}", std::process::id());
    // Listening on the veth's address, not a loopback one: the token is required.
    let addr = format!("{}:0", netns.outer);
    let (_server, url) = serve(&repo, "hub", &addr, &[("APP_API_TOKEN", &token)]);
    assert!(
        url.starts_with(&format!("http://{}:", netns.outer)),
        "{url}"
    );
    let _target = agent(&repo, "target");

    // The page itself holds nothing and loads; every data request it makes is refused.
    browser.navigate(&format!("{url}/"));
    browser.wait_for(
        "the page to ask for the token",
        PAGE_WAIT,
        "return !document.getElementById('token-form').hidden && document.getElementById('conn').dataset.conn === 'unauthorized';",
    );
    assert_eq!(
        rows(&browser).len(),
        0,
        "no instance rows without the token"
    );
    // A message sent without the token is refused and reaches nobody.
    browser.execute(
        "const s = document.getElementById('msg-to'); s.append(new Option('target', 'target')); s.value = 'target';",
        json!([]),
    );
    browser.type_into(&browser.find("#msg-text"), "no token");
    browser.click(&browser.find("#msg-send"));
    browser.wait_for(
        "the page to say the message was not sent",
        PAGE_WAIT,
        "return document.getElementById('msg-result').textContent.startsWith('not sent');",
    );
    let received = repo.run_app(&["recv", "--instance", "target", "--json"]);
    assert_eq!(
        code(&received),
        1,
        "nothing was delivered: {}",
        stdout(&received)
    );
    for path in ["/overview", "/events", "/instances", "/health"] {
        let (status, body) = get(&url, path, None);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(!body.contains("target"), "{path}: {body}");
    }
    // What the console shows are the refused requests, nothing else.
    let errors = browser.errors();
    assert!(!errors.is_empty(), "the refused requests are logged");
    assert!(
        errors.iter().all(|e| e.contains("401")),
        "only refusals: {errors:#?}"
    );
    browser.screenshot("token-refused");

    // With the token in the fragment (never sent to the server) the same page shows the fleet,
    // and the token leaves the address bar.
    assert_eq!(get(&url, "/overview", Some(&token)).0, 200);
    browser.navigate(&format!("{url}/#token={token}"));
    wait_rows(&browser, &["hub", "target"], PAGE_WAIT);
    assert_eq!(
        browser.execute("return location.hash;", json!([])),
        json!("")
    );
    assert!(browser.find_all("#token-form[hidden]").len() == 1);
    assert_no_errors(&browser);
    browser.screenshot("token");
}

/// The timeline's events of `kind`, as the instances they concern.
fn timeline(browser: &Browser, kind: &str) -> Vec<String> {
    browser
        .execute(
            "return [...document.querySelectorAll('#event-list li')].filter(li => li.dataset.eventKind === arguments[0]).map(li => li.dataset.eventInstance || '');",
            json!([kind]),
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn after_a_disconnect_the_page_resumes_the_stream_without_losing_an_event() {
    let Some(browser) = Browser::start("dashboard resume") else {
        return;
    };
    let repo = TestRepo::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let (first, url) = serve(&repo, "hub", &addr, &[]);
    browser.navigate(&format!("{url}/"));
    wait_rows(&browser, &["hub"], PAGE_WAIT);
    browser.execute("window.__kept = 'no reload';", json!([]));
    let _before = agent(&repo, "before");
    browser.wait_for(
        "before's start on the timeline",
        PAGE_WAIT,
        "return [...document.querySelectorAll('#event-list li[data-event-kind=\"instance.started\"]')].some(li => li.dataset.eventInstance === 'before');",
    );

    // The server goes away; an instance starts while no stream is open.
    drop(first.wait_after(Signal::SIGTERM, Duration::from_secs(30)));
    browser.wait_for(
        "the page to notice the disconnect",
        PAGE_WAIT,
        "return document.getElementById('conn').dataset.conn !== 'live';",
    );
    let _during = agent(&repo, "during");
    // A new server on the same address: the page reconnects with the last id it saw and gets
    // what it missed from the database's log (a fresh stream would start from now).
    let (_second, _) = serve(&repo, "hub2", &addr, &[]);
    browser.wait_for(
        "during's start, replayed",
        PAGE_WAIT,
        "return [...document.querySelectorAll('#event-list li[data-event-kind=\"instance.started\"]')].some(li => li.dataset.eventInstance === 'during');",
    );
    wait_rows(&browser, &["hub2", "before", "during"], PAGE_WAIT);
    let started = timeline(&browser, "instance.started");
    for id in ["before", "during"] {
        assert_eq!(
            started.iter().filter(|i| *i == id).count(),
            1,
            "{id} once: {started:?}"
        );
    }
    assert_eq!(
        browser.execute("return window.__kept;", json!([])),
        json!("no reload")
    );
    // What the console shows are the refused reconnects while no server listened, nothing else.
    let errors = browser.errors();
    assert!(
        errors.iter().all(|e| e.contains("net::ERR_")),
        "only failed connections: {errors:#?}"
    );
    browser.screenshot("resume");
}

/// `app run --instance ID -- COMMAND` with short activity timings, once its command runs.
fn timed_agent(repo: &TestRepo, id: &str, command: &[&str]) -> Running {
    let mut args = vec!["run", "--instance", id, "--"];
    args.extend_from_slice(command);
    let mut cmd = repo.app(&args);
    cmd.env("APP_ACTIVITY_INTERVAL", "200ms")
        .env("APP_IDLE_AFTER", "1s");
    let agent = repo.spawn(cmd);
    repo.wait_running(agent.pid());
    agent
}

/// What row `id` shows now: state, since (its cell's timestamp), reason, progress.
const ROW: &str = "const r = document.querySelector(`#instance-rows tr[data-instance=\"${arguments[0]}\"]`); if (!r) return null; const f = (n) => r.querySelector(`[data-field=\"${n}\"]`); return { state: r.dataset.state, pill: f('state').textContent, since: f('since').dataset.ago, since_text: f('since').textContent, reason: f('reason').textContent, progress: f('progress').textContent };";

/// Waits until row `id` reads `state` with a reason that starts with `reason`; returns what
/// it shows.
fn wait_row_state(browser: &Browser, id: &str, state: &str, reason: &str) -> Value {
    let script = format!(
        "const row = (function () {{ {ROW} }}).apply(null, arguments); return row && row.state === {state} && row.reason.startsWith({reason}) ? row : null;",
        state = json!(state),
        reason = json!(reason)
    );
    let deadline = std::time::Instant::now() + PAGE_WAIT;
    loop {
        let row = browser.execute(&script, json!([id]));
        if !row.is_null() {
            return row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} did not read {state} ({reason}...) within {PAGE_WAIT:?}; the row shows {}",
            browser.execute(ROW, json!([id]))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The instance `id` of `GET /overview`.
fn overview_instance(url: &str, id: &str) -> Value {
    let (status, body) = get(url, "/overview", None);
    assert_eq!(status, 200, "{body}");
    let overview: Value = serde_json::from_str(&body).unwrap();
    overview["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no {id} in {overview:#}"))
}

/// How the page writes a progress: ahead/behind, then what is committed, then what is not.
fn progress_text(p: &Value) -> String {
    let (c, u) = (&p["committed"], &p["uncommitted"]);
    let mut text = format!(
        "+{}/-{} · {}f +{} -{}",
        p["ahead"], p["behind"], c["files"], c["insertions"], c["deletions"]
    );
    if u["files"].as_u64().unwrap_or(0) > 0 {
        text.push_str(&format!(" · uncommitted {}f", u["files"]));
    }
    text
}

#[test]
fn the_page_shows_each_agents_state_and_puts_one_that_needs_input_first_without_a_reload() {
    let Some(browser) = Browser::start("dashboard agent state") else {
        return;
    };
    let repo = TestRepo::new();
    let (_server, url) = serve(&repo, "hub", "127.0.0.1:0", &[]);
    let _busy = timed_agent(&repo, "busy", &["sh", "-c", "while :; do :; done"]);
    let _sleepy = timed_agent(&repo, "sleepy", &["sleep", "600"]);
    browser.navigate(&format!("{url}/"));
    wait_rows(&browser, &["hub", "busy", "sleepy"], PAGE_WAIT);
    browser.execute("window.__kept = 'no reload';", json!([]));

    // A busy loop works, a sleep idles; each row says why and since when, as the overview does.
    let busy = wait_row_state(&browser, "busy", "working", "cpu ");
    assert_eq!(busy["pill"], "working", "{busy}");
    assert!(
        busy["reason"].as_str().unwrap().starts_with("cpu "),
        "{busy}"
    );
    let sleepy = wait_row_state(&browser, "sleepy", "idle", "no cpu");
    assert_eq!(sleepy["pill"], "idle", "{sleepy}");
    let listed = overview_instance(&url, "sleepy");
    assert_eq!(listed["agent"]["state"], "idle", "{listed}");
    // The row shows the state the overview has: entered at the same moment. (Its reason
    // counts the quiet seconds, rewritten every few ticks without an event; the page reads
    // the overview again only on events while its stream is live, so the count it shows is
    // that of the read the idle state's event caused.)
    let sleepy = browser.wait_for(
        "sleepy's row to match the overview",
        PAGE_WAIT,
        &format!(
            "const row = (function () {{ {ROW} }}).apply(null, ['sleepy']); return row && row.since === {since} && row.reason.startsWith('no cpu and no change for ') ? row : null;",
            since = listed["agent"]["since"],
        ),
    );
    assert!(
        sleepy["reason"].as_str().unwrap().starts_with("no cpu"),
        "{sleepy}"
    );
    assert!(
        sleepy["since_text"].as_str().unwrap().ends_with(" ago"),
        "{sleepy}"
    );
    assert!(
        listed["progress"].is_object(),
        "sleepy has a worktree: {listed}"
    );
    assert_eq!(
        sleepy["progress"],
        json!(progress_text(&listed["progress"])),
        "{listed}"
    );

    // The sleep says it waits for its human: its row and the head of the attention strip say
    // so, in its words, without a reload.
    let said = repo
        .app(&["status", "needs-input", "why"])
        .env("APP_INSTANCE_ID", "sleepy")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&said), 0, "{}", stderr(&said));
    let asks = wait_row_state(&browser, "sleepy", "needs-input", "said: ");
    assert_eq!(asks["pill"], "needs-input", "{asks}");
    assert_eq!(asks["reason"], "said: why", "{asks}");
    let listed = overview_instance(&url, "sleepy");
    assert_eq!(asks["since"], listed["agent"]["since"], "{listed}");
    let first = browser.wait_for(
        "sleepy first in the attention strip",
        PAGE_WAIT,
        "const li = document.querySelector('#attention-list li'); return li && li.dataset.attentionKind === 'needs-input' ? { subject: li.dataset.subject, text: li.textContent, none: !document.getElementById('attention-none').hidden } : null;",
    );
    assert_eq!(first["subject"], "sleepy", "{first}");
    assert!(first["text"].as_str().unwrap().contains("why"), "{first}");
    assert_eq!(first["none"], false, "{first}");
    assert_eq!(
        wait_row_state(&browser, "busy", "working", "cpu ")["pill"],
        "working"
    );
    assert_eq!(
        browser.execute("return window.__kept;", json!([])),
        json!("no reload")
    );
    assert_no_errors(&browser);
    browser.screenshot("agent-state");
}
