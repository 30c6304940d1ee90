-- The conversations' members, from the members source: one row per conversation (its
-- member list now), written only by the members sink. version is the list's offset in its
-- partition (a conversation's lists are all in one partition, in order); every write is
-- guarded by version < new version. A deleted list (tombstone) leaves an empty array.
-- {{table}} is the members sink's table (default conversation_members); {{receipts_table}}
-- the receipts sink's (default read_receipts).
CREATE TABLE {{table}} (
    conversation_id {{conversation_id}}      PRIMARY KEY,
    members         {{user_id}}[]    NOT NULL,
    version         bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Read by N of M at `pos` in `conv`: N = members whose read pointer is at or past it (one
-- primary-key lookup in the receipts table per member), M = members. A conversation
-- without a list has (0, 0).
CREATE FUNCTION {{table}}_read_by(conv {{conversation_id}}, pos bigint)
RETURNS TABLE (read_by bigint, members bigint)
LANGUAGE sql STABLE AS $$
    SELECT
        (SELECT count(*) FROM unnest(m.members) AS u(member)
                JOIN {{receipts_table}} r
                  ON r.conversation_id = q.c AND r.reader_id = u.member
         WHERE r.last_read_seq >= pos),
        COALESCE(cardinality(m.members), 0)::bigint
    FROM (SELECT conv AS c) q LEFT JOIN {{table}} m ON m.conversation_id = q.c
$$;
