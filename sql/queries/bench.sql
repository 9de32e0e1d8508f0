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
-- Sampled twice a second while the fleet runs: counts only the rows not settled yet
-- (pending, claimed, retry: each through its partial index) and the parked ones, so a
-- sample shrinks with the backlog instead of passing over every version of every row
-- of results (40-105 ms a sample in a 30,000-row run, on the server the fleet shares).
-- %(total)s: the rows the bench loaded.
SELECT %(total)s::bigint - (
           (SELECT count(*) FROM results WHERE status = 'pending')
         + (SELECT count(*) FROM results WHERE status = 'claimed')
         + (SELECT count(*) FROM results WHERE status = 'retry')) AS settled,
       (SELECT count(*) FROM results WHERE status = 'failed') AS parked,
       %(total)s::bigint AS total;

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

-- ---------------------------------------------------------------------------------------
-- Baselines in the same run (zenpipe.bench.baselines): the physical reference and the
-- two hand-written loops of `zenpipe bench --compare`, each in a fresh database.

-- name: reference_copy_contacts
-- The physical reference: the expected contacts COPYed into an empty zen_contacts, no
-- merge, no validation (partition_key computed by zenpipe.keys.hashtext, checked by the
-- table's CHECK): the least work any writer of these rows can do.
COPY zen_contacts (source_link, partition_key, scrape_count, emails, phones,
                   business_name, business_category, website, city, country_code,
                   latitude, longitude, rating, reviews_count, is_claimed, maps_phone,
                   scrape_status)
FROM STDIN

-- name: reference_mark_done
-- The physical reference's settlement: one bulk UPDATE over every source row (a
-- sequential scan; nothing narrower can be cheaper for all of them).
UPDATE results SET status = 'done', done_at = now()

-- name: seed_claim
-- The audit's claim, as it recommended it: the advisory lock is tried on every row the
-- scan visits (no fence before LIMIT, the shape the PostgreSQL manual warns about), and
-- in autocommit it is released when the statement ends, while the rows stay 'pending':
-- another worker can take them again (the seed's duplicates).
SELECT r.id, r.link, r.data, r.attempts
FROM results AS r
WHERE r.status = 'pending' AND pg_try_advisory_xact_lock(r.id)
LIMIT %(n)s

-- name: skip_locked_claim
-- The plain SKIP LOCKED claim over results_pending_idx (priority DESC, id); the lease
-- is written in the same transaction and committed before enrichment starts, so no
-- transaction stays open while a row is enriched.
WITH picked AS (
    SELECT r.id
    FROM results AS r
    WHERE r.status = 'pending'
    ORDER BY r.priority DESC, r.id
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)
UPDATE results AS r
SET status = 'claimed', claim_owner = %(owner)s, claim_token = 0,
    lease_until = now() + make_interval(secs => %(lease)s), attempts = r.attempts + 1
FROM picked
WHERE r.id = picked.id
RETURNING r.id, r.link, r.data, r.attempts - 1

-- name: skip_locked_reclaim
-- Leases that ran out (a baseline worker that died) go back to pending; run only when
-- nothing is pending (results_lease_idx).
UPDATE results SET status = 'pending', claim_owner = NULL, claim_token = NULL,
                   lease_until = NULL
WHERE status = 'claimed' AND lease_until < now()

-- name: baseline_upsert_row
-- The seed's writer: one INSERT ... ON CONFLICT per record, in its own transaction, no
-- validation, no normalization; the merge is the audit's COALESCE (the newest write
-- wins when it carries a value, whatever its observation time; a non-empty array
-- replaces the stored one).
INSERT INTO zen_contacts AS c (
    source_link, partition_key, source_id, scrape_count, emails, phones,
    business_name, business_category, website, city, country_code, latitude,
    longitude, rating, reviews_count, is_claimed, maps_phone, scrape_status)
VALUES (%(source_link)s, hashtext(%(source_link)s), %(source_id)s, 1, %(emails)s,
        %(phones)s, %(business_name)s, %(business_category)s, %(website)s, %(city)s,
        %(country_code)s, %(latitude)s, %(longitude)s, %(rating)s, %(reviews_count)s,
        %(is_claimed)s, %(maps_phone)s, coalesce(%(scrape_status)s, 'pending'))
ON CONFLICT (source_link, partition_key) DO UPDATE SET
    scrape_count = c.scrape_count + 1,
    emails = coalesce(nullif(EXCLUDED.emails, '{}'), c.emails),
    phones = coalesce(nullif(EXCLUDED.phones, '{}'), c.phones),
    business_name = coalesce(EXCLUDED.business_name, c.business_name),
    business_category = coalesce(EXCLUDED.business_category, c.business_category),
    website = coalesce(EXCLUDED.website, c.website),
    city = coalesce(EXCLUDED.city, c.city),
    country_code = coalesce(EXCLUDED.country_code, c.country_code),
    latitude = coalesce(EXCLUDED.latitude, c.latitude),
    longitude = coalesce(EXCLUDED.longitude, c.longitude),
    rating = coalesce(EXCLUDED.rating, c.rating),
    reviews_count = coalesce(EXCLUDED.reviews_count, c.reviews_count),
    is_claimed = coalesce(EXCLUDED.is_claimed, c.is_claimed),
    maps_phone = coalesce(EXCLUDED.maps_phone, c.maps_phone),
    scrape_status = coalesce(%(scrape_status)s, c.scrape_status)

-- name: baseline_done
-- Settle one enriched row (primary key).
UPDATE results SET status = 'done', done_at = now(), claim_owner = NULL,
                   lease_until = NULL
WHERE id = %(id)s

-- name: baseline_fail
-- A row whose enrichment failed: back to pending for a transient failure, parked as
-- failed with the error otherwise (primary key).
UPDATE results SET status = %(status)s, last_error = %(error)s, claim_owner = NULL,
                   claim_token = NULL, lease_until = NULL,
                   attempts = attempts + %(bump)s::int
WHERE id = %(id)s

-- name: baseline_left
-- Rows not settled yet (the loops stop when none is left).
SELECT count(*) FROM results WHERE status IN ('pending', 'claimed')

-- name: analyze_results
-- Statistics for the freshly loaded rows, so every baseline starts from the same plans.
VACUUM ANALYZE results

-- name: broken_merge
-- Test-only (--broken-merge): what a writer that skipped the union would leave, the
-- last item of every array that has more than one dropped.
UPDATE zen_contacts
SET emails = emails[1:cardinality(emails) - 1]
WHERE cardinality(emails) > 1

-- ---------------------------------------------------------------------------------------
-- The crash-safe floor (benchmarks/bench_floor.py): the server work any pipeline with a
-- committed lease must do, run by the server alone (no client work between statements),
-- in a bench database of its own.

-- name: floor_staging
-- Before the clock starts: every good source row's contact as the enrichment stand-in
-- returns it (its data's place, typed by jsonb_populate_record, blanks and case
-- normalized as the validator does, enough for the table's CHECKs), keyed by results.id.
CREATE TABLE zen_floor_rows AS
SELECT r.id AS result_id, r.link AS source_link, hashtext(r.link) AS partition_key,
       (r.data ->> 'seen')::timestamptz AS observed_at,
       nullif(btrim(p.business_name), '') AS business_name,
       nullif(btrim(p.business_category), '') AS business_category,
       nullif(btrim(p.website), '') AS website, nullif(btrim(p.city), '') AS city,
       upper(btrim(p.country_code)) AS country_code, p.latitude, p.longitude, p.rating,
       p.reviews_count, p.is_claimed, p.maps_phone, p.scrape_status,
       ARRAY(SELECT DISTINCT lower(btrim(e)) FROM unnest(p.emails) AS e ORDER BY 1) AS emails,
       p.phones
FROM results AS r,
     LATERAL jsonb_populate_record(NULL::zen_contacts, r.data -> 'place') AS p
WHERE NOT (r.data ?| ARRAY['bad', 'none', 'poison', 'crash']);
ALTER TABLE zen_floor_rows ADD PRIMARY KEY (result_id);
ANALYZE zen_floor_rows;
ANALYZE results;

-- name: floor_procedure
-- One claimer of the floor, looping until nothing is pending: (1) claim a batch in
-- priority-then-age order with FOR UPDATE SKIP LOCKED and record a lease and a fencing
-- token, COMMIT (the lease must be durable before the work starts); (2) write the
-- batch's contacts with INSERT ... ON CONFLICT DO UPDATE setting the columns to the new
-- values (less than any correct merge: no newest-wins, no union; a link's second
-- scrape in one batch is dropped), settle the rows under the token, COMMIT. Each
-- statement is planned once (plpgsql caches it); no round trip, no client.
CREATE PROCEDURE zen_floor(p_batch integer)
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_ids bigint[];
    v_token bigint;
BEGIN
    LOOP
        v_token := nextval('results_claim_token_seq');
        WITH c AS (
            SELECT q.id FROM results AS q
            WHERE q.status = 'pending'
            ORDER BY q.priority DESC, q.id
            LIMIT p_batch
            FOR UPDATE SKIP LOCKED
        ), took AS (
            UPDATE results AS r
            SET status = 'claimed', claim_owner = 'floor', claim_token = v_token,
                lease_until = statement_timestamp() + interval '60 seconds',
                attempts = r.attempts + 1
            FROM c WHERE r.id = c.id
            RETURNING r.id
        )
        SELECT array_agg(t.id) INTO v_ids FROM took AS t;
        EXIT WHEN v_ids IS NULL;
        COMMIT;
        INSERT INTO zen_contacts AS z (
            partition_key, source_link, source_id, business_name, business_category,
            website, city, country_code, latitude, longitude, rating, reviews_count,
            is_claimed, maps_phone, scrape_status, emails, phones, observed_at, scrape_count)
        SELECT DISTINCT ON (f.source_link)
               f.partition_key, f.source_link, f.result_id, f.business_name,
               f.business_category, f.website, f.city, f.country_code, f.latitude,
               f.longitude, f.rating, f.reviews_count, f.is_claimed, f.maps_phone,
               coalesce(f.scrape_status, 'pending'), coalesce(f.emails, '{}'),
               coalesce(f.phones, '{}'), f.observed_at, 1
        FROM zen_floor_rows AS f
        WHERE f.result_id = ANY (v_ids)
        ORDER BY f.source_link, f.observed_at DESC
        ON CONFLICT (source_link, partition_key) DO UPDATE SET
            source_id = EXCLUDED.source_id, business_name = EXCLUDED.business_name,
            business_category = EXCLUDED.business_category, website = EXCLUDED.website,
            city = EXCLUDED.city, country_code = EXCLUDED.country_code,
            latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude,
            rating = EXCLUDED.rating, reviews_count = EXCLUDED.reviews_count,
            is_claimed = EXCLUDED.is_claimed, maps_phone = EXCLUDED.maps_phone,
            scrape_status = EXCLUDED.scrape_status, emails = EXCLUDED.emails,
            phones = EXCLUDED.phones, observed_at = EXCLUDED.observed_at,
            scrape_count = z.scrape_count + 1, updated_at = now();
        UPDATE results AS r
        SET status = 'done', done_at = statement_timestamp()
        WHERE r.id = ANY (v_ids) AND r.claim_token = v_token;
        COMMIT;
    END LOOP;
END
$$;

-- name: floor_call
CALL zen_floor(%(batch)s);

-- name: floor_left
SELECT count(*) FROM results WHERE status <> 'done';

-- name: floor_contacts
SELECT count(*) FROM zen_contacts;
