//! Shared notes: what agents learned, by namespace, with full-text search (FTS5).
//!
//! Namespaces and contents are validated before anything is written; search terms are quoted
//! before they reach FTS5, so user text can never be a query syntax error.

use std::path::Path;

use libsql::Value;
use serde::Serialize;

use super::{Db, integer, opt, opt_text, text};
use crate::error::{NoteError, Result};
use crate::ids::Namespace;
use crate::process;
use crate::time::Timestamp;

/// Largest note content, in bytes.
pub const MAX_NOTE_BYTES: usize = 64 * 1024;
/// Largest number of notes one listing or search returns.
pub const MAX_LIMIT: u32 = 10_000;

/// One stored note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    /// Row id, increasing with time of insertion.
    pub id: i64,
    /// Namespace, e.g. `project:myapp` or `global`.
    pub namespace: String,
    /// The text.
    pub content: String,
    /// Instance that wrote it, when written from inside one.
    pub author: Option<String>,
    /// Host it was written on.
    pub host: String,
    /// Repository it was written in, if any.
    pub repo_root: Option<String>,
    /// When it was written (RFC 3339).
    pub created_at: String,
}

/// Checks a note's content: not blank, at most [`MAX_NOTE_BYTES`].
pub fn validate_content(content: &str) -> Result<()> {
    if content.contains('\0') {
        return Err(NoteError::Nul.into());
    }
    if content.trim().is_empty() {
        return Err(NoteError::Empty.into());
    }
    if content.len() > MAX_NOTE_BYTES {
        return Err(NoteError::TooLarge {
            len: content.len(),
            max: MAX_NOTE_BYTES,
        }
        .into());
    }
    Ok(())
}

/// Checks a limit: 1 to [`MAX_LIMIT`].
pub fn validate_limit(limit: u32) -> Result<()> {
    if limit == 0 || limit > MAX_LIMIT {
        return Err(NoteError::Limit {
            limit,
            max: MAX_LIMIT,
        }
        .into());
    }
    Ok(())
}

/// Turns free text into an FTS5 query matching notes that contain every word: each
/// whitespace-separated word becomes a quoted string, so `"`, `*`, `OR` or `-` are just text.
pub fn fts_query(query: &str) -> Result<String> {
    let terms: Vec<String> = query
        .split_whitespace()
        .map(|word| format!("\"{}\"", word.replace('"', "\"\"")))
        .collect();
    if terms.is_empty() {
        return Err(NoteError::EmptyQuery.into());
    }
    Ok(terms.join(" "))
}

/// Stores a note; `author` is the writing instance, `repo_root` where it was written.
pub async fn add(
    db: &Db,
    namespace: &Namespace,
    content: &str,
    author: Option<&str>,
    repo_root: Option<&Path>,
) -> Result<Note> {
    validate_content(content)?;
    let created_at = Timestamp::now().to_string();
    let repo_root = repo_root.map(|p| p.display().to_string());
    let uid = super::events::new_uid();
    let written = db
        .execute(
            "adding a note",
            "INSERT INTO notes (uid, namespace, content, author, host, repo_root, created_at)
             VALUES (?7, ?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (uid) DO NOTHING",
            vec![
                Value::Text(namespace.to_string()),
                Value::Text(content.to_string()),
                opt(author),
                Value::Text(process::hostname().to_string()),
                opt(repo_root.clone()),
                Value::Text(created_at.clone()),
                Value::Text(uid.clone()),
            ],
        )
        .await?;
    let id = if let (Some(1), Some(rowid)) = (written.rows, written.rowid) {
        rowid
    } else {
        // A server does not report the rowid of a batch, and an earlier attempt of this very
        // write may have landed: find the row by its uid.
        let rows = db
            .query_rows(
                "finding a note",
                "SELECT id FROM notes WHERE uid = ?1",
                vec![Value::Text(uid)],
            )
            .await?;
        rows.first()
            .and_then(|row| row.first())
            .and_then(integer)
            .unwrap_or_default()
    };
    Ok(Note {
        id,
        namespace: namespace.to_string(),
        content: content.to_string(),
        author: author.map(str::to_string),
        host: process::hostname().to_string(),
        repo_root,
        created_at,
    })
}

const COLUMNS: &str = "n.id, n.namespace, n.content, n.author, n.host, n.repo_root, n.created_at";

/// The newest `limit` notes of a namespace, newest first.
pub async fn list(db: &Db, namespace: &Namespace, limit: u32) -> Result<Vec<Note>> {
    validate_limit(limit)?;
    let rows = db
        .query_rows(
            "listing notes",
            &format!(
                "SELECT {COLUMNS} FROM notes n WHERE n.namespace = ?1 ORDER BY n.id DESC LIMIT ?2"
            ),
            vec![
                Value::Text(namespace.to_string()),
                Value::Integer(limit.into()),
            ],
        )
        .await?;
    Ok(rows.iter().map(|row| note(row)).collect())
}

/// Notes of a namespace containing every word of `query`, best match first.
pub async fn search(db: &Db, namespace: &Namespace, query: &str, limit: u32) -> Result<Vec<Note>> {
    validate_limit(limit)?;
    let fts = fts_query(query)?;
    let rows = db
        .query_rows(
            "searching notes",
            &format!(
                "SELECT {COLUMNS} FROM notes_fts f JOIN notes n ON n.id = f.rowid
                 WHERE notes_fts MATCH ?1 AND n.namespace = ?2
                 ORDER BY f.rank, n.id DESC LIMIT ?3"
            ),
            vec![
                Value::Text(fts),
                Value::Text(namespace.to_string()),
                Value::Integer(limit.into()),
            ],
        )
        .await?;
    Ok(rows.iter().map(|row| note(row)).collect())
}

/// Number of notes in a namespace.
pub async fn count(db: &Db, namespace: &str) -> Result<i64> {
    let rows = db
        .query_rows(
            "counting notes",
            "SELECT count(*) FROM notes WHERE namespace = ?1",
            vec![Value::Text(namespace.to_string())],
        )
        .await?;
    Ok(rows
        .first()
        .and_then(|row| row.first())
        .and_then(integer)
        .unwrap_or(0))
}

fn note(row: &[Value]) -> Note {
    Note {
        id: integer(&row[0]).unwrap_or_default(),
        namespace: text(&row[1]),
        content: text(&row[2]),
        author: opt_text(&row[3]),
        host: text(&row[4]),
        repo_root: opt_text(&row[5]),
        created_at: text(&row[6]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fts_queries_quote_every_word() {
        assert_eq!(fts_query("cargo lock").unwrap(), r#""cargo" "lock""#);
        assert_eq!(fts_query(r#"a"b OR *"#).unwrap(), r#""a""b" "OR" "*""#);
        assert!(fts_query("  ").is_err());
    }

    #[test]
    fn contents_and_limits() {
        assert!(validate_content(" \n").is_err());
        assert!(validate_content(&"x".repeat(MAX_NOTE_BYTES + 1)).is_err());
        validate_content(&"x".repeat(MAX_NOTE_BYTES)).unwrap();
        assert!(validate_limit(0).is_err());
        assert!(validate_limit(MAX_LIMIT + 1).is_err());
    }
}
