-- Statements of `zenpipe bench` (zenpipe.bench): its own database, its settings, the
-- progress it samples while running and the invariants it reads back at the end.

-- name: create_database
-- A database of the bench's own: everything it creates is dropped with it. {name} is
-- composed with psycopg.sql.Identifier.
CREATE DATABASE {name}

-- name: drop_database
-- WITH (FORCE) ends sessions a killed worker may have left (PostgreSQL 13+).
DROP DATABASE IF EXISTS {name} WITH (FORCE)

-- name: bench_settings
-- Fleet-wide settings of the bench's database: short retry backoffs so transient
-- failures come back within the run; max_attempts for every claimer.
UPDATE zen_settings
SET max_attempts = %(max_attempts)s,
    retry_base_seconds = %(retry_base)s,
    retry_max_seconds = %(retry_max)s,
    updated_at = now();

-- name: progress
-- Sampled every second: one pass over results (the bench's database is small enough;
-- a full count also sees rows stuck in 'retry' or 'claimed').
SELECT count(*) FILTER (WHERE status IN ('done', 'failed')) AS settled,
       count(*) FILTER (WHERE status = 'failed')            AS parked,
       count(*)                                             AS total
FROM results;

-- name: connections
-- Client backends on the bench's database, the sampler's own excluded: what the fleet
-- holds at this moment (compared with the budget at the end).
SELECT count(*)
FROM pg_stat_activity AS a
WHERE a.datname = current_database()
  AND a.backend_type = 'client backend'
  AND a.pid <> pg_backend_pid();

-- name: budget
-- The fleet budget as zenpipe.pool.Budget computes it: max_connections minus the
-- superuser and (PostgreSQL 16+) reserved connections minus zenpipe's reserve.
SELECT current_setting('max_connections')::int
       - current_setting('superuser_reserved_connections')::int
       - coalesce(current_setting('reserved_connections', true)::int, 0)
       - %(reserve)s::int;

-- name: zenpipe_backends
-- Random zenpipe backends of the bench's database for pg_terminate_backend: the
-- workers' pools and control connections (application_name zenpipe:... / zenpipe-ctl:...).
SELECT a.pid
FROM pg_stat_activity AS a
WHERE a.datname = current_database()
  AND a.application_name LIKE 'zenpipe%%'
  AND a.pid <> pg_backend_pid()
ORDER BY random()
LIMIT %(n)s;

-- name: terminate
SELECT pg_terminate_backend(%(pid)s);

-- name: results_rows
-- Every source row with its number (data->'n'), for the status invariant.
SELECT (r.data->>'n')::int AS n, r.status, r.last_error, r.id, r.claim_token, r.claim_id,
       r.attempts
FROM results AS r;

-- name: contacts_rows
-- Every contact with the partition it lives in (tableoid), for the merge invariants.
SELECT c.tableoid::regclass::text AS leaf, c.source_link, c.scrape_count,
       c.emails, c.phones, c.emails_count, c.phones_count,
       c.business_name, c.business_category, c.website, c.city, c.country_code,
       c.latitude, c.longitude, c.rating::float8 AS rating, c.reviews_count, c.is_claimed,
       c.maps_phone, c.scrape_status
FROM zen_contacts AS c;

-- name: reject_rows
SELECT j.source_link, j.reason FROM zen_rejects AS j;

-- name: shared_tokens
-- Fencing: one claim statement, one token, one claim_id. Two claim_ids under one token
-- would be a token issued twice.
SELECT r.claim_token, count(DISTINCT r.claim_id) AS claim_ids, array_agg(r.id ORDER BY r.id)
FROM results AS r
WHERE r.claim_token IS NOT NULL
GROUP BY r.claim_token
HAVING count(DISTINCT r.claim_id) > 1
LIMIT 5;

-- name: live_servers
-- The registry after shutdown: rows still live (not expired).
SELECT s.server_id FROM zen_servers AS s WHERE s.expires_at > now() ORDER BY 1;

-- name: all_servers
SELECT s.server_id FROM zen_servers AS s ORDER BY 1;

-- name: partition_counts
SELECT c.tableoid::regclass::text AS leaf, count(*) FROM zen_contacts AS c GROUP BY 1
ORDER BY 1;

-- name: claim_totals
-- Leases that ran out while a row was enriched (expiries) and claims spent, over all rows.
SELECT coalesce(sum(r.expiries), 0)::bigint, coalesce(sum(r.attempts), 0)::bigint
FROM results AS r;

-- name: summary
-- The headline figures of the report (and of `zenpipe demo --json`'s "checks").
SELECT (SELECT count(*) FILTER (WHERE r.status = 'done') FROM results AS r)       AS done,
       (SELECT count(*) FILTER (WHERE r.status = 'failed') FROM results AS r)     AS parked,
       (SELECT count(*) FILTER (WHERE r.status NOT IN ('done', 'failed'))
        FROM results AS r)                                                         AS left_over,
       (SELECT count(*) FROM zen_contacts)                                         AS contacts,
       (SELECT count(*) FROM zen_rejects)                                          AS rejects;

-- name: parked_by_expiry
-- Rows the claimer parked because their lease ran out while claimed alone at
-- max_attempts (park_exhausted's reason, sql/queries/claim.sql).
SELECT (r.data->>'n')::int
FROM results AS r
WHERE r.status = 'failed' AND r.last_error LIKE '%%lease expired%%';
