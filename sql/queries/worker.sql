-- Statements of the worker loop (zenpipe.worker).

-- name: record_batch
-- One round trip per batch for the bookkeeping: the batch's zen_jobs row (the ledger
-- that `zenpipe stats rollup` recomputes closed hours from, with its emails) and its
-- figures added live to the hour's zen_stats_hourly row (zenpipe.stats). zen_jobs.server_id
-- is plain history since migration 0009 (no foreign key), so it is always set.
WITH job AS (
    INSERT INTO zen_jobs (server_id, worker, kind, status, rows_claimed, rows_written,
                          rows_rejected, rows_failed, emails_found, started_at, finished_at)
    SELECT %(server_id)s,
           %(worker)s, 'batch', 'done', %(claimed)s, %(written)s, %(rejected)s, %(failed)s,
           %(emails)s, now() - make_interval(secs => %(seconds)s), now()
    RETURNING id
)
SELECT zen_record_stats_v1(%(server_id)s, %(claimed)s, %(written)s, %(rejected)s,
                           %(failed)s, %(emails)s),
       (SELECT count(*) FROM job);
