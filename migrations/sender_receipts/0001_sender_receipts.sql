-- Read receipts for senders, for catch-up: one row per (sender, conversation, reader), the
-- highest of the sender's messages the reader has read. Written only by the sender-receipts
-- sink; every write is guarded by message_seq < new message_seq, so a replay never moves a
-- row backwards.
-- {{table}} is the sink's table (default sender_receipts).
CREATE TABLE {{table}} (
    sender_id       {{user_id}}      NOT NULL,
    conversation_id {{conversation_id}}      NOT NULL,
    reader_id       {{user_id}}      NOT NULL,
    -- Position and id of the highest of the sender's messages the reader has read.
    message_seq     bigint      NOT NULL CHECK (message_seq >= 0),
    message_id      {{message_id}},
    read_at         timestamptz NOT NULL,
    device_id       text,
    -- The read reached past the window of recent messages: older messages of this sender
    -- were read too.
    covers_older    boolean     NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sender_id, conversation_id, reader_id)
) WITH (fillfactor = 90);

-- "Everything for sender S since T" (a reconnecting sender's catch-up): an index range scan.
CREATE INDEX {{table}}_by_sender_updated ON {{table}} (sender_id, updated_at);
