-- zenpipe: concurrently
--
-- Indexes for the operations of issue 12, built CONCURRENTLY (this file runs outside a
-- transaction): results and zen_jobs may already hold millions of rows.

-- The hourly rollup recomputes hours of zen_jobs (WHERE finished_at >= $1 AND
-- finished_at < $2) and the dashboard reads the last hour; zen_jobs_started_idx orders
-- by start, but a batch counts in the hour it was recorded (finished_at).
CREATE INDEX zen_jobs_finished_idx ON zen_jobs (finished_at);

-- Retention (zenpipe prune): WHERE status = 'done' AND done_at < $1 ORDER BY done_at
-- LIMIT n, so a prune batch reads only the rows it deletes. Partial: pending, claimed
-- and failed rows are never in it; completing a row adds one entry (that update is
-- never HOT anyway: status is in the other partial indexes' predicates).
CREATE INDEX results_done_idx ON results (done_at) WHERE status = 'done';
