//! The suite is hermetic: what the test process has in its environment (as when the suite runs
//! inside an `app` task, the product's own use case) does not reach the processes it starts.

use std::process::Output;

use crate::support::{TestRepo, code, hermetic, stderr, stdout};

/// What an `app` task's environment could hand the suite, each value one that `app` would act
/// on visibly: a crash point on the way to running the command, a payload limit that refuses
/// any message, ids, a secret that verifies nothing the binary signed, paths, a database and a
/// git directory that do not exist. The suite's in-process checks read no variable either:
/// they are given the key (`TestRepo::keys`).
const LEAKS: &[(&str, &str)] = &[
    ("APP_SHARED_SECRET", "LEAKED-secret"),
    ("APP_FAULT_POINT", "run.registered"),
    ("APP_MAX_MESSAGE_BYTES", "1"),
    ("APP_RUN_ID", "LEAKED-run"),
    ("APP_TASK_ID", "LEAKED-task"),
    ("APP_INSTANCE_ID", "LEAKED-instance"),
    ("APP_WORKTREE", "/LEAKED/worktree"),
    ("APP_POLL_INTERVAL", "LEAKED"),
    ("APP_PORT_RANGE", "LEAKED"),
    ("APP_DB_URL", "LEAKED-not-a-url"),
    ("APP_STALE_AFTER", "LEAKED"),
    ("APP_LOG", "trace"),
    ("GIT_DIR", "/LEAKED/git"),
];

/// The probe: `app run` whose command writes its whole environment to `env.txt` and then sends
/// its own instance a 5-byte message. Returns the output and what the command saw.
fn probe(repo: &TestRepo, leaks: &[(&str, &str)]) -> (Output, String) {
    let dump = repo.scratch().join("env.txt");
    let _ = std::fs::remove_file(&dump);
    let script = format!(
        "env > {}; \"$APP_BIN\" send --to probe hello",
        dump.display()
    );
    let mut command = repo.app(&["run", "--instance", "probe", "--", "sh", "-c", &script]);
    command.envs(leaks.iter().copied());
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run app");
    (output, std::fs::read_to_string(&dump).unwrap_or_default())
}

/// Whether the probe ran clean: exit 0, and nothing of [`LEAKS`] in the command's environment.
fn clean(output: &Output, seen: &str) -> bool {
    output.status.code() == Some(0) && !seen.contains("LEAKED") && !seen.contains("APP_LOG=")
}

#[test]
fn the_test_process_environment_does_not_reach_app_or_git() {
    let exe = std::env::current_exe().unwrap();
    let mut child = hermetic(exe);
    child
        .args(["environment::leaky_child", "--exact", "--ignored"])
        .args(["--nocapture", "--test-threads", "1"])
        .env("APP_TEST_LEAKY_CHILD", "1")
        .envs(LEAKS.iter().copied());
    let output = child
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the test binary again");
    assert_eq!(
        code(&output),
        0,
        "the child with a leaky environment failed:\n{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    // The child's body ran (an ignored test that returned early would also exit 0).
    assert!(
        stdout(&output).contains("leaky child: checked"),
        "{}",
        stdout(&output)
    );
}

/// Not a test: the test process of [`the_test_process_environment_does_not_reach_app_or_git`],
/// started with [`LEAKS`] in its own environment.
#[test]
#[ignore = "a child process of the environment test; does nothing on its own"]
fn leaky_child() {
    if std::env::var_os("APP_TEST_LEAKY_CHILD").is_none() {
        return;
    }
    for (name, value) in LEAKS {
        assert_eq!(
            std::env::var(name).as_deref(),
            Ok(*value),
            "{name} is not in the child's environment"
        );
    }
    // TestRepo::new runs git: a leaked GIT_DIR would make it fail.
    let repo = TestRepo::new();
    let (output, seen) = probe(&repo, &[]);
    assert!(
        clean(&output, &seen),
        "app saw the test process's environment: {:?}\nstderr: {}\nthe command's environment:\n{seen}",
        output.status,
        stderr(&output)
    );
    // The same probe with the same variables given on purpose notices them.
    let (output, seen) = probe(&repo, LEAKS);
    assert!(
        !clean(&output, &seen),
        "the probe did not notice variables given on purpose: {:?}\n{seen}",
        output.status
    );
    println!("leaky child: checked");
}
