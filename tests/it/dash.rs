//! `app dash`, the terminal dashboard: its refusals without a terminal or with a bad `--api`,
//! and end-to-end runs in a real terminal (a detached tmux session, read with `capture-pane`,
//! driven with `send-keys`), locally and against `app serve --with-api`.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::{Running, TestRepo, stderr, wait_for};

const TMUX: &str = "/usr/bin/tmux";

/// A detached tmux server and session of its own, running one command; the whole server is
/// killed on drop, so nothing outlives the test.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    /// Starts `shell_command` in a 160x45 session in the repository root, with the repository's
    /// hermetic environment; `None` when tmux is missing (said loudly; a failure under CI).
    fn start(repo: &TestRepo, shell_command: &str) -> Option<Tmux> {
        if !Path::new(TMUX).exists() {
            let message = format!("TMUX TEST SKIPPED: {TMUX} is missing (apt-get install tmux)");
            assert!(
                std::env::var_os("CI").is_none(),
                "{message} (required under CI; .ci/run installs it)"
            );
            eprintln!("\n!!! {message}\n");
            return None;
        }
        // Its own server, its socket inside the test's temp dir (gone with it).
        let tmux = Tmux {
            socket: repo.scratch().join("tmux.sock"),
        };
        let root = repo.root().to_str().unwrap();
        let output = tmux
            .command(repo)
            .args(["new-session", "-d", "-s", "dash", "-x", "160", "-y", "45"])
            .args(["-c", root, shell_command])
            .output()
            .unwrap();
        assert!(output.status.success(), "tmux: {}", stderr(&output));
        Some(tmux)
    }

    fn command(&self, repo: &TestRepo) -> Command {
        let mut command = repo.command(TMUX);
        command.arg("-S").arg(&self.socket);
        command
    }

    /// What the pane shows now.
    fn screen(&self, repo: &TestRepo) -> String {
        let output = self
            .command(repo)
            .args(["capture-pane", "-p", "-t", "dash"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn keys(&self, repo: &TestRepo, keys: &str) {
        let status = self
            .command(repo)
            .args(["send-keys", "-t", "dash", keys])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Whether the pane shows the alternate screen.
    fn alternate(&self, repo: &TestRepo) -> bool {
        let output = self
            .command(repo)
            .args(["display-message", "-p", "-t", "dash", "#{alternate_on}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim() == "1"
    }

    /// Waits (bounded) until the pane shows `text`; panics with the screen otherwise.
    fn wait_for_text(&self, repo: &TestRepo, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen(repo);
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {text:?} on the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new(TMUX)
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .env_clear()
            .output();
    }
}

/// The shell command a pane runs: `app dash ARGS`, then what it exited with and whether the
/// terminal is back in canonical mode with echo (`icanon`, `echo`; raw mode has `-icanon`,
/// `-echo`), then `report done`.
fn dash_then_report(args: &str) -> String {
    report_after(&format!("'{}' dash {args}", env!("CARGO_BIN_EXE_app")))
}

/// `command`, then the report [`dash_then_report`] describes.
fn report_after(command: &str) -> String {
    format!(
        "{command}; echo \"dash exited $?\"; stty -a | tr ' ' '\\n' | grep -x -- '-\\?\\(icanon\\|echo\\)'; echo 'report done'; exec sleep 600"
    )
}

/// Quits with `q` and checks the dashboard ended with 0 and gave the terminal back.
fn quit_and_check_restored(repo: &TestRepo, tmux: &Tmux) {
    tmux.keys(repo, "q");
    check_restored(repo, tmux, 0);
}

/// Waits for the pane's report and checks the dashboard exited with `code` and gave the
/// terminal back: canonical mode and echo on, the main screen shown, no dashboard on it.
/// Returns the screen.
fn check_restored(repo: &TestRepo, tmux: &Tmux, code: i32) -> String {
    let screen = tmux.wait_for_text(repo, "report done");
    assert!(
        screen.contains(&format!("dash exited {code}\n")),
        "{screen}"
    );
    for mode in ["icanon", "echo"] {
        assert!(
            screen.lines().any(|line| line.trim() == mode),
            "the terminal is still in raw mode (no {mode:?}):\n{screen}"
        );
    }
    assert!(
        !screen.contains("Attention"),
        "the dashboard is still shown:\n{screen}"
    );
    assert!(!tmux.alternate(repo), "the alternate screen is still on");
    screen
}

/// Starts `app run -- sleep 600` and returns it with its instance id, once it runs.
fn start_instance(repo: &TestRepo) -> (Running, String) {
    let run = repo.spawn_app(&["run", "--", "sleep", "600"]);
    let id = repo.wait_running(run.pid()).id.to_string();
    (run, id)
}

/// Runs a plan of two tasks (`greet`, then `after`) to its end.
fn run_plan(repo: &TestRepo) {
    let plan = repo.scratch().join("plan.json");
    let text = r#"{"name": "logs", "tasks": [
        {"id": "greet", "command": "echo hello from greet"},
        {"id": "after", "command": "true", "depends_on": ["greet"]}]}"#;
    std::fs::write(&plan, text).unwrap();
    let output = repo.run_app(&[
        "orchestrate",
        "--plan",
        plan.to_str().unwrap(),
        "--progress",
        "none",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

/// On the Runs tab, the plan's graph by wave, and Enter on its first task shows its log.
fn check_task_log(repo: &TestRepo, tmux: &Tmux) {
    tmux.keys(repo, "2");
    let screen = tmux.wait_for_text(repo, "wave 2");
    let after = screen.lines().find(|line| line.contains("wave 2")).unwrap();
    assert!(
        after.contains("after") && after.contains("succeeded"),
        "{screen}"
    );
    tmux.keys(repo, "Enter");
    tmux.wait_for_text(repo, "hello from greet");
    tmux.keys(repo, "Escape");
    wait_for("the log to close", Duration::from_secs(10), || {
        !tmux.screen(repo).contains("hello from greet")
    });
}

#[test]
fn dash_shows_a_started_instance_and_quits_restoring_the_terminal() {
    let repo = TestRepo::new();
    run_plan(&repo);
    let Some(tmux) = Tmux::start(&repo, &dash_then_report("")) else {
        return;
    };
    tmux.wait_for_text(&repo, "Instances (0)");
    assert!(
        tmux.alternate(&repo),
        "the dashboard is not on the alternate screen"
    );
    let (_run, id) = start_instance(&repo);
    let screen = tmux.wait_for_text(&repo, &id);
    let row = screen.lines().find(|line| line.contains(&id)).unwrap();
    assert!(row.contains(&format!("app/{id}")), "no branch in {row:?}");
    assert!(screen.contains("Instances (1)"), "{screen}");
    // The event log's row reaches the timeline.
    tmux.keys(&repo, "5");
    tmux.wait_for_text(&repo, "instance.started");
    check_task_log(&repo, &tmux);
    quit_and_check_restored(&repo, &tmux);
}

#[test]
fn dash_quits_on_ctrl_c_restoring_the_terminal() {
    let repo = TestRepo::new();
    let Some(tmux) = Tmux::start(&repo, &dash_then_report("")) else {
        return;
    };
    tmux.wait_for_text(&repo, "Instances (0)");
    assert!(
        tmux.alternate(&repo),
        "the dashboard is not on the alternate screen"
    );
    tmux.keys(&repo, "C-c");
    check_restored(&repo, &tmux, 0);
}

#[test]
fn dash_panicking_after_its_first_frame_restores_the_terminal() {
    let repo = TestRepo::new();
    // The panic point fires once the first frame is drawn, in raw mode on the alternate screen.
    let command = format!(
        "APP_FAULT_POINT=dash.draw '{}' dash",
        env!("CARGO_BIN_EXE_app")
    );
    let Some(tmux) = Tmux::start(&repo, &report_after(&command)) else {
        return;
    };
    // 101: what a Rust program exits with after a panic.
    let screen = check_restored(&repo, &tmux, 101);
    // The message stays above the shell's report: nothing after the panic wrote over it.
    let line = |text: &str| screen.lines().position(|line| line.contains(text));
    let (message, report) = (line("fault point dash.draw reached"), line("dash exited"));
    assert!(
        message.is_some() && line("panicked at").is_some() && message < report,
        "the panic message is not on the normal screen, above the report:\n{screen}"
    );
}

/// A free port range of `len` ports on the loopback.
fn free_ports(len: u16) -> u16 {
    let seed = u64::from(std::process::id())
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
        );
    for attempt in 0..500u64 {
        let base = 13000 + ((seed.wrapping_mul(31).wrapping_add(attempt * 7919)) % 6000) as u16;
        if (base..base + len).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return base;
        }
    }
    panic!("no {len} free ports");
}

/// Starts `app serve --with-api --instance hub` on a free port (with `token` as its
/// `APP_API_TOKEN`, if any); returns it with its URL once it runs.
fn serve_api(repo: &TestRepo, token: Option<&str>) -> (Running, String) {
    let base = free_ports(5);
    let mut serve = repo.app(&["serve", "--with-api", "--instance", "hub"]);
    serve.env("APP_API_PORT_RANGE", format!("{base}-{}", base + 4));
    if let Some(token) = token {
        serve.env("APP_API_TOKEN", token);
    }
    let mut server = repo.spawn(serve);
    let mut url = None;
    wait_for("the API to listen", Duration::from_secs(30), || {
        server.assert_running();
        url = repo
            .instances()
            .into_iter()
            .find(|r| r.id.as_str() == "hub" && r.status.to_string() == "running")
            .and_then(|r| r.api_url);
        url.is_some()
    });
    (server, url.unwrap())
}

#[test]
fn dash_over_the_api_needs_its_token() {
    let repo = TestRepo::new();
    let (_server, url) = serve_api(&repo, Some("sesame-0123456789"));
    let refused = repo.run_app(&["dash", "--api", &url]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("refused"), "{}", stderr(&refused));
    // With the token the read succeeds; only the missing terminal stops it.
    let read = repo.run_app(&["dash", "--api", &url, "--token", "sesame-0123456789"]);
    assert_eq!(read.status.code(), Some(2), "{}", stderr(&read));
    assert!(
        stderr(&read).contains("not one; run it in a terminal"),
        "{}",
        stderr(&read)
    );
}

#[test]
fn dash_over_the_api_follows_its_events() {
    let repo = TestRepo::new();
    run_plan(&repo);
    let (_server, url) = serve_api(&repo, None);
    let Some(tmux) = Tmux::start(&repo, &dash_then_report(&format!("--api {url}"))) else {
        return;
    };
    let screen = tmux.wait_for_text(&repo, "hub");
    assert!(screen.contains(&format!("api {url}")), "{screen}");
    let (_run, id) = start_instance(&repo);
    tmux.wait_for_text(&repo, &id);
    tmux.keys(&repo, "5");
    tmux.wait_for_text(&repo, "instance.started");
    check_task_log(&repo, &tmux);
    quit_and_check_restored(&repo, &tmux);
}

#[test]
fn dash_without_a_terminal_or_with_a_bad_api_is_refused() {
    let repo = TestRepo::new();
    let piped = repo.run_app(&["dash"]);
    assert_eq!(piped.status.code(), Some(2), "{}", stderr(&piped));
    assert!(
        stderr(&piped).contains("not one; run it in a terminal"),
        "{}",
        stderr(&piped)
    );
    for bad in ["localhost:3000", "https://127.0.0.1:3000", "http://"] {
        let output = repo.run_app(&["dash", "--api", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(&format!("{bad:?}")),
            "{}",
            stderr(&output)
        );
    }
    // A port nobody listens on: out of reach, a retry may work.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let output = repo.run_app(&["dash", "--api", &url]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains(&url), "{}", stderr(&output));
}

/// `app serve --with-api --instance ID --api-addr ADDR`, once it is registered as running.
fn serve_on(repo: &TestRepo, id: &str, addr: &str) -> Running {
    let mut server = repo.spawn_app(&["serve", "--with-api", "--instance", id, "--api-addr", addr]);
    wait_for(&format!("{id} to serve"), Duration::from_secs(30), || {
        server.assert_running();
        repo.instances()
            .into_iter()
            .any(|r| r.id.as_str() == id && r.status.to_string() == "running")
    });
    server
}

/// How many lines of the events tab say `kind` of instance `id`.
fn event_lines(screen: &str, kind: &str, id: &str) -> usize {
    screen
        .lines()
        .filter(|line| {
            let mut words = line.split_whitespace().skip_while(|w| *w != kind);
            words.next().is_some() && words.next() == Some(id)
        })
        .count()
}

#[test]
fn dash_over_the_api_follows_a_restarted_server_on_the_same_port_without_losing_an_event() {
    let repo = TestRepo::new();
    let port = free_ports(1);
    let addr = format!("127.0.0.1:{port}");
    let first = serve_on(&repo, "hub", &addr);
    let url = format!("http://{addr}");
    let Some(tmux) = Tmux::start(&repo, &dash_then_report(&format!("--api {url}"))) else {
        return;
    };
    tmux.wait_for_text(&repo, "hub");
    let start = |id: &str| {
        let run = repo.spawn_app(&[
            "run",
            "--no-worktree",
            "--instance",
            id,
            "--",
            "sleep",
            "600",
        ]);
        repo.wait_running(run.pid());
        run
    };
    let _before = start("before");
    tmux.keys(&repo, "5");
    wait_for(
        "before's start on the events tab",
        Duration::from_secs(30),
        || event_lines(&tmux.screen(&repo), "instance.started", "before") == 1,
    );

    // The server goes; an instance starts while no stream is open; a new server takes the
    // same address, and the dashboard resumes after the last event it saw.
    drop(first.wait_after(Signal::SIGTERM, Duration::from_secs(30)));
    tmux.wait_for_text(&repo, "reconnecting");
    let _during = start("during");
    let _second = serve_on(&repo, "hub2", &addr);
    let mut screen = String::new();
    wait_for("during's start, replayed", Duration::from_secs(30), || {
        screen = tmux.screen(&repo);
        event_lines(&screen, "instance.started", "during") == 1
    });
    assert_eq!(
        event_lines(&screen, "instance.started", "before"),
        1,
        "once:\n{screen}"
    );
    // Live again: an instance started now shows on the events tab and in the instances.
    let _after = start("after");
    wait_for("after's start, live", Duration::from_secs(30), || {
        event_lines(&tmux.screen(&repo), "instance.started", "after") == 1
    });
    tmux.keys(&repo, "1");
    let screen = tmux.wait_for_text(&repo, "Instances (4)");
    for id in ["hub2", "before", "during", "after"] {
        assert!(screen.contains(id), "{id} listed:\n{screen}");
    }
    quit_and_check_restored(&repo, &tmux);
}
