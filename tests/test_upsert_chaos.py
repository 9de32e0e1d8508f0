"""Exactly-once across a real SIGKILL of the writer process (slow, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from helpers import wait_for, wait_past

# A worker: claim every pending row, merge the contacts and mark the rows done in one
# transaction (Upserter.upsert_and_complete), then exit 0.
WORKER = """
import sys
from zenpipe.claim import Claimer
from zenpipe.upsert import Upserter

dsn, owner = sys.argv[1], sys.argv[2]
with Claimer(dsn, owner=owner, batch_size=100, lease_seconds=2) as claimer, \\
        Upserter(dsn, server_id=owner) as up:
    batch = claimer.claim()
    print("claimed", len(batch.claims), flush=True)
    recs = [{"source_link": c.link, "source_id": c.id, **c.data} for c in batch.claims]
    report = up.upsert_and_complete(recs, claimer, batch)
    print("written", report.written, flush=True)
"""

N = 40
BLOCKED_LINK = "https://chaos/0"


def _scalar(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params or None).fetchone()
    conn.rollback()
    assert row is not None
    return row[0] if len(row) == 1 else row


def _worker(dsn: str, owner: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, dsn, owner],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_mid_transaction_leaves_nothing_and_rows_are_written_once(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    db = postgresql
    db.execute(
        "INSERT INTO results (link, data) SELECT 'https://chaos/' || i, "
        "jsonb_build_object('business_name', 'n' || i, 'emails', jsonb_build_array("
        "'e' || i || '@x.com')) FROM generate_series(0, %s) AS i",
        [N - 1],
    )
    # One contact exists already; a lock on it makes the worker's merge wait after its
    # COPY, in the middle of its transaction.
    db.execute(
        "INSERT INTO zen_contacts (partition_key, source_link, scrape_count) "
        "VALUES (hashtext(%s), %s, 1)",
        [BLOCKED_LINK, BLOCKED_LINK],
    )
    db.commit()
    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT 1 FROM zen_contacts WHERE source_link = %s FOR UPDATE", [BLOCKED_LINK])

    first = _worker(dsn, "w-killed")
    try:

        def blocked() -> Any:
            if first.poll() is not None:
                raise AssertionError(f"worker exited early: {first.communicate()}")
            db.rollback()  # pg_stat_activity is read once per transaction
            return db.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO zen_contacts%'"
            ).fetchall()

        waiting = wait_for(blocked)
        db.rollback()
        victim = waiting[0][0]
        # The worker is mid-transaction: staged, merging, claims not yet completed.
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)  # reaps it and closes its pipes
        assert first.returncode == -signal.SIGKILL
    finally:
        if first.poll() is None:  # pragma: no cover - only if the test failed early
            first.kill()
            first.communicate()
    blocker.rollback()
    blocker.close()
    # Its backend finds the client gone and rolls back.
    wait_for(
        lambda: not _scalar(db, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", victim)
    )

    assert _scalar(db, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (1, 1)
    assert _scalar(db, "SELECT count(*) FROM zen_rejects") == 0
    assert _scalar(
        db,
        "SELECT count(*) FILTER (WHERE status = 'done'), "
        "count(*) FILTER (WHERE status = 'claimed') FROM results",
    ) == (0, N)

    # After the lease runs out another worker claims the same rows and writes them once.
    wait_past(dsn, _scalar(db, "SELECT max(lease_until) FROM results"))
    second = _worker(dsn, "w-second")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert f"claimed {N}" in out and f"written {N}" in out
    assert _scalar(db, "SELECT count(*) FROM results WHERE status = 'done' AND attempts = 2") == N
    assert _scalar(db, "SELECT count(*), sum(emails_count) FROM zen_contacts") == (N, N)
    assert (
        _scalar(db, "SELECT scrape_count FROM zen_contacts WHERE source_link = %s", BLOCKED_LINK)
        == 2
    )
    assert (
        _scalar(
            db,
            "SELECT count(*) FROM zen_contacts WHERE source_link <> %s "
            "AND scrape_count = 1 AND last_scrape_server = 'w-second' "
            "AND source_id IS NOT NULL",
            BLOCKED_LINK,
        )
        == N - 1
    )
