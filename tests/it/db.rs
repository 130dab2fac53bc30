//! The shared database under real contention: many writer processes, writers killed mid-run, a
//! held write lock, concurrent first starts. Each test runs against a local file and against a
//! real libSQL server (sqld) on 127.0.0.1.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use app::db::{Db, DbSettings, Location, notes};

use crate::support::{Running, Sqld, TestRepo, code, stderr, stdout, wait_for};

/// Where a test's database lives.
enum Target {
    Local(PathBuf),
    Remote(Sqld),
}

impl Target {
    fn location(&self) -> Location {
        match self {
            Target::Local(path) => Location::Local(path.clone()),
            Target::Remote(server) => Location::Remote {
                url: server.url().to_string(),
                auth_token: String::new(),
            },
        }
    }

    /// Points a child process at this database.
    fn apply<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        let (name, value) = self.location().export();
        command.env(name, value)
    }

    fn open(&self) -> Db {
        block_on(Db::open(
            self.location(),
            DbSettings {
                retry_deadline: Duration::from_secs(60),
            },
        ))
        .unwrap()
    }
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    app::db::runtime().unwrap().block_on(future)
}

/// Runs each test body twice: against a local file and against a fresh libSQL server.
macro_rules! against_both {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[test]
                fn $name() {
                    let repo = crate::support::TestRepo::new();
                    let target = super::Target::Local(repo.scratch().join("shared.db"));
                    super::$name(&repo, &target);
                }
            )*
        }
        mod remote {
            $(
                #[test]
                fn $name() {
                    let Some(server) = crate::support::Sqld::start() else { return };
                    let repo = crate::support::TestRepo::new();
                    super::$name(&repo, &super::Target::Remote(server));
                }
            )*
        }
    };
}

against_both!(
    eight_writers_each_add_500_notes,
    killed_writers_lose_no_committed_note,
    a_held_write_lock_makes_writers_wait_then_fails_past_the_deadline,
    concurrent_first_starts_migrate_once,
    run_mirrors_its_instance_and_lifecycle_into_the_database,
);

const WRITERS: usize = 8;
const NOTES_EACH: usize = 500;
const NAMESPACE: &str = "test:writers";

fn namespace() -> app::ids::Namespace {
    app::ids::Namespace::parse(NAMESPACE).unwrap()
}

/// A writer child: this test binary run again with only [`writer_child`] selected.
fn spawn_writer(repo: &TestRepo, target: &Target, name: &str) -> Running {
    let mut command = repo.command(std::env::current_exe().unwrap());
    command
        .args(["db::writer_child", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env("APP_TEST_WRITER", format!("{name},{NOTES_EACH}"));
    target.apply(&mut command);
    repo.spawn(command)
}

/// Not a test: the body of a writer process. Adds notes one transaction each through the
/// library and prints `committed <id>\t<content>` after each commit.
#[test]
#[ignore = "a child process of the database tests; does nothing on its own"]
fn writer_child() {
    let Ok(spec) = std::env::var("APP_TEST_WRITER") else {
        return;
    };
    let (name, count) = spec.split_once(',').unwrap();
    let count: usize = count.parse().unwrap();
    block_on(async {
        let db = Db::open_default(None, DbSettings::default()).await.unwrap();
        for i in 0..count {
            let content = format!("{name} note {i} {}", "x".repeat(i % 40));
            let note = notes::add(&db, &namespace(), &content, Some(name), None)
                .await
                .unwrap();
            println!("committed {}\t{}", note.id, note.content);
        }
    });
}

/// The `(id, content)` pairs a writer reported committed.
fn committed(output: &std::process::Output) -> Vec<(i64, String)> {
    stdout(output)
        .lines()
        // libtest prints "test db::writer_child ... " without a newline before the first line.
        .filter_map(|line| line.split_once("committed ").map(|(_, rest)| rest))
        .map(|rest| {
            let (id, content) = rest.split_once('\t').unwrap();
            (id.parse().unwrap(), content.to_string())
        })
        .collect()
}

fn all_notes(db: &Db) -> Vec<(i64, String)> {
    let rows = block_on(db.query_rows(
        "test",
        "SELECT id, content FROM notes WHERE namespace = ?1 ORDER BY id",
        vec![NAMESPACE.into()],
    ))
    .unwrap();
    rows.into_iter()
        .map(|row| match (&row[0], &row[1]) {
            (libsql::Value::Integer(id), libsql::Value::Text(content)) => (*id, content.clone()),
            other => panic!("unexpected row {other:?}"),
        })
        .collect()
}

fn eight_writers_each_add_500_notes(repo: &TestRepo, target: &Target) {
    let writers: Vec<Running> = (0..WRITERS)
        .map(|n| spawn_writer(repo, target, &format!("w{n}")))
        .collect();
    let mut reported = Vec::new();
    for writer in writers {
        let output = writer.wait(Duration::from_secs(240));
        assert_eq!(code(&output), 0, "writer failed: {}", stderr(&output));
        reported.extend(committed(&output));
    }
    assert_eq!(reported.len(), WRITERS * NOTES_EACH);
    let db = target.open();
    let mut stored = all_notes(&db);
    assert_eq!(
        stored.len(),
        WRITERS * NOTES_EACH,
        "exactly one row per note"
    );
    reported.sort();
    stored.sort();
    assert_eq!(
        stored, reported,
        "every row is the one its writer committed"
    );
    assert_eq!(block_on(db.check(true)).unwrap(), "ok");
}

fn killed_writers_lose_no_committed_note(repo: &TestRepo, target: &Target) {
    let db = target.open();
    let writers: Vec<Running> = (0..WRITERS)
        .map(|n| spawn_writer(repo, target, &format!("k{n}")))
        .collect();
    wait_for(
        "writers to commit 400 notes",
        Duration::from_secs(120),
        || block_on(notes::count(&db, NAMESPACE)).unwrap() >= 400,
    );
    let outputs: Vec<_> = writers.into_iter().map(Running::kill_now).collect();
    let reported: Vec<(i64, String)> = outputs.iter().flat_map(committed).collect();
    let stored = all_notes(&db);
    assert!(
        stored.len() < WRITERS * NOTES_EACH,
        "the writers were killed before they finished"
    );
    for note in &reported {
        assert!(stored.contains(note), "committed note {note:?} is gone");
    }
    assert_eq!(block_on(db.check(true)).unwrap(), "ok");
    // The full-text index agrees with the table after the crash (one statement, one snapshot:
    // a server may still be applying requests the killed writers sent).
    let counts = block_on(db.query_rows(
        "test",
        "SELECT (SELECT count(*) FROM notes),
                (SELECT count(*) FROM notes_fts WHERE notes_fts MATCH 'note')",
        vec![],
    ))
    .unwrap();
    assert_eq!(
        counts[0][0], counts[0][1],
        "table and full-text index agree"
    );
}

fn a_held_write_lock_makes_writers_wait_then_fails_past_the_deadline(
    repo: &TestRepo,
    target: &Target,
) {
    let db = target.open();
    let runtime = app::db::runtime().unwrap();
    // A second, raw connection takes the write lock and keeps it.
    let holder = runtime.block_on(async {
        let database = match target.location() {
            Location::Local(path) => libsql::Builder::new_local(path).build().await,
            Location::Remote { url, auth_token } => {
                libsql::Builder::new_remote(url, auth_token).build().await
            }
        };
        database.unwrap().connect().unwrap()
    });
    let begin = || {
        runtime.block_on(async {
            holder.execute("BEGIN IMMEDIATE", ()).await.unwrap();
            holder
                .execute(
                    "INSERT INTO notes (uid, namespace, content, host, created_at) VALUES (hex(randomblob(16)), 'holder', 'held', 'h', 'now')",
                    (),
                )
                .await
                .unwrap();
        })
    };
    let add_note = |deadline: &str, text: &str| {
        let mut command = repo.app(&["notes", "add", "-n", "lock:test", text]);
        command.env("APP_DB_RETRY_DEADLINE", deadline);
        target.apply(&mut command);
        repo.spawn(command)
    };

    begin();
    let mut waiter = add_note("60s", "waited for the lock");
    std::thread::sleep(Duration::from_millis(1500));
    waiter.assert_running();
    runtime.block_on(holder.execute("COMMIT", ())).unwrap();
    let output = waiter.wait(Duration::from_secs(60));
    assert_eq!(code(&output), 0, "{}", stderr(&output));

    begin();
    let output = add_note("1s", "gives up").wait(Duration::from_secs(60));
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains(&target.location().to_string()) && message.contains("locked"),
        "the error names the database: {message}"
    );
    runtime.block_on(holder.execute("ROLLBACK", ())).unwrap();

    let stored = block_on(notes::list(
        &db,
        &app::ids::Namespace::parse("lock:test").unwrap(),
        10,
    ))
    .unwrap();
    let texts: Vec<&str> = stored.iter().map(|n| n.content.as_str()).collect();
    match target {
        Target::Local(_) => {
            assert!(message.contains("nothing was written"), "{message}");
            assert_eq!(
                texts,
                ["waited for the lock"],
                "the refused note was not written"
            );
        }
        // A server queues the request behind the lock; the message says it may still land.
        Target::Remote(_) => {
            assert!(message.contains("may still apply"), "{message}");
            assert!(texts.contains(&"waited for the lock"), "{texts:?}");
        }
    }
}

fn concurrent_first_starts_migrate_once(repo: &TestRepo, target: &Target) {
    let starts: Vec<Running> = (0..8)
        .map(|_| {
            let mut command = repo.app(&["db", "status", "--json"]);
            command.env("APP_LOG", "app=info");
            target.apply(&mut command);
            repo.spawn(command)
        })
        .collect();
    let mut migrations_applied = 0;
    for start in starts {
        let output = start.wait(Duration::from_secs(120));
        assert_eq!(code(&output), 0, "{}", stderr(&output));
        let status: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
        assert_eq!(status["schema_version"], status["latest_schema_version"]);
        assert_eq!(status["quick_check"], "ok");
        migrations_applied += stderr(&output).matches("applying migration").count();
    }
    let versions = app::db::schema::versions();
    assert_eq!(
        migrations_applied,
        versions.len(),
        "every migration was applied once, by one process"
    );
    let db = target.open();
    let rows = block_on(db.query_rows(
        "test",
        "SELECT version FROM schema_migrations ORDER BY version",
        vec![],
    ))
    .unwrap();
    let want: Vec<Vec<libsql::Value>> = versions
        .into_iter()
        .map(|v| vec![libsql::Value::Integer(v)])
        .collect();
    assert_eq!(rows, want);
}

/// `app run` mirrors its instance into the default database of the test's home.
fn mirrored(repo: &TestRepo) -> Db {
    block_on(Db::open(
        Location::Local(repo.db_path()),
        DbSettings {
            retry_deadline: Duration::from_secs(60),
        },
    ))
    .unwrap()
}

/// `app ARGS` in `repo` against `target`'s database.
fn app_on(repo: &TestRepo, target: &Target, args: &[&str]) -> std::process::Output {
    let mut command = repo.app(args);
    target.apply(&mut command);
    command.stdin(std::process::Stdio::null()).output().unwrap()
}

fn event_kinds(repo: &TestRepo, target: &Target, id: &str) -> Vec<String> {
    let output = app_on(repo, target, &["events", "--json", "--instance", id]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    stdout(&output)
        .lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            event["kind"].as_str().unwrap().to_string()
        })
        .collect()
}

// Against a server the mirror writes its row and events in one batch request: the remote
// variant reads back what such a batch wrote.
fn run_mirrors_its_instance_and_lifecycle_into_the_database(repo: &TestRepo, target: &Target) {
    let mut command = repo.app(&["run", "--instance", "mirrored", "--", "sleep", "30"]);
    target.apply(&mut command);
    let run = repo.spawn(command);
    let record = repo.wait_running(run.pid());
    wait_for(
        "the instance to appear in the database",
        Duration::from_secs(30),
        || {
            let output = app_on(repo, target, &["instance", "list", "--everywhere"]);
            stdout(&output).starts_with(&format!("mirrored:{} ", record.pid))
        },
    );
    assert_eq!(event_kinds(repo, target, "mirrored"), ["instance.started"]);

    crate::support::kill(run.pid(), nix::sys::signal::Signal::SIGTERM);
    let output = run.wait(Duration::from_secs(30));
    assert_eq!(code(&output), 128 + 15, "{}", stderr(&output));

    let output = app_on(
        repo,
        target,
        &["instance", "list", "--everywhere", "--json"],
    );
    assert_eq!(
        stdout(&output).trim(),
        "[]",
        "a stopped instance is not live"
    );
    assert_eq!(
        event_kinds(repo, target, "mirrored"),
        ["instance.started", "instance.stopped"]
    );
    let rows = block_on(app::db::instances::history(
        &target.open(),
        repo.root(),
        "mirrored",
    ))
    .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "stopped");
    assert_eq!(rows[0].exit_code, Some(143));
    assert_eq!(rows[0].branch.as_deref(), Some("app/mirrored"));
    assert!(rows[0].stopped_at.is_some());
}

#[test]
fn a_killed_instance_drops_out_of_everywhere_once_its_heartbeat_ages() {
    let repo = TestRepo::new();
    let mut command = repo.app(&["run", "--instance", "doomed", "--", "sleep", "30"]);
    command.env("APP_HEARTBEAT_INTERVAL", "200ms");
    let run = repo.spawn(command);
    repo.wait_running(run.pid());
    let listed = || {
        let output = repo
            .app(&["instance", "list", "--everywhere"])
            .env("APP_STALE_AFTER", "1s")
            .output()
            .unwrap();
        stdout(&output).contains("doomed:")
    };
    wait_for(
        "the instance to be mirrored",
        Duration::from_secs(30),
        listed,
    );
    run.kill_now();
    wait_for(
        "the killed instance to go stale",
        Duration::from_secs(30),
        || !listed(),
    );
    // The row stays as history, still saying what it last knew.
    let rows = block_on(app::db::instances::history(
        &mirrored(&repo),
        repo.root(),
        "doomed",
    ))
    .unwrap();
    assert_eq!(rows[0].status, "running");
}

#[test]
fn a_database_that_is_down_or_locked_never_stops_an_agent() {
    let repo = TestRepo::new();
    // Nothing listens on port 9 of loopback (discard, never served here).
    let output = repo
        .app(&["run", "--", "sh", "-c", "echo working; exit 7"])
        .env("APP_DB_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(code(&output), 7, "{}", stderr(&output));
    assert_eq!(stdout(&output), "working\n");
    assert!(
        stderr(&output).contains("cannot mirror"),
        "a warning says so: {}",
        stderr(&output)
    );

    // A local database whose write lock another connection holds.
    let db = mirrored(&repo);
    let runtime = app::db::runtime().unwrap();
    let holder = runtime.block_on(async {
        let conn = libsql::Builder::new_local(repo.db_path())
            .build()
            .await
            .unwrap()
            .connect()
            .unwrap();
        conn.execute("BEGIN IMMEDIATE", ()).await.unwrap();
        conn
    });
    let started = std::time::Instant::now();
    let output = repo
        .app(&["run", "--", "sh", "-c", "exit 0"])
        .env("APP_DB_RETRY_DEADLINE", "120s")
        .output()
        .unwrap();
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the way out does not wait for the whole retry deadline"
    );
    runtime.block_on(holder.execute("ROLLBACK", ())).unwrap();
    drop(db);
}

#[test]
fn notes_from_the_command_line_round_trip_and_bad_input_writes_nothing() {
    let repo = TestRepo::new();
    let app = |args: &[&str]| repo.run_app(args);

    for bad in [
        &["notes", "add", "-n", "bad namespace", "text"][..],
        &["notes", "add", "-n", "ok", "   "],
        &["notes", "search", "-n", "ok", "  "],
        &["notes", "list", "-n", "ok", "--limit", "0"],
        &["events", "--since", "soon"],
    ] {
        let output = app(bad);
        assert_eq!(code(&output), 2, "{bad:?}: {}", stderr(&output));
    }
    let output = repo
        .app(&["notes", "add", "-n", "ok", "text"])
        .env("APP_DB_URL", "not-a-url")
        .output()
        .unwrap();
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert!(!repo.db_path().exists(), "bad input created no database");

    let output = app(&[
        "notes",
        "add",
        "-n",
        "project:x",
        "the Cargo.lock needs care",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "note 1 added to project:x\n");
    let output = repo
        .app(&[
            "remember",
            "-n",
            "project:x",
            "-c",
            "run \"migrations\" first",
            "--json",
        ])
        .env("APP_INSTANCE_ID", "agent7")
        .output()
        .unwrap();
    let note: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(note["author"], "agent7");
    assert_eq!(note["repo_root"], repo.root().display().to_string());
    app(&["notes", "add", "-n", "other", "migrations elsewhere"]);

    let found = stdout(&app(&["recall", "-n", "project:x", "MIGRATIONS"]));
    assert!(
        found.contains("agent7: run \"migrations\" first"),
        "{found}"
    );
    assert_eq!(found.lines().count(), 1, "only this namespace: {found}");
    // Query syntax characters are plain text, never an error.
    let output = app(&[
        "notes",
        "search",
        "-n",
        "project:x",
        "\"migrations",
        "OR",
        "*",
    ]);
    assert_eq!(
        code(&output),
        1,
        "no note has all three words: {}",
        stderr(&output)
    );

    let listed: serde_json::Value = serde_json::from_str(&stdout(&app(&[
        "notes",
        "list",
        "-n",
        "project:x",
        "--json",
    ])))
    .unwrap();
    let contents: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        ["run \"migrations\" first", "the Cargo.lock needs care"]
    );

    let status: serde_json::Value =
        serde_json::from_str(&stdout(&app(&["db", "status", "--json"]))).unwrap();
    assert_eq!(status["location"], repo.db_path().display().to_string());
    assert_eq!(status["quick_check"], "ok");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(repo.db_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
