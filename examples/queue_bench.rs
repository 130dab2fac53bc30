//! Drives `app`'s coordination queue and locks for `scripts/bench-queue.sh`. Run inside a
//! repository where instance RECIPIENT is live.
//!
//! ```text
//! queue_bench latency APP RECIPIENT COUNT GAP_MS [--poll]
//!     starts `APP recv --follow --json --instance RECIPIENT [--poll]`, sends COUNT messages
//!     through the library, each after the previous one arrived plus a random pause of up to
//!     GAP_MS (so sends fall anywhere in a polling cycle); prints each send-to-print latency
//!     in microseconds, one per line
//! queue_bench locks COUNT
//!     acquires and releases one named lock COUNT times in this process, then does the same
//!     with flock(2) on a file; prints "app_per_s flock_per_s"
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use app::ids::InstanceId;
use app::lock::{self, Holder, Locks, Request};
use app::paths::AppPaths;
use app::process::ProcessIdentity;
use app::queue::{self, Outgoing};
use app::sign::{Keys, SharedSecret};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    match arg(0) {
        Some("latency") if args.len() >= 5 => latency(
            &args[1],
            &args[2],
            args[3].parse().expect("COUNT is a number"),
            args[4].parse().expect("GAP_MS is a number"),
            arg(5) == Some("--poll"),
        ),
        Some("locks") if args.len() == 2 => locks(args[1].parse().expect("COUNT is a number")),
        _ => {
            eprintln!(
                "usage: queue_bench latency APP RECIPIENT COUNT GAP_MS [--poll] | queue_bench locks COUNT"
            );
            std::process::exit(2);
        }
    }
}

fn repository() -> AppPaths {
    AppPaths::discover(&std::env::current_dir().expect("a current directory"))
        .expect("run inside the bench repository")
}

/// The repository's keys as the `app` this bench starts sees them: it inherits our
/// environment, `APP_SHARED_SECRET` too.
fn keys(paths: &AppPaths) -> Keys {
    Keys::new(
        paths,
        std::env::var_os("APP_SHARED_SECRET").map(SharedSecret::new),
    )
}

fn latency(app: &str, recipient: &str, count: usize, gap_ms: u64, poll: bool) {
    let paths = repository();
    let key = keys(&paths).load_or_create().expect("the signing key");
    let mut receiver = Command::new(app);
    receiver.args(["recv", "--follow", "--json", "--instance", recipient]);
    if poll {
        receiver.arg("--poll");
    }
    let mut child = receiver
        .stdout(Stdio::piped())
        .spawn()
        .expect("start app recv");
    let stdout = child.stdout.take().expect("piped stdout");
    let (arrived, arrivals) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            let message: serde_json::Value = serde_json::from_str(&line).expect("JSON lines");
            let id = message["id"].as_str().expect("an id").to_string();
            if arrived.send((id, at)).is_err() {
                break;
            }
        }
    });
    // Let the receiver set up its watch before the first message.
    std::thread::sleep(Duration::from_millis(300));
    let mut random = Random::seeded();
    let mut sent_at = HashMap::new();
    let recipient = InstanceId::parse(recipient).expect("the bench's recipient is an id");
    let outgoing = Outgoing {
        from: InstanceId::parse("bench-sender").expect("an id"),
        to: Some(recipient.clone()),
        kind: "text".into(),
        ttl: queue::DEFAULT_TTL,
        payload: serde_json::json!("ping"),
    };
    for _ in 0..count {
        std::thread::sleep(Duration::from_micros(random.below(gap_ms * 1000 + 1)));
        let start = Instant::now();
        let id =
            queue::send(&paths, &key, &outgoing, std::slice::from_ref(&recipient)).expect("send");
        sent_at.insert(id.clone(), start);
        let (got, at) = arrivals
            .recv_timeout(Duration::from_secs(30))
            .expect("the receiver printed the message within 30 s");
        assert_eq!(got, id, "messages arrive in order, one at a time");
        println!("{}", (at - sent_at[&got]).as_micros());
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn locks(count: u32) {
    let paths = repository();
    let locks = Locks::open(&paths, &keys(&paths), Duration::from_secs(30)).expect("open locks");
    let request = Request {
        name: app::ids::LockName::parse("bench").expect("a valid lock name"),
        holder: Holder::process(ProcessIdentity::current()),
        ttl: None,
        timeout: Duration::from_secs(10),
    };
    let start = Instant::now();
    for _ in 0..count {
        drop(lock::hold(Box::new(locks.clone()), &request).expect("acquire"));
    }
    let app_rate = f64::from(count) / start.elapsed().as_secs_f64();

    let lock_file = std::env::temp_dir().join(format!("queue-bench-{}.lock", std::process::id()));
    let file = std::fs::File::create(&lock_file).expect("a lock file");
    let start = Instant::now();
    for _ in 0..count {
        file.lock().expect("flock");
        file.unlock().expect("unlock");
    }
    let flock_rate = f64::from(count) / start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&lock_file);
    println!("{app_rate:.0} {flock_rate:.0}");
}

/// xorshift64: pauses need spread, not quality.
struct Random(u64);

impl Random {
    fn seeded() -> Random {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .subsec_nanos();
        Random(u64::from(nanos) | 1)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}
