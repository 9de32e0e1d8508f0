-- Statements of `zenpipe prune` (zenpipe.retention). Each runs as its own short
-- transaction and touches at most `limit` rows: no lock is held for long, and workers
-- claiming, completing and upserting keep going between (and during) the batches.

-- name: try_lock
-- One prune at a time across the fleet (transaction lock, see zenpipe.locks).
SELECT pg_try_advisory_xact_lock(%(namespace)s, %(key)s);

-- name: prune_results
-- Done rows finished before the cutoff, oldest first, through results_done_idx
-- (migration 0013): a batch reads the rows it deletes and no others. SKIP LOCKED: a row
-- being requeued right now is left for the next run. Deleting a results row runs the
-- foreign key's ON DELETE SET NULL on zen_contacts.source_id, which finds the
-- referencing contacts through idx_zc_source_id on each partition (migration 0009)
-- instead of scanning 32 partitions per row. With archive, each row goes to
-- zen_archive whole, as JSON, in the same statement.
WITH victims AS (
    SELECT r.id
    FROM results AS r
    WHERE r.status = 'done'
      AND r.done_at < now() - make_interval(secs => %(older_than)s)
    ORDER BY r.done_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM results AS r
    USING victims AS v
    WHERE r.id = v.id
    RETURNING r.*
), archived AS (
    INSERT INTO zen_archive (kind, id, row_data)
    SELECT 'results', g.id, to_jsonb(g) FROM gone AS g WHERE %(archive)s
    ON CONFLICT (kind, id) DO NOTHING
)
SELECT count(*) FROM gone;

-- name: prune_rejects
-- Rejects older than the cutoff, oldest first, through zen_rejects_rejected_at_idx.
WITH victims AS (
    SELECT j.id
    FROM zen_rejects AS j
    WHERE j.rejected_at < now() - make_interval(secs => %(older_than)s)
    ORDER BY j.rejected_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM zen_rejects AS j
    USING victims AS v
    WHERE j.id = v.id
    RETURNING j.*
), archived AS (
    INSERT INTO zen_archive (kind, id, row_data)
    SELECT 'zen_rejects', g.id, to_jsonb(g) FROM gone AS g WHERE %(archive)s
    ON CONFLICT (kind, id) DO NOTHING
)
SELECT count(*) FROM gone;
