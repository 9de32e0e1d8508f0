"""Retries after a lost COMMIT acknowledgement (issue 8, point 11), on a real server.

The lost acknowledgement is made by a real loopback TCP proxy between the writer and
PostgreSQL (the bench's `zenpipe.bench.proxy.CommitProxy`): armed with ``drop_ack``, it
forwards the next ``COMMIT`` to the server (a simple Query or, from the pipelined fast
path, a Parse), waits until the server has answered (the commit landed), then cuts the client's
connection without passing the answer on.  The writer sees a broken connection, exactly
as when a network or a PgBouncer dies at that moment, and retries.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from helpers import wait_for
from psycopg.conninfo import make_conninfo

from zenpipe.bench.proxy import CommitProxy
from zenpipe.claim import Batch, Claimer
from zenpipe.upsert import Upserter


@pytest.fixture
def proxy(postgresql: psycopg.Connection[Any]) -> Iterator[CommitProxy]:
    p = CommitProxy(postgresql.info.host, postgresql.info.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def proxied_dsn(proxy: CommitProxy, postgresql: psycopg.Connection[Any]) -> str:
    return make_conninfo(
        host="127.0.0.1", port=str(proxy.port), user=postgresql.info.user,
        dbname=postgresql.info.dbname, sslmode="disable", gssencmode="disable",
    )  # fmt: skip


def _one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params or None).fetchone()
    conn.rollback()
    assert row is not None
    return row[0] if len(row) == 1 else row


def test_the_proxy_really_loses_a_landed_commit(
    proxy: CommitProxy, proxied_dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(proxied_dsn) as conn:
        conn.execute("INSERT INTO results (link, data) VALUES ('https://landed', '{}')")
        proxy.arm("drop_ack")
        with pytest.raises(psycopg.OperationalError):
            conn.commit()
    assert proxy.dropped.is_set()
    assert _one(postgresql, "SELECT count(*) FROM results WHERE link = 'https://landed'") == 1


def test_lost_commit_ack_plain_upsert_counts_once(
    proxy: CommitProxy, proxied_dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    batch: list[dict[str, Any]] = [
        {"source_link": f"https://ack/{i}", "emails": [f"{i}@x.com"]} for i in range(20)
    ]
    batch.append({"source_link": "https://ack/bad", "country_code": "IDN"})
    with Upserter(proxied_dsn, server_id="s", max_wait=0.05) as up:
        proxy.arm("drop_ack")
        report = up.upsert(batch)
    assert proxy.dropped.is_set()  # the first attempt's commit landed, its ack was lost
    assert report.retries == 1 and report.already_committed
    # as for upsert_and_complete: nothing written again; validation's verdicts listed
    assert (report.written, report.rejected) == (0, 1)
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (20, 20)
    assert _one(postgresql, "SELECT count(*) FROM zen_rejects") == 1


def test_lost_commit_ack_parallel_groups_count_once(
    proxy: CommitProxy, proxied_dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    batch = [{"source_link": f"https://pg/{i}"} for i in range(200)]
    with Upserter(proxied_dsn, server_id="s", parallel=2, max_wait=0.05) as up:
        proxy.arm("drop_ack")
        report = up.upsert(batch)
    assert proxy.dropped.is_set() and report.retries == 1
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (200, 200)


@contextlib.contextmanager
def _claimed_batch(
    postgresql: psycopg.Connection[Any], dsn: str, proxied_dsn: str, prefix: str, n: int
) -> Iterator[tuple[Claimer, Upserter, Batch, list[dict[str, Any]]]]:
    """*n* new rows claimed on a direct connection, an upserter behind the proxy, and
    the batch's records."""
    postgresql.execute(
        "INSERT INTO results (link, data) SELECT %s || i, '{}' FROM generate_series(1, %s) AS i",
        (prefix, n),
    )
    postgresql.commit()
    with (
        Claimer(dsn, owner="w1", batch_size=n) as claimer,
        Upserter(proxied_dsn, server_id="s", max_wait=0.05) as up,
    ):
        batch = claimer.claim()
        yield claimer, up, batch, [{"source_link": c.link, "source_id": c.id} for c in batch.claims]


def test_lost_commit_ack_upsert_and_complete_writes_once(
    proxy: CommitProxy, proxied_dsn: str, dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    with _claimed_batch(postgresql, dsn, proxied_dsn, "https://uc/", 10) as (
        claimer,
        up,
        batch,
        recs,
    ):
        recs.append({"source_link": "https://uc/bad", "latitude": 100.0})
        proxy.arm("drop_ack")
        report = up.upsert_and_complete(recs, claimer, batch)
    assert proxy.dropped.is_set() and report.already_committed
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (10, 10)
    assert _one(postgresql, "SELECT count(*) FROM zen_rejects") == 1
    assert _one(postgresql, "SELECT count(*) FROM results WHERE status = 'done'") == 10


def _lock_waiters(conn: psycopg.Connection[Any]) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    ).fetchall()
    conn.rollback()
    return [r[0] for r in rows]


def test_retry_waits_out_an_in_doubt_commit_and_writes_nothing(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    postgresql.execute(
        "INSERT INTO results (link, data) SELECT 'https://doubt/' || i, '{}' "
        "FROM generate_series(1, 5) AS i"
    )
    postgresql.commit()
    with (
        Claimer(dsn, owner="w1", batch_size=5) as claimer,
        Upserter(dsn, server_id="s", max_wait=0.05) as up,
    ):
        batch = claimer.claim()
        recs = [{"source_link": c.link, "source_id": c.id} for c in batch.claims]
        # The first attempt: written and completed, its COMMIT not yet done (as while a
        # synchronous standby has not confirmed it).
        first = psycopg.connect(dsn)
        up.upsert(recs, conn=first)
        claimer.complete(batch, conn=first)
        result: dict[str, Any] = {}

        def retry() -> None:
            try:
                result["report"] = up.upsert_and_complete(recs, claimer, batch)
            except BaseException as e:  # pragma: no cover - reported below
                result["error"] = e

        t = threading.Thread(target=retry)
        t.start()
        # Its first attempt blocks behind the in-doubt transaction's row locks; kill it so
        # that the call takes its retry path while the first transaction is still open.
        victim = wait_for(lambda: _lock_waiters(postgresql))[0]
        assert _one(postgresql, "SELECT pg_terminate_backend(%s)", victim) is True
        # The retry waits for the first transaction's outcome instead of writing again.
        waiting = wait_for(lambda: [p for p in _lock_waiters(postgresql) if p != victim])
        assert t.is_alive()
        first.commit()
        first.close()
        t.join(60)
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert report.retries >= 1 and report.already_committed and report.written == 0
    assert waiting
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (5, 5)
    assert _one(postgresql, "SELECT count(*) FROM results WHERE status = 'done'") == 5


def test_old_upsert_keys_are_pruned_in_bounded_batches(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    with Upserter(dsn, server_id="s") as up:
        for i in range(5):
            up.upsert([{"source_link": f"https://k/{i}"}])
        assert _one(postgresql, "SELECT count(*) FROM zen_upsert_keys") == 5
        postgresql.execute(
            "UPDATE zen_upsert_keys SET committed_at = now() - interval '2 days' "
            "WHERE key IN (SELECT key FROM zen_upsert_keys LIMIT 4)"
        )
        postgresql.commit()
        assert up.prune_keys(older_than=timedelta(days=1), limit=3) == 3
        assert up.prune_keys(older_than=timedelta(days=1), limit=3) == 1
        assert up.prune_keys(older_than=timedelta(days=1), limit=3) == 0
    assert _one(postgresql, "SELECT count(*) FROM zen_upsert_keys") == 1


def test_after_statements_of_a_landed_write_are_reported_committed(
    proxy: CommitProxy, proxied_dsn: str, dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    """The worker's bookkeeping rides in the write's transaction (``after=``). When that
    commit lands and its acknowledgement is lost, the retry finds the batch done and
    writes nothing: the report must say the *after* statements committed too, or the
    worker books the batch a second time."""
    postgresql.execute("CREATE TABLE after_marks (n integer)")
    postgresql.commit()

    def after(conn: psycopg.Connection[Any], written: int, rejected: int) -> None:
        conn.execute("INSERT INTO after_marks VALUES (%s)", (written,))

    with _claimed_batch(postgresql, dsn, proxied_dsn, "https://after/", 5) as (
        claimer,
        up,
        batch,
        recs,
    ):
        proxy.arm("drop_ack")
        report = up.upsert_and_complete(recs, claimer, batch, after=after)
    assert proxy.dropped.is_set() and report.already_committed
    assert _one(postgresql, "SELECT count(*), sum(n) FROM after_marks") == (1, 5)
    assert report.after_committed


def test_a_lost_ack_of_the_settling_mark_does_not_stall_the_write(
    proxy: CommitProxy, proxied_dsn: str, dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    """The worker's write pipelines the settling mark's COMMIT with the write's BEGIN:
    the server's answer ends with ReadyForQuery *in transaction*, never idle.  A lost
    acknowledgement there must still cut at once (the client then retries), not wait
    for an idle ReadyForQuery that never comes."""
    with _claimed_batch(postgresql, dsn, proxied_dsn, "https://mark/", 5) as (
        claimer,
        up,
        batch,
        recs,
    ):
        proxy.arm("drop_ack")
        result: list[Any] = []
        writer = threading.Thread(
            target=lambda: result.append(
                up.upsert_and_complete(recs, claimer, batch, settling=True)
            )
        )
        writer.start()
        wait_for(proxy.dropped.is_set, timeout=30)
        writer.join(30)
        assert not writer.is_alive()
    assert result and result[0].retries == 1 and not result[0].already_committed
    assert _one(postgresql, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (5, 5)
    assert _one(postgresql, "SELECT count(*) FROM results WHERE status = 'done'") == 5
