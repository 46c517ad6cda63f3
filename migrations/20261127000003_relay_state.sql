-- Whether the leading relay is idle (waiting for a notification) or busy. Emitting
-- sends `pg_notify` only while it is idle: Postgres serialises the commits of every
-- notifying transaction on one lock, which costs concurrent writers more than the
-- insert itself, and a busy relay does not need waking. One row.
CREATE TABLE edupulse.relay_state (
    one  BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    idle BOOLEAN NOT NULL DEFAULT true
);

INSERT INTO edupulse.relay_state (one, idle) VALUES (true, true);
