-- Statements of the claimer (zenpipe.claim). Parameters are named; every value is bound.

-- name: claim
-- A whole claim, one round trip: zen_claim_v4 (migrations 0016, 0018, 0019, 0020, 0024) runs claim_lock, window
-- after window, then claim_take, each with its own snapshot, and retries a raced attempt
-- itself (rolled back to the block's savepoint, locks released). One row back: the
-- claimed rows as arrays in priority-then-age order, whether an empty batch came back
-- empty because every candidate was being taken (contended), when the next failed row
-- is due, and how many attempts raced. %(exact)s: inside a caller's transaction, never
-- return with more locks than rows (retry a raced attempt); in its own transaction a
-- raced attempt keeps the rows it took (the commit right after releases every lock).
SELECT z.o_ids, z.o_tokens, z.o_attempts, z.o_links, z.o_data, z.o_priorities, z.o_leases,
       z.o_contended, z.o_retry_in, z.o_races
FROM zen_claim_v4(%(owner)s, %(claim_id)s, %(batch)s, %(scan)s, %(lease)s,
                  %(max_attempts)s, %(namespace)s, %(windows)s, %(tries)s,
                  %(exact)s, %(affine)s) AS z;

-- name: claim_lock
-- First statement of a claim (run by zen_claim_v4, which spells it with variables for
-- parameters: keep the two the same), one window of candidates:
--  * expired: claimed rows whose lease ran out (results_lease_idx range scan), unless
--    exhausted (left for park_exhausted). Expired rows are claimed before pending ones
--    and never mixed with them, in groups that shrink with their expiries: the whole
--    batch, half of it after one expiry, alone after two, so a row that kills its
--    worker ends up alone and only it is parked.
--  * scanned: the window, MATERIALIZED and LIMITed before any lock is tried, so no
--    plan can call the lock function on rows it merely scans (the advisory-lock LIMIT
--    trap). Pending rows come from results_pending_idx in index order, after the
--    keyset (after_priority, after_id) of the previous window: a window whose every row
--    is locked by other claimers is looked past, not mistaken for "no work".
--  * candidates: the window's rows in the order the locks are tried: the window's own
--    order, or with %(affine)s, within each priority, partition by partition of
--    zen_contacts (zen_partition_of_v1 of the link), the partition of the oldest row
--    first (migration 0018: a batch's writes then touch few leaves). Branches gated by
--    %(affine)s (migration 0020): the affine order's windows and sorts run only for an
--    affine claim. The plain order needs no sort (migration 0024): PostgreSQL reads a
--    CTE lazily, in the order its rows were made, so the pending scan stops once the
--    batch is locked (test_claim.py pins the order and the rows read). Rows another
--    transaction is taking (busy: the visible version's xmax is a transaction running
--    when this statement's snapshot was taken) come after all the others (migration
--    0019): a claim that committed since that snapshot released their locks, and
--    claim_take would find them gone (a race).
--  * locked: try the two-key transaction lock over that fixed set; the LIMIT stops the
--    executor calling the function once the group's size of locks is held.
-- One row back: the ids locked, the source of the window, how many candidates it had
-- (a full window may have more behind it) and its last key (the next window's keyset),
-- those two only when no lock was held, and when the next row in backoff is due.
-- Times are statement_timestamp(): now() is the start of a caller's transaction, which
-- may be older than a lease.
WITH expired AS MATERIALIZED (
    SELECT e.id, e.priority, e.expiries + (NOT e.settling)::integer AS expiries,
           e.link, e.xmax
    FROM results AS e
    WHERE %(source)s = 'auto'
      AND e.status = 'claimed' AND e.lease_until < statement_timestamp()
      AND NOT (coalesce(e.claim_size, 1) = 1 AND NOT e.settling
               AND e.attempts >= coalesce(%(max_attempts)s::integer, zen_max_attempts_v1()))
    ORDER BY e.priority DESC, e.id
    LIMIT %(scan)s
),
scanned AS MATERIALIZED (
    SELECT x.id, x.priority, x.link, x.xmax, 0 AS src FROM expired AS x
    UNION ALL
    (SELECT q.id, q.priority, q.link, q.xmax, 1
     FROM ((SELECT p.id, p.priority, p.link, p.xmax
            FROM results AS p
            WHERE p.status = 'pending'
              AND NOT EXISTS (SELECT FROM expired)
              AND (%(after_priority)s::integer IS NULL
                   OR p.priority < %(after_priority)s::integer
                   OR (p.priority = %(after_priority)s::integer AND p.id > %(after_id)s::bigint))
            ORDER BY p.priority DESC, p.id
            LIMIT %(scan)s)
           UNION ALL
           -- failed rows whose backoff is over (results_retry_idx): few at a time
           (SELECT t.id, t.priority, t.link, t.xmax
            FROM results AS t
            WHERE t.status = 'retry' AND t.not_before <= statement_timestamp()
              AND NOT EXISTS (SELECT FROM expired)
              AND (%(after_priority)s::integer IS NULL
                   OR t.priority < %(after_priority)s::integer
                   OR (t.priority = %(after_priority)s::integer AND t.id > %(after_id)s::bigint))
            ORDER BY t.priority DESC, t.id
            LIMIT %(scan)s)) AS q
     ORDER BY q.priority DESC, q.id
     LIMIT %(scan)s)
    LIMIT %(scan)s
),
candidates AS MATERIALIZED (
    -- plain: the window's own order, rows not busy first, no sort (the
    -- lazily read CTEs stop at the batch)
    (SELECT w.id, w.priority
     FROM scanned AS w
     WHERE NOT %(affine)s::boolean
       AND (age(w.xmax) <= (SELECT age(xid(pg_snapshot_xmin(pg_current_snapshot()))))) IS NOT TRUE)
    UNION ALL
    (SELECT w.id, w.priority
     FROM scanned AS w
     WHERE NOT %(affine)s::boolean
       AND (age(w.xmax) <= (SELECT age(xid(pg_snapshot_xmin(pg_current_snapshot()))))) IS TRUE)
    UNION ALL
    (SELECT s.id, s.priority
     FROM (SELECT w.id, w.priority, w.src,
                  zen_partition_of_v1(w.link) AS part,
                  age(w.xmax) <= (SELECT age(xid(pg_snapshot_xmin(pg_current_snapshot())))) AS busy,
                  row_number() OVER (ORDER BY w.src, w.priority DESC, w.id) AS pos
           FROM scanned AS w) AS s
     WHERE %(affine)s::boolean
     ORDER BY s.src, s.busy, s.priority DESC,
              min(s.pos) OVER (PARTITION BY s.src, s.busy, s.priority, s.part), s.pos)
),
grp AS MATERIALIZED (
    SELECT CASE WHEN max(x.expiries) >= 2 THEN 1
                WHEN max(x.expiries) = 1 THEN greatest(1, %(batch)s::integer / 2)
                ELSE %(batch)s::integer END AS n
    FROM expired AS x
),
locked AS MATERIALIZED (
    SELECT c.id
    FROM candidates AS c
    WHERE pg_try_advisory_xact_lock(%(namespace)s, zen_claim_key_v1(c.id))
    LIMIT (SELECT g.n FROM grp AS g)
)
SELECT (SELECT coalesce(array_agg(l.id), '{}') FROM locked AS l) AS ids,
       (SELECT g.n FROM grp AS g) AS group_size,
       EXISTS (SELECT FROM expired) AS expired,
       -- the window's size and end, only when no lock was held
       CASE WHEN NOT EXISTS (SELECT FROM locked)
            THEN (SELECT count(*) FROM candidates) END AS seen,
       last.priority, last.id,
       -- seconds until the next failed row is due again (NULL: none waits)
       (SELECT extract(epoch FROM min(t.not_before) - statement_timestamp())::float8
        FROM results AS t WHERE t.status = 'retry') AS retry_in
FROM (SELECT NULL) AS one
LEFT JOIN LATERAL (
    SELECT c.priority, c.id FROM candidates AS c
    WHERE NOT EXISTS (SELECT FROM locked)
    ORDER BY c.priority, c.id DESC LIMIT 1
) AS last ON true;

-- name: claim_take
-- Second statement of a claim (zen_claim_v4 runs it, spelled with variables): take the locked rows that are still eligible, by primary
-- key, under one new fencing token and the claim's own random claim_id. Its snapshot
-- is newer than every lock we hold, so a row another claim committed between the lock
-- statement's snapshot and our lock is simply not eligible here (never reached through
-- EvalPlanQual, which would leave a row lock on it). The caller compares the rows taken
-- with the locks held and, when fewer, rolls back (releasing every lock) and claims
-- again, so a claim never holds more locks than rows it returns. An expired row taken
-- over counts an expiry unless its holder was already settling (a slow write is not a
-- crash).
WITH fence AS MATERIALIZED (
    SELECT nextval('results_claim_token_seq') AS token
)
UPDATE results AS r
SET status = 'claimed',
    claim_owner = %(owner)s,
    claim_token = f.token,
    claim_id = %(claim_id)s,
    claim_size = %(size)s,
    lease_until = statement_timestamp() + make_interval(secs => %(lease)s),
    attempts = r.attempts + 1,
    expiries = r.expiries + (r.status = 'claimed' AND NOT r.settling)::integer,
    settling = false,
    not_before = NULL
FROM fence AS f
WHERE r.id = ANY (%(ids)b::bigint[])
  AND (r.status = 'pending'
       OR (r.status = 'retry' AND r.not_before <= statement_timestamp())
       OR (r.status = 'claimed' AND r.lease_until < statement_timestamp()
           AND NOT (coalesce(r.claim_size, 1) = 1 AND NOT r.settling
                    AND r.attempts >= coalesce(%(max_attempts)s::integer, zen_max_attempts_v1()))))
RETURNING r.id, r.claim_token, r.attempts, r.link, r.data, r.priority, r.lease_until;

-- name: park_exhausted
-- Rows whose lease ran out while they were enriched alone, max_attempts claims in: the
-- worker died or hung on this very row (a page that crashes the parser kills every
-- worker that takes it), so it is parked as failed like a row that failed max_attempts
-- times. Rows expired in a group are split by the claim instead (claim_lock), and a
-- lease lost while settling is not the row's fault. Its own short statement, outside
-- any claim: SKIP LOCKED steps over rows whose late owner is completing them right
-- now (waiting there deadlocked with that owner's complete()). A range scan of
-- results_lease_idx over the expired leases only.
UPDATE results AS r
SET status = 'failed',
    last_error = left(coalesce(r.last_error || '; ', '')
        || 'lease expired after attempt ' || r.attempts || ' (worker lost or stuck)', 2000),
    lease_until = NULL,
    claim_owner = NULL
FROM (SELECT x.id
      FROM results AS x
      WHERE x.status = 'claimed'
        AND x.lease_until < statement_timestamp()
        AND coalesce(x.claim_size, 1) = 1 AND NOT x.settling
        AND x.attempts >= coalesce(%(max_attempts)s::integer, zen_max_attempts_v1())
      ORDER BY x.id
      FOR UPDATE SKIP LOCKED) AS e
WHERE r.id = e.id
  AND r.status = 'claimed'
RETURNING r.id;

-- name: complete
-- One statement per batch (a batch has one token and one claim_id): the rows are found
-- by primary key with r.id = ANY(ids) (an (id, token) join against unnest() was
-- planned as a nested loop rescanning the array per row once statistics said no row
-- was claimed: 0.7 s for 2,000 rows). A row counts as completed when it is claimed
-- under our claim, or already done under it (a retry after a lost COMMIT
-- acknowledgement), never when the claim differs (fenced: the lease ran out and
-- another claim took the row). The caller compares the ids returned with the batch and
-- rolls back to its savepoint when any is missing.
UPDATE results AS r
SET status = 'done',
    done_at = coalesce(r.done_at, statement_timestamp()),
    lease_until = NULL,
    settling = false,
    last_error = NULL
WHERE r.id = ANY (%(ids)b::bigint[])
  AND r.claim_token = %(token)s
  AND r.claim_id = %(claim_id)s
  AND r.status IN ('claimed', 'done')
RETURNING r.id;

-- name: complete_own
-- complete, all or nothing in one statement, for a completion in its own transaction on
-- a direct connection (one round trip in autocommit instead of BEGIN, UPDATE, COMMIT):
-- zen_complete_v1 (migration 0016) raises ZC002, naming the rows no longer held, and so
-- applies nothing, unless every row is claimed under our claim or done under it (a retry
-- after a lost acknowledgement).
SELECT unnest(zen_complete_v1(%(ids)b::bigint[], %(token)s, %(claim_id)s));

-- name: extend
-- Heartbeat: push the lease of every row of a batch in one statement (by primary key),
-- all or nothing: zen_extend_v1 (migration 0022) raises ZC002, naming the rows our
-- claim no longer holds, and extends none; so in its own transaction it is one round
-- trip (autocommit, as complete_own). The new deadline is computed by the server clock
-- at the statement, like the claim's, so servers with skewed clocks agree on expiry.
-- %(settling)s marks the batch as being written (never unmarks it): a lease that runs
-- out from then on is a slow write, not a crash.
SELECT unnest(zen_extend_v1(%(ids)b::bigint[], %(token)s, %(claim_id)s, %(lease)s,
                            %(settling)s));

-- name: extend_settling
-- The worker's "now writing" mark, sent in the same round trip as the write (its own
-- short transaction, committed first, so a lease that runs out during the write is a
-- slow write, not a crash): push the lease and set settling on every row of the batch,
-- all or nothing (zen_extend_v1 raises ZC002 naming the rows no longer held), so a
-- pipelined caller that cannot look before it goes on never marks part of a batch, and
-- the write pipelined behind it is skipped.
SELECT unnest(zen_extend_v1(%(ids)b::bigint[], %(token)s, %(claim_id)s, %(lease)s, true));

-- name: fail
-- Record the failures of the rows of one claim in one statement (by primary key), each
-- row with its own error (%(errors)s, in the order of %(ids)s): to retry after a backoff
-- (zen_retry_delay_v1: exponential, capped, jittered, from zen_settings) while attempts
-- (claims so far) is below max_attempts (the caller's, else the fleet's
-- zen_settings.max_attempts), else parked as failed, which no claim index holds, so only
-- requeue() brings it back. All or nothing: zen_fail_v1 (migration 0021) raises ZC002,
-- naming the rows no longer held, and applies nothing; so in its own transaction it is
-- one round trip (autocommit, as complete_own).
-- Idempotent under the claim: a row already released by this very claim (retry or
-- failed, still carrying our token and claim_id: a retry after a lost COMMIT
-- acknowledgement) is matched again and left as it is, so the retry succeeds instead
-- of abandoning the batch. A new claim of the row replaces the claim_id: fenced.
SELECT unnest(zen_fail_v1(%(ids)b::bigint[], %(errors)b::text[], %(token)s, %(claim_id)s,
                          %(max_attempts)s::integer));

-- name: release_rows
-- Give the rows of one claim back without spending an attempt (graceful shutdown: the
-- work was never tried): pending again at once, attempts as before the claim. Fenced
-- and idempotent like fail: a retry after a lost acknowledgement finds the rows
-- already released by this claim (pending, our token and claim_id) and changes nothing.
UPDATE results AS r
SET status = 'pending',
    attempts = CASE WHEN r.status = 'claimed' THEN greatest(r.attempts - 1, 0)
                    ELSE r.attempts END,
    lease_until = NULL,
    settling = false,
    claim_owner = NULL
WHERE r.id = ANY (%(ids)b::bigint[])
  AND r.claim_token = %(token)s
  AND r.claim_id = %(claim_id)s
  AND r.status IN ('claimed', 'pending')
RETURNING r.id;

-- name: requeue_failed
-- Parked rows back to pending with a fresh attempt budget; results_failed_idx finds
-- them. last_error is kept for the post-mortem.
UPDATE results AS r
SET status = 'pending', attempts = 0, expiries = 0, lease_until = NULL, claim_owner = NULL,
    settling = false, not_before = NULL
WHERE r.status = 'failed';

-- name: requeue_failed_ids
-- The same, limited to the ids given (primary key lookups).
UPDATE results AS r
SET status = 'pending', attempts = 0, expiries = 0, lease_until = NULL, claim_owner = NULL,
    settling = false, not_before = NULL
WHERE r.id = ANY(%(ids)b::bigint[]) AND r.status = 'failed';

-- name: requeue_ids
-- Any non-pending rows given back to pending (re-scrape done rows, free claimed ones).
-- claim_token is cleared, so a worker still holding one of these rows is fenced off.
UPDATE results AS r
SET status = 'pending', attempts = 0, expiries = 0, lease_until = NULL, claim_owner = NULL,
    claim_token = NULL, claim_id = NULL, done_at = NULL, settling = false, not_before = NULL
WHERE r.id = ANY(%(ids)b::bigint[]) AND r.status <> 'pending';

-- name: requeue_all
-- Every non-pending row back to pending (full re-run), fencing off live claims.
UPDATE results AS r
SET status = 'pending', attempts = 0, expiries = 0, lease_until = NULL, claim_owner = NULL,
    claim_token = NULL, claim_id = NULL, done_at = NULL, settling = false, not_before = NULL
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
