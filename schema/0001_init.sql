-- 0001: the first schema. Migrations are append-only: never edit a released file, add the next.
-- Times are RFC 3339 UTC text with milliseconds ("2026-11-24T11:30:06.123Z"), which sorts
-- in time order as text.

-- A mirror of every process registry, across repositories and hosts, kept after the process
-- is gone. One row per registration: a named instance run twice has two rows.
CREATE TABLE instances (
    key            INTEGER PRIMARY KEY,
    id             TEXT    NOT NULL,
    repo_root      TEXT    NOT NULL,
    host           TEXT    NOT NULL,
    pid            INTEGER NOT NULL,
    start_time     INTEGER NOT NULL,
    worktree       TEXT,
    branch         TEXT,
    base           TEXT,
    command        TEXT    NOT NULL CHECK (json_valid(command)),
    status         TEXT    NOT NULL,
    started_at     TEXT    NOT NULL,
    last_heartbeat TEXT    NOT NULL,
    stopped_at     TEXT,
    exit_code      INTEGER,
    UNIQUE (host, repo_root, id, started_at)
);
CREATE INDEX instances_by_heartbeat ON instances (status, last_heartbeat);

-- What happened, in order: lifecycle of instances now; messages, locks and runs later.
-- `uid` is chosen by the writer, so a write sent twice (a retried request to a server) lands
-- once.
CREATE TABLE events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    uid       TEXT    NOT NULL UNIQUE,
    at        TEXT    NOT NULL,
    host      TEXT    NOT NULL,
    repo_root TEXT,
    instance  TEXT,
    kind      TEXT    NOT NULL,
    payload   TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(payload))
);
CREATE INDEX events_by_time ON events (at);
CREATE INDEX events_by_instance ON events (instance, at);

-- What agents learned, shared by namespace ("project:myapp", "global").
CREATE TABLE notes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    uid        TEXT    NOT NULL UNIQUE,
    namespace  TEXT    NOT NULL,
    content    TEXT    NOT NULL,
    author     TEXT,
    host       TEXT    NOT NULL,
    repo_root  TEXT,
    created_at TEXT    NOT NULL
);
CREATE INDEX notes_by_namespace ON notes (namespace, id);

-- Full-text index over notes.content, kept in step by triggers.
CREATE VIRTUAL TABLE notes_fts USING fts5 (content, content = 'notes', content_rowid = 'id');
CREATE TRIGGER notes_fts_insert AFTER INSERT ON notes BEGIN
    INSERT INTO notes_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER notes_fts_delete AFTER DELETE ON notes BEGIN
    INSERT INTO notes_fts (notes_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER notes_fts_update AFTER UPDATE OF content ON notes BEGIN
    INSERT INTO notes_fts (notes_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO notes_fts (rowid, content) VALUES (new.id, new.content);
END;
