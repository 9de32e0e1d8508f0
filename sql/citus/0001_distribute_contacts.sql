-- Citus variant, step 1: zen_contacts distributed over the workers; every other table
-- stays a plain table on the coordinator. Applied by zenpipe.schema after the shared
-- migrations (sql/migrations) on a Citus coordinator, recorded in zen_schema_migrations
-- under version 900000 + N (see docs/scaling.md). The shared migrations run first and
-- unchanged: this file only states what differs on Citus.
--
-- Distribution column: source_link. Citus hashes a text column with hashtext(), the very
-- value stored in partition_key, so a row's shard is the shard whose hash range holds its
-- partition_key (zenpipe.citus.ShardMap predicts it in Python), and a writer that sorts
-- a batch by partition_key has it grouped by shard already. Shard ranges split the int4
-- range evenly, so shards are as even as the links' hashes (32 shards, like the 32
-- partitions; each shard is itself hash-partitioned by partition_key).
--
-- results (claims), zen_settings, zen_servers, zen_jobs, zen_rejects, zen_upsert_keys and
-- the statistics stay on the coordinator as local tables: a claim's advisory locks live
-- on the node that takes them, so the claim statements (sql/queries/claim.sql) must run
-- on the node that holds results, in their own statements; they never touch zen_contacts.

-- Citus refuses triggers on distributed tables. The writer sets updated_at itself
-- (merge_round: EXCLUDED.updated_at), so nothing depended on this one; other writers on
-- Citus must set updated_at themselves.
DROP TRIGGER zen_contacts_touch_updated_at ON zen_contacts;

-- A distributed table cannot reference a coordinator-local one. The writer checks every
-- source_id of a batch against results in one statement before the merge (begin_write:
-- unknown_source_id rejects), which is the check the key made; what is lost is ON DELETE
-- SET NULL: deleting a results row leaves its contacts' source_id pointing nowhere. The
-- partial index only served that cascade's lookups.
ALTER TABLE zen_contacts DROP CONSTRAINT zen_contacts_source_id_fkey;
DROP INDEX idx_zc_source_id;

-- Every unique constraint of a distributed table must contain the distribution column:
-- (id, partition_key) cannot be enforced across shards. The row's key becomes the
-- upsert's conflict target (source_link, partition_key), now the primary key (shard moves
-- replicate by it); id stays an identity column, unique because one sequence (its
-- distributed ranges) hands it out, no longer backed by an index.
ALTER TABLE zen_contacts DROP CONSTRAINT zen_contacts_pkey;
ALTER TABLE zen_contacts DROP CONSTRAINT zen_contacts_source_link_key;
ALTER TABLE zen_contacts
    ADD CONSTRAINT zen_contacts_pkey PRIMARY KEY (source_link, partition_key);

-- 32 hash shards by source_link, spread over the workers (existing rows are copied).
SELECT create_distributed_table('zen_contacts', 'source_link', shard_count => 32);

-- The functions the merge's DO UPDATE SET runs on the shards, and the partition key
-- function for ad-hoc queries, must exist on every worker. Citus propagates functions
-- created while it is installed; these calls also cover a database where zenpipe's
-- schema was created before the extension (a notice says when one is already there).
SELECT create_distributed_function('zen_pick_v1(anyelement, bigint, anyelement, bigint)');
SELECT create_distributed_function('zen_array_union_v1(text[], text[])');
SELECT create_distributed_function('zen_partition_key_v1(text)');
