-- 0004: what the hosts of a fleet hold across each other: one heartbeat row per host, fleet
-- locks and fleet reservations. A holder is alive while its host's heartbeat is fresh (the
-- lease TTL, by the server's clock); the host itself also asks /proc.

-- One row per fleet host (APP_FLEET_HOST), renewed by one process of that host at a time (the
-- holder of the host's heartbeat flock in its data directory), and by every fleet write the
-- host makes.
CREATE TABLE fleet_members (
    host         TEXT    PRIMARY KEY,
    heartbeat_ms INTEGER NOT NULL,
    -- The process that writes the heartbeat now.
    pid          INTEGER NOT NULL,
    start_time   INTEGER NOT NULL,
    -- See fleet_hosts.secret_check; empty where the writer has no APP_SHARED_SECRET.
    secret_check TEXT    NOT NULL DEFAULT ''
);

-- One row per fleet lock name, kept after release so its token only grows. `pid` is NULL
-- while the lock is free.
CREATE TABLE fleet_locks (
    name        TEXT    PRIMARY KEY,
    token       INTEGER NOT NULL,
    instance    TEXT,
    pid         INTEGER,
    start_time  INTEGER,
    boot_id     TEXT,
    host        TEXT,
    acquired_at TEXT,
    -- `--ttl`: when the hold runs out by itself, by the server's clock.
    expires_ms  INTEGER
);

-- One row per fleet reservation. Every change is guarded by the `reservations` counter: a
-- writer changes the rows only while the counter still has the value it read, and sets it to a
-- value of its own, so two overlapping reservations cannot both be made.
CREATE TABLE fleet_reservations (
    id         TEXT    PRIMARY KEY,
    instance   TEXT,
    pid        INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    boot_id    TEXT    NOT NULL,
    host       TEXT    NOT NULL,
    patterns   TEXT    NOT NULL CHECK (json_valid(patterns)),
    shared     INTEGER NOT NULL,
    reason     TEXT,
    created_at TEXT    NOT NULL,
    expires_ms INTEGER
);
INSERT INTO fleet_counters (name, value) VALUES ('reservations', 0);
