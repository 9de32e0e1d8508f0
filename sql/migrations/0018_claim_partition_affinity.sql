-- Partition-affine claims (issue 10/11): a 100-row batch in priority-then-age order
-- holds links of about 31 of zen_contacts' 32 leaves, and the merge pays for every leaf
-- it routes into: INSERT ... ON CONFLICT opens the leaf's 15 indexes, maps its arbiter
-- and builds its ON CONFLICT projection once per statement and leaf. Measured with the
-- bench's data, 100-row merges of fresh links on a durable PostgreSQL 15: 220 us of
-- server time per row when the batch spans 31 leaves, 91 us when it spans one.
--
-- zen_partition_of_v1(link) is the leaf PostgreSQL routes a link's contact to (the
-- remainder of hash partitioning's hashint4extended(hashtext(link), seed) combined into
-- the row hash, modulo 32; zenpipe.keys.partition_of is the same in Python), and
-- zen_claim_v2 is zen_claim_v1 with p_affine: when true, the window of candidates (the
-- same window: expired, else pending and due retries, p_scan rows in priority-then-age
-- order, fixed before any lock is tried) is tried priority by priority as before and,
-- within a priority, partition by partition, the partition of its oldest candidate
-- first, each partition's rows in window order. The oldest claimable row of the highest
-- priority is still in the next batch; rows of the same leaf further back in the window
-- come with it, ahead of older rows of other leaves. With
-- p_affine false the order is the window's, and the claim is zen_claim_v1's.
-- zen_claim_v1 stays for workers of the previous release during a rolling upgrade.
-- 8816678312871386365 is HASH_PARTITION_SEED; hash_combine64(0, h) adds
-- 0x49A0F4DD15E5A8E3, which is 3 modulo 32, and 2^64 is 0 modulo 32, so the unsigned
-- row hash modulo 32 is (h mod 32 + 3) mod 32 for the signed h SQL returns.
CREATE FUNCTION zen_partition_of_v1(p_link text) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ((hashint4extended(hashtext(p_link), 8816678312871386365) % 32 + 32 + 3) % 32)::integer;

CREATE FUNCTION zen_claim_v2(
    p_owner text,
    p_claim_id uuid,
    p_batch integer,
    p_scan integer,
    p_lease double precision,
    p_max_attempts integer,
    p_namespace integer,
    p_windows integer,
    p_tries integer,
    p_exact boolean,
    p_affine boolean,
    OUT o_ids bigint[],
    OUT o_tokens bigint[],
    OUT o_attempts integer[],
    OUT o_links text[],
    OUT o_data jsonb[],
    OUT o_priorities integer[],
    OUT o_leases timestamptz[],
    OUT o_contended boolean,
    OUT o_retry_in double precision,
    OUT o_races integer)
    LANGUAGE plpgsql VOLATILE
    SET enable_bitmapscan = off  -- 0017: the window, never the backlog, before ANALYZE
    AS $$
DECLARE
    v_source text;
    v_after_priority integer;
    v_after_id bigint;
    v_locked bigint[];
    v_group integer;
    v_expired boolean;
    v_seen bigint;
    v_last_priority integer;
    v_last_id bigint;
    v_start_priority integer;
    v_start_id bigint;
BEGIN
    o_races := 0;
    FOR v_try IN 1 .. p_tries LOOP
        BEGIN
            -- after a raced attempt the next one starts past the window other claimers
            -- were just taking (claimers then spread over the backlog instead of all
            -- racing for its head); a new claim starts at the head again
            v_source := CASE WHEN v_start_id IS NULL THEN 'auto' ELSE 'pending' END;
            v_after_priority := v_start_priority;
            v_after_id := v_start_id;
            v_locked := '{}';
            o_contended := false;
            FOR v_window IN 1 .. p_windows LOOP
                -- claim_lock
                WITH expired AS MATERIALIZED (
                    SELECT e.id, e.priority, e.expiries + (NOT e.settling)::integer AS expiries,
                           CASE WHEN p_affine THEN zen_partition_of_v1(e.link) END AS part
                    FROM results AS e
                    WHERE v_source = 'auto'
                      AND e.status = 'claimed' AND e.lease_until < statement_timestamp()
                      AND NOT (coalesce(e.claim_size, 1) = 1 AND NOT e.settling
                               AND e.attempts >= coalesce(p_max_attempts, zen_max_attempts_v1()))
                    ORDER BY e.priority DESC, e.id
                    LIMIT p_scan
                ),
                scanned AS MATERIALIZED (
                    SELECT x.id, x.priority, x.part, 0 AS src FROM expired AS x
                    UNION ALL
                    (SELECT q.id, q.priority, q.part, 1
                     FROM ((SELECT p.id, p.priority,
                                   CASE WHEN p_affine THEN zen_partition_of_v1(p.link) END AS part
                            FROM results AS p
                            WHERE p.status = 'pending'
                              AND NOT EXISTS (SELECT FROM expired)
                              AND (v_after_priority IS NULL
                                   OR p.priority < v_after_priority
                                   OR (p.priority = v_after_priority AND p.id > v_after_id))
                            ORDER BY p.priority DESC, p.id
                            LIMIT p_scan)
                           UNION ALL
                           (SELECT t.id, t.priority,
                                   CASE WHEN p_affine THEN zen_partition_of_v1(t.link) END AS part
                            FROM results AS t
                            WHERE t.status = 'retry' AND t.not_before <= statement_timestamp()
                              AND NOT EXISTS (SELECT FROM expired)
                              AND (v_after_priority IS NULL
                                   OR t.priority < v_after_priority
                                   OR (t.priority = v_after_priority AND t.id > v_after_id))
                            ORDER BY t.priority DESC, t.id
                            LIMIT p_scan)) AS q
                     ORDER BY q.priority DESC, q.id
                     LIMIT p_scan)
                    LIMIT p_scan
                ),
                candidates AS MATERIALIZED (
                    SELECT s.id, s.priority
                    FROM (SELECT w.id, w.priority, w.part, w.src,
                                 row_number() OVER (ORDER BY w.src, w.priority DESC, w.id) AS pos
                          FROM scanned AS w) AS s
                    ORDER BY s.src, s.priority DESC, min(s.pos) OVER (PARTITION BY s.src, s.priority, s.part),
                             s.pos
                ),
                grp AS MATERIALIZED (
                    SELECT CASE WHEN max(x.expiries) >= 2 THEN 1
                                WHEN max(x.expiries) = 1 THEN greatest(1, p_batch / 2)
                                ELSE p_batch END AS n
                    FROM expired AS x
                ),
                locked AS MATERIALIZED (
                    SELECT c.id
                    FROM candidates AS c
                    WHERE pg_try_advisory_xact_lock(p_namespace, zen_claim_key_v1(c.id))
                    LIMIT (SELECT g.n FROM grp AS g)
                )
                SELECT (SELECT coalesce(array_agg(l.id), '{}') FROM locked AS l),
                       (SELECT g.n FROM grp AS g),
                       EXISTS (SELECT FROM expired),
                       (SELECT count(*) FROM candidates),
                       last.priority, last.id,
                       (SELECT extract(epoch FROM min(t.not_before) - statement_timestamp())::float8
                        FROM results AS t WHERE t.status = 'retry')
                INTO v_locked, v_group, v_expired, v_seen, v_last_priority, v_last_id, o_retry_in
                FROM (SELECT NULL) AS one
                LEFT JOIN LATERAL (
                    SELECT c.priority, c.id FROM candidates AS c ORDER BY c.priority, c.id DESC LIMIT 1
                ) AS last ON true;
                IF o_retry_in IS NOT NULL THEN
                    o_retry_in := greatest(0.0, o_retry_in);
                END IF;
                EXIT WHEN cardinality(v_locked) > 0 OR v_seen = 0;
                -- candidates were there, every one locked by someone else
                o_contended := true;
                IF v_expired THEN  -- the expired rows are being taken: look at pending ones
                    v_source := 'pending';
                    v_after_priority := NULL;
                    v_after_id := NULL;
                ELSIF v_seen < p_scan THEN  -- nothing behind this window
                    EXIT;
                ELSE
                    v_source := 'pending';
                    v_after_priority := v_last_priority;
                    v_after_id := v_last_id;
                END IF;
            END LOOP;
            IF cardinality(v_locked) = 0 THEN
                o_ids := '{}';
                RETURN;
            END IF;
            -- claim_take: a new statement, a snapshot newer than every lock held
            WITH fence AS MATERIALIZED (
                SELECT nextval('results_claim_token_seq') AS token
            ),
            took AS (
                UPDATE results AS r
                SET status = 'claimed',
                    claim_owner = p_owner,
                    claim_token = f.token,
                    claim_id = p_claim_id,
                    claim_size = cardinality(v_locked),
                    lease_until = statement_timestamp() + make_interval(secs => p_lease),
                    attempts = r.attempts + 1,
                    expiries = r.expiries + (r.status = 'claimed' AND NOT r.settling)::integer,
                    settling = false,
                    not_before = NULL
                FROM fence AS f
                WHERE r.id = ANY (v_locked)
                  AND (r.status = 'pending'
                       OR (r.status = 'retry' AND r.not_before <= statement_timestamp())
                       OR (r.status = 'claimed' AND r.lease_until < statement_timestamp()
                           AND NOT (coalesce(r.claim_size, 1) = 1 AND NOT r.settling
                                    AND r.attempts >= coalesce(p_max_attempts, zen_max_attempts_v1()))))
                RETURNING r.id, r.claim_token, r.attempts, r.link, r.data, r.priority, r.lease_until
            )
            SELECT array_agg(t.id ORDER BY t.priority DESC, t.id),
                   array_agg(t.claim_token ORDER BY t.priority DESC, t.id),
                   array_agg(t.attempts ORDER BY t.priority DESC, t.id),
                   array_agg(t.link ORDER BY t.priority DESC, t.id),
                   array_agg(t.data ORDER BY t.priority DESC, t.id),
                   array_agg(t.priority::integer ORDER BY t.priority DESC, t.id),
                   array_agg(t.lease_until ORDER BY t.priority DESC, t.id)
            INTO o_ids, o_tokens, o_attempts, o_links, o_data, o_priorities, o_leases
            FROM took AS t;
            IF coalesce(cardinality(o_ids), 0) = cardinality(v_locked)
               OR (NOT p_exact AND o_ids IS NOT NULL) THEN
                o_contended := false;
                RETURN;
            END IF;
            -- a locked row was claimed (or settled) by a transaction that committed after
            -- the lock statement's snapshot: undo this attempt, locks included
            RAISE EXCEPTION USING ERRCODE = 'ZC001', MESSAGE = 'zenpipe claim raced';
        EXCEPTION WHEN SQLSTATE 'ZC001' THEN
            o_races := o_races + 1;
            IF NOT p_exact AND NOT coalesce(v_expired, false) AND v_last_id IS NOT NULL THEN
                v_start_priority := v_last_priority;
                v_start_id := v_last_id;
            END IF;
        END;
    END LOOP;
    -- kept racing with other claimers: an empty, contended batch
    o_ids := '{}';
    o_tokens := NULL;
    o_attempts := NULL;
    o_links := NULL;
    o_data := NULL;
    o_priorities := NULL;
    o_leases := NULL;
    o_contended := true;
    o_retry_in := NULL;
END
$$;
