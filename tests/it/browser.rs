//! A small W3C WebDriver client for the dashboard tests: it starts Debian's `chromedriver` on a
//! free loopback port, opens one headless Chromium session and drives it over the protocol's
//! HTTP JSON with `ureq`. On drop the session is deleted and chromedriver is killed.
//!
//! Where `chromium` or `chromedriver` is missing (`scripts/install-browser.sh` installs both),
//! [`Browser::start`] prints SKIPPED and returns `None`, or panics when `CI` is set.
//!
//! Self-contained (it uses nothing else of the suite), so `examples/dash_bench.rs` includes it
//! too.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key W3C WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    /// Chromium's profile, removed with the browser.
    _profile: tempfile::TempDir,
}

/// A reference to an element of the page.
#[derive(Debug, Clone)]
pub struct Element(String);

/// Where a program is on PATH.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A loopback port that is free now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where the screenshots go: target/dashboard-test/ (kept as a CI artifact).
pub fn artifact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(target)
    };
    let dir = target.join("dashboard-test");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Browser {
    /// A new headless session, or `None` (after a loud SKIPPED) where the browser is missing.
    pub fn start(test: &str) -> Option<Browser> {
        let (Some(chromium), Some(chromedriver)) = (on_path("chromium"), on_path("chromedriver"))
        else {
            let message = format!(
                "SKIPPED {test}: chromium or chromedriver is not on PATH; run scripts/install-browser.sh (as root) to install Debian's chromium and chromium-driver"
            );
            if std::env::var_os("CI").is_some() {
                panic!("{message} (CI is set, so this fails instead of skipping)");
            }
            eprintln!("\n*** {message} ***\n");
            return None;
        };
        let port = free_port();
        let profile = tempfile::tempdir().unwrap();
        // chromedriver and Chromium get no more of this process's environment than PATH (and
        // TMPDIR), as support::hermetic does; Chromium wants a home for its caches, the profile
        // directory serves.
        let mut command = Command::new(&chromedriver);
        command.env_clear().env("LANG", "C").env("LC_ALL", "C");
        for name in ["PATH", "TMPDIR"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command
            .env("HOME", profile.path())
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let driver = command.spawn().expect("start chromedriver");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .proxy(None)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = browser
                .request("GET", "/status", None)
                .is_ok_and(|value| value["ready"] == json!(true));
            if ready {
                break;
            }
            if let Ok(Some(status)) = browser.driver.try_wait() {
                panic!("chromedriver exited with {status} before it was ready");
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver was not ready within 20s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile_dir = browser._profile.path().join("chromium");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                    "--disable-background-networking", "--disable-sync",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile_dir.display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
            // A confirm() stays open until the test answers it.
            "unhandledPromptBehavior": "ignore",
        }}});
        let created = browser
            .request("POST", "/session", Some(capabilities))
            .unwrap_or_else(|err| panic!("chromedriver refused a session: {err}"));
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {created}"))
            .to_string();
        Some(browser)
    }

    /// One WebDriver command; `Err` carries the protocol's error.
    fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let response = match body {
            Some(body) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.to_string()),
            None if method == "DELETE" => self.agent.delete(&url).call(),
            None => self.agent.get(&url).call(),
        }
        .map_err(|err| format!("{method} {path}: {err}"))?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .read_to_string()
            .map_err(|err| err.to_string())?;
        let value: Value =
            serde_json::from_str(&text).map_err(|err| format!("{method} {path}: {err}: {text}"))?;
        if status >= 400 {
            return Err(format!("{method} {path}: {status} {}", value["value"]));
        }
        Ok(value["value"].clone())
    }

    /// A command of this session that must succeed.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.request(method, &path, body)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Opens `url` and waits for the page to load.
    pub fn navigate(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page; returns its value.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Polls `script` until it returns something other than `null`/`false`, for up to
    /// `timeout`; returns that value, or panics naming `what` and the last value.
    pub fn wait_for(&self, what: &str, timeout: Duration, script: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.execute(script, json!([]));
            if !(value.is_null() || value == json!(false)) {
                return value;
            }
            if Instant::now() >= deadline {
                let _ = self.screenshot(&format!("timeout-{}", slug(what)));
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The elements `css` selects now.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.command(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let reference = e[ELEMENT].as_str();
            Element(
                reference
                    .unwrap_or_else(|| panic!("no element reference in {e}"))
                    .to_string(),
            )
        })
        .collect()
    }

    /// The one element `css` selects; panics if there is none.
    pub fn find(&self, css: &str) -> Element {
        self.find_all(css)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no element matches {css}"))
    }

    /// Clicks `element` as a user would.
    pub fn click(&self, element: &Element) {
        self.command(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        );
    }

    /// Clears `element` and types `text` into it.
    pub fn type_into(&self, element: &Element, text: &str) {
        self.command(
            "POST",
            &format!("/element/{}/clear", element.0),
            Some(json!({})),
        );
        self.command(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(json!({ "text": text })),
        );
    }

    /// The text of the open alert or confirm dialog, if one is open.
    pub fn dialog_text(&self) -> Option<String> {
        let path = format!("/session/{}/alert/text", self.session);
        self.request("GET", &path, None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// Accepts the open dialog.
    pub fn accept_dialog(&self) {
        self.command("POST", "/alert/accept", Some(json!({})));
    }

    /// The browser's console entries since the last call, as `LEVEL message`.
    pub fn console(&self) -> Vec<(String, String)> {
        self.command("POST", "/se/log", Some(json!({"type": "browser"})))
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                (
                    entry["level"].as_str().unwrap_or("").to_string(),
                    entry["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// The console's errors (level SEVERE) since the last call, and what the page's own error
    /// hook caught.
    pub fn errors(&self) -> Vec<String> {
        let mut errors: Vec<String> = self
            .console()
            .into_iter()
            .filter(|(level, _)| level == "SEVERE")
            .map(|(_, message)| message)
            .collect();
        let caught = self.execute(
            "return window.dashboard ? window.dashboard.errors.splice(0) : ['the page script did not run'];",
            json!([]),
        );
        errors.extend(
            caught
                .as_array()
                .unwrap()
                .iter()
                .map(|e| format!("page: {}", e.as_str().unwrap_or(""))),
        );
        errors
    }

    /// Sets the window's size (a phone's width, say).
    pub fn resize(&self, width: u32, height: u32) {
        self.command(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    /// Saves a PNG of the page to target/dashboard-test/`name`.png; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let encoded = self.command("GET", "/screenshot", None);
        let png = decode_base64(encoded.as_str().expect("a base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        let path = artifact_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn slug(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Standard base64 (with padding) to bytes.
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| {
            acc | (u32::from(value(c)) << (18 - 6 * i))
        });
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_decodes() {
    assert_eq!(decode_base64("aGVsbG8="), b"hello");
    assert_eq!(decode_base64("aGVsbG8h"), b"hello!");
    assert_eq!(decode_base64("aGk="), b"hi");
}
