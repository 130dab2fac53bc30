//! Rendering tests: an [`Overview`] drawn on ratatui's `TestBackend`, read back as text.

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde_json::json;

use super::*;

fn instance(id: &str, state: Option<&str>, liveness: &str, branch: &str) -> serde_json::Value {
    let agent = state.map(|state| {
        json!({ "state": state, "since": "2026-01-01T00:00:00.000Z", "reason": format!("reason of {id}") })
    });
    json!({
        "id": id, "pid": 4242, "start_time": 1, "boot_id": "boot", "host": "hosta",
        "started_at": "2026-01-01T00:00:00.000Z", "heartbeat_at": "2026-01-01T00:00:00.000Z",
        "worktree": null, "cwd": "/tmp", "branch": branch, "base": null,
        "command": ["sleep", "600"], "child_pid": 4243, "child_start_time": 2,
        "status": "running", "ports": [20001],
        "liveness": liveness, "reason": if liveness == "live" { None } else { Some("supervisor gone") },
        "agent": agent,
        "progress": { "ahead": 2, "behind": 1,
            "committed": { "files": 1, "insertions": 10, "deletions": 2 },
            "uncommitted": { "files": 2, "insertions": 5, "deletions": 0 } },
        "run": null, "task": null
    })
}

fn task(id: &str, deps: &[&str], status: &str) -> serde_json::Value {
    json!({
        "id": id, "depends_on": deps, "status": status, "attempts": 1,
        "started_at": "2026-01-01T00:00:00.000Z", "finished_at": "2026-01-01T00:00:12.000Z",
        "exit_code": null, "branch": format!("run/{id}"), "instance": null, "detail": null
    })
}

/// Three instances in different states, a run of three tasks (two waves), a lock with a
/// holder, a reservation, a dead letter, a finding and a needs-input attention item.
fn overview() -> Overview {
    serde_json::from_value(json!({
        "generated_at": "2026-01-01T00:00:00.000Z",
        "repo_root": "/work/repo",
        "host": { "name": "hosta", "load": [0.5, 0.25, 0.125],
            "mem_total_bytes": 8_589_934_592u64, "mem_available_bytes": 4_294_967_296u64,
            "disk_total_bytes": 107_374_182_400u64, "disk_free_bytes": 53_687_091_200u64,
            "db_kind": "file", "db_latency_ms": 1.5 },
        "attention": [{ "kind": "needs-input", "subject": "aaaa0001",
            "text": "said: waiting for review", "since": null }],
        "instances": [
            instance("aaaa0001", Some("needs-input"), "live", "app/aaaa0001"),
            instance("bbbb0002", Some("working"), "live", "app/bbbb0002"),
            instance("cccc0003", None, "stale", "app/cccc0003"),
        ],
        "runs": [{ "id": "run0123456789", "name": "build-all", "host": "hosta",
            "status": "running", "started_at": "2026-01-01T00:00:00.000Z", "finished_at": null,
            "tasks": [
                task("fetch", &[], "succeeded"),
                task("compile", &["fetch"], "running"),
                task("lint", &["fetch"], "pending"),
            ] }],
        "locks": [{ "name": "db-schema", "token": 7,
            "holder": { "instance": "bbbb0002", "pid": 4242, "start_time": 1, "boot_id": "b", "host": "hosta" },
            "acquired_at": "2026-01-01T00:00:00.000Z", "expires_at": null,
            "lapsed": null, "waiters": ["aaaa0001"], "scope": "local" }],
        "reservations": [{ "id": "res00001",
            "holder": { "instance": "aaaa0001", "pid": 4242, "start_time": 1, "boot_id": "b", "host": "hosta" },
            "patterns": ["src/**"], "shared": false, "reason": "refactor",
            "created_at": "2026-01-01T00:00:00.000Z", "expires_at": null,
            "lapsed": null, "scope": "local" }],
        "messages": [{ "id": "0000000000010000dead", "from": "aaaa0001", "to": "bbbb0002",
            "recipient": "bbbb0002", "type": "text", "timestamp": "2026-01-01T00:00:00.000Z",
            "ttl": 1000, "payload": "hello there", "state": "dead" }],
        "findings": [{ "kind": "stale-lock", "subject": "old-lock", "problem": "holder is gone",
            "fix": "app doctor --fix", "fixable": true }],
    }))
    .expect("the overview's JSON parses")
}

fn render(dash: &Dash, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| dash.draw(frame)).unwrap();
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..buffer.area.height {
        for x in 0..buffer.area.width {
            text.push_str(buffer[(x, y)].symbol());
        }
        text.push('\n');
    }
    text
}

fn press(dash: &mut Dash, code: KeyCode) -> Action {
    dash.key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn dash() -> Dash {
    let mut dash = Dash::new("local".into());
    dash.set_overview(overview());
    dash
}

#[test]
fn instances_show_each_state_and_the_attention_strip_is_on_top() {
    let screen = render(&dash(), 160, 30);
    for expected in [
        "aaaa0001",
        "needs-input",
        "bbbb0002",
        "working",
        "cccc0003",
        "stale",
        "3f +15 -2",
        "2/1",
        "said: waiting for review",
    ] {
        assert!(
            screen.contains(expected),
            "{expected:?} missing from\n{screen}"
        );
    }
    let attention = screen.find("Attention").unwrap();
    let table = screen.find("Instances (3)").unwrap();
    assert!(
        attention < table,
        "the strip is not above the body:\n{screen}"
    );
}

#[test]
fn runs_tab_shows_the_task_graph_by_wave() {
    let mut dash = dash();
    press(&mut dash, KeyCode::Char('2'));
    assert_eq!(dash.tab(), Tab::Runs);
    let screen = render(&dash, 160, 30);
    let line = |task: &str| {
        screen
            .lines()
            .find(|line| line.contains(task) && line.contains("wave"))
            .unwrap_or_else(|| panic!("no line for {task} in\n{screen}"))
            .to_string()
    };
    assert!(screen.contains("run run0123456789 build-all"), "{screen}");
    assert!(line("fetch").contains("wave 1") && line("fetch").contains("succeeded"));
    assert!(line("compile").contains("wave 2") && line("compile").contains("running"));
    assert!(line("compile").contains("after fetch") && line("compile").contains("12s"));
    assert!(line("lint").contains("wave 2") && line("lint").contains("pending"));
    // The instances are not in this tab; the attention strip still is.
    assert!(!screen.contains("cccc0003"), "{screen}");
    assert!(screen.contains("said: waiting for review"), "{screen}");
}

#[test]
fn enter_on_a_task_asks_for_its_log_and_esc_closes_it() {
    let mut dash = dash();
    press(&mut dash, KeyCode::Char('2'));
    press(&mut dash, KeyCode::Char('j'));
    let action = press(&mut dash, KeyCode::Enter);
    assert_eq!(
        action,
        Action::OpenLog {
            run: "run0123456789".into(),
            task: "compile".into()
        }
    );
    dash.show_log(
        "log compile".into(),
        "line one\nlast line of the log\n".into(),
    );
    let screen = render(&dash, 120, 30);
    assert!(screen.contains("last line of the log"), "{screen}");
    // Esc closes the log first; only the next one quits.
    assert_eq!(press(&mut dash, KeyCode::Esc), Action::None);
    assert!(!render(&dash, 120, 30).contains("last line of the log"));
    assert_eq!(press(&mut dash, KeyCode::Esc), Action::Quit);
}

#[test]
fn locks_tab_shows_the_holder_and_waiters() {
    let mut dash = dash();
    press(&mut dash, KeyCode::Char('3'));
    let screen = render(&dash, 160, 30);
    for expected in [
        "db-schema",
        "instance bbbb0002 (pid 4242)",
        "aaaa0001",
        "res00001",
        "src/**",
        "exclusive",
    ] {
        assert!(
            screen.contains(expected),
            "{expected:?} missing from\n{screen}"
        );
    }
}

#[test]
fn tab_and_back_tab_cycle_through_every_tab() {
    let mut dash = dash();
    let titles = [
        "Instances (3)",
        "Runs (1)",
        "Locks (1)",
        "Messages (1)",
        "Events (0)",
        "Doctor's findings (1)",
    ];
    for title in titles {
        assert!(
            render(&dash, 160, 30).contains(title),
            "{title:?} not shown"
        );
        press(&mut dash, KeyCode::Tab);
    }
    assert_eq!(dash.tab(), Tab::Instances);
    press(&mut dash, KeyCode::BackTab);
    assert_eq!(dash.tab(), Tab::Host);
    let screen = render(&dash, 160, 30);
    assert!(
        screen.contains("0.50 0.25 0.12") && screen.contains("4.0 GiB free of 8.0 GiB"),
        "{screen}"
    );
    press(&mut dash, KeyCode::Char('4'));
    let screen = render(&dash, 160, 30);
    assert!(
        screen.contains("hello there") && screen.contains("dead"),
        "{screen}"
    );
}

#[test]
fn events_are_listed_newest_first_once_each() {
    let mut dash = dash();
    for (id, kind) in [
        (1, "instance.started"),
        (2, "instance.stopped"),
        (2, "instance.stopped"),
    ] {
        dash.push_event(EventLine {
            id: Some(id),
            at: format!("2026-01-01T00:00:0{id}.000Z"),
            kind: kind.into(),
            instance: Some("aaaa0001".into()),
            detail: "{}".into(),
        });
    }
    press(&mut dash, KeyCode::Char('5'));
    let screen = render(&dash, 160, 30);
    assert!(screen.contains("Events (2)"), "{screen}");
    let started = screen.find("instance.started").unwrap();
    let stopped = screen.find("instance.stopped").unwrap();
    assert!(stopped < started, "{screen}");
}

#[test]
fn quit_keys_and_selection_stay_inside_the_rows() {
    let mut dash = dash();
    for _ in 0..10 {
        press(&mut dash, KeyCode::Down);
    }
    assert_eq!(dash.selection(Tab::Instances), 2);
    for _ in 0..10 {
        press(&mut dash, KeyCode::Char('k'));
    }
    assert_eq!(dash.selection(Tab::Instances), 0);
    assert_eq!(press(&mut dash, KeyCode::Char('q')), Action::Quit);
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(dash.key(ctrl_c), Action::Quit);
}

#[test]
fn tiny_and_narrow_terminals_do_not_panic() {
    let mut dash = dash();
    for (width, height) in [(1, 1), (10, 3), (20, 50), (40, 8), (0, 0)] {
        dash.show_log("log".into(), "a\nb\n".into());
        render(&dash, width, height);
        press(&mut dash, KeyCode::Esc);
        for _ in Tab::ALL {
            render(&dash, width, height);
            press(&mut dash, KeyCode::Tab);
        }
    }
    render(&Dash::new("empty".into()), 5, 5);
}

#[test]
fn waves_follow_the_dependencies() {
    let tasks: Vec<TaskView> = [
        task("a", &[], "pending"),
        task("b", &["a"], "pending"),
        task("c", &["b", "a"], "pending"),
        task("d", &["missing"], "pending"),
    ]
    .into_iter()
    .map(|t| serde_json::from_value(t).unwrap())
    .collect();
    assert_eq!(waves(&tasks), vec![1, 2, 3, 1]);
}
