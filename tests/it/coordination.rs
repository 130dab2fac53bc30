//! Messages, locks and path reservations between real processes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{Running, TestRepo, code, kill, stderr, stdout, wait_for};

/// Registers instance `name` (no worktree) with a long-lived command.
fn register(repo: &TestRepo, name: &str) -> Running {
    let run = repo.spawn_app(&[
        "run",
        "--no-worktree",
        "--instance",
        name,
        "--",
        "sleep",
        "300",
    ]);
    repo.wait_running(run.pid());
    run
}

/// `app` with `args`, acting as instance `id`.
fn app_as(repo: &TestRepo, id: &str, args: &[&str]) -> std::process::Output {
    repo.app(args)
        .env("APP_INSTANCE_ID", id)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn sixteen_processes_take_turns_on_one_lock_with_growing_tokens() {
    let repo = TestRepo::new();
    let log = repo.scratch().join("critical.log");
    let script = format!(
        r#"for i in $(seq 50); do
             "$APP_BIN" lock run shared-lock -- sh -c 'echo "start $APP_LOCK_TOKEN" >> {log}; echo "end $APP_LOCK_TOKEN" >> {log}' || exit 1
           done"#,
        log = log.display()
    );
    let workers: Vec<Running> = (0..16)
        .map(|_| {
            let mut command = repo.command("sh");
            command.args(["-c", &script]);
            repo.spawn(command)
        })
        .collect();
    for worker in workers {
        let output = worker.wait(Duration::from_secs(600));
        assert_eq!(code(&output), 0, "{}", stderr(&output));
    }
    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 16 * 50 * 2);
    let mut last = 0u64;
    for pair in lines.chunks(2) {
        let start: u64 = pair[0].strip_prefix("start ").unwrap().parse().unwrap();
        assert_eq!(
            pair[1],
            format!("end {start}"),
            "critical sections overlap: {pair:?}"
        );
        assert!(start > last, "token {start} after {last}: tokens must grow");
        last = start;
    }
}

#[test]
fn a_holder_killed_with_sigkill_loses_the_lock_to_the_next_acquirer() {
    let repo = TestRepo::new();
    let holder = repo.spawn_app(&["lock", "run", "db-schema", "--", "sleep", "300"]);
    wait_for("the lock to be held", Duration::from_secs(30), || {
        stdout(&repo.run_app(&["lock", "list"])).contains("db-schema held by process")
    });
    let output = repo.run_app(&["lock", "acquire", "db-schema", "--timeout", "300ms"]);
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("held by process {}", holder.pid())),
        "names the holder: {}",
        stderr(&output)
    );

    holder.kill_now();
    let output = repo.run_app(&["lock", "acquire", "db-schema", "--timeout", "10s"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(
        stdout(&output).trim(),
        "2",
        "the next grant has the next token"
    );
}

#[test]
fn a_lock_taken_in_a_command_substitution_is_held_by_the_calling_shell() {
    let repo = TestRepo::new();
    let scratch = repo.scratch();
    // For a $(...) that is more than one simple command, bash forks a subshell that runs
    // `app` and ends at once; the shell that asked goes on.
    let script = format!(
        "take() {{ tok=$(\"$APP_BIN\" lock acquire db-schema || echo failed); }}\n\
         for i in 1; do take; done\n\
         echo \"$tok\" > {0}/token; echo $$ > {0}/shell\n\
         sleep 300\n",
        scratch.display()
    );
    let mut shell = repo.command("bash");
    shell.args(["-c", &script]);
    let shell = repo.spawn(shell);
    wait_for(
        "the shell to take the lock",
        Duration::from_secs(30),
        || scratch.join("shell").exists(),
    );
    assert_eq!(fs::read_to_string(scratch.join("token")).unwrap(), "1\n");
    let pid = fs::read_to_string(scratch.join("shell")).unwrap();
    let output = repo.run_app(&["lock", "acquire", "db-schema", "--timeout", "300ms"]);
    assert_eq!(code(&output), 3, "still held: {}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("held by process {}", pid.trim())),
        "the shell holds it: {}",
        stderr(&output)
    );
    shell.kill_now();
    let output = repo.run_app(&["lock", "acquire", "db-schema", "--timeout", "10s"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
}

#[test]
fn an_instance_holds_its_lock_beyond_the_call_and_loses_it_when_it_dies() {
    let repo = TestRepo::new();
    let run = repo.spawn_app(&[
        "run",
        "--no-worktree",
        "--instance",
        "owner",
        "--",
        "sh",
        "-c",
        "\"$APP_BIN\" lock acquire build-cache --ttl 1h && sleep 300",
    ]);
    wait_for(
        "the instance to hold the lock",
        Duration::from_secs(30),
        || stdout(&repo.run_app(&["lock", "list"])).contains("held by instance owner"),
    );
    let output = repo.run_app(&["lock", "release", "build-cache"]);
    assert_eq!(
        code(&output),
        3,
        "only the holder releases: {}",
        stderr(&output)
    );

    run.kill_now();
    let output = repo.run_app(&["lock", "acquire", "build-cache", "--timeout", "10s"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
}

#[test]
fn acquiring_a_held_lock_again_renews_its_ttl_and_keeps_its_token() {
    let repo = TestRepo::new();
    let _owner = register(&repo, "owner");
    let held = |repo: &TestRepo| -> serde_json::Value {
        let list = repo.run_app(&["lock", "list", "--json"]);
        let all: serde_json::Value = serde_json::from_str(&stdout(&list)).unwrap();
        all[0].clone()
    };
    let expiry = |state: &serde_json::Value| {
        humantime::parse_rfc3339(state["expires_at"].as_str().unwrap()).unwrap()
    };
    let first = app_as(&repo, "owner", &["lock", "acquire", "gpu", "--ttl", "1m"]);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let before = held(&repo);
    let again = app_as(&repo, "owner", &["lock", "acquire", "gpu", "--ttl", "2h"]);
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert_eq!(stdout(&again), stdout(&first), "the same token");
    let after = held(&repo);
    assert_eq!(after["token"], before["token"]);
    let longer = expiry(&after).duration_since(expiry(&before)).unwrap();
    assert!(longer > Duration::from_secs(3600), "{before}\n{after}");
    // Without a ttl the hold keeps the expiry it has.
    let plain = app_as(&repo, "owner", &["lock", "acquire", "gpu"]);
    assert_eq!(code(&plain), 0, "{}", stderr(&plain));
    assert_eq!(held(&repo)["expires_at"], after["expires_at"]);
}

#[test]
fn messages_arrive_once_each_through_receiver_crashes_and_expire_to_dead() {
    let repo = TestRepo::new();
    let receivers = ["r0", "r1", "r2", "r3"];
    let _instances: Vec<Running> = receivers.iter().map(|r| register(&repo, r)).collect();
    let out_dir = repo.scratch();
    let start_receiver = |name: &str, generation: usize| {
        let mut command = repo.app(&["recv", "--instance", name, "--follow", "--json"]);
        let file = fs::File::create(out_dir.join(format!("{name}.{generation}.jsonl"))).unwrap();
        command.stdout(file);
        use std::os::unix::process::CommandExt;
        command.process_group(0).stdin(std::process::Stdio::null());
        command.spawn().unwrap()
    };
    let mut running: BTreeMap<&str, std::process::Child> = receivers
        .iter()
        .map(|name| (*name, start_receiver(name, 0)))
        .collect();

    // 8 senders x 200 messages, each 25th a broadcast.
    let senders: Vec<Running> = (0..8)
        .map(|s| {
            let script = format!(
                r#"for i in $(seq 200); do
                     if [ $((i % 25)) -eq 0 ]; then to=all; else to=r$((i % 4)); fi
                     "$APP_BIN" send --from s{s} --to $to "s{s}-$i" >/dev/null || exit 1
                   done"#
            );
            let mut command = repo.command("sh");
            command.args(["-c", &script]);
            repo.spawn(command)
        })
        .collect();
    // Crash every receiver twice while the senders run.
    let mut kills = 0;
    for generation in 1..=2 {
        std::thread::sleep(Duration::from_millis(700));
        for name in receivers {
            let mut child = running.remove(name).unwrap();
            kill(child.id(), Signal::SIGKILL);
            let _ = child.wait();
            kills += 1;
            running.insert(name, start_receiver(name, generation));
        }
    }
    for sender in senders {
        let output = sender.wait(Duration::from_secs(600));
        assert_eq!(code(&output), 0, "{}", stderr(&output));
    }
    let received = |name: &str| -> Vec<String> {
        (0..=2)
            .flat_map(|generation| {
                fs::read_to_string(out_dir.join(format!("{name}.{generation}.jsonl")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|line| line.ends_with('}'))
                    .map(|line| {
                        let message: serde_json::Value = serde_json::from_str(line).unwrap();
                        message["payload"].as_str().unwrap().to_string()
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let expected = |r: usize| -> BTreeSet<String> {
        (0..8)
            .flat_map(|s| {
                (1..=200)
                    .filter(move |i| i % 25 == 0 || i % 4 == r)
                    .map(move |i| format!("s{s}-{i}"))
            })
            .collect()
    };
    for (r, name) in receivers.iter().enumerate() {
        let want = expected(r);
        wait_for("every message to arrive", Duration::from_secs(120), || {
            received(name).into_iter().collect::<BTreeSet<_>>() == want
        });
        let got = received(name);
        let duplicates = got.len() - want.len();
        assert!(
            duplicates <= 2,
            "{name}: {duplicates} messages twice, more than its 2 crashes explain"
        );
        assert!(
            fs::read_dir(repo.state_dir().join("coordination_queue/inbox").join(name))
                .unwrap()
                .next()
                .is_none(),
            "{name}: everything was acknowledged"
        );
    }
    assert_eq!(kills, 8);
    for (_, mut child) in running {
        kill(child.id(), Signal::SIGKILL);
        let _ = child.wait();
    }

    // An unacknowledged message past its TTL goes to dead/ with the reason.
    let _idle = register(&repo, "idle");
    let output = repo.run_app(&[
        "send", "--from", "s0", "--to", "idle", "--ttl", "200ms", "late",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let id = stdout(&output).trim().to_string();
    std::thread::sleep(Duration::from_millis(400));
    let output = repo.run_app(&["recv", "--instance", "idle"]);
    assert_eq!(code(&output), 1, "nothing to deliver: {}", stderr(&output));
    let dead = repo
        .state_dir()
        .join(format!("coordination_queue/dead/idle-{id}.json"));
    let record: serde_json::Value = serde_json::from_slice(&fs::read(dead).unwrap()).unwrap();
    assert!(record["reason"].as_str().unwrap().contains("TTL"));
    assert_eq!(record["message"]["payload"], "late");
}

#[test]
fn untrusted_message_files_are_quarantined_and_never_delivered() {
    let repo = TestRepo::new();
    let _instance = register(&repo, "target");
    // A real message first, so the inbox and the secret exist.
    let output = repo.run_app(&["send", "--from", "x", "--to", "target", "genuine"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let genuine_id = stdout(&output).trim().to_string();
    let inbox = repo.state_dir().join("coordination_queue/inbox/target");
    let genuine = fs::read_to_string(inbox.join(format!("{genuine_id}.json"))).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&genuine).unwrap();

    fs::write(inbox.join("01a0000000000000garb.json"), "not json at all").unwrap();
    fs::write(
        inbox.join("01a0000000000000huge.json"),
        "x".repeat(64 * 1024),
    )
    .unwrap();
    value["payload"] = "forged".into();
    value["id"] = "01a0000000000000forg".into();
    fs::write(inbox.join("01a0000000000000forg.json"), value.to_string()).unwrap();
    value.as_object_mut().unwrap().remove("signature");
    value["id"] = "01a0000000000000unsg".into();
    fs::write(inbox.join("01a0000000000000unsg.json"), value.to_string()).unwrap();

    let output = repo.run_app(&["recv", "--instance", "target", "--json"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let delivered: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        delivered.len(),
        1,
        "only the genuine message: {delivered:?}"
    );
    assert_eq!(delivered[0]["payload"], "genuine");
    assert!(
        stderr(&output).contains("moved aside 4 untrusted"),
        "{}",
        stderr(&output)
    );
    let quarantine = repo.state_dir().join("coordination_queue/quarantine");
    let mut names: Vec<String> = fs::read_dir(&quarantine)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 8, "four files and four reasons: {names:?}");
    let reason = fs::read_to_string(quarantine.join("target-01a0000000000000forg.json.reason"));
    assert!(reason.unwrap().contains("signature does not verify"));
}

#[test]
fn an_inbox_directory_whose_name_is_no_instance_id_is_an_orphan_doctor_quarantines() {
    let repo = TestRepo::new();
    let _instance = register(&repo, "target");
    let output = repo.run_app(&["send", "--from", "x", "--to", "target", "hi"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let id = stdout(&output).trim().to_string();
    let inboxes = repo.state_dir().join("coordination_queue/inbox");
    // A copy put by hand under a name no send makes: no message names it as its recipient.
    let stray = inboxes.join("Not An Id");
    fs::create_dir(&stray).unwrap();
    let name = format!("{id}.json");
    fs::copy(inboxes.join("target").join(&name), stray.join(&name)).unwrap();

    let report = repo.run_app(&["doctor", "--json"]);
    assert_eq!(code(&report), 1, "{}", stderr(&report));
    let report: serde_json::Value = serde_json::from_str(&stdout(&report)).unwrap();
    let orphan = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|finding| finding["subject"] == "Not An Id")
        .unwrap_or_else(|| panic!("the stray inbox is reported: {report}"));
    assert_eq!(orphan["kind"], "messages");
    assert_eq!(
        orphan["problem"],
        "1 message file(s) for an instance that is gone"
    );

    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert!(
        stdout(&fixed).contains("fixed messages Not An Id: moved 1 file(s) aside"),
        "{}",
        stdout(&fixed)
    );
    assert!(!stray.exists(), "the stray inbox is forgotten");
    let reason = repo.state_dir().join(format!(
        "coordination_queue/quarantine/Not An Id-{name}.reason"
    ));
    assert!(
        fs::read_to_string(reason)
            .unwrap()
            .contains("filed under another inbox or name than its own")
    );
    // The genuine copy still waits for its instance.
    let output = repo.run_app(&["recv", "--instance", "target"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stdout(&output).contains("hi"), "{}", stdout(&output));
}

#[test]
fn bad_coordination_input_is_refused_and_changes_nothing() {
    let repo = TestRepo::new();
    let _instance = register(&repo, "peer");
    let before = TestRepo::tree_state(&repo.state_dir());
    let huge = "x".repeat(2000);
    for args in [
        &[
            "send",
            "--from",
            "me",
            "--to",
            "peer",
            "--type",
            "Not-A-Word",
            "hi",
        ][..],
        &["send", "--from", "me", "--to", "peer", &huge],
        &["send", "--from", "me", "--to", "nobody", "hi"],
        &[
            "send",
            "--from",
            "me",
            "--to",
            "peer",
            "--json",
            "{not json",
        ],
        &["send", "--to", "peer", "no sender"],
        &["recv", "--instance", "nobody"],
        &["ack", "--instance", "peer", "not-an-id"],
        &["lock", "acquire", "bad name"],
        &["lock", "run", "../escape", "--", "true"],
        &["reserve", "/etc/passwd"],
        &["reserve", "src/../../x"],
        &["check-paths", "/outside/the/repo"],
    ] {
        let output = repo.run_app(args);
        assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).starts_with("app: "), "{args:?}");
    }
    assert_eq!(
        TestRepo::tree_state(&repo.state_dir()),
        before,
        "refused input wrote nothing"
    );
}

#[test]
fn overlapping_reservations_are_refused_and_hooks_enforce_them() {
    let repo = TestRepo::new();
    let a = register(&repo, "alpha");
    let _b = register(&repo, "beta");

    let output = app_as(
        &repo,
        "alpha",
        &["reserve", "src/**", "--reason", "refactor"],
    );
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let output = app_as(&repo, "beta", &["reserve", "src/db/*.rs"]);
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("instance alpha"),
        "{}",
        stderr(&output)
    );
    let output = app_as(&repo, "beta", &["reserve", "src/**", "--shared"]);
    assert_eq!(
        code(&output),
        3,
        "shared against exclusive: {}",
        stderr(&output)
    );
    // Shared with shared, and disjoint exclusive ones, are fine.
    for (who, args) in [
        ("alpha", &["reserve", "docs/**", "--shared"][..]),
        ("beta", &["reserve", "docs/", "--shared"]),
        ("beta", &["reserve", "README.md"]),
    ] {
        let output = app_as(&repo, who, args);
        assert_eq!(code(&output), 0, "{who} {args:?}: {}", stderr(&output));
    }

    assert_eq!(
        code(&app_as(&repo, "beta", &["check-paths", "src/lib.txt"])),
        1
    );
    assert_eq!(
        code(&app_as(&repo, "alpha", &["check-paths", "src/lib.txt"])),
        0
    );
    assert_eq!(
        code(&app_as(&repo, "beta", &["check-paths", "docs/x.md"])),
        0
    );

    // The pre-commit hook refuses beta's commit of alpha's file.
    let output = repo.run_app(&["hooks", "install"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    fs::write(repo.root().join("src/lib.txt"), "changed\n").unwrap();
    repo.git(&["add", "src/lib.txt"]);
    let commit = repo
        .command("git")
        .args(["commit", "-q", "-m", "touch alpha's file"])
        .env("APP_INSTANCE_ID", "beta")
        .output()
        .unwrap();
    assert!(!commit.status.success(), "the hook refused the commit");
    assert!(
        stderr(&commit).contains("reserved exclusively by instance alpha"),
        "{}",
        stderr(&commit)
    );

    // When alpha dies, its reservations go with it.
    a.kill_now();
    let output = app_as(&repo, "beta", &["reserve", "src/db/*.rs"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let commit = repo
        .command("git")
        .args(["commit", "-q", "-m", "now it may"])
        .env("APP_INSTANCE_ID", "beta")
        .output()
        .unwrap();
    assert!(commit.status.success(), "{}", stderr(&commit));

    // A hook of the user's own is never replaced.
    let hook = repo.root().join(".git/hooks/pre-commit");
    fs::write(&hook, "#!/bin/sh\necho mine\n").unwrap();
    let output = repo.run_app(&["hooks", "install"]);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    assert_eq!(fs::read_to_string(&hook).unwrap(), "#!/bin/sh\necho mine\n");
}

#[test]
fn durations_out_of_range_are_refused_without_a_panic() {
    let repo = TestRepo::new();
    let before = TestRepo::tree_state(&repo.state_dir());
    for args in [
        &["lock", "acquire", "x", "--ttl", "2920000d"][..],
        &["lock", "acquire", "x", "--ttl", "366d"],
        &["lock", "acquire", "x", "--timeout", "150000000000000d"],
        &[
            "lock",
            "run",
            "x",
            "--timeout",
            "150000000000000d",
            "--",
            "true",
        ],
        &["reserve", "src/**", "--ttl", "2920000d"],
        &[
            "send", "--from", "me", "--to", "all", "--ttl", "2920000d", "hi",
        ],
        &["recv", "--instance", "me", "--wait", "150000000000000d"],
        &["events", "--since", "21000d"],
        &["events", "--since", "150000000000000d"],
        &["instance", "stop", "x", "--timeout", "150000000000000d"],
    ] {
        let output = repo.run_app(args);
        let err = stderr(&output);
        assert_eq!(code(&output), 2, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains("at most") || err.contains("before 1970"),
            "{args:?} says what the bound is: {err}"
        );
    }
    // A stale limit reaching back before 1970 is a limit, not a crash.
    let output = repo
        .app(&["instance", "list", "--everywhere"])
        .env("APP_STALE_AFTER", "36000d")
        .output()
        .unwrap();
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(
        TestRepo::tree_state(&repo.state_dir()),
        before,
        "refused input wrote nothing"
    );
}

#[test]
fn listing_locks_and_reservations_creates_nothing() {
    let repo = TestRepo::new();
    for args in [
        &["lock", "list"][..],
        &["lock", "list", "--json"],
        &["reservations"],
        &["reservations", "--json"],
    ] {
        let output = repo.run_app(args);
        assert_eq!(code(&output), 0, "{args:?}: {}", stderr(&output));
        let printed = stdout(&output);
        assert!(
            printed.is_empty() || printed.trim() == "[]",
            "{args:?} printed {printed:?}"
        );
        assert!(!repo.state_dir().exists(), "{args:?} created .app/");
    }
    assert_eq!(repo.git(&["status", "--porcelain", "--ignored"]), "");
}

#[test]
fn waiters_for_a_lock_are_listed_while_they_wait_and_a_killed_one_is_not() {
    let repo = TestRepo::new();
    let _owner = register(&repo, "owner");
    let _patient = register(&repo, "patient");
    let taken = app_as(&repo, "owner", &["lock", "acquire", "gpu"]);
    assert_eq!(code(&taken), 0, "{}", stderr(&taken));
    let waiting = |repo: &TestRepo| -> Vec<serde_json::Value> {
        let list = repo.run_app(&["lock", "list", "--json"]);
        let all: serde_json::Value = serde_json::from_str(&stdout(&list)).unwrap();
        all[0]["waiters"].as_array().unwrap().clone()
    };
    assert_eq!(waiting(&repo), Vec::<serde_json::Value>::new());

    let mut command = repo.app(&["lock", "acquire", "gpu", "--timeout", "60s"]);
    command.env("APP_INSTANCE_ID", "patient");
    let patient = repo.spawn(command);
    let doomed = repo.spawn_app(&["lock", "acquire", "gpu", "--timeout", "60s"]);
    wait_for("both waiters to be listed", Duration::from_secs(30), || {
        waiting(&repo).len() == 2
    });
    let listed = waiting(&repo);
    assert!(
        listed
            .iter()
            .any(|w| w["holder"]["instance"] == "patient" && w["process"]["pid"] == patient.pid()),
        "{listed:?}"
    );
    assert!(
        listed.iter().any(|w| w["process"]["pid"] == doomed.pid()),
        "{listed:?}"
    );
    let text = stdout(&repo.run_app(&["lock", "list"]));
    assert!(text.contains("  waiting: instance patient"), "{text}");

    // A waiter killed mid-wait is not listed, though its file is left.
    doomed.kill_now();
    let left = waiting(&repo);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["holder"]["instance"], "patient");

    let released = app_as(&repo, "owner", &["lock", "release", "gpu"]);
    assert_eq!(code(&released), 0, "{}", stderr(&released));
    let output = patient.wait(Duration::from_secs(30));
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(waiting(&repo), Vec::<serde_json::Value>::new());
    let own = repo
        .state_dir()
        .join(format!("locks/waiting/{}-", output_pid(&listed, "patient")));
    let files: Vec<String> = fs::read_dir(repo.state_dir().join("locks/waiting"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    assert!(
        files.iter().all(|f| !f.starts_with(own.to_str().unwrap())),
        "a waiter that got the lock removes its file: {files:?}"
    );
}

/// The pid of the listed waiter for instance `id`.
fn output_pid(listed: &[serde_json::Value], id: &str) -> u64 {
    listed
        .iter()
        .find(|w| w["holder"]["instance"] == id)
        .and_then(|w| w["process"]["pid"].as_u64())
        .unwrap()
}
