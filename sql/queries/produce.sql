-- Statements of the producer (zenpipe.produce): source rows into results.

-- name: create_stage
-- Transaction-scoped staging table for one binary COPY per batch: no WAL, no index, no
-- constraint, so COPY runs at full speed, and ON COMMIT DROP works behind PgBouncer in
-- transaction mode. ord is the row's position in the load (file order). data is JSON
-- text, parsed once, by the cast in the INSERT: a JSON Lines line goes as written (so
-- integers beyond 64 bits keep every digit), and when envelope is true the row's data is
-- that line's "data" member.
CREATE TEMP TABLE zen_produce_stage (
    ord      bigint   NOT NULL,
    link     text     NOT NULL,
    data     text     NOT NULL,
    envelope boolean  NOT NULL,
    priority smallint NOT NULL
) ON COMMIT DROP;

-- name: copy_stage
COPY zen_produce_stage (ord, link, data, envelope, priority) FROM STDIN (FORMAT BINARY);

-- name: clear_stage
-- The next batch of the same transaction reuses the table.
TRUNCATE zen_produce_stage;

-- name: insert_all
-- In file order, so rows of equal priority are claimed first-in first-out (claims order
-- by priority DESC, id and the identity is drawn in this order).
INSERT INTO results (link, data, priority)
SELECT s.link,
       CASE WHEN s.envelope THEN s.data::jsonb -> 'data' ELSE s.data::jsonb END,
       s.priority
FROM zen_produce_stage AS s
ORDER BY s.ord;

-- name: insert_new
-- skip_existing: the first occurrence of each link in the batch, unless the link is
-- already pending or claimed (results_link_idx, partial on exactly that predicate).
-- Rows inserted by earlier batches of the same transaction are visible here, so a link
-- repeated across batches of one load is inserted once. Two producers cannot both miss
-- each other's rows: each holds take_lock (below) from before its first insert to commit.
INSERT INTO results (link, data, priority)
SELECT d.link,
       CASE WHEN d.envelope THEN d.data::jsonb -> 'data' ELSE d.data::jsonb END,
       d.priority
FROM (SELECT DISTINCT ON (s.link) s.ord, s.link, s.data, s.envelope, s.priority
      FROM zen_produce_stage AS s
      ORDER BY s.link, s.ord) AS d
WHERE NOT EXISTS (SELECT 1 FROM results AS r
                  WHERE r.link = d.link AND r.status IN ('pending', 'claimed'))
ORDER BY d.ord;

-- name: set_lock_wait
-- How long take_lock may wait for another skip_existing load to commit, for this
-- transaction only; the statement_timeout, which would cut the wait short, a little
-- longer, so that a wait that runs out is a lock_timeout (LockNotAvailable). Returns the
-- settings it replaces so that restore_lock_wait puts them back for the inserts.
SELECT current_setting('lock_timeout'), current_setting('statement_timeout'),
       set_config('lock_timeout', %(wait)s, true),
       set_config('statement_timeout', %(statement_wait)s, true);

-- name: take_lock
-- One lock for every skip_existing producer (NAMESPACE_PRODUCE, 0), held to commit:
-- closes the check-then-insert race between two loads of the same link. One lock-table
-- slot per load instead of one per link (a 5,000-row batch would take 5,000 of the
-- server's few thousand slots); the price is that skip_existing loads commit one at a
-- time. Loads without skip_existing never take it.
SELECT pg_advisory_xact_lock(%(namespace)s, 0);

-- name: restore_lock_wait
SELECT set_config('lock_timeout', %(lock_timeout)s, true),
       set_config('statement_timeout', %(statement_timeout)s, true);

-- name: notify
-- Delivered at commit, once per transaction, to LISTEN zen_results (idle workers wake up).
SELECT pg_notify(%(channel)s, %(payload)s);
