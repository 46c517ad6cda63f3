-- The transactional outbox of edupulse-events. Everything lives in the `edupulse`
-- schema, beside the library's own migrations table (edupulse._migrations), so nothing
-- collides with the application's tables or its `_sqlx_migrations`.

CREATE SCHEMA IF NOT EXISTS edupulse;

CREATE TABLE edupulse.outbox (
    -- Publish order.
    seq             BIGSERIAL PRIMARY KEY,
    -- The event id (UUID v7); the Nats-Msg-Id and CloudEvents id.
    id              UUID NOT NULL UNIQUE,
    name            TEXT NOT NULL,
    version         INTEGER NOT NULL CHECK (version >= 1),
    -- Relative to the service's subject prefix.
    subject         TEXT NOT NULL,
    payload         JSONB NOT NULL,
    source          TEXT NOT NULL,
    correlation_id  UUID,
    causation_id    UUID,
    traceparent     TEXT,
    occurred_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'published', 'dead')),
    published_at    TIMESTAMPTZ
);

-- The relay reads pending rows in sequence order; nothing else is indexed beyond the
-- keys, so emitting stays one cheap insert. Dead rows are few and scanned only by
-- outbox_status() and requeue_dead().
CREATE INDEX outbox_pending ON edupulse.outbox (seq) WHERE status = 'pending';

-- Dead rows are rare; this index holds only them (a pending or published row is never
-- in it), so outbox_status() and requeue_dead() need not scan the table.
CREATE INDEX outbox_dead ON edupulse.outbox (seq) WHERE status = 'dead';
