-- Per conversation: its message count, head and window of recent messages. Written only by
-- the heads sink, one row per conversation and flush, never one per member.
-- {{table}} is the heads sink's table (default conversation_heads); {{receipts_table}} the
-- receipts sink's (default read_receipts).
CREATE TABLE {{table}} (
    conversation_id  {{conversation_id}}      PRIMARY KEY,
    head_seq         bigint      NOT NULL,
    message_count    bigint      NOT NULL,
    -- Number of changes of the head; every write is guarded by version < new version.
    version          bigint      NOT NULL,
    -- Highest seq that left the window (-1: none): a pointer below it gets capped counts.
    window_floor_seq bigint      NOT NULL,
    -- The window: seqs of the most recent messages (ascending) and their senders.
    recent_seqs      bigint[]    NOT NULL,
    recent_senders   {{user_id}}[]    NOT NULL,
    -- Mentions in the window as (seq, user) pairs, and the seqs mentioning everyone.
    mention_seqs     bigint[]    NOT NULL,
    mention_user_ids {{user_id}}[]    NOT NULL,
    everyone_seqs    bigint[]    NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Unread and mention counts of `reader` in `conv` at read pointer `pointer` (-1: nothing
-- read): messages after the pointer not sent by the reader, and those of them mentioning
-- the reader or everyone. counts_capped: the pointer is behind the window, the counts are a
-- lower bound (show "999+").
CREATE FUNCTION {{table}}_counts(conv {{conversation_id}}, reader {{user_id}}, pointer bigint)
RETURNS TABLE (unread_count bigint, mention_count bigint, counts_capped boolean)
LANGUAGE sql STABLE AS $$
    SELECT
        COALESCE((SELECT count(*) FROM unnest(h.recent_seqs, h.recent_senders) AS m(seq, sender)
                  WHERE m.seq > pointer AND m.sender <> reader), 0),
        COALESCE((SELECT count(*) FROM unnest(h.recent_seqs, h.recent_senders) AS m(seq, sender)
                  WHERE m.seq > pointer AND m.sender <> reader
                    AND (m.seq = ANY (h.everyone_seqs)
                         OR EXISTS (SELECT 1 FROM unnest(h.mention_seqs, h.mention_user_ids)
                                        AS x(seq, uid)
                                    WHERE x.seq = m.seq AND x.uid = reader))), 0),
        COALESCE(pointer < h.window_floor_seq, false)
    FROM (SELECT conv AS c) q LEFT JOIN {{table}} h ON h.conversation_id = q.c
$$;

-- Every reader with a pointer, with their counts now.
CREATE VIEW {{receipts_table}}_unread AS
SELECT r.conversation_id, r.reader_id, r.last_read_seq, h.head_seq,
       c.unread_count, c.mention_count, c.counts_capped
FROM {{receipts_table}} r
     LEFT JOIN {{table}} h USING (conversation_id)
     CROSS JOIN LATERAL {{table}}_counts(r.conversation_id, r.reader_id, r.last_read_seq) c;
