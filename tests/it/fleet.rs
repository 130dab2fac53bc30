//! The fleet: hosts (separate clones with their own `.app/`, home and host name) sharing one
//! real libSQL server on the loopback and one local bare remote; real workers, a real
//! orchestrator, real git pushes and fetches. Where the machine allows (root, `ip netns`), one
//! host runs in a network namespace of its own and reaches the server over a veth address.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::support::{Running, Sqld, TestRepo, code, hermetic, kill, stderr, stdout, wait_for};

const SECRET: &str = "fleet-test-secret";

/// Several hosts of one fleet.
struct Fleet {
    sqld: Sqld,
    /// The orchestrating host: also the first clone, whose history the others share.
    hosts: Vec<TestRepo>,
    remote: PathBuf,
}

impl Fleet {
    /// `n` hosts, each a repository whose `origin` is one bare remote; `None` (said loudly)
    /// where the machine has no sqld, a failure under CI.
    fn new(n: usize) -> Option<Fleet> {
        Some(Fleet::with_server(Sqld::start()?, n))
    }

    /// `n` hosts sharing `sqld`.
    fn with_server(sqld: Sqld, n: usize) -> Fleet {
        let hosts: Vec<TestRepo> = (0..n).map(|_| TestRepo::new()).collect();
        let remote = hosts[0].scratch().join("remote.git");
        hosts[0].git(&[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            remote.to_str().unwrap(),
        ]);
        for host in &hosts {
            // Fixed author and dates: every TestRepo's first commit is the same commit.
            host.git(&["remote", "add", "origin", remote.to_str().unwrap()]);
        }
        hosts[0].git(&["push", "-q", "origin", "main"]);
        for host in &hosts[1..] {
            host.git(&["fetch", "-q", "origin"]);
        }
        Fleet {
            sqld,
            hosts,
            remote,
        }
    }

    /// `app` on host `n`, in the fleet.
    fn app(&self, n: usize, args: &[&str]) -> Command {
        let mut command = self.hosts[n].app(args);
        self.join(n, &mut command);
        command
    }

    /// `app orchestrate --plan PLAN --fleet FLAGS...` on host 0.
    fn orchestrate(&self, plan: &std::path::Path, flags: &[&str]) -> Command {
        let mut args = vec!["orchestrate", "--plan", plan.to_str().unwrap(), "--fleet"];
        args.extend_from_slice(flags);
        self.app(0, &args)
    }

    /// A shell running `script` on host `n`, in the fleet (`$APP_BIN` is `app`).
    fn shell(&self, n: usize, script: &str) -> Command {
        let mut command = self.hosts[n].command("sh");
        command.args(["-c", script]);
        self.join(n, &mut command);
        command
    }

    /// Gives `command` the environment of host `n` of the fleet.
    fn join(&self, n: usize, command: &mut Command) {
        command
            .env("APP_DB_URL", self.sqld.url())
            .env("APP_SHARED_SECRET", SECRET)
            .env("APP_LEASE_TTL", "3s")
            .env("FLEET_HOST", format!("host{n}"))
            .env("APP_FLEET_HOST", format!("host{n}"));
    }

    /// Instance `name` (`sleep 60`) on host `n`, once host `m` sees it live on host `n`.
    fn instance(&self, n: usize, name: &str, m: usize) -> Running {
        let run = self.hosts[n].spawn(self.app(
            n,
            &[
                "run",
                "--no-worktree",
                "--instance",
                name,
                "--",
                "sleep",
                "60",
            ],
        ));
        let line = format!(" host{n} ");
        wait_for(
            "the instance to be seen from another host",
            Duration::from_secs(20),
            || {
                let out = self.run(m, &["instance", "list", "--everywhere"]);
                stdout(&out)
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}:")) && l.contains(&line))
            },
        );
        run
    }

    /// Any program (a shell, git) on host `n`, in the fleet; `$APP_BIN` is `app`.
    fn command(&self, n: usize, program: &str) -> Command {
        let mut command = self.hosts[n].command(program);
        self.join(n, &mut command);
        command
    }

    /// The fleet lock `name` as `app lock list --fleet --json` on host `n` shows it.
    fn fleet_lock(&self, n: usize, name: &str) -> Value {
        let out = self.run(n, &["lock", "list", "--fleet", "--json"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let all: Value = serde_json::from_slice(&out.stdout).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|lock| lock["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn run(&self, n: usize, args: &[&str]) -> Output {
        self.app(n, args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    /// `app worker --name host<n>` on host `n`, with `extra` arguments.
    fn worker(&self, n: usize, extra: &[&str]) -> Running {
        let name = format!("host{n}");
        let mut args = vec!["worker", "--name", &name];
        args.extend_from_slice(extra);
        self.spawn_worker(n, self.app(n, &args))
    }

    /// Starts `command`, the worker of host `n`, and waits until it has registered.
    fn spawn_worker(&self, n: usize, command: Command) -> Running {
        let name = format!("host{n}");
        let worker = self.hosts[n].spawn(command);
        wait_for("the worker to register", Duration::from_secs(20), || {
            let out = self.run(0, &["fleet", "--json"]);
            let hosts: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            hosts["hosts"].as_array().is_some_and(|hosts| {
                hosts
                    .iter()
                    .any(|h| h["host"]["name"] == name.as_str() && h["alive"] == true)
            })
        });
        worker
    }

    /// The refs of the remote matching `pattern`.
    fn remote_refs(&self, pattern: &str) -> Vec<String> {
        self.hosts[0]
            .git(&["ls-remote", self.remote.to_str().unwrap(), pattern])
            .lines()
            .map(|line| line.split('\t').nth(1).unwrap_or_default().to_string())
            .collect()
    }
}

/// A task that commits a file named after it and records where it ran.
fn committing(id: &str, ran: &Path) -> String {
    format!(
        "echo \"$APP_TASK_ID $FLEET_HOST\" >> {ran} && echo {id} > {id}.txt && git add {id}.txt && git commit -qm \"task {id}\"",
        ran = ran.display()
    )
}

fn write_plan(repo: &TestRepo, plan: &Value) -> PathBuf {
    let path = repo.scratch().join("plan.json");
    fs::write(&path, serde_json::to_vec_pretty(plan).unwrap()).unwrap();
    path
}

#[test]
fn a_twelve_task_plan_runs_once_per_task_across_two_workers_on_the_hosts_its_labels_allow() {
    let Some(fleet) = Fleet::new(3) else { return };
    let ran = fleet.hosts[0].scratch().join("ran");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let id = format!("t{i}");
        let mut task = json!({ "id": id, "command": committing(&id, &ran) });
        if (4..8).contains(&i) {
            // Each depends on two tasks that may have run on the other host.
            task["depends_on"] = json!([format!("t{}", i - 4), format!("t{}", (i - 3) % 4)]);
        }
        if i >= 10 {
            task["on"] = json!({ "gpu": "1" });
        }
        tasks.push(task);
    }
    let plan = json!({
        "name": "fleet12", "max_concurrent": 4, "integration": "fleet-merged", "tasks": tasks,
    });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _one = fleet.worker(1, &["--capacity", "2"]);
    let _two = fleet.worker(2, &["--capacity", "2", "--labels", "gpu=1"]);
    let out = fleet.run(
        0,
        &[
            "orchestrate",
            "--plan",
            plan.to_str().unwrap(),
            "--fleet",
            "--progress",
            "plain",
            "--json",
        ],
    );
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lines = fs::read_to_string(&ran).unwrap();
    let mut hosts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines.lines() {
        let (task, host) = line.split_once(' ').unwrap();
        hosts
            .entry(task.to_string())
            .or_default()
            .push(host.to_string());
    }
    assert_eq!(hosts.len(), 12, "every task ran: {lines}");
    for (task, on) in &hosts {
        assert_eq!(on.len(), 1, "{task} ran once: {lines}");
        assert_ne!(
            on[0], "host0",
            "the orchestrating host runs no worker: {lines}"
        );
        if task == "t10" || task == "t11" {
            assert_eq!(on[0], "host2", "{task} needs gpu=1, which only host2 has");
        }
    }
    let used: std::collections::BTreeSet<&String> = hosts.values().flatten().collect();
    assert_eq!(used.len(), 2, "both workers took tasks: {lines}");
    // Integration happened on the orchestrating host, from the branches the hosts pushed.
    let log = fleet.hosts[0].git(&["log", "--format=%s", "fleet-merged"]);
    for i in 0..12 {
        let subject = format!("task t{i}");
        assert_eq!(
            log.lines().filter(|l| *l == subject).count(),
            1,
            "{subject} once in the integration branch:\n{log}"
        );
    }
    assert_eq!(summary["run"]["status"], "succeeded");
    // Each task's branch on the remote is its accepted attempt.
    let run = summary["run"]["id"].as_str().unwrap();
    assert_eq!(
        fleet.remote_refs(&format!("refs/heads/app/{run}/*")).len(),
        12
    );
    let fleet_view = fleet.run(0, &["fleet"]);
    assert_eq!(code(&fleet_view), 0, "{}", stderr(&fleet_view));
    assert!(stdout(&fleet_view).contains("host1") && stdout(&fleet_view).contains("gpu=1"));
}

#[test]
fn a_worker_that_slept_past_its_lease_can_neither_report_nor_push_over_the_new_attempt() {
    let Some(fleet) = Fleet::new(3) else { return };
    let marks = fleet.hosts[0].scratch();
    let script = format!(
        "echo $FLEET_HOST > who.txt && git add who.txt && git commit -qm \"slow on $FLEET_HOST\" && touch {marks}/started-$FLEET_HOST && sleep 4",
        marks = marks.display()
    );
    let plan = json!({
        "name": "zombie", "integration": "zombie-merged",
        "tasks": [{ "id": "slow", "command": script }],
    });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let sleeper = fleet.worker(1, &[]);
    let orchestrator =
        fleet.hosts[0].spawn(fleet.orchestrate(&plan, &["--progress", "plain", "--json"]));
    wait_for(
        "the first attempt to start",
        Duration::from_secs(30),
        || marks.join("started-host1").exists(),
    );
    // The host sleeps (SIGSTOP): its lease runs out, and the second worker takes the task.
    kill(sleeper.pid(), Signal::SIGSTOP);
    let _other = fleet.worker(2, &[]);
    let out = orchestrator.wait(Duration::from_secs(60));
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stderr(&out).contains("stopped renewing its lease"),
        "{}",
        stderr(&out)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = summary["run"]["id"].as_str().unwrap().to_string();
    let merged = fleet.hosts[0].git(&["log", "--format=%s", "zombie-merged"]);
    assert!(
        merged.contains("slow on host2") && !merged.contains("slow on host1"),
        "{merged}"
    );
    // The sleeper wakes up: its late report is refused, and its push lands on its own
    // attempt's ref only, so its work is kept and the task's branch is not touched.
    let branch_before = fleet.remote_refs(&format!("refs/heads/app/{run}/slow"));
    kill(sleeper.pid(), Signal::SIGCONT);
    wait_for(
        "the woken worker to push its attempt",
        Duration::from_secs(30),
        || {
            fleet
                .remote_refs(&format!("refs/app/fleet/{run}/slow/*"))
                .len()
                == 2
        },
    );
    let woke = sleeper.wait_after(Signal::SIGTERM, Duration::from_secs(30));
    let said = stderr(&woke);
    assert!(
        said.contains("lease lost") || said.contains("refused"),
        "{said}"
    );
    assert_eq!(
        fleet.remote_refs(&format!("refs/heads/app/{run}/slow")),
        branch_before
    );
    let tip = fleet.hosts[0].git(&[
        "ls-remote",
        fleet.remote.to_str().unwrap(),
        &format!("refs/heads/app/{run}/slow"),
    ]);
    let tip = tip.split('\t').next().unwrap().to_string();
    fleet.hosts[0].git(&[
        "fetch",
        "-q",
        "origin",
        &format!("refs/app/fleet/{run}/slow/*:refs/zombie/*"),
    ]);
    let subjects = fleet.hosts[0].git(&["log", "--format=%s", "--glob=refs/zombie/*"]);
    assert!(
        subjects.contains("slow on host1"),
        "the sleeper's work is kept: {subjects}"
    );
    let on_branch = fleet.hosts[0].git(&["log", "--format=%s", &tip]);
    assert!(!on_branch.contains("slow on host1"), "{on_branch}");
    let runs = fleet.run(0, &["runs", "show", &run, "--json"]);
    assert_eq!(code(&runs), 0, "{}", stderr(&runs));
}

#[test]
fn fleet_commands_without_a_server_or_secret_change_nothing_and_say_what_to_set() {
    let repo = TestRepo::new();
    let out = repo.run_app(&["worker"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("APP_DB_URL"), "{}", stderr(&out));
    let plan = write_plan(
        &repo,
        &json!({ "name": "p", "tasks": [{ "id": "t", "command": "true" }] }),
    );
    let out = repo.run_app(&["orchestrate", "--plan", plan.to_str().unwrap(), "--fleet"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("APP_DB_URL"), "{}", stderr(&out));
    assert!(
        !repo.state_dir().exists() && !repo.db_path().exists(),
        "bad fleet input made neither .app/ nor a database"
    );
    let out = repo.run_app(&["fleet"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let Some(fleet) = Fleet::new(1) else { return };
    let mut command = fleet.app(0, &["worker"]);
    command.env_remove("APP_SHARED_SECRET");
    let out = command.output().unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("APP_SHARED_SECRET"),
        "{}",
        stderr(&out)
    );
    for bad in [
        &["worker", "--labels", "gpu"][..],
        &["worker", "--capacity", "0"],
        &["worker", "--name", "a b"],
    ] {
        let out = fleet.run(0, bad);
        assert_eq!(code(&out), 2, "{bad:?}: {}", stderr(&out));
    }
    let out = fleet.run(0, &["worker", "--remote", "nowhere"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("no git remote"), "{}", stderr(&out));
    let hosts = fleet.run(0, &["fleet", "--json"]);
    let hosts: Value = serde_json::from_slice(&hosts.stdout).unwrap();
    assert_eq!(hosts["hosts"], json!([]), "nothing was registered");
}

#[test]
fn an_unreachable_server_is_retried_until_the_deadline_then_exit_3_naming_the_url() {
    let repo = TestRepo::new();
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = repo
        .app(&["fleet"])
        .env("APP_DB_URL", &url)
        .env("APP_DB_RETRY_DEADLINE", "1s")
        .output()
        .unwrap();
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&url) && said.contains("could not be reached"),
        "{said}"
    );
    let attempts: u32 = said
        .split(" attempts)")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(attempts > 1, "it was retried: {said}");
}

#[test]
fn a_killed_orchestrator_stops_nothing_and_another_host_resumes_the_run_with_its_results() {
    let Some(fleet) = Fleet::new(3) else { return };
    let marks = fleet.hosts[0].scratch();
    let ran = marks.join("ran");
    let first = format!(
        "touch {m}/started-a && sleep 3 && {}",
        committing("a", &ran),
        m = marks.display()
    );
    let plan = json!({
        "name": "handover", "integration": "handover-merged",
        "tasks": [
            { "id": "a", "command": first },
            { "id": "b", "command": committing("b", &ran), "depends_on": ["a"] },
        ],
    });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _worker = fleet.worker(2, &[]);
    let orchestrator = fleet.hosts[0].spawn(fleet.orchestrate(&plan, &["--progress", "plain"]));
    wait_for("task a to start", Duration::from_secs(30), || {
        marks.join("started-a").exists()
    });
    let killed = orchestrator.kill_now();
    let said = stderr(&killed);
    let run = said
        .split("run ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .expect("the orchestrator named its run")
        .to_string();
    // The task goes on without its orchestrator.
    wait_for(
        "task a to finish on its host",
        Duration::from_secs(30),
        || fs::read_to_string(&ran).is_ok_and(|text| text.contains("a host2")),
    );
    // Another host resumes once the dead orchestrator's heartbeat is stale.
    let mut resumed = None;
    wait_for("the resume to be accepted", Duration::from_secs(30), || {
        let out = fleet.run(
            1,
            &[
                "orchestrate",
                "--resume",
                &run,
                "--progress",
                "plain",
                "--json",
            ],
        );
        if code(&out) == 3 && stderr(&out).contains("still being orchestrated") {
            std::thread::sleep(Duration::from_millis(500));
            return false;
        }
        resumed = Some(out);
        true
    });
    let out = resumed.unwrap();
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let lines = fs::read_to_string(&ran).unwrap();
    assert_eq!(
        lines.lines().filter(|l| l.starts_with("a ")).count(),
        1,
        "{lines}"
    );
    assert_eq!(
        lines.lines().filter(|l| l.starts_with("b ")).count(),
        1,
        "{lines}"
    );
    let log = fleet.hosts[1].git(&["log", "--format=%s", "handover-merged"]);
    assert!(log.contains("task a") && log.contains("task b"), "{log}");
}

#[test]
fn fleet_tasks_retry_and_time_out_as_local_ones_do() {
    let Some(fleet) = Fleet::new(2) else { return };
    let marks = fleet.hosts[0].scratch();
    let flaky = format!(
        "if [ -e {m}/tried ]; then {}; else touch {m}/tried; exit 5; fi",
        committing("flaky", &marks.join("ran")),
        m = marks.display()
    );
    let plan = json!({
        "name": "retries",
        "tasks": [
            { "id": "flaky", "command": flaky, "retries": 1 },
            { "id": "slow", "command": "sleep 30", "timeout": "1s" },
        ],
    });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _worker = fleet.worker(1, &["--capacity", "2"]);
    let out = fleet.run(
        0,
        &[
            "orchestrate",
            "--plan",
            plan.to_str().unwrap(),
            "--fleet",
            "--progress",
            "plain",
            "--json",
        ],
    );
    assert_eq!(code(&out), 1, "{}\n{}", stdout(&out), stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let task = |id: &str| {
        summary["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(task("flaky")["status"], "succeeded", "{summary}");
    assert_eq!(task("flaky")["attempts"], 2, "{summary}");
    assert!(
        !stderr(&out).contains("stopped renewing"),
        "a retry is not a lost lease: {}",
        stderr(&out)
    );
    assert_eq!(task("slow")["status"], "failed", "{summary}");
    assert!(
        task("slow")["detail"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{summary}"
    );
}

#[test]
fn ctrl_c_takes_back_untaken_offers_leaves_leased_attempts_running_and_resume_finishes_both() {
    let Some(fleet) = Fleet::new(3) else { return };
    let marks = fleet.hosts[0].scratch();
    let ran = marks.join("ran");
    let slow = format!(
        "touch {m}/started-a && sleep 3 && {}",
        committing("a", &ran),
        m = marks.display()
    );
    let plan = json!({
        "name": "stopped",
        "tasks": [
            { "id": "a", "command": slow },
            { "id": "gpu", "command": committing("gpu", &ran), "on": { "gpu": "1" } },
        ],
    });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _plain = fleet.worker(1, &[]);
    let orchestrator =
        fleet.hosts[0].spawn(fleet.orchestrate(&plan, &["--progress", "plain", "--json"]));
    wait_for("task a to start", Duration::from_secs(30), || {
        marks.join("started-a").exists()
    });
    let waiting = fleet.run(0, &["fleet"]);
    assert!(
        stdout(&waiting).contains("no live host has the labels gpu=1"),
        "app fleet says why the task waits: {}",
        stdout(&waiting)
    );
    let out = orchestrator.wait_after(Signal::SIGINT, Duration::from_secs(30));
    assert_eq!(code(&out), 130, "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["run"]["status"], "interrupted", "{summary}");
    let run = summary["run"]["id"].as_str().unwrap().to_string();
    // The leased attempt goes on; the untaken offer is gone (no host may take it now).
    wait_for(
        "task a to finish on its host",
        Duration::from_secs(30),
        || fs::read_to_string(&ran).is_ok_and(|text| text.contains("a host1")),
    );
    let _gpu = fleet.worker(2, &["--labels", "gpu=1"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !fs::read_to_string(&ran).unwrap().contains("gpu "),
        "a taken-back offer is not run"
    );
    let out = fleet.run(
        0,
        &[
            "orchestrate",
            "--resume",
            &run,
            "--progress",
            "plain",
            "--json",
        ],
    );
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let lines = fs::read_to_string(&ran).unwrap();
    assert_eq!(
        lines.lines().filter(|l| l.starts_with("a ")).count(),
        1,
        "{lines}"
    );
    assert_eq!(
        lines.lines().filter(|l| *l == "gpu host2").count(),
        1,
        "{lines}"
    );
}

#[test]
fn fail_fast_on_the_fleet_takes_back_the_offers_no_host_took_and_the_run_ends() {
    let Some(fleet) = Fleet::new(3) else { return };
    let ran = fleet.hosts[0].scratch().join("ran");
    // Both are offered at once (max_concurrent 2); only "bad" finds a host.
    let plan = json!({
        "name": "failfast",
        "max_concurrent": 2,
        "tasks": [
            { "id": "bad", "command": "exit 7" },
            { "id": "gpu", "command": committing("gpu", &ran), "on": { "gpu": "1" } },
        ],
    });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _plain = fleet.worker(1, &[]);
    let orchestrator = fleet.hosts[0]
        .spawn(fleet.orchestrate(&plan, &["--fail-fast", "--progress", "plain", "--json"]));
    // Without taking the offer back, the run would wait for a host with gpu=1.
    let out = orchestrator.wait(Duration::from_secs(60));
    assert_eq!(code(&out), 1, "{}\n{}", stdout(&out), stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["run"]["status"], "failed", "{summary}");
    let status = |id: &str| {
        summary["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task_id"] == id)
            .map(|t| t["status"].clone())
    };
    assert_eq!(status("bad"), Some(json!("failed")), "{summary}");
    assert_eq!(status("gpu"), Some(json!("cancelled")), "{summary}");
    // The offer is gone from the server: a host that could take it now takes nothing.
    let _gpu = fleet.worker(2, &["--labels", "gpu=1"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !fs::read_to_string(&ran)
            .unwrap_or_default()
            .contains("gpu "),
        "a taken-back offer is not run"
    );
    let view = fleet.run(0, &["fleet", "--json"]);
    assert_eq!(code(&view), 0, "{}", stderr(&view));
    let view: Value = serde_json::from_slice(&view.stdout).unwrap();
    assert_eq!(
        view["waiting"],
        json!([]),
        "no task of the run waits for a host: {view}"
    );
}

/// What `app recv --json` printed: one message per line.
fn received(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|line| line.ends_with('}'))
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn a_message_to_an_instance_on_another_host_arrives_there_once_signed_bounded_and_expiring() {
    let Some(fleet) = Fleet::new(2) else { return };
    let _a1 = fleet.instance(0, "a1", 1);
    let _b1 = fleet.instance(1, "b1", 0);
    let state = fleet.hosts[0].state_dir().join("coordination_queue");

    // host1 -> a1 on host0: through the server; host0 receives it, once.
    let out = fleet.run(1, &["send", "--from", "b1", "--to", "a1", "rebase on main"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    assert!(
        !fleet.hosts[1]
            .state_dir()
            .join("coordination_queue/inbox/a1")
            .exists(),
        "nothing for a1 was filed on host1"
    );
    let out = fleet.run(0, &["recv", "--instance", "a1", "--wait", "20s", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let got = received(&stdout(&out));
    assert_eq!(got.len(), 1, "{}", stdout(&out));
    assert_eq!(got[0]["id"], id.as_str());
    assert_eq!(got[0]["from"], "b1");
    assert_eq!(got[0]["recipient"], "a1");
    assert_eq!(got[0]["payload"], "rebase on main");
    let out = fleet.run(0, &["recv", "--instance", "a1"]);
    assert_eq!(code(&out), 1, "acknowledged: not again: {}", stdout(&out));

    // A local recipient stays on the files: host0 -> a1 is a file of host0's inbox.
    let out = fleet.run(0, &["send", "--from", "x", "--to", "a1", "local"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let local_id = stdout(&out).trim().to_string();
    assert!(state.join(format!("inbox/a1/{local_id}.json")).exists());
    let out = fleet.run(0, &["recv", "--instance", "a1"]);
    assert_eq!(stdout(&out).split_whitespace().nth(3), Some("local"));

    // A broadcast reaches other hosts only with --fleet.
    let out = fleet.run(1, &["send", "--from", "b1", "--to", "all", "here only"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("to 0 live instance(s)"),
        "{}",
        stderr(&out)
    );
    let out = fleet.run(
        1,
        &["send", "--from", "b1", "--to", "all", "--fleet", "everyone"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("to 1 live instance(s), 1 of them on other hosts"),
        "{}",
        stderr(&out)
    );
    let out = fleet.run(0, &["recv", "--instance", "a1", "--wait", "20s"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).ends_with("b1 text everyone\n"),
        "{}",
        stdout(&out)
    );

    // Bad input changes nothing: no secret, an oversized payload, --fleet without a server.
    let mut command = fleet.app(1, &["send", "--from", "b1", "--to", "a1", "x"]);
    command.env_remove("APP_SHARED_SECRET");
    let out = command.output().unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("runs on host host0") && stderr(&out).contains("APP_SHARED_SECRET"),
        "{}",
        stderr(&out)
    );
    let big = "x".repeat(2000);
    let out = fleet.run(1, &["send", "--from", "b1", "--to", "a1", &big]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let mut command = fleet.app(1, &["send", "--from", "b1", "--to", "all", "--fleet", "x"]);
    command.env_remove("APP_DB_URL");
    let out = command.output().unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("APP_DB_URL"), "{}", stderr(&out));
    let out = fleet.run(0, &["recv", "--instance", "a1"]);
    assert_eq!(code(&out), 1, "none of them was sent: {}", stdout(&out));

    // Signed with another secret: refused and quarantined on the receiving host.
    let mut command = fleet.app(1, &["send", "--from", "b1", "--to", "a1", "forged"]);
    command.env("APP_SHARED_SECRET", "another-secret");
    let out = command.output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let forged = stdout(&out).trim().to_string();
    let out = fleet.run(0, &["recv", "--instance", "a1"]);
    assert_eq!(code(&out), 1, "never delivered: {}", stdout(&out));
    assert!(stderr(&out).contains("1 untrusted"), "{}", stderr(&out));
    let reason = fs::read_to_string(state.join(format!("quarantine/a1-{forged}.json.reason")));
    assert!(reason.unwrap().contains("signature does not verify"));

    // Unacknowledged past its TTL: to the dead letters, with the reason.
    let out = fleet.run(
        1,
        &[
            "send", "--from", "b1", "--to", "a1", "--ttl", "200ms", "late",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let late = stdout(&out).trim().to_string();
    std::thread::sleep(Duration::from_millis(400));
    let out = fleet.run(0, &["recv", "--instance", "a1"]);
    assert_eq!(code(&out), 1, "expired: {}", stdout(&out));
    let dead = fs::read(state.join(format!("dead/a1-{late}.json"))).unwrap();
    let record: Value = serde_json::from_slice(&dead).unwrap();
    assert!(record["reason"].as_str().unwrap().contains("TTL"));
    assert_eq!(record["message"]["payload"], "late");
    let doctor = fleet.run(0, &["doctor"]);
    assert!(
        stdout(&doctor).contains("dead letter") && stdout(&doctor).contains("quarantined"),
        "{}",
        stdout(&doctor)
    );
}

#[test]
fn messages_from_senders_killed_mid_stream_on_one_host_arrive_once_each_on_another() {
    let Some(fleet) = Fleet::new(2) else { return };
    let _a1 = fleet.instance(0, "a1", 1);
    let scratch = fleet.hosts[1].scratch();
    let inbox = scratch.join("a1.jsonl");
    let _receiver = fleet.hosts[0].spawn(fleet.shell(
        0,
        &format!(
            "exec \"$APP_BIN\" recv --instance a1 --follow --json > {}",
            inbox.display()
        ),
    ));
    // 4 senders x 25 messages; each records what it was told was sent.
    let senders: Vec<Running> = (0..4)
        .map(|s| {
            let script = format!(
                r#"for i in $(seq 25); do
                     id=$("$APP_BIN" send --from s{s} --to a1 "s{s}-$i") || exit 1
                     echo "s{s}-$i" >> {sent}/sent.s{s}
                   done"#,
                sent = scratch.display()
            );
            fleet.hosts[1].spawn(fleet.shell(1, &script))
        })
        .collect();
    let sent = |s: usize| -> Vec<String> {
        fs::read_to_string(scratch.join(format!("sent.s{s}")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    // Two senders die mid-stream, in the middle of whatever request they were making.
    let mut senders = senders.into_iter();
    let (first, second) = (senders.next().unwrap(), senders.next().unwrap());
    wait_for("the first sends", Duration::from_secs(60), || {
        sent(0).len() >= 5
    });
    first.kill_now();
    wait_for("more sends", Duration::from_secs(60), || {
        sent(1).len() >= 10
    });
    second.kill_now();
    for sender in senders {
        let out = sender.wait(Duration::from_secs(300));
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let reported: BTreeMap<String, ()> = (0..4).flat_map(sent).map(|p| (p, ())).collect();
    assert!(reported.len() >= 5 + 10 + 50, "{}", reported.len());
    let payloads = || -> Vec<String> {
        received(&fs::read_to_string(&inbox).unwrap_or_default())
            .iter()
            .map(|m| m["payload"].as_str().unwrap().to_string())
            .collect()
    };
    wait_for(
        "every reported message to arrive",
        Duration::from_secs(60),
        || {
            let got = payloads();
            reported.keys().all(|p| got.contains(p))
        },
    );
    let got = payloads();
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "no message twice: {got:?}");
    // What arrived and was not reported came from a sender killed after its request landed.
    for extra in got.iter().filter(|p| !reported.contains_key(*p)) {
        assert!(
            extra.starts_with("s0-") || extra.starts_with("s1-"),
            "{extra}"
        );
    }
}

#[test]
fn a_host_with_another_secret_takes_nothing_and_app_fleet_says_it_is_refused() {
    let Some(fleet) = Fleet::new(3) else { return };
    let ran = fleet.hosts[0].scratch().join("ran");
    let mut stranger = fleet.app(1, &["worker", "--name", "stranger"]);
    stranger.env("APP_SHARED_SECRET", "another-secret");
    let _stranger = fleet.hosts[1].spawn(stranger);
    wait_for("the stranger to register", Duration::from_secs(20), || {
        stdout(&fleet.run(0, &["fleet"])).contains("stranger")
    });
    let plan =
        json!({ "name": "secret", "tasks": [{ "id": "t", "command": committing("t", &ran) }] });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let orchestrator = fleet.hosts[0].spawn(fleet.orchestrate(&plan, &["--progress", "plain"]));
    wait_for("the task to be offered", Duration::from_secs(20), || {
        stdout(&fleet.run(0, &["fleet"])).contains("waiting: secret-")
    });
    let view = stdout(&fleet.run(0, &["fleet"]));
    assert!(
        view.contains("refused (another APP_SHARED_SECRET)"),
        "{view}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!ran.exists(), "the host with another secret ran nothing");
    let _friend = fleet.worker(2, &[]);
    let out = orchestrator.wait(Duration::from_secs(60));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read_to_string(&ran).unwrap(), "t host2\n");
}

/// `app lock acquire --fleet NAME` from a shell on host `n` that then sleeps: the shell
/// (become `sleep`, same pid and start time) holds the lock. Returns once it holds it.
fn shell_holding(fleet: &Fleet, n: usize, name: &str) -> Running {
    let mut shell = fleet.command(n, "sh");
    shell.args([
        "-c",
        &format!("\"$APP_BIN\" lock acquire --fleet {name} && exec sleep 600"),
    ]);
    let holder = fleet.hosts[n].spawn(shell);
    let pid = holder.pid();
    wait_for(
        "the shell to hold the lock",
        Duration::from_secs(20),
        || fleet.fleet_lock(n, name)["holder"]["pid"] == pid,
    );
    holder
}

#[test]
fn a_fleet_lock_raced_by_eight_processes_on_two_hosts_has_one_holder_at_a_time_and_growing_tokens()
{
    let Some(fleet) = Fleet::new(2) else { return };
    let record = fleet.hosts[0].scratch().join("holds");
    // Each hold writes its start and end with its token; a hold overlapping another would
    // show as two starts in a row.
    let hold = format!(
        "echo \"start $APP_LOCK_TOKEN $FLEET_HOST $(date +%s%N)\" >> {file}; sleep 0.1; echo \"end $APP_LOCK_TOKEN $FLEET_HOST $(date +%s%N)\" >> {file}",
        file = record.display()
    );
    let rounds = 3;
    std::thread::scope(|scope| {
        for process in 0..8 {
            let (fleet, hold) = (&fleet, &hold);
            scope.spawn(move || {
                let host = process % 2;
                for _ in 0..rounds {
                    let racer = fleet.hosts[host].spawn(fleet.app(
                        host,
                        &["lock", "run", "--fleet", "race", "--", "sh", "-c", hold],
                    ));
                    let out = racer.wait(Duration::from_secs(180));
                    assert_eq!(code(&out), 0, "{}", stderr(&out));
                }
            });
        }
    });
    let lines = fs::read_to_string(&record).unwrap();
    let events: Vec<(String, u64, String, u128)> = lines
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (
                fields[0].to_string(),
                fields[1].parse().unwrap(),
                fields[2].to_string(),
                fields[3].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(events.len(), 8 * rounds * 2, "{lines}");
    let mut last_token = 0;
    let mut last_end = 0;
    for pair in events.chunks(2) {
        let [
            (start, token, host, began),
            (end, end_token, end_host, ended),
        ] = pair
        else {
            unreachable!("an even number of events")
        };
        assert_eq!(
            (start.as_str(), end.as_str(), token, host),
            ("start", "end", end_token, end_host),
            "two holders at once:\n{lines}"
        );
        assert!(*token > last_token, "tokens must grow:\n{lines}");
        assert!(last_end <= *began && began <= ended, "overlap:\n{lines}");
        (last_token, last_end) = (*token, *ended);
    }
    let hosts: std::collections::BTreeSet<&str> =
        events.iter().map(|(_, _, host, _)| host.as_str()).collect();
    assert_eq!(hosts.len(), 2, "both hosts held it: {lines}");
    let state = fleet.fleet_lock(1, "race");
    assert_eq!(state["holder"], Value::Null, "{state}");
    assert_eq!(state["token"], last_token, "{state}");
}

#[test]
fn a_killed_fleet_holder_lapses_at_once_on_its_host_and_after_the_ttl_elsewhere() {
    let Some(fleet) = Fleet::new(2) else { return };
    // A long-lived holder of another lock keeps host0's heartbeat fresh.
    let keepalive = fleet.hosts[0].spawn(fleet.app(
        0,
        &["lock", "run", "--fleet", "keepalive", "--", "sleep", "600"],
    ));
    wait_for("the keepalive lock", Duration::from_secs(20), || {
        fleet.fleet_lock(0, "keepalive")["holder"] != Value::Null
    });
    let victim = shell_holding(&fleet, 0, "victim");
    let token = fleet.fleet_lock(0, "victim")["token"].as_u64().unwrap();
    kill(victim.pid(), Signal::SIGKILL);
    drop(victim);
    // host1 cannot see the process: host0's heartbeat says its holders live.
    let out = fleet.run(
        1,
        &["lock", "acquire", "--fleet", "victim", "--timeout", "0s"],
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("on host0"), "{}", stderr(&out));
    // host0 asks /proc: the holder is gone, the lock is free at once.
    let out = fleet.run(
        0,
        &["lock", "acquire", "--fleet", "victim", "--timeout", "0s"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), (token + 1).to_string());
    let out = fleet.run(0, &["lock", "release", "--fleet", "victim"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // With every process of host0 gone, its holds lapse for host1 after the lease TTL.
    let victim = shell_holding(&fleet, 0, "victim");
    kill(victim.pid(), Signal::SIGKILL);
    drop(victim);
    keepalive.kill_now();
    let out = fleet.run(
        1,
        &["lock", "acquire", "--fleet", "victim", "--timeout", "60s"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), (token + 3).to_string());
    let state = fleet.fleet_lock(1, "victim");
    assert_eq!(state["holder"]["host"], "host1", "{state}");
    assert_eq!(state["lapsed"], Value::Null, "{state}");
}

#[test]
fn a_fleet_reservation_on_one_host_stops_check_paths_and_the_pre_commit_hook_on_another() {
    let Some(fleet) = Fleet::new(2) else { return };
    // An instance on host0 (its supervisor keeps the host's heartbeat).
    let instance = fleet.hosts[0].spawn(fleet.app(0, &["run", "--", "sleep", "600"]));
    wait_for("the instance to run", Duration::from_secs(30), || {
        let out = fleet.run(0, &["instance", "list", "--json"]);
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        listed.as_array().is_some_and(|all| {
            all.iter()
                .any(|i| i["pid"] == instance.pid() && !i["child_pid"].is_null())
        })
    });
    let out = fleet.run(
        0,
        &["reserve", "--fleet", "src/**", "--reason", "schema work"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let listed = fleet.run(1, &["reservations", "--fleet", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["holder"]["host"], "host0", "{listed}");
    assert_eq!(listed[0]["lapsed"], Value::Null, "{listed}");
    let out = fleet.run(1, &["check-paths", "src/lib.txt"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("schema work"), "{}", stderr(&out));
    let out = fleet.run(1, &["check-paths", "README.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = fleet.run(1, &["reserve", "--fleet", "src/lib.txt"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    // The pre-commit hook on host1 refuses a commit touching the reserved file.
    let out = fleet.run(1, &["hooks", "install"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let head = fleet.hosts[1].git(&["rev-parse", "HEAD"]);
    fs::write(fleet.hosts[1].root().join("src/lib.txt"), "changed\n").unwrap();
    fleet.hosts[1].git(&["add", "src/lib.txt"]);
    let commit = |message: &str| {
        fleet
            .command(1, "git")
            .args(["commit", "-q", "-m", message])
            .output()
            .unwrap()
    };
    let out = commit("touches a reserved file");
    assert_ne!(code(&out), 0, "the hook let it through");
    assert!(stderr(&out).contains("host0"), "{}", stderr(&out));
    assert_eq!(fleet.hosts[1].git(&["rev-parse", "HEAD"]), head);
    // Released on host0, the same commit goes through.
    let out = fleet.run(0, &["release", "--fleet"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = commit("touches a free file");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let listed = fleet.run(1, &["reservations", "--fleet", "--json"]);
    assert_eq!(stdout(&listed).trim(), "[]");
}

#[test]
fn fleet_locks_and_reservations_without_a_server_exit_2_and_change_nothing() {
    let repo = TestRepo::new();
    for args in [
        &["lock", "acquire", "--fleet", "db-schema"][..],
        &["lock", "release", "--fleet", "db-schema"],
        &["lock", "list", "--fleet"],
        &["lock", "run", "--fleet", "db-schema", "--", "true"],
        &["reserve", "--fleet", "src/**"],
        &["reservations", "--fleet"],
        &["release", "--fleet"],
    ] {
        let out = repo.run_app(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("APP_DB_URL"), "{}", stderr(&out));
    }
    assert!(!repo.state_dir().exists(), ".app/ was created");
    assert!(!repo.db_path().exists(), "a local database was created");
}

#[test]
fn a_worker_killed_mid_task_loses_its_lease_and_the_task_finishes_on_another_host_losing_nothing() {
    let Some(fleet) = Fleet::new(3) else { return };
    let marks = fleet.hosts[0].scratch();
    let script = format!(
        "echo $FLEET_HOST > who.txt && git add who.txt && git commit -qm \"work on $FLEET_HOST\" && touch {m}/started-$FLEET_HOST && sleep 2",
        m = marks.display()
    );
    let plan = json!({
        "name": "killed", "integration": "killed-merged",
        "tasks": [{ "id": "t", "command": script }],
    });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let doomed = fleet.worker(1, &[]);
    let orchestrator =
        fleet.hosts[0].spawn(fleet.orchestrate(&plan, &["--progress", "plain", "--json"]));
    wait_for(
        "the first attempt to start",
        Duration::from_secs(30),
        || marks.join("started-host1").exists(),
    );
    doomed.kill_now();
    let _other = fleet.worker(2, &[]);
    let out = orchestrator.wait(Duration::from_secs(60));
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let merged = fleet.hosts[0].git(&["log", "--format=%s", "killed-merged"]);
    assert_eq!(
        merged
            .lines()
            .filter(|l| l.starts_with("work on"))
            .collect::<Vec<_>>(),
        ["work on host2"],
        "the task's work is in once, from the host that finished it"
    );
    // The killed host's commit is not lost: its attempt's `app run` outlived the worker and
    // left it on the task branch there.
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = summary["run"]["id"].as_str().unwrap();
    wait_for(
        "the orphaned attempt to end on host1",
        Duration::from_secs(30),
        || {
            fleet.hosts[1]
                .instances()
                .iter()
                .all(|record| !record.id.contains("-t-"))
        },
    );
    let kept = fleet.hosts[1].git(&["log", "--format=%s", &format!("app/{run}/t")]);
    assert!(kept.contains("work on host1"), "{kept}");
    // When the worker runs again there, it pushes that work to its lease's own ref.
    let _again = fleet.worker(1, &[]);
    wait_for(
        "the dead attempt's work on the remote",
        Duration::from_secs(30),
        || {
            fleet
                .remote_refs(&format!("refs/app/fleet/{run}/t/*"))
                .len()
                == 2
        },
    );
    fleet.hosts[0].git(&[
        "fetch",
        "-q",
        "origin",
        &format!("refs/app/fleet/{run}/t/*:refs/dead/*"),
    ]);
    let pushed = fleet.hosts[0].git(&["log", "--format=%s", "--glob=refs/dead/*"]);
    assert!(pushed.contains("work on host1"), "{pushed}");
}

#[test]
fn a_host_in_its_own_network_namespace_reaches_the_server_over_a_veth_and_takes_its_tasks() {
    // Declared first, so it is removed last: after the processes inside it have ended.
    let Some(netns) = Netns::create() else { return };
    let Some(sqld) = Sqld::start_on(netns.outer) else {
        return;
    };
    let fleet = Fleet::with_server(sqld, 3);
    let ran = fleet.hosts[0].scratch().join("ran");
    let tasks: Vec<Value> = (0..4)
        .map(|i| {
            let id = format!("t{i}");
            let net = if i < 2 { "root" } else { "ns" };
            json!({ "id": id, "command": committing(&id, &ran), "on": { "net": net } })
        })
        .collect();
    let plan = json!({
        "name": "netns", "max_concurrent": 4, "integration": "netns-merged", "tasks": tasks,
    });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _outside = fleet.worker(1, &["--capacity", "2", "--labels", "net=root"]);
    let inside = fleet.app(
        2,
        &[
            "worker",
            "--name",
            "host2",
            "--capacity",
            "2",
            "--labels",
            "net=ns",
        ],
    );
    let inside = fleet.spawn_worker(2, netns.exec(&inside));
    let net = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(
        net(&inside.pid().to_string()),
        net("self"),
        "the worker runs in the other namespace"
    );
    let out = fleet.run(
        0,
        &[
            "orchestrate",
            "--plan",
            plan.to_str().unwrap(),
            "--fleet",
            "--progress",
            "plain",
        ],
    );
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let lines = fs::read_to_string(&ran).unwrap();
    let mut ran_on: Vec<&str> = lines.lines().collect();
    ran_on.sort();
    assert_eq!(
        ran_on,
        ["t0 host1", "t1 host1", "t2 host2", "t3 host2"],
        "every task once, t2 and t3 on the namespaced host: {lines}"
    );
    let log = fleet.hosts[0].git(&["log", "--format=%s", "netns-merged"]);
    for i in 0..4 {
        let subject = format!("task t{i}");
        assert_eq!(log.lines().filter(|l| *l == subject).count(), 1, "{log}");
    }
}

/// A network namespace joined to the root namespace by a veth pair: a host inside reaches the
/// server over a routed address, not a loopback it shares. Removed on drop, also when the test
/// fails half-way.
pub(crate) struct Netns {
    name: String,
    /// The root namespace's end of the pair (deleting it deletes both ends).
    outer_link: String,
    /// The address of that end, where the server listens.
    pub(crate) outer: std::net::Ipv4Addr,
}

impl Netns {
    /// A namespace named after this test process, with a /30 of 10.128.0.0/9 of its own; `None`,
    /// said loudly, where the machine does not allow one (not root, no `ip`, no namespaces),
    /// a failure under CI (which runs as root).
    pub(crate) fn create() -> Option<Netns> {
        let pid = std::process::id();
        let base = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + (pid % (1 << 21)) * 4;
        let netns = Netns {
            name: format!("app-it-{pid}"),
            outer_link: format!("appo{pid}"),
            outer: (base + 1).into(),
        };
        let inner_link = format!("appi{pid}");
        let inner = format!("{}/30", std::net::Ipv4Addr::from(base + 2));
        let outer = format!("{}/30", netns.outer);
        let name = netns.name.as_str();
        let steps: [&[&str]; 8] = [
            &["netns", "add", name],
            &[
                "link",
                "add",
                &netns.outer_link,
                "type",
                "veth",
                "peer",
                "name",
                &inner_link,
            ],
            &["link", "set", &inner_link, "netns", name],
            &["addr", "add", &outer, "dev", &netns.outer_link],
            &["link", "set", &netns.outer_link, "up"],
            &[
                "netns",
                "exec",
                name,
                "ip",
                "addr",
                "add",
                &inner,
                "dev",
                &inner_link,
            ],
            &[
                "netns",
                "exec",
                name,
                "ip",
                "link",
                "set",
                &inner_link,
                "up",
            ],
            &["netns", "exec", name, "ip", "link", "set", "lo", "up"],
        ];
        if !nix::unistd::geteuid().is_root() {
            return skip("the test does not run as root");
        }
        for step in steps {
            match hermetic("ip").args(step).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => return skip(&format!("'ip {}': {}", step.join(" "), stderr(&out))),
                Err(err) => return skip(&format!("no 'ip' command: {err}")),
            }
        }
        Some(netns)
    }

    /// `command` run inside the namespace, with the same arguments, environment and directory.
    fn exec(&self, command: &Command) -> Command {
        let mut wrapped = hermetic("ip");
        wrapped
            .args(["netns", "exec", &self.name])
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Each may fail when creation stopped half-way; what exists is removed.
        let _ = hermetic("ip")
            .args(["link", "del", &self.outer_link])
            .output();
        let _ = hermetic("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Says loudly that the namespace variant does not run here, or fails under CI.
fn skip<T>(why: &str) -> Option<T> {
    let message = format!("NETWORK NAMESPACE TEST SKIPPED: {why}");
    assert!(
        std::env::var_os("CI").is_none(),
        "{message} (required under CI, which runs as root)"
    );
    eprintln!("\n!!! {message}\n");
    None
}

/// `app doctor --json` (or with `--fix`) on host `n`: its code and its report.
fn doctor(fleet: &Fleet, n: usize, fix: bool) -> (i32, Value) {
    let args: &[&str] = if fix {
        &["doctor", "--fix", "--json"]
    } else {
        &["doctor", "--json"]
    };
    let out = fleet.run(n, args);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}\n{}", stdout(&out), stderr(&out)));
    (code(&out), report)
}

/// The entries of `report[list]` of `kind`.
fn of_kind(report: &Value, list: &str, kind: &str) -> Vec<Value> {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == kind || f["finding"]["kind"] == kind)
        .cloned()
        .collect()
}

#[test]
fn doctor_reports_a_sigkilled_worker_and_its_expired_lease_and_fix_hands_the_task_to_a_live_one() {
    let Some(fleet) = Fleet::new(3) else { return };
    let marks = fleet.hosts[0].scratch();
    let ran = marks.join("ran");
    let script = format!(
        "if [ \"$FLEET_HOST\" = host1 ]; then echo $$ > {m}/pid-host1; exec sleep 60; fi; {}",
        committing("a", &ran),
        m = marks.display()
    );
    let plan = json!({ "name": "dies", "tasks": [{ "id": "a", "command": script }] });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let doomed = fleet.worker(1, &[]);
    let orchestrator =
        fleet.hosts[0].spawn(fleet.orchestrate(&plan, &["--progress", "plain", "--json"]));
    let pid_file = marks.join("pid-host1");
    wait_for(
        "the first attempt to start",
        Duration::from_secs(30),
        || fs::read_to_string(&pid_file).is_ok_and(|pid| pid.trim().parse::<u32>().is_ok()),
    );
    // The host dies: its worker and the attempt's command, at once.
    doomed.kill_now();
    let command: u32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(command, Signal::SIGKILL);
    let mut report = Value::Null;
    wait_for(
        "doctor to see the dead host and its expired lease",
        Duration::from_secs(30),
        || {
            report = doctor(&fleet, 0, false).1;
            !of_kind(&report, "findings", "dead-host").is_empty()
                && !of_kind(&report, "findings", "expired-lease").is_empty()
        },
    );
    let dead = &of_kind(&report, "findings", "dead-host")[0];
    assert_eq!(dead["subject"], "host1", "{report}");
    let lease = &of_kind(&report, "findings", "expired-lease")[0];
    let run = lease["subject"]
        .as_str()
        .unwrap()
        .strip_suffix("/a")
        .unwrap()
        .to_string();
    assert!(
        dead["problem"]
            .as_str()
            .unwrap()
            .contains(&format!("still holds {run}/a#1 (token ")),
        "{report}"
    );
    assert!(
        lease["problem"]
            .as_str()
            .unwrap()
            .contains("attempt 1 on host host1"),
        "{report}"
    );
    assert_eq!(lease["fixable"], true, "{report}");

    let (_, fixed) = doctor(&fleet, 0, true);
    let outcome = |kind: &str| of_kind(&fixed, "fixed", kind)[0]["outcome"]["Ok"].clone();
    assert!(
        outcome("dead-host")
            .as_str()
            .unwrap()
            .contains("marked stopped"),
        "{fixed}"
    );
    assert!(
        outcome("expired-lease")
            .as_str()
            .unwrap()
            .contains("handed back"),
        "{fixed}"
    );
    for kind in ["dead-host", "expired-lease"] {
        assert!(of_kind(&fixed, "remaining", kind).is_empty(), "{fixed}");
    }
    // The host's row is kept, stopped; the task is offered again to whoever comes.
    let view: Value = serde_json::from_slice(&fleet.run(0, &["fleet", "--json"]).stdout).unwrap();
    let host1 = view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"]["name"] == "host1")
        .unwrap();
    assert_eq!(host1["host"]["state"], "stopped", "{view}");
    assert_eq!(view["waiting"][0]["task"]["state"], "offered", "{view}");
    assert_eq!(view["waiting"][0]["task"]["host"], Value::Null, "{view}");

    let _live = fleet.worker(2, &[]);
    let out = orchestrator.wait(Duration::from_secs(60));
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let task = &summary["tasks"][0];
    assert_eq!(task["status"], "succeeded", "{summary}");
    assert_eq!(task["attempts"], 2, "a new attempt: {summary}");
    assert_eq!(fs::read_to_string(&ran).unwrap(), "a host2\n");
    let (_, after) = doctor(&fleet, 0, false);
    assert!(
        of_kind(&after, "findings", "dead-host").is_empty(),
        "{after}"
    );
    assert!(
        of_kind(&after, "findings", "expired-lease").is_empty(),
        "{after}"
    );
}

#[test]
fn doctor_deletes_only_remote_attempt_refs_whose_work_is_on_their_task_branch() {
    let Some(fleet) = Fleet::new(2) else { return };
    let ran = fleet.hosts[0].scratch().join("ran");
    let plan =
        json!({ "name": "refs", "tasks": [{ "id": "a", "command": committing("a", &ran) }] });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _worker = fleet.worker(1, &[]);
    let out = fleet.run(
        0,
        &[
            "orchestrate",
            "--plan",
            plan.to_str().unwrap(),
            "--fleet",
            "--progress",
            "plain",
            "--json",
        ],
    );
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = summary["run"]["id"].as_str().unwrap().to_string();
    let taken = fleet.remote_refs(&format!("refs/app/fleet/{run}/a/*"));
    assert_eq!(taken.len(), 1, "{taken:?}");
    // Work no run took: a zombie's attempt of this run, and a branch of a run nobody knows.
    let host0 = &fleet.hosts[0];
    let commit = |message: &str| {
        host0
            .git(&["commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", message])
            .trim()
            .to_string()
    };
    let zombie = commit("zombie work");
    let ghost = commit("ghost work");
    let zombie_ref = format!("refs/app/fleet/{run}/a/999999");
    let ghost_ref = "refs/heads/app/ghost-000000/x".to_string();
    host0.git(&["push", "-q", "origin", &format!("{zombie}:{zombie_ref}")]);
    host0.git(&["push", "-q", "origin", &format!("{ghost}:{ghost_ref}")]);

    // Judged from a host that has none of these commits: it fetches them, moving no ref.
    let refs_before = fleet.hosts[1].git(&["for-each-ref"]);
    let (status, report) = doctor(&fleet, 1, false);
    assert_eq!(status, 1, "{report}");
    assert_eq!(fleet.hosts[1].git(&["for-each-ref"]), refs_before);
    let found = of_kind(&report, "findings", "fleet-ref");
    let finding = |name: &str| {
        found
            .iter()
            .find(|f| f["subject"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .clone()
    };
    assert_eq!(finding(&taken[0])["fixable"], true, "{report}");
    let zombie_finding = finding(&zombie_ref);
    assert_eq!(zombie_finding["fixable"], false, "{report}");
    assert!(
        zombie_finding["problem"]
            .as_str()
            .unwrap()
            .contains("holding commits its task branch lacks"),
        "{report}"
    );
    assert!(
        zombie_finding["fix"].as_str().unwrap().contains(&format!(
            "git push --force-with-lease={zombie_ref}:{zombie} origin :{zombie_ref}"
        )),
        "{report}"
    );
    assert!(
        finding(&ghost_ref)["problem"]
            .as_str()
            .unwrap()
            .contains("no run ghost-000000"),
        "{report}"
    );
    assert_eq!(
        found.len(),
        3,
        "the run's task branch is its result: {report}"
    );

    let (status, fixed) = doctor(&fleet, 1, true);
    assert_eq!(status, 1, "work is left for its owner: {fixed}");
    let done = of_kind(&fixed, "fixed", "fleet-ref");
    assert_eq!(done.len(), 1, "{fixed}");
    assert_eq!(done[0]["finding"]["subject"], taken[0].as_str());
    assert_eq!(
        of_kind(&fixed, "remaining", "fleet-ref").len(),
        2,
        "{fixed}"
    );
    assert!(
        fleet.remote_refs(&taken[0]).is_empty(),
        "the taken attempt ref is gone"
    );
    let tip = |name: &str| {
        host0
            .git(&["ls-remote", fleet.remote.to_str().unwrap(), name])
            .split('\t')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(tip(&zombie_ref), zombie, "unmerged work is kept");
    assert_eq!(tip(&ghost_ref), ghost, "unknown work is kept");
    let branch = tip(&format!("refs/heads/app/{run}/a"));
    let subjects = host0.git(&["log", "--format=%s", &branch]);
    assert!(subjects.contains("task a"), "{subjects}");
    let (_, again) = doctor(&fleet, 1, true);
    assert!(of_kind(&again, "fixed", "fleet-ref").is_empty(), "{again}");
}

#[test]
fn doctor_moves_this_hosts_expired_fleet_messages_to_its_dead_letters_and_notices_the_others() {
    let Some(fleet) = Fleet::new(2) else { return };
    let _a1 = fleet.instance(0, "a1", 1);
    let _b1 = fleet.instance(1, "b1", 0);
    let out = fleet.run(
        1,
        &[
            "send", "--from", "b1", "--to", "a1", "--ttl", "200ms", "unread",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    std::thread::sleep(Duration::from_millis(400));
    let (_, there) = doctor(&fleet, 1, false);
    assert!(
        of_kind(&there, "findings", "fleet-messages").is_empty(),
        "{there}"
    );
    let noticed = |report: &Value| {
        report["notices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("for a1 on host host0"))
    };
    assert!(noticed(&there), "{there}");
    let (_, here) = doctor(&fleet, 0, false);
    let found = of_kind(&here, "findings", "fleet-messages");
    assert_eq!(found.len(), 1, "{here}");
    assert_eq!(found[0]["subject"], "a1");
    let (_, fixed) = doctor(&fleet, 0, true);
    let done = of_kind(&fixed, "fixed", "fleet-messages");
    assert_eq!(
        done[0]["outcome"]["Ok"], "moved 1 to dead/ and 0 to quarantine/",
        "{fixed}"
    );
    let dead = fleet.hosts[0]
        .state_dir()
        .join(format!("coordination_queue/dead/a1-{id}.json"));
    let record: Value = serde_json::from_slice(&fs::read(&dead).unwrap()).unwrap();
    assert_eq!(record["message"]["payload"], "unread");
    let (_, after) = doctor(&fleet, 1, false);
    assert!(!noticed(&after), "{after}");
}

#[test]
fn doctor_on_a_local_database_asks_nothing_of_the_remote_and_says_what_it_said_before() {
    let repo = TestRepo::new();
    let remote = repo.scratch().join("remote.git");
    repo.git(&["init", "-q", "--bare", remote.to_str().unwrap()]);
    repo.git(&["remote", "add", "origin", remote.to_str().unwrap()]);
    // A task branch of a run no database knows: a server's doctor would report it.
    repo.git(&["push", "-q", "origin", "HEAD:refs/heads/app/ghost-000000/x"]);
    let out = repo.run_app(&["run", "--no-worktree", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = repo.run_app(&["doctor"]);
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "app doctor: nothing to reclaim\n");
}

/// `count` plan tasks that each sleep a second between a start and an end line in `log`.
fn timed_sleeps(count: usize, log: &Path) -> Vec<Value> {
    (0..count)
        .map(|i| {
            json!({
                "id": format!("t{i}"),
                "command": format!(
                    "echo \"start $(date +%s%N)\" >> {l} && sleep 1 && echo \"end $(date +%s%N)\" >> {l}",
                    l = log.display()
                ),
            })
        })
        .collect()
}

/// The start and end lines [`timed_sleeps`] wrote to `log`: how many, and the most tasks that
/// ran at once.
fn spans(log: &Path) -> (usize, i32) {
    let mut events: Vec<(u128, i32)> = fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|line| {
            let (what, at) = line.split_once(' ').unwrap();
            (at.parse().unwrap(), if what == "start" { 1 } else { -1 })
        })
        .collect();
    events.sort();
    let (mut running, mut most) = (0, 0);
    for (_, change) in &events {
        running += change;
        most = most.max(running);
    }
    (events.len(), most)
}

/// The local refs of host `n` the worker's fetches of a start write.
fn fetched_starts(fleet: &Fleet, n: usize) -> Vec<String> {
    fleet.hosts[n]
        .git(&["for-each-ref", "--format=%(refname)", "refs/app/fleet/"])
        .lines()
        .filter(|name| name.ends_with("/start"))
        .map(str::to_string)
        .collect()
}

/// Runs a one-task fleet plan named `name` on host 0; its run id.
fn one_task_run(fleet: &Fleet, name: &str, ran: &Path) -> String {
    let plan = json!({ "name": name, "tasks": [{ "id": "t", "command": committing("t", ran) }] });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let out = fleet.run(
        0,
        &[
            "orchestrate",
            "--plan",
            plan.to_str().unwrap(),
            "--fleet",
            "--progress",
            "none",
            "--json",
        ],
    );
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["run"]["status"], "succeeded", "{summary}");
    summary["run"]["id"].as_str().unwrap().to_string()
}

#[test]
fn a_worker_that_has_the_offered_start_runs_it_without_fetching_and_fetches_one_it_lacks() {
    let Some(fleet) = Fleet::new(2) else { return };
    let ran = fleet.hosts[0].scratch().join("ran");
    let _worker = fleet.worker(1, &["--capacity", "1"]);
    // The start is the clones' shared first commit: host 1 has it, and fetches nothing.
    let first = one_task_run(&fleet, "has", &ran);
    assert_eq!(fetched_starts(&fleet, 1), Vec::<String>::new());
    let tip = fleet.hosts[0].git(&["rev-parse", &format!("app/{first}/t")]);
    assert_eq!(
        fleet.hosts[1].git(&["rev-parse", &format!("app/{first}/t^")]),
        fleet.hosts[0].git(&["rev-parse", "main"]),
        "the task ran from the offered start"
    );
    assert_eq!(
        fleet.hosts[1].git(&["rev-parse", &format!("app/{first}/t")]),
        tip,
        "its commit is the one the orchestrator took"
    );
    // A commit only host 0 has: the start of the next run, which host 1 fetches.
    fs::write(fleet.hosts[0].root().join("newer.txt"), "newer\n").unwrap();
    fleet.hosts[0].git(&["add", "newer.txt"]);
    fleet.hosts[0].git(&["commit", "-qm", "newer"]);
    let main = fleet.hosts[0].git(&["rev-parse", "main"]);
    let second = one_task_run(&fleet, "lacks", &ran);
    assert_eq!(
        fetched_starts(&fleet, 1),
        vec![format!("refs/app/fleet/{second}/t/start")]
    );
    assert_eq!(
        fleet.hosts[1].git(&["rev-parse", &format!("refs/app/fleet/{second}/t/start")]),
        main
    );
    assert_eq!(
        fleet.hosts[1].git(&["rev-parse", &format!("app/{second}/t^")]),
        main,
        "the task ran from the fetched start"
    );
}

#[test]
fn attempts_that_end_while_a_result_push_is_under_way_go_in_one_push_together() {
    use std::os::unix::fs::PermissionsExt;
    let Some(fleet) = Fleet::new(2) else { return };
    let marks = fleet.hosts[0].scratch();
    let ran = marks.join("ran");
    // The remote logs how many attempt refs each push brings, and holds the first such push
    // until the test lets it go.
    let hook = fleet.remote.join("hooks/pre-receive");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\nrefs=$(grep -c ' refs/app/fleet/')\n[ \"$refs\" -gt 0 ] || exit 0\n\
             echo $refs >> {m}/pushes\n\
             if [ ! -e {m}/entered ]; then\n\
               touch {m}/entered\n\
               i=0; while [ ! -e {m}/release ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\n\
             fi\n",
            m = marks.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let tasks: Vec<Value> = (1..=4)
        .map(|i| {
            let id = format!("t{i}");
            json!({ "id": id, "command": committing(&id, &ran) })
        })
        .collect();
    let plan = json!({ "name": "gathered", "max_concurrent": 4, "tasks": tasks });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _worker = fleet.worker(1, &["--capacity", "4"]);
    let orchestrator =
        fleet.hosts[0].spawn(fleet.orchestrate(&plan, &["--progress", "none", "--json"]));
    wait_for("the first result push", Duration::from_secs(30), || {
        marks.join("entered").exists()
    });
    // Every attempt's `app run` has ended (only the worker is left on its host), then a
    // moment for the worker to see it: the three whose push waits for the first one's.
    wait_for("every attempt to end", Duration::from_secs(30), || {
        let out = fleet.run(1, &["instance", "list", "--json"]);
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        fs::read_to_string(&ran).is_ok_and(|text| text.lines().count() == 4)
            && listed.as_array().is_some_and(|all| all.len() == 1)
    });
    std::thread::sleep(Duration::from_secs(1));
    fs::write(marks.join("release"), "").unwrap();
    let out = orchestrator.wait(Duration::from_secs(60));
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["run"]["status"], "succeeded", "{summary}");
    let pushes = fs::read_to_string(marks.join("pushes")).unwrap();
    assert_eq!(
        pushes.lines().collect::<Vec<_>>(),
        ["1", "3"],
        "the first attempt's push, then the three that waited for it in one"
    );
    let run = summary["run"]["id"].as_str().unwrap();
    for i in 1..=4 {
        assert_eq!(
            fleet
                .remote_refs(&format!("refs/app/fleet/{run}/t{i}/*"))
                .len(),
            1,
            "t{i}'s attempt ref is on the remote"
        );
    }
}

#[test]
fn a_worker_never_runs_more_than_its_capacity_though_one_claim_leases_several_tasks() {
    let Some(fleet) = Fleet::new(2) else { return };
    let log = fleet.hosts[0].scratch().join("spans");
    let tasks = timed_sleeps(6, &log);
    let plan = json!({ "name": "capacity", "max_concurrent": 6, "tasks": tasks });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _worker = fleet.worker(1, &["--capacity", "2"]);
    let out = fleet.run(
        0,
        &[
            "orchestrate",
            "--plan",
            plan.to_str().unwrap(),
            "--fleet",
            "--progress",
            "plain",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (events, most) = spans(&log);
    assert_eq!(events, 12, "every task ran once");
    assert!(most <= 2, "at most --capacity at once, saw {most}");
}

#[test]
fn a_fleet_run_offers_every_ready_task_yet_never_runs_more_than_max_concurrent_across_hosts() {
    let Some(fleet) = Fleet::new(3) else { return };
    let log = fleet.hosts[0].scratch().join("spans");
    let tasks = timed_sleeps(8, &log);
    let plan = json!({ "name": "cap", "max_concurrent": 3, "tasks": tasks });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let _one = fleet.worker(1, &["--capacity", "3"]);
    let _two = fleet.worker(2, &["--capacity", "3"]);
    let out = fleet.run(
        0,
        &[
            "orchestrate",
            "--plan",
            plan.to_str().unwrap(),
            "--fleet",
            "--progress",
            "plain",
            "--json",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["run"]["status"], "succeeded", "{summary}");
    let (events, most) = spans(&log);
    assert_eq!(events, 16, "every task ran once");
    assert!(
        most <= 3,
        "at most max_concurrent at once over both hosts (6 slots), saw {most}"
    );
}

/// `GET /overview` of `url` with token `token`.
/// `app serve --with-api` (token `t0ken`) on host 0, once its API answers, and its URL.
fn serve_api(fleet: &Fleet) -> (Running, String) {
    let port = crate::api::free_ports(1);
    let mut serve = fleet.app(
        0,
        &[
            "serve",
            "--with-api",
            "--api-addr",
            &format!("127.0.0.1:{port}"),
            "--instance",
            "dash",
        ],
    );
    serve.env("APP_API_TOKEN", "t0ken");
    let serve = fleet.hosts[0].spawn(serve);
    wait_for("the API to answer", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (serve, format!("http://127.0.0.1:{port}"))
}

fn overview(url: &str, token: &str) -> Value {
    let auth = format!("Bearer {token}");
    let (status, body) =
        crate::api::http(url, "GET", "/overview", &[("Authorization", &auth)], None);
    assert_eq!(status, 200, "{body}");
    crate::api::json_of(&body)
}

#[test]
fn the_overview_against_a_server_shows_the_hosts_fleet_locks_other_hosts_instances_and_a_dead_host()
{
    let Some(fleet) = Fleet::new(2) else { return };
    let (_serve, url) = serve_api(&fleet);
    let worker = fleet.worker(1, &["--capacity", "2", "--labels", "gpu=1"]);
    let holder = shell_holding(&fleet, 0, "deploy");
    let token = fleet.fleet_lock(0, "deploy")["token"].clone();
    let _far = fleet.instance(1, "far", 0);

    let seen = overview(&url, "t0ken");
    assert_eq!(seen["host"]["db_kind"], "server", "{seen:#}");
    let view = &seen["fleet"];
    assert_eq!(view["host"], "host0", "{seen:#}");
    let host1 = view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "host1")
        .unwrap_or_else(|| panic!("no host1: {seen:#}"));
    assert_eq!(
        (&host1["state"], &host1["capacity"], &host1["labels"]),
        (&json!("running"), &json!(2), &json!({"gpu": "1"})),
        "{seen:#}"
    );
    assert!(!host1["version"].as_str().unwrap().is_empty(), "{seen:#}");
    let lock = seen["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "deploy")
        .unwrap_or_else(|| panic!("no fleet lock: {seen:#}"));
    assert_eq!(lock["scope"], "fleet", "{seen:#}");
    assert_eq!(lock["token"], token, "{seen:#}");
    assert_eq!(lock["holder"]["pid"], holder.pid(), "{seen:#}");
    let instance = |overview: &Value, id: &str| {
        overview["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no instance {id}: {overview:#}"))
    };
    let far = instance(&seen, "far");
    assert_eq!(
        (&far["elsewhere"], &far["fleet_host"], &far["liveness"]),
        (&json!(true), &json!("host1"), &json!("live")),
        "{seen:#}"
    );
    let dash = instance(&seen, "dash");
    assert_eq!(
        (&dash["elsewhere"], &dash["fleet_host"]),
        (&json!(false), &json!("host0")),
        "{seen:#}"
    );
    let dead_hosts = |overview: &Value| -> Vec<Value> {
        overview["attention"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "dead-host")
            .cloned()
            .collect()
    };
    assert_eq!(dead_hosts(&seen), Vec::<Value>::new(), "{seen:#}");

    // The worker dies: after the lease TTL (3 s) its host is dead in the attention strip.
    worker.kill_now();
    let mut seen = Value::Null;
    wait_for(
        "the dead host in the attention strip",
        Duration::from_secs(30),
        || {
            seen = overview(&url, "t0ken");
            !dead_hosts(&seen).is_empty()
        },
    );
    let dead = &dead_hosts(&seen)[0];
    assert_eq!(dead["subject"], "host1", "{seen:#}");
    let host1 = seen["fleet"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "host1")
        .cloned()
        .unwrap();
    assert_eq!(host1["state"], "dead", "{seen:#}");
    let typed: app::overview::Overview = serde_json::from_value(seen.clone()).unwrap();
    assert!(typed.fleet.is_some());
}

/// The instance `id` as `app instance list --json` on host `n` shows it (null when absent).
fn listed(fleet: &Fleet, n: usize, id: &str) -> Value {
    let out = fleet.run(n, &["instance", "list", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|row| row["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn a_worker_is_a_registered_instance_seen_from_other_hosts_and_app_instance_stop_drains_it() {
    let Some(fleet) = Fleet::new(2) else { return };
    let worker = fleet.worker(1, &["--instance", "w1", "--capacity", "2"]);
    let pid = worker.pid();
    let row = listed(&fleet, 1, "w1");
    assert_eq!(row["pid"], pid, "{row}");
    assert_eq!(row["status"], "running", "{row}");
    assert_eq!(row["worktree"], Value::Null, "{row}");
    assert_eq!(
        row["command"],
        json!(["app", "worker", "--capacity", "2"]),
        "{row}"
    );
    let out = fleet.run(1, &["instance", "list", "--long"]);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("w1 ") && l.contains("app worker --capacity 2")),
        "{}",
        stdout(&out)
    );
    // Another host sees it, on its host, through the database.
    wait_for(
        "host0 to see the worker on host1",
        Duration::from_secs(20),
        || {
            let out = fleet.run(0, &["instance", "list", "--everywhere"]);
            stdout(&out)
                .lines()
                .any(|l| l.starts_with(&format!("w1:{pid} host1 ")))
        },
    );
    // `app instance stop` is the first SIGTERM: a drain, exit 0, unregistered, host stopped.
    let out = fleet.run(1, &["instance", "stop", "w1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = worker.wait(Duration::from_secs(30));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("instance w1"), "{}", stderr(&out));
    assert!(stderr(&out).contains("draining"), "{}", stderr(&out));
    assert_eq!(listed(&fleet, 1, "w1"), Value::Null);
    let out = fleet.run(0, &["fleet", "--json"]);
    let hosts: Value = serde_json::from_slice(&out.stdout).unwrap();
    let host1 = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"]["name"] == "host1")
        .cloned()
        .unwrap();
    assert_eq!(host1["host"]["state"], "stopped", "{host1}");
    let out = fleet.run(0, &["instance", "list", "--everywhere"]);
    assert!(
        !stdout(&out).lines().any(|l| l.starts_with("w1:")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_sigkilled_worker_leaves_a_dead_in_place_instance_that_doctor_fix_reclaims() {
    let Some(fleet) = Fleet::new(1) else { return };
    let worker = fleet.worker(0, &["--instance", "w0"]);
    assert_eq!(listed(&fleet, 0, "w0")["status"], "running");
    worker.kill_now();
    let (_, report) = doctor(&fleet, 0, false);
    let dead = of_kind(&report, "findings", "dead-instance");
    assert_eq!(dead.len(), 1, "{report}");
    assert_eq!(dead[0]["subject"], "w0", "{report}");
    let (_, report) = doctor(&fleet, 0, true);
    let fixed = of_kind(&report, "fixed", "dead-instance");
    assert_eq!(fixed.len(), 1, "{report}");
    assert_eq!(listed(&fleet, 0, "w0"), Value::Null);
    let (_, report) = doctor(&fleet, 0, false);
    assert!(
        of_kind(&report, "findings", "dead-instance").is_empty(),
        "{report}"
    );
}

#[test]
fn a_bad_worker_instance_name_exits_2_and_registers_nothing() {
    let Some(fleet) = Fleet::new(1) else { return };
    let out = fleet.run(0, &["worker", "--instance", "Not A Name"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("Not A Name"), "{}", stderr(&out));
    let out = fleet.run(0, &["fleet", "--json"]);
    let hosts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hosts["hosts"], json!([]), "{hosts}");
    assert!(
        !fleet.hosts[0]
            .root()
            .join(".app/process_registry.json")
            .exists()
    );
}

/// The fleet reservations as `app reservations --fleet --json` on host `n` lists them.
fn fleet_reservations(fleet: &Fleet, n: usize) -> Vec<Value> {
    let out = fleet.run(n, &["reservations", "--fleet", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn doctor_reports_the_fleet_locks_and_reservations_of_dead_holders_and_fix_frees_only_those() {
    let Some(fleet) = Fleet::new(2) else { return };
    // Live holders on host1, whose heartbeat `app lock run` keeps fresh.
    let live = fleet.hosts[1]
        .spawn(fleet.app(1, &["lock", "run", "--fleet", "live", "--", "sleep", "600"]));
    wait_for("the live lock", Duration::from_secs(20), || {
        fleet.fleet_lock(1, "live")["holder"] != Value::Null
    });
    let live_reserver = fleet.hosts[1]
        .spawn(fleet.shell(1, "\"$APP_BIN\" reserve --fleet 'src/**' && exec sleep 600"));
    wait_for("the live reservation", Duration::from_secs(20), || {
        fleet_reservations(&fleet, 1).len() == 1
    });
    // Both hosts have used app before (doctor looks at a repository with an .app/).
    for n in 0..2 {
        let out = fleet.run(n, &["run", "--no-worktree", "--", "true"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    // A holder on host0 takes a lock and a reservation, then is SIGKILLed; nothing else of
    // app runs on host0, so its heartbeat goes stale after the lease TTL (3 s).
    let victim = fleet.hosts[0].spawn(fleet.shell(
        0,
        "\"$APP_BIN\" reserve --fleet 'docs/**' && \"$APP_BIN\" lock acquire --fleet victim && exec sleep 600",
    ));
    let pid = victim.pid();
    wait_for("the victim's lock", Duration::from_secs(20), || {
        fleet.fleet_lock(0, "victim")["holder"]["pid"] == pid
    });
    let token = fleet.fleet_lock(0, "victim")["token"].as_u64().unwrap();
    kill(pid, Signal::SIGKILL);
    drop(victim);
    // On host0, /proc says the holder is gone: reported at once.
    let (_, report) = doctor(&fleet, 0, false);
    let locks = of_kind(&report, "findings", "fleet-lock");
    assert_eq!(locks.len(), 1, "{report}");
    assert_eq!(locks[0]["subject"], "victim", "{report}");
    assert!(
        locks[0]["problem"].as_str().unwrap().contains("is gone"),
        "{report}"
    );
    assert_eq!(
        of_kind(&report, "findings", "fleet-reservation").len(),
        1,
        "{report}"
    );
    // On host1 once host0's heartbeat is past the TTL; the live holds are never reported.
    let mut report = Value::Null;
    wait_for(
        "host1's doctor to see host0's holder dead",
        Duration::from_secs(30),
        || {
            report = doctor(&fleet, 1, false).1;
            !of_kind(&report, "findings", "fleet-lock").is_empty()
        },
    );
    let locks = of_kind(&report, "findings", "fleet-lock");
    assert_eq!(locks.len(), 1, "{report}");
    assert_eq!(locks[0]["subject"], "victim", "{report}");
    assert!(
        locks[0]["problem"]
            .as_str()
            .unwrap()
            .contains("host host0 has had no fleet heartbeat"),
        "{report}"
    );
    let reservations = of_kind(&report, "findings", "fleet-reservation");
    assert_eq!(reservations.len(), 1, "{report}");
    assert!(
        reservations[0]["problem"]
            .as_str()
            .unwrap()
            .contains("docs/**"),
        "{report}"
    );
    let (_, report) = doctor(&fleet, 1, true);
    for kind in ["fleet-lock", "fleet-reservation"] {
        let fixed = of_kind(&report, "fixed", kind);
        assert_eq!(fixed.len(), 1, "{kind}: {report}");
        assert_eq!(fixed[0]["outcome"]["Ok"], "released", "{report}");
    }
    // Freed: the victim's lock is free with its token kept, the live ones are untouched.
    let victim = fleet.fleet_lock(1, "victim");
    assert_eq!(victim["holder"], Value::Null, "{victim}");
    assert_eq!(victim["token"], token, "{victim}");
    let held = fleet.fleet_lock(1, "live");
    assert_eq!(held["holder"]["host"], "host1", "{held}");
    assert_eq!(held["lapsed"], Value::Null, "{held}");
    let left = fleet_reservations(&fleet, 1);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["holder"]["pid"], live_reserver.pid(), "{left:?}");
    assert_eq!(left[0]["lapsed"], Value::Null, "{left:?}");
    let (_, report) = doctor(&fleet, 1, false);
    assert!(
        of_kind(&report, "findings", "fleet-lock").is_empty(),
        "{report}"
    );
    assert!(
        of_kind(&report, "findings", "fleet-reservation").is_empty(),
        "{report}"
    );
    drop(live_reserver);
    drop(live);
}

#[test]
fn the_overview_lists_the_expired_lease_of_a_worker_killed_mid_task_in_its_attention_strip() {
    let Some(fleet) = Fleet::new(2) else { return };
    let (_serve, url) = serve_api(&fleet);
    let marks = fleet.hosts[0].scratch();
    let pid_file = marks.join("pid-of-a");
    let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
    let plan = json!({ "name": "lapses", "tasks": [{ "id": "a", "command": script }] });
    let plan = write_plan(&fleet.hosts[0], &plan);
    let doomed = fleet.worker(1, &[]);
    let _orchestrator =
        fleet.hosts[0].spawn(fleet.orchestrate(&plan, &["--progress", "plain", "--json"]));
    wait_for("the attempt to start", Duration::from_secs(30), || {
        fs::read_to_string(&pid_file).is_ok_and(|pid| pid.trim().parse::<u32>().is_ok())
    });
    let expired = |overview: &Value| -> Vec<Value> {
        overview["attention"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "expired-lease")
            .cloned()
            .collect()
    };
    // While its worker renews it, the lease is no attention item.
    let seen = overview(&url, "t0ken");
    assert_eq!(expired(&seen), Vec::<Value>::new(), "{seen:#}");
    let lease = seen["fleet"]["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["task"] == "a")
        .cloned()
        .unwrap_or_else(|| panic!("no lease of a: {seen:#}"));
    assert_eq!(
        (&lease["host"], &lease["expired"]),
        (&json!("host1"), &json!(false)),
        "{seen:#}"
    );
    let run = lease["run"].as_str().unwrap().to_string();

    // The worker and the attempt's command die at once; after the lease TTL (3 s) the lease
    // has expired by the server's clock.
    doomed.kill_now();
    let command: u32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(command, Signal::SIGKILL);
    let mut seen = Value::Null;
    wait_for(
        "the expired lease in the attention strip",
        Duration::from_secs(30),
        || {
            seen = overview(&url, "t0ken");
            !expired(&seen).is_empty()
        },
    );
    let item = &expired(&seen)[0];
    assert_eq!(item["subject"], format!("{run}/a"), "{seen:#}");
    let text = item["text"].as_str().unwrap();
    assert!(
        text.contains("task a (attempt 1, token ") && text.contains("on host host1 expired"),
        "{seen:#}"
    );
    assert!(item["since"].is_string(), "{seen:#}");
    let lease = seen["fleet"]["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["task"] == "a")
        .cloned()
        .unwrap();
    assert_eq!(lease["expired"], true, "{seen:#}");
    assert!(
        lease["expires_in_ms"].as_i64().is_some_and(|ms| ms <= 0),
        "{seen:#}"
    );
}

#[test]
fn another_hosts_agent_state_reaches_the_overview_with_its_heartbeat_row() {
    let Some(fleet) = Fleet::new(2) else { return };
    let (_serve, url) = serve_api(&fleet);
    let mut asks = fleet.app(
        1,
        &[
            "run",
            "--no-worktree",
            "--instance",
            "asks",
            "--",
            "sh",
            "-c",
            "\"$APP_BIN\" status needs-input 'review the schema please' && exec sleep 600",
        ],
    );
    asks.env("APP_HEARTBEAT_INTERVAL", "200ms");
    let _asks = fleet.hosts[1].spawn(asks);
    let agent_of_asks = |overview: &Value| {
        overview["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == "asks")
            .map(|i| (i["fleet_host"].clone(), i["agent"].clone()))
    };
    let mut seen = Value::Null;
    wait_for(
        "host1's agent needing input, seen from host0",
        Duration::from_secs(30),
        || {
            seen = overview(&url, "t0ken");
            agent_of_asks(&seen).is_some_and(|(_, agent)| agent["state"] == "needs-input")
        },
    );
    let (host, agent) = agent_of_asks(&seen).unwrap();
    assert_eq!(host, "host1", "{seen:#}");
    assert!(
        agent["reason"]
            .as_str()
            .is_some_and(|r| r.contains("review the schema please")),
        "{seen:#}"
    );
    assert!(agent["since"].is_string(), "{seen:#}");
    // And in the list of every host's instances.
    let out = fleet.run(0, &["instance", "list", "--everywhere", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "asks")
        .cloned()
        .unwrap_or_else(|| panic!("asks is not listed: {listed:#}"));
    assert_eq!(row["agent"]["state"], "needs-input", "{listed:#}");
}
