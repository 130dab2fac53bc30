//! The shared LibSQL database: one store for every instance, on this machine or many.
//!
//! Invariants:
//! - Every write goes through [`Db::execute`] or [`Db::transaction`]: a `BEGIN IMMEDIATE`
//!   transaction on a local file (one transactional batch request against a server), retried on SQLITE_BUSY/SQLITE_LOCKED with backoff up to the
//!   deadline ([`retry`]), then [`DbError::Locked`] (exit 3) naming the database.
//! - The schema is the files of `schema/`, embedded and applied in order once per database
//!   ([`schema`]); two processes opening an empty database at once both succeed.
//! - Result sets are read to the end and dropped inside the helper that ran them, so no open
//!   statement keeps a read snapshot (or a lock) alive.
//! - The JSON registries stay authoritative; the database is a mirror and a history, so code on
//!   an agent's path treats a database failure as a warning ([`mirror`]).

pub mod events;
pub mod fleet;
pub mod holds;
pub mod instances;
pub(crate) mod messages;
pub mod mirror;
pub mod notes;
pub mod retry;
pub mod runs;
pub mod schema;
mod status;

use std::path::{Path, PathBuf};
use std::time::Duration;

use libsql::{Builder, Connection, Database, TransactionBehavior, Value};

use crate::config::{self, Settings};
use crate::error::{DbError, Error, IoContext, Result};
use crate::state;
use crate::time;

/// How long one request to a server may go unanswered before it is sent again.
pub const REMOTE_ATTEMPT_LIMIT: Duration = Duration::from_secs(5);
/// SQLite's own busy wait on a local file, inside one attempt.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An embedded database file on this machine.
    Local(PathBuf),
    /// A libSQL server (`http://`, `https://` or `libsql://`).
    Remote {
        /// The server's URL.
        url: String,
        /// Bearer token (`APP_DB_AUTH_TOKEN`), empty for none.
        auth_token: String,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::Remote { url, .. } => f.write_str(url),
        }
    }
}

impl Location {
    /// Resolves the location: `--db PATH`, then `APP_DB_URL` (with `APP_DB_AUTH_TOKEN`), then
    /// `APP_DB_PATH`, then `DATABASE_URL`, else `app.db` in the data directory.
    pub fn resolve(flag: Option<&Path>) -> Result<Location> {
        Self::resolve_with(flag, |name| std::env::var(name).ok())
    }

    fn resolve_with(flag: Option<&Path>, var: impl Fn(&str) -> Option<String>) -> Result<Location> {
        let var = |name: &str| var(name).filter(|value| !value.is_empty());
        if let Some(path) = flag {
            return Ok(Location::Local(path.to_path_buf()));
        }
        let token = || var("APP_DB_AUTH_TOKEN").unwrap_or_default();
        if let Some(url) = var("APP_DB_URL") {
            if !is_server_url(&url) {
                return Err(DbError::NotAServerUrl { url }.into());
            }
            return Ok(Location::Remote {
                url,
                auth_token: token(),
            });
        }
        if let Some(path) = var("APP_DB_PATH") {
            return Ok(Location::Local(PathBuf::from(path)));
        }
        // DATABASE_URL is shared with the projects agents work on; a value naming some other
        // kind of database (postgres://...) is theirs, not ours, and is passed over.
        if let Some(url) = var("DATABASE_URL") {
            if is_server_url(&url) {
                return Ok(Location::Remote {
                    url,
                    auth_token: token(),
                });
            }
            if let Some(path) = ["sqlite://", "sqlite:", "file:"]
                .iter()
                .find_map(|prefix| url.strip_prefix(prefix))
                .or((!url.contains("://")).then_some(url.as_str()))
            {
                return Ok(Location::Local(PathBuf::from(path)));
            }
            tracing::debug!(%url, "DATABASE_URL names another kind of database; using the default");
        }
        Ok(Location::Local(config::data_dir()?.join("app.db")))
    }

    /// The variable that hands this location to a child process.
    pub fn export(&self) -> (&'static str, String) {
        match self {
            Location::Local(path) => ("APP_DB_PATH", path.display().to_string()),
            Location::Remote { url, .. } => ("APP_DB_URL", url.clone()),
        }
    }
}

fn is_server_url(url: &str) -> bool {
    ["http://", "https://", "libsql://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

/// Settings of a connection.
#[derive(Debug, Clone, Copy)]
pub struct DbSettings {
    /// How long busy errors are retried (`APP_DB_RETRY_DEADLINE`, 30 s).
    pub retry_deadline: Duration,
}

impl From<&Settings> for DbSettings {
    fn from(settings: &Settings) -> Self {
        DbSettings {
            retry_deadline: settings.db_retry_deadline,
        }
    }
}

impl Default for DbSettings {
    /// As when `APP_DB_RETRY_DEADLINE` is not set.
    fn default() -> Self {
        DbSettings {
            retry_deadline: config::DEFAULT_DB_RETRY_DEADLINE,
        }
    }
}

/// A current-thread runtime for the synchronous parts of `app` to drive the async client.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .io_context("starting the database runtime for", "the database client")
}

/// An open database for synchronous code: the async client and the runtime that drives it,
/// so no caller builds a runtime of its own. Its futures are not `Send`; async code (the API)
/// uses [`Db`] on its own runtime instead.
///
/// A `Blocking` must be dropped outside any async context (dropping a runtime inside one
/// panics): hold it in synchronous code or on a blocking thread.
pub struct Blocking {
    runtime: tokio::runtime::Runtime,
    db: Db,
}

impl std::fmt::Debug for Blocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.db.fmt(f)
    }
}

impl Blocking {
    /// Opens (and migrates) the database at `location`.
    pub fn open(location: Location, settings: DbSettings) -> Result<Blocking> {
        let runtime = runtime()?;
        let db = runtime.block_on(Db::open(location, settings))?;
        Ok(Blocking { runtime, db })
    }

    /// Opens the database named by `flag` (`--db`), else by the environment
    /// ([`Location::resolve`]).
    pub fn open_default(flag: Option<&Path>, settings: DbSettings) -> Result<Blocking> {
        Blocking::open(Location::resolve(flag)?, settings)
    }

    /// Whether this is an embedded file (as opposed to a server).
    pub fn is_local(&self) -> bool {
        self.db.is_local()
    }

    /// Where this database lives.
    pub fn location(&self) -> &Location {
        self.db.location()
    }

    /// Runs `body` with the database to its end.
    pub fn run<T>(&self, body: impl AsyncFnOnce(&Db) -> Result<T>) -> Result<T> {
        self.runtime.block_on(body(&self.db))
    }
}

/// What a write changed, where the database reports it (a local file does; a server's batch
/// does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Rows changed.
    pub rows: Option<u64>,
    /// The rowid of the last row inserted.
    pub rowid: Option<i64>,
}

/// An open, migrated database.
pub struct Db {
    database: Database,
    conn: Connection,
    location: Location,
    settings: DbSettings,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("location", &self.location)
            .finish()
    }
}

impl Db {
    /// Opens (creating a local file and its directory when missing) and migrates the database.
    #[tracing::instrument(skip_all, fields(database = %location))]
    pub async fn open(location: Location, settings: DbSettings) -> Result<Db> {
        let fail = |source| Error::Database {
            message: format!("opening the database {location}"),
            source,
        };
        let database = match &location {
            Location::Local(path) => {
                if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                    state::create_private_dir_all(dir)?;
                }
                // Created 0600 before SQLite sees it; SQLite gives -wal and -shm the same mode.
                state::create_private_file(path)?;
                Builder::new_local(path).build().await.map_err(fail)?
            }
            Location::Remote { url, auth_token } => {
                Builder::new_remote(url.clone(), auth_token.clone())
                    .build()
                    .await
                    .map_err(fail)?
            }
        };
        let conn = database.connect().map_err(fail)?;
        let db = Db {
            database,
            conn,
            location,
            settings,
        };
        if db.is_local() {
            db.conn
                .busy_timeout(BUSY_TIMEOUT.min(settings.retry_deadline))
                .map_err(|source| db.error("setting the busy timeout", source))?;
            // journal_mode answers with a row; read it and let it go at once.
            db.query_rows("switching to WAL", "PRAGMA journal_mode = WAL", vec![])
                .await?;
            db.conn
                .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
                .await
                .map_err(|source| db.error("setting pragmas", source))?;
        }
        schema::migrate(&db).await?;
        Ok(db)
    }

    /// Resolves the location from `flag` and the environment, then opens it.
    pub async fn open_default(flag: Option<&Path>, settings: DbSettings) -> Result<Db> {
        Db::open(Location::resolve(flag)?, settings).await
    }

    /// Where this database lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Whether this is an embedded file (as opposed to a server).
    pub fn is_local(&self) -> bool {
        matches!(self.location, Location::Local(_))
    }

    fn error(&self, what: &str, source: libsql::Error) -> Error {
        Error::Database {
            message: format!("{what} (database {})", self.location),
            source,
        }
    }

    fn retry_error(&self, what: &str, err: retry::RetryError) -> Error {
        match err {
            retry::RetryError::Deadline { last, attempts } => DbError::Locked {
                location: self.location.to_string(),
                waited: time::format_age(self.settings.retry_deadline),
                attempts,
                what: what.to_string(),
                local: self.is_local(),
                source: last,
            }
            .into(),
            retry::RetryError::Unreachable { last, attempts } => DbError::Unreachable {
                location: self.location.to_string(),
                waited: time::format_age(self.settings.retry_deadline),
                attempts,
                what: what.to_string(),
                last,
            }
            .into(),
            retry::RetryError::Failed(source) => Error::Database {
                message: format!("{what} (database {})", self.location),
                source,
            },
        }
    }

    /// Runs one write statement atomically, retrying while the database is busy. Returns the
    /// number of rows it changed and the last rowid it inserted.
    ///
    /// Against a server the statement must be idempotent (an `INSERT` keyed by a unique id with
    /// `ON CONFLICT DO NOTHING`, an upsert): an attempt left unanswered for
    /// [`REMOTE_ATTEMPT_LIMIT`] is sent again on a fresh connection, because a server was seen to
    /// leave requests of several concurrent writers unanswered for minutes.
    pub async fn execute(&self, what: &str, sql: &str, params: Vec<Value>) -> Result<Written> {
        if !self.is_local() {
            // One request: a Hrana transactional batch (`BEGIN`, the statement, `COMMIT`, each
            // step conditional on the previous) on a fresh stream that the request also closes.
            // No interactive transaction (those stalled writers) and no read before the write
            // (a read promoted to a write was seen to wedge the server's lock queue with
            // SQLITE_BUSY_SNAPSHOT). A batch takes no parameters, so they are inlined.
            let batch = inline_params(sql, &params);
            let limit = Some(REMOTE_ATTEMPT_LIMIT);
            return retry::run(self.settings.retry_deadline, limit, what, async || {
                let conn = self.database.connect()?;
                conn.execute_transactional_batch(&batch).await?;
                Ok(Written {
                    rows: None,
                    rowid: None,
                })
            })
            .await
            .map_err(|err| self.retry_error(what, err));
        }
        self.transaction(what, async |conn| {
            let rows = conn.execute(sql, params.clone()).await?;
            Ok(Written {
                rows: Some(rows),
                rowid: Some(conn.last_insert_rowid()),
            })
        })
        .await
    }

    /// Runs `statements` as one atomic unit and returns the rows each produced: a `BEGIN
    /// IMMEDIATE` transaction on a local file, one transactional batch request to a server. A
    /// conditional write followed by the read that tells what it did (a claim and the rows it
    /// claimed) thus costs one request.
    ///
    /// No statements: no request. Parameters are inlined as SQL literals (as a server's batch needs), so a statement may
    /// use only some of its parameters. Against a server an unanswered batch is sent again (see
    /// [`Db::execute`]), so the statements together must be idempotent: guard a write by a uid
    /// the caller chose.
    pub async fn batch(
        &self,
        what: &str,
        statements: &[(&str, Vec<Value>)],
    ) -> Result<Vec<Vec<Vec<Value>>>> {
        if statements.is_empty() {
            // Nothing to send: no request.
            return Ok(Vec::new());
        }
        if !self.is_local() {
            let batch: Vec<String> = statements
                .iter()
                .map(|(sql, params)| inline_params(sql, params))
                .collect();
            let batch = batch.join(";\n");
            let limit = Some(REMOTE_ATTEMPT_LIMIT);
            return retry::run(self.settings.retry_deadline, limit, what, async || {
                let conn = self.database.connect()?;
                let mut results = conn.execute_transactional_batch(&batch).await?;
                let mut out = Vec::with_capacity(statements.len());
                while let Some(result) = results.next_stmt_row() {
                    out.push(match result {
                        Some(rows) => read_rows(rows).await?,
                        None => Vec::new(),
                    });
                }
                Ok(out)
            })
            .await
            .map_err(|err| self.retry_error(what, err));
        }
        self.transaction(what, async |conn| {
            let mut out = Vec::with_capacity(statements.len());
            for (sql, params) in statements {
                // Inlined as for a server, so a statement may leave some parameters unused.
                let sql = inline_params(sql, params);
                out.push(collect_rows(conn, &sql, vec![]).await?);
            }
            Ok(out)
        })
        .await
    }

    /// Runs the read-only `statements` and returns the rows of each: one batch request against
    /// a server (the statements see one snapshot), one query after another on a local file
    /// (no write lock taken for a read).
    pub async fn read_all(
        &self,
        what: &str,
        statements: &[(&str, Vec<Value>)],
    ) -> Result<Vec<Vec<Vec<Value>>>> {
        if !self.is_local() {
            return self.batch(what, statements).await;
        }
        let mut out = Vec::with_capacity(statements.len());
        for (sql, params) in statements {
            out.push(self.query_rows(what, sql, params.clone()).await?);
        }
        Ok(out)
    }

    /// Runs `body` in a `BEGIN IMMEDIATE` transaction, committing when it succeeds and retrying
    /// the whole transaction while the database is busy.
    pub async fn transaction<T>(
        &self,
        what: &str,
        mut body: impl AsyncFnMut(&Connection) -> libsql::Result<T>,
    ) -> Result<T> {
        retry::run(self.settings.retry_deadline, None, what, async || {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .await?;
            match body(&tx).await {
                Ok(value) => {
                    tx.commit().await?;
                    Ok(value)
                }
                Err(err) => {
                    // A failed rollback leaves nothing to undo that the error does not report.
                    let _ = tx.rollback().await;
                    Err(err)
                }
            }
        })
        .await
        .map_err(|err| self.retry_error(what, err))
    }

    /// Runs a query and returns every row, read to the end (so no statement stays open).
    ///
    /// Against a server it is one request, a batch that also closes its stream (an open
    /// stream's read snapshot can stall the server's WAL checkpoint and with it every writer):
    /// a prepared query was three (describe, cursor, and a statement to close the stream).
    pub async fn query_rows(
        &self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<Vec<Vec<Value>>> {
        if !self.is_local() {
            let mut results = self.batch(what, &[(sql, params)]).await?;
            return Ok(results.pop().unwrap_or_default());
        }
        retry::run(self.settings.retry_deadline, None, what, async || {
            collect_rows(&self.conn, sql, params.clone()).await
        })
        .await
        .map_err(|err| self.retry_error(what, err))
    }

    /// `PRAGMA quick_check`, or with `full` `PRAGMA integrity_check`: "ok" when the database is
    /// sound, else the problems found, joined with "; ".
    pub async fn check(&self, full: bool) -> Result<String> {
        let pragma = if full {
            "PRAGMA integrity_check"
        } else {
            "PRAGMA quick_check"
        };
        let rows = self.query_rows("checking", pragma, vec![]).await?;
        let lines: Vec<String> = rows
            .iter()
            .filter_map(|row| row.first())
            .map(text)
            .collect();
        Ok(lines.join("; "))
    }
}

/// `sql` with its `?N` placeholders replaced by `params` as SQL literals. Only for the crate's
/// own statements, whose text has no `?` outside placeholders; the substituted values are
/// never scanned again.
fn inline_params(sql: &str, params: &[Value]) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut chars = sql.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '?' {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some((_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
            digits.push(*d);
            chars.next();
        }
        let index: usize = digits
            .parse()
            .expect("the crate's statements number their placeholders");
        out.push_str(&literal(&params[index - 1]));
    }
    out
}

/// A value as an SQL literal.
fn literal(value: &Value) -> String {
    match value {
        Value::Null => "NULL".into(),
        Value::Integer(n) => n.to_string(),
        Value::Real(x) => format!("{x:?}"),
        Value::Text(text) => format!("'{}'", text.replace('\'', "''")),
        Value::Blob(bytes) => format!("X'{}'", hex::encode(bytes)),
    }
}

/// Reads every row of a query into memory and drops the statement.
pub(crate) async fn collect_rows(
    conn: &Connection,
    sql: &str,
    params: Vec<Value>,
) -> libsql::Result<Vec<Vec<Value>>> {
    read_rows(conn.query(sql, params).await?).await
}

/// Reads every row of a result set into memory.
async fn read_rows(mut rows: libsql::Rows) -> libsql::Result<Vec<Vec<Value>>> {
    let columns = rows.column_count();
    let mut out = Vec::new();
    while let Some(row) = rows.next().await? {
        out.push(
            (0..columns)
                .map(|i| row.get_value(i))
                .collect::<libsql::Result<Vec<Value>>>()?,
        );
    }
    Ok(out)
}

/// A value as text (NULL as the empty string).
pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Integer(n) => n.to_string(),
        Value::Real(x) => x.to_string(),
        Value::Text(s) => s.clone(),
        Value::Blob(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// A value as optional text.
pub(crate) fn opt_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        other => Some(text(other)),
    }
}

/// A value as an integer (NULL and non-numbers as `None`).
pub(crate) fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Integer(n) => Some(*n),
        Value::Text(s) => s.parse().ok(),
        _ => None,
    }
}

/// Optional text as a parameter.
pub(crate) fn opt(value: Option<impl Into<String>>) -> Value {
    value.map_or(Value::Null, |v| Value::Text(v.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<Location> {
        Location::resolve_with(flag.map(Path::new), |name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn inlined_parameters_are_quoted_once() {
        let sql = "INSERT INTO t VALUES (?2, ?1, ?10, ?3)";
        let mut params: Vec<Value> = (0..10).map(Value::Integer).collect();
        params[0] = Value::Text("it's ?2".into());
        params[1] = Value::Null;
        params[2] = Value::Blob(vec![0xab]);
        assert_eq!(
            inline_params(sql, &params),
            "INSERT INTO t VALUES (NULL, 'it''s ?2', 9, X'ab')"
        );
    }

    #[test]
    fn location_precedence() {
        let all = [
            ("APP_DB_URL", "http://127.0.0.1:8080"),
            ("APP_DB_AUTH_TOKEN", "t"),
            ("APP_DB_PATH", "/p/app.db"),
            ("DATABASE_URL", "sqlite:///d/app.db"),
        ];
        assert_eq!(
            resolve(Some("/flag.db"), &all).unwrap(),
            Location::Local("/flag.db".into())
        );
        assert_eq!(
            resolve(None, &all).unwrap(),
            Location::Remote {
                url: "http://127.0.0.1:8080".into(),
                auth_token: "t".into()
            }
        );
        assert_eq!(
            resolve(None, &all[2..]).unwrap(),
            Location::Local("/p/app.db".into())
        );
        assert_eq!(
            resolve(None, &all[3..]).unwrap(),
            Location::Local("/d/app.db".into())
        );
        assert_eq!(
            resolve(None, &[("DATABASE_URL", "libsql://x.example")]).unwrap(),
            Location::Remote {
                url: "libsql://x.example".into(),
                auth_token: String::new()
            }
        );
        assert!(resolve(None, &[("APP_DB_URL", "/not/a/url")]).is_err());
        assert_eq!(
            resolve(None, &[("DATABASE_URL", "postgres://x/y")]).unwrap(),
            Location::Local(config::data_dir().unwrap().join("app.db"))
        );
        // Empty variables count as unset.
        assert_eq!(
            resolve(None, &[("APP_DB_URL", ""), ("APP_DB_PATH", "/p.db")]).unwrap(),
            Location::Local("/p.db".into())
        );
    }
}
