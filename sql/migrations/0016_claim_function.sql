-- A claim in one round trip (issue 10): zen_claim_v1 runs the claim's two statements
-- (sql/queries/claim.sql: claim_lock, then claim_take) inside the server, with the window
-- walk and the race retry that zenpipe.claim used to drive from Python (up to 4 + 2
-- round trips per claim, and each statement planned afresh behind PgBouncer; a plpgsql
-- function keeps its plans for the session, whatever the pooler).
--
-- Why it is still two statements: each statement of a VOLATILE plpgsql function takes
-- its own READ COMMITTED snapshot, so the take sees a snapshot newer than every lock the
-- lock statement took, and never reaches a row another claim committed in between
-- through EvalPlanQual (which would keep a row lock on it: the deadlock of
-- docs/claiming.md). When the take gets fewer rows than were locked (the snapshot race),
-- the attempt is rolled back to the block's implicit savepoint, which releases its
-- advisory locks and undoes its take, and the claim starts again: a claim never holds
-- more locks than rows it returns. Runs inside a caller's transaction as well (no
-- savepoint of the caller's is needed). With p_exact false (a claim in its own
-- transaction, which commits as soon as the function returns, so no lock outlives the
-- call) a raced attempt that still took rows keeps them instead: the rows it missed were
-- taken by the other claim, and redoing the attempt would only add dead row versions.
-- An attempt that took nothing is retried either way.
--
-- Citus: results is a coordinator-local table and the advisory locks must be taken on
-- the coordinator: claims connect there, and the function never touches zen_contacts.
--
-- The two statements below are claim_lock and claim_take of sql/queries/claim.sql with
-- the parameters as variables (tests/test_claim.py pins claim_lock's plan;
-- tests/test_round_trips.py checks that the function's text agrees with the file).
CREATE FUNCTION zen_claim_v1(
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
                    SELECT e.id, e.priority, e.expiries + (NOT e.settling)::integer AS expiries
                    FROM results AS e
                    WHERE v_source = 'auto'
                      AND e.status = 'claimed' AND e.lease_until < statement_timestamp()
                      AND NOT (coalesce(e.claim_size, 1) = 1 AND NOT e.settling
                               AND e.attempts >= coalesce(p_max_attempts, zen_max_attempts_v1()))
                    ORDER BY e.priority DESC, e.id
                    LIMIT p_scan
                ),
                candidates AS MATERIALIZED (
                    SELECT x.id, x.priority FROM expired AS x
                    UNION ALL
                    (SELECT q.id, q.priority
                     FROM ((SELECT p.id, p.priority
                            FROM results AS p
                            WHERE p.status = 'pending'
                              AND NOT EXISTS (SELECT FROM expired)
                              AND (v_after_priority IS NULL
                                   OR p.priority < v_after_priority
                                   OR (p.priority = v_after_priority AND p.id > v_after_id))
                            ORDER BY p.priority DESC, p.id
                            LIMIT p_scan)
                           UNION ALL
                           (SELECT t.id, t.priority
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

-- complete and extend(settling) in one statement each, all or nothing, one pass over the
-- rows (issue 10): the fenced UPDATE of claim.sql (complete; extend with settling), and
-- when any row of the batch is no longer held under the claim the function raises
-- SQLSTATE ZC002 with the ids missing in DETAIL, so the statement, its own transaction in
-- autocommit or a step of a pipeline, applies nothing (a lock-then-update form locked
-- every row first: two row versions' worth of work per row).
CREATE FUNCTION zen_complete_v1(p_ids bigint[], p_token bigint, p_claim_id uuid)
    RETURNS bigint[]
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    v_done bigint[];
BEGIN
    WITH d AS (
        UPDATE results AS r
        SET status = 'done',
            done_at = coalesce(r.done_at, statement_timestamp()),
            lease_until = NULL,
            settling = false,
            last_error = NULL
        WHERE r.id = ANY (p_ids)
          AND r.claim_token = p_token
          AND r.claim_id = p_claim_id
          AND r.status IN ('claimed', 'done')
        RETURNING r.id
    )
    SELECT coalesce(array_agg(d.id), '{}') INTO v_done FROM d;
    IF cardinality(v_done) < cardinality(p_ids) THEN
        RAISE EXCEPTION USING ERRCODE = 'ZC002', MESSAGE = 'zenpipe: stale claim (complete)',
            DETAIL = array_to_string(ARRAY(SELECT unnest(p_ids) EXCEPT SELECT unnest(v_done)
                                           ORDER BY 1), ',');
    END IF;
    RETURN v_done;
END
$$;

CREATE FUNCTION zen_extend_settling_v1(p_ids bigint[], p_token bigint, p_claim_id uuid,
                                       p_lease double precision)
    RETURNS bigint[]
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    v_done bigint[];
BEGIN
    WITH d AS (
        UPDATE results AS r
        SET lease_until = statement_timestamp() + make_interval(secs => p_lease),
            settling = true
        WHERE r.id = ANY (p_ids)
          AND r.claim_token = p_token
          AND r.claim_id = p_claim_id
          AND r.status = 'claimed'
        RETURNING r.id
    )
    SELECT coalesce(array_agg(d.id), '{}') INTO v_done FROM d;
    IF cardinality(v_done) < cardinality(p_ids) THEN
        RAISE EXCEPTION USING ERRCODE = 'ZC002', MESSAGE = 'zenpipe: stale claim (extend)',
            DETAIL = array_to_string(ARRAY(SELECT unnest(p_ids) EXCEPT SELECT unnest(v_done)
                                           ORDER BY 1), ',');
    END IF;
    RETURN v_done;
END
$$;
