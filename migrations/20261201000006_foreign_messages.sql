-- Messages of other publishers that the relay found in its stream (anything appended
-- to `{prefix}.>` that is not one of this service's events). They break the chain the
-- relay publishes on, so it publishes one event at a time while they keep coming;
-- `outbox_status()` shows how many it has seen and when it saw the last.
ALTER TABLE edupulse.relay_progress
    ADD COLUMN foreign_messages BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN foreign_seen_at  TIMESTAMPTZ;
