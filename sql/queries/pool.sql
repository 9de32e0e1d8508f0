-- Statements of the bounded pool and the fleet registry (zenpipe.pool).

-- name: fleet_lock
-- Transaction-level lock in the fleet namespace: registrations run one at a time, so
-- two servers starting together cannot both count the same free connections. Released
-- at commit or rollback, so it also works through PgBouncer in transaction mode.
SELECT pg_advisory_xact_lock(%s, %s);

-- name: fleet_lock_shared
-- The same lock in shared mode, taken by every heartbeat: heartbeats of different
-- servers never wait for each other, but none runs while a registration counts the
-- live rows. So a heartbeat either commits before the count (and is counted) or runs
-- after it and finds the row it was counted out by already expired (and registers
-- again) -- it can never revive a row a registration has just handed out.
SELECT pg_advisory_xact_lock_shared(%s, %s);

-- name: server_limits
-- What the server allows non-superusers: max_connections minus the slots PostgreSQL
-- keeps for superusers (and, on PostgreSQL 16+, for pg_use_reserved_connections;
-- missing_ok makes the setting read as NULL on 15).
SELECT current_setting('max_connections')::integer,
       current_setting('superuser_reserved_connections')::integer,
       coalesce(current_setting('reserved_connections', true), '0')::integer;

-- name: backend_pid
-- The pid of the backend that runs this statement. A direct connection reports the
-- same pid in its startup BackendKeyData; PgBouncer (any mode) hands the client a
-- random cancel key of its own instead, so the two differ (zenpipe.pool.detect_pgbouncer).
-- Reads no session state and leaves none.
SELECT pg_backend_pid();

-- name: live_usage
-- Connections held by the other live servers (pool plus its dedicated connections:
-- control, and the listener when it listens);
-- expired rows hold nothing. Read under the fleet lock, so it cannot change before our
-- insert commits. statement_timestamp(), not now(): the transaction began before the
-- lock wait, and a heartbeat that ran during the wait compared with its own later time.
SELECT count(*)::integer,
       coalesce(sum(pool_size + dedicated), 0)::integer
FROM zen_servers
WHERE expires_at > statement_timestamp() AND server_id <> %(server_id)s;

-- name: own_row
-- The current holder of our server id, if any, which process instance it is, and
-- whether its lease still runs.
SELECT host, pid, instance_id, expires_at > statement_timestamp()
FROM zen_servers
WHERE server_id = %(server_id)s;

-- name: register
-- One row per server id: a restarted server (or one taking over a dead process's id)
-- replaces the row instead of adding a second share. The lease is computed by the
-- database clock, the same clock every liveness check compares against, read after the
-- fleet lock was granted (statement_timestamp()).
INSERT INTO zen_servers AS s
    (server_id, instance_id, host, pid, pool_size, dedicated, version, started_at,
     last_heartbeat, expires_at, stats)
VALUES (%(server_id)s, %(instance_id)s, %(host)s, %(pid)s, %(pool_size)s, %(dedicated)s,
        %(version)s,
        statement_timestamp(), statement_timestamp(),
        statement_timestamp() + make_interval(secs => %(lease)s), '{}')
ON CONFLICT (server_id) DO UPDATE SET
    instance_id = EXCLUDED.instance_id,
    host = EXCLUDED.host,
    pid = EXCLUDED.pid,
    pool_size = EXCLUDED.pool_size,
    dedicated = EXCLUDED.dedicated,
    version = EXCLUDED.version,
    started_at = EXCLUDED.started_at,
    last_heartbeat = EXCLUDED.last_heartbeat,
    expires_at = EXCLUDED.expires_at,
    stats = EXCLUDED.stats;

-- name: purge_expired
-- Rows expired for a while are history, not budget: drop them so the table stays a
-- handful of rows. Runs after registration committed, outside the fleet lock, in
-- batches of at most %(batch)s rows (SKIP LOCKED: two purgers split the work). Nothing
-- cascades: zen_jobs.server_id is plain text since migration 0009.
DELETE FROM zen_servers
WHERE server_id IN (
    SELECT server_id FROM zen_servers
    WHERE expires_at < statement_timestamp() - make_interval(secs => %(after)s)
    ORDER BY expires_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED);

-- name: heartbeat
-- Extends the lease only while it still runs and the row is still ours (our instance,
-- not merely our host and pid): a server whose row expired (its share may have been
-- handed out since) must register again under the fleet lock instead of silently
-- reviving its old share. Runs after fleet_lock_shared in the same transaction, so
-- statement_timestamp() is later than any registration that counted the row out.
UPDATE zen_servers
SET last_heartbeat = statement_timestamp(),
    expires_at = statement_timestamp() + make_interval(secs => %(lease)s),
    stats = %(stats)s
WHERE server_id = %(server_id)s AND instance_id = %(instance_id)s
  AND expires_at > statement_timestamp()
RETURNING pool_size;

-- name: leave
-- A clean shutdown frees its share at once instead of after the lease; only our own
-- instance's row (a successor that took the id over keeps its row).
DELETE FROM zen_servers
WHERE server_id = %(server_id)s AND instance_id = %(instance_id)s;

-- name: fleet_servers
-- Every row, live first: `zenpipe stats` shows recently expired servers too.
SELECT server_id, instance_id::text, host, pid, pool_size, version, started_at, last_heartbeat, expires_at,
       expires_at > now() AS live, stats
FROM zen_servers
ORDER BY expires_at > now() DESC, server_id;

-- name: backend_connections
-- Client connections the PostgreSQL server holds right now (all applications).
SELECT count(*)::integer FROM pg_stat_activity WHERE backend_type = 'client backend';

-- name: dashboard
-- The dashboard view of migration 0004 (one row).
SELECT * FROM zen_v_dashboard;

-- name: set_local_timeouts
-- Behind PgBouncer in transaction mode a session SET would leak to (or be lost on)
-- another client's server connection: set_config(..., is_local => true) lasts exactly
-- this transaction.
SELECT set_config('statement_timeout', %s, true),
       set_config('lock_timeout', %s, true),
       set_config('idle_in_transaction_session_timeout', %s, true);

-- name: begin
-- Transactions spelled out on an autocommit connection in pipeline mode (`one_trip`,
-- the Upserter's fast write), so that BEGIN, the timeouts above, the work and COMMIT
-- share one round trip.
BEGIN;

-- name: commit
COMMIT;

-- name: rollback
ROLLBACK;
