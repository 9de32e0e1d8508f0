-- Operations (issue 12): a materialized dashboard, the hourly rollup's state, the
-- retention archive and the legacy migration's progress. See docs/operations.md.

-- The dashboard, materialized: one row, computed with one pass over each big table
-- (results grouped by status; zen_contacts grouped by GROUPING SETS, which a
-- MixedAggregate computes in a single scan of each partition), plus the last hour of
-- zen_jobs (index zen_jobs_finished_idx, migration 0013) and the last 24 hours of
-- zen_stats_hourly (its primary key). The CTEs are each read several times but scanned
-- once (a CTE referenced twice is materialized). refreshed_at says how old the row is.
-- `zenpipe refresh-dashboard` refreshes it CONCURRENTLY (readers are never blocked),
-- which needs the unique index below. zen_v_dashboard (migration 0004) stays as the
-- live, unmaterialized view for ad-hoc use.
CREATE MATERIALIZED VIEW zen_mv_dashboard AS
WITH r AS (
    SELECT status,
           (status = 'claimed' AND lease_until < now()) AS lease_expired,
           count(*) AS n
    FROM results
    GROUP BY 1, 2
), c AS (
    SELECT GROUPING(country_code)       AS g_country,
           GROUPING(last_scrape_server) AS g_server,
           country_code,
           last_scrape_server,
           count(*)                              AS n,
           count(*) FILTER (WHERE has_email)     AS with_email,
           count(*) FILTER (WHERE has_phone)     AS with_phone,
           count(*) FILTER (WHERE has_whatsapp)  AS with_whatsapp,
           coalesce(sum(emails_count), 0)        AS emails,
           coalesce(sum(phones_count), 0)        AS phones,
           coalesce(sum(whatsapp_count), 0)      AS whatsapp
    FROM zen_contacts
    GROUP BY GROUPING SETS ((country_code), (last_scrape_server), ())
), j AS (
    SELECT server_id,
           count(*)           AS batches,
           sum(rows_claimed)  AS claimed,
           sum(rows_written)  AS written,
           sum(rows_rejected) AS rejected,
           sum(rows_failed)   AS failed
    FROM zen_jobs
    WHERE finished_at > now() - interval '1 hour'
    GROUP BY server_id
), tot AS (
    SELECT * FROM c WHERE g_country = 1 AND g_server = 1
)
SELECT
    1                                                                   AS id,
    now()                                                               AS refreshed_at,
    (SELECT coalesce(sum(n), 0) FROM r)::bigint                         AS source_total,
    (SELECT coalesce(sum(n), 0) FROM r WHERE status = 'pending')::bigint AS source_pending,
    (SELECT coalesce(sum(n), 0) FROM r
     WHERE status = 'claimed' AND NOT lease_expired)::bigint            AS source_claimed,
    (SELECT coalesce(sum(n), 0) FROM r WHERE lease_expired)::bigint     AS source_lease_expired,
    (SELECT coalesce(sum(n), 0) FROM r WHERE status = 'retry')::bigint  AS source_retry,
    (SELECT coalesce(sum(n), 0) FROM r WHERE status = 'done')::bigint   AS source_done,
    (SELECT coalesce(sum(n), 0) FROM r WHERE status = 'failed')::bigint AS source_failed,
    coalesce((SELECT n FROM tot), 0)::bigint                            AS contacts_total,
    coalesce((SELECT with_email FROM tot), 0)::bigint                   AS contacts_with_email,
    coalesce((SELECT with_phone FROM tot), 0)::bigint                   AS contacts_with_phone,
    coalesce((SELECT with_whatsapp FROM tot), 0)::bigint                AS contacts_with_whatsapp,
    coalesce((SELECT emails FROM tot), 0)::bigint                       AS emails_total,
    coalesce((SELECT phones FROM tot), 0)::bigint                       AS phones_total,
    coalesce((SELECT whatsapp FROM tot), 0)::bigint                     AS whatsapp_total,
    (SELECT count(*) FROM c
     WHERE g_country = 0 AND g_server = 1 AND country_code IS NOT NULL)::bigint AS countries,
    (SELECT coalesce(jsonb_agg(jsonb_build_object('country', t.country_code, 'contacts', t.n,
                                                  'emails', t.emails)
                               ORDER BY t.n DESC, t.country_code), '[]')
     FROM (SELECT * FROM c WHERE g_country = 0 AND g_server = 1 AND country_code IS NOT NULL
           ORDER BY n DESC, country_code LIMIT 10) AS t)              AS top_countries,
    (SELECT coalesce(jsonb_object_agg(coalesce(last_scrape_server, '(none)'), n), '{}')
     FROM c WHERE g_server = 0 AND g_country = 1)                      AS contacts_per_server,
    (SELECT count(*) FROM zen_servers WHERE expires_at > now())::bigint AS servers_live,
    (SELECT coalesce(sum(pool_size + 1), 0) FROM zen_servers
     WHERE expires_at > now())::bigint                                  AS pool_connections,
    (SELECT coalesce(sum(batches), 0) FROM j)::bigint                   AS last_hour_batches,
    (SELECT coalesce(sum(claimed), 0) FROM j)::bigint                   AS last_hour_claimed,
    (SELECT coalesce(sum(written), 0) FROM j)::bigint                   AS last_hour_written,
    (SELECT coalesce(sum(rejected), 0) FROM j)::bigint                  AS last_hour_rejected,
    (SELECT coalesce(sum(failed), 0) FROM j)::bigint                    AS last_hour_failed,
    (SELECT coalesce(jsonb_object_agg(coalesce(server_id, '(none)'), written), '{}')
     FROM j)                                                            AS last_hour_per_server,
    (SELECT coalesce(sum(rows_written), 0) FROM zen_stats_hourly
     WHERE hour > now() - interval '24 hours')::bigint                  AS rows_written_24h,
    (SELECT coalesce(sum(rows_rejected), 0) FROM zen_stats_hourly
     WHERE hour > now() - interval '24 hours')::bigint                  AS rows_rejected_24h,
    (SELECT coalesce(sum(rows_failed), 0) FROM zen_stats_hourly
     WHERE hour > now() - interval '24 hours')::bigint                  AS rows_failed_24h;

-- REFRESH ... CONCURRENTLY needs a unique index on plain columns of the view.
CREATE UNIQUE INDEX zen_mv_dashboard_id_idx ON zen_mv_dashboard (id);

-- REFRESH needs ownership of the view (PostgreSQL < 17 has no MAINTAIN privilege), so
-- roles that do not own it refresh through this function, which runs as the owner.
-- Only roles granted EXECUTE (zen_admin, by `zenpipe roles create`) may call it.
-- Returns the new refreshed_at.
CREATE FUNCTION zen_refresh_dashboard_v1() RETURNS timestamptz
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path FROM CURRENT
    AS $$
BEGIN
    REFRESH MATERIALIZED VIEW CONCURRENTLY zen_mv_dashboard;
    RETURN (SELECT d.refreshed_at FROM zen_mv_dashboard AS d);
END
$$;
REVOKE EXECUTE ON FUNCTION zen_refresh_dashboard_v1() FROM PUBLIC;

-- The batch ledger carries the emails a batch found, so zen_stats_hourly can be
-- recomputed from zen_jobs alone (the rollup, zenpipe.stats). Constant default: a
-- metadata-only change, no table rewrite.
ALTER TABLE zen_jobs ADD COLUMN emails_found integer NOT NULL DEFAULT 0;

-- The hourly rollup's watermark (zenpipe.stats.rollup): hours before rolled_up_to are
-- final; a run recomputes every hour from there up to the last closed one and moves it
-- forward. NULL: nothing rolled up yet, start at the oldest job.
CREATE TABLE zen_stats_rollup (
    singleton     boolean     PRIMARY KEY DEFAULT true
                  CONSTRAINT zen_stats_rollup_singleton_check CHECK (singleton),
    rolled_up_to  timestamptz,
    last_run_at   timestamptz,
    last_hours    integer     NOT NULL DEFAULT 0
);
INSERT INTO zen_stats_rollup DEFAULT VALUES;

-- Rows `zenpipe prune --archive` moved out of results and zen_rejects, whole, as JSON:
-- the archive does not break when those tables gain columns.
CREATE TABLE zen_archive (
    kind        text        NOT NULL
                CONSTRAINT zen_archive_kind_check CHECK (kind IN ('results', 'zen_rejects')),
    id          bigint      NOT NULL,
    row_data    jsonb       NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, id)
);

-- Progress of `zenpipe migrate-legacy` per source table, updated in the transaction
-- that writes each batch, so an interrupted run resumes after the last committed batch
-- and a finished one re-runs as a no-op.
CREATE TABLE zen_legacy_progress (
    source      text        PRIMARY KEY
                CONSTRAINT zen_legacy_progress_source_check CHECK (source IN ('v1', 'v2')),
    last_id     bigint      NOT NULL DEFAULT 0,
    rows_read   bigint      NOT NULL DEFAULT 0,
    written     bigint      NOT NULL DEFAULT 0,
    merged      bigint      NOT NULL DEFAULT 0,
    rejected    bigint      NOT NULL DEFAULT 0,
    batches     integer     NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
