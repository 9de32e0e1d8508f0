-- Statements of the Citus helpers (zenpipe.citus): cluster set-up and shard metadata.

-- name: create_extension
-- On every node, before the coordinator registers it.
CREATE EXTENSION IF NOT EXISTS citus;

-- name: set_coordinator_host
-- The coordinator joins its own metadata (group 0), so local tables such as results
-- stay plain PostgreSQL tables on it and the workers can reach it by this address.
SELECT citus_set_coordinator_host(%s, %s);

-- name: add_node
SELECT citus_add_node(%s, %s);

-- name: shard_map
-- The shards of one hash-distributed table with the node of each primary placement,
-- in hash-range order (zenpipe.citus.ShardMap). Catalog reads on the coordinator only.
SELECT s.shardid, s.shardminvalue::integer, s.shardmaxvalue::integer, n.nodename, n.nodeport
FROM pg_dist_shard AS s
JOIN pg_dist_partition AS d ON d.logicalrelid = s.logicalrelid AND d.partmethod = 'h'
JOIN pg_dist_placement AS p ON p.shardid = s.shardid
JOIN pg_dist_node AS n ON n.groupid = p.groupid AND n.noderole = 'primary' AND n.isactive
WHERE s.logicalrelid = to_regclass(%(table)s)
ORDER BY s.shardminvalue::integer;
