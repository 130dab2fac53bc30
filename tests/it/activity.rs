//! Agent state and progress (docs/AGENT-STATE.md): real commands under a real supervisor,
//! read back through `app instance list --json` and checked against git itself.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Running, TestRepo, code, stderr, stdout, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);

/// `app run --instance ID [ARGS] -- CMD` with short activity timings.
fn start(repo: &TestRepo, id: &str, extra: &[&str], command: &[&str]) -> Running {
    let mut args = vec!["run", "--instance", id];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    let mut cmd = repo.app(&args);
    cmd.env("APP_ACTIVITY_INTERVAL", "200ms")
        .env("APP_IDLE_AFTER", "1s")
        .env("APP_STUCK_AFTER", "1s");
    repo.spawn(cmd)
}

/// The `agent` and `progress` of instance `id`, as `app instance list --json` shows them.
fn listed(repo: &TestRepo, id: &str) -> Option<(Value, Value)> {
    let output = repo.run_app(&["instance", "list", "--json"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let rows: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    let row = rows.into_iter().find(|row| row["id"] == id)?;
    assert!(row.get("pid").is_some(), "the existing keys stay: {row}");
    Some((row["agent"].clone(), row["progress"].clone()))
}

/// Waits until instance `id`'s agent state is `state` with a reason `reason` accepts.
fn wait_state(repo: &TestRepo, id: &str, state: &str, reason: impl Fn(&str) -> bool) -> Value {
    let mut last = Value::Null;
    wait_for(&format!("{id} to read {state}"), DEADLINE, || {
        if let Some((agent, _)) = listed(repo, id) {
            last = agent;
        }
        last["state"] == state && reason(last["reason"].as_str().unwrap_or(""))
    });
    last
}

#[test]
fn a_busy_loop_reads_working_and_a_sleep_idle() {
    let repo = TestRepo::new();
    let _busy = start(&repo, "busy", &[], &["sh", "-c", "while :; do :; done"]);
    let _sleepy = start(&repo, "sleepy", &[], &["sleep", "600"]);
    let busy = wait_state(&repo, "busy", "working", |r| r.starts_with("cpu "));
    assert!(busy["since"].is_string(), "{busy}");
    let idle = wait_state(&repo, "sleepy", "idle", |r| r.starts_with("no cpu"));
    assert!(idle["since"].is_string(), "{idle}");
    let long = repo.run_app(&["instance", "list", "--long"]);
    let text = stdout(&long);
    let header = text.lines().next().unwrap();
    let words: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(words[words.len() - 2..], ["STATE", "PROGRESS"], "{text}");
    let sleepy = text.lines().find(|l| l.starts_with("sleepy")).unwrap();
    assert!(sleepy.contains(" idle "), "{text}");
}

#[test]
fn app_status_from_inside_reads_needs_input_until_reported_working() {
    let repo = TestRepo::new();
    let script = r#""$APP_BIN" status needs-input "waiting for review" && exec sleep 600"#;
    let _run = start(&repo, "asker", &[], &["sh", "-c", script]);
    let agent = wait_state(&repo, "asker", "needs-input", |r| {
        r == "said: waiting for review"
    });
    assert!(agent["since"].is_string());
    // From outside, naming the instance.
    let output = repo.run_app(&[
        "status",
        "working",
        "--instance",
        "asker",
        "back",
        "at",
        "it",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    wait_state(&repo, "asker", "working", |r| r == "said: back at it");
    let info = repo.run_app(&["instance", "info", "asker"]);
    assert!(stdout(&info).contains("working since"), "{}", stdout(&info));
}

#[test]
fn an_idle_lock_holder_past_the_threshold_is_stuck() {
    let repo = TestRepo::new();
    let _run = start(&repo, "holder", &["--lock", "db"], &["sleep", "600"]);
    let agent = wait_state(&repo, "holder", "stuck", |r| r.contains("holding lock db"));
    assert!(
        agent["reason"].as_str().unwrap().starts_with("idle for"),
        "{agent}"
    );
}

#[test]
fn an_ended_command_reads_exited_and_its_files_go_with_the_instance() {
    let repo = TestRepo::new();
    // The background sleep ignores SIGTERM, so the instance outlives its command for the
    // stop timeout (until SIGKILL): long enough to be seen exited.
    let script = r#"trap "" TERM; sleep 600 & exit 0"#;
    let run = start(
        &repo,
        "ender",
        &["--stop-timeout", "5s"],
        &["sh", "-c", script],
    );
    wait_state(&repo, "ender", "exited", |r| r == "the command ended");
    let file = repo.paths().activity("ender");
    assert!(file.exists());
    let output = run.wait(DEADLINE);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(!file.exists(), "removed when the instance ended");
}

/// `N files changed, I insertions(+), D deletions(-)` as numbers (missing parts are 0).
fn shortstat(text: &str) -> (u64, u64, u64) {
    let mut numbers = (0, 0, 0);
    for part in text.trim().split(", ") {
        let n: u64 = part.split(' ').next().unwrap_or("0").parse().unwrap_or(0);
        if part.contains("file") {
            numbers.0 = n;
        } else if part.contains("insertion") {
            numbers.1 = n;
        } else if part.contains("deletion") {
            numbers.2 = n;
        }
    }
    numbers
}

fn stat(progress: &Value, which: &str) -> (u64, u64, u64) {
    let s = &progress[which];
    let n = |k: &str| s[k].as_u64().unwrap();
    (n("files"), n("insertions"), n("deletions"))
}

#[test]
fn progress_counts_what_git_counts() {
    let repo = TestRepo::new();
    std::fs::write(repo.root().join("a.txt"), "one\ntwo\nthree\n").unwrap();
    repo.git(&["add", "a.txt"]);
    repo.git(&["commit", "-q", "-m", "a"]);
    let _run = start(&repo, "prog", &[], &["sleep", "600"]);
    let record = repo.wait_running(_run.pid());
    let worktree = record.worktree.clone().unwrap();
    let base = record.base.clone().unwrap();
    // Committed: one change and one new file; then on main, a commit it does not have.
    std::fs::write(worktree.join("a.txt"), "one\n2\nthree\nfour\n").unwrap();
    std::fs::write(worktree.join("b.txt"), "b\n").unwrap();
    repo.git_in(&worktree, &["add", "-A"]);
    repo.git_in(&worktree, &["commit", "-q", "-m", "work"]);
    std::fs::write(repo.root().join("main.txt"), "m\n").unwrap();
    repo.git(&["add", "main.txt"]);
    repo.git(&["commit", "-q", "-m", "main moves on"]);
    // Uncommitted: an edit, a deletion of a line, a new untracked file in a new directory.
    std::fs::write(worktree.join("a.txt"), "one\nthree\nfour\nfive\nsix\n").unwrap();
    std::fs::create_dir(worktree.join("new")).unwrap();
    std::fs::write(worktree.join("new/c.txt"), "c1\nc2\n").unwrap();

    let ahead: u64 = repo
        .git_in(
            &worktree,
            &["rev-list", "--count", &format!("{base}..HEAD")],
        )
        .trim()
        .parse()
        .unwrap();
    let behind: u64 = repo
        .git_in(&worktree, &["rev-list", "--count", "HEAD..main"])
        .trim()
        .parse()
        .unwrap();
    let committed = shortstat(&repo.git_in(&worktree, &["diff", "--shortstat", &base, "HEAD"]));
    // Untracked files count as `git add -A` would add them: on a copy of the index.
    let index = repo.scratch().join("index");
    let admin = repo.git_in(&worktree, &["rev-parse", "--git-dir"]);
    std::fs::copy(std::path::Path::new(admin.trim()).join("index"), &index).unwrap();
    let git_with_index = |args: &[&str]| {
        let output = repo
            .command("git")
            .args(args)
            .current_dir(&worktree)
            .env("GIT_INDEX_FILE", &index)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    git_with_index(&["add", "-A"]);
    let uncommitted = shortstat(&git_with_index(&[
        "diff",
        "--cached",
        "--shortstat",
        "HEAD",
    ]));
    assert_eq!((ahead, behind), (1, 1));
    assert_eq!(committed, (2, 3, 1));
    assert_eq!(uncommitted, (2, 4, 1));

    let mut last = Value::Null;
    wait_for("the progress to match git", DEADLINE, || {
        last = listed(&repo, "prog").map(|(_, p)| p).unwrap_or_default();
        last.is_object()
            && last["ahead"] == ahead
            && last["behind"] == behind
            && stat(&last, "committed") == committed
            && stat(&last, "uncommitted") == uncommitted
    });
    let info = stdout(&repo.run_app(&["instance", "info", "prog"]));
    assert!(
        info.contains("progress:") && info.contains("1 ahead, 1 behind"),
        "{info}"
    );
    // An edit undone: the file drops out of the uncommitted count.
    std::fs::remove_file(worktree.join("new/c.txt")).unwrap();
    wait_for("the undone file to drop out", DEADLINE, || {
        last = listed(&repo, "prog").map(|(_, p)| p).unwrap_or_default();
        last.is_object() && stat(&last, "uncommitted") == (1, 2, 1)
    });
}

#[test]
fn app_status_outside_an_instance_or_with_a_bad_word_is_refused() {
    let repo = TestRepo::new();
    let output = repo.run_app(&["status", "idle"]);
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--instance"),
        "{}",
        stderr(&output)
    );
    let output = repo.run_app(&["status", "sleepy"]);
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert!(stderr(&output).contains("working, idle, needs-input"));
    let output = repo.run_app(&["status", "idle", "--instance", "nobody"]);
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert!(!repo.paths().activity_dir().exists(), "nothing was written");
}
