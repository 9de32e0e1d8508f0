-- zen_claim_key_v1 (migration 0002) with the same values, spelled so that the planner
-- inlines it.
--
-- Why (issue 10): the planner inlines a STRICT SQL function only when its body is strict
-- too, and a CASE is not, so every lock the claim tried was a call of the SQL-function
-- executor: about 5.5 us each against 0.6 us for the lock itself (100 locks: 0.71 ms
-- against 0.16 ms). The lock statement tries one per candidate until the batch is held,
-- and each of its statements is planned once per session, so the call is paid per row.
-- The body is now arithmetic on strict operators, which is inlined: the low 32 bits of
-- the id, less 2^32 when bit 31 is set (the signed int4 of those bits, as before).
-- Measured (8 processes, 100,000 rows, durable PostgreSQL 15, 3 interleaved repetitions,
-- patched into the benchmark's databases): zen_claim_v4 x the lease loop 0.75 -> 0.83
-- at batch 100, 0.78 -> 0.89 at batch 500.
-- tests/test_claim.py::test_claim_key_is_inlined_into_the_lock_statement pins it.
CREATE OR REPLACE FUNCTION zen_claim_key_v1(id bigint) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ((id & 4294967295) - ((id & 2147483648) << 1))::integer;
