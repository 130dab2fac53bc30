//! Drives `app`'s database layer for `scripts/bench-db.sh`.
//!
//! ```text
//! db_bench write  DB COUNT NAME    add COUNT notes, one BEGIN IMMEDIATE transaction each;
//!                                  prints "start_ns end_ns" (wall clock, after opening)
//! db_bench search DB              fill to 10k then 100k notes; print search latencies
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use app::db::{Db, DbSettings, Location, notes};

const NAMESPACE: &str = "bench:notes";

fn namespace() -> app::ids::Namespace {
    app::ids::Namespace::parse(NAMESPACE).expect("a valid namespace")
}
/// Words notes are made of; searches pick from the same list.
const WORDS: &[&str] = &[
    "cargo",
    "lock",
    "schema",
    "migration",
    "port",
    "server",
    "test",
    "flaky",
    "branch",
    "merge",
    "rebase",
    "worktree",
    "agent",
    "deploy",
    "cache",
    "index",
    "query",
    "latency",
    "config",
    "secret",
    "token",
    "retry",
    "timeout",
    "deadline",
    "queue",
    "message",
    "heartbeat",
    "stale",
    "doctor",
    "rescue",
    "commit",
    "review",
    "release",
    "build",
    "lint",
    "format",
    "bench",
    "memory",
    "thread",
    "socket",
    "signal",
    "process",
    "registry",
    "journal",
    "plan",
    "task",
    "graph",
    "cycle",
    "parser",
    "render",
];

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A deterministic xorshift generator, so every run writes the same notes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn sentence(&mut self, words: usize) -> String {
        (0..words)
            .map(|_| WORDS[(self.next() % WORDS.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

async fn open(path: &str) -> Db {
    let settings = DbSettings {
        retry_deadline: Duration::from_secs(120),
    };
    let location = if path.starts_with("http") {
        Location::Remote {
            url: path.to_string(),
            auth_token: String::new(),
        }
    } else {
        Location::Local(PathBuf::from(path))
    };
    Db::open(location, settings)
        .await
        .expect("open the database")
}

async fn write(path: &str, count: usize, name: &str) {
    let db = open(path).await;
    let start = now_ns();
    for i in 0..count {
        let content = format!("{name} note {i} about the cargo lock and the schema migration");
        let t = Instant::now();
        notes::add(&db, &namespace(), &content, Some(name), None)
            .await
            .expect("add a note");
        if t.elapsed() > Duration::from_secs(1) {
            eprintln!("{name} note {i} took {:?}", t.elapsed());
        }
    }
    println!("{start} {}", now_ns());
}

async fn fill(db: &Db, rng: &mut Rng, target: i64) {
    let have = notes::count(db, NAMESPACE).await.unwrap();
    let rows: Vec<String> = (have..target).map(|_| rng.sentence(12)).collect();
    db.transaction("filling", async |conn| {
        for content in &rows {
            conn.execute(
                "INSERT INTO notes (uid, namespace, content, host, created_at) VALUES (hex(randomblob(16)), ?1, ?2, 'bench', '2026-01-01T00:00:00.000Z')",
                (NAMESPACE, content.as_str()),
            )
            .await?;
        }
        Ok(())
    })
    .await
    .unwrap();
}

async fn search(path: &str) {
    let db = open(path).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for size in [10_000, 100_000] {
        fill(&db, &mut rng, size).await;
        let mut queries = Rng(42);
        let mut samples = Vec::new();
        for _ in 0..200 {
            let query = queries.sentence(2);
            let started = Instant::now();
            notes::search(&db, &namespace(), &query, 10).await.unwrap();
            samples.push(started.elapsed());
        }
        samples.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "search {size} notes: p50 {:.0} us, p99 {:.0} us (2-word queries, top 10)",
            us(samples[samples.len() / 2]),
            us(samples[samples.len() * 99 / 100])
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = app::db::runtime().expect("runtime");
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["write", db, count, name] => runtime.block_on(write(db, count.parse().unwrap(), name)),
        ["search", db] => runtime.block_on(search(db)),
        _ => {
            eprintln!("usage: db_bench write DB COUNT NAME | db_bench search DB");
            std::process::exit(2);
        }
    }
}
