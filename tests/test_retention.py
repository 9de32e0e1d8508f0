"""Retention: `zenpipe prune --older-than` (zenpipe.retention)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from tests.helpers import wait_for
from zenpipe import cli
from zenpipe.retention import prune, prune_batch
from zenpipe.worker import Worker

DAY = timedelta(days=1)


def seed_old_done(conn: psycopg.Connection[Any], n: int, *, contacts: bool = True) -> None:
    """n done rows finished two days ago, each with a contact whose source_id names it."""
    conn.execute(
        "INSERT INTO results (link, data, status, done_at) SELECT 'https://old.example/' || g,"
        " '{}', 'done', now() - interval '2 days' FROM generate_series(1, %s) g",
        (n,),
    )
    if contacts:
        conn.execute(
            "INSERT INTO zen_contacts (partition_key, source_link, source_id)"
            " SELECT hashtext(link), link, id FROM results WHERE link LIKE 'https://old.%%'"
        )
    conn.execute("ANALYZE")


def count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize("archive", [False, True])
def test_prune_removes_only_old_done_rows_and_old_rejects(dsn: str, archive: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        seed_old_done(conn, 100)
        conn.execute(
            "INSERT INTO results (data, status, done_at) SELECT '{}', 'done', now()"
            " FROM generate_series(1, 10)"
        )
        conn.execute("INSERT INTO results (data) SELECT '{}' FROM generate_series(1, 10)")
        conn.execute(
            "INSERT INTO results (data, status, created_at) SELECT '{}', 'failed',"
            " now() - interval '9 days' FROM generate_series(1, 5)"
        )
        conn.execute(
            "INSERT INTO zen_rejects (server_id, row_index, field, reason, detail, payload,"
            " rejected_at) SELECT 's', 0, 'f', 'r', 'd', '{}', now() - g * interval '1 hour'"
            " FROM generate_series(1, 50) g"
        )
    report = prune(dsn, older_than=DAY, batch=7, archive=archive)
    assert (report.results, report.rejects) == (100, 27)  # rejects older than 24 h: 25..50
    assert count(dsn, "SELECT count(*) FROM results") == 25
    assert count(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 10
    assert count(dsn, "SELECT count(*) FROM zen_rejects") == 23
    assert count(dsn, "SELECT count(*) FROM zen_contacts WHERE source_id IS NULL") == 100
    assert count(dsn, "SELECT count(*) FROM zen_archive") == (127 if archive else 0)
    again = prune(dsn, older_than=DAY, batch=7, archive=archive)
    assert (again.results, again.rejects) == (0, 0)


def test_each_delete_finds_its_contacts_through_the_source_id_index(dsn: str) -> None:
    """ON DELETE SET NULL on zen_contacts.source_id: no partition is scanned; every
    lookup goes through idx_zc_source_id (migration 0009)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        seed_old_done(conn, 20_000)
    with psycopg.connect(dsn) as conn:
        started = time.monotonic()
        n = prune_batch(conn, "results", older_than=DAY, limit=2000)
        secs = time.monotonic() - started
        row = conn.execute(
            "SELECT sum(seq_scan), sum(idx_scan) FROM pg_stat_xact_user_tables"
            " WHERE relname LIKE 'zen\\_contacts\\_p%%'"
        ).fetchone()
        conn.commit()
    assert n == 2000
    assert row is not None and row[0] == 0 and row[1] >= 2000, row
    print(f"prune: 2000 results rows with 2000 contacts in {secs * 1000:.0f} ms")


def test_claims_and_upserts_keep_working_during_a_prune(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        seed_old_done(conn, 30_000)
        conn.execute(
            "INSERT INTO results (link, data) SELECT 'https://new.example/' || g, '{}'"
            " FROM generate_series(1, 300) g"
        )
    total = 30_300
    result: dict[str, Any] = {}

    def run_prune() -> None:
        result["report"] = prune(dsn, older_than=DAY, batch=100)

    t = threading.Thread(target=run_prune)
    t.start()
    try:
        wait_for(lambda: count(dsn, "SELECT count(*) FROM results") < total)
        with Worker(
            dsn, lambda c: {"source_link": c.link}, server_id="during-prune", batch_size=20
        ) as w:
            w.run(until_idle=True)
        left_when_worker_done = count(dsn, "SELECT count(*) FROM results WHERE link LIKE"
                                      " 'https://old.%'")  # fmt: skip
    finally:
        t.join()
    assert w.stats.written == 300 and w.stats.stale_batches == 0
    assert left_when_worker_done > 0, "the prune ended before the worker: no overlap shown"
    report = result["report"]
    assert report.results == 30_000
    assert count(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 300
    print(f"prune of 30k rows beside a worker: {report.rows_per_s:,.0f} rows/s")


def test_prune_command(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        seed_old_done(conn, 30, contacts=False)
    assert cli.main(["prune", "--dsn", dsn, "--older-than", "1d", "--archive"]) == 0
    assert "archived 30 done results row(s)" in capsys.readouterr().out
