"""The worker loop and the end-to-end demo, on a real server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

import psycopg
import pytest
from helpers import assert_no_leaks, wait_for, wait_past

from zenpipe import demo
from zenpipe.claim import Claim, Claimer
from zenpipe.upsert import Upserter
from zenpipe.worker import Worker


def one(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def test_worker_writes_contacts_and_settles_every_row(dsn: str) -> None:
    seeded = demo.seed(dsn, 600)
    with Worker(dsn, demo.enrich, server_id="s1", batch_size=50, max_attempts=2) as w:
        stats = w.run(until_idle=True)
    poison, bad = seeded["poison"], seeded["bad"]
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 600 - poison
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'failed'") == poison
    assert one(dsn, "SELECT count(*) FROM zen_rejects") == bad
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == one(
        dsn,
        "SELECT count(DISTINCT link) FROM results WHERE status = 'done' "
        "AND data->>'country' ~ '^[A-Z]{2}$'",
    )
    # Every contact points at a source row it came from.
    assert one(dsn, "SELECT count(*) FROM zen_contacts WHERE source_id IS NULL") == 0
    assert stats.claimed == 600 + poison  # poison rows were claimed twice
    assert stats.failed == 2 * poison
    assert stats.written + stats.rejected == 600 - poison
    # Bookkeeping: one job row per batch, hourly stats add up to the same figures.
    assert one(dsn, "SELECT count(*), sum(rows_claimed) FROM zen_jobs") == (
        stats.batches,
        stats.claimed,
    )
    assert one(dsn, "SELECT sum(rows_written), sum(rows_failed) FROM zen_stats_hourly") == (
        stats.written,
        stats.failed,
    )
    assert_no_leaks(dsn)


def test_lease_is_extended_while_enrichment_runs(dsn: str) -> None:
    """Enrichment slower than the lease: the background extension keeps the rows, so a
    second claimer gets nothing and the batch is written once, not stale.

    Driven by events, not timing: enrichment holds until the first lease has run out by
    the server's clock and a thief has tried to claim (issue 8, point 18)."""
    demo.seed(dsn, 4)
    stolen: list[int] = []
    thief_tried = threading.Event()

    def slow(claim: Claim) -> dict[str, Any]:
        assert thief_tried.wait(120)
        return demo.enrich(claim) | {"country_code": "ID"}

    with Worker(dsn, slow, server_id="s1", batch_size=4, lease_seconds=3) as w:
        result: dict[str, int] = {}
        t = threading.Thread(target=lambda: result.setdefault("n", w.run_once()))
        t.start()
        first = wait_for(
            lambda: one(dsn, "SELECT min(lease_until) FROM results WHERE status = 'claimed'")
        )
        wait_past(dsn, first, timeout=120)
        with Claimer(dsn, owner="thief") as c:
            stolen.extend(c.claim().ids)
        thief_tried.set()
        t.join()
        claimed = result["n"]
    assert claimed == 4
    assert stolen == []
    assert w.stats.stale_batches == 0
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 4
    assert one(dsn, "SELECT max(attempts) FROM results") == 1
    assert_no_leaks(dsn)


def test_lease_is_kept_while_the_batch_is_written(dsn: str) -> None:
    """Issue 8, point 6: the lease keeper runs until the batch is settled. A write that
    waits longer than the lease (here behind a row lock on one of its contacts) keeps
    its rows: no other claimer takes them, the batch is written once, not fenced."""
    _fill(dsn, 3)
    link = one(dsn, "SELECT link FROM results ORDER BY id LIMIT 1")
    with Upserter(dsn, server_id="other") as up:
        up.upsert([{"source_link": link, "country_code": "ID"}])
    with Worker(dsn, _enrich_id, server_id="s1", batch_size=3, lease_seconds=3) as w:
        locker = psycopg.connect(dsn)
        locker.execute("SELECT 1 FROM zen_contacts WHERE source_link = %s FOR UPDATE", (link,))
        t = threading.Thread(target=w.run_once)
        t.start()
        try:
            wait_for(
                lambda: one(
                    dsn,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'",
                ),
                timeout=120,
            )
            lease = one(dsn, "SELECT min(lease_until) FROM results WHERE status = 'claimed'")
            wait_past(dsn, lease, timeout=120)
            with Claimer(dsn, owner="thief") as thief:
                stolen = thief.claim().ids
        finally:
            locker.rollback()
            locker.close()
            t.join()
    assert stolen == []
    assert w.stats.stale_batches == 0
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 3
    assert one(dsn, "SELECT max(attempts) FROM results") == 1
    assert one(dsn, "SELECT scrape_count FROM zen_contacts WHERE source_link = %s", (link,)) == 2
    assert_no_leaks(dsn)


def _enrich_id(claim: Claim) -> dict[str, Any]:
    return {"source_link": claim.link, "source_id": claim.id, "country_code": "ID"}


def _fill(dsn: str, n: int, poison: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "INSERT INTO results (link, data) SELECT 'https://maps.example.com/w' || g, "
            "jsonb_build_object('n', g, 'poison', g = ANY(%s)) "
            "FROM generate_series(1, %s) AS g RETURNING id",
            (sorted(poison), n),
        ).fetchall()
    return [r[0] for r in rows]


def test_lost_fail_acknowledgement_does_not_abandon_the_good_rows(dsn: str) -> None:
    """Issue 8, point 3: fail() retried after its first commit landed (what a lost
    acknowledgement leads to) succeeds, and the good rows of the batch are written at
    once instead of waiting out the lease."""
    _fill(dsn, 5, poison={3})

    def enrich(claim: Claim) -> dict[str, Any]:
        if claim.data["poison"]:
            raise ValueError("page does not parse")
        return _enrich_id(claim)

    with Worker(dsn, enrich, server_id="s1", batch_size=5) as w:
        real_fail = w.claimer.fail

        def fail_with_lost_ack(claims: Any, error: str, **kw: Any) -> None:
            real_fail(claims, error, **kw)  # committed; the acknowledgement is lost...
            real_fail(claims, error, **kw)  # ...so the claimer's retry runs it again

        w.claimer.fail = fail_with_lost_ack  # type: ignore[method-assign]
        assert w.run_once() == 5
    assert w.stats.stale_batches == 0
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 4
    assert one(dsn, "SELECT status, last_error FROM results WHERE data->>'poison' = 'true'") == (
        "retry",
        "ValueError: page does not parse",
    )
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == 4
    assert_no_leaks(dsn)


class _Hostile(Mapping[str, Any]):
    """A record whose every read raises: a bug in the user's enrichment."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("hostile record")

    def __iter__(self) -> Any:
        raise RuntimeError("hostile record")

    def __len__(self) -> int:
        return 1


def test_a_record_that_breaks_the_write_does_not_abandon_its_batch(dsn: str) -> None:
    """Issue 8, point 1: a record that validation or the write cannot take (an int too
    large for a float, a mapping whose reads raise) is rejected or failed on its own;
    the rest of the batch commits at once, nothing stays claimed."""
    ids = _fill(dsn, 20)
    huge, hostile = ids[4], ids[11]

    def enrich(claim: Claim) -> Mapping[str, Any]:
        if claim.id == huge:
            return _enrich_id(claim) | {"latitude": 10**400}
        if claim.id == hostile:
            return _Hostile()
        return _enrich_id(claim)

    with Worker(dsn, enrich, server_id="s1", batch_size=20, max_attempts=1) as w:
        assert w.run_once() == 20
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'claimed'") == 0
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == 18
    assert one(dsn, "SELECT field FROM zen_rejects WHERE row_index >= 0 AND source_link = "
               "(SELECT link FROM results WHERE id = %s)", (huge,)) == "latitude"  # fmt: skip
    status, error = one(dsn, "SELECT status, last_error FROM results WHERE id = %s", (hostile,))
    rejected = one(dsn, "SELECT count(*) FROM zen_rejects WHERE source_link IS NULL")
    assert (status == "failed" and "hostile record" in error) or (
        status == "done" and rejected == 1
    )
    assert_no_leaks(dsn)


_SUICIDAL_WORKER = """
import os, signal, sys, time
import psycopg
from zenpipe.upsert import Upserter
from zenpipe.worker import Worker

dsn = sys.argv[1]

def enrich(claim):
    if claim.data["poison"]:
        os.kill(os.getpid(), signal.SIGKILL)  # the page crashes the parser, and us
    return {"source_link": claim.link, "source_id": claim.id, "country_code": "ID"}

with Worker(dsn, enrich, server_id="s1", batch_size=20, lease_seconds=3,
            max_attempts=3) as w, psycopg.connect(dsn, autocommit=True) as conn:
    while conn.execute(
        "SELECT count(*) FROM results WHERE status IN ('pending', 'claimed')"
    ).fetchone()[0]:
        if not w.run_once():
            time.sleep(0.2)  # rows held by a dead worker: their lease has to run out
"""


@pytest.mark.slow
def test_row_that_kills_its_worker_is_parked_alone(dsn: str) -> None:
    """Issue 8, point 2: a real worker process that SIGKILLs itself on one row of a
    batch of 20, restarted after each death: that row alone is parked, the 19 others
    are done (they used to be re-claimed with it, as one group, until all 20 parked)."""
    ids = _fill(dsn, 20, poison={7})
    deaths = 0
    for _ in range(10):
        proc = subprocess.run(
            [sys.executable, "-c", _SUICIDAL_WORKER, dsn],
            check=False, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        deaths += 1
    else:
        raise AssertionError(f"the fleet did not settle after {deaths} deaths")
    poison = ids[6]
    status, error = one(dsn, "SELECT status, last_error FROM results WHERE id = %s", (poison,))
    assert status == "failed" and "lease expired" in error
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 19
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == 19
    assert deaths <= 3 + 2  # max_attempts claims of the row, alone after two expiries
    assert_no_leaks(dsn)


def test_lost_lease_writes_nothing(dsn: str) -> None:
    """A worker whose rows were taken over (requeued) while it enriched writes nothing."""
    demo.seed(dsn, 3)

    def requeue_meanwhile(claim: Claim) -> dict[str, Any]:
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "UPDATE results SET claim_token = NULL, status = 'pending' WHERE id = %s",
                (claim.id,),
            )
        return demo.enrich(claim) | {"country_code": "ID"}

    with Worker(dsn, requeue_meanwhile, server_id="s1", batch_size=3) as w:
        w.run_once()
    assert w.stats.stale_batches == 1
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == 0
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 0


@pytest.mark.slow
def test_demo_command_runs_the_fleet_and_checks_invariants(empty_dsn: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zenpipe", "demo", "--dsn", empty_dsn, "--rows", "3000",
         "--servers", "2", "--workers", "2", "--batch", "100", "--json"],
        check=False,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout[done.stdout.index("{") :])
    assert report["ok"] is True
    checks = report["checks"]
    assert checks["rows_left"] == 0
    assert checks["contacts"] == checks["expected_contacts"] > 0
    assert checks["rejects"] == report["seeded"]["bad"]
    assert report["errors"] == []


# -- concurrency and abort (issue 9) ------------------------------------------------------


def test_plain_enrichment_runs_concurrently_up_to_the_bound(dsn: str) -> None:
    """Four rows can only pass the barrier together: the batch is enriched by four
    threads at once (with one thread the barrier times out and the rows fail)."""
    _fill(dsn, 8)
    barrier = threading.Barrier(4, timeout=60)
    running = 0
    peak = 0
    lock = threading.Lock()

    def enrich(claim: Claim) -> dict[str, Any]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        barrier.wait()
        with lock:
            running -= 1
        return _enrich_id(claim)

    with Worker(dsn, enrich, server_id="s1", batch_size=8, concurrency=4) as w:
        assert w.run_once() == 8
    assert peak == 4
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 8
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == 8
    assert_no_leaks(dsn)


def test_async_enrichment_runs_concurrently_on_the_event_loop(dsn: str) -> None:
    import asyncio

    _fill(dsn, 6)
    barrier: asyncio.Barrier | None = None

    async def enrich(claim: Claim) -> dict[str, Any]:
        nonlocal barrier
        if barrier is None:
            barrier = asyncio.Barrier(3)
        await asyncio.wait_for(barrier.wait(), 60)
        if claim.id == 2:
            raise ValueError("async page does not parse")
        return _enrich_id(claim)

    with Worker(dsn, enrich, server_id="s1", batch_size=6, concurrency=3) as w:
        assert w.run_once() == 6
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 5
    assert one(dsn, "SELECT last_error FROM results WHERE id = 2") == (
        "ValueError: async page does not parse"
    )
    assert_no_leaks(dsn)


def test_abort_releases_the_rows_not_yet_enriched(dsn: str) -> None:
    """A graceful shutdown whose grace ran out: the row being enriched is finished and
    written, the rest of the batch goes back to pending without spending an attempt."""
    ids = _fill(dsn, 5)
    started = threading.Event()
    aborted = threading.Event()

    def enrich(claim: Claim) -> dict[str, Any]:
        if claim.id == ids[0]:
            started.set()
            assert aborted.wait(60)
        return _enrich_id(claim)

    with Worker(dsn, enrich, server_id="s1", batch_size=5) as w:
        t = threading.Thread(target=w.run_once)
        t.start()
        assert started.wait(60)
        w.abort()
        aborted.set()
        t.join()
        assert w.run_once() == 0  # aborted: claims nothing more
    assert w.stats.released == 4
    assert one(dsn, "SELECT status FROM results WHERE id = %s", (ids[0],)) == "done"
    assert one(dsn, "SELECT count(*), max(attempts) FROM results WHERE status = 'pending'") == (
        4,
        0,
    )
    assert_no_leaks(dsn)


def test_abort_can_give_back_the_rows_being_enriched(dsn: str) -> None:
    """abort(release_in_flight=True): every row of the batch, the one stuck in its
    enrichment included, is pending again at once; when the enrichment returns, the
    worker settles nothing."""
    ids = _fill(dsn, 5)
    started = threading.Event()
    unblock = threading.Event()

    def enrich(claim: Claim) -> dict[str, Any]:
        if claim.id == ids[0]:
            started.set()
            assert unblock.wait(60)
        return _enrich_id(claim)

    with Worker(dsn, enrich, server_id="s1", batch_size=5) as w:
        t = threading.Thread(target=w.run_once)
        t.start()
        assert started.wait(60)
        assert w.abort(release_in_flight=True) == 5
        assert one(dsn, "SELECT count(*), max(attempts) FROM results WHERE status = 'pending'") == (
            5,
            0,
        )
        unblock.set()
        t.join()
    assert w.stats.released == 5 and w.stats.stale_batches == 0
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == 0
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'pending'") == 5
    assert_no_leaks(dsn)


def test_the_next_batch_is_enriched_while_the_last_one_is_written(dsn: str) -> None:
    """Pipelining: batch 1's write waits behind a row lock, and batch 2 is claimed and
    enriched meanwhile (without pipelining its enrichment could only start once batch 1
    had landed). Both land once the lock is gone."""
    ids = _fill(dsn, 4)
    link = one(dsn, "SELECT link FROM results WHERE id = %s", (ids[0],))
    with Upserter(dsn, server_id="other") as up:
        up.upsert([{"source_link": link, "country_code": "ID"}])
    second_batch_enriched = threading.Event()

    def enrich(claim: Claim) -> dict[str, Any]:
        if claim.id == ids[2]:
            second_batch_enriched.set()
        return _enrich_id(claim)

    stop = threading.Event()
    with Worker(dsn, enrich, server_id="s1", batch_size=2, lease_seconds=30) as w:
        locker = psycopg.connect(dsn)
        locker.execute("SELECT 1 FROM zen_contacts WHERE source_link = %s FOR UPDATE", (link,))
        t = threading.Thread(target=w.run, args=(stop,), kwargs={"until_idle": True})
        t.start()
        try:
            assert second_batch_enriched.wait(120)
            # batch 1 is still being written: its rows are claimed, none done yet
            assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 0
        finally:
            locker.rollback()
            locker.close()
            t.join()
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 4
    assert w.stats.stale_batches == 0
    assert_no_leaks(dsn)


def test_every_batch_reports_one_event_when_it_lands(dsn: str) -> None:
    from zenpipe.events import BatchEvent

    ids = _fill(dsn, 6, poison={2})
    events: list[BatchEvent] = []
    lock = threading.Lock()

    def on_event(e: BatchEvent) -> None:
        with lock:
            events.append(e)

    def enrich(claim: Claim) -> dict[str, Any]:
        if claim.data["poison"]:
            raise ValueError("bad page")
        if claim.id == ids[5]:  # taken over while enriched: the batch goes stale
            with psycopg.connect(dsn) as conn:
                conn.execute(
                    "UPDATE results SET claim_token = NULL, status = 'pending' WHERE id = %s",
                    (claim.id,),
                )
        return _enrich_id(claim)

    with Worker(dsn, enrich, server_id="s1", batch_size=3, on_event=on_event) as w:
        assert w.run_once() == 3
        assert w.run_once() == 3
    assert [(e.outcome, e.rows, e.written, e.failed) for e in events] == [
        ("settled", 3, 2, 1),
        ("stale", 3, 0, 0),
    ]
    assert all(e.worker == "s1/w0" and e.claim_seconds > 0 and e.write_seconds > 0
               for e in events)  # fmt: skip


def test_a_write_retried_after_its_backend_was_terminated_reports_the_retry(dsn: str) -> None:
    """BatchEvent.retries counts the write transactions retried (it was always 0)."""
    from zenpipe.events import BatchEvent

    _fill(dsn, 3)
    link = "https://maps.example.com/w1"
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO zen_contacts (partition_key, source_link) VALUES (hashtext(%s), %s)",
            (link, link),
        )
    events: list[BatchEvent] = []
    # A row lock on that contact holds the worker's merge, so its backend can be
    # terminated in the middle of the write; the upserter retries on a new connection.
    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT 1 FROM zen_contacts WHERE source_link = %s FOR UPDATE", (link,))
    with Worker(dsn, _enrich_id, server_id="s1", batch_size=3, on_event=events.append) as w:
        runner = threading.Thread(target=w.run_once)
        runner.start()
        try:
            waiting = (
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO zen_contacts%%'"
            )
            wait_for(lambda: bool(one(dsn, f"SELECT count(*) FROM ({waiting}) AS w")))
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"SELECT pg_terminate_backend(pid) FROM ({waiting}) AS w")
        finally:
            blocker.rollback()
            blocker.close()
            runner.join(60)
    assert not runner.is_alive()
    assert [(e.outcome, e.written, e.retries) for e in events] == [("settled", 3, 1)]
    # written once: the retry found nothing committed by the terminated attempt
    assert one(dsn, "SELECT scrape_count FROM zen_contacts WHERE source_link = %s", (link,)) == 1
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 3
    assert_no_leaks(dsn)


def test_an_error_text_cannot_hold_does_not_stop_the_batch(dsn: str) -> None:
    """An enrichment error whose message carries a NUL byte or a lone surrogate (text
    PostgreSQL cannot store): the good rows are written and done, the failed rows
    released with the message escaped.  Before, the failure statement raised inside
    the write, so nothing of the batch was settled until its lease ran out."""
    ids = _fill(dsn, 4, poison={2, 3})

    def enrich(claim: Claim) -> dict[str, Any]:
        if claim.data["poison"]:
            tail = "\x00" if claim.data["n"] == 2 else "\udc80"
            raise ValueError(f"page {claim.data['n']} has {tail}")
        return _enrich_id(claim)

    with Worker(dsn, enrich, server_id="s1", batch_size=4) as w:
        w.run_once()
    with psycopg.connect(dsn) as conn:
        got = dict(conn.execute("SELECT id, (status, last_error) FROM results").fetchall())
    written = one(dsn, "SELECT count(*) FROM zen_contacts")
    assert [got[i] for i in ids] == [
        ("done", None),
        ("retry", "ValueError: page 2 has \\x00"),
        ("retry", "ValueError: page 3 has \\udc80"),
        ("done", None),
    ]
    assert (w.stats.written, w.stats.failed, written) == (2, 2, 2)
    assert_no_leaks(dsn)


def test_failures_and_bookkeeping_commit_with_the_write(dsn: str) -> None:
    """A batch with failed rows settles in one transaction: the failures, the contacts,
    the completions and the bookkeeping (before: a commit for the settling mark, one
    per error, the write, the bookkeeping).  Seen from outside while the write waits
    behind a row lock: nothing of the batch is settled yet; then everything is."""
    ids = _fill(dsn, 5, poison={2, 4})
    link = "https://maps.example.com/w1"
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO zen_contacts (partition_key, source_link) VALUES (hashtext(%s), %s)",
            (link, link),
        )

    def enrich(claim: Claim) -> dict[str, Any]:
        if claim.data["poison"]:
            raise ValueError(f"page {claim.data['n']} does not parse")  # two errors
        return _enrich_id(claim)

    def status_of() -> list[str]:
        with psycopg.connect(dsn) as conn:
            got = dict(conn.execute("SELECT id, status FROM results").fetchall())
        return [got[i] for i in ids]

    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT 1 FROM zen_contacts WHERE source_link = %s FOR UPDATE", (link,))
    with Worker(dsn, enrich, server_id="s1", batch_size=5) as w:
        runner = threading.Thread(target=w.run_once)
        runner.start()
        try:
            wait_for(
                lambda: bool(
                    one(
                        dsn,
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO zen_contacts%%'",
                    )
                )
            )
            while_writing = status_of()
            jobs_while_writing = one(dsn, "SELECT count(*) FROM zen_jobs")
        finally:
            blocker.rollback()
            blocker.close()
            runner.join(60)
    assert not runner.is_alive()
    assert while_writing == ["claimed"] * 5 and jobs_while_writing == 0
    assert status_of() == ["done", "retry", "done", "retry", "done"]
    assert (w.stats.written, w.stats.failed) == (3, 2)
    assert one(dsn, "SELECT rows_failed, rows_written FROM zen_jobs") == (2, 3)
    assert_no_leaks(dsn)
