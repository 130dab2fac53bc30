//! The web dashboard in headless Chromium, for `scripts/bench-dash.sh`. It drives the browser
//! with the test suite's own WebDriver client (tests/it/browser.rs).
//!
//!   dash_bench load URL LOADS INSTANCES TASKS
//!       LOADS navigations to the dashboard at URL (after one untimed), each timed from
//!       navigation start to the page's first rendered overview (`window.dashboard
//!       .firstRenderMs`), checking that it shows at least INSTANCES instance rows and TASKS
//!       task nodes; against LOADS navigations to URL/health, a static document from the same
//!       server, timed from navigation start to its load event's end. Prints
//!       `page P50_MS MAX_MS`, `overview P50_MS MAX_MS` (the page's GET /overview, from the
//!       resource timing) and `static P50_MS MAX_MS`.
//!   dash_bench latency URL EVENTS APP FROM TO
//!       Opens the dashboard, then EVENTS times, one at a time: runs `APP send --from FROM --to
//!       TO bench-N` and waits for the page's timeline to show that message.sent event. Each
//!       latency is from the command's start to the moment the timeline's DOM got the entry
//!       (a MutationObserver's Date.now(), the same host clock). Sends are spread over a second
//!       apart. Prints `screen P50 P99 MAX`
//!       and, as the baseline, `send P50 P99 MAX` (the command's own run time), in ms.
//!   dash_bench hold URL SECONDS
//!       Opens the dashboard, prints `open` once it has rendered, keeps it open SECONDS and
//!       closes it.
//!
//! Exits 3 with SKIPPED where chromium or chromedriver is missing (unless CI is set).

#[allow(dead_code)]
#[path = "../tests/it/browser.rs"]
mod browser;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use browser::Browser;

/// How long one page may take to show what is waited for before the bench gives up.
const WAIT: Duration = Duration::from_secs(30);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["load", url, loads, instances, tasks] => {
            load(url, number(loads), number(instances), number(tasks))
        }
        ["latency", url, events, app, from, to] => latency(url, number(events), app, from, to),
        ["hold", url, seconds] => hold(url, number(seconds)),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: dash_bench load URL LOADS INSTANCES TASKS | latency URL EVENTS APP FROM TO | hold URL SECONDS"
    );
    std::process::exit(2);
}

fn number(text: &str) -> usize {
    text.parse().unwrap_or_else(|_| usage())
}

/// A browser session, or exit 3 after the client's SKIPPED message.
fn browser(what: &str) -> Browser {
    Browser::start(what).unwrap_or_else(|| std::process::exit(3))
}

/// Opens the dashboard and waits for its first rendered overview; returns its time in ms.
fn open(browser: &Browser, url: &str) -> f64 {
    browser.navigate(&format!("{url}/"));
    let value = browser.wait_for(
        "the first render",
        WAIT,
        "return window.dashboard && window.dashboard.firstRenderMs;",
    );
    value.as_f64().expect("firstRenderMs is a number")
}

/// How many elements `css` selects on the page.
fn count(browser: &Browser, css: &str) -> usize {
    let script = format!("return document.querySelectorAll({css:?}).length;");
    browser.execute(&script, json!([])).as_u64().unwrap() as usize
}

fn load(url: &str, loads: usize, instances: usize, tasks: usize) {
    let browser = browser("dash_bench load");
    open(&browser, url);
    let (mut page, mut overview, mut blank) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..loads {
        page.push(open(&browser, url));
        let rows = count(&browser, "#instance-rows tr[data-instance]");
        let nodes = count(&browser, "button.task");
        assert!(
            rows >= instances && nodes >= tasks,
            "the first render showed {rows} instance rows and {nodes} task nodes, not {instances} and {tasks}"
        );
        let fetched = browser.execute(
            "const e = performance.getEntriesByType('resource').find(e => new URL(e.name).pathname === '/overview'); return e ? e.responseEnd - e.startTime : null;",
            json!([]),
        );
        overview.push(fetched.as_f64().expect("the page fetched /overview"));
    }
    for _ in 0..loads {
        browser.navigate(&format!("{url}/health"));
        let end = browser.wait_for(
            "the static document's load",
            WAIT,
            "const n = performance.getEntriesByType('navigation')[0]; return n && n.loadEventEnd > 0 ? n.loadEventEnd : null;",
        );
        blank.push(end.as_f64().unwrap());
    }
    for (name, values) in [("page", page), ("overview", overview), ("static", blank)] {
        let sorted = sorted(values);
        println!(
            "{name} {:.2} {:.2}",
            percentile(&sorted, 50),
            sorted[sorted.len() - 1]
        );
    }
}

/// Milliseconds since the epoch, as the page's Date.now() counts them.
fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// Records, per timeline entry the page adds, its text and when it was added.
const OBSERVE: &str = "window.benchSeen = []; new MutationObserver((changes) => { const t = Date.now(); for (const c of changes) for (const n of c.addedNodes) if (n.dataset && n.dataset.eventKind) window.benchSeen.push([n.dataset.eventKind, n.textContent, t]); }).observe(document.getElementById('event-list'), { childList: true }); return true;";

fn latency(url: &str, events: usize, app: &str, from: &str, to: &str) {
    let browser = browser("dash_bench latency");
    open(&browser, url);
    browser.wait_for(
        "the event stream",
        WAIT,
        "return window.dashboard.connected;",
    );
    browser.execute(OBSERVE, json!([]));
    let (mut screen, mut send) = (Vec::new(), Vec::new());
    for n in 0..events {
        // Spread over a second, so the sends do not fall into step with the server's polling
        // (each send would otherwise start just after the poll that saw the one before).
        std::thread::sleep(Duration::from_millis((n as u64 * 617) % 1000));
        let text = format!("bench-{n}");
        let started = epoch_ms();
        let clock = Instant::now();
        let status = Command::new(app)
            .args(["send", "--from", from, "--to", to, &text])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run app send");
        assert!(status.success(), "app send exited with {status}");
        send.push(clock.elapsed().as_secs_f64() * 1000.0);
        // The payload shows as JSON: the closing quote tells bench-1 from bench-10.
        let script = format!(
            "const e = window.benchSeen.find(([k, t]) => k === 'message.sent' && t.includes({:?})); return e ? e[2] : null;",
            format!("{text}\"")
        );
        let seen = browser.wait_for("the message on the page", WAIT, &script);
        screen.push(seen.as_f64().unwrap() - started);
    }
    for (name, values) in [("screen", screen), ("send", send)] {
        let sorted = sorted(values);
        println!(
            "{name} {:.2} {:.2} {:.2}",
            percentile(&sorted, 50),
            percentile(&sorted, 99),
            sorted[sorted.len() - 1]
        );
    }
}

fn hold(url: &str, seconds: usize) {
    let browser = browser("dash_bench hold");
    open(&browser, url);
    println!("open");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(seconds as u64));
    let errors: Vec<Value> = browser.errors().into_iter().map(Value::from).collect();
    if !errors.is_empty() {
        eprintln!("dash_bench: the page reported errors: {errors:?}");
    }
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// The nearest-rank `p`th percentile of sorted `values`.
fn percentile(values: &[f64], p: usize) -> f64 {
    let rank = (values.len() * p).div_ceil(100).max(1);
    values[rank - 1]
}
