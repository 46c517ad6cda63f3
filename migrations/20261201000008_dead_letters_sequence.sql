-- A message is recorded once per group and reason, however often it is delivered (an
-- ack lost with a dropped connection brings it back after it was recorded): the write
-- looks for an earlier record of the same stream sequence.
CREATE INDEX dead_letters_sequence ON edupulse.dead_letters (consumer_group, stream_sequence);
