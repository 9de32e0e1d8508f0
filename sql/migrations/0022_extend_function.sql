-- zen_extend_v1: Claimer.extend (the heartbeat, and the settling mark) all or nothing in
-- one statement, so that in its own transaction it needs one round trip (autocommit, or
-- one pipeline behind PgBouncer) instead of BEGIN, UPDATE, COMMIT.
--
-- Why (issue 10): a worker heartbeats every batch it enriches, every third of the lease,
-- and each heartbeat took 3 round trips (tests/test_round_trips.py); the settling mark's
-- zen_extend_settling_v1 (migration 0016) already took one. This is the same statement
-- with the settling flag a parameter; sql/queries/claim.sql's extend and extend_settling
-- both call it. zen_extend_settling_v1 stays for clients of the previous release, as a
-- call of it (below).
--
-- zen_stale_v1 is the one place that raises ZC002 (the rows of p_ids missing from
-- p_done, ascending, in the DETAIL; the operation in the message, which
-- zenpipe.claim.stale_from reads), for this and later settle functions.
CREATE FUNCTION zen_stale_v1(p_operation text, p_ids bigint[], p_done bigint[])
    RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    AS $$
BEGIN
    IF cardinality(p_done) < cardinality(p_ids) THEN
        RAISE EXCEPTION USING ERRCODE = 'ZC002',
            MESSAGE = format('zenpipe: stale claim (%s)', p_operation),
            DETAIL = array_to_string(ARRAY(SELECT unnest(p_ids) EXCEPT SELECT unnest(p_done)
                                           ORDER BY 1), ',');
    END IF;
END
$$;

CREATE FUNCTION zen_extend_v1(p_ids bigint[], p_token bigint, p_claim_id uuid,
                              p_lease double precision, p_settling boolean)
    RETURNS bigint[]
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    v_done bigint[];
BEGIN
    WITH d AS (
        UPDATE results AS r
        SET lease_until = statement_timestamp() + make_interval(secs => p_lease),
            settling = r.settling OR p_settling
        WHERE r.id = ANY (p_ids)
          AND r.claim_token = p_token
          AND r.claim_id = p_claim_id
          AND r.status = 'claimed'
        RETURNING r.id
    )
    SELECT coalesce(array_agg(d.id), '{}') INTO v_done FROM d;
    PERFORM zen_stale_v1('extend', p_ids, v_done);
    RETURN v_done;
END
$$;

-- The previous release's settling mark, now the same function: one definition in effect.
CREATE OR REPLACE FUNCTION zen_extend_settling_v1(p_ids bigint[], p_token bigint,
                                                  p_claim_id uuid, p_lease double precision)
    RETURNS bigint[]
    LANGUAGE sql VOLATILE
    AS $$
SELECT zen_extend_v1(p_ids, p_token, p_claim_id, p_lease, true)
$$;
