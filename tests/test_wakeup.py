"""Wake-ups (zenpipe.wakeup): idle workers wake on LISTEN/NOTIFY, fall back to polling."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from helpers import assert_no_leaks, wait_for

from zenpipe import enqueue, produce
from zenpipe.claim import Claim
from zenpipe.config import Settings
from zenpipe.pool import ZenPool
from zenpipe.wakeup import CHANNEL, Waker
from zenpipe.worker import Worker


def _enrich(claim: Claim) -> dict[str, Any]:
    return {"source_link": claim.link, "source_id": claim.id, "country_code": "ID"}


def _count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def test_the_waker_listens_where_producers_notify() -> None:
    assert CHANNEL == produce.NOTIFY_CHANNEL


def test_idle_worker_wakes_on_new_rows_instead_of_polling(dsn: str) -> None:
    """The idle worker's poll interval is ten minutes: only the notification of the
    producer's commit can bring it back in time for the test's timeout."""
    with Waker(dsn) as waker:
        assert waker.listening
        stop = threading.Event()
        with Worker(dsn, _enrich, server_id="s1", idle_sleep=600, waker=waker) as w:
            t = threading.Thread(target=w.run, args=(stop,))
            t.start()
            try:
                wait_for(lambda: w.stats.idle_polls >= 1)  # idle, waiting
                rows = [{"link": f"https://maps.example.com/{i}", "data": {"i": i}}
                        for i in range(5)]  # fmt: skip
                enqueue(dsn, rows)
                wait_for(
                    lambda: _count(dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 5,
                    timeout=120,
                )
            finally:
                stop.set()
                waker.wake()
                t.join()
        assert w.stats.wakeups >= 1
        assert w.stats.idle_polls <= 2  # woken, not polled
    assert_no_leaks(dsn)


def test_a_burst_of_notifications_wakes_a_few_times_not_once_each(dsn: str) -> None:
    with Waker(dsn, throttle=0.5) as waker, psycopg.connect(dsn) as conn:
        with conn.transaction():
            for i in range(200):
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(i)))
        wait_for(lambda: waker.wakeups >= 1)
        before = waker.generation()
        waker.wait(1.5, before)  # the tail of the burst, throttled
    assert 1 <= waker.wakeups < 20


def test_the_waker_reconnects_after_its_backend_is_terminated(dsn: str) -> None:
    with Waker(dsn, connect_kwargs={"application_name": "zen-listen-test"}) as waker:
        assert waker.listening
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'zen-listen-test'"
            )
            wait_for(lambda: not waker.listening, timeout=60)
            wait_for(lambda: waker.listening, timeout=120)
            since = waker.generation()
            admin.execute("SELECT pg_notify(%s, 'x')", (CHANNEL,))
            assert waker.wait(60, since)


def test_a_fleet_member_counts_its_listener_in_the_budget(dsn: str) -> None:
    s = Settings(dsn=dsn, pool_max=2, pool_min=0, heartbeat_interval=5.0, pgbouncer=False)
    with ZenPool(s) as pool:
        assert pool.listening and pool.waker() is not None
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT pool_size, dedicated FROM zen_servers WHERE server_id = %s",
                (pool.server_id,),
            ).fetchone()
        assert row == (2, 2)  # pool, and control + listener
        listeners = _count(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%:listen'",
        )
        assert listeners == 1


@pytest.mark.pgbouncer
def test_behind_pgbouncer_workers_poll_only(dsn: str, pgbouncer_dsn: str) -> None:
    s = Settings(dsn=pgbouncer_dsn, pool_max=2, pool_min=0, heartbeat_interval=5.0)
    with ZenPool(s) as pool:
        assert pool.pgbouncer and not pool.listening and pool.waker() is None
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT dedicated FROM zen_servers WHERE server_id = %s", (pool.server_id,)
            ).fetchone()
        assert row == (1,)
        with Worker(pool, _enrich, server_id=pool.server_id) as w:
            assert w.waker is None and w.idle_max == 5.0


def test_the_listener_takes_its_share_of_the_fleet_budget(dsn: str) -> None:
    """Budget 8: a listening server with a pool of 3 holds 5; a second one asking for a
    pool of at least 2 needs 2 + control + listener = 4 > 3 left and is refused; the same
    server polling (no listener) needs 3 and fits."""
    from zenpipe.errors import FleetBudgetExceeded

    base = {"dsn": dsn, "pool_min": 0, "heartbeat_interval": 5.0, "pgbouncer": False,
            "fleet_budget": 8}  # fmt: skip
    with ZenPool(Settings(**base, pool_max=3, pool_floor=3, listen=True)):
        with pytest.raises(FleetBudgetExceeded) as info:
            ZenPool(Settings(**base, pool_max=2, pool_floor=2, listen=True))
        assert "1 control + 1 listener + 2 pool" in str(info.value)
        with ZenPool(Settings(**base, pool_max=2, pool_floor=2, listen=False)) as poller:
            assert poller.max_size == 2 and not poller.listening
