-- Replaying dead letters: an operator asks for it (replay_requested_at); a running
-- instance of the group hands the recorded message to its handler again, in stream
-- order, and records when and how often (replayed_at, replays). A replay that fails
-- leaves the letter dead, with the new error, and clears the request.
ALTER TABLE edupulse.dead_letters
    ADD COLUMN replay_requested_at TIMESTAMPTZ,
    ADD COLUMN replayed_at TIMESTAMPTZ,
    ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;

CREATE INDEX dead_letters_replay ON edupulse.dead_letters (consumer_group, stream_sequence)
    WHERE replay_requested_at IS NOT NULL;
