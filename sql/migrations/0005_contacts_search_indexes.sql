-- zenpipe: concurrently
--
-- Search indexes added after the table may already hold millions of rows. This file runs
-- outside a transaction: each CREATE INDEX below is built with the partitioned-table
-- recipe (CREATE INDEX ON ONLY the parent, CREATE INDEX CONCURRENTLY on every leaf,
-- ALTER INDEX ... ATTACH PARTITION), so writers are never blocked while it builds.
-- Only "CREATE INDEX <name> ON <table> <method and columns>;" statements are allowed.

-- WHERE emails @> ARRAY['someone@example.com'] (who has this address?)
CREATE INDEX idx_zc_emails_gin ON zen_contacts USING gin (emails);

-- WHERE created_at >= $1 AND created_at < $2: rows arrive in time order, so a BRIN
-- summary per 128 pages is a few kilobytes for the whole table.
CREATE INDEX idx_zc_created_brin ON zen_contacts USING brin (created_at);
