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
        command
            .env("APP_DB_URL", self.sqld.url())
            .env("APP_SHARED_SECRET", SECRET)
            .env("APP_LEASE_TTL", "3s")
            .env("FLEET_HOST", format!("host{n}"))
            .env("APP_FLEET_HOST", format!("host{n}"));
        command
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
    let orchestrator = fleet.hosts[0].spawn(fleet.app(
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
    ));
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
    let orchestrator = fleet.hosts[0].spawn(fleet.app(
        0,
        &[
            "orchestrate",
            "--plan",
            plan.to_str().unwrap(),
            "--fleet",
            "--progress",
            "plain",
        ],
    ));
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
struct Netns {
    name: String,
    /// The root namespace's end of the pair (deleting it deletes both ends).
    outer_link: String,
    /// The address of that end, where the server listens.
    outer: std::net::Ipv4Addr,
}

impl Netns {
    /// A namespace named after this test process, with a /30 of 10.128.0.0/9 of its own; `None`,
    /// said loudly, where the machine does not allow one (not root, no `ip`, no namespaces),
    /// a failure under CI (which runs as root).
    fn create() -> Option<Netns> {
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
