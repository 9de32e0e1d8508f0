"""Hourly statistics: the rollup from the zen_jobs ledger (zenpipe.stats)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from zenpipe import cli, stats
from zenpipe.worker import Worker


def hourly(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT hour, server_id, rows_claimed, rows_written, rows_rejected, rows_failed,"
            " emails_found FROM zen_stats_hourly ORDER BY 1, 2"
        ).fetchall()


def add_jobs(dsn: str, hours_ago: int, server: str, n: int, written: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO zen_jobs (server_id, worker, status, rows_claimed, rows_written,"
            " rows_failed, emails_found, started_at, finished_at)"
            " SELECT %s, %s || '/w0', 'done', %s, %s, 1, 2, t, t"
            " FROM generate_series(1, %s), LATERAL (SELECT date_trunc('hour', now(), 'UTC')"
            "   - make_interval(hours => %s) + interval '7 minutes') AS x(t)",
            (server, server, written + 1, written, n, hours_ago),
        )


def test_rollup_recomputes_closed_hours_and_counts_nothing_twice(dsn: str) -> None:
    add_jobs(dsn, 3, "s1", 4, 10)
    add_jobs(dsn, 2, "s1", 2, 5)
    add_jobs(dsn, 2, "s2", 3, 7)
    first = stats.rollup(dsn)  # first run: from the oldest job up to the last closed hour
    assert first.rows_changed == 3 and first.hours >= 2
    rows = hourly(dsn)
    assert [(r[1], r[2], r[3], r[5], r[6]) for r in rows] == [
        ("s1", 44, 40, 4, 8),
        ("s1", 12, 10, 2, 4),
        ("s2", 24, 21, 3, 6),
    ]
    again = stats.rollup(dsn)  # nothing new after the watermark
    assert again.hours == 0 and hourly(dsn) == rows
    since = datetime.now(UTC) - timedelta(hours=6)
    forced = stats.rollup(dsn, since=since)  # the same hours recomputed: "=", not "+"
    assert forced.hours >= 5 and forced.rows_changed == 0 and hourly(dsn) == rows
    # A late job in an hour already rolled up: a forced re-run takes it in, once.
    add_jobs(dsn, 2, "s2", 1, 1)
    stats.rollup(dsn, since=since)
    stats.rollup(dsn, since=since)
    assert hourly(dsn)[2][1:4] == ("s2", 26, 22)


def test_rollup_agrees_with_the_live_increments_of_a_worker(dsn: str) -> None:
    """The worker adds each batch to its hour live ("+"); the rollup of that hour from
    the ledger sets the same figures: running both counts nothing twice."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO results (link, data) SELECT 'https://maps.example.com/' || g,"
            " jsonb_build_object('i', g) FROM generate_series(1, 30) g"
        )

    def enrich(claim: Any) -> dict[str, Any]:
        return {"source_link": claim.link, "emails": [f"x{claim.id}@example.com"]}

    with Worker(dsn, enrich, server_id="live", batch_size=7) as w:
        w.run(until_idle=True)
    live = hourly(dsn)
    assert [(r[1], r[2], r[3], r[6]) for r in live] == [("live", 30, 30, 30)]
    # margin -3600: the open hour counts as closed (test only): recomputed from zen_jobs.
    report = stats.rollup(dsn, margin=-3600)
    assert report.rows_changed == 0
    assert hourly(dsn) == live
    stats.rollup(dsn, margin=-3600, since=datetime.now(UTC) - timedelta(hours=2))
    assert hourly(dsn) == live


def test_stats_hours_and_rollup_commands(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Two hours ago: an hour that is closed whatever the minute (one hour ago is still
    # open during the first ten minutes of the hour, the rollup's margin).
    add_jobs(dsn, 2, "s1", 3, 4)
    assert cli.main(["stats", "rollup", "--dsn", dsn]) == 0
    assert "recomputed" in capsys.readouterr().out
    assert cli.main(["stats", "--dsn", dsn, "--hours", "24"]) == 0
    out = capsys.readouterr().out
    assert "hour (UTC)" in out and "       12" in out
    assert cli.main(["stats", "--dsn", dsn, "--hours", "3", "--json"]) == 0
    assert '"rows_written": 12' in capsys.readouterr().out
