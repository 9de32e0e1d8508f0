-- Retries after a backoff, and the fleet-wide settings that govern them (issue 9).
--
-- zen_settings: one row of settings every process of the fleet reads from the database
-- at each statement that needs them, so a change applies to the whole fleet at once and
-- no two servers disagree on when a row is parked. `zenpipe settings` shows and sets it.
--  * max_attempts: claims of a row before a failure parks it (a Claimer may override it
--    for itself, for tests and one-off tools).
--  * retry_base_seconds, retry_max_seconds, retry_jitter: a failed row waits
--    min(max, base * 2^(attempts - 1)) * (1 - jitter * random()) before it is claimable
--    again: exponential, capped, jittered so that rows failed together (a site that
--    went down) do not come back together.
CREATE TABLE zen_settings (
    singleton          boolean          PRIMARY KEY DEFAULT true
                       CONSTRAINT zen_settings_singleton_check CHECK (singleton),
    max_attempts       integer          NOT NULL DEFAULT 5
                       CONSTRAINT zen_settings_max_attempts_check CHECK (max_attempts >= 1),
    retry_base_seconds double precision NOT NULL DEFAULT 2
                       CONSTRAINT zen_settings_retry_base_check CHECK (retry_base_seconds >= 0),
    retry_max_seconds  double precision NOT NULL DEFAULT 600
                       CONSTRAINT zen_settings_retry_max_check
                       CHECK (retry_max_seconds >= retry_base_seconds),
    retry_jitter       double precision NOT NULL DEFAULT 0.5
                       CONSTRAINT zen_settings_retry_jitter_check
                       CHECK (retry_jitter >= 0 AND retry_jitter <= 1),
    updated_at         timestamptz      NOT NULL DEFAULT now()
);
INSERT INTO zen_settings DEFAULT VALUES;

-- The backoff of a row at its attempt-th failure, in seconds (see above). VOLATILE:
-- random() jitters it.
CREATE FUNCTION zen_retry_delay_v1(attempt integer) RETURNS double precision
    LANGUAGE sql VOLATILE PARALLEL SAFE
    RETURN (SELECT least(s.retry_max_seconds,
                         s.retry_base_seconds * power(2, least(greatest(attempt - 1, 0), 30)))
                   * (1 - s.retry_jitter * random())
            FROM zen_settings AS s);

-- A new state, retry: failed, waiting out its backoff until not_before. Kept apart from
-- pending (whose index the claim scans in priority order) so that rows in backoff never
-- sit at the head of the claim scan; results_retry_idx finds the ones that are due.
ALTER TABLE results ADD COLUMN not_before timestamptz;
ALTER TABLE results DROP CONSTRAINT results_status_check;
ALTER TABLE results ADD CONSTRAINT results_status_check
    CHECK (status IN ('pending', 'claimed', 'done', 'failed', 'retry'));
ALTER TABLE results ADD CONSTRAINT results_retry_check
    CHECK (status <> 'retry' OR not_before IS NOT NULL);

-- Due retries: WHERE status = 'retry' AND not_before <= statement_timestamp().
CREATE INDEX results_retry_idx ON results (not_before) WHERE status = 'retry';

-- The fleet's max_attempts, for statements whose caller did not override it.
CREATE FUNCTION zen_max_attempts_v1() RETURNS integer
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (SELECT s.max_attempts FROM zen_settings AS s);
