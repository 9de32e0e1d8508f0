-- Statements of the materialized dashboard (zenpipe.dashboard, migration 0012).

-- name: refresh
-- REFRESH ... CONCURRENTLY through the owner's SECURITY DEFINER function: readers keep
-- reading the old row until the new one commits (the refresh takes an EXCLUSIVE lock,
-- which conflicts with writers of the view only; ACCESS SHARE readers pass).
SELECT zen_refresh_dashboard_v1();

-- name: try_refresh_lock
-- One refresh at a time across the fleet: a second one would only wait on the view's
-- EXCLUSIVE lock and then compute the same row again. Transaction lock: released at
-- commit, also through PgBouncer.
SELECT pg_try_advisory_xact_lock(%(namespace)s, %(key)s);

-- name: read
-- The one row; age_seconds measured by the database clock, like refreshed_at.
SELECT d.*, extract(epoch FROM clock_timestamp() - d.refreshed_at)::double precision AS age_seconds
FROM zen_mv_dashboard AS d;
