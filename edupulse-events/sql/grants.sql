-- Least privilege for edupulse-events: four roles, each with only what its part of the
-- library does. Run as a superuser (or the owner of the `edupulse` schema) after the
-- migrations, and again after an upgrade that adds migrations. It is idempotent.
-- Then grant the roles to your login roles, e.g.:
--   GRANT edupulse_writer   TO web_app;      -- emits events, reads the outbox's status
--   GRANT edupulse_relay    TO relay_app;    -- publishes the outbox to NATS
--   GRANT edupulse_consumer TO worker_app;   -- consumer groups (and emitting from handlers)
-- The migrator owns the schema: run `migrate` (or `EventService::migrate`) the first time
-- as a login role that is a member of edupulse_migrator, after `SET ROLE edupulse_migrator`,
-- so that the schema and its tables belong to that role. Once every migration is
-- applied, `migrate` only reads edupulse._migrations: the other roles may call it at
-- start-up.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'edupulse_migrator') THEN
        CREATE ROLE edupulse_migrator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'edupulse_writer') THEN
        CREATE ROLE edupulse_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'edupulse_relay') THEN
        CREATE ROLE edupulse_relay NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'edupulse_consumer') THEN
        CREATE ROLE edupulse_consumer NOLOGIN;
    END IF;
    -- The migrator creates the schema (the first time) in this database.
    EXECUTE pg_catalog.format(
        'GRANT CONNECT, CREATE ON DATABASE %I TO edupulse_migrator',
        pg_catalog.current_database()
    );
    EXECUTE pg_catalog.format(
        'GRANT CONNECT ON DATABASE %I TO edupulse_writer, edupulse_relay, edupulse_consumer',
        pg_catalog.current_database()
    );
END
$roles$;

GRANT USAGE ON SCHEMA edupulse TO edupulse_writer, edupulse_relay, edupulse_consumer;
-- `migrate` reads which migrations are applied.
GRANT SELECT ON edupulse._migrations TO edupulse_writer, edupulse_relay, edupulse_consumer;

-- Writer: emit (INSERT ... RETURNING reads the new row's seq; the relay's idle flag is
-- read at every emit) and the status calls (outbox_status, dead_events, event_state).
GRANT SELECT, INSERT ON edupulse.outbox TO edupulse_writer;
GRANT USAGE ON SEQUENCE edupulse.outbox_seq_seq TO edupulse_writer;
GRANT SELECT ON SEQUENCE edupulse.relay_idle TO edupulse_writer;
GRANT SELECT ON edupulse.relay_progress, edupulse.pending_events TO edupulse_writer;
-- The emitter's waker waits for emitting transactions to end, then wakes the relay.
GRANT EXECUTE ON FUNCTION edupulse.wake_after(int4[], int4) TO edupulse_writer;

-- Relay: read and mark the outbox, prune it, read the fence (the sequence's last
-- value), set the idle flag (setval) and move its mark. requeue_dead needs UPDATE on
-- the outbox and USAGE on its sequence: the relay role may requeue.
GRANT SELECT, UPDATE, DELETE ON edupulse.outbox TO edupulse_relay;
GRANT SELECT, USAGE ON SEQUENCE edupulse.outbox_seq_seq TO edupulse_relay;
GRANT SELECT, UPDATE ON SEQUENCE edupulse.relay_idle TO edupulse_relay;
GRANT SELECT, UPDATE ON edupulse.relay_progress TO edupulse_relay;
GRANT SELECT ON edupulse.pending_events TO edupulse_relay;

-- Consumer: the inbox (insert, prune) and the dead letters (insert, list, purge); its
-- handlers usually emit, so it has the writer's grants too.
GRANT SELECT, INSERT, DELETE ON edupulse.inbox TO edupulse_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON edupulse.dead_letters TO edupulse_consumer;
GRANT USAGE ON SEQUENCE edupulse.dead_letters_id_seq TO edupulse_consumer;
GRANT edupulse_writer TO edupulse_consumer;
