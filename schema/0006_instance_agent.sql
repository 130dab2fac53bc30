-- 0006: what each mirrored instance's agent is doing, as its supervisor last derived it
-- (`{"state", "since", "reason"}` as JSON), so a fleet host's dashboard shows the agents of
-- the other hosts too. Written with the instance's heartbeat row; NULL when not known (an
-- older binary, an instance without a command yet).
ALTER TABLE instances ADD COLUMN agent TEXT;
