//! `app instance list | info | stop` and `app whoami` against real running instances.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{TestRepo, code, kill, stderr, stdout, wait_for};

#[test]
fn list_prints_live_instances_oldest_first_in_every_format() {
    let repo = TestRepo::new();
    let first = repo.spawn_app(&["run", "--instance", "first", "--", "sleep", "30"]);
    repo.wait_running(first.pid());
    let second = repo.spawn_app(&["run", "--", "sleep", "30"]);
    let second_record = repo.wait_running(second.pid());

    let output = repo.run_app(&["instance", "list"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        format!(
            "first:{}\n{}:{}\n",
            first.pid(),
            second_record.id,
            second.pid()
        )
    );

    let long = stdout(&repo.run_app(&["instance", "list", "--long"]));
    let header = long.lines().next().unwrap();
    for column in [
        "ID",
        "PID",
        "STATUS",
        "AGE",
        "HEARTBEAT",
        "BRANCH",
        "WORKTREE",
        "COMMAND",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(long.contains("app/first") && long.contains("running") && long.contains("sleep 30"));

    let json: serde_json::Value =
        serde_json::from_str(&stdout(&repo.run_app(&["instance", "list", "--json"]))).unwrap();
    let items = json.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], "first");
    assert_eq!(items[0]["liveness"], "live");
    assert_eq!(items[0]["pid"], first.pid());

    let info = repo.run_app(&["instance", "info", "first"]);
    assert_eq!(code(&info), 0);
    assert!(
        stdout(&info).contains("state:      live (running)"),
        "{}",
        stdout(&info)
    );
    let info_json: serde_json::Value = serde_json::from_str(&stdout(
        &repo.run_app(&["instance", "info", "first", "--json"]),
    ))
    .unwrap();
    assert_eq!(info_json["branch"], "app/first");

    // Outside any repository-relative path: list works from a subdirectory too.
    let mut sub = repo.app(&["instance", "list"]);
    sub.current_dir(repo.root().join("src"));
    assert_eq!(stdout(&sub.output().unwrap()).lines().count(), 2);

    kill(first.pid(), Signal::SIGTERM);
    kill(second.pid(), Signal::SIGTERM);
    first.wait(Duration::from_secs(20));
    second.wait(Duration::from_secs(20));
    assert_eq!(stdout(&repo.run_app(&["instance", "list", "--all"])), "");
}

#[test]
fn a_frozen_instance_turns_stale_once_its_heartbeat_ages() {
    let repo = TestRepo::new();
    let run = repo.spawn_app(&["run", "--instance", "frozen", "--", "sleep", "30"]);
    let record = repo.wait_running(run.pid());
    // SIGSTOP keeps pid and start time but stops the heartbeat.
    kill(run.pid(), Signal::SIGSTOP);
    wait_for("the heartbeat to age", Duration::from_secs(20), || {
        let output = repo
            .app(&["instance", "list", "--all"])
            .env("APP_STALE_AFTER", "1s")
            .output()
            .unwrap();
        stdout(&output).contains("frozen") && stdout(&output).contains("stale (last heartbeat")
    });
    let live = repo
        .app(&["instance", "list"])
        .env("APP_STALE_AFTER", "1s")
        .output()
        .unwrap();
    assert_eq!(stdout(&live), "", "a stale instance is not listed as live");
    // With the default stale limit it is still live.
    assert!(stdout(&repo.run_app(&["instance", "list"])).contains("frozen"));

    kill(run.pid(), Signal::SIGCONT);
    kill(run.pid(), Signal::SIGTERM);
    run.wait(Duration::from_secs(20));
    assert!(!record.worktree.unwrap().exists());
}

#[test]
fn a_killed_run_is_stale_and_its_work_stays() {
    let repo = TestRepo::new();
    let run = repo.spawn_app(&[
        "run",
        "--instance",
        "crashed",
        "--",
        "sh",
        "-c",
        "echo wip > wip.txt; exec sleep 30",
    ]);
    let record = repo.wait_running(run.pid());
    let worktree = record.worktree.clone().unwrap();
    wait_for(
        "the command to write its file",
        Duration::from_secs(10),
        || worktree.join("wip.txt").exists(),
    );
    kill(run.pid(), Signal::SIGKILL);
    // The orphaned command holds app's stderr open: end it too before collecting app.
    kill(record.child_pid.unwrap(), Signal::SIGKILL);
    run.wait(Duration::from_secs(10));

    let all = stdout(&repo.run_app(&["instance", "list", "--all"]));
    assert!(
        all.contains(&format!(
            "crashed:{} stale (pid {} is gone)",
            record.pid, record.pid
        )),
        "{all}"
    );
    assert_eq!(stdout(&repo.run_app(&["instance", "list"])), "");
    assert_eq!(
        std::fs::read_to_string(worktree.join("wip.txt")).unwrap(),
        "wip\n"
    );

    // A stale holder does not block the name; its kept worktree is picked up again.
    let output = repo.run_app(&["run", "--instance", "crashed", "--", "cat", "wip.txt"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "wip\n");
}

#[test]
fn stop_terminates_politely_then_forces() {
    let repo = TestRepo::new();
    let run = repo.spawn_app(&["run", "--instance", "polite", "--", "sleep", "30"]);
    let record = repo.wait_running(run.pid());
    let output = repo.run_app(&["instance", "stop", "polite"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stderr(&output).contains("stopped"));
    assert_eq!(code(&run.wait(Duration::from_secs(20))), 143);
    assert!(!record.worktree.unwrap().exists());

    let run = repo.spawn_app(&[
        "run",
        "--instance",
        "stubborn",
        "--",
        "sh",
        "-c",
        "trap '' TERM; while :; do sleep 0.1; done",
    ]);
    let record = repo.wait_running(run.pid());
    let output = repo.run_app(&["instance", "stop", "stubborn", "--timeout", "500ms"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stderr(&output).contains("killed"), "{}", stderr(&output));
    assert_eq!(code(&run.wait(Duration::from_secs(20))), 137);
    assert!(
        !record.worktree.unwrap().exists(),
        "the supervisor still cleaned up"
    );
    assert!(repo.instances().is_empty());

    let output = repo.run_app(&["instance", "stop", "polite"]);
    assert_eq!(code(&output), 2, "gone instance is unknown");
}

#[test]
fn whoami_names_the_instance_of_the_current_worktree() {
    let repo = TestRepo::new();
    let output = repo
        .app(&[
            "run",
            "--instance",
            "me",
            "--",
            "sh",
            "-c",
            "cd src && \"$APP_BIN\" whoami",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "me\n");

    let outside = repo.run_app(&["whoami"]);
    assert_eq!(code(&outside), 1);
    assert_eq!(stdout(&outside), "");
}

#[test]
fn an_invalid_id_is_refused_as_bad_input_by_info_exec_and_stop() {
    let repo = TestRepo::new();
    for id in ["", "Not-An-Id", "../escape", "a b"] {
        for args in [
            &["instance", "info", id][..],
            &["instance", "info", id, "--json"],
            &["instance", "exec", id, "--", "true"],
            &["instance", "stop", id],
        ] {
            let output = repo.run_app(args);
            let err = stderr(&output);
            assert_eq!(code(&output), 2, "{args:?}: {err}");
            assert!(
                err.starts_with(&format!("app: invalid instance name {id:?}")),
                "{args:?}: {err}"
            );
        }
    }
    assert!(!repo.state_dir().exists(), "refusing created .app/");
}
