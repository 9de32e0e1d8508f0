-- The claim reads its window, not the backlog, before results has statistics (issue 10).
--
-- Right after a bulk load autovacuum has not analyzed results yet, and the planner,
-- guessing a few hundred pending rows, chose a bitmap scan of results_pending_idx: it
-- reads every pending row, then sorts them for the LIMIT (measured in the bench: 14,600
-- rows and 29 ms per claim over a 15,000-row backlog, growing with it, where the ordered
-- index scan reads the 4 x batch candidate window). plpgsql then keeps that plan for the
-- session. Without bitmap scans the only plans left for the candidate scans are the
-- ordered scans of the partial indexes (or, on a table small enough for it to be
-- cheaper, a sequential scan and a sort), whatever the statistics say; the other
-- statements of the function look rows up by id and never wanted a bitmap. The setting
-- holds only while the function runs (tests/test_claim.py:
-- test_a_claim_reads_its_window_not_the_backlog_before_any_analyze).
ALTER FUNCTION zen_claim_v1(
    text, uuid, integer, integer, double precision, integer, integer, integer, integer,
    boolean
) SET enable_bitmapscan = off;
