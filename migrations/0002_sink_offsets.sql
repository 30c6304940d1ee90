-- The sink's consumed positions, written in the same transaction as the rows they cover, so
-- that a batch is applied exactly once. next_offset -1: assigned, nothing written yet.
CREATE TABLE IF NOT EXISTS readstate_sink_offsets (
    consumer_group  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    next_offset     bigint      NOT NULL,
    -- Output records covered by the committed batches (a double-applied batch would show).
    records_applied bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
