-- 0003: the fleet. Hosts that run tasks (`app worker`), and the tasks of fleet runs offered to
-- them under leases. Every lease time is the server's clock (`unixepoch('subsec')`, in
-- milliseconds), so hosts with skewed clocks agree on what has expired.

-- One row per worker host. A host is alive while `heartbeat_ms` is fresh (the lease TTL).
CREATE TABLE fleet_hosts (
    name         TEXT    PRIMARY KEY,
    -- The repository it serves: its remote's URL, normalised (no trailing / or .git).
    repo         TEXT    NOT NULL,
    capacity     INTEGER NOT NULL,
    labels       TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
    version      TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    start_time   INTEGER NOT NULL,
    started_at   TEXT    NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    -- running, draining (takes nothing new), stopped.
    state        TEXT    NOT NULL,
    running      INTEGER NOT NULL DEFAULT 0,
    load         REAL,
    -- HMAC of a fixed text under the host's APP_SHARED_SECRET: hosts with another secret see
    -- a different value and refuse each other.
    secret_check TEXT    NOT NULL,
    -- Why it takes nothing, when it says so (a label no task needs, another secret...).
    note         TEXT
);

-- Server-side counters: `lease` hands out fencing tokens, strictly increasing.
CREATE TABLE fleet_counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO fleet_counters (name, value) VALUES ('lease', 0);

-- The current attempt of each task of a fleet run. The orchestrator offers it (state
-- `offered`); a worker leases it (`leased`, with a fresh token), runs it (`started`), and
-- reports its end (`finished`); each report is applied only while its token is the row's.
CREATE TABLE fleet_tasks (
    run_id        TEXT    NOT NULL REFERENCES runs (id),
    task_id       TEXT    NOT NULL,
    repo          TEXT    NOT NULL,
    attempt       INTEGER NOT NULL,
    -- What to run (argv, env, branch, start commit, locks, paths, timeout), as JSON.
    spec          TEXT    NOT NULL CHECK (json_valid(spec)),
    -- Labels a host must have (the plan's "on").
    needs         TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(needs)),
    -- The orchestrator's secret check (see fleet_hosts) and its HMAC of `spec`: only a host
    -- with the same APP_SHARED_SECRET takes the task, and it runs only a spec it verified.
    secret_check  TEXT    NOT NULL,
    sig           TEXT    NOT NULL,
    -- offered, leased, started, finished, withdrawn
    state         TEXT    NOT NULL,
    host          TEXT,
    token         INTEGER,
    claim         TEXT,
    lease_expires INTEGER,
    started_at    TEXT,
    finished_at   TEXT,
    exit_code     INTEGER,
    -- The commit the attempt ended on, pushed to refs/app/fleet/<run>/<task>/<token>.
    tip           TEXT,
    detail        TEXT,
    -- The last lines of its log.
    output        TEXT,
    PRIMARY KEY (run_id, task_id)
);
-- One row per claim request (its uid chosen by the worker), so a claim sent twice (a retried
-- request) is applied once: its token is taken from the counter once, tasks are leased once.
CREATE TABLE fleet_claims (
    uid   TEXT    PRIMARY KEY,
    token INTEGER NOT NULL,
    done  INTEGER NOT NULL DEFAULT 0,
    at_ms INTEGER NOT NULL
);

CREATE INDEX fleet_tasks_by_state ON fleet_tasks (repo, state, lease_expires);
CREATE INDEX fleet_tasks_by_host ON fleet_tasks (host, state);

-- A fleet run's orchestrator may run on any host: its heartbeat (server clock) tells another
-- host whether it is still alive before that host resumes the run. NULL for local runs.
ALTER TABLE runs ADD COLUMN heartbeat_ms INTEGER;
