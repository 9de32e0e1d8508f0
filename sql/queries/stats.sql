-- Statements of the hourly rollup and `zenpipe stats` (zenpipe.stats).

-- name: try_lock
-- One rollup at a time across the fleet (transaction lock; see zenpipe.locks).
SELECT pg_try_advisory_xact_lock(%(namespace)s, %(key)s);

-- name: state
-- The watermark, locked for the run; the last closed hour (an hour is closed once
-- margin seconds have passed since it ended: a batch recorded in it has committed by
-- then); and the oldest job, where a first run starts. min() reads one end of
-- zen_jobs_finished_idx.
SELECT s.rolled_up_to,
       date_trunc('hour', now() - make_interval(secs => %(margin)s), 'UTC') AS closed_until,
       (SELECT date_trunc('hour', min(j.finished_at), 'UTC') FROM zen_jobs AS j) AS oldest
FROM zen_stats_rollup AS s
FOR UPDATE;

-- name: recompute
-- Every (hour, server) of [lo, hi) recomputed from the ledger, zen_jobs (range scan of
-- zen_jobs_finished_idx), and SET with "=", never "+": running it again for the same
-- hours gives the same rows, so nothing is counted twice. A batch counts in the hour it
-- was recorded, as zen_record_stats_v1 counts it live. Rows that already hold the
-- ledger's figures are not rewritten (no dead tuple). Jobs recorded before migration
-- 0012 carry no server_id when their server was unregistered: the worker name
-- ("<server_id>/<name>") gives it back. Sorted: concurrent writers of the same rows
-- (the live increments) take their locks in one order.
WITH agg AS (
    SELECT date_trunc('hour', j.finished_at, 'UTC') AS hour,
           coalesce(j.server_id, nullif(regexp_replace(j.worker, '/[^/]*$', ''), ''),
                    '(unknown)')                    AS server_id,
           sum(j.rows_claimed)::bigint              AS rows_claimed,
           sum(j.rows_written)::bigint              AS rows_written,
           sum(j.rows_rejected)::bigint             AS rows_rejected,
           sum(j.rows_failed)::bigint               AS rows_failed,
           sum(j.emails_found)::bigint              AS emails_found
    FROM zen_jobs AS j
    WHERE j.finished_at >= %(lo)s AND j.finished_at < %(hi)s
    GROUP BY 1, 2
)
INSERT INTO zen_stats_hourly AS s
    (hour, server_id, rows_claimed, rows_written, rows_rejected, rows_failed, emails_found)
SELECT * FROM agg ORDER BY hour, server_id
ON CONFLICT (hour, server_id) DO UPDATE SET
    rows_claimed  = EXCLUDED.rows_claimed,
    rows_written  = EXCLUDED.rows_written,
    rows_rejected = EXCLUDED.rows_rejected,
    rows_failed   = EXCLUDED.rows_failed,
    emails_found  = EXCLUDED.emails_found
WHERE (s.rows_claimed, s.rows_written, s.rows_rejected, s.rows_failed, s.emails_found)
      IS DISTINCT FROM
      (EXCLUDED.rows_claimed, EXCLUDED.rows_written, EXCLUDED.rows_rejected,
       EXCLUDED.rows_failed, EXCLUDED.emails_found)
RETURNING s.hour;

-- name: advance
UPDATE zen_stats_rollup
SET rolled_up_to = greatest(coalesce(rolled_up_to, %(hi)s), %(hi)s),
    last_run_at = now(),
    last_hours = %(hours)s;

-- name: hours
-- The last n hours, summed over servers (primary key range scan on hour).
SELECT hour,
       count(*)::integer   AS servers,
       sum(rows_claimed)::bigint AS rows_claimed,
       sum(rows_written)::bigint AS rows_written,
       sum(rows_rejected)::bigint AS rows_rejected,
       sum(rows_failed)::bigint AS rows_failed,
       sum(emails_found)::bigint AS emails_found,
       hour >= (SELECT coalesce(rolled_up_to, '-infinity') FROM zen_stats_rollup) AS live
FROM zen_stats_hourly
WHERE hour > date_trunc('hour', now(), 'UTC') - make_interval(hours => %(hours)s)
GROUP BY hour
ORDER BY hour;
