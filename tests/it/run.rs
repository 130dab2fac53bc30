//! `app run`: worktrees, branches, registration, exit codes, signals, cleanup, bad input.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{TestRepo, code, kill, stderr, stdout, wait_for};

#[test]
fn run_gives_the_command_its_own_worktree_branch_and_environment() {
    let repo = TestRepo::new();
    let out = repo.scratch().join("env.txt");
    let script = format!(
        "printf '%s\\n' \"$PWD\" \"$APP_INSTANCE_ID\" \"$APP_WORKTREE\" \"$APP_BRANCH\" \"$APP_REPO_ROOT\" \"$(git rev-parse --abbrev-ref HEAD)\" > {}",
        out.display()
    );
    let output = repo.run_app(&["run", "--", "sh", "-c", &script]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));

    let text = fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let id = lines[1];
    assert_eq!(id.len(), 8);
    assert!(
        id.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    let worktree = repo.state_dir().join("worktrees").join(id);
    assert_eq!(lines[0], worktree.to_str().unwrap());
    assert_eq!(lines[2], worktree.to_str().unwrap());
    assert_eq!(lines[3], format!("app/{id}"));
    assert_eq!(lines[4], repo.root().to_str().unwrap());
    assert_eq!(lines[5], format!("app/{id}"));

    // Clean exit: worktree, branch and registry entries are gone.
    assert!(!worktree.exists());
    assert_eq!(repo.branches(), vec!["main".to_string()]);
    assert!(repo.instances().is_empty());
    assert!(!repo.git(&["worktree", "list"]).contains(".app"));

    // State is private and ignored through .git/info/exclude, never .gitignore.
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&repo.state_dir()), 0o700);
    for file in [
        "process_registry.json",
        "branch_registry.json",
        "secret",
        "registry.lock",
    ] {
        assert_eq!(mode(&repo.state_dir().join(file)), 0o600, "{file}");
    }
    let exclude = fs::read_to_string(repo.root().join(".git/info/exclude")).unwrap();
    assert_eq!(exclude.matches("/.app/").count(), 1);
    assert!(!repo.root().join(".gitignore").exists());
    assert_eq!(repo.git(&["status", "--porcelain"]), "");
}

#[test]
fn sixteen_simultaneous_runs_get_distinct_instances() {
    let repo = TestRepo::new();
    let scratch = repo.scratch();
    let go = scratch.join("go");
    let script = format!(
        "touch {dir}/ready-$APP_INSTANCE_ID; while [ ! -e {go} ]; do sleep 0.05; done",
        dir = scratch.display(),
        go = go.display()
    );
    let mut runs: Vec<_> = (0..16)
        .map(|_| repo.spawn_app(&["run", "--", "sh", "-c", &script]))
        .collect();
    let ready = || {
        fs::read_dir(&scratch)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("ready-")
            })
            .count()
    };
    wait_for("16 instances to start", Duration::from_secs(120), || {
        runs.iter_mut().for_each(|run| run.assert_running());
        ready() == 16
    });

    let records = repo.instances();
    assert_eq!(records.len(), 16, "every run is registered");
    let mut ids: Vec<_> = records.iter().map(|r| r.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 16, "ids are distinct");
    let porcelain = repo.git(&["worktree", "list", "--porcelain"]);
    for record in &records {
        let worktree = record.worktree.as_ref().unwrap();
        assert_eq!(
            worktree,
            &repo.state_dir().join("worktrees").join(&record.id)
        );
        let branch = record.branch.as_ref().unwrap();
        assert_eq!(branch, &format!("app/{}", record.id));
        let block = format!("worktree {}\nHEAD ", worktree.display());
        let at = porcelain
            .find(&block)
            .unwrap_or_else(|| panic!("{worktree:?} missing from git worktree list"));
        let entry = &porcelain[at..porcelain[at..]
            .find("\n\n")
            .map_or(porcelain.len(), |e| at + e)];
        assert!(
            entry.contains(&format!("branch refs/heads/{branch}")),
            "{entry}"
        );
    }
    let snapshot = repo.registry().snapshot().unwrap();
    assert_eq!(snapshot.branches.len(), 16);

    fs::write(&go, "").unwrap();
    for run in runs {
        let output = run.wait(Duration::from_secs(120));
        assert_eq!(code(&output), 0, "{}", stderr(&output));
    }
    assert!(repo.instances().is_empty());
    assert_eq!(repo.branches(), vec!["main".to_string()]);
    assert_eq!(
        repo.git(&["worktree", "list", "--porcelain"])
            .matches("worktree ")
            .count(),
        1
    );
    // Both registries still parse as JSON after all that concurrency.
    for file in ["process_registry.json", "branch_registry.json"] {
        let text = fs::read_to_string(repo.state_dir().join(file)).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap();
    }
}

#[test]
fn exit_codes_and_signal_deaths_pass_through() {
    let repo = TestRepo::new();
    let cases = [
        ("exit 7", 7),
        ("exit 0", 0),
        ("kill -TERM $$", 143),
        ("kill -KILL $$", 137),
    ];
    for (script, expected) in cases {
        let output = repo.run_app(&["run", "--", "sh", "-c", script]);
        assert_eq!(code(&output), expected, "{script}: {}", stderr(&output));
    }
    let missing = repo.run_app(&["run", "--", "no-such-command-anywhere"]);
    assert_eq!(code(&missing), 127);
    assert!(stderr(&missing).contains("no-such-command-anywhere"));
    assert!(repo.instances().is_empty());
    assert_eq!(repo.branches(), vec!["main".to_string()]);
}

#[test]
fn signals_sent_to_app_reach_the_command() {
    let repo = TestRepo::new();
    for (signal, expected) in [
        (Signal::SIGTERM, 143),
        (Signal::SIGINT, 130),
        (Signal::SIGHUP, 129),
    ] {
        let run = repo.spawn_app(&["run", "--", "sleep", "30"]);
        let record = repo.wait_running(run.pid());
        kill(run.pid(), signal);
        let output = run.wait(Duration::from_secs(20));
        assert_eq!(code(&output), expected, "{signal:?}: {}", stderr(&output));
        assert!(
            !record.worktree.unwrap().exists(),
            "cleaned up after {signal:?}"
        );
    }
    assert!(repo.instances().is_empty());
}

#[test]
fn uncommitted_work_survives_exit_and_commits_keep_the_branch() {
    let repo = TestRepo::new();
    let output = repo.run_app(&[
        "run",
        "--instance",
        "dirty",
        "--",
        "sh",
        "-c",
        "echo draft > notes.txt && echo edited >> README.md",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let worktree = repo.state_dir().join("worktrees/dirty");
    assert_eq!(
        fs::read_to_string(worktree.join("notes.txt")).unwrap(),
        "draft\n"
    );
    assert_eq!(
        fs::read_to_string(worktree.join("README.md")).unwrap(),
        "hello\nedited\n"
    );
    assert!(
        stderr(&output).contains("kept worktree"),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains(worktree.to_str().unwrap()));
    assert!(repo.branches().contains(&"app/dirty".to_string()));
    assert!(
        repo.instances().is_empty(),
        "the instance itself is unregistered"
    );

    let output = repo.run_app(&[
        "run",
        "--instance",
        "committed",
        "--",
        "sh",
        "-c",
        "echo done > result.txt && git add result.txt && git commit -qm result",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        !repo.state_dir().join("worktrees/committed").exists(),
        "clean worktree removed"
    );
    assert_eq!(
        repo.git(&["show", "app/committed:result.txt"]),
        "done\n",
        "the commit survives on its branch"
    );
    assert!(stderr(&output).contains("kept branch app/committed (1 commit beyond its base)"));

    // A named instance picks its kept worktree up again, work intact, and cleans up once the
    // work is gone.
    let output = repo.run_app(&[
        "run",
        "--instance",
        "dirty",
        "--",
        "sh",
        "-c",
        "cat notes.txt && git checkout -q README.md && rm notes.txt",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "draft\n");
    assert!(!worktree.exists());
    assert!(!repo.branches().contains(&"app/dirty".to_string()));
}

#[test]
fn keep_and_no_worktree() {
    let repo = TestRepo::new();
    let output = repo.run_app(&["run", "--keep", "--instance", "kept", "--", "true"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(repo.state_dir().join("worktrees/kept").is_dir());
    assert!(repo.branches().contains(&"app/kept".to_string()));

    let output = repo.run_app(&[
        "run",
        "--no-worktree",
        "--",
        "sh",
        "-c",
        "pwd; echo \"[$APP_BRANCH]\"",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{}\n[]\n", repo.root().display()));
    assert_eq!(repo.branches().len(), 2, "no branch for --no-worktree");
}

#[test]
fn branch_and_base_options() {
    let repo = TestRepo::new();
    repo.git(&["checkout", "-q", "-b", "feature"]);
    fs::write(repo.root().join("feature.txt"), "f\n").unwrap();
    repo.git(&["add", "feature.txt"]);
    repo.git(&["commit", "-q", "-m", "feature"]);
    repo.git(&["checkout", "-q", "main"]);

    let output = repo.run_app(&[
        "run",
        "--branch",
        "work/one",
        "--base",
        "feature",
        "--",
        "test",
        "-f",
        "feature.txt",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        !repo.branches().contains(&"work/one".to_string()),
        "untouched branch deleted"
    );

    // An existing branch that is not checked out anywhere is checked out as it is, and kept.
    let output = repo.run_app(&[
        "run",
        "--branch",
        "feature",
        "--",
        "test",
        "-f",
        "feature.txt",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        repo.branches().contains(&"feature".to_string()),
        "a user's branch is never deleted"
    );
}

#[test]
fn works_from_subdirectories_and_inside_instance_worktrees() {
    let repo = TestRepo::new();
    let output = repo
        .app(&[
            "run",
            "--",
            "sh",
            "-c",
            "cd src && \"$APP_BIN\" run -- sh -c 'echo \"$APP_REPO_ROOT\"; pwd'",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        repo.root().to_str().unwrap(),
        "the main root, not the worktree"
    );
    assert!(lines[1].starts_with(repo.state_dir().join("worktrees").to_str().unwrap()));
    assert_eq!(
        lines[1].matches("/.app/").count(),
        1,
        "not nested inside the outer worktree"
    );

    let mut sub = repo.app(&["run", "--", "true"]);
    sub.current_dir(repo.root().join("src"));
    assert_eq!(code(&sub.output().unwrap()), 0);
}

#[test]
fn named_instance_held_by_a_live_one_is_refused() {
    let repo = TestRepo::new();
    let first = repo.spawn_app(&["run", "--instance", "alice", "--", "sleep", "30"]);
    repo.wait_running(first.pid());
    let before = TestRepo::tree_state(&repo.state_dir());
    let output = repo.run_app(&["run", "--instance", "alice", "--", "true"]);
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("pid {}", first.pid())),
        "{}",
        stderr(&output)
    );
    assert_eq!(TestRepo::tree_state(&repo.state_dir()).len(), before.len());
    kill(first.pid(), Signal::SIGTERM);
    first.wait(Duration::from_secs(20));
}

#[test]
fn bad_input_exits_2_and_changes_nothing() {
    let repo = TestRepo::new();
    repo.git(&["branch", "taken"]);
    let worktree_dir = repo.scratch().join("user-worktree");
    repo.git(&[
        "worktree",
        "add",
        "-q",
        worktree_dir.to_str().unwrap(),
        "taken",
    ]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--branch", "bad..name", "--", "true"],
            "not a valid branch name",
        ),
        (vec!["run", "--branch", "-x", "--", "true"], ""),
        (
            vec!["run", "--base", "no-such-ref", "--", "true"],
            "unknown ref",
        ),
        (
            vec!["run", "--branch", "main", "--", "true"],
            "already checked out",
        ),
        (
            vec!["run", "--branch", "taken", "--", "true"],
            "already checked out",
        ),
        (
            vec!["run", "--branch", "taken", "--base", "main", "--", "true"],
            "already exists",
        ),
        (
            vec!["run", "--instance", "Bad Name", "--", "true"],
            "invalid instance name",
        ),
        (vec!["run", "--instance", "-lead", "--", "true"], ""),
        // A misspelt option is an error, not a command to run.
        (
            vec!["run", "--name", "lead", "--", "true"],
            "unexpected argument '--name'",
        ),
        (
            vec!["run", "--no-worktree", "--branch", "x", "--", "true"],
            "need a worktree",
        ),
        (vec!["run"], ""),
        (vec!["instance", "info", "nosuch"], "no instance nosuch"),
        (vec!["instance", "stop", "nosuch"], "no instance nosuch"),
        (
            vec!["instance", "stop", "x", "--timeout", "soon"],
            "invalid duration",
        ),
        (vec!["no-such-subcommand"], ""),
    ];
    let check = |label: &str| {
        for (args, message) in &cases {
            let before_branches = repo.branches();
            let before_state = TestRepo::tree_state(&repo.state_dir());
            let before_exclude = fs::read(repo.root().join(".git/info/exclude")).unwrap();
            let before_worktrees = repo.git(&["worktree", "list", "--porcelain"]);
            let output = repo.run_app(args);
            assert_eq!(code(&output), 2, "{label} {args:?}: {}", stderr(&output));
            assert!(
                stderr(&output).contains(message),
                "{args:?}: {}",
                stderr(&output)
            );
            assert_eq!(repo.branches(), before_branches, "{args:?}");
            assert_eq!(
                TestRepo::tree_state(&repo.state_dir()),
                before_state,
                "{args:?}"
            );
            assert_eq!(
                fs::read(repo.root().join(".git/info/exclude")).unwrap(),
                before_exclude
            );
            assert_eq!(
                repo.git(&["worktree", "list", "--porcelain"]),
                before_worktrees
            );
        }
    };
    // Before `.app/` exists: nothing may create it.
    check("fresh");
    assert!(!repo.state_dir().exists());
    // And with state present.
    assert_eq!(
        code(&repo.run_app(&["run", "--keep", "--instance", "k", "--", "true"])),
        0
    );
    check("with state");

    let bad_env = repo
        .app(&["run", "--", "true"])
        .env("APP_STALE_AFTER", "soon")
        .output()
        .unwrap();
    assert_eq!(code(&bad_env), 2);
    assert!(stderr(&bad_env).contains("APP_STALE_AFTER"));

    let outside = tempfile::tempdir().unwrap();
    let output = repo
        .app(&["run", "--", "true"])
        .current_dir(outside.path())
        .output()
        .unwrap();
    assert_eq!(code(&output), 2);
    assert!(stderr(&output).contains("not inside a git repository"));
    assert!(!outside.path().join(".app").exists());
}

#[test]
fn checkout_applies_attributes_wherever_they_are() {
    let repo = TestRepo::new();
    fs::create_dir_all(repo.root().join("deep/er")).unwrap();
    fs::write(
        repo.root().join("deep/.gitattributes"),
        "*.txt text eol=crlf\n",
    )
    .unwrap();
    fs::write(repo.root().join("deep/er/a.txt"), "x\ny\n").unwrap();
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-q", "-m", "attributes"]);
    let output = repo.run_app(&[
        "run",
        "--",
        "sh",
        "-c",
        "od -c deep/er/a.txt; od -c README.md",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let dump = stdout(&output);
    assert!(
        dump.contains("x  \\r  \\n   y  \\r  \\n"),
        "eol=crlf applied: {dump}"
    );
    assert!(
        dump.contains("h   e   l   l   o  \\n"),
        "other files untouched: {dump}"
    );
}

#[test]
fn port_leases_are_disjoint_exported_and_skip_busy_ports() {
    let repo = TestRepo::new();
    // A port some other program listens on, at the start of a small private range.
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let low = foreign.local_addr().unwrap().port();
    let range = format!("{low}-{}", low.saturating_add(40));
    let out = repo.scratch();
    let spawn = |name: &str| {
        let mut command = repo.app(&[
            "run",
            "--instance",
            name,
            "--ports",
            "3",
            "--",
            "sh",
            "-c",
            &format!(
                "echo \"$APP_PORT $APP_PORTS\" > {}/{name}; exec sleep 300",
                out.display()
            ),
        ]);
        command.env("APP_PORT_RANGE", &range);
        repo.spawn(command)
    };
    let first = spawn("first");
    repo.wait_running(first.pid());
    let second = spawn("second");
    repo.wait_running(second.pid());
    let read = |name: &str| -> (u16, Vec<u16>) {
        wait_for("the ports", Duration::from_secs(10), || {
            fs::read_to_string(out.join(name)).is_ok_and(|t| t.ends_with('\n'))
        });
        let text = fs::read_to_string(out.join(name)).unwrap();
        let (port, all) = text.trim().split_once(' ').unwrap();
        (
            port.parse().unwrap(),
            all.split(',').map(|p| p.parse().unwrap()).collect(),
        )
    };
    let (p1, all1) = read("first");
    let (p2, all2) = read("second");
    assert_eq!((all1.len(), all2.len()), (3, 3));
    assert_eq!((all1[0], all2[0]), (p1, p2));
    assert!(all1.iter().all(|p| !all2.contains(p)), "{all1:?} {all2:?}");
    assert!(
        !all1.contains(&low) && !all2.contains(&low),
        "a busy port was leased"
    );
    let recorded: Vec<Vec<u16>> = repo.instances().into_iter().map(|r| r.ports).collect();
    assert!(
        recorded.contains(&all1) && recorded.contains(&all2),
        "{recorded:?}"
    );

    let bad = repo.run_app(&["run", "--ports", "0", "--", "true"]);
    assert_eq!(code(&bad), 2, "{}", stderr(&bad));
}

/// The mode bits of `path`, following a symlink.
fn mode_of(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_loose_state_dir_is_made_private_also_through_a_symlink() {
    // A .app/ made by hand (or by an older app) with loose modes.
    for mode in [0o755, 0o777] {
        let repo = TestRepo::new();
        fs::create_dir(repo.state_dir()).unwrap();
        fs::set_permissions(repo.state_dir(), fs::Permissions::from_mode(mode)).unwrap();
        let output = repo.run_app(&["run", "--", "true"]);
        assert_eq!(code(&output), 0, "{mode:o}: {}", stderr(&output));
        assert_eq!(mode_of(&repo.state_dir()), 0o700, "from {mode:o}");
    }
    // .app as a symlink to a loose directory: the directory it names is tightened.
    let repo = TestRepo::new();
    let target = repo.scratch().join("state");
    fs::create_dir(&target).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(&target, repo.state_dir()).unwrap();
    let output = repo.run_app(&["lock", "run", "x", "--", "true"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(mode_of(&target), 0o700);
    assert!(
        fs::symlink_metadata(repo.state_dir())
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn a_state_dir_someone_else_owns_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        let message =
            "STATE DIRECTORY OWNER TEST SKIPPED: only root can make a directory another user owns";
        assert!(
            std::env::var_os("CI").is_none(),
            "{message} (required under CI)"
        );
        eprintln!("\n!!! {message}\n");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let nobody = 65534;
    let repo = TestRepo::new();
    // Directly, and through a symlink to someone else's directory.
    let theirs = repo.scratch().join("theirs");
    for (link, dir) in [(false, repo.state_dir()), (true, theirs.clone())] {
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::chown(&dir, Some(nobody), Some(nobody)).unwrap();
        if link {
            fs::remove_dir(repo.state_dir()).unwrap();
            std::os::unix::fs::symlink(&dir, repo.state_dir()).unwrap();
        }
        for args in [
            &["run", "--", "true"][..],
            &["lock", "run", "x", "--", "true"],
        ] {
            let output = repo.run_app(args);
            assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
            let text = stderr(&output);
            assert!(
                text.contains("owned by uid 65534") && text.contains(".app"),
                "{text}"
            );
            // Nothing changed: not its mode, not its owner, nothing created in it.
            let meta = fs::metadata(&dir).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o777);
            assert_eq!(meta.uid(), nobody);
            let created: Vec<_> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(created.is_empty(), "{args:?} created {created:?}");
        }
    }
}

#[test]
fn a_state_dir_that_is_a_file_is_a_clear_error() {
    let repo = TestRepo::new();
    fs::write(repo.state_dir(), "not a directory\n").unwrap();
    let plan = repo.scratch().join("plan.json");
    fs::write(
        &plan,
        r#"{"name": "p", "tasks": [{"id": "a", "command": "true"}]}"#,
    )
    .unwrap();
    for args in [
        &["run", "--", "true"][..],
        &["lock", "run", "x", "--", "true"],
        &["orchestrate", "--plan", plan.to_str().unwrap()],
    ] {
        let output = repo.run_app(args);
        assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
        let text = stderr(&output);
        assert!(
            text.contains(".app") && text.contains("not a directory"),
            "{args:?}: {text}"
        );
        assert_eq!(
            fs::read_to_string(repo.state_dir()).unwrap(),
            "not a directory\n"
        );
    }
    assert_eq!(repo.branches(), vec!["main".to_string()]);
}

/// `app lock list` and `app reservations` as they print, from the repository root.
fn holds(repo: &TestRepo) -> (String, String) {
    let locks = repo.run_app(&["lock", "list"]);
    assert_eq!(code(&locks), 0, "{}", stderr(&locks));
    let reservations = repo.run_app(&["reservations"]);
    assert_eq!(code(&reservations), 0, "{}", stderr(&reservations));
    (stdout(&locks), stdout(&reservations))
}

/// Asserts that nobody holds lock `name` any more and that no reservation is left.
fn nothing_held(repo: &TestRepo, name: &str) {
    let (locks, reservations) = holds(repo);
    assert!(
        locks.contains(&format!("{name} free")),
        "lock {name} is still held: {locks}"
    );
    assert_eq!(reservations, "", "reservations left behind");
}

#[test]
fn locks_and_reservations_are_held_while_the_command_runs_and_given_back_after() {
    let repo = TestRepo::new();
    let s = repo.scratch();
    let script = format!(
        "env | grep '^APP_LOCK' | sort > {s}/env; \"$APP_BIN\" lock list > {s}/locks; \"$APP_BIN\" reservations > {s}/reservations",
        s = s.display()
    );
    let output = repo.run_app(&[
        "run",
        "--lock",
        "schema",
        "--lock=cargo.lock",
        "--reserve",
        "src/**",
        "--reserve=docs/",
        "--reserve-reason",
        "a refactor",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    // Taken in name order: the last one is the one APP_LOCK_NAME and APP_LOCK_TOKEN name.
    assert_eq!(
        fs::read_to_string(s.join("env")).unwrap(),
        "APP_LOCKS=cargo.lock=1,schema=1\nAPP_LOCK_NAME=schema\nAPP_LOCK_TOKEN=1\n"
    );
    let locks = fs::read_to_string(s.join("locks")).unwrap();
    for name in ["cargo.lock", "schema"] {
        assert!(
            locks
                .lines()
                .any(|l| l.starts_with(&format!("{name} held by process "))),
            "{locks}"
        );
    }
    let reservations = fs::read_to_string(s.join("reservations")).unwrap();
    assert!(
        reservations.contains("exclusive src/** docs/ by instance "),
        "{reservations}"
    );
    assert!(reservations.contains("(a refactor)"), "{reservations}");
    assert!(
        stderr(&output).contains("app: reserved src/** "),
        "{}",
        stderr(&output)
    );
    nothing_held(&repo, "schema");
    nothing_held(&repo, "cargo.lock");
    assert!(repo.instances().is_empty());
}

/// `app lock run NAME` in another process, holding the lock (scratch file `held` says so)
/// until the scratch file `go` appears.
fn hold_lock_until_go(repo: &TestRepo, name: &str) -> crate::support::Running {
    let s = repo.scratch();
    let mut holder = repo.command("sh");
    holder.args([
        "-c",
        &format!(
            "exec \"$APP_BIN\" lock run {name} -- sh -c 'touch {s}/held; while [ ! -f {s}/go ]; do sleep 0.05; done'",
            s = s.display()
        ),
    ]);
    let holder = repo.spawn(holder);
    wait_for("the lock to be held", Duration::from_secs(20), || {
        s.join("held").exists()
    });
    holder
}

#[test]
fn a_lock_held_by_someone_else_is_awaited_and_a_signal_cancels_the_wait() {
    let repo = TestRepo::new();
    let s = repo.scratch();
    let holder = hold_lock_until_go(&repo, "db");
    let ran = s.join("ran");
    let waiting = repo.spawn_app(&["run", "--lock", "db", "--", "touch", ran.to_str().unwrap()]);
    // It registers, then waits for the lock without starting its command.
    wait_for(
        "the waiting run to register",
        Duration::from_secs(20),
        || !repo.instances().is_empty(),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !ran.exists(),
        "the command ran while someone else held the lock"
    );
    fs::write(s.join("go"), "").unwrap();
    assert_eq!(code(&holder.wait(Duration::from_secs(20))), 0);
    let output = waiting.wait(Duration::from_secs(20));
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(ran.exists());

    // Held again, a signal to the waiting run cancels it: 128+N, nothing ran, nothing held.
    fs::remove_file(s.join("go")).unwrap();
    fs::remove_file(s.join("held")).unwrap();
    fs::remove_file(&ran).unwrap();
    let holder = hold_lock_until_go(&repo, "db");
    let waiting = repo.spawn_app(&[
        "run",
        "--lock",
        "db",
        "--reserve",
        "src/**",
        "--",
        "touch",
        ran.to_str().unwrap(),
    ]);
    wait_for(
        "the waiting run to register",
        Duration::from_secs(20),
        || !repo.instances().is_empty(),
    );
    let output = waiting.wait_after(Signal::SIGTERM, Duration::from_secs(20));
    assert_eq!(code(&output), 143, "{}", stderr(&output));
    assert!(!ran.exists());
    assert!(repo.instances().is_empty());
    assert_eq!(holds(&repo).1, "", "a reservation was left behind");
    fs::write(s.join("go"), "").unwrap();
    assert_eq!(code(&holder.wait(Duration::from_secs(20))), 0);
    nothing_held(&repo, "db");
}

#[test]
fn an_overlapping_reservation_is_refused_with_exit_3_and_gives_its_locks_back() {
    let repo = TestRepo::new();
    let s = repo.scratch();
    let ran = s.join("ran");
    let first = repo.spawn_app(&[
        "run",
        "--reserve",
        "src/**",
        "--",
        "sh",
        "-c",
        &format!(
            "touch {s}/reserved; while [ ! -f {s}/go ]; do sleep 0.05; done",
            s = s.display()
        ),
    ]);
    wait_for("the first reservation", Duration::from_secs(20), || {
        s.join("reserved").exists()
    });
    let output = repo.run_app(&[
        "run",
        "--lock",
        "schema",
        "--reserve",
        "src/db/*.rs",
        "--",
        "touch",
        ran.to_str().unwrap(),
    ]);
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("app: src/db/*.rs overlaps src/**, reserved by instance "),
        "{}",
        stderr(&output)
    );
    assert!(!ran.exists());
    let (locks, _) = holds(&repo);
    assert!(locks.contains("schema free"), "{locks}");
    fs::write(s.join("go"), "").unwrap();
    assert_eq!(code(&first.wait(Duration::from_secs(20))), 0);
    nothing_held(&repo, "schema");
    assert!(repo.instances().is_empty());
}

#[test]
fn locks_and_reservations_are_given_back_after_a_signal_and_a_spawn_failure() {
    let repo = TestRepo::new();
    let holding = ["run", "--lock", "db", "--reserve", "src/**", "--"];
    let missing = repo.run_app(&[&holding[..], &["no-such-command-anywhere"]].concat());
    assert_eq!(code(&missing), 127, "{}", stderr(&missing));
    nothing_held(&repo, "db");

    let run = repo.spawn_app(&[&holding[..], &["sleep", "30"]].concat());
    repo.wait_running(run.pid());
    let output = run.wait_after(Signal::SIGTERM, Duration::from_secs(20));
    assert_eq!(code(&output), 143, "{}", stderr(&output));
    nothing_held(&repo, "db");
    assert!(repo.instances().is_empty());
}

#[test]
fn bad_lock_names_and_patterns_exit_2_and_change_nothing() {
    let repo = TestRepo::new();
    for args in [
        &["run", "--lock", "no spaces", "--", "true"][..],
        &["run", "--reserve", "/etc/passwd", "--", "true"],
        &["run", "--reserve-reason", "why", "--", "true"],
    ] {
        let output = repo.run_app(args);
        assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
    }
    assert!(!repo.state_dir().exists());
}

/// Starts `app run --instance <id>` whose command waits for the returned file to appear,
/// then exits 0.
fn run_until_go(repo: &TestRepo, id: &str) -> (crate::support::Running, std::path::PathBuf) {
    let go = repo.scratch().join(format!("go-{id}"));
    let script = "while [ ! -e \"$0\" ]; do sleep 0.02; done";
    let run = repo.spawn_app(&[
        "run",
        "--instance",
        id,
        "--",
        "sh",
        "-c",
        script,
        go.to_str().unwrap(),
    ]);
    repo.wait_running(run.pid());
    (run, go)
}

#[test]
fn the_end_of_a_run_removes_a_branch_lock_a_crash_left_just_now() {
    let repo = TestRepo::new();
    let (run, go) = run_until_go(&repo, "locked");
    let lock = repo.crashed_ref_writer("refs/heads/app/locked", Duration::ZERO);
    fs::write(&go, "").unwrap();
    let started = std::time::Instant::now();
    let output = run.wait(Duration::from_secs(30));
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the run waited for the lock to be released"
    );
    assert!(!lock.exists());
    assert_eq!(repo.branches(), vec!["main".to_string()]);
    assert!(repo.instances().is_empty());
}

#[test]
fn a_stopped_ci_job_saves_its_work_past_a_rescue_ref_lock_a_crash_left() {
    let repo = TestRepo::new();
    let script = "echo draft > draft.txt; exec sleep 600";
    let job = repo.spawn_app(&["ci", "--branch", "ci/job", "--", "sh", "-c", script]);
    let record = repo.wait_running(job.pid());
    let worktree = record.worktree.clone().unwrap();
    wait_for("the draft", Duration::from_secs(10), || {
        worktree.join("draft.txt").exists()
    });
    let rescue = format!("refs/app/rescue/{}", record.id);
    let lock = repo.crashed_ref_writer(&rescue, Duration::from_secs(30));
    let stop = repo.run_app(&["instance", "stop", &record.id]);
    assert_eq!(code(&stop), 0, "{}", stderr(&stop));
    let output = job.wait(Duration::from_secs(30));
    assert!(
        !stderr(&output).contains("lock"),
        "the stop failed: {}",
        stderr(&output)
    );
    assert!(!lock.exists());
    assert_eq!(
        repo.git(&["show", &format!("{rescue}:draft.txt")]),
        "draft\n"
    );
    assert!(!worktree.exists());
    assert!(repo.instances().is_empty());
}

#[test]
fn a_private_ref_is_saved_past_a_rescue_ref_lock_a_crash_left() {
    let repo = TestRepo::new();
    // A commit only the worktree's own ref reaches, and the lock file of the ref that saves
    // it, as a writer killed just now leaves it.
    let script = "echo x > kept.txt && git add kept.txt && git commit -qm kept \
        && git update-ref refs/worktree/keep HEAD && git reset -q --hard HEAD~1 \
        && git rev-parse refs/worktree/keep";
    let lock_script = format!(
        "{script} && c=$(git rev-parse --git-common-dir) && mkdir -p \"$c/refs/app/rescue\" \
         && : > \"$c/refs/app/rescue/private-worktree-keep-$(git rev-parse refs/worktree/keep | cut -c1-12).lock\""
    );
    let output = repo.run_app(&[
        "run",
        "--instance",
        "private",
        "--",
        "sh",
        "-c",
        &lock_script,
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let commit = stdout(&output).trim().to_string();
    let rescue = format!("refs/app/rescue/private-worktree-keep-{}", &commit[..12]);
    assert_eq!(repo.git(&["rev-parse", &rescue]).trim(), commit);
    assert!(
        !repo
            .root()
            .join(".git")
            .join(format!("{rescue}.lock"))
            .exists()
    );
    assert!(repo.instances().is_empty());
}

#[test]
fn a_ref_lock_a_live_process_holds_is_left_and_the_run_names_its_holder() {
    let repo = TestRepo::new();
    let (run, go) = run_until_go(&repo, "held");
    let lock = repo.crashed_ref_writer("refs/heads/app/held", Duration::from_secs(30));
    let holder = repo.hold_open(&lock);
    fs::write(&go, "").unwrap();
    let output = run.wait(Duration::from_secs(60));
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    assert!(lock.exists(), "a held lock was removed");
    let text = stderr(&output);
    assert!(
        text.contains(&format!("held by pid {}", holder.pid()))
            && text.contains("let it finish or stop it, then run 'app doctor --fix'"),
        "{text}"
    );
    assert!(repo.branches().contains(&"app/held".to_string()));

    let _ = holder.kill_now();
    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    assert!(!lock.exists());
    assert_eq!(repo.branches(), vec!["main".to_string()]);
}
