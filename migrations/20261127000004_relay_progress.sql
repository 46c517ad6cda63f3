-- How far the relay has published in sequence order. An event whose status is still
-- 'pending' but whose seq is at most `published_through` has been published: marking a
-- batch is one update of this row instead of one per event (an UPDATE of `status`,
-- which the partial indexes name, writes a new row version and new index entries for
-- every event, two thirds of Postgres' work in a drain).
--
-- Status 'published' is still written event by event while the relay cannot vouch for
-- the order of what it has read: after it stopped waiting for a transaction that held
-- earlier events longer than `order_wait_limit`, until that transaction has ended.
-- Dead events keep status 'dead', whatever their seq; `requeue_dead` gives them a new
-- seq, so that they come after the mark.
CREATE TABLE edupulse.relay_progress (
    singleton         BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    published_through BIGINT NOT NULL DEFAULT 0,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO edupulse.relay_progress DEFAULT VALUES;
