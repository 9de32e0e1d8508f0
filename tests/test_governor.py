"""The bloat governor (zenpipe.governor): claims back off while vacuum is held back."""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
import pytest

from tests.helpers import wait_for
from zenpipe.claim import Claimer
from zenpipe.governor import Governor, Signals
from zenpipe.worker import Worker


def seed(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO results (link, data) SELECT 'https://maps.example.com/' || g,"
            " jsonb_build_object('i', g) FROM generate_series(1, %s) g",
            (n,),
        )


def pending(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM results WHERE status = 'pending'").fetchone()
    return int(row[0]) if row else -1


def test_decisions_are_pure_functions_of_the_signals() -> None:
    g = Governor("", batch_size=100, shrink_after=10, pause_after=60, min_dead=1000)
    assert g.decide(Signals(0, None, 0, 0, 0)).batch_size == 100
    assert g.decide(Signals(11, 7, 0, 0, 0)).batch_size == 25
    assert g.decide(Signals(0, None, 61, 0, 0)).decision == "pause"  # a prepared xact
    assert g.decide(Signals(0, None, 0, 500, 500)).decision == "normal"  # too few dead
    assert g.decide(Signals(0, None, 0, 3000, 7000)).decision == "shrink"
    assert g.decide(Signals(0, None, 0, 6000, 4000)).pause_seconds == g.pause_seconds


@pytest.mark.parametrize("pin", ["xid", "snapshot"])
def test_claims_shrink_while_a_transaction_pins_xmin_and_recover(dsn: str, pin: str) -> None:
    """An open transaction with an xid, or a REPEATABLE READ snapshot without one (the
    replication-slot-free way to pin xmin), shrinks the claims; they recover when it
    ends."""
    seed(dsn, 200)
    with (
        Governor(dsn, batch_size=20, shrink_after=0.2, pause_after=1e6, refresh_seconds=0) as gov,
        Claimer(dsn, owner="g/w0", batch_size=20) as claimer,
        psycopg.connect(dsn) as holder,
    ):
        assert len(claimer.claim(gov.advice().batch_size)) == 20
        if pin == "xid":
            holder.execute("SELECT pg_current_xact_id()")
        else:
            holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            holder.execute("SELECT count(*) FROM results")
        advice = wait_for(lambda: (a := gov.advice()).decision == "shrink" and a)
        assert f"pid {holder.info.backend_pid}" in advice.reason
        assert len(claimer.claim(advice.batch_size)) == 5
        assert gov.level == 1
        holder.rollback()
        advice = wait_for(lambda: (a := gov.advice()).decision == "normal" and a)
        assert len(claimer.claim(advice.batch_size)) == 20
        assert gov.level == 0 and gov.changes == 2


def test_dead_tuples_in_results_shrink_the_claims(dsn: str) -> None:
    seed(dsn, 1000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE results SET (autovacuum_enabled = false)")
        conn.execute("UPDATE results SET priority = 1")
    with Governor(dsn, batch_size=40, min_dead=500, dead_ratio_pause=0.9, refresh_seconds=0) as gov:
        advice = wait_for(lambda: (a := gov.advice()).decision == "shrink" and a)
        assert advice.batch_size == 10 and "dead" in advice.reason
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM results")
        wait_for(lambda: gov.advice().decision == "normal")


def test_a_worker_pauses_while_vacuum_is_held_back_then_resumes(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    seed(dsn, 60)
    caplog.set_level(logging.INFO, logger="zenpipe.governor")

    def enrich(claim: Any) -> dict[str, Any]:
        return {"source_link": claim.link}

    gov = Governor(
        dsn,
        batch_size=10,
        shrink_after=0.1,
        pause_after=0.2,
        pause_seconds=0.02,
        refresh_seconds=0,
    )
    stop = threading.Event()
    with (
        psycopg.connect(dsn) as holder,
        gov,
        Worker(dsn, enrich, server_id="gov", batch_size=10, governor=gov) as worker,
    ):
        holder.execute("SELECT pg_current_xact_id()")
        wait_for(lambda: gov.advice().decision == "pause")
        t = threading.Thread(target=worker.run, args=(stop,))
        t.start()
        try:
            paused = gov.decisions["pause"]
            wait_for(lambda: gov.decisions["pause"] >= paused + 10)  # the worker asked 10x
            assert worker.stats.claimed == 0 and pending(dsn) == 60
            holder.rollback()  # vacuum can move again: the worker resumes by itself
            wait_for(lambda: pending(dsn) == 0 and worker.stats.written == 60)
        finally:
            stop.set()
            t.join()
    assert gov.level == 0 and gov.decisions["normal"] >= 6
    text = caplog.text
    assert "governor: normal -> shrink" in text or "governor: normal -> pause" in text
    assert "-> normal" in text
