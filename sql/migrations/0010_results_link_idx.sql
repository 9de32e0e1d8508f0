-- zenpipe: concurrently
--
-- The producer's skip_existing check (sql/queries/produce.sql, insert_new): WHERE NOT
-- EXISTS (SELECT 1 FROM results WHERE link = s.link AND status IN ('pending', 'claimed')).
-- Without it every loaded batch would scan the whole table. Partial: done and failed rows
-- (the bulk of a long-lived table) are never in it; a claim or a lease extension adds one
-- entry per row (those updates are never HOT anyway), completing a row adds none.
-- Built CONCURRENTLY (this file runs outside a transaction): results may already hold
-- millions of rows, and claims and completions keep writing while it builds.
CREATE INDEX results_link_idx ON results (link) WHERE status IN ('pending', 'claimed');
