-- The inbox is pruned by when each event was handled, not by the time inside its id
-- (an old event, a backlog or an id that is not v7 would lose its deduplication): an
-- index to find a group's oldest handled rows.
CREATE INDEX inbox_handled ON edupulse.inbox (consumer_group, handled_at);

-- A dead letter keeps its message losslessly: the header block as the consumer got it
-- (bytes a JSONB value cannot hold, such as NUL), beside the readable `headers`.
ALTER TABLE edupulse.dead_letters ADD COLUMN raw_headers BYTEA;
