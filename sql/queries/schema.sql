-- Statements of the migration runner (zenpipe.schema).

-- name: create_migrations_table
-- Created under the migration lock, so concurrent first runs do not race on it.
CREATE TABLE IF NOT EXISTS zen_schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer     NOT NULL
);

-- name: applied_checksums
SELECT version, name, checksum FROM zen_schema_migrations ORDER BY version;

-- name: applied_migrations
SELECT version, name, checksum, applied_at, duration_ms
FROM zen_schema_migrations
ORDER BY version;

-- name: record_migration
-- The primary key turns a second application of one version into an error, never a
-- silent double run.
INSERT INTO zen_schema_migrations (version, name, checksum, duration_ms)
VALUES (%s, %s, %s, %s);

-- name: try_migration_lock
-- Session lock (not transaction): it must outlive the transactions of one run and the
-- non-transactional CREATE INDEX CONCURRENTLY steps.
SELECT pg_try_advisory_lock(%s, %s);

-- name: migration_unlock
SELECT pg_advisory_unlock(%s, %s);

-- name: relation_kind
SELECT c.relkind::text
FROM pg_class AS c
WHERE c.oid = to_regclass(%s);

-- name: leaf_partitions
SELECT c.relname
FROM pg_inherits AS i
JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass(%s)
ORDER BY c.relname;

-- name: index_state
-- (valid, attached to a parent index) for one index name in the search path.
SELECT x.indisvalid,
       EXISTS (SELECT 1 FROM pg_inherits AS i WHERE i.inhrelid = x.indexrelid)
FROM pg_index AS x
WHERE x.indexrelid = to_regclass(%s);

-- name: migrations_table_exists
SELECT to_regclass('zen_schema_migrations') IS NOT NULL;

-- name: set_local_lock_timeout
-- For one brief DDL step: give up (and retry) rather than queue writers behind us.
SELECT set_config('lock_timeout', %s, true);

-- name: inventory_relations
-- What `zenpipe schema apply` reports: relations of the current schema by kind.
SELECT c.relkind::text, c.relname, c.relispartition
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'i', 'I')
ORDER BY c.relname;

-- name: inventory_functions
SELECT p.proname
FROM pg_proc AS p
JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = current_schema()
ORDER BY 1;

-- name: has_citus
-- Whether the citus extension is installed (then ask is_citus_coordinator: the function
-- does not exist without the extension).
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');

-- name: is_citus_coordinator
-- A worker has the extension too, but zenpipe's schema is applied on the coordinator.
SELECT citus_is_coordinator();
