-- The emitter's waker (edupulse-events/src/outbox/wake.rs): waits for the emitting
-- transactions that hold the advisory locks (1162104917, key) of `keys` to end, each
-- wait bounded by `wait_ms` (then it fails with lock_not_available), and then notifies
-- the relay if it says it is idle, in a transaction that does not wait for its flush.
-- A function rather than a DO block: its plan is compiled once per session.
CREATE FUNCTION edupulse.wake_after(keys int4[], wait_ms int4) RETURNS void
LANGUAGE plpgsql AS $wake$
DECLARE
    k int4;
BEGIN
    PERFORM pg_catalog.set_config('lock_timeout', wait_ms::text || 'ms', true);
    FOREACH k IN ARRAY keys LOOP
        PERFORM pg_catalog.pg_advisory_xact_lock(1162104917, k);
    END LOOP;
    IF (SELECT last_value FROM edupulse.relay_idle) = 1 THEN
        PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
        PERFORM pg_catalog.pg_notify('edupulse_outbox', '');
    END IF;
END
$wake$;

REVOKE ALL ON FUNCTION edupulse.wake_after(int4[], int4) FROM PUBLIC;
