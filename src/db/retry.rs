//! Backoff for a contended or unreachable database: SQLITE_BUSY and SQLITE_LOCKED, and a server
//! that refuses or drops the connection, are retried with exponential backoff and jitter until a
//! deadline; every other error is returned at once.
//!
//! Both shapes of "busy" count: the local `SqliteFailure(5 | 6, ..)` (extended codes included)
//! and a libSQL server's Hrana error whose code is `SQLITE_BUSY…` or `SQLITE_LOCKED…`.

use std::time::{Duration, Instant};

/// First wait after a busy error.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest single wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// The wait before attempt `attempt + 1` (0-based), before jitter: 5 ms doubling up to 500 ms.
pub fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF)
}

/// `base` scaled by a random factor in [0.5, 1.0), so contending writers spread out.
fn jittered(base: Duration) -> Duration {
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    let fraction = 0.5 + (random >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
    base.mul_f64(fraction)
}

/// Whether `err` means another connection holds a lock we need, so a retry may succeed.
pub fn is_busy(err: &libsql::Error) -> bool {
    match err {
        libsql::Error::SqliteFailure(code, _) | libsql::Error::RemoteSqliteFailure(code, _, _) => {
            matches!(code & 0xff, 5 | 6)
        }
        libsql::Error::Hrana(inner) => {
            let text = inner.to_string();
            match hrana_code(&text) {
                Some(code) => code.starts_with("SQLITE_BUSY") || code.starts_with("SQLITE_LOCKED"),
                // An error the server answers at the HTTP level carries no code, only SQLite's
                // fixed text for SQLITE_BUSY ("database is locked") or SQLITE_LOCKED ("database
                // table is locked"), or 429 Too Many Requests when every database connection
                // it allows stayed taken while the request waited for one.
                None => {
                    text.starts_with("api error:")
                        && (text.contains("database is locked")
                            || text.contains("database table is locked")
                            || text.contains("status=429"))
                }
            }
        }
        _ => false,
    }
}

/// The `code` field of a Hrana protocol error.
///
/// libsql keeps its Hrana error type private and exposes it only boxed, so the structured code
/// is read from its `Debug` form (`Error { message: "...", code: "SQLITE_BUSY" }`); the code is
/// the last field, after the (escaped) message.
fn hrana_code(text: &str) -> Option<&str> {
    let start = text.rfind("code: \"")? + "code: \"".len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// The busy error an attempt left unanswered past its limit counts as.
const NO_ANSWER: &str = "no answer while waiting for the write lock";

/// Whether `err` says a server could not be reached (refused, reset before an answer): it may
/// be back soon, so it is retried like a busy error.
pub fn is_unreachable(err: &libsql::Error) -> bool {
    match err {
        libsql::Error::Hrana(inner) => {
            let text = inner.to_string();
            [
                "error trying to connect",
                "connection closed before message completed",
                "Connection reset",
            ]
            .iter()
            .any(|sign| text.contains(sign))
        }
        _ => false,
    }
}

/// Why [`run`] gave up.
#[derive(Debug)]
pub enum RetryError {
    /// The server could not be reached until the deadline passed.
    Unreachable {
        /// The last connection error, in words.
        last: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// Still busy when the deadline passed.
    Deadline {
        /// The last busy error.
        last: libsql::Error,
        /// How many attempts were made.
        attempts: u32,
    },
    /// An error a retry cannot fix.
    Failed(libsql::Error),
}

/// Runs `op` until it succeeds, fails with a non-busy error, or `deadline` has passed.
///
/// With `attempt_limit`, an attempt still unanswered after that long is abandoned and retried
/// like a busy error: only for operations that are safe to send twice.
pub async fn run<T>(
    deadline: Duration,
    attempt_limit: Option<Duration>,
    what: &str,
    mut op: impl AsyncFnMut() -> libsql::Result<T>,
) -> Result<T, RetryError> {
    let until = Instant::now() + deadline;
    let mut attempt = 0;
    let mut unreachable: Option<String> = None;
    loop {
        // A libSQL server queues a writer behind the lock holder instead of answering busy, so
        // the deadline is also enforced around each attempt.
        let limit = attempt_limit.map_or(until, |limit| until.min(Instant::now() + limit));
        let result = match tokio::time::timeout_at(limit.into(), op()).await {
            Ok(result) => result,
            Err(_elapsed) => Err(libsql::Error::SqliteFailure(5, NO_ANSWER.into())),
        };
        match result {
            Ok(value) => return Ok(value),
            Err(err) if is_busy(&err) || is_unreachable(&err) => {
                // The last attempt may be cut short by the deadline: what the server said
                // before (refused, or busy) is what the caller hears.
                if is_unreachable(&err) {
                    unreachable = Some(err.to_string());
                } else if is_busy(&err)
                    && !matches!(&err, libsql::Error::SqliteFailure(5, m) if m == NO_ANSWER)
                {
                    unreachable = None;
                }
                let now = Instant::now();
                if now >= until {
                    let attempts = attempt + 1;
                    return Err(match unreachable {
                        Some(last) => RetryError::Unreachable { last, attempts },
                        None => RetryError::Deadline {
                            last: err,
                            attempts,
                        },
                    });
                }
                let wait = jittered(backoff(attempt)).min(until - now);
                tracing::debug!(what, attempt, ?wait, error = %err, "database busy; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(err) => return Err(RetryError::Failed(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        let waits: Vec<u64> = (0..10).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 500, 500, 500]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..1000 {
            let wait = jittered(Duration::from_millis(100));
            assert!(wait >= Duration::from_millis(50) && wait < Duration::from_millis(100));
        }
    }

    #[test]
    fn busy_and_locked_in_both_shapes() {
        let local = |code| libsql::Error::SqliteFailure(code, "x".into());
        assert!(is_busy(&local(5)));
        assert!(is_busy(&local(6)));
        assert!(is_busy(&local(517))); // SQLITE_BUSY_SNAPSHOT
        assert!(!is_busy(&local(19))); // SQLITE_CONSTRAINT
        let remote = |code: &str| {
            libsql::Error::Hrana(
                format!("stream error: `Error {{ message: \"database is locked: code: \\\"x\\\"\", code: \"{code}\" }}`").into(),
            )
        };
        assert!(is_busy(&remote("SQLITE_BUSY")));
        assert!(is_busy(&remote("SQLITE_LOCKED_SHAREDCACHE")));
        assert!(!is_busy(&remote("SQLITE_CONSTRAINT_UNIQUE")));
        assert!(!is_busy(&libsql::Error::Hrana(
            "http error: `connection refused`".into()
        )));
        assert!(is_busy(&libsql::Error::Hrana(
            "api error: `SQLite error: database is locked`".into()
        )));
        assert!(!is_busy(&libsql::Error::Hrana(
            "api error: `SQLite error: no such table: x`".into()
        )));
        assert!(is_busy(&libsql::Error::Hrana(
            "api error: `status=429 Too Many Requests, body={\"error\":\"Timed out while opening database connection\"}`".into()
        )));
    }
}
