//! `app instance exec` through a running instance's control socket.

use std::fs;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use crate::support::{Running, TestRepo, code, hermetic, stderr, stdout};

/// A live instance `name` with a worktree, running `sleep`.
fn live(repo: &TestRepo, name: &str) -> (Running, std::path::PathBuf) {
    let run = repo.spawn_app(&["run", "--instance", name, "--", "sleep", "300"]);
    let record = repo.wait_running(run.pid());
    (run, record.worktree.unwrap())
}

#[test]
fn exec_runs_in_the_instances_worktree_with_its_environment_and_exit_code() {
    let repo = TestRepo::new();
    let (_run, worktree) = live(&repo, "target");
    let socket = repo.state_dir().join("run/target.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let pwd = repo.run_app(&["instance", "exec", "target", "--", "pwd"]);
    assert_eq!(code(&pwd), 0, "{}", stderr(&pwd));
    assert_eq!(stdout(&pwd).trim(), worktree.to_str().unwrap());

    let env = repo.run_app(&[
        "instance",
        "exec",
        "target",
        "--",
        "sh",
        "-c",
        "echo $APP_INSTANCE_ID $APP_BRANCH",
    ]);
    assert_eq!(stdout(&env).trim(), "target app/target");

    let seven = repo.run_app(&[
        "instance",
        "exec",
        "target",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(code(&seven), 7);
    assert_eq!(stdout(&seven), "out\n");
    assert_eq!(stderr(&seven), "err\n");

    let missing = repo.run_app(&["instance", "exec", "target", "--", "no-such-command-here"]);
    assert_eq!(code(&missing), 127, "{}", stderr(&missing));
}

#[test]
fn ten_megabytes_of_output_and_stdin_arrive_byte_identical() {
    let repo = TestRepo::new();
    let (_run, _) = live(&repo, "bulk");
    // Not compressible, not text: every byte value, in an order that does not repeat soon.
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = repo.scratch().join("bulk.bin");
    fs::write(&file, &data).unwrap();
    let output = repo.run_app(&[
        "instance",
        "exec",
        "bulk",
        "--",
        "cat",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(output.stdout == data, "10 MB of output changed on the way");

    let mut child = repo
        .app(&["instance", "exec", "bulk", "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&sent).unwrap());
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let local = hermetic("sha256sum").arg(&file).output().unwrap();
    assert_eq!(
        stdout(&output).split_whitespace().next(),
        String::from_utf8_lossy(&local.stdout)
            .split_whitespace()
            .next()
    );
}

#[test]
fn two_execs_run_at_once() {
    let repo = TestRepo::new();
    let (_run, _) = live(&repo, "both");
    let marks = repo.scratch();
    // Each waits (up to 20 s) for the other to have started: only concurrent execs both finish.
    let execs: Vec<Running> = [("one", "two"), ("two", "one")]
        .iter()
        .map(|(me, other)| {
            let script = format!(
                "touch {dir}/{me}; i=0; while [ ! -e {dir}/{other} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; [ -e {dir}/{other} ] && echo {me}",
                dir = marks.display()
            );
            repo.spawn(repo.app(&["instance", "exec", "both", "--", "sh", "-c", &script]))
        })
        .collect();
    let outputs: Vec<_> = execs
        .into_iter()
        .map(|e| e.wait(Duration::from_secs(60)))
        .collect();
    assert_eq!(stdout(&outputs[0]), "one\n", "{}", stderr(&outputs[0]));
    assert_eq!(stdout(&outputs[1]), "two\n", "{}", stderr(&outputs[1]));
}

#[test]
fn a_peer_of_another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() || which("python3").is_none() {
        eprintln!("SKIPPED: needs root (to connect as another user) and python3");
        return;
    }
    let repo = TestRepo::new();
    let (_run, _) = live(&repo, "guarded");
    // Open the way through the file modes, so only the peer-credential check stands.
    use std::os::unix::fs::PermissionsExt;
    let socket = repo.state_dir().join("run/guarded.sock");
    for (path, mode) in [
        (repo.root().parent().unwrap().to_path_buf(), 0o755),
        (repo.root().to_path_buf(), 0o755),
        (repo.state_dir(), 0o711),
        (repo.state_dir().join("run"), 0o711),
        (socket.clone(), 0o666),
    ] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let client = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(10)
data = b""
try:
    s.sendall(b'{"exec": ["sh", "-c", "echo got in"]}' + bytes([10]))
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
print(len(data))
"#;
    let as_other = |uid: u32| {
        use std::os::unix::process::CommandExt;
        hermetic("python3")
            .args(["-c", client, socket.to_str().unwrap()])
            .uid(uid)
            .output()
            .unwrap()
    };
    let other = as_other(65534);
    assert_eq!(code(&other), 0, "{}", stderr(&other));
    assert_eq!(stdout(&other).trim(), "0", "another user got an answer");
    let same = as_other(0);
    assert_ne!(
        stdout(&same).trim(),
        "0",
        "the owner got nothing: {}",
        stderr(&same)
    );
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.is_file())
}

#[test]
fn unknown_and_dead_instances_are_clear_errors_and_the_socket_goes_with_the_instance() {
    let repo = TestRepo::new();
    let unknown = repo.run_app(&["instance", "exec", "nobody", "--", "true"]);
    assert_eq!(code(&unknown), 2, "{}", stderr(&unknown));
    assert!(stderr(&unknown).contains("nobody"));

    let (run, _) = live(&repo, "victim");
    let _ = run.kill_now();
    let dead = repo.run_app(&["instance", "exec", "victim", "--", "true"]);
    assert_eq!(code(&dead), 1, "{}", stderr(&dead));
    assert!(stderr(&dead).contains("not running"), "{}", stderr(&dead));
    // The killed supervisor left its socket: doctor reports and removes it.
    let socket = repo.state_dir().join("run/victim.sock");
    assert!(socket.exists());
    let report = repo.run_app(&["doctor", "--json"]);
    assert!(
        stdout(&report).contains("\"socket\""),
        "{}",
        stdout(&report)
    );
    let fixed = repo.run_app(&["doctor", "--fix"]);
    assert_eq!(code(&fixed), 0, "{}{}", stdout(&fixed), stderr(&fixed));
    assert!(!socket.exists());

    // A clean exit removes the socket itself.
    let done = repo.run_app(&["run", "--instance", "brief", "--", "true"]);
    assert_eq!(code(&done), 0, "{}", stderr(&done));
    assert!(!repo.state_dir().join("run/brief.sock").exists());
}

#[test]
fn broadcast_runs_everywhere_and_succeeds_only_when_all_do() {
    let repo = TestRepo::new();
    let (_a, _) = live(&repo, "alpha");
    let (_b, _) = live(&repo, "beta");
    let all = repo.run_app(&["broadcast", "--", "sh", "-c", "echo in $APP_INSTANCE_ID"]);
    assert_eq!(code(&all), 0, "{}", stderr(&all));
    let text = stdout(&all);
    assert!(text.contains("== alpha (exit 0) ==\nin alpha\n"), "{text}");
    assert!(text.contains("== beta (exit 0) ==\nin beta\n"), "{text}");

    let some_fail = repo.run_app(&[
        "broadcast",
        "--",
        "sh",
        "-c",
        "test $APP_INSTANCE_ID = alpha",
    ]);
    assert_eq!(code(&some_fail), 1);
    assert!(
        stderr(&some_fail).contains("1 of 2 succeeded; failed: beta (exit 1)"),
        "{}",
        stderr(&some_fail)
    );

    let only = repo.run_app(&["broadcast", "--instances", "beta", "--", "echo", "hi"]);
    assert_eq!(code(&only), 0, "{}", stderr(&only));
    assert_eq!(stdout(&only), "== beta (exit 0) ==\nhi\n");

    let unknown = repo.run_app(&["broadcast", "--instances", "beta,ghost", "--", "true"]);
    assert_eq!(code(&unknown), 2, "{}", stderr(&unknown));
    assert!(
        !stdout(&unknown).contains("=="),
        "nothing may run on bad input"
    );
}

#[test]
fn stop_asks_through_the_socket_and_falls_back_to_signals() {
    let repo = TestRepo::new();
    let (run, _) = live(&repo, "polite");
    let stopped = repo.run_app(&["instance", "stop", "polite"]);
    assert_eq!(code(&stopped), 0, "{}", stderr(&stopped));
    assert!(
        stderr(&stopped).contains("stopped (asked through its control socket)"),
        "{}",
        stderr(&stopped)
    );
    let output = run.wait(Duration::from_secs(30));
    assert_eq!(code(&output), 128 + 15, "the command got SIGTERM");

    let (run, _) = live(&repo, "socketless");
    fs::remove_file(repo.state_dir().join("run/socketless.sock")).unwrap();
    let stopped = repo.run_app(&["instance", "stop", "socketless"]);
    assert_eq!(code(&stopped), 0, "{}", stderr(&stopped));
    assert!(
        stderr(&stopped).contains("no control socket answered; sent SIGTERM"),
        "{}",
        stderr(&stopped)
    );
    let output = run.wait(Duration::from_secs(30));
    assert_eq!(code(&output), 128 + 15);
}

/// Whether `pid` is stopped (state `T` in /proc).
fn stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

#[test]
fn exec_into_an_instance_that_is_still_starting_waits_for_its_socket() {
    let repo = TestRepo::new();
    // The supervisor stops itself right after registering, before it serves its socket.
    let mut command = repo.app(&["run", "--instance", "early", "--", "sleep", "300"]);
    command.env("APP_FAULT_PAUSE", "run.registered");
    let run = repo.spawn(command);
    crate::support::wait_for("the instance to pause", Duration::from_secs(30), || {
        stopped(run.pid())
    });
    let list = repo.run_app(&["instance", "list", "--long"]);
    assert!(stdout(&list).contains("starting"), "{}", stdout(&list));
    assert!(!repo.state_dir().join("run/early.sock").exists());

    let exec = repo.spawn(repo.app(&["instance", "exec", "early", "--", "echo", "inside"]));
    // It waits rather than failing at once.
    std::thread::sleep(Duration::from_millis(700));
    let mut exec = exec;
    exec.assert_running();
    crate::support::kill(run.pid(), nix::sys::signal::Signal::SIGCONT);
    let output = exec.wait(Duration::from_secs(30));
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "inside\n");
}
