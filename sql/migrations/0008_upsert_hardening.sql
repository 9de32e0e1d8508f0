-- Writer hardening (issue 8): idempotent retries of plain upserts, and observation times
-- from the database clock.
--
-- zen_upsert_keys: one row per committed Upserter.upsert() transaction, inserted first
-- in that transaction under a random key the call generated. A retry after a lost
-- COMMIT acknowledgement inserts the same key again: when the first commit landed, the
-- insert finds the key and the retry writes nothing (scrape_count and zen_rejects are
-- not counted twice); while the first transaction is still in doubt, the insert waits
-- on the key's unique index entry until that transaction ends. Rows only matter for as
-- long as a retry can come, so they are pruned by age in bounded batches
-- (Upserter.prune_keys, query prune_upsert_keys, which uses the committed_at index).
CREATE TABLE zen_upsert_keys (
    key          uuid        PRIMARY KEY,
    committed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX zen_upsert_keys_committed_at_idx ON zen_upsert_keys (committed_at);

-- The database clock in epoch microseconds, the unit of zen_contacts.observed_us: the
-- observation time of records that carry none, and the reference of the future guard,
-- so that "newest observation wins" never depends on a writer's clock. The statement's
-- start (one value for every row of a statement), not the transaction's.
CREATE FUNCTION zen_clock_us_v1() RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (extract(epoch FROM statement_timestamp()) * 1000000)::bigint;
