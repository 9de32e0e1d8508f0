"""The materialized dashboard (zenpipe.dashboard, migration 0012)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest

from tests.helpers import wait_for
from zenpipe import cli, dashboard


def seed(dsn: str, results: int = 200, contacts: int = 120) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO results (link, data, status, done_at) SELECT 'https://m.example/' || g,"
            " '{}', CASE WHEN g %% 4 = 0 THEN 'pending' ELSE 'done' END,"
            " CASE WHEN g %% 4 = 0 THEN NULL ELSE now() END FROM generate_series(1, %s) g",
            (results,),
        )
        conn.execute(
            "INSERT INTO zen_contacts (partition_key, source_link, country_code, emails, phones,"
            " whatsapp, last_scrape_server)"
            " SELECT hashtext(l), l, CASE WHEN g %% 3 = 0 THEN 'ID' ELSE 'US' END,"
            " ARRAY['a' || g || '@x.com'], '{}', CASE WHEN g %% 2 = 0 THEN ARRAY['+62' || g]"
            " ELSE '{}' END, 's' || (g %% 2)"
            " FROM generate_series(1, %s) g, LATERAL (SELECT 'https://c.example/' || g) AS x(l)",
            (contacts,),
        )
        conn.execute(
            "INSERT INTO zen_jobs (server_id, status, rows_claimed, rows_written, finished_at)"
            " VALUES ('s0', 'done', 10, 9, now()), ('s1', 'done', 5, 5, now())"
        )


def test_dashboard_shows_the_last_refresh_and_its_age(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = dashboard.read(conn)
    assert before.figures["source_total"] == 0
    seed(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert dashboard.read(conn).figures["source_total"] == 0  # materialized: stale
    report = dashboard.refresh(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        board = dashboard.read(conn)
    f = board.figures
    assert board.refreshed_at == report.refreshed_at
    assert 0 <= board.age_seconds < 60
    assert (f["source_total"], f["source_pending"], f["source_done"]) == (200, 50, 150)
    assert (f["contacts_total"], f["emails_total"], f["whatsapp_total"]) == (120, 120, 60)
    assert f["countries"] == 2
    assert f["top_countries"][0] == {"country": "US", "contacts": 80, "emails": 80}
    assert f["contacts_per_server"] == {"s0": 60, "s1": 60}
    assert (f["last_hour_batches"], f["last_hour_written"]) == (2, 14)
    assert f["last_hour_per_server"] == {"s0": 9, "s1": 5}


def test_dashboard_is_one_pass_per_table(dsn: str) -> None:
    """The audit's view took ~15 scans; this one scans results once and each
    zen_contacts partition once."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        [definition] = conn.execute("SELECT pg_get_viewdef('zen_mv_dashboard')").fetchone() or ()
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + definition).fetchall())
    assert plan.count("on results") == 1
    for p in range(32):
        assert plan.count(f"on zen_contacts_p{p} ") == 1, p
    assert "MixedAggregate" in plan


def _waiting_on_lock(conn: psycopg.Connection[Any], pid: int) -> bool:
    row = conn.execute(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return bool(row and row[0])


def test_readers_keep_reading_during_a_concurrent_refresh(dsn: str) -> None:
    """A refresh held mid-way (blocked on a table lock after taking its own lock on the
    view) lets readers read the previous row; a plain REFRESH would block them."""
    seed(dsn)
    with (
        psycopg.connect(dsn, autocommit=True) as blocker,
        psycopg.connect(dsn, autocommit=True) as refresher,
        psycopg.connect(dsn, autocommit=True) as watcher,
        psycopg.connect(dsn, autocommit=True, options="-c lock_timeout=1000") as reader,
    ):
        pid = refresher.info.backend_pid
        for concurrently in (True, False):
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE zen_jobs IN ACCESS EXCLUSIVE MODE")
            stmt = (
                "SELECT zen_refresh_dashboard_v1()"
                if concurrently
                else "REFRESH MATERIALIZED VIEW zen_mv_dashboard"
            )
            t = threading.Thread(target=refresher.execute, args=(stmt,))
            t.start()
            try:
                wait_for(lambda: _waiting_on_lock(watcher, pid))
                if concurrently:
                    reads = 0
                    started = time.monotonic()
                    while reads < 20:  # many reads, all answered while the refresh waits
                        board = dashboard.read(reader)
                        assert board.figures["source_total"] == 0  # the previous row
                        reads += 1
                    assert _waiting_on_lock(watcher, pid)
                    print(f"20 reads during a refresh in {time.monotonic() - started:.3f} s")
                else:
                    with pytest.raises(psycopg.errors.LockNotAvailable):
                        dashboard.read(reader)
            finally:
                blocker.execute("COMMIT")
                t.join()
        assert dashboard.read(reader).figures["source_total"] == 200


def test_refresh_time_on_a_populated_database(dsn: str) -> None:
    seed(dsn, results=50_000, contacts=20_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")
    report = dashboard.refresh(dsn)
    print(f"refresh of 50k results + 20k contacts: {report.seconds * 1000:.0f} ms")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert dashboard.read(conn).figures["contacts_total"] == 20_000


def test_stats_command_reads_the_materialized_dashboard(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(dsn)
    assert cli.main(["refresh-dashboard", "--dsn", dsn]) == 0
    assert "refreshed concurrently" in capsys.readouterr().out
    assert cli.main(["stats", "--dsn", dsn, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dashboard"]["source_total"] == 200
    assert out["dashboard"]["age_seconds"] >= 0
    assert cli.main(["stats", "--dsn", dsn]) == 0
    text = capsys.readouterr().out
    assert "zen_mv_dashboard" in text and "s old" in text and "{" not in text
    assert "top_countries: US 80, ID 40" in text
