-- Statements of the claimer (zenpipe.claim). Parameters are named; every value is bound.

-- name: claim
-- One statement, run inside a savepoint (zenpipe.claim.Claimer.claim):
--  * candidates: the first %(scan)s eligible rows in claim order, MATERIALIZED and
--    LIMITed before any lock is tried, so no plan can call the lock function on rows it
--    merely scans (the advisory-lock LIMIT trap). Pending rows come from
--    results_pending_idx in index order, expired leases from results_lease_idx.
--  * locked: try the two-key transaction lock over that fixed set; the outer LIMIT stops
--    the executor calling the function once %(batch)s locks are held.
--  * claimed: re-check eligibility on the locked rows. A row another claimer committed
--    after this statement's snapshot was taken is locked here but skipped by the
--    re-check (EvalPlanQual sees the new version); the caller then rolls back to its
--    savepoint (releasing every lock taken here) and runs the statement again.
--  * the final row always exists and carries the number of locks taken, so the caller
--    can compare it with the rows claimed.
WITH candidates AS MATERIALIZED (
    (SELECT p.id, p.priority
     FROM results AS p
     WHERE p.status = 'pending'
     ORDER BY p.priority DESC, p.id
     LIMIT %(scan)s)
    UNION ALL
    (SELECT e.id, e.priority
     FROM results AS e
     WHERE e.status = 'claimed' AND e.lease_until < now()
     ORDER BY e.priority DESC, e.id
     LIMIT %(scan)s)
    ORDER BY priority DESC, id
    LIMIT %(scan)s
),
locked AS MATERIALIZED (
    SELECT c.id
    FROM candidates AS c
    WHERE pg_try_advisory_xact_lock(%(namespace)s, zen_claim_key_v1(c.id))
    LIMIT %(batch)s
),
fence AS MATERIALIZED (
    SELECT nextval('results_claim_token_seq') AS token
),
claimed AS (
    UPDATE results AS r
    SET status = 'claimed',
        claim_owner = %(owner)s,
        claim_token = f.token,
        lease_until = now() + make_interval(secs => %(lease)s),
        attempts = r.attempts + 1
    FROM locked AS l, fence AS f
    WHERE r.id = l.id
      AND (r.status = 'pending' OR (r.status = 'claimed' AND r.lease_until < now()))
    RETURNING r.id, r.claim_token, r.attempts, r.link, r.data, r.priority, r.lease_until
)
SELECT (SELECT count(*) FROM locked) AS locked,
       c.id, c.claim_token, c.attempts, c.link, c.data, c.priority, c.lease_until
FROM (VALUES (1)) AS one (x)
LEFT JOIN claimed AS c ON true;

-- name: complete
-- One statement per batch: the (id, token) pairs arrive as two arrays. A row counts as
-- completed when it is claimed under our token, or already done under our token (a retry
-- after a lost COMMIT acknowledgement), never when the token differs (fenced: the lease
-- ran out and another claim took the row). The caller compares the ids returned with
-- the batch and rolls back to its savepoint when any is missing.
UPDATE results AS r
SET status = 'done',
    done_at = coalesce(r.done_at, now()),
    lease_until = NULL,
    last_error = NULL
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS b (id, token)
WHERE r.id = b.id
  AND r.claim_token = b.token
  AND r.status IN ('claimed', 'done')
RETURNING r.id;

-- name: extend
-- Heartbeat: push the lease of every row of a batch in one statement, only where our
-- token still holds the row. The new deadline is computed by the server clock, like the
-- claim's, so servers with skewed clocks agree on expiry.
UPDATE results AS r
SET lease_until = now() + make_interval(secs => %(lease)s)
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS b (id, token)
WHERE r.id = b.id
  AND r.claim_token = b.token
  AND r.status = 'claimed'
RETURNING r.id, r.lease_until;

-- name: fail
-- Record a failure on every row of a batch in one statement: back to pending while
-- attempts (claims so far) is below %(max_attempts)s, else parked as failed, which
-- neither claim index holds, so only requeue() brings it back.
UPDATE results AS r
SET status = CASE WHEN r.attempts >= %(max_attempts)s THEN 'failed' ELSE 'pending' END,
    last_error = %(error)s,
    lease_until = NULL,
    claim_owner = NULL
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS b (id, token)
WHERE r.id = b.id
  AND r.claim_token = b.token
  AND r.status = 'claimed'
RETURNING r.id, r.status;

-- name: requeue_failed
-- Parked rows back to pending with a fresh attempt budget; results_failed_idx finds
-- them. last_error is kept for the post-mortem.
UPDATE results AS r
SET status = 'pending', attempts = 0, lease_until = NULL, claim_owner = NULL
WHERE r.status = 'failed';

-- name: requeue_failed_ids
-- The same, limited to the ids given (primary key lookups).
UPDATE results AS r
SET status = 'pending', attempts = 0, lease_until = NULL, claim_owner = NULL
WHERE r.id = ANY(%(ids)s::bigint[]) AND r.status = 'failed';

-- name: requeue_ids
-- Any non-pending rows given back to pending (re-scrape done rows, free claimed ones).
-- claim_token is cleared, so a worker still holding one of these rows is fenced off.
UPDATE results AS r
SET status = 'pending', attempts = 0, lease_until = NULL, claim_owner = NULL,
    claim_token = NULL, done_at = NULL
WHERE r.id = ANY(%(ids)s::bigint[]) AND r.status <> 'pending';

-- name: requeue_all
-- Every non-pending row back to pending (full re-run), fencing off live claims.
UPDATE results AS r
SET status = 'pending', attempts = 0, lease_until = NULL, claim_owner = NULL,
    claim_token = NULL, done_at = NULL
WHERE r.status <> 'pending';
