"""The worker loop and the end-to-end demo, on a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
from helpers import assert_no_leaks

from zenpipe import demo
from zenpipe.claim import Claim, Claimer
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
    second claimer gets nothing and the batch is written once, not stale."""
    demo.seed(dsn, 4)
    stolen: list[int] = []

    def slow(claim: Claim) -> dict[str, Any]:
        time.sleep(0.5)
        return demo.enrich(claim) | {"country_code": "ID"}

    def thief() -> None:
        with Claimer(dsn, owner="thief") as c:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                stolen.extend(c.claim().ids)
                time.sleep(0.1)

    with Worker(dsn, slow, server_id="s1", batch_size=4, lease_seconds=0.6) as w:
        t = threading.Thread(target=thief)
        t.start()
        claimed = w.run_once()
        t.join()
    assert claimed == 4
    assert stolen == []
    assert w.stats.stale_batches == 0
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 4
    assert one(dsn, "SELECT max(attempts) FROM results") == 1
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
