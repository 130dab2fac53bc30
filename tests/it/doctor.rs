//! `app doctor`: crashes at every step of every multi-step operation, mass SIGKILLs, and the
//! promise that no work is lost and nothing of the user's is touched.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use app::fault::POINTS;

use crate::support::{Running, TestRepo, code, stderr, stdout, wait_for};

/// What an instance's command leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    None,
    Uncommitted,
    Committed,
}

impl Work {
    fn script(self, id: &str) -> String {
        let content = format!("work of {id}");
        match self {
            Work::None => "true".into(),
            Work::Uncommitted => format!("printf '{content}' > work.txt"),
            Work::Committed => format!(
                "printf '{content}' > work.txt && git add work.txt && git -c user.name=t -c user.email=t@t commit -qm work"
            ),
        }
    }
}

/// After `doctor --fix`: registries parse, no orphan worktree, branch, entry or intent, git
/// agrees with `.app/`, the repository is sound, and a second doctor finds nothing.
fn assert_reclaimed(repo: &TestRepo) {
    let again = repo.run_app(&["doctor", "--json"]);
    assert_eq!(
        code(&again),
        0,
        "a second doctor still finds: {}",
        stdout(&again)
    );
    assert!(repo.entries().is_empty(), "registry entries left");
    let worktrees = repo.state_dir().join("worktrees");
    let left: Vec<_> = fs::read_dir(&worktrees)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "worktrees left: {left:?}");
    let journal: Vec<_> = fs::read_dir(repo.state_dir().join("journal"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(journal.is_empty(), "intents left: {journal:?}");
    let listed = repo.git(&["worktree", "list", "--porcelain"]);
    assert!(
        !listed.contains(".app/worktrees"),
        "git still lists app worktrees: {listed}"
    );
    repo.git(&["fsck", "--no-progress"]);
}

/// The bytes of `path` at `rev`.
fn show(repo: &TestRepo, rev: &str, path: &str) -> String {
    repo.git(&["show", &format!("{rev}:{path}")])
}

#[test]
fn a_crash_at_every_step_is_recovered_without_losing_work() {
    for &point in POINTS {
        for work in [Work::None, Work::Uncommitted, Work::Committed] {
            // Crashes before the command runs happen the same way whatever it would do.
            if point.starts_with("run.") && work != Work::None {
                continue;
            }
            let repo = TestRepo::new();
            let id = "crashy";
            let output = repo
                .app(&["run", "--instance", id, "--", "sh", "-c", &work.script(id)])
                .env("APP_FAULT_POINT", point)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let crashed = output.status.signal() == Some(9);
            // Every start step is always reached; the stop steps depend on the work.
            let reachable = match point {
                "stop.worktree-removed" | "remove.rescued" | "remove.files-removed" => {
                    work != Work::Uncommitted
                }
                "stop.branch-deleted" => work == Work::None,
                _ => true,
            };
            assert_eq!(
                crashed,
                reachable,
                "{point} with {work:?}: {:?} {}",
                output.status,
                stderr(&output)
            );
            let fixed = repo.run_app(&["doctor", "--fix"]);
            assert_eq!(
                code(&fixed),
                0,
                "{point} with {work:?}: {}{}",
                stdout(&fixed),
                stderr(&fixed)
            );
            assert_reclaimed(&repo);
            let content = format!("work of {id}");
            match work {
                Work::None => assert!(
                    !repo.branches().contains(&format!("app/{id}")),
                    "{point}: an empty branch was left"
                ),
                Work::Uncommitted => {
                    assert_eq!(
                        show(&repo, &format!("refs/app/rescue/{id}"), "work.txt"),
                        content
                    )
                }
                Work::Committed => {
                    assert_eq!(show(&repo, &format!("app/{id}"), "work.txt"), content)
                }
            }
        }
    }
}

#[test]
fn the_next_run_undoes_an_interrupted_start_by_itself() {
    let repo = TestRepo::new();
    let output = repo
        .app(&["run", "--instance", "half", "--", "true"])
        .env("APP_FAULT_POINT", "run.checked-out")
        .output()
        .unwrap();
    assert_eq!(output.status.signal(), Some(9));
    assert!(repo.state_dir().join("worktrees/half").exists());
    let next = repo.run_app(&["run", "--instance", "next", "--", "true"]);
    assert_eq!(code(&next), 0, "{}", stderr(&next));
    assert!(!repo.state_dir().join("worktrees/half").exists());
    assert!(!repo.branches().contains(&"app/half".to_string()));
    assert_reclaimed(&repo);
}

#[test]
fn the_next_run_removes_the_branch_lock_an_interrupted_start_left() {
    let repo = TestRepo::new();
    let output = repo
        .app(&["run", "--instance", "half", "--", "true"])
        .env("APP_FAULT_POINT", "run.registered")
        .output()
        .unwrap();
    assert_eq!(output.status.signal(), Some(9));
    // What a kill while libgit2 creates the branch leaves.
    let lock = repo.crashed_ref_writer("refs/heads/app/half", Duration::ZERO);
    let started = std::time::Instant::now();
    let next = repo.run_app(&["run", "--instance", "half", "--", "true"]);
    assert_eq!(code(&next), 0, "{}", stderr(&next));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the run waited for the lock to be released"
    );
    assert!(!lock.exists());
    assert_reclaimed(&repo);
}

#[test]
fn fifty_instances_killed_at_once_are_reclaimed_with_every_byte_of_work() {
    let repo = TestRepo::new();
    let marks = repo.scratch();
    let works = [Work::None, Work::Uncommitted, Work::Committed];
    let runs: Vec<(String, Work, Running)> = (0..50)
        .map(|i| {
            let id = format!("mass-{i:02}");
            let work = works[i % 3];
            let script = format!(
                "{} && touch {}/{id} && exec sleep 600",
                work.script(&id),
                marks.display()
            );
            let run = repo.spawn_app(&["run", "--instance", &id, "--", "sh", "-c", &script]);
            (id, work, run)
        })
        .collect();
    wait_for(
        "every instance to do its work",
        Duration::from_secs(120),
        || fs::read_dir(&marks).unwrap().count() == 50,
    );
    for (_, _, run) in runs.iter() {
        // The supervisor and its command, at once (each runs in a group of its own).
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(run.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for (_, _, run) in runs.iter() {
        let pid = run.pid();
        wait_for(
            "the killed instances to die",
            Duration::from_secs(30),
            || {
                !std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
                    || fs::read_to_string(format!("/proc/{pid}/stat"))
                        .is_ok_and(|s| s.contains(") Z "))
            },
        );
    }
    let before = repo.run_app(&["doctor", "--json"]);
    assert_eq!(code(&before), 1);
    let report: serde_json::Value = serde_json::from_str(&stdout(&before)).unwrap();
    let dead = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "dead-instance")
        .count();
    assert_eq!(dead, 50, "{}", stdout(&before));

    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    drop(runs);
    assert_reclaimed(&repo);
    // Reclaimed on several threads, reported in the diagnosis's order, each once.
    let reported: Vec<String> = stdout(&fixed)
        .lines()
        .filter_map(|line| line.strip_prefix("fixed dead-instance "))
        .filter_map(|rest| rest.split(':').next().map(str::to_string))
        .collect();
    let expected: Vec<String> = (0..50).map(|i| format!("mass-{i:02}")).collect();
    assert_eq!(reported, expected, "{}", stdout(&fixed));
    for i in 0..50 {
        let id = format!("mass-{i:02}");
        let content = format!("work of {id}");
        match works[i % 3] {
            Work::None => assert!(!repo.branches().contains(&format!("app/{id}"))),
            Work::Uncommitted => {
                assert_eq!(
                    show(&repo, &format!("refs/app/rescue/{id}"), "work.txt"),
                    content
                )
            }
            Work::Committed => assert_eq!(show(&repo, &format!("app/{id}"), "work.txt"), content),
        }
    }
}

#[test]
fn the_users_own_worktrees_and_branches_are_never_touched() {
    let repo = TestRepo::new();
    let outside = repo.scratch().join("user-wt");
    let unmounted = repo.scratch().join("user-wt-on-unmounted-disk");
    repo.git(&[
        "worktree",
        "add",
        "-q",
        "-b",
        "user-feature",
        outside.to_str().unwrap(),
    ]);
    repo.git(&[
        "worktree",
        "add",
        "-q",
        "-b",
        "user-other",
        unmounted.to_str().unwrap(),
    ]);
    fs::remove_dir_all(&unmounted).unwrap();
    repo.git(&["branch", "user-merged"]);
    fs::write(outside.join("mine.txt"), "uncommitted user work").unwrap();
    // Something for doctor to do.
    let run = repo.spawn_app(&["run", "--instance", "gone", "--", "sleep", "600"]);
    repo.wait_running(run.pid());
    let _ = run.kill_now();

    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    let listed = repo.git(&["worktree", "list", "--porcelain"]);
    assert!(listed.contains(outside.to_str().unwrap()), "{listed}");
    assert!(listed.contains(unmounted.to_str().unwrap()), "{listed}");
    for branch in ["user-feature", "user-other", "user-merged", "main"] {
        assert!(repo.branches().contains(&branch.to_string()), "{branch}");
    }
    assert_eq!(
        fs::read_to_string(outside.join("mine.txt")).unwrap(),
        "uncommitted user work"
    );
}

#[test]
fn without_fix_nothing_changes_and_every_kind_is_reported() {
    let repo = TestRepo::new();
    // A dead instance with uncommitted work.
    let run = repo.spawn_app(&[
        "run",
        "--instance",
        "dead",
        "--",
        "sh",
        "-c",
        "echo draft > draft.txt; exec sleep 600",
    ]);
    let record = repo.wait_running(run.pid());
    wait_for("the draft", Duration::from_secs(10), || {
        record.worktree.as_ref().unwrap().join("draft.txt").exists()
    });
    // A message for it, a lock held by a process that dies, a leftover temp file, a loose mode.
    let sent = repo.run_app(&["send", "--from", "someone", "--to", "dead", "hello"]);
    assert_eq!(code(&sent), 0, "{}", stderr(&sent));
    let _ = run.kill_now();
    let holder = repo.spawn_app(&["lock", "run", "db-schema", "--", "sleep", "600"]);
    wait_for("the lock", Duration::from_secs(10), || {
        repo.state_dir().join("locks/named/db-schema.json").exists()
    });
    let _ = holder.kill_now();
    fs::write(
        repo.state_dir().join(".process_registry.json.tmp.999999.0"),
        "{",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(
        repo.state_dir().join("branch_registry.json"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let before = TestRepo::tree_state(&repo.state_dir());
    let refs_before = repo.git(&["for-each-ref"]);
    let report = repo.run_app(&["doctor", "--json"]);
    assert_eq!(code(&report), 1, "{}", stderr(&report));
    assert_eq!(
        before,
        TestRepo::tree_state(&repo.state_dir()),
        "doctor changed .app/"
    );
    assert_eq!(refs_before, repo.git(&["for-each-ref"]));
    let report: serde_json::Value = serde_json::from_str(&stdout(&report)).unwrap();
    let kinds: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    for kind in ["dead-instance", "lapsed-lock", "temp-file", "permissions"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let text = repo.run_app(&["doctor"]);
    assert!(stdout(&text).contains("fix:"), "{}", stdout(&text));

    let fixed = repo.run_app(&["doctor", "--cleanup-stale"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    assert!(
        stdout(&fixed).contains("refs/app/rescue/dead"),
        "{}",
        stdout(&fixed)
    );
    assert_eq!(show(&repo, "refs/app/rescue/dead", "draft.txt"), "draft\n");
    // The message went to dead letters, the lock is free with its token kept.
    assert!(
        repo.state_dir()
            .join("coordination_queue/dead")
            .read_dir()
            .unwrap()
            .count()
            > 0
    );
    let locks = repo.run_app(&["lock", "list"]);
    assert!(
        stdout(&locks).contains("db-schema free (last token 1)"),
        "{}",
        stdout(&locks)
    );
    assert_reclaimed(&repo);
}

#[test]
fn bad_usage_exits_2_and_changes_nothing() {
    let repo = TestRepo::new();
    let before = TestRepo::tree_state(&repo.state_dir());
    let output = repo.run_app(&["doctor", "--force"]);
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert!(stderr(&output).contains("--fix"));
    assert_eq!(before, TestRepo::tree_state(&repo.state_dir()));
    let clean = repo.run_app(&["doctor"]);
    assert_eq!(code(&clean), 0, "{}", stdout(&clean));
}

#[test]
fn only_force_discards_work() {
    let repo = TestRepo::new();
    let script = format!(
        "{} && echo draft > draft.txt && exec sleep 600",
        Work::Committed.script("gone")
    );
    let run = repo.spawn_app(&["run", "--instance", "gone", "--", "sh", "-c", &script]);
    let record = repo.wait_running(run.pid());
    wait_for("the draft", Duration::from_secs(10), || {
        record.worktree.as_ref().unwrap().join("draft.txt").exists()
    });
    let _ = run.kill_now();
    let fixed = repo.run_app(&["doctor", "--fix", "--force"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    assert!(repo.git(&["for-each-ref", "refs/app/rescue"]).is_empty());
    assert!(!repo.branches().contains(&"app/gone".to_string()));
    assert_reclaimed(&repo);
}

/// A dead instance `id` whose worktree holds an uncommitted `draft.txt`.
fn dead_with_draft(repo: &TestRepo, id: &str) {
    let script = "echo draft > draft.txt; exec sleep 600";
    let run = repo.spawn_app(&["run", "--instance", id, "--", "sh", "-c", script]);
    let record = repo.wait_running(run.pid());
    wait_for("the draft", Duration::from_secs(10), || {
        record.worktree.as_ref().unwrap().join("draft.txt").exists()
    });
    let _ = run.kill_now();
}

/// A dead instance's rescue ref is locked by a crashed writer `age` ago: `doctor --fix` still
/// rescues the work, removes the lock and reclaims everything.
fn rescue_past_a_crashed_writer(age: Duration) {
    let repo = TestRepo::new();
    dead_with_draft(&repo, "gone");
    let lock = repo.crashed_ref_writer("refs/app/rescue/gone", age);
    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    assert!(!stdout(&fixed).contains("FAILED"), "{}", stdout(&fixed));
    assert!(!lock.exists());
    assert_eq!(show(&repo, "refs/app/rescue/gone", "draft.txt"), "draft\n");
    assert_reclaimed(&repo);
}

#[test]
fn a_ref_lock_a_crash_left_just_now_does_not_stop_the_rescue() {
    rescue_past_a_crashed_writer(Duration::ZERO);
}

#[test]
fn an_old_ref_lock_is_removed_before_the_rescue_that_needs_it() {
    rescue_past_a_crashed_writer(Duration::from_secs(30));
}

#[test]
fn a_branch_lock_a_crash_left_just_now_does_not_keep_the_branch() {
    let repo = TestRepo::new();
    let run = repo.spawn_app(&["run", "--instance", "gone", "--", "sleep", "600"]);
    repo.wait_running(run.pid());
    let _ = run.kill_now();
    let lock = repo.crashed_ref_writer("refs/heads/app/gone", Duration::ZERO);
    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    assert!(!stdout(&fixed).contains("FAILED"), "{}", stdout(&fixed));
    assert!(!lock.exists());
    assert!(!repo.branches().contains(&"app/gone".to_string()));
    assert_reclaimed(&repo);
}

#[test]
fn a_ref_lock_a_live_process_holds_is_never_removed() {
    let repo = TestRepo::new();
    dead_with_draft(&repo, "gone");
    let lock = repo.crashed_ref_writer("refs/app/rescue/gone", Duration::from_secs(30));
    let holder = repo.hold_open(&lock);

    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 1, "{}{}", stdout(&fixed), stderr(&fixed));
    assert!(lock.exists(), "a held lock was removed");
    let worktree = repo.state_dir().join("worktrees/gone");
    assert_eq!(
        fs::read_to_string(worktree.join("draft.txt")).unwrap(),
        "draft\n"
    );
    let text = stdout(&fixed);
    assert!(
        text.contains(&format!("held by pid {}", holder.pid()))
            && text.contains("then run 'app doctor --fix' again"),
        "{text}"
    );

    let _ = holder.kill_now();
    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    assert_eq!(show(&repo, "refs/app/rescue/gone", "draft.txt"), "draft\n");
    assert_reclaimed(&repo);
}

/// The findings of `app doctor --json` of `kind`, as (subject, problem).
fn findings_of(repo: &TestRepo, kind: &str) -> Vec<(String, String)> {
    let output = repo.run_app(&["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&output))
        .unwrap_or_else(|err| panic!("{err}: {}{}", stdout(&output), stderr(&output)));
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == kind)
        .map(|f| {
            (
                f["subject"].as_str().unwrap().to_string(),
                f["problem"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until process `pid` is gone or a zombie.
fn wait_dead(pid: u32) {
    wait_for(
        &format!("pid {pid} to die"),
        Duration::from_secs(30),
        || fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z ")),
    );
}

#[test]
fn a_killed_instances_agent_state_and_a_killed_lock_waiters_record_are_removed_and_live_ones_kept()
{
    let repo = TestRepo::new();
    let activity = repo.state_dir().join("activity");
    let start = |id: &str| {
        let mut command = repo.app(&["run", "--instance", id, "--", "sleep", "600"]);
        command.env("APP_ACTIVITY_INTERVAL", "50ms");
        let running = repo.spawn(command);
        repo.wait_running(running.pid());
        let file = activity.join(format!("{id}.json"));
        wait_for(
            &format!("{id}'s state file"),
            Duration::from_secs(30),
            || file.exists(),
        );
        running
    };
    let killed = start("killed");
    let live = start("live");
    let said = repo
        .app(&["status", "needs-input", "ready?"])
        .env("APP_INSTANCE_ID", "killed")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&said), 0, "{}", stderr(&said));
    assert!(activity.join("killed.said.json").exists());

    // A holder and two waiters for one lock; one waiter is killed mid-wait.
    let holder = repo.spawn_app(&["lock", "run", "db", "--", "sleep", "600"]);
    let waiting = repo.state_dir().join("locks/waiting");
    wait_for("the holder to hold db", Duration::from_secs(30), || {
        stdout(&repo.run_app(&["lock", "list"])).contains("db")
    });
    let waiter = |n: usize| {
        let running = repo.spawn_app(&["lock", "acquire", "db", "--timeout", "10m"]);
        wait_for(
            &format!("{n} waiter record(s)"),
            Duration::from_secs(30),
            // A record being written is a dot-prefixed temp file until its rename.
            || {
                fs::read_dir(&waiting).map_or(0, |d| {
                    d.flatten()
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                }) == n
            },
        );
        running
    };
    let gone_waiter = waiter(1);
    let live_waiter = waiter(2);
    let record_of = |pid: u32| {
        fs::read_dir(&waiting)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{pid}-"))
            })
            .unwrap_or_else(|| panic!("no waiter record of pid {pid}"))
    };
    let (gone_record, live_record) = (record_of(gone_waiter.pid()), record_of(live_waiter.pid()));

    // The supervisor and its command at once (a group of their own), and the one waiter.
    let (killed_pid, gone_pid) = (killed.pid(), gone_waiter.pid());
    drop(killed.kill_now());
    drop(gone_waiter.kill_now());
    wait_dead(killed_pid);
    wait_dead(gone_pid);

    let reported = findings_of(&repo, "activity");
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].0, "killed", "{reported:?}");
    assert!(
        reported[0].1.starts_with("2 agent-state file(s)"),
        "{reported:?}"
    );
    let waiters = findings_of(&repo, "lock-waiter");
    assert_eq!(
        waiters
            .iter()
            .map(|(subject, _)| subject.as_str())
            .collect::<Vec<_>>(),
        [gone_record.display().to_string()],
        "{waiters:?}"
    );
    // Without --fix nothing went.
    assert!(activity.join("killed.json").exists() && gone_record.exists());

    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert!(
        stdout(&fixed).contains("killed"),
        "{}{}",
        stdout(&fixed),
        stderr(&fixed)
    );
    assert!(!activity.join("killed.json").exists());
    assert!(!activity.join("killed.said.json").exists());
    assert!(!gone_record.exists());
    // What runs keeps its files: the live instance's state, the live waiter's record.
    assert!(activity.join("live.json").exists());
    assert!(live_record.exists());
    assert!(findings_of(&repo, "activity").is_empty());
    assert!(findings_of(&repo, "lock-waiter").is_empty());

    drop(live_waiter.kill_now());
    drop(holder.kill_now());
    let output = live.wait_after(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(code(&output), 143, "{}", stderr(&output));
}

#[test]
fn a_start_killed_while_writing_its_dot_git_leaves_nothing_to_lose_and_anything_beside_it_is_kept()
{
    let repo = TestRepo::new();
    let out = repo.run_app(&["run", "--no-worktree", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let git_dir = repo.root().join(".git");
    let half = |id: &str, cut: usize| {
        let dir = repo.root().join(".app/worktrees").join(id);
        fs::create_dir_all(&dir).unwrap();
        let whole = format!("gitdir: {}\n", git_dir.join("worktrees").join(id).display());
        fs::write(dir.join(".git"), &whole.as_bytes()[..cut]).unwrap();
        dir
    };
    // Killed after the file was made, and in the middle of its line.
    let empty = half("cut-empty", 0);
    let partial = half("cut-partial", 11);
    // The same beginning with a file of someone's beside it, and a `.git` that is not ours.
    let beside = half("cut-beside", 11);
    fs::write(beside.join("notes.txt"), "mine").unwrap();
    let foreign = repo.root().join(".app/worktrees/cut-foreign");
    fs::create_dir_all(&foreign).unwrap();
    fs::write(foreign.join(".git"), "gitdir: /elsewhere").unwrap();

    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert!(!empty.exists(), "{}", stdout(&fixed));
    assert!(!partial.exists(), "{}", stdout(&fixed));
    assert_eq!(
        fs::read_to_string(beside.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        fs::read_to_string(foreign.join(".git")).unwrap(),
        "gitdir: /elsewhere"
    );
    let left = stdout(&repo.run_app(&["doctor"]));
    assert!(
        left.contains("cut-beside") && left.contains("cut-foreign"),
        "{left}"
    );
    assert!(
        !left.contains("cut-empty") && !left.contains("cut-partial"),
        "{left}"
    );
}
