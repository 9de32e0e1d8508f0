-- Statements of the fleet-wide settings (zenpipe.fleet_settings): the one row of
-- zen_settings that every claimer reads at each statement that needs it.

-- name: show
SELECT max_attempts, retry_base_seconds, retry_max_seconds, retry_jitter, updated_at
FROM zen_settings;

-- name: update
-- One statement: a NULL leaves the setting as it is; the table's CHECKs refuse values
-- that make no sense (max below base, jitter outside [0, 1]) with the constraint named.
UPDATE zen_settings
SET max_attempts = coalesce(%(max_attempts)s::integer, max_attempts),
    retry_base_seconds = coalesce(%(retry_base_seconds)s::float8, retry_base_seconds),
    retry_max_seconds = coalesce(%(retry_max_seconds)s::float8, retry_max_seconds),
    retry_jitter = coalesce(%(retry_jitter)s::float8, retry_jitter),
    updated_at = statement_timestamp()
RETURNING max_attempts, retry_base_seconds, retry_max_seconds, retry_jitter, updated_at;
