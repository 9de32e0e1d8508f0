-- Statements of the worker loop (zenpipe.worker).

-- name: record_batch
-- One round trip per batch for the bookkeeping: the batch's zen_jobs row and its
-- figures added to the hour's zen_stats_hourly row. server_id is only set on the job
-- when the server is registered (zen_jobs.server_id references zen_servers).
WITH job AS (
    INSERT INTO zen_jobs (server_id, worker, kind, status, rows_claimed, rows_written,
                          rows_rejected, rows_failed, started_at, finished_at)
    SELECT (SELECT s.server_id FROM zen_servers AS s WHERE s.server_id = %(server_id)s),
           %(worker)s, 'batch', 'done', %(claimed)s, %(written)s, %(rejected)s, %(failed)s,
           now() - make_interval(secs => %(seconds)s), now()
    RETURNING id
)
SELECT zen_record_stats_v1(%(server_id)s, %(claimed)s, %(written)s, %(rejected)s,
                           %(failed)s, %(emails)s),
       (SELECT count(*) FROM job);
