-- Statements of the claimer (zenpipe.claim). Parameters are named; every value is bound.

-- name: claim_lock
-- First statement of a claim (zenpipe.claim.Claimer.claim):
--  * candidates: the first %(scan)s eligible rows in claim order, MATERIALIZED and
--    LIMITed before any lock is tried, so no plan can call the lock function on rows it
--    merely scans (the advisory-lock LIMIT trap). Pending rows come from
--    results_pending_idx in index order, expired leases from results_lease_idx.
--  * locked: try the two-key transaction lock over that fixed set; the outer LIMIT stops
--    the executor calling the function once %(batch)s locks are held.
-- The rows are taken by claim_take, a separate statement: its snapshot is newer than
-- every lock taken here, so a row another claimer committed before we locked it is
-- simply not eligible there. (Taking the rows in this same statement made its UPDATE
-- hit such rows through EvalPlanQual, which leaves a row lock on them until commit:
-- their owner's complete() then waited on us while we waited on it, a deadlock.)
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
       AND e.attempts < %(max_attempts)s
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
)
SELECT l.id FROM locked AS l;

-- name: claim_take
-- Second statement of a claim: take the locked rows that are still eligible, by primary
-- key, under one new fencing token. Its snapshot is newer than every lock we hold, so a
-- row another claim committed between the lock statement's snapshot and our lock is
-- simply not eligible here (never reached through EvalPlanQual, which would leave a row
-- lock on it). The caller compares the rows taken with the locks held and, when fewer,
-- rolls back (releasing every lock) and claims again, so a claim never holds more locks
-- than rows it returns.
WITH fence AS MATERIALIZED (
    SELECT nextval('results_claim_token_seq') AS token
)
UPDATE results AS r
SET status = 'claimed',
    claim_owner = %(owner)s,
    claim_token = f.token,
    lease_until = now() + make_interval(secs => %(lease)s),
    attempts = r.attempts + 1
FROM fence AS f
WHERE r.id = ANY (%(ids)s::bigint[])
  AND (r.status = 'pending'
       OR (r.status = 'claimed' AND r.lease_until < now() AND r.attempts < %(max_attempts)s))
RETURNING r.id, r.claim_token, r.attempts, r.link, r.data, r.priority, r.lease_until;

-- name: park_exhausted
-- Rows whose lease ran out max_attempts times were held by workers that died or hung on
-- them (a page that crashes the parser kills every worker that takes it): parked as
-- failed like rows that failed max_attempts times, so they stop taking workers down.
-- A range scan of results_lease_idx over the expired leases only; the lock-timeout-free
-- row locks are brief, and a claimer that loses the race just finds nothing to park.
UPDATE results AS r
SET status = 'failed',
    last_error = left(coalesce(r.last_error || '; ', '')
        || 'lease expired after attempt ' || r.attempts || ' (worker lost or stuck)', 2000),
    lease_until = NULL,
    claim_owner = NULL
WHERE r.status = 'claimed'
  AND r.lease_until < now()
  AND r.attempts >= %(max_attempts)s
RETURNING r.id;

-- name: complete
-- One statement per batch (a batch has one token): the rows are found by primary key
-- with r.id = ANY(ids) (an (id, token) join against unnest() was planned as a nested
-- loop rescanning the array per row once statistics said no row was claimed: 0.7 s
-- for 2,000 rows). A row counts as
-- completed when it is claimed under our token, or already done under our token (a retry
-- after a lost COMMIT acknowledgement), never when the token differs (fenced: the lease
-- ran out and another claim took the row). The caller compares the ids returned with
-- the batch and rolls back to its savepoint when any is missing.
UPDATE results AS r
SET status = 'done',
    done_at = coalesce(r.done_at, now()),
    lease_until = NULL,
    last_error = NULL
WHERE r.id = ANY (%(ids)s::bigint[])
  AND r.claim_token = %(token)s
  AND r.status IN ('claimed', 'done')
RETURNING r.id;

-- name: extend
-- Heartbeat: push the lease of every row of a batch in one statement (by primary key),
-- only where our
-- token still holds the row. The new deadline is computed by the server clock, like the
-- claim's, so servers with skewed clocks agree on expiry.
UPDATE results AS r
SET lease_until = now() + make_interval(secs => %(lease)s)
WHERE r.id = ANY (%(ids)s::bigint[])
  AND r.claim_token = %(token)s
  AND r.status = 'claimed'
RETURNING r.id, r.lease_until;

-- name: fail
-- Record a failure on the rows of one claim in one statement (by primary key): back to
-- pending while
-- attempts (claims so far) is below %(max_attempts)s, else parked as failed, which
-- neither claim index holds, so only requeue() brings it back.
UPDATE results AS r
SET status = CASE WHEN r.attempts >= %(max_attempts)s THEN 'failed' ELSE 'pending' END,
    last_error = %(error)s,
    lease_until = NULL,
    claim_owner = NULL
WHERE r.id = ANY (%(ids)s::bigint[])
  AND r.claim_token = %(token)s
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

-- name: savepoint
-- Around each claim attempt and each settle inside a caller's transaction: rolling back
-- to it undoes the statement and releases the advisory locks it took, and leaves the
-- caller's own work in place.
SAVEPOINT zen_claim;

-- name: release
RELEASE SAVEPOINT zen_claim;

-- name: rollback_to
ROLLBACK TO SAVEPOINT zen_claim;
