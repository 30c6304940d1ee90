-- The queryable read state: one row per (conversation, reader), written only by the sink.
-- {{table}} is the topology's postgres sink `table` (default read_receipts).
CREATE TABLE {{table}} (
    conversation_id {{conversation_id}}      NOT NULL,
    reader_id       {{user_id}}      NOT NULL,
    -- The monotonic read pointer and the message it points at.
    last_read_seq   bigint      NOT NULL CHECK (last_read_seq >= 0),
    message_id      {{message_id}},
    sender_id       {{user_id}},
    device_id       text,
    read_at         timestamptz,
    -- Number of advances of the pointer; every write is guarded by version < new version.
    version         bigint      NOT NULL,
    -- Raw events folded for this key, and those that did not advance the pointer.
    events_total    bigint      NOT NULL,
    stale_total     bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, reader_id)
) WITH (fillfactor = 90);

-- "What has reader R read": every conversation of a reader with its pointer.
CREATE INDEX {{table}}_by_reader ON {{table}} (reader_id) INCLUDE (last_read_seq);

-- "Who in conversation C has read up to seq S": range scan on (conversation, pointer).
CREATE INDEX {{table}}_by_conversation_seq ON {{table}} (conversation_id, last_read_seq)
    INCLUDE (reader_id);
