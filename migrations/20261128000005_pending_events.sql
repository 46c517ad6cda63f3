-- The events still to publish: status 'pending' and above the relay's mark
-- (`edupulse.relay_progress.published_through`, migration 4). What `outbox_status()`
-- counts, for operators' own queries.
CREATE VIEW edupulse.pending_events AS
SELECT o.*
FROM edupulse.outbox AS o
WHERE o.status = 'pending'
  AND o.seq > (SELECT published_through FROM edupulse.relay_progress);
