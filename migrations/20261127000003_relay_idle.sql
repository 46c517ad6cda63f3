-- Whether the leading relay is idle (1: waiting for a notification) or busy (0).
-- Emitting sends `pg_notify` only while it is idle: Postgres serialises the commits of
-- every notifying transaction on one lock, which costs concurrent writers more than
-- the insert itself, and a busy relay does not need waking.
--
-- A sequence, not a table: its value is read outside any snapshot, so a writer in a
-- REPEATABLE READ or SERIALIZABLE transaction sees the relay's current state at its
-- insert, not the state when its transaction began; and `setval` writes no row
-- versions.
CREATE SEQUENCE edupulse.relay_idle MINVALUE 0 MAXVALUE 1 START 1 NO CYCLE;
