//! `app ci`: isolated, always-cleaned worktrees for CI jobs.

use std::fs;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{TestRepo, code, stderr, stdout, wait_for};

fn worktrees(repo: &TestRepo) -> usize {
    fs::read_dir(repo.state_dir().join("worktrees")).map_or(0, |d| d.count())
}

#[test]
fn a_checked_out_branch_is_tested_detached_and_the_worktree_always_goes() {
    let repo = TestRepo::new();
    let main_before = repo.git(&["rev-parse", "main"]);
    let output = repo.run_app(&[
        "ci",
        "--branch",
        "main",
        "--",
        "sh",
        "-c",
        "test -f README.md && git symbolic-ref -q HEAD || echo detached; echo scratch > out.txt; exit 5",
    ]);
    assert_eq!(code(&output), 5, "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "detached");
    assert_eq!(worktrees(&repo), 0);
    assert!(repo.instances().is_empty());
    assert_eq!(repo.git(&["rev-parse", "main"]), main_before);
    // What the job left uncommitted was saved, not thrown away.
    let rescued = repo.git(&["for-each-ref", "--format=%(refname)", "refs/app/rescue/"]);
    let rescued = rescued.lines().next().expect("a rescue ref");
    repo.git(&["cat-file", "-e", &format!("{rescued}:out.txt")]);
    assert!(stderr(&output).contains(rescued), "{}", stderr(&output));
}

#[test]
fn a_new_branch_keeps_its_commits_and_a_timeout_exits_124() {
    let repo = TestRepo::new();
    let output = repo.run_app(&[
        "ci",
        "--branch",
        "ci/build",
        "--",
        "sh",
        "-c",
        "git branch --show-current; echo built > built.txt && git add built.txt && git commit -q -m built",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "ci/build");
    repo.git(&["cat-file", "-e", "ci/build:built.txt"]);
    assert_eq!(worktrees(&repo), 0);

    let slow = repo.run_app(&[
        "ci",
        "--branch",
        "ci/slow",
        "--timeout",
        "500ms",
        "--",
        "sleep",
        "60",
    ]);
    assert_eq!(code(&slow), 124, "{}", stderr(&slow));
    assert!(stderr(&slow).contains("--timeout"), "{}", stderr(&slow));
    assert_eq!(worktrees(&repo), 0);
    // It made no commit: the branch it created is gone again.
    assert!(!repo.branches().contains(&"ci/slow".to_string()));
    assert!(repo.instances().is_empty());
}

#[test]
fn a_signal_stops_the_job_and_it_still_cleans_up() {
    let repo = TestRepo::new();
    let marker = repo.scratch().join("started");
    let script = format!("touch {}; exec sleep 300", marker.display());
    let job = repo.spawn(repo.app(&["ci", "--branch", "main", "--", "sh", "-c", &script]));
    wait_for("the job to start", Duration::from_secs(30), || {
        marker.exists()
    });
    assert_eq!(worktrees(&repo), 1);
    let output = job.wait_after(Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(code(&output), 143, "{}", stderr(&output));
    assert_eq!(worktrees(&repo), 0);
    assert!(repo.instances().is_empty());
}

#[test]
fn parallel_jobs_on_one_branch_never_collide() {
    let repo = TestRepo::new();
    repo.git(&["branch", "shared"]);
    let scratch = repo.scratch();
    let jobs: Vec<_> = (0..4)
        .map(|n| {
            let script = format!(
                "echo $APP_INSTANCE_ID > {}/job-{n}; sleep 0.5; test -f README.md",
                scratch.display()
            );
            repo.spawn(repo.app(&["ci", "--branch", "shared", "--", "sh", "-c", &script]))
        })
        .collect();
    for job in jobs {
        let output = job.wait(Duration::from_secs(60));
        assert_eq!(code(&output), 0, "{}", stderr(&output));
    }
    let ids: std::collections::HashSet<String> = (0..4)
        .map(|n| fs::read_to_string(scratch.join(format!("job-{n}"))).unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "every job had an instance of its own");
    assert_eq!(worktrees(&repo), 0);
    assert!(repo.instances().is_empty());
}
