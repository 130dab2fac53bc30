//! `app orchestrate --plan` and `app runs`, with real tasks in real worktrees.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::support::{TestRepo, code, kill, stderr, stdout, wait_for};

/// Writes `plan` to the scratch directory and returns its path.
fn write_plan(repo: &TestRepo, name: &str, plan: &Value) -> PathBuf {
    let path = repo.scratch().join(format!("{name}.json"));
    fs::write(&path, serde_json::to_string_pretty(plan).unwrap()).unwrap();
    path
}

fn orchestrate(repo: &TestRepo, plan: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "orchestrate",
        "--plan",
        plan.to_str().unwrap(),
        "--json",
        "--progress",
        "plain",
    ];
    args.extend_from_slice(extra);
    repo.run_app(&args)
}

/// The `--json` summary, with tasks by id.
fn summary(output: &Output) -> (Value, std::collections::HashMap<String, Value>) {
    let value: Value = serde_json::from_str(&stdout(output))
        .unwrap_or_else(|err| panic!("no JSON summary ({err}); stderr: {}", stderr(output)));
    let tasks = value["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task_id"].as_str().unwrap().to_string(), t.clone()))
        .collect();
    (value["run"].clone(), tasks)
}

/// A command that commits `file` with `content`.
fn commit(file: &str, content: &str) -> String {
    format!("echo {content} > {file} && git add {file} && git commit -q -m 'write {file}'")
}

/// Runs `examples/<file>` (the hello plan) and checks that its four tasks succeeded and the
/// integration branch holds every task's file; returns the run.
fn run_hello_plan(repo: &TestRepo, file: &str) -> Value {
    let plan = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    let output = orchestrate(repo, &plan, &[]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let (run, tasks) = summary(&output);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(tasks.len(), 4);
    assert!(
        tasks.values().all(|t| t["status"] == "succeeded"),
        "{tasks:?}"
    );
    let branch = run["report"]["integration"]["branch"].as_str().unwrap();
    for file in ["hello.txt", "left.txt", "right.txt"] {
        repo.git(&["cat-file", "-e", &format!("{branch}:{file}")]);
    }
    run
}

#[test]
fn the_hello_plan_hands_files_down_runs_in_parallel_and_integrates() {
    let repo = TestRepo::new();
    let run = run_hello_plan(&repo, "hello-plan.json");
    // Every task ran as an instance and cleaned up after itself.
    assert!(repo.instances().is_empty());
    let worktrees = fs::read_dir(repo.state_dir().join("worktrees"))
        .unwrap()
        .count();
    assert_eq!(worktrees, 0);
    // The user's own branch was not touched.
    assert_eq!(
        repo.git(&["rev-parse", "--abbrev-ref", "HEAD"]).trim(),
        "main"
    );

    let id = run["id"].as_str().unwrap();
    let logs = repo.run_app(&["runs", "logs", id, "check"]);
    assert!(
        stdout(&logs).contains("check: sees hello, left and right"),
        "{}",
        stdout(&logs)
    );
    let listed = repo.run_app(&["runs", "list"]);
    assert!(stdout(&listed).contains(id), "{}", stdout(&listed));
    let shown = repo.run_app(&["runs", "show", id, "--json"]);
    let shown: Value = serde_json::from_str(&stdout(&shown)).unwrap();
    assert_eq!(shown["run"]["status"], "succeeded");
    assert_eq!(shown["tasks"].as_array().unwrap().len(), 4);

    // The run's branches are its results: doctor does not take them for idle instance branches
    // (each is contained in the integration branch, or in a dependent's).
    // Nor does a finished run leave anything to report (logs are private, like all of .app/).
    let diagnosed = repo.run_app(&["doctor"]);
    assert_eq!(
        code(&diagnosed),
        0,
        "{}{}",
        stdout(&diagnosed),
        stderr(&diagnosed)
    );
    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    for task in ["greet", "left", "right", "check"] {
        assert!(
            repo.branches().contains(&format!("app/{id}/{task}")),
            "{task}"
        );
    }
}

#[test]
fn a_toml_plan_runs_like_its_json() {
    let repo = TestRepo::new();
    let run = run_hello_plan(&repo, "hello-plan.toml");
    assert!(run["id"].as_str().unwrap().starts_with("hello-"), "{run}");
}

#[test]
fn dependencies_come_first_and_the_cap_holds() {
    let repo = TestRepo::new();
    let scratch = repo.scratch();
    let s = scratch.display();
    let task = |id: &str| {
        format!(
            "flock {s}/lock sh -c 'n=$(($(cat {s}/count 2>/dev/null || echo 0) + 1)); echo $n > {s}/count; \
             m=$(cat {s}/max 2>/dev/null || echo 0); if [ $n -gt $m ]; then echo $n > {s}/max; fi; \
             echo start {id} $(date +%s%N) >> {s}/times' && sleep 0.3 && \
             flock {s}/lock sh -c 'echo $(($(cat {s}/count) - 1)) > {s}/count; echo end {id} $(date +%s%N) >> {s}/times'"
        )
    };
    let plan = write_plan(
        &repo,
        "cap",
        &json!({
            "name": "cap",
            "max_concurrent": 2,
            "tasks": [
                {"id": "t1", "command": task("t1")},
                {"id": "t2", "command": task("t2")},
                {"id": "t3", "command": task("t3")},
                {"id": "t4", "command": task("t4")},
                {"id": "t5", "command": task("t5"), "depends_on": ["t1", "t2"]},
                {"id": "t6", "command": task("t6"), "depends_on": ["t5"]},
            ]
        }),
    );
    let output = orchestrate(&repo, &plan, &[]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let max: u32 = fs::read_to_string(scratch.join("max"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        max, 2,
        "at most 2 at once, and independent tasks did overlap"
    );
    let times = fs::read_to_string(scratch.join("times")).unwrap();
    let at = |event: &str, id: &str| -> u128 {
        times
            .lines()
            .find_map(|line| {
                let mut parts = line.split(' ');
                (parts.next() == Some(event) && parts.next() == Some(id))
                    .then(|| parts.next().unwrap().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {event} of {id} in {times}"))
    };
    assert!(
        at("start", "t5") > at("end", "t1").max(at("end", "t2")),
        "{times}"
    );
    assert!(at("start", "t6") > at("end", "t5"), "{times}");
}

#[test]
fn a_failure_skips_dependents_and_conflicts_are_named() {
    let repo = TestRepo::new();
    let plan = write_plan(
        &repo,
        "conflicts",
        &json!({
            "name": "conflicts",
            "integration": "merged",
            "tasks": [
                {"id": "bad", "command": "exit 3"},
                {"id": "after-bad", "command": "true", "depends_on": ["bad"]},
                {"id": "one", "command": commit("shared.txt", "one")},
                {"id": "two", "command": commit("shared.txt", "two")},
                {"id": "both", "command": "true", "depends_on": ["one", "two"]},
                {"id": "fine", "command": commit("fine.txt", "fine")},
            ]
        }),
    );
    let output = orchestrate(&repo, &plan, &[]);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    let (run, tasks) = summary(&output);
    assert_eq!(run["status"], "failed");
    assert_eq!(tasks["bad"]["status"], "failed");
    assert_eq!(tasks["bad"]["exit_code"], 3);
    assert_eq!(tasks["after-bad"]["status"], "skipped");
    assert!(
        tasks["after-bad"]["detail"]
            .as_str()
            .unwrap()
            .contains("bad")
    );
    assert_eq!(tasks["one"]["status"], "succeeded");
    assert_eq!(tasks["two"]["status"], "succeeded");
    assert_eq!(tasks["fine"]["status"], "succeeded");
    assert_eq!(tasks["both"]["status"], "failed");
    let detail = tasks["both"]["detail"].as_str().unwrap();
    assert!(detail.contains("shared.txt"), "{detail}");
    // The sibling conflict was reported as soon as both were done.
    assert!(
        stderr(&output).contains("would conflict in shared.txt"),
        "{}",
        stderr(&output)
    );
    // The integration branch got what merges, and says what it left out.
    repo.git(&["cat-file", "-e", "merged:fine.txt"]);
    let left_out = &run["report"]["integration"]["left_out"];
    assert!(left_out.to_string().contains("bad"), "{left_out}");
}

#[test]
fn timeouts_stop_a_task_and_retries_run_it_again() {
    let repo = TestRepo::new();
    let flag = repo.scratch().join("flaky");
    let plan = write_plan(
        &repo,
        "retry",
        &json!({
            "name": "retry",
            "tasks": [
                {"id": "slow", "command": "exec sleep 60", "timeout": "1s"},
                {"id": "flaky", "retries": 1, "command":
                    format!("if [ -f {0} ]; then exit 0; else touch {0}; exit 1; fi", flag.display())},
            ]
        }),
    );
    let output = orchestrate(&repo, &plan, &[]);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    let (_, tasks) = summary(&output);
    assert_eq!(tasks["slow"]["status"], "failed");
    assert!(
        tasks["slow"]["detail"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert_eq!(tasks["flaky"]["status"], "succeeded");
    assert_eq!(tasks["flaky"]["attempts"], 2);
    assert!(repo.instances().is_empty());
}

#[test]
fn bad_plans_exit_2_and_change_nothing() {
    let repo = TestRepo::new();
    repo.git(&["branch", "taken"]);
    let branches = repo.branches();
    for (name, plan, want) in [
        (
            "cycle",
            json!({"name": "c", "tasks": [
            {"id": "a", "command": "true", "depends_on": ["b"]},
            {"id": "b", "command": "true", "depends_on": ["a"]}]}),
            "a -> b -> a",
        ),
        (
            "unknown",
            json!({"name": "u", "tasks": [{"id": "a", "command": "true", "colour": 1}]}),
            "unknown field `colour`",
        ),
        (
            "missing",
            json!({"name": "m", "tasks": [{"id": "a", "command": "true", "depends_on": ["zz"]}]}),
            "\"zz\"",
        ),
        (
            "existing",
            json!({"name": "e", "tasks": [{"id": "a", "command": "true", "branch": "taken"}]}),
            "already exists",
        ),
        (
            "base",
            json!({"name": "b", "base": "nope", "tasks": [{"id": "a", "command": "true"}]}),
            "unknown ref",
        ),
    ] {
        let path = write_plan(&repo, name, &plan);
        let output = orchestrate(&repo, &path, &[]);
        assert_eq!(code(&output), 2, "{name}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(want),
            "{name}: {}",
            stderr(&output)
        );
        assert!(!repo.state_dir().exists(), "{name} created .app/");
        assert_eq!(repo.branches(), branches, "{name} changed the branches");
    }
    let dry = repo.run_app(&[
        "orchestrate",
        "--dry-run",
        "--plan",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/hello-plan.json")
            .to_str()
            .unwrap(),
    ]);
    assert_eq!(code(&dry), 0, "{}", stderr(&dry));
    assert!(
        stdout(&dry).contains("wave 2: left, right"),
        "{}",
        stdout(&dry)
    );
    // The agents example is not run (it needs the agents), but it must stay a valid plan.
    let agents = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agents-plan.json");
    let dry = repo.run_app(&[
        "orchestrate",
        "--dry-run",
        "--plan",
        agents.to_str().unwrap(),
    ]);
    assert_eq!(code(&dry), 0, "{}", stderr(&dry));
    assert!(
        stdout(&dry).contains("wave 2: backend, frontend"),
        "{}",
        stdout(&dry)
    );
    assert!(!repo.state_dir().exists());
}

#[test]
fn a_killed_orchestrator_resumes_without_rerunning_what_succeeded() {
    let repo = TestRepo::new();
    let scratch = repo.scratch();
    let s = scratch.display();
    let plan = write_plan(
        &repo,
        "resume",
        &json!({
            "name": "resume",
            "tasks": [
                {"id": "first", "command": format!("echo first >> {s}/ran && {}", commit("first.txt", "1"))},
                {"id": "second", "depends_on": ["first"], "command": format!(
                    "echo second >> {s}/ran && test -f first.txt && if [ -f {s}/resumed ]; then exit 0; fi; touch {s}/waiting; exec sleep 300")},
            ]
        }),
    );
    let running = repo.spawn(repo.app(&[
        "orchestrate",
        "--plan",
        plan.to_str().unwrap(),
        "--progress",
        "none",
    ]));
    wait_for("the second task to run", Duration::from_secs(60), || {
        scratch.join("waiting").exists()
    });
    kill(running.pid(), Signal::SIGKILL);
    let _ = running.wait(Duration::from_secs(10));

    let list = repo.run_app(&["runs", "list", "--json"]);
    let runs: Value = serde_json::from_str(&stdout(&list)).unwrap();
    let id = runs[0]["id"].as_str().unwrap().to_string();
    assert_eq!(runs[0]["status"], "running");
    fs::write(scratch.join("resumed"), "").unwrap();
    let output = repo.run_app(&["orchestrate", "--resume", &id, "--json"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let (run, tasks) = summary(&output);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(tasks["first"]["attempts"], 1);
    assert_eq!(tasks["second"]["attempts"], 2);
    let ran = fs::read_to_string(scratch.join("ran")).unwrap();
    assert_eq!(ran.matches("first").count(), 1, "{ran}");
    assert_eq!(ran.matches("second").count(), 2, "{ran}");
    // The attempt the dead orchestrator left running was stopped, not left behind.
    wait_for(
        "the old attempt to be gone",
        Duration::from_secs(30),
        || repo.instances().is_empty(),
    );
}

#[test]
fn fail_fast_cancels_the_rest_and_logs_can_be_followed() {
    let repo = TestRepo::new();
    let scratch = repo.scratch();
    let s = scratch.display();
    let plan = write_plan(
        &repo,
        "fast",
        &json!({
            "name": "fast",
            "tasks": [
                {"id": "talk", "command": format!(
                    "for i in 1 2 3; do echo line $i; sleep 0.2; done; touch {s}/talked; exec sleep 300")},
                {"id": "bad", "command": format!("until [ -f {s}/talked ]; do sleep 0.05; done; exit 9")},
                {"id": "slow", "command": "exec sleep 300"},
                {"id": "later", "command": "true", "depends_on": ["slow"]},
            ]
        }),
    );
    let running = repo.spawn(repo.app(&[
        "orchestrate",
        "--plan",
        plan.to_str().unwrap(),
        "--fail-fast",
        "--json",
        "--progress",
        "none",
    ]));
    let mut id = String::new();
    wait_for("the run to be recorded", Duration::from_secs(30), || {
        let list = repo.run_app(&["runs", "list", "--json"]);
        let runs: Value = serde_json::from_str(&stdout(&list)).unwrap_or(Value::Null);
        match runs[0]["id"].as_str() {
            Some(found) => {
                id = found.to_string();
                true
            }
            None => false,
        }
    });
    // Following the log while the task runs prints its lines as they come, and returns once
    // the task has ended (it is cancelled by the failure of "bad").
    let follower = repo.spawn(repo.app(&["runs", "logs", &id, "talk", "--follow"]));
    wait_for("the task to talk", Duration::from_secs(30), || {
        scratch.join("talked").exists()
    });
    let output = running.wait(Duration::from_secs(60));
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    let (_, tasks) = summary(&output);
    assert_eq!(tasks["bad"]["status"], "failed");
    assert_eq!(tasks["slow"]["status"], "cancelled");
    assert_eq!(tasks["talk"]["status"], "cancelled");
    assert_eq!(tasks["later"]["status"], "cancelled");
    let followed = follower.wait(Duration::from_secs(30));
    assert_eq!(code(&followed), 0, "{}", stderr(&followed));
    assert!(
        stdout(&followed).contains("line 1\nline 2\nline 3\n"),
        "{}",
        stdout(&followed)
    );
    assert!(repo.instances().is_empty());
}

#[test]
fn task_locks_and_reservations_are_taken_by_the_tasks_app_run_and_given_back() {
    let repo = TestRepo::new();
    let scratch = repo.scratch();
    let s = scratch.display();
    // Someone outside the run (this test's process) holds held/**.
    let outside = repo.run_app(&["reserve", "held/**"]);
    assert_eq!(code(&outside), 0, "{}", stderr(&outside));
    let locked = |id: &str| {
        format!(
            "echo start {id} $(date +%s%N) >> {s}/times; echo $APP_LOCK_NAME=$APP_LOCK_TOKEN $APP_LOCKS > {s}/env-{id}; \
             sleep 0.3; echo end {id} $(date +%s%N) >> {s}/times"
        )
    };
    let plan = write_plan(
        &repo,
        "holds",
        &json!({
            "name": "holds",
            "max_concurrent": 4,
            "tasks": [
                {"id": "one", "command": locked("one"), "locks": ["db"]},
                {"id": "two", "command": locked("two"), "locks": ["db"]},
                {"id": "three", "command": format!("\"$APP_BIN\" reservations > {s}/reservations"),
                 "reserve": ["src/**"]},
                {"id": "refused", "command": format!("touch {s}/refused-ran"), "reserve": ["held/x/*"]},
            ]
        }),
    );
    let output = orchestrate(&repo, &plan, &[]);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    let (run, tasks) = summary(&output);
    let run_id = run["id"].as_str().unwrap();
    for task in ["one", "two", "three"] {
        assert_eq!(tasks[task]["status"], "succeeded", "{:?}", tasks[task]);
    }
    // One lock: never both at once, each with its own token.
    let times = fs::read_to_string(scratch.join("times")).unwrap();
    let events: Vec<&str> = times
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(events, ["start", "end", "start", "end"], "{times}");
    let mut tokens: Vec<String> = ["one", "two"]
        .iter()
        .map(|id| fs::read_to_string(scratch.join(format!("env-{id}"))).unwrap())
        .collect();
    tokens.sort();
    assert_eq!(tokens, ["db=1 db=1\n", "db=2 db=2\n"]);
    // The reservation is the task's instance's, with the task and the run as its reason.
    let reservations = fs::read_to_string(scratch.join("reservations")).unwrap();
    assert!(
        reservations.contains(&format!(
            "exclusive src/** by instance {}",
            tasks["three"]["instance"].as_str().unwrap()
        )) && reservations.contains(&format!("(task three of run {run_id})")),
        "{reservations}"
    );
    // A refused reservation fails the task as `app reserve` exits: 3, the overlap in its log.
    assert_eq!(tasks["refused"]["status"], "failed");
    assert_eq!(tasks["refused"]["exit_code"], 3);
    assert_eq!(tasks["refused"]["detail"], "exited with 3");
    assert!(!scratch.join("refused-ran").exists());
    let log = repo.run_app(&["runs", "logs", run_id, "refused"]);
    assert!(
        stdout(&log).contains("app: held/x/* overlaps held/**, reserved by process "),
        "{}",
        stdout(&log)
    );
    // Given back: the lock is free, only the outside reservation is left.
    let locks = repo.run_app(&["lock", "list"]);
    assert_eq!(stdout(&locks), "db free (last token 2)\n");
    let left = repo.run_app(&["reservations"]);
    assert_eq!(stdout(&left).lines().count(), 1, "{}", stdout(&left));
    assert!(stdout(&left).contains("held/**"), "{}", stdout(&left));
    assert!(repo.instances().is_empty());
}

/// The run's tasks by id, as `app runs show --json` reports them.
fn run_tasks(repo: &TestRepo, id: &str) -> std::collections::HashMap<String, Value> {
    let shown = repo.run_app(&["runs", "show", id, "--json"]);
    assert_eq!(code(&shown), 0, "{}", stderr(&shown));
    let value: Value = serde_json::from_str(&stdout(&shown)).unwrap();
    value["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task_id"].as_str().unwrap().to_string(), t.clone()))
        .collect()
}

/// The id of the only run of `repo`, once it is recorded.
fn only_run(repo: &TestRepo) -> String {
    let mut id = String::new();
    wait_for("the run to be recorded", Duration::from_secs(30), || {
        let list = repo.run_app(&["runs", "list", "--json"]);
        let runs: Value = serde_json::from_str(&stdout(&list)).unwrap_or(Value::Null);
        match runs[0]["id"].as_str() {
            Some(found) => {
                id = found.to_string();
                true
            }
            None => false,
        }
    });
    id
}

/// Pids of the children of `parent`, read from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if after.split_whitespace().nth(1) == Some(&parent.to_string()) {
            found.push(pid);
        }
    }
    found
}

/// SIGKILLs the orchestrator's process group and every `app run` it started with all their
/// processes, as a reboot would, and waits until none of them runs any more. The registered
/// ones are found through `app instance list` (ID:PID) and their records' command pids.
fn kill_everything(repo: &TestRepo, orchestrator: crate::support::Running) {
    let mut pids = Vec::new();
    let list = repo.run_app(&["instance", "list"]);
    for line in stdout(&list).lines() {
        pids.extend(
            line.split_whitespace()
                .next()
                .and_then(|id_pid| id_pid.rsplit(':').next())
                .and_then(|pid| pid.parse::<u32>().ok()),
        );
    }
    for record in repo.instances() {
        pids.extend(record.child_pid);
    }
    kill_run(orchestrator, pids);
}

/// SIGKILLs the orchestrator's process group, the process group of each of its children (every
/// `app run` leads one, its command inside), their children and `more`, then waits until none
/// of them runs any more.
fn kill_run(orchestrator: crate::support::Running, more: Vec<u32>) {
    let groups = children_of(orchestrator.pid());
    let mut pids = more;
    pids.extend(&groups);
    for &pid in &groups {
        pids.extend(children_of(pid));
    }
    let _ = orchestrator.kill_now();
    for &group in &groups {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group as i32), Signal::SIGKILL);
    }
    for &pid in &pids {
        kill(pid, Signal::SIGKILL);
    }
    wait_for(
        "every killed process to be gone",
        Duration::from_secs(30),
        || {
            pids.iter()
                .all(|&pid| app::process::start_time(pid).is_none())
        },
    );
}

#[test]
fn a_resume_after_everything_was_killed_reclaims_dead_attempts_and_finishes() {
    let repo = TestRepo::new();
    let scratch = repo.scratch();
    let s = scratch.display();
    // A slow task leaves uncommitted work in its worktree and sleeps, until it is resumed.
    let slow = |id: &str| {
        format!(
            "echo {id} >> {s}/ran; if [ -f {s}/resumed ]; then {}; exit 0; fi; \
             echo unsaved > unsaved-{id}.txt; touch {s}/waiting-{id}; exec sleep 30",
            commit(&format!("{id}.txt"), id)
        )
    };
    let plan = write_plan(
        &repo,
        "reboot",
        &json!({
            "name": "reboot",
            "max_concurrent": 3,
            "integration": "merged",
            "tasks": [
                {"id": "quick", "command": format!("echo quick >> {s}/ran && {}", commit("quick.txt", "q"))},
                {"id": "slow1", "command": slow("slow1")},
                {"id": "slow2", "command": slow("slow2"), "retries": 1},
                {"id": "after", "depends_on": ["quick", "slow1"],
                 "command": format!("echo after >> {s}/ran && {}", commit("after.txt", "a"))},
            ]
        }),
    );
    let running = repo.spawn(repo.app(&[
        "orchestrate",
        "--plan",
        plan.to_str().unwrap(),
        "--progress",
        "none",
    ]));
    let id = only_run(&repo);
    wait_for(
        "the slow tasks to run and quick to succeed",
        Duration::from_secs(60),
        || {
            scratch.join("waiting-slow1").exists()
                && scratch.join("waiting-slow2").exists()
                && run_tasks(&repo, &id)["quick"]["status"] == "succeeded"
        },
    );
    let before = run_tasks(&repo, &id);
    let dead_attempt = before["slow1"]["instance"].as_str().unwrap().to_string();
    assert!(
        repo.state_dir()
            .join("worktrees")
            .join(&dead_attempt)
            .exists()
    );
    kill_everything(&repo, running);
    assert!(
        !repo.branches().contains(&"merged".to_string()),
        "the integration branch moved before the run ended"
    );

    fs::write(scratch.join("resumed"), "").unwrap();
    let output = repo.run_app(&["orchestrate", "--resume", &id, "--json"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let (run, tasks) = summary(&output);
    assert_eq!(run["status"], "succeeded", "{}", stderr(&output));
    for (task, attempts) in [("quick", 1), ("slow1", 2), ("slow2", 2), ("after", 1)] {
        assert_eq!(
            tasks[task]["status"], "succeeded",
            "{task}: {:?}",
            tasks[task]
        );
        assert_eq!(
            tasks[task]["attempts"], attempts,
            "{task}: {:?}",
            tasks[task]
        );
    }
    // What succeeded did not run again; the killed tasks ran again.
    let ran = fs::read_to_string(scratch.join("ran")).unwrap();
    for (task, times) in [("quick", 1), ("slow1", 2), ("slow2", 2), ("after", 1)] {
        assert_eq!(
            ran.lines().filter(|l| *l == task).count(),
            times,
            "{task}: {ran}"
        );
    }
    // The dead attempt's uncommitted work was saved before its worktree was removed.
    assert!(
        stderr(&output).contains(&format!("reclaimed its dead attempt {dead_attempt}")),
        "{}",
        stderr(&output)
    );
    let rescue = format!("refs/app/rescue/{dead_attempt}");
    assert_eq!(
        repo.git(&["show", &format!("{rescue}:unsaved-slow1.txt")]),
        "unsaved\n"
    );
    assert!(
        !repo
            .state_dir()
            .join("worktrees")
            .join(&dead_attempt)
            .exists()
    );
    // The integration branch moved once, at the end, with every task's work.
    for file in ["quick.txt", "slow1.txt", "slow2.txt", "after.txt"] {
        repo.git(&["cat-file", "-e", &format!("merged:{file}")]);
    }
    let moves = repo.git(&["reflog", "show", "--format=%H", "refs/heads/merged"]);
    assert_eq!(moves.lines().count(), 1, "{moves}");
    assert!(repo.instances().is_empty());
}

#[test]
fn a_resume_does_not_count_attempts_that_never_started_their_command() {
    let repo = TestRepo::new();
    let scratch = repo.scratch();
    let s = scratch.display();
    // .app/ and its exclude line exist, so holding the registry lock stops every `app run`
    // before it registers, let alone starts its command.
    let first = repo.run_app(&["run", "--", "true"]);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let paths = app::paths::AppPaths::discover(repo.root()).unwrap();
    let held = app::state::lock_exclusive(&paths.registry_lock()).unwrap();
    let plan = write_plan(
        &repo,
        "blocked",
        &json!({
            "name": "blocked",
            "tasks": [
                {"id": "one", "command": format!("echo one >> {s}/ran && {}", commit("one.txt", "1"))},
                {"id": "two", "command": format!("echo two >> {s}/ran && {}", commit("two.txt", "2"))},
            ]
        }),
    );
    let running = repo.spawn(repo.app(&[
        "orchestrate",
        "--plan",
        plan.to_str().unwrap(),
        "--progress",
        "none",
    ]));
    let id = only_run(&repo);
    let mut before = Default::default();
    wait_for(
        "both attempts to be launched",
        Duration::from_secs(30),
        || {
            before = run_tasks(&repo, &id);
            before.values().all(|t| t["status"] == "running")
        },
    );
    // The registry is locked (by this test): no `app instance list`, only the process tree.
    kill_run(running, Vec::new());
    drop(held);
    assert!(!scratch.join("ran").exists(), "a command ran");

    let output = repo.run_app(&["orchestrate", "--resume", &id, "--json"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let (run, tasks) = summary(&output);
    assert_eq!(run["status"], "succeeded");
    for task in ["one", "two"] {
        assert_eq!(tasks[task]["status"], "succeeded", "{:?}", tasks[task]);
        // The launch that never ran its command is not an attempt...
        assert_eq!(tasks[task]["attempts"], 1, "{:?}", tasks[task]);
        // ...but its instance id is not used again.
        assert_ne!(tasks[task]["instance"], before[task]["instance"]);
    }
    let ran = fs::read_to_string(scratch.join("ran")).unwrap();
    assert_eq!(ran.lines().count(), 2, "{ran}");
    assert!(repo.instances().is_empty());
}

/// `app orchestrate --dry-run --plan PATH`.
fn dry_run(repo: &TestRepo, path: &Path) -> Output {
    repo.run_app(&["orchestrate", "--dry-run", "--plan", path.to_str().unwrap()])
}

#[test]
fn nul_bytes_and_oversized_arguments_fail_the_dry_run_with_their_place() {
    let repo = TestRepo::new();
    let huge = "x".repeat(128 * 1024);
    let ok = json!({"id": "ok", "command": "true"});
    for (name, task, want) in [
        (
            "argv",
            json!({"id": "a", "command": ["echo", "one\u{0}two"]}),
            "task \"a\": command[1] contains a NUL byte",
        ),
        (
            "shell",
            json!({"id": "a", "command": "echo \u{0}"}),
            "task \"a\": command contains a NUL byte",
        ),
        (
            "env-value",
            json!({"id": "a", "command": "true", "env": {"K": "v\u{0}"}}),
            "task \"a\": env \"K\" contains a NUL byte",
        ),
        (
            "env-key",
            json!({"id": "a", "command": "true", "env": {"K\u{0}": "v"}}),
            "task \"a\": env: \"K\\0\" is not a variable name",
        ),
        (
            "long-argv",
            json!({"id": "a", "command": ["echo", huge]}),
            "task \"a\": command[1] is 131072 bytes",
        ),
        (
            "long-env",
            json!({"id": "a", "command": "true", "env": {"K": huge}}),
            "task \"a\": env \"K\" is 131074 bytes",
        ),
    ] {
        let path = write_plan(&repo, name, &json!({"name": "n", "tasks": [ok, task]}));
        let output = dry_run(&repo, &path);
        let err = stderr(&output);
        assert_eq!(code(&output), 2, "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        // `FILE:LINE: task ...`, the line of the task's id.
        let place = format!("app: {}:", path.display());
        let line = err
            .strip_prefix(&place)
            .and_then(|rest| rest.split(':').next());
        assert!(
            line.is_some_and(|line| line.parse::<usize>().is_ok()),
            "{name}: {err}"
        );
        // And the real run refuses it the same way, before creating anything.
        let output = orchestrate(&repo, &path, &[]);
        assert_eq!(code(&output), 2, "{name}: {}", stderr(&output));
        assert!(!repo.state_dir().exists(), "{name} created .app/");
    }
    // TOML says the same, with the task's line.
    let path = repo.scratch().join("nul.toml");
    fs::write(
        &path,
        "name = \"n\"\n\n[[tasks]]\nid = \"a\"\ncommand = [\"echo\", \"x\\u0000\"]\n",
    )
    .unwrap();
    let output = dry_run(&repo, &path);
    let err = stderr(&output);
    assert_eq!(code(&output), 2, "{err}");
    assert!(
        err.contains(&format!(
            "{}:4: task \"a\": command[1] contains a NUL byte",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn a_byte_order_mark_is_accepted_and_a_top_level_array_is_explained() {
    let repo = TestRepo::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for file in ["hello-plan.json", "hello-plan.toml"] {
        let text = fs::read_to_string(examples.join(file)).unwrap();
        let path = repo.scratch().join(file);
        fs::write(&path, format!("\u{feff}{text}")).unwrap();
        let output = dry_run(&repo, &path);
        assert_eq!(code(&output), 0, "{file}: {}", stderr(&output));
        assert!(
            stdout(&output).starts_with("run hello-"),
            "{file}: the name is read past the mark: {}",
            stdout(&output)
        );
        assert!(stdout(&output).contains("wave 2: left, right"));
    }
    let path = repo.scratch().join("array.json");
    fs::write(&path, r#"[{"id": "a", "command": "true"}]"#).unwrap();
    let output = dry_run(&repo, &path);
    let err = stderr(&output);
    assert_eq!(code(&output), 2, "{err}");
    assert!(
        err.contains("a plan is an object with a \"tasks\" array"),
        "{err}"
    );
    assert!(!repo.state_dir().exists());
}

#[test]
fn a_ten_thousand_task_chain_dry_runs() {
    let repo = TestRepo::new();
    let tasks: Vec<Value> = (0..10_000)
        .map(|i| {
            if i == 0 {
                json!({"id": "t0", "command": "true"})
            } else {
                json!({"id": format!("t{i}"), "command": "true", "depends_on": [format!("t{}", i - 1)]})
            }
        })
        .collect();
    let path = write_plan(&repo, "chain", &json!({"name": "chain", "tasks": tasks}));
    let output = dry_run(&repo, &path);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("10000 tasks"), "{text}");
    assert!(text.contains("\nwave 1: t0\n"), "{text}");
    assert!(text.ends_with("\nwave 10000: t9999\n"), "{text}");
    assert!(!repo.state_dir().exists());
}
