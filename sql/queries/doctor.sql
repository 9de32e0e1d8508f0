-- Checks of `zenpipe doctor` (zenpipe.doctor) and the bloat governor's signals
-- (zenpipe.governor). Every statement reads catalogs or statistics views, or an
-- index of zenpipe's own tables: the doctor is cheap enough to run every minute.

-- name: vacuum_signals
-- What holds vacuum back on this database, in one round trip (the governor runs it
-- every few seconds): the age of the oldest transaction that pins the xmin horizon (an
-- xid assigned, or a snapshot held: REPEATABLE READ, a long query, a cursor; lazy
-- VACUUM sets neither for others, so autovacuum workers are left out), prepared
-- transactions, and the dead tuples of results (statistics, flushed by each backend
-- at most about once a second). Since PostgreSQL 14 only sessions of the same database
-- hold back the horizon of its tables.
SELECT coalesce((SELECT max(extract(epoch FROM clock_timestamp() - a.xact_start))
                 FROM pg_stat_activity AS a
                 WHERE a.datname = current_database()
                   AND a.pid <> pg_backend_pid()
                   AND a.backend_type <> 'autovacuum worker'
                   AND (a.backend_xid IS NOT NULL OR a.backend_xmin IS NOT NULL)), 0)
           ::double precision                                       AS horizon_age_seconds,
       (SELECT a.pid FROM pg_stat_activity AS a
        WHERE a.datname = current_database()
          AND a.pid <> pg_backend_pid()
          AND a.backend_type <> 'autovacuum worker'
          AND (a.backend_xid IS NOT NULL OR a.backend_xmin IS NOT NULL)
        ORDER BY a.xact_start LIMIT 1)                              AS horizon_pid,
       coalesce((SELECT max(extract(epoch FROM clock_timestamp() - p.prepared))
                 FROM pg_prepared_xacts AS p
                 WHERE p.database = current_database()), 0)::double precision
                                                                    AS prepared_age_seconds,
       coalesce(s.n_dead_tup, 0)::bigint                            AS results_dead,
       coalesce(s.n_live_tup, 0)::bigint                            AS results_live
FROM (SELECT 1) AS one
LEFT JOIN pg_stat_user_tables AS s ON s.relid = 'results'::regclass;

-- name: vacuum
-- Dead-tuple ratio and last (auto)vacuum of results and every zen_contacts partition.
SELECT s.relname::text, s.n_live_tup, s.n_dead_tup, s.last_autovacuum, s.last_vacuum,
       s.autovacuum_count
FROM pg_stat_user_tables AS s
WHERE s.relid = 'results'::regclass
   OR s.relid IN (SELECT i.inhrelid FROM pg_inherits AS i
                  WHERE i.inhparent = 'zen_contacts'::regclass)
ORDER BY s.n_dead_tup DESC, s.relname;

-- name: transactions
-- Open transactions on this database, oldest first, with what they hold: an xid, a
-- snapshot (xmin), and whether the session is idle inside it.
SELECT a.pid, a.usename::text, a.application_name, a.state,
       extract(epoch FROM clock_timestamp() - a.xact_start)::double precision   AS xact_age,
       extract(epoch FROM clock_timestamp() - a.state_change)::double precision AS state_age,
       a.backend_xid IS NOT NULL AS has_xid, a.backend_xmin IS NOT NULL AS has_xmin,
       left(a.query, 200) AS query
FROM pg_stat_activity AS a
WHERE a.datname = current_database()
  AND a.pid <> pg_backend_pid()
  AND a.xact_start IS NOT NULL
  AND a.backend_type = 'client backend'
ORDER BY a.xact_start;

-- name: advisory_locks
-- zenpipe's advisory locks (two-key form: classid = namespace, objsubid = 2) on this
-- database, with the state of the session holding each. A lock held by an idle session
-- (no transaction open) can only be a session lock that was never released.
SELECT l.pid, l.classid::bigint AS namespace, l.objid::bigint AS key2, l.granted,
       a.state, a.application_name,
       extract(epoch FROM clock_timestamp() - a.state_change)::double precision AS state_age
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.objsubid = 2
  AND l.classid = ANY (%(namespaces)s::oid[])
  AND l.database = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database())
  AND l.pid <> pg_backend_pid()
ORDER BY l.pid, l.classid, l.objid;

-- name: leases
-- Expired leases (results_lease_idx: claimed rows by lease_until) and parked rows
-- (results_failed_idx), counted through the partial indexes, never the whole table.
SELECT (SELECT count(*) FROM results WHERE status = 'claimed' AND lease_until < now())
           AS expired,
       (SELECT min(lease_until) FROM results WHERE status = 'claimed' AND lease_until < now())
           AS oldest_expired,
       (SELECT count(*) FROM results WHERE status = 'failed') AS parked;

-- name: invalid_indexes
-- Indexes left invalid (an interrupted or failed CREATE INDEX CONCURRENTLY): they cost
-- every write and serve no read.
SELECT n.nspname::text, c.relname::text AS index, t.relname::text AS table_name,
       pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index AS i
JOIN pg_class AS c ON c.oid = i.indexrelid
JOIN pg_class AS t ON t.oid = i.indrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_toast'
ORDER BY 1, 2;

-- name: duplicate_indexes
-- Pairs of indexes with the same table, columns, operator classes, collations,
-- options, expressions and predicate. Partitions' indexes are left out (each repeats
-- its parent's). The second of each pair is the one to drop, unless it backs a
-- constraint.
SELECT t.relname::text AS table_name, a.relname::text AS kept, b.relname::text AS duplicate,
       pg_get_indexdef(bi.indexrelid) AS definition
FROM pg_index AS ai
JOIN pg_index AS bi
  ON bi.indrelid = ai.indrelid
 AND bi.indexrelid > ai.indexrelid
 AND bi.indkey::text = ai.indkey::text
 AND bi.indclass::text = ai.indclass::text
 AND bi.indcollation::text = ai.indcollation::text
 AND bi.indoption::text = ai.indoption::text
 AND coalesce(pg_get_expr(bi.indexprs, bi.indrelid), '') =
     coalesce(pg_get_expr(ai.indexprs, ai.indrelid), '')
 AND coalesce(pg_get_expr(bi.indpred, bi.indrelid), '') =
     coalesce(pg_get_expr(ai.indpred, ai.indrelid), '')
JOIN pg_class AS a ON a.oid = ai.indexrelid
JOIN pg_class AS b ON b.oid = bi.indexrelid
JOIN pg_class AS t ON t.oid = ai.indrelid
JOIN pg_namespace AS n ON n.oid = t.relnamespace
JOIN pg_am AS am ON am.oid = a.relam
JOIN pg_am AS bm ON bm.oid = b.relam AND bm.amname = am.amname
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT t.relispartition
ORDER BY 1, 2, 3;

-- name: unused_indexes
-- Indexes never scanned since the statistics were reset, summed over a partitioned
-- index's partitions, at least min_bytes large; unique and primary-key indexes are left
-- out (they enforce a constraint even when nobody reads through them).
WITH leaf AS (
    SELECT coalesce(p.inhparent, s.indexrelid) AS index_oid, s.idx_scan,
           pg_relation_size(s.indexrelid) AS bytes
    FROM pg_stat_user_indexes AS s
    LEFT JOIN pg_inherits AS p ON p.inhrelid = s.indexrelid
)
SELECT c.relname::text AS index, t.relname::text AS table_name,
       sum(leaf.idx_scan)::bigint AS scans, sum(leaf.bytes)::bigint AS bytes
FROM leaf
JOIN pg_index AS i ON i.indexrelid = leaf.index_oid
JOIN pg_class AS c ON c.oid = leaf.index_oid
JOIN pg_class AS t ON t.oid = i.indrelid
WHERE NOT i.indisunique AND NOT i.indisprimary
GROUP BY c.relname, t.relname
HAVING sum(leaf.idx_scan) = 0 AND sum(leaf.bytes) >= %(min_bytes)s
ORDER BY sum(leaf.bytes) DESC;

-- name: connections
-- Client connections against max_connections (less the superuser reserve), and the
-- live fleet's connections (pool + control) against the same limits.
SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::integer
           AS used,
       current_setting('max_connections')::integer AS max_connections,
       current_setting('superuser_reserved_connections')::integer AS superuser_reserved,
       coalesce(current_setting('reserved_connections', true), '0')::integer AS reserved,
       (SELECT count(*) FROM zen_servers WHERE expires_at > now())::integer AS live_servers,
       (SELECT coalesce(sum(pool_size + 1), 0) FROM zen_servers WHERE expires_at > now())::integer
           AS fleet_connections;

-- name: partition_balance
-- Live rows per zen_contacts partition from the statistics (n_live_tup; reltuples
-- when no statistics were collected yet): no count(*) over the table.
SELECT c.relname::text AS partition,
       greatest(coalesce(s.n_live_tup, 0), c.reltuples::bigint, 0)::bigint AS rows
FROM pg_inherits AS i
JOIN pg_class AS c ON c.oid = i.inhrelid
LEFT JOIN pg_stat_user_tables AS s ON s.relid = c.oid
WHERE i.inhparent = 'zen_contacts'::regclass
ORDER BY c.relname;

-- name: pg_stat_statements_installed
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements');

-- name: pg_stat_statements_top
-- The statements that took the most time on this database, from pg_stat_statements.
SELECT s.calls, s.total_exec_time::double precision AS total_ms,
       s.mean_exec_time::double precision AS mean_ms, s.rows,
       left(regexp_replace(s.query, '\s+', ' ', 'g'), 160) AS query
FROM pg_stat_statements AS s
WHERE s.dbid = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database())
ORDER BY s.total_exec_time DESC
LIMIT %(limit)s;
