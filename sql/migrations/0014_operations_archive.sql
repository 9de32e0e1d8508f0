-- Operations (issue 12), continued: the archive's own retention and the catalog
-- comments that point an operator at the right object.

-- zen_archive grows by whatever `zenpipe prune --archive` moves into it; exporting or
-- dropping it by age (WHERE archived_at < $1) must not scan it. The table is new and
-- small when this runs, so a plain build takes its lock for no time worth a
-- concurrent build.
CREATE INDEX zen_archive_archived_at_idx ON zen_archive (archived_at);

COMMENT ON MATERIALIZED VIEW zen_mv_dashboard IS
    'One-row dashboard, one pass per table; refreshed by zenpipe refresh-dashboard '
    '(REFRESH ... CONCURRENTLY via zen_refresh_dashboard_v1()); refreshed_at says how old.';
COMMENT ON VIEW zen_v_dashboard IS
    'Live dashboard: counts results and zen_contacts on every read. For monitoring read '
    'zen_mv_dashboard (materialized) instead.';
COMMENT ON TABLE zen_stats_rollup IS
    'Watermark of zenpipe stats rollup: hours before rolled_up_to are recomputed from '
    'zen_jobs and final.';
