-- Statements about zenpipe's advisory locks (zenpipe.locks).

-- name: leftovers
-- Two-key advisory locks show classid = first key, objsubid = 2. pg_locks covers the
-- whole cluster, so only this database's locks count; our own session is left out.
SELECT (SELECT count(*) FROM pg_locks AS l
        WHERE l.locktype = 'advisory'
          AND l.objsubid = 2
          AND l.classid = ANY (%(namespaces)s::oid[])
          AND l.database = (SELECT d.oid FROM pg_database AS d
                            WHERE d.datname = current_database())
          AND l.pid <> pg_backend_pid())                              AS advisory_locks,
       (SELECT count(*) FROM pg_stat_activity AS a
        WHERE a.datname = current_database()
          AND a.state LIKE 'idle in transaction%%'
          AND a.pid <> pg_backend_pid())                              AS idle_in_transaction;
