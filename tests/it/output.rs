//! A closed standard output (`app doctor | head -1`): `app` stops printing and exits quietly
//! with 141, as a command killed by SIGPIPE would, instead of panicking.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use crate::support::{TestRepo, code, stderr};

/// 128 + SIGPIPE.
const STDOUT_CLOSED: i32 = 141;

/// The reader is gone before `app` writes its first line.
#[test]
fn a_stdout_closed_before_the_first_line_ends_app_quietly_with_141() {
    let repo = TestRepo::new();
    for args in [&["doctor"][..], &["doctor", "--json"]] {
        let mut command = repo.app(args);
        command.stdout(Stdio::piped());
        let mut app = repo.spawn(command);
        drop(app.take_stdout());
        let output = app.wait(Duration::from_secs(30));
        assert_eq!(
            code(&output),
            STDOUT_CLOSED,
            "app {args:?}: {}",
            stderr(&output)
        );
        assert_eq!(stderr(&output), "", "app {args:?} prints nothing more");
    }
}

/// `app events --follow | head -1`: the reader takes one line and leaves; the next event `app`
/// prints ends it.
#[test]
fn a_stdout_closed_after_one_line_ends_a_follow_with_141() {
    let repo = TestRepo::new();
    let first = repo.run_app(&["run", "--no-worktree", "--", "true"]);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let mut command = repo.app(&["events", "--follow"]);
    command.stdout(Stdio::piped());
    let mut follow = repo.spawn(command);
    let mut line = String::new();
    BufReader::new(follow.take_stdout())
        .read_line(&mut line)
        .unwrap();
    assert!(!line.is_empty(), "events --follow printed its first event");
    // The reader is gone (dropped above); the next event is written into a closed pipe.
    let second = repo.run_app(&["run", "--no-worktree", "--", "true"]);
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    let output = follow.wait(Duration::from_secs(30));
    assert_eq!(code(&output), STDOUT_CLOSED, "{}", stderr(&output));
    assert_eq!(stderr(&output), "");
}
