"""The claimer (zenpipe.claim) on a real server: claims, locks, leases, fencing, poison rows."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, LiteralString

import psycopg
import pytest
from helpers import assert_no_leaks, wait_past
from psycopg.types.json import Jsonb

from zenpipe import cli
from zenpipe.claim import Batch, Claimer, claim_lock_key, requeue
from zenpipe.config import Settings
from zenpipe.errors import StaleClaimError
from zenpipe.keys import hashtext, partition_of
from zenpipe.locks import NAMESPACE_CLAIM
from zenpipe.pool import guarded_pool
from zenpipe.queries import load

Conn = psycopg.Connection[Any]


# -- helpers ------------------------------------------------------------------------------


def fill(dsn: str, n: int, *, priority: int = 0) -> list[int]:
    """Insert *n* pending rows; return their ids in insertion order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "INSERT INTO results (link, data, priority) "
            "SELECT 'https://maps.example.com/' || g, jsonb_build_object('n', g), %s "
            "FROM generate_series(1, %s) AS g RETURNING id",
            (priority, n),
        ).fetchall()
    return [r[0] for r in rows]


def claim_locks(conn: Conn, pid: int | None = None) -> int:
    """zenpipe claim locks held (by *pid*, or by anyone), read from pg_locks."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
        "AND objsubid = 2 AND (%s::int IS NULL OR pid = %s::int)",
        (NAMESPACE_CLAIM, pid, pid),
    ).fetchone()
    assert row is not None
    return int(row[0])


def statuses(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM results GROUP BY status").fetchall())


def row(dsn: str, rid: int) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM results WHERE id = %s", (rid,))
        assert cur.description is not None
        values = cur.fetchone()
        assert values is not None
        return dict(zip([d.name for d in cur.description], values, strict=True))


@pytest.fixture
def claimer(dsn: str) -> Iterator[Claimer]:
    with Claimer(dsn, owner="test-1", batch_size=10) as c:
        yield c
    assert_no_leaks(dsn)


# -- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rid", [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**62 + 2**31 + 7, 2**63 - 1]
)
def test_claim_lock_key_matches_sql(postgresql: Conn, rid: int) -> None:
    got = postgresql.execute("SELECT zen_claim_key_v1(%s::bigint)", (rid,)).fetchone()
    assert got is not None and got[0] == claim_lock_key(rid)
    assert -(2**31) <= claim_lock_key(rid) < 2**31


def test_claim_key_is_inlined_into_the_lock_statement(dsn: str) -> None:
    """Migration 0023: the planner inlines zen_claim_key_v1, so a lock tried costs the
    lock, not a call of the SQL-function executor (a CASE body under STRICT was never
    inlined: about 5.5 us per row tried). The keys are still `claim_lock_key`'s, over
    400,001 ids across the whole bigint range, signs and bit 31 included."""
    plan = _plan(dsn, drop_indexes=False, verbose=True)
    text = json.dumps(list(_nodes(plan)))
    assert "pg_try_advisory_xact_lock" in text
    assert "zen_claim_key_v1" not in text
    with psycopg.connect(dsn) as conn:
        keys = conn.execute(
            "SELECT v.id, zen_claim_key_v1(v.id) FROM generate_series(-200000, 200000) AS g, "
            "LATERAL (SELECT g * 46116860184000 + g AS id) AS v"
        ).fetchall()
        assert len(keys) == 400_001
        assert [k for i, k in keys] == [claim_lock_key(i) for i, _ in keys]
        assert conn.execute("SELECT zen_claim_key_v1(NULL)").fetchone() == (None,)


# -- claim --------------------------------------------------------------------------------


def test_claim_takes_rows_in_priority_then_age_order(dsn: str, claimer: Claimer) -> None:
    low = fill(dsn, 5)
    high = fill(dsn, 5, priority=10)
    batch = claimer.claim(limit=7)
    assert [c.id for c in batch.claims] == high + low[:2]
    assert all(c.attempt == 1 for c in batch.claims)
    assert len({c.token for c in batch.claims}) == 1
    assert batch.claims[0].data == {"n": 1}
    assert batch.claims[0].link == "https://maps.example.com/1"
    r = row(dsn, high[0])
    assert r["status"] == "claimed" and r["claim_owner"] == "test-1"
    assert r["claim_token"] == batch.claims[0].token and r["lease_until"] == batch.lease_until
    # The rest, then nothing.
    assert claimer.claim().ids == low[2:]
    empty = claimer.claim()
    assert not empty and empty.claims == ()


def test_each_claim_gets_a_new_token(dsn: str, claimer: Claimer) -> None:
    fill(dsn, 4)
    a, b = claimer.claim(limit=2), claimer.claim(limit=2)
    assert a.claims[0].token < b.claims[0].token


def test_claim_inside_caller_transaction_commits_nothing(dsn: str, claimer: Claimer) -> None:
    fill(dsn, 3)
    with psycopg.connect(dsn) as conn:
        batch = claimer.claim(conn=conn)
        assert len(batch) == 3
        conn.rollback()
    assert statuses(dsn) == {"pending": 3}


def _hold_claim(dsn: str, claimer: Claimer, limit: int) -> tuple[Conn, Batch, int]:
    conn = psycopg.connect(dsn)
    batch = claimer.claim(limit, conn=conn)
    pid = conn.info.backend_pid
    return conn, batch, pid


@pytest.mark.parametrize("index", ["with_index", "without_index"])
def test_claim_never_holds_more_locks_than_rows(dsn: str, index: str) -> None:
    """Two claims open at once (the second skips the first's rows): each transaction holds
    exactly as many claim locks as rows it returned, with and without the claim indexes."""
    fill(dsn, 500)
    if index == "without_index":
        with psycopg.connect(dsn) as conn:
            conn.execute("DROP INDEX results_pending_idx, results_lease_idx")
    with (
        Claimer(dsn, owner="a", batch_size=50) as a,
        Claimer(dsn, owner="b", batch_size=50) as b,
        psycopg.connect(dsn, autocommit=True) as monitor,
    ):
        conn_a, batch_a, pid_a = _hold_claim(dsn, a, 50)
        conn_b, batch_b, pid_b = _hold_claim(dsn, b, 50)
        try:
            assert len(batch_a) == 50 and len(batch_b) == 50
            assert not set(batch_a.ids) & set(batch_b.ids)
            assert claim_locks(monitor, pid_a) == 50
            assert claim_locks(monitor, pid_b) == 50
            # A third claim scans 4 x 40 candidates: it skips the 100 rows the open
            # claims hold (failed tries hold nothing) and locks 40 of the other 60.
            conn_c, batch_c, pid_c = _hold_claim(dsn, a, 40)
            assert claim_locks(monitor, pid_c) == len(batch_c) == 40
            assert not set(batch_c.ids) & (set(batch_a.ids) | set(batch_b.ids))
            # A fourth scans 4 x 10 candidates, all held by open claims: it looks past
            # them, window after window (issue 8, point 4: this used to come back empty
            # while 360 rows waited unlocked), and locks exactly the 10 rows it returns.
            conn_d, batch_d, pid_d = _hold_claim(dsn, b, 10)
            assert claim_locks(monitor, pid_d) == len(batch_d) == 10
            assert not batch_d.contended
            held = set(batch_a.ids) | set(batch_b.ids) | set(batch_c.ids)
            assert not set(batch_d.ids) & held
            for c in (conn_c, conn_d):
                c.commit()
                c.close()
        finally:
            conn_a.commit()
            conn_b.commit()
            conn_a.close()
            conn_b.close()
    assert statuses(dsn) == {"claimed": 150, "pending": 350}
    assert_no_leaks(dsn)


def test_empty_claim_tells_contended_from_empty(dsn: str) -> None:
    """Issue 8, point 4: a claim whose every candidate is being taken by other claimers
    says so (contended, claim again soon); a claim with nothing eligible says it is
    empty; and a claim with unlocked work beyond the locked windows finds it."""
    fill(dsn, 30)
    with Claimer(dsn, owner="a") as a, Claimer(dsn, owner="b", scan_windows=1) as b:
        conn_a, batch_a, _ = _hold_claim(dsn, a, 30)  # every row locked, not committed
        try:
            got = b.claim(10)
            assert not got and got.contended
        finally:
            conn_a.rollback()
            conn_a.close()
        conn_a, batch_a, _ = _hold_claim(dsn, a, 20)  # rows 1..20 held
        try:
            with Claimer(dsn, owner="c", scan_windows=4) as c:
                got = c.claim(5)  # windows of 20: the first all held, the second free
            assert len(got) == 5 and not set(got.ids) & set(batch_a.ids)
        finally:
            conn_a.commit()
            conn_a.close()
        rest = b.claim(100)
        assert len(rest) == 5
        empty = b.claim(10)
        assert not empty and not empty.contended
    assert_no_leaks(dsn)


def _in_progress_take(dsn: str, ids: list[int]) -> psycopg.Connection[Any]:
    """Another worker takes *ids* but has not committed yet (no advisory lock: the same
    thing happens when its claim commits between our snapshot and our locks)."""
    other = psycopg.connect(dsn)
    other.execute(
        "UPDATE results SET status = 'claimed', claim_owner = 'other', claim_token = -1, "
        "lease_until = now() + interval '1 hour' WHERE id = ANY(%s)",
        (ids,),
    )
    return other


def _wait_for_a_lock_wait(
    monitor: psycopg.Connection[Any], where: LiteralString, value: object
) -> None:
    """Wait (30 s at most) until the backend *where* matches waits on a lock."""
    query = psycopg.sql.SQL(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND {}"
    ).format(psycopg.sql.SQL(where))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = monitor.execute(query, (value,)).fetchone()
        if row is not None and row[0] == 1:
            return
        time.sleep(0.01)
    pytest.fail("the claim never waited for the other transaction")


def test_claim_race_with_a_concurrent_commit_releases_extra_locks(dsn: str) -> None:
    """The snapshot race: rows that look pending to the claim statement are claimed by a
    transaction that commits after the statement's snapshot. The statement locks them,
    its re-check skips them, and the claimer rolls back to its savepoint (releasing those
    locks) and claims again, so it still holds exactly one lock per row returned. The
    batch (25) needs more rows than the window has that nobody is taking (20), so the
    busy rows are locked too (they come last, test below)."""
    ids = fill(dsn, 30)
    other = _in_progress_take(dsn, ids[:10])
    result: dict[str, Any] = {}
    with Claimer(dsn, owner="racer", batch_size=25) as racer:
        conn = psycopg.connect(dsn)
        racer_pid = conn.info.backend_pid

        def run() -> None:
            try:
                result["batch"] = racer.claim(conn=conn)
            except BaseException as e:  # pragma: no cover - reported below
                result["error"] = e

        t = threading.Thread(target=run)
        t.start()
        with psycopg.connect(dsn, autocommit=True) as monitor:
            # Wait until the claim statement blocks on the other worker's row lock...
            _wait_for_a_lock_wait(monitor, "pid = %s", racer_pid)
            # ...then let the other worker commit: our statement's re-check now fails.
            other.commit()
            t.join(30)
            assert "error" not in result
            batch: Batch = result["batch"]
            assert racer.race_rollbacks >= 1
            assert batch.ids == ids[10:30]
            assert claim_locks(monitor, racer_pid) == len(batch) == 20
        conn.commit()
        conn.close()
    other.close()
    assert_no_leaks(dsn)


def test_a_claim_that_raced_for_every_row_claims_the_rows_behind_them(dsn: str) -> None:
    """In its own transaction a claim keeps the rows it took; one that took none (every
    row it locked was claimed by a transaction that committed after its snapshot) rolls
    back and starts again past the rows it raced for (migration 0024): it returns the
    pending rows behind them, not an empty batch while rows wait."""
    ids = fill(dsn, 40)
    other = _in_progress_take(dsn, ids[:20])  # the whole first window (4 x 5) is busy
    result: dict[str, Any] = {}
    with Claimer(dsn, owner="racer", batch_size=5) as racer:

        def run() -> None:
            try:
                result["batch"] = racer.claim()  # its own transaction
            except BaseException as e:  # pragma: no cover - reported below
                result["error"] = e

        t = threading.Thread(target=run)
        t.start()
        with psycopg.connect(dsn, autocommit=True) as monitor:  # the take waits on a row lock
            _wait_for_a_lock_wait(monitor, "query LIKE %s", "%zen_claim_v4%")
        other.commit()
        t.join(30)
        assert "error" not in result
        batch: Batch = result["batch"]
        assert racer.race_rollbacks == 1
        assert batch.ids == ids[20:25]
    other.close()
    assert_no_leaks(dsn)


@pytest.mark.parametrize("affine", [False, True])
def test_rows_another_transaction_is_taking_are_tried_last(dsn: str, affine: bool) -> None:
    """Migration 0019: the oldest rows of the window are being taken by a transaction
    that has not committed (their visible version carries its xmax). The claim locks the
    rows behind them instead: no wait on that transaction's row locks, no race, exactly
    the next rows. Before, it locked the busy rows first, waited for their taker and,
    once that committed, rolled back and claimed again."""
    ids = fill(dsn, 30)
    other = _in_progress_take(dsn, ids[:10])
    try:
        with Claimer(dsn, owner="polite", batch_size=15,
                     partition_affinity=8 if affine else 0) as claimer:  # fmt: skip
            with psycopg.connect(dsn) as conn:
                conn.execute("SET lock_timeout = '20s'")  # a wait would fail, not hang
                batch = claimer.claim(conn=conn)
                with psycopg.connect(dsn, autocommit=True) as monitor:
                    assert claim_locks(monitor, conn.info.backend_pid) == len(batch) == 15
                conn.commit()
            assert claimer.race_rollbacks == 0
            if not affine:
                assert batch.ids == ids[10:25]
            assert set(batch.ids) <= set(ids[10:])
        other.rollback()
        # once their taker is gone they are plain pending rows again, oldest first
        with Claimer(dsn, owner="next", batch_size=5) as claimer:
            assert claimer.claim().ids == ids[:5]
    finally:
        other.close()
    assert_no_leaks(dsn)


def _plan(
    dsn: str, drop_indexes: bool, affine: bool = False, *, verbose: bool = False
) -> dict[str, Any]:
    fill(dsn, 5000)
    with psycopg.connect(dsn) as conn:
        if drop_indexes:
            conn.execute("DROP INDEX results_pending_idx, results_lease_idx")
        conn.execute("ANALYZE results")
        explain = (
            "EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) "
            if verbose
            else "EXPLAIN (ANALYZE, FORMAT JSON) "
        )
        stmt = psycopg.sql.SQL(explain) + load("claim")["claim_lock"]
        params = {
            "scan": 40,
            "batch": 10,
            "namespace": NAMESPACE_CLAIM,
            "max_attempts": 5,
            "source": "auto",
            "after_priority": None,
            "after_id": None,
            "affine": affine,
        }
        got = conn.execute(stmt, params).fetchone()
        conn.rollback()
    assert got is not None
    plan = got[0] if isinstance(got[0], list) else json.loads(got[0])
    return dict(plan[0]["Plan"])


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


@pytest.mark.parametrize("affine", [False, True], ids=["window order", "partition affinity"])
@pytest.mark.parametrize("drop_indexes", [False, True])
def test_claim_plan_locks_only_inside_the_fenced_cte(
    dsn: str, drop_indexes: bool, affine: bool
) -> None:
    """EXPLAIN ANALYZE pins the shape: the lock function runs in exactly one node, a CTE
    Scan over the materialized, LIMITed candidates, right under the batch LIMIT, and was
    called no more often than there are candidates; the candidate scan uses
    results_pending_idx (or, without it, a top-N sort)."""
    plan = _plan(dsn, drop_indexes, affine)
    nodes = list(_nodes(plan))
    lockers = [n for n in nodes if "pg_try_advisory_xact_lock" in n.get("Filter", "")]
    assert len(lockers) == 1
    locker = lockers[0]
    assert locker["Node Type"] == "CTE Scan" and locker["CTE Name"] == "candidates"
    assert locker["Actual Rows"] == 10  # stopped by the LIMIT at the batch size
    assert locker.get("Rows Removed by Filter", 0) == 0
    limits = [n for n in nodes if n["Node Type"] == "Limit" and locker in n.get("Plans", [])]
    assert len(limits) == 1 and limits[0].get("Subplan Name") == "CTE locked"
    # No other node anywhere mentions the lock function (no plan reaches it unfenced).
    text = json.dumps([{k: v for k, v in n.items() if k != "Plans"} for n in nodes])
    assert text.count("pg_try_advisory_xact_lock") == 1
    # The window is read and LIMITed in a CTE of its own; candidates only reorders it
    # (by partition, with affinity) and reads no table.
    scanned = next(n for n in nodes if n.get("Subplan Name") == "CTE scanned")
    assert scanned["Node Type"] == "Limit"
    candidates = next(n for n in nodes if n.get("Subplan Name") == "CTE candidates")
    assert not [n for n in _nodes(candidates) if "Relation Name" in n]
    # The expired leases are read in a CTE of their own (claimed before pending rows).
    expired = next(n for n in nodes if n.get("Subplan Name") == "CTE expired")
    scans = {n.get("Index Name") or n["Node Type"] for c in (scanned, expired) for n in _nodes(c)}
    if drop_indexes:
        assert "Seq Scan" in scans and "results_pending_idx" not in scans
    else:
        assert {"results_pending_idx", "results_lease_idx"} <= scans
        assert "Seq Scan" not in scans


@pytest.mark.parametrize("affine", [False, True], ids=["window order", "partition affinity"])
def test_only_an_affine_claim_runs_the_affine_order(dsn: str, affine: bool) -> None:
    """Migration 0020: the affine order's window functions and their sorts run only when
    asked for (zen_claim_v3 ran them for every claim, a third of the lock statement at
    batch 500). Migration 0024: a plain claim (the Claimer's default) does not sort at
    all and reads only as much of the window as its batch needs: the pending scan stops
    at the tenth row locked instead of reading, sorting and counting all 40 (and the
    window's size and end, needed only when no lock was held, are not read).
    """
    plan = _plan(dsn, drop_indexes=False, affine=affine)
    nodes = list(_nodes(plan))
    candidates = next(n for n in nodes if n.get("Subplan Name") == "CTE candidates")
    # the nodes that read rows (the branch not asked for may start, and reads none)
    busy = [n for n in _nodes(candidates) if n.get("Actual Rows", 0) > 0]
    windows = [n for n in busy if n["Node Type"] == "WindowAgg"]
    sorts = [n for n in busy if n["Node Type"] in {"Sort", "Incremental Sort"}]
    scanned = next(n for n in nodes if n.get("Subplan Name") == "CTE scanned")
    pending = [n for n in _nodes(scanned) if n.get("Index Name") == "results_pending_idx"]
    assert len(pending) == 1
    if affine:  # the partition order needs the whole window before the first lock
        assert len(windows) == 2
        assert pending[0]["Actual Rows"] == scanned["Actual Rows"] == 40
    else:
        assert windows == [] and sorts == []
        assert pending[0]["Actual Rows"] == scanned["Actual Rows"] == 10
    # the locks are tried on candidates in order until the batch is held
    assert candidates["Actual Rows"] == 10
    counts = [n for n in nodes if n["Node Type"] == "Aggregate" and any(
        c.get("CTE Name") == "candidates" for c in n.get("Plans", []))]  # fmt: skip
    assert counts and all(n.get("Actual Loops", 0) == 0 for n in counts)


# -- partition affinity -------------------------------------------------------------------


def _affine_order(ids: list[int], links: list[str], window: int) -> list[int]:
    """The order an affine claim tries the first *window* candidates in, computed here
    from zenpipe.keys: partition by partition, the first candidate's partition first,
    each partition's rows in window order."""
    first: dict[int, int] = {}
    tagged = []
    for pos, (rid, link) in enumerate(zip(ids[:window], links[:window], strict=True)):
        part = partition_of(hashtext(link))
        first.setdefault(part, pos)
        tagged.append((first[part], pos, rid))
    return [rid for _, _, rid in sorted(tagged)]


def test_partition_of_is_the_leaf_postgresql_routes_to(dsn: str) -> None:
    """zen_partition_of_v1 (the affine claim's grouping) names the same leaf as
    PostgreSQL's hash routing of zen_contacts and as zenpipe.keys, for every link."""
    links = [f"https://maps.example.com/place/{n}?q=\u00e9{n * 7919}" for n in range(3000)]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT l, zen_partition_of_v1(l), "
            "       satisfies_hash_partition('zen_contacts'::regclass, 32,"
            "                                zen_partition_of_v1(l), hashtext(l)) "
            "FROM unnest(%s::text[]) AS l",
            (links,),
        ).fetchall()
    assert all(routed for _, _, routed in rows)
    assert {link: part for link, part, _ in rows} == {
        link: partition_of(hashtext(link)) for link in links
    }
    assert len({part for _, part, _ in rows}) == 32


def test_affine_claim_takes_its_window_partition_by_partition(dsn: str) -> None:
    """With partition_affinity the batch is the window (8 x 50 candidates) tried
    partition by partition, the oldest row's first: exactly the rows computed here, the
    oldest among them, spanning a few leaves where a plain claim spans nearly all."""
    ids = fill(dsn, 1000)
    links = [f"https://maps.example.com/{g}" for g in range(1, 1001)]
    with Claimer(dsn, owner="plain", batch_size=50) as plain:
        batch = plain.claim()
        assert batch.ids == ids[:50]
        spread = {partition_of(hashtext(c.link)) for c in batch.claims}
        plain.release(batch)
    with Claimer(dsn, owner="affine", batch_size=50, partition_affinity=8) as affine:
        batch = affine.claim()
        expected = _affine_order(ids, links, 400)[:50]
        assert sorted(batch.ids) == sorted(expected)
        assert ids[0] in batch.ids
        parts = {partition_of(hashtext(c.link)) for c in batch.claims}
        assert len(parts) <= 6
        assert len(spread) >= 20
        # the next claim goes on from the rows left: the oldest of them comes first
        second = affine.claim()
        left = [i for i in ids if i not in set(batch.ids)]
        assert left[0] in second.ids
        assert not set(second.ids) & set(batch.ids)


def test_affine_claim_keeps_priority_order(dsn: str) -> None:
    """Affinity groups partitions within a priority, never across: every row of the
    higher priority in the window comes before any row of the lower one."""
    low = fill(dsn, 300)
    high = fill(dsn, 30, priority=5)
    with Claimer(dsn, owner="affine", batch_size=50, partition_affinity=8) as affine:
        batch = affine.claim()
    assert set(high) <= set(batch.ids)
    assert len(set(batch.ids) & set(low)) == 20


def test_concurrent_affine_claims_share_no_row_and_no_lock(dsn: str) -> None:
    """Two affine claims in open transactions (their advisory locks held): the second
    skips the rows the first locked and takes the next ones in affine order; neither
    holds a lock beyond its rows."""
    ids = fill(dsn, 600)
    links = [f"https://maps.example.com/{g}" for g in range(1, 601)]
    with (
        psycopg.connect(dsn) as a,
        psycopg.connect(dsn) as b,
        psycopg.connect(dsn, autocommit=True) as monitor,
        Claimer(dsn, owner="a", batch_size=40, partition_affinity=8) as ca,
        Claimer(dsn, owner="b", batch_size=40, partition_affinity=8) as cb,
    ):
        first = ca.claim(conn=a)
        second = cb.claim(conn=b)
        order = _affine_order(ids, links, 320)
        assert sorted(first.ids) == sorted(order[:40])
        # b's window is the pending rows b's snapshot sees (a has not committed): the
        # same window, whose first 40 in affine order a is taking. Those are busy (their
        # visible version carries a's xmax, migration 0019) and tried after the others:
        # b takes the first 40 of the rest of the window, in affine order
        rest = [(i, link) for i, link in zip(ids[:320], links[:320], strict=True)
                if i not in set(first.ids)]  # fmt: skip
        rest_order = _affine_order([i for i, _ in rest], [link for _, link in rest], len(rest))
        assert sorted(second.ids) == sorted(rest_order[:40])
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()
        pid_b = b.execute("SELECT pg_backend_pid()").fetchone()
        assert pid_a is not None and pid_b is not None
        assert claim_locks(monitor, pid_a[0]) == 40
        assert claim_locks(monitor, pid_b[0]) == 40
        a.commit()
        b.commit()
    assert_no_leaks(dsn)


# -- leases -------------------------------------------------------------------------------


def test_expired_lease_is_claimable_again_with_a_new_token(dsn: str) -> None:
    ids = fill(dsn, 3)
    with (
        Claimer(dsn, owner="dead", lease_seconds=0.3) as dead,
        Claimer(dsn, owner="alive") as alive,
    ):
        first = dead.claim()
        assert alive.claim().claims == ()  # leased
        wait_past(dsn, first.lease_until)
        second = alive.claim()
        assert second.ids == ids
        assert all(c.attempt == 2 for c in second.claims)
        assert second.claims[0].token > first.claims[0].token
        alive.complete(second)
    assert statuses(dsn) == {"done": 3}
    assert_no_leaks(dsn)


def test_a_settle_of_rows_from_two_claims_fences_each_by_its_own_token(dsn: str) -> None:
    """complete() of one Batch holding the rows of two claims runs one statement per
    claim, each under that claim's token and id: every row is done, none is refused."""
    ids = fill(dsn, 6)
    with Claimer(dsn, owner="two", batch_size=3) as claimer:
        first, second = claimer.claim(), claimer.claim()
        assert first.claims[0].token != second.claims[0].token
        both = Batch(
            owner="two", claims=first.claims + second.claims, lease_until=first.lease_until
        )
        claimer.complete(both)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, status, claim_token FROM results ORDER BY id").fetchall()
    tokens = {c.id: c.token for c in both.claims}
    assert [(r[0], r[1], r[2]) for r in rows] == [(i, "done", tokens[i]) for i in ids]
    assert_no_leaks(dsn)


def test_extend_pushes_the_lease_in_one_statement(dsn: str, claimer: Claimer) -> None:
    ids = fill(dsn, 5)
    batch = claimer.claim()
    claimer.extend(batch, seconds=3600)
    r = row(dsn, ids[0])
    assert (r["lease_until"] - batch.lease_until).total_seconds() > 3000
    with psycopg.connect(dsn) as conn:
        leases = conn.execute("SELECT DISTINCT lease_until FROM results").fetchall()
    assert len(leases) == 1  # every row of the batch moved together


def test_complete_retried_after_success_is_idempotent(dsn: str, claimer: Claimer) -> None:
    fill(dsn, 3)
    batch = claimer.claim()
    claimer.complete(batch)
    claimer.complete(batch)  # what a retry after a lost COMMIT acknowledgement does
    assert statuses(dsn) == {"done": 3}


# -- fencing ------------------------------------------------------------------------------


def test_the_previous_releases_settling_mark_still_fences(dsn: str, claimer: Claimer) -> None:
    """zen_extend_settling_v1 (migration 0016), which clients of the previous release
    call, is a call of zen_extend_v1 since migration 0022: the whole batch marked, or
    ZC002 naming the rows not held and nothing marked."""
    fill(dsn, 3)
    batch = claimer.claim()
    c = batch.claims[0]
    call = "SELECT zen_extend_settling_v1(%s, %s, %s, 600)"
    with psycopg.connect(dsn, autocommit=True) as conn:
        missing = max(batch.ids) + 1000
        with pytest.raises(psycopg.Error) as info:
            conn.execute(call, ([*batch.ids, missing], c.token, c.claim_id))
        assert info.value.sqlstate == "ZC002"
        assert info.value.diag.message_detail == str(missing)
        assert not any(row(dsn, rid)["settling"] for rid in batch.ids)
        got = conn.execute(call, (batch.ids, c.token, c.claim_id)).fetchone()
        assert got is not None and sorted(got[0]) == batch.ids
        assert all(row(dsn, rid)["settling"] for rid in batch.ids)
    claimer.complete(batch)


def test_stale_token_is_refused_and_nothing_is_applied(dsn: str) -> None:
    ids = fill(dsn, 4)
    with (
        Claimer(dsn, owner="slow", lease_seconds=0.3, batch_size=4) as slow,
        Claimer(dsn, owner="fast", batch_size=4) as fast,
    ):
        stale = slow.claim()
        wait_past(dsn, stale.lease_until)
        # Expired rows come back in half batches: takes ids[0:2] over; ids[2:4] are
        # still slow's token.
        taken = fast.claim()
        assert taken.ids == ids[:2]
        for name, op in (
            ("complete", slow.complete),
            ("extend", slow.extend),
            ("extend", lambda b: slow.extend(b, settling=True)),
            ("fail", lambda b: slow.fail(b, "boom")),
            ("fail", lambda b: slow.fail_each([(c, f"boom {c.id}") for c in b.claims])),
        ):
            with pytest.raises(StaleClaimError) as info:
                op(stale)
            assert info.value.ids == ids[:2]
            assert info.value.operation == name
        # Nothing of slow's calls applied, even on the rows its token still matches.
        for rid in ids[2:]:
            r = row(dsn, rid)
            assert r["status"] == "claimed" and r["claim_owner"] == "slow"
            assert r["lease_until"] == stale.lease_until and r["last_error"] is None
        for rid in ids[:2]:
            r = row(dsn, rid)
            assert r["status"] == "claimed" and r["claim_owner"] == "fast"
        fast.complete(taken)
    assert_no_leaks(dsn)


def test_stale_complete_inside_caller_transaction_keeps_it_usable(dsn: str) -> None:
    ids = fill(dsn, 2)
    with (
        Claimer(dsn, owner="slow", lease_seconds=0.2) as slow,
        Claimer(dsn, owner="fast") as fast,
    ):
        stale = slow.claim()
        wait_past(dsn, stale.lease_until)
        fast.claim(limit=1)
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TEMP TABLE marks (id bigint) ON COMMIT DROP")
            conn.execute("INSERT INTO marks VALUES (1)")
            with pytest.raises(StaleClaimError):
                slow.complete(stale, conn=conn)
            # Only the complete was undone; the caller's own work is still there.
            got = conn.execute("SELECT count(*) FROM marks").fetchone()
            assert got == (1,)
            conn.rollback()
    assert row(dsn, ids[1])["status"] == "claimed"


# -- exactly-once effect ------------------------------------------------------------------


def test_complete_commits_with_the_callers_writes(dsn: str, claimer: Claimer) -> None:
    fill(dsn, 5)
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE effects (id bigint PRIMARY KEY)")
        conn.commit()
        batch = claimer.claim()
        with conn.transaction():
            conn.execute("INSERT INTO effects SELECT unnest(%s::bigint[])", (batch.ids,))
            claimer.complete(batch, conn=conn)
        n = conn.execute("SELECT count(*) FROM effects").fetchone()
        assert n == (5,)
    assert statuses(dsn) == {"done": 5}


def test_rolled_back_completion_leaves_rows_claimable(dsn: str) -> None:
    ids = fill(dsn, 5)
    with Claimer(dsn, owner="w", lease_seconds=0.3) as w:
        batch = w.claim()
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TABLE effects (id bigint PRIMARY KEY)")
            conn.commit()
            with pytest.raises(RuntimeError), conn.transaction():
                conn.execute("INSERT INTO effects SELECT unnest(%s::bigint[])", (batch.ids,))
                w.complete(batch, conn=conn)
                raise RuntimeError("upsert failed after the complete")
            assert conn.execute("SELECT count(*) FROM effects").fetchone() == (0,)
        assert statuses(dsn) == {"claimed": 5}
        wait_past(dsn, batch.lease_until)
        again = w.claim()
        assert again.ids == ids
        w.complete(again)
    assert statuses(dsn) == {"done": 5}
    assert_no_leaks(dsn)


def test_complete_in_an_autocommit_connection_is_refused(dsn: str, claimer: Claimer) -> None:
    fill(dsn, 1)
    batch = claimer.claim()
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(ValueError):
        claimer.complete(batch, conn=conn)
    assert statuses(dsn) == {"claimed": 1}


# -- poison rows --------------------------------------------------------------------------


def no_backoff(dsn: str) -> None:
    """Failed rows are due again at once (the fleet-wide backoff set to zero)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE zen_settings SET retry_base_seconds = 0, retry_max_seconds = 0")


def test_poison_row_is_parked_after_max_attempts_until_requeued(dsn: str) -> None:
    (poison,) = fill(dsn, 1)
    no_backoff(dsn)
    with Claimer(dsn, owner="w", max_attempts=3) as w:
        for attempt in (1, 2, 3):
            batch = w.claim()
            assert batch.ids == [poison] and batch.claims[0].attempt == attempt
            w.fail(batch, f"boom {attempt}")
            r = row(dsn, poison)
            assert r["last_error"] == f"boom {attempt}" and r["attempts"] == attempt
        assert row(dsn, poison)["status"] == "failed"
        assert w.claim().claims == ()  # never claimed again...
        assert requeue(dsn) == 1  # ...until requeued
        batch = w.claim()
        assert batch.ids == [poison] and batch.claims[0].attempt == 1
        w.complete(batch)
    assert requeue(dsn) == 0
    assert_no_leaks(dsn)


def test_row_whose_workers_keep_dying_is_parked(dsn: str) -> None:
    """A row that kills every worker that takes it (no fail() is ever recorded) is
    reclaimed after each lease, and parked once its lease ran out max_attempts times."""
    poison, healthy = fill(dsn, 2)
    for attempt in (1, 2):
        with Claimer(dsn, owner=f"doomed{attempt}", lease_seconds=0.2, max_attempts=2) as w:
            batch = w.claim(limit=1)
            assert batch.ids == [poison] and batch.claims[0].attempt == attempt
        wait_past(dsn, batch.lease_until)  # the worker "died" holding the row
    with Claimer(dsn, owner="survivor", lease_seconds=60, max_attempts=2) as w:
        batch = w.claim()
        assert batch.ids == [healthy]  # the exhausted row is not handed out again
        assert w.parked == 1
    r = row(dsn, poison)
    assert r["status"] == "failed" and r["attempts"] == 2
    assert "lease expired after attempt 2" in r["last_error"]
    assert requeue(dsn) == 1
    assert_no_leaks(dsn)


def test_fail_of_some_claims_releases_only_those(dsn: str, claimer: Claimer) -> None:
    ids = fill(dsn, 4)
    batch = claimer.claim()
    claimer.fail(batch.claims[:1], "bad page")
    claimer.complete(Batch(batch.owner, batch.claims[1:], batch.lease_until))
    assert row(dsn, ids[0])["status"] == "retry"  # back after its backoff
    assert statuses(dsn) == {"retry": 1, "done": 3}


@pytest.mark.parametrize("inside", [False, True], ids=["own", "caller_transaction"])
def test_fail_each_keeps_each_rows_error(dsn: str, claimer: Claimer, inside: bool) -> None:
    """`fail_each`: one statement for the batch, each row with its own error, in its own
    transaction or in the caller's."""
    ids = fill(dsn, 3)
    batch = claimer.claim()
    failures = [(c, f"HTTP {400 + i} for {c.link}") for i, c in enumerate(batch.claims)]
    if inside:
        with psycopg.connect(dsn) as conn:
            claimer.fail_each(failures, conn=conn)
            assert statuses(dsn) == {"claimed": 3}  # not committed yet
    else:
        claimer.fail_each(failures)
    assert [row(dsn, i)["last_error"] for i in ids] == [e for _, e in failures]
    assert statuses(dsn) == {"retry": 3}


def test_requeue_any_status_fences_the_live_claim(dsn: str, claimer: Claimer) -> None:
    ids = fill(dsn, 3)
    batch = claimer.claim()
    assert requeue(dsn, ids[:1]) == 0  # claimed, not failed
    assert requeue(dsn, ids[:1], failed_only=False) == 1
    with pytest.raises(StaleClaimError):
        claimer.complete(batch)
    assert statuses(dsn) == {"pending": 1, "claimed": 2}


def test_requeue_cli(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = fill(dsn, 3)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE results SET status = 'failed', attempts = 5 WHERE id <> %s", (ids[0],))
    assert cli.main(["requeue", "--dsn", dsn, "--id", str(ids[1])]) == 0
    assert "requeued 1 row" in capsys.readouterr().out
    assert cli.main(["requeue", "--dsn", dsn]) == 0
    assert statuses(dsn) == {"pending": 3}
    # As a real command, too.
    out = subprocess.run(
        [sys.executable, "-m", "zenpipe", "requeue", "--dsn", dsn, "--all"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "requeued 0 rows" in out.stdout


# -- PgBouncer ----------------------------------------------------------------------------


@pytest.mark.pgbouncer
def test_claims_through_pgbouncer_in_transaction_mode(dsn: str, pgbouncer_dsn: str) -> None:
    ids = fill(dsn, 60)
    with (
        Claimer(pgbouncer_dsn, owner="pb-1", batch_size=20, pool_size=2, max_attempts=1) as a,
        Claimer(pgbouncer_dsn, owner="pb-2", batch_size=20, pool_size=2) as b,
    ):
        seen: list[int] = []
        for _ in range(3):
            for c in (a, b):
                batch = c.claim()
                if batch:
                    c.extend(batch)
                    with psycopg.connect(pgbouncer_dsn, prepare_threshold=None) as conn:
                        c.complete(batch, conn=conn)
                    seen += batch.ids
        assert sorted(seen) == ids
        (poison,) = fill(dsn, 1)
        batch = a.claim()
        a.fail(batch, "through the bouncer")
        assert row(dsn, poison)["status"] == "failed"
        assert requeue(pgbouncer_dsn, [poison]) == 1
    assert statuses(dsn) == {"done": 60, "pending": 1}
    assert_no_leaks(dsn)


@pytest.mark.pgbouncer
def test_behind_pgbouncer_a_claim_carries_the_pool_timeouts(dsn: str, pgbouncer_dsn: str) -> None:
    """Behind PgBouncer a claim is one pipeline (BEGIN, the timeouts, the claim,
    COMMIT): the timeouts must be in it, or a claim stuck behind a row lock would wait
    for ever instead of failing at ``lock_timeout``."""
    fill(dsn, 5)
    settings = Settings(lock_timeout="300ms", statement_timeout="20s")
    pool = guarded_pool(pgbouncer_dsn, name="pbt", min_size=1, max_size=2, settings=settings)
    out: dict[str, Any] = {}
    with psycopg.connect(dsn) as blocker, pool, Claimer(pool, owner="pb", retries=1) as c:
        assert pool.pgbouncer is True
        blocker.execute("SELECT id FROM results FOR UPDATE")

        def claim() -> None:
            try:
                out["batch"] = c.claim()
            except BaseException as e:
                out["error"] = e

        t = threading.Thread(target=claim)
        t.start()
        t.join(60)  # a bound, not a pace: the claim fails within 2 x 300 ms
        blocker.rollback()
        t.join()
        assert isinstance(out.get("error"), psycopg.errors.LockNotAvailable), out
        batch = c.claim()  # unblocked, the same pool claims
        assert len(batch.ids) == 5
        # the completion too: one pipeline with the timeouts
        blocker.execute("SELECT id FROM results WHERE id = ANY(%s) FOR UPDATE", (batch.ids,))
        out.clear()

        def complete() -> None:
            try:
                c.complete(batch)
            except BaseException as e:
                out["error"] = e

        t = threading.Thread(target=complete)
        t.start()
        t.join(60)
        blocker.rollback()
        t.join()
        assert isinstance(out.get("error"), psycopg.errors.LockNotAvailable), out
        c.complete(batch)
    assert statuses(dsn) == {"done": 5}
    assert_no_leaks(dsn)


def test_jsonb_data_round_trips(dsn: str, claimer: Claimer) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO results (link, data) VALUES (NULL, %s)",
            (Jsonb({"name": "Café ☕", "tags": [1, 2], "nested": {"a": None}}),),
        )
    (c,) = claimer.claim().claims
    assert c.link is None and c.data == {"name": "Café ☕", "tags": [1, 2], "nested": {"a": None}}
    claimer.complete(Batch(claimer.owner, (c,), claimer.claim().lease_until))


def test_leak_check_sees_an_open_claim(dsn: str) -> None:
    """The check every test ends with can fail: an open claim transaction shows up as
    its locks and, once idle, as an idle-in-transaction session."""
    from zenpipe.locks import leftovers

    fill(dsn, 5)
    with Claimer(dsn, owner="open") as c, psycopg.connect(dsn) as conn:
        batch = c.claim(conn=conn)
        with psycopg.connect(dsn, autocommit=True) as monitor:
            left = leftovers(monitor)
        assert left.advisory_locks == len(batch) == 5
        assert left.idle_in_transaction == 1
        assert left
        conn.rollback()
    assert_no_leaks(dsn)


# -- hardening (issue 8) ------------------------------------------------------------------


def _expire(dsn: str, ids: list[int]) -> None:
    """Let the leases of *ids* run out now (the holder died), as the clock would."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE results SET lease_until = clock_timestamp() - interval '1 second' "
            "WHERE id = ANY(%s)",
            (ids,),
        )


def test_expired_rows_come_back_in_halves_then_alone(dsn: str) -> None:
    """Point 2: rows whose lease ran out during enrichment are re-claimed half a batch
    at a time after one expiry and alone after two, never as the same whole group."""
    ids = fill(dsn, 20)
    with Claimer(dsn, owner="w", batch_size=20, max_attempts=5) as w:
        first = w.claim()
        assert first.ids == ids
        _expire(dsn, ids)  # the worker died on one of them
        halves = [w.claim(), w.claim()]
        assert [len(b) for b in halves] == [10, 10]
        assert sorted(halves[0].ids + halves[1].ids) == ids
        w.complete(halves[1])
        _expire(dsn, halves[0].ids)  # died again, in the first half
        alone = [w.claim() for _ in range(10)]
        assert [len(b) for b in alone] == [1] * 10
        assert sorted(i for b in alone for i in b.ids) == sorted(halves[0].ids)
        assert {row(dsn, i)["expiries"] for i in halves[0].ids} == {2}
        # A lease lost while the batch was being written is no expiry.
        w.extend(alone[0], settling=True)
        _expire(dsn, alone[0].ids)
        again = w.claim()
        assert again.ids == alone[0].ids and row(dsn, again.ids[0])["expiries"] == 2
        for b in (again, *alone[1:]):
            w.complete(b)
        assert statuses(dsn) == {"done": 20}
    assert_no_leaks(dsn)


def test_only_a_row_that_expires_alone_is_parked(dsn: str) -> None:
    """Point 2/6: parking for expired leases needs the row to have been claimed alone
    (its own fault) max_attempts claims in; rows that expired in a group or while their
    batch was settling are split or re-claimed, never parked."""
    ids = fill(dsn, 4)
    with Claimer(dsn, owner="w", batch_size=4, max_attempts=1, lease_seconds=60) as w:
        group = w.claim()
        _expire(dsn, ids)
        w._next_park = 0.0
        halves = w.claim()  # a group of 4 expired at attempt 1 >= max: split, not parked
        assert len(halves) == 2 and w.parked == 0
        w.extend(halves, settling=True)
        _expire(dsn, halves.ids)
        w._next_park = 0.0
        half_again = w.claim()  # expired while settling: claimed again, not parked
        assert w.parked == 0 and set(half_again.ids) <= set(halves.ids)
        w.complete(half_again)
        other_half = w.claim()  # the rest of the first group: half a batch again
        assert sorted(other_half.ids) == sorted(set(ids) - set(halves.ids))
        _expire(dsn, other_half.ids)  # a second expiry: the rows come back alone
        w._next_park = 0.0
        rest = [w.claim() for _ in range(2)]
        assert [len(b) for b in rest] == [1, 1] and w.parked == 0
        _expire(dsn, rest[0].ids)  # expired while alone at attempt >= max_attempts
        w._next_park = 0.0
        w.claim()
        assert w.parked == 1
        assert row(dsn, rest[0].ids[0])["status"] == "failed"
        w.complete(rest[1])
    assert group.ids == ids
    assert statuses(dsn) == {"done": 3, "failed": 1}
    assert_no_leaks(dsn)


def test_fail_retried_after_its_commit_landed_succeeds(dsn: str) -> None:
    """Point 3: a retried fail() whose first try committed (its acknowledgement lost)
    finds the rows released by this very claim and succeeds, changing nothing; another
    claim's fail() on them is still fenced."""
    ids = fill(dsn, 3)
    with Claimer(dsn, owner="w", batch_size=3, max_attempts=1) as w:
        batch = w.claim()
        w.fail(batch.claims[:2], "first")
        w.fail(batch.claims[:2], "retry")  # what a retry after a lost ack does
        assert [row(dsn, i)["last_error"] for i in ids[:2]] == ["first", "first"]
        assert {row(dsn, i)["status"] for i in ids[:2]} == {"failed"}
        w.complete(Batch(batch.owner, batch.claims[2:], batch.lease_until))
        requeue(dsn, ids[:1])
        retaken = w.claim()
        assert retaken.ids == ids[:1]
        with pytest.raises(StaleClaimError):
            w.fail(batch.claims[:1], "late")  # the old claim no longer holds it
        w.complete(retaken)
    assert statuses(dsn) == {"done": 2, "failed": 1}


def test_errors_text_cannot_hold_are_stored_escaped(dsn: str) -> None:
    """An error message with a NUL byte or a lone surrogate (scraped bytes decoded with
    surrogateescape, say), which PostgreSQL text cannot hold, is stored with them
    escaped: before, fail() raised (DataError, UnicodeEncodeError) and the rows stayed
    claimed until their lease ran out."""
    ids = fill(dsn, 3)
    errors = ["ValueError: page has a \x00 byte", "ValueError: bad \udc80 byte", "plain"]
    with Claimer(dsn, owner="w", batch_size=3) as w:
        batch = w.claim()
        w.fail_each(list(zip(batch.claims, errors, strict=True)))
    assert [row(dsn, i)["last_error"] for i in ids] == [
        "ValueError: page has a \\x00 byte",
        "ValueError: bad \\udc80 byte",
        "plain",
    ]
    assert {row(dsn, i)["status"] for i in ids} <= {"pending", "retry"}
    assert_no_leaks(dsn)


def test_lease_counts_from_the_statement_not_the_transaction_start(dsn: str) -> None:
    """Point 8: claim(conn=...) inside a transaction older than the lease commits a
    lease that lies in the future, so no other claimer takes the rows at once."""
    fill(dsn, 3)
    with (
        Claimer(dsn, owner="late", lease_seconds=2) as late,
        Claimer(dsn, owner="other") as other,
        psycopg.connect(dsn) as conn,
    ):
        conn.execute("SELECT 1")  # the transaction starts here
        while conn.execute("SELECT clock_timestamp() - now() > interval '3 s'").fetchone() != (
            True,
        ):
            time.sleep(0.05)
        batch = late.claim(conn=conn)
        conn.commit()
        assert len(batch) == 3
        assert other.claim().ids == []  # the lease holds the rows
        with psycopg.connect(dsn) as check:
            left = check.execute(
                "SELECT min(lease_until) > clock_timestamp() FROM results"
            ).fetchone()
        assert left == (True,)
        late.complete(batch)
    assert_no_leaks(dsn)


def test_park_runs_in_its_own_statement_and_skips_locked_rows(dsn: str) -> None:
    """Point 9: parking never runs inside a claim: a late owner completing an exhausted
    row right now (its row lock held) neither blocks the claim nor deadlocks with it, and
    the row is parked once that lock is gone (if it is still exhausted)."""
    exhausted, healthy = fill(dsn, 2)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE results SET status = 'claimed', claim_owner = 'dead', claim_token = 1, "
            "claim_id = gen_random_uuid(), claim_size = 1, attempts = 3, "
            "lease_until = clock_timestamp() - interval '1 s' WHERE id = %s",
            (exhausted,),
        )
    with (
        Claimer(dsn, owner="w", max_attempts=3) as w,
        psycopg.connect(dsn) as late_owner,
    ):
        late_owner.execute("SELECT 1 FROM results WHERE id = %s FOR UPDATE", (exhausted,))
        got: dict[str, Any] = {}
        t = threading.Thread(target=lambda: got.setdefault("batch", w.claim()), daemon=True)
        t.start()
        t.join(60)
        alive = t.is_alive()
        late_owner.rollback()
        t.join()
        assert not alive, "the claim waited on a row lock held by the row's late owner"
        assert got["batch"].ids == [healthy]
        assert w.parked == 0 and row(dsn, exhausted)["status"] == "claimed"
        w._next_park = 0.0
        w.complete(got["batch"])
        assert w.claim().ids == []
        assert w.parked == 1 and row(dsn, exhausted)["status"] == "failed"
    assert_no_leaks(dsn)


def test_tokens_that_repeat_after_a_lost_commit_do_not_fence_open(tmp_path: Any) -> None:
    """Point 7: with synchronous_commit = off a crash loses an acknowledged claim and
    rewinds the token sequence; a second claim of the same rows then gets the same
    token. The first claim's complete() must still be refused (claim_id differs)."""
    from zenpipe import schema
    from zenpipe.embedded import ThrowawayPostgres

    # Nothing flushes WAL behind the test's back: no WAL writer round, no background
    # writer writing a dirty page (which flushes WAL up to it first).
    quiet = {"wal_writer_delay": "10s", "bgwriter_lru_maxpages": "0"}
    with ThrowawayPostgres(settings=quiet) as server:
        dsn = server.dsn
        schema.apply(dsn)
        ids = fill(dsn, 3)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT setval('results_claim_token_seq', 1000)")  # flushed
            # Start the claim's WAL near the beginning of a WAL page, so that the WAL
            # writer (which writes whole pages only) cannot flush its nextval() record
            # without its commit record.
            for _ in range(3):
                lsn = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
                assert lsn is not None
                off = int(lsn[0]) % 8192
                if off < 2048:
                    break
                conn.execute(
                    "SELECT pg_logical_emit_message(false, 'pad', repeat('x', %s))",
                    (8192 - off + 64,),
                )
                conn.execute("SELECT pg_current_xact_id()")  # a commit: flushes the pad
        lossy = f"{dsn} options='-c synchronous_commit=off'"
        with Claimer(lossy, owner="first") as first:
            lost = first.claim()  # acknowledged, not yet flushed
        assert lost.ids == ids
        server.restart(mode="immediate")
        with Claimer(dsn, owner="second") as second:
            again = second.claim()
            assert again.ids == ids
            # The sequence rewound: the same token was handed out twice...
            assert {c.token for c in again.claims} == {c.token for c in lost.claims}
            # ...but only the claim that holds the rows may settle them.
            with pytest.raises(StaleClaimError):
                second.complete(lost)
            second.complete(again)
        assert statuses(dsn) == {"done": 3}


def test_release_gives_rows_back_without_spending_an_attempt(dsn: str) -> None:
    ids = fill(dsn, 3)
    with Claimer(dsn, owner="w", batch_size=3) as w, Claimer(dsn, owner="x") as x:
        batch = w.claim()
        w.release(batch.claims[:2])
        w.release(batch.claims[:2])  # a retry after a lost acknowledgement
        assert [row(dsn, i)["attempts"] for i in ids] == [0, 0, 1]
        assert statuses(dsn) == {"pending": 2, "claimed": 1}
        again = x.claim()
        assert again.ids == ids[:2] and [c.attempt for c in again.claims] == [1, 1]
        with pytest.raises(StaleClaimError):
            w.release(batch.claims[:1])  # x holds it now
        x.complete(again)
        w.complete(Batch(batch.owner, batch.claims[2:], batch.lease_until))
    assert statuses(dsn) == {"done": 3}
    assert_no_leaks(dsn)


# -- retries and fleet-wide settings (issue 9, point 4) -----------------------------------


def _due_in(dsn: str, rid: int) -> float:
    with psycopg.connect(dsn) as conn:
        got = conn.execute(
            "SELECT extract(epoch FROM not_before - statement_timestamp())::float8 "
            "FROM results WHERE id = %s AND status = 'retry'",
            (rid,),
        ).fetchone()
    assert got is not None, "the row is not waiting for a retry"
    return float(got[0])


def test_failed_rows_wait_out_an_exponential_jittered_capped_backoff(dsn: str) -> None:
    (rid,) = fill(dsn, 1)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE zen_settings SET retry_base_seconds = 100, retry_max_seconds = 250, "
            "retry_jitter = 0.5"
        )
    with Claimer(dsn, owner="w") as w:
        for attempt, (lo, hi) in enumerate([(50, 100), (100, 200), (125, 250)], start=1):
            batch = w.claim()
            assert batch.ids == [rid] and batch.claims[0].attempt == attempt
            w.fail(batch, f"boom {attempt}")
            due = _due_in(dsn, rid)
            assert lo - 1 <= due <= hi, (attempt, due)
            waiting = w.claim()  # not claimable while it waits...
            assert waiting.ids == [] and not waiting.contended
            assert waiting.retry_in is not None and lo - 2 <= waiting.retry_in <= hi
            with psycopg.connect(dsn) as conn:  # ...claimable once its time has come
                conn.execute(
                    "UPDATE results SET not_before = clock_timestamp() - interval '1 s' "
                    "WHERE id = %s",
                    (rid,),
                )
        last = w.claim()
        assert last.claims[0].attempt == 4
        w.complete(last)
    assert statuses(dsn) == {"done": 1}
    assert_no_leaks(dsn)


def test_max_attempts_is_a_fleet_wide_setting(dsn: str) -> None:
    """Claimers without an override read zen_settings.max_attempts at each statement: a
    change applies to the whole fleet at once."""
    a, b = fill(dsn, 2)
    no_backoff(dsn)
    with Claimer(dsn, owner="fleet", batch_size=1) as fleet:
        first = fleet.claim()
        fleet.fail(first, "boom")
        assert row(dsn, a)["status"] == "retry"  # 1 attempt of the default 5
        with psycopg.connect(dsn) as conn:
            conn.execute("UPDATE zen_settings SET max_attempts = 2")
        again = fleet.claim()
        assert again.ids == [a]
        fleet.fail(again, "boom")
        assert row(dsn, a)["status"] == "failed"  # the new fleet-wide limit
        with Claimer(dsn, owner="tool", batch_size=1, max_attempts=1) as tool:
            mine = tool.claim()
            assert mine.ids == [b]
            tool.fail(mine, "boom")  # this claimer's own override
        assert row(dsn, b)["status"] == "failed"
    assert_no_leaks(dsn)


def test_requeue_any_status_without_ids_is_refused(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--any-status` alone used to requeue every done row without a word."""
    ids = fill(dsn, 3)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE results SET status = 'done' WHERE id = ANY(%s)", (ids,))
    assert cli.main(["requeue", "--dsn", dsn, "--any-status"]) == 2
    assert "--any-status needs --id" in capsys.readouterr().err
    assert statuses(dsn) == {"done": 3}
    assert cli.main(["requeue", "--dsn", dsn, "--any-status", "--id", str(ids[0])]) == 0
    assert statuses(dsn) == {"done": 2, "pending": 1}


def test_settings_cli_shows_and_changes_the_fleet_settings(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["settings", "--dsn", dsn, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_attempts"] == 5 and shown["retry_base_seconds"] == 2
    assert cli.main(["settings", "--dsn", dsn, "--max-attempts", "2", "--retry-base", "0.5"]) == 0
    assert "max_attempts        2" in capsys.readouterr().out
    # A value the table refuses names its constraint and changes nothing.
    assert cli.main(["settings", "--dsn", dsn, "--retry-jitter", "3"]) == 2
    assert "zen_settings_retry_jitter_check" in capsys.readouterr().err
    (rid,) = fill(dsn, 1)
    with Claimer(dsn, owner="w") as w:  # the fleet's new max_attempts applies at once
        for _ in range(2):
            b = w.claim()
            w.fail(b, "boom")
            with psycopg.connect(dsn) as conn:
                conn.execute("UPDATE results SET not_before = clock_timestamp() - interval '1s'")
    assert row(dsn, rid)["status"] == "failed"


def test_a_claim_reads_its_window_not_the_backlog_before_any_analyze(dsn: str) -> None:
    # Right after a bulk load results has no statistics (autovacuum has not analyzed it
    # yet): the planner then guessed a few hundred pending rows and chose a bitmap scan
    # of every pending row plus a sort, reading the whole backlog on every claim (29 ms
    # per claim over 15,000 rows in the bench, growing with the backlog).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE results SET (autovacuum_enabled = off)")
    fill(dsn, 20_000)

    def rows_read(conn: Conn) -> int:
        # this backend's counts not yet flushed to the shared statistics: a running sum
        got = conn.execute(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) "
            "FROM pg_stat_xact_user_tables WHERE relname = 'results'"
        ).fetchone()
        assert got is not None
        return int(got[0])

    with psycopg.connect(dsn) as conn, Claimer(dsn, owner="w", batch_size=100) as claimer:
        for _ in range(8):  # past plpgsql's five custom plans: the generic plan too
            before = rows_read(conn)
            batch = claimer.claim(conn=conn)
            assert len(batch) == 100
            read = rows_read(conn) - before
            conn.rollback()
            # the candidate window (4 x the batch) and the rows taken, not 20,000
            assert read <= 2 * (4 * 100 + 100), read
