-- zen_fail_v1: Claimer.fail_each in its own transaction, all or nothing in one statement,
-- so that it needs one round trip (autocommit, or one pipeline behind PgBouncer) instead
-- of BEGIN, UPDATE, COMMIT, like zen_complete_v1 (migration 0016) for completions.
--
-- Why (issue 10): a worker recorded each distinct error of a batch with a fail() of its
-- own, 3 round trips each; a batch of 100 rows failing with 100 different messages
-- took 305 round trips (tests/test_round_trips.py). The errors now travel as an array,
-- one per id: sql/queries/claim.sql's fail calls this function, in its own transaction
-- or in a caller's.
--
-- Raises ZC002 (naming the rows no longer held) and so applies nothing unless every row
-- is claimed under our claim, or already released by it (a retry after a lost
-- acknowledgement: matched again and left as it is).
CREATE FUNCTION zen_fail_v1(p_ids bigint[], p_errors text[], p_token bigint, p_claim_id uuid,
                            p_max_attempts integer)
    RETURNS bigint[]
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    v_done bigint[];
BEGIN
    WITH d AS (
        UPDATE results AS r
        SET status = CASE WHEN r.status <> 'claimed' THEN r.status
                          WHEN r.attempts >= coalesce(p_max_attempts, zen_max_attempts_v1()) THEN 'failed'
                          ELSE 'retry' END,
            not_before = CASE WHEN r.status <> 'claimed' THEN r.not_before
                              ELSE statement_timestamp()
                                   + make_interval(secs => zen_retry_delay_v1(r.attempts)) END,
            last_error = CASE WHEN r.status = 'claimed' THEN f.error ELSE r.last_error END,
            lease_until = NULL,
            settling = false,
            claim_owner = NULL
        FROM unnest(p_ids, p_errors) AS f (id, error)
        WHERE r.id = f.id
          AND r.claim_token = p_token
          AND r.claim_id = p_claim_id
          AND r.status IN ('claimed', 'pending', 'failed', 'retry')
        RETURNING r.id
    )
    SELECT coalesce(array_agg(d.id), '{}') INTO v_done FROM d;
    IF cardinality(v_done) < cardinality(p_ids) THEN
        RAISE EXCEPTION USING ERRCODE = 'ZC002', MESSAGE = 'zenpipe: stale claim (fail)',
            DETAIL = array_to_string(ARRAY(SELECT unnest(p_ids) EXCEPT SELECT unnest(v_done)
                                           ORDER BY 1), ',');
    END IF;
    RETURN v_done;
END
$$;
