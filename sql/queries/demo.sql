-- The invariants `zenpipe demo` checks after a run (zenpipe.demo), one pass per table.

-- name: results_by_status
SELECT count(*) FILTER (WHERE status = 'done')                    AS done,
       count(*) FILTER (WHERE status = 'failed')                  AS parked,
       count(*) FILTER (WHERE status IN ('pending', 'claimed'))   AS left_over,
       count(DISTINCT link) FILTER (
           WHERE status = 'done' AND data->>'country' ~ '^[A-Z]{2}$') AS valid_links
FROM results;

-- name: contacts_and_rejects
SELECT (SELECT count(*) FROM zen_contacts)                   AS contacts,
       (SELECT coalesce(sum(scrape_count), 0) FROM zen_contacts) AS writes,
       (SELECT count(*) FROM zen_rejects)                    AS rejects;
