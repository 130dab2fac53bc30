-- 0002: orchestrated runs (`app orchestrate`) and their tasks, so a run survives the
-- orchestrator's crash (`--resume RUN`) and can be inspected (`app runs`).

CREATE TABLE runs (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    repo_root   TEXT    NOT NULL,
    host        TEXT    NOT NULL,
    -- The validated plan, as JSON: what a resume runs again.
    plan        TEXT    NOT NULL CHECK (json_valid(plan)),
    -- running, succeeded, failed, interrupted
    status      TEXT    NOT NULL,
    started_at  TEXT    NOT NULL,
    finished_at TEXT,
    -- The orchestrator process running it now (pid and start time), so two never run it.
    pid         INTEGER,
    start_time  INTEGER,
    -- What the end of the run found: sibling conflicts, the integration result.
    report      TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(report))
);
CREATE INDEX runs_by_repo ON runs (repo_root, started_at);

CREATE TABLE run_tasks (
    run_id      TEXT    NOT NULL REFERENCES runs (id),
    task_id     TEXT    NOT NULL,
    -- pending, running, succeeded, failed, skipped, cancelled
    status      TEXT    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  TEXT,
    finished_at TEXT,
    exit_code   INTEGER,
    branch      TEXT    NOT NULL,
    instance    TEXT,
    log_path    TEXT,
    -- Why it failed or was skipped, in words.
    detail      TEXT,
    PRIMARY KEY (run_id, task_id)
);
