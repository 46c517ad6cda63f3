-- The consumer side: an inbox that makes `on_tx` handlers apply each event once, and a
-- dead-letter table so that no message disappears silently.

CREATE TABLE edupulse.inbox (
    consumer_group TEXT NOT NULL,
    event_id       UUID NOT NULL,
    handled_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Event ids are UUID v7, ordered by time: pruning walks this key, no other index.
    PRIMARY KEY (consumer_group, event_id)
);

CREATE TABLE edupulse.dead_letters (
    id             BIGSERIAL PRIMARY KEY,
    consumer_group TEXT NOT NULL,
    -- Why: handler_failed, undecodable, unknown_event, unknown_version.
    reason         TEXT NOT NULL,
    error          TEXT NOT NULL,
    event_id       UUID,
    event_name     TEXT,
    subject        TEXT NOT NULL,
    stream_sequence BIGINT NOT NULL,
    deliveries     INTEGER NOT NULL,
    headers        JSONB NOT NULL,
    payload        BYTEA NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_group ON edupulse.dead_letters (consumer_group, id);
