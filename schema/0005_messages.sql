-- 0005: messages between instances on different hosts of a fleet. The file queue in `.app/`
-- stays the path between instances of one host; a message for an instance that runs on another
-- host is one row per copy here. A copy is addressed to instance `recipient` registered on
-- `host` in the repository at `repo_root` (as the `instances` mirror names them), and `body` is
-- that copy signed for its recipient with the fleet's APP_SHARED_SECRET, exactly as a file of
-- the queue. Times are the server's clock, in milliseconds.
CREATE TABLE messages (
    -- The message id, as `app send` prints it (the same for every copy).
    id          TEXT    NOT NULL,
    host        TEXT    NOT NULL,
    repo_root   TEXT    NOT NULL,
    recipient   TEXT    NOT NULL,
    sender      TEXT    NOT NULL,
    sender_host TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    sent_ms     INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    -- waiting; acked; dead (not acknowledged within its TTL); quarantined (did not verify).
    state       TEXT    NOT NULL DEFAULT 'waiting',
    done_ms     INTEGER,
    reason      TEXT,
    -- The sender chooses every part of a copy's key, so a request sent twice (an unanswered
    -- request is resent) files each copy once.
    PRIMARY KEY (id, host, repo_root, recipient)
);
-- What a receiver polls: its waiting copies, oldest first.
CREATE INDEX messages_inbox ON messages (host, repo_root, recipient, state, id);
-- What a sender prunes: copies acknowledged long ago.
CREATE INDEX messages_done ON messages (state, done_ms);
