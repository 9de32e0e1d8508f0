-- Claim hardening (issue 8): claims that stay unique when the server loses acknowledged
-- commits, and leases that tell a worker that died on its rows from one that was slow
-- to write them.
--
-- claim_id: a random UUID the claimer generates for each claim (Python's os.urandom).
-- complete/extend/fail fence on (claim_token, claim_id). The token comes from a
-- sequence and is unique only on a durable server: with synchronous_commit = off, or
-- after a failover to an asynchronous standby, a crash rewinds the sequence and a second
-- claim can get the token of a first one whose commit was lost (docs/claiming.md). The
-- claim_id cannot repeat, so that first claim's complete() is refused.
--
-- expiries: how many of this row's leases ran out while it was being enriched (its
-- worker died or hung on it: a page that crashes the parser). Rows that expired come
-- back in smaller groups: half the batch after one expiry, alone after two, so only a
-- row that kills its worker while claimed alone is parked (claim_size = 1).
--
-- settling: the holder finished enriching and is writing the batch. A lease that runs
-- out while settling (a slow or retried write, a paused process) neither counts as an
-- expiry nor parks the row.
ALTER TABLE results
    ADD COLUMN claim_id   uuid,
    ADD COLUMN expiries   integer NOT NULL DEFAULT 0
               CONSTRAINT results_expiries_check CHECK (expiries >= 0),
    ADD COLUMN claim_size integer
               CONSTRAINT results_claim_size_check CHECK (claim_size >= 1),
    ADD COLUMN settling   boolean NOT NULL DEFAULT false;
