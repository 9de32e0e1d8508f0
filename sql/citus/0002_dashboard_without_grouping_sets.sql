-- Citus variant, step 2: the materialized dashboard (shared migration 0012) without
-- GROUPING SETS, which Citus refuses over a distributed table ("could not run
-- distributed query with GROUPING"). Same columns, same meaning, same unique index (its
-- REFRESH ... CONCURRENTLY, through zen_refresh_dashboard_v1, is unchanged); zen_contacts
-- is read three times instead of once, each pass spread over the workers. The view is
-- refreshed on the coordinator; its rows live there.
DROP MATERIALIZED VIEW zen_mv_dashboard;

CREATE MATERIALIZED VIEW zen_mv_dashboard AS
WITH r AS (
    SELECT status,
           (status = 'claimed' AND lease_until < now()) AS lease_expired,
           count(*) AS n
    FROM results
    GROUP BY 1, 2
), c AS (
    -- The GROUPING SETS of the single-server view, as three aggregates: Citus refuses
    -- GROUPING SETS over a distributed table; each of these runs on the shards in
    -- parallel and is merged on the coordinator.
    SELECT 0 AS g_country, 1 AS g_server, country_code, NULL::text AS last_scrape_server,
           count(*)                              AS n,
           count(*) FILTER (WHERE has_email)     AS with_email,
           count(*) FILTER (WHERE has_phone)     AS with_phone,
           count(*) FILTER (WHERE has_whatsapp)  AS with_whatsapp,
           coalesce(sum(emails_count), 0)        AS emails,
           coalesce(sum(phones_count), 0)        AS phones,
           coalesce(sum(whatsapp_count), 0)      AS whatsapp
    FROM zen_contacts
    GROUP BY country_code
    UNION ALL
    SELECT 1, 0, NULL::text, last_scrape_server,
           count(*)                              AS n,
           count(*) FILTER (WHERE has_email)     AS with_email,
           count(*) FILTER (WHERE has_phone)     AS with_phone,
           count(*) FILTER (WHERE has_whatsapp)  AS with_whatsapp,
           coalesce(sum(emails_count), 0)        AS emails,
           coalesce(sum(phones_count), 0)        AS phones,
           coalesce(sum(whatsapp_count), 0)      AS whatsapp
    FROM zen_contacts
    GROUP BY last_scrape_server
    UNION ALL
    SELECT 1, 1, NULL::text, NULL::text,
           count(*)                              AS n,
           count(*) FILTER (WHERE has_email)     AS with_email,
           count(*) FILTER (WHERE has_phone)     AS with_phone,
           count(*) FILTER (WHERE has_whatsapp)  AS with_whatsapp,
           coalesce(sum(emails_count), 0)        AS emails,
           coalesce(sum(phones_count), 0)        AS phones,
           coalesce(sum(whatsapp_count), 0)      AS whatsapp
    FROM zen_contacts
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
