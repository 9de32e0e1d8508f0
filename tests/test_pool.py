"""zenpipe.pool on a real PostgreSQL: bounded waiting, resilience, timeouts, PgBouncer,
fleet registration (threads; real processes are in test_pool_fleet.py), metrics, stats."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest
from helpers import wait_for

from zenpipe import cli
from zenpipe.config import Settings
from zenpipe.embedded import ThrowawayPostgres
from zenpipe.errors import (
    FleetBudgetExceeded,
    PoolQueueFullError,
    PoolTimeoutError,
    ServerIdInUse,
    ZenpipeError,
)
from zenpipe.pool import (
    NAMESPACE_FLEET,
    Budget,
    FleetMember,
    ZenPool,
    detect_pgbouncer,
    fleet_status,
    guarded_pool,
)


def _settings(dsn: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "dsn": dsn,
        "server_id": f"t-{uuid.uuid4().hex[:10]}",
        "pool_min": 1,
        "pool_max": 3,
        "pool_timeout": 10.0,
        # Beats every 0.2 s, but a lease of 30 s: a loaded machine must not expire a
        # row by accident (tests that need an expired row force expires_at).
        "heartbeat_interval": 0.2,
        "heartbeat_misses": 150,
        # No LISTEN connection: the budget arithmetic here counts pool + control (the
        # listener's share is tested in test_wakeup.py).
        "listen": False,
    }
    base.update(kw)
    return Settings(**base)


def _backend_alive(conn: psycopg.Connection[Any], pid: int) -> bool:
    row = conn.execute("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)", (pid,))
    return bool(row.fetchone() == (True,))


def _backend_count(conn: psycopg.Connection[Any], app: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def admin(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


# -- 1. bounded ---------------------------------------------------------------------


def test_pool_never_opens_more_than_its_size(dsn: str, admin: psycopg.Connection[Any]) -> None:
    s = _settings(dsn, pool_max=3, pool_min=0)
    app = f"zenpipe:{s.server_id}"
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _backend_count(admin, app))

    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(15):
                with pool.connection() as conn:
                    conn.execute("SELECT pg_sleep(0.005)")
        except BaseException as e:
            errors.append(e)

    with ZenPool(s, fleet=False) as pool:
        sampler = threading.Thread(target=sample)
        sampler.start()
        workers = [threading.Thread(target=work) for _ in range(10)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        sampler.join()
        assert pool.metrics().requests_waited > 0  # callers did queue
    assert errors == []
    assert 1 <= peak <= 3


def test_acquire_timeout_raises_with_figures(dsn: str) -> None:
    with ZenPool(_settings(dsn, pool_max=2, pool_timeout=0.3), fleet=False) as pool:
        held = [pool.getconn(), pool.getconn()]
        caught: list[BaseException] = []

        def wait() -> None:
            try:
                with pool.connection():
                    pass
            except BaseException as e:
                caught.append(e)

        t = threading.Thread(target=wait)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive()
        [err] = caught
        assert isinstance(err, PoolTimeoutError)
        # Existing psycopg_pool handlers still catch it.
        assert isinstance(err, psycopg_pool.PoolTimeout) and isinstance(err, ZenpipeError)
        assert "pool_timeout" in str(err) and "2 in use" in str(err) and "max 2" in str(err)
        assert err.figures["used"] == 2 and err.figures["pool_max"] == 2
        assert pool.metrics().timeouts == 1
        for c in held:
            pool.putconn(c)
        with pool.connection() as conn:  # usable again once connections come back
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_waiting_queue_is_bounded(dsn: str) -> None:
    with ZenPool(_settings(dsn, pool_max=1, max_waiting=2, pool_timeout=30), fleet=False) as pool:
        held = pool.getconn()
        got: list[int] = []

        def wait() -> None:
            with pool.connection() as conn:
                got.append(conn.info.backend_pid)

        waiters = [threading.Thread(target=wait) for _ in range(2)]
        for t in waiters:
            t.start()
        wait_for(lambda: pool.metrics().waiting == 2)
        with pytest.raises(PoolQueueFullError) as info:
            pool.getconn()
        assert isinstance(info.value, psycopg_pool.TooManyRequests)
        assert "max_waiting 2" in str(info.value) and "2 waiting" in str(info.value)
        assert info.value.figures["waiting"] == 2
        assert pool.metrics().queue_full == 1
        pool.putconn(held)
        for t in waiters:
            t.join(timeout=30)
        assert len(got) == 2


# -- 3. resilience and per-connection timeouts ---------------------------------------


def test_timeouts_set_on_every_connection(dsn: str, admin: psycopg.Connection[Any]) -> None:
    s = _settings(dsn, statement_timeout="300ms", lock_timeout="200ms", idle_in_tx_timeout="0.5")
    with ZenPool(s, fleet=False) as pool:
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
                " current_setting('idle_in_transaction_session_timeout')"
            ).fetchone()
        assert row == ("300ms", "200ms", "500ms")
        with pytest.raises(psycopg.errors.QueryCanceled), pool.connection() as conn:
            conn.execute("SELECT pg_sleep(5)")
        admin.execute("CREATE TABLE t_lock (id int)")
        with admin.transaction():
            admin.execute("LOCK TABLE t_lock IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(psycopg.errors.LockNotAvailable), pool.connection() as conn:
                conn.execute("SELECT * FROM t_lock")
        # Idle in a transaction for longer than the limit: the server ends the session...
        idle_timeout = psycopg.errors.IdleInTransactionSessionTimeout
        with pytest.raises(idle_timeout), pool.connection() as conn:
            conn.execute("SELECT 1")
            pid = conn.info.backend_pid
            # until the server has ended the session, however long a loaded machine takes
            wait_for(lambda: not _backend_alive(admin, pid), timeout=60)
            conn.execute("SELECT 1")
        # ... and the pool replaces it.
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.metrics().connections_lost >= 1


def test_terminated_backends_are_replaced(dsn: str, admin: psycopg.Connection[Any]) -> None:
    s = _settings(dsn, pool_min=3, pool_max=3)
    with ZenPool(s, fleet=False) as pool:
        pool.wait(timeout=30)
        app = f"zenpipe:{s.server_id}"
        killed = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (app,),
        ).fetchone()
        assert killed == (3,)
        wait_for(lambda: _backend_count(admin, app) == 0)
        for _ in range(6):  # every pooled connection was dead: each is checked, replaced
            with pool.connection() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.metrics().connections_lost >= 1


def test_postgres_restart_is_survived() -> None:
    with ThrowawayPostgres(settings={"max_connections": "30", "shared_buffers": "16MB"}) as pg:
        s = _settings(pg.dsn, pool_min=2, pool_max=2, pool_timeout=30)
        with ZenPool(s, fleet=False) as pool:
            pool.wait(timeout=30)
            with pool.connection() as conn:
                before = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
            pg.restart()
            with pool.connection() as conn:
                after = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
            assert before != after
            assert pool.metrics().connections_lost >= 1


def test_max_lifetime_recycles_connections(dsn: str) -> None:
    s = _settings(dsn, pool_min=1, pool_max=1, max_lifetime=0.5)
    with ZenPool(s, fleet=False) as pool:
        with pool.connection() as conn:
            first = conn.info.backend_pid
        deadline = time.monotonic() + 20
        pid = first
        while pid == first and time.monotonic() < deadline:
            time.sleep(0.1)
            with pool.connection() as conn:
                pid = conn.info.backend_pid
        assert pid != first


def test_max_idle_shrinks_to_pool_min(dsn: str) -> None:
    s = _settings(dsn, pool_min=1, pool_max=3, max_idle=0.5)
    with ZenPool(s, fleet=False) as pool:
        held = [pool.getconn() for _ in range(3)]
        for c in held:
            pool.putconn(c)
        assert pool.metrics().pool_size == 3
        wait_for(lambda: pool.metrics().pool_size == 1)


# -- 5. PgBouncer transaction mode ---------------------------------------------------


@pytest.mark.pgbouncer
def test_pgbouncer_is_detected(dsn: str, pgbouncer_dsn: str) -> None:
    with ZenPool(_settings(pgbouncer_dsn), fleet=False) as pool:
        assert pool.pgbouncer is True
        with pool.connection() as conn:
            assert conn.prepare_threshold is None
    with ZenPool(_settings(dsn), fleet=False) as pool:
        assert pool.pgbouncer is False
        with pool.connection() as conn:
            assert conn.prepare_threshold is not None


@pytest.mark.pgbouncer
def test_pool_through_pgbouncer_transaction_mode(pgbouncer_dsn: str) -> None:
    s = _settings(pgbouncer_dsn, pool_max=4, statement_timeout=3, lock_timeout=1.5)
    errors: list[BaseException] = []
    wrong: list[object] = []

    def work(sign: int) -> None:
        try:
            for i in range(60):
                with pool.connection() as conn:
                    # The same statement many times: psycopg would prepare it by now.
                    row = conn.execute("SELECT %s::int * %s", (i, sign)).fetchone()
                    if row != (i * sign,):
                        wrong.append(row)
                    timeouts = conn.execute(
                        "SELECT current_setting('statement_timeout'),"
                        " current_setting('lock_timeout')"
                    ).fetchone()
                    if timeouts != ("3s", "1500ms"):
                        wrong.append(timeouts)
        except BaseException as e:
            errors.append(e)

    with ZenPool(s, fleet=True) as pool:  # registration and heartbeats through it too
        assert pool.pgbouncer is True
        threads = [threading.Thread(target=work, args=(sign,)) for sign in (1, -1, 2, -2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with pytest.raises(psycopg.errors.QueryCanceled), pool.connection() as conn:
            conn.execute("SELECT pg_sleep(10)")
    assert errors == [] and wrong == []


@pytest.mark.pgbouncer
def test_pgbouncer_drops_startup_options(pgbouncer_dsn: str) -> None:
    """Why the pool sets timeouts per transaction behind PgBouncer: our bouncer lists
    ``options`` in ignore_startup_parameters, so a startup ``-c`` is silently lost."""
    with psycopg.connect(
        pgbouncer_dsn, prepare_threshold=None, options="-c statement_timeout=1234"
    ) as conn:
        row = conn.execute("SELECT current_setting('statement_timeout')").fetchone()
    assert row == ("0",)


@pytest.mark.pgbouncer
def test_prepared_statements_break_without_the_flag(pgbouncer_dsn: str) -> None:
    """What ``prepare_threshold=None`` prevents: two clients preparing on shared server
    connections collide (or run each other's statement)."""
    conns = [psycopg.connect(pgbouncer_dsn, autocommit=True, prepare_threshold=0) for _ in range(2)]
    broken: list[object] = []
    try:
        for i in range(10):
            for sign, conn in zip((1, -1), conns, strict=True):
                try:
                    row = conn.execute("SELECT %s::int * " + str(sign), (i,)).fetchone()
                    if row != (i * sign,):
                        broken.append(row)
                except psycopg.errors.DuplicatePreparedStatement as e:
                    broken.append(e)
                except psycopg.errors.InvalidSqlStatementName as e:
                    broken.append(e)
    finally:
        for conn in conns:
            conn.close()
    assert broken


# -- 2. fleet registration (threads; processes in test_pool_fleet.py) -----------------


def test_budget_arithmetic_is_explained() -> None:
    b = Budget(max_connections=20, superuser_reserved=3, pg_reserved=0, reserve=5)
    assert b.total == 12
    assert b.grant(pool_max=4, pool_floor=0, in_use=0, live_servers=0) == 4
    assert b.grant(pool_max=4, pool_floor=1, in_use=9, live_servers=2) == 2
    with pytest.raises(FleetBudgetExceeded) as info:
        b.grant(pool_max=4, pool_floor=0, in_use=10, live_servers=2)
    msg = str(info.value)
    assert "max_connections 20 - superuser_reserved_connections 3 - zenpipe reserve 5" in msg
    assert "2 live server(s) hold 10, 2 left" in msg and "needs 1 control + 4 pool" in msg
    assert (info.value.budget, info.value.in_use, info.value.needed) == (12, 10, 5)


def test_concurrent_registrations_never_exceed_budget(
    dsn: str, admin: psycopg.Connection[Any]
) -> None:
    s = _settings(dsn, pool_max=3, pool_floor=1, fleet_budget=10)
    barrier = threading.Barrier(8)
    granted: list[int] = []
    refused: list[FleetBudgetExceeded] = []
    members: list[FleetMember] = []
    lock = threading.Lock()

    def register(i: int) -> None:
        m = FleetMember(s, server_id=f"thread-{i}")
        with lock:
            members.append(m)
        m._control()  # connect first, so all eight race on the registration itself
        barrier.wait()
        try:
            size = m.register(pool_max=3, pool_floor=1)
            with lock:
                granted.append(size)
        except FleetBudgetExceeded as e:
            with lock:
                refused.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        # 3+1, 3+1, then 1+1 fills 10 exactly; the other five are refused.
        assert sorted(granted) == [1, 3, 3] and len(refused) == 5
        row = admin.execute(
            "SELECT count(*), sum(pool_size + 1) FROM zen_servers WHERE expires_at > now()"
        ).fetchone()
        assert row == (3, 10)
    finally:
        for m in members:
            m.stop()
    assert admin.execute("SELECT count(*) FROM zen_servers").fetchone() == (0,)


def test_registration_waits_for_the_fleet_lock(dsn: str, admin: psycopg.Connection[Any]) -> None:
    s = _settings(dsn)
    m = FleetMember(s, server_id="lock-waiter")
    m._control()
    done = threading.Event()
    with admin.transaction():
        admin.execute("SELECT pg_advisory_xact_lock(%s, 1)", (NAMESPACE_FLEET,))
        t = threading.Thread(target=lambda: (m.register(pool_max=2, pool_floor=0), done.set()))
        t.start()
        wait_for(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND classid = %s::bigint::oid AND objid = 1 AND objsubid = 2",
                    (NAMESPACE_FLEET,),
                ).fetchone()
                == (1,)
            )
        )
        assert not done.is_set()
    t.join(timeout=30)
    assert done.is_set() and m.pool_size == 2
    m.stop()


def test_heartbeat_reports_metrics_and_close_leaves(
    dsn: str, admin: psycopg.Connection[Any]
) -> None:
    s = _settings(dsn, pool_max=2)
    with ZenPool(s) as pool:
        assert pool.fleet is not None
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        first = pool.fleet.heartbeats
        wait_for(lambda: pool.fleet is not None and pool.fleet.heartbeats >= first + 2)
        row = admin.execute(
            "SELECT host, pid, pool_size, version, stats, expires_at > now() FROM zen_servers"
            " WHERE server_id = %s",
            (s.server_id,),
        ).fetchone()
        assert row is not None
        host, pid, size, version, stats, live = row
        assert (host, pid, size, live) == (socket.gethostname(), os.getpid(), 2, True)
        assert version and stats["pool_max"] == 2 and stats["requests"] >= 1
        assert {"used", "free", "waiting", "wait_ms", "timeouts", "connections_lost"} <= set(stats)
    assert admin.execute(
        "SELECT count(*) FROM zen_servers WHERE server_id = %s", (s.server_id,)
    ).fetchone() == (0,)


def test_expired_lease_registers_again(dsn: str, admin: psycopg.Connection[Any]) -> None:
    s = _settings(dsn, pool_max=3, pool_floor=1, fleet_budget=8, heartbeat_interval=60)
    with ZenPool(s) as pool:
        assert pool.fleet is not None and pool.max_size == 3
        # A stall longer than the lease: the row expires and another server takes most
        # of the budget meanwhile.
        admin.execute(
            "UPDATE zen_servers SET last_heartbeat = now() - interval '1 hour',"
            " expires_at = now() - interval '1 second' WHERE server_id = %s",
            (s.server_id,),
        )
        other = FleetMember(_settings(dsn, fleet_budget=8), server_id="other")
        assert other.register(pool_max=4, pool_floor=4) == 4
        pool.fleet.beat()  # finds its lease gone: registers again within what is left
        assert pool.fleet.evictions == 1 and pool.max_size == 2
        row = admin.execute(
            "SELECT sum(pool_size + 1) FROM zen_servers WHERE expires_at > now()"
        ).fetchone()
        assert row == (8,)
        other.stop()


def test_server_id_held_by_live_process_is_refused(
    dsn: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute(
        "INSERT INTO zen_servers (server_id, host, pid, pool_size, version)"
        " VALUES ('taken', 'elsewhere', 4242, 2, 'x')"
    )
    with pytest.raises(ServerIdInUse, match="elsewhere"):
        ZenPool(_settings(dsn, server_id="taken"))
    # Same host, process gone (e.g. SIGKILLed, restarted within its lease): taken over.
    dead = 2**22 + 12345  # above pid_max on a default kernel: never alive
    admin.execute(
        "UPDATE zen_servers SET host = %s, pid = %s WHERE server_id = 'taken'",
        (socket.gethostname(), dead),
    )
    with ZenPool(_settings(dsn, server_id="taken")) as pool:
        assert pool.fleet is not None and pool.fleet.pool_size == 3
        assert admin.execute(
            "SELECT pid FROM zen_servers WHERE server_id = 'taken'"
        ).fetchone() == (os.getpid(),)


# -- 4. metrics from Python and `zenpipe stats` -------------------------------------


def test_stats_command_text_and_json(
    dsn: str, admin: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    s = _settings(dsn, pool_max=2)
    with ZenPool(s) as pool:
        assert pool.fleet is not None
        pool.fleet.beat()
        status = fleet_status(admin)
        assert status.totals()["live_servers"] == 1
        assert status.totals()["fleet_connections"] == 3

        assert cli.main(["stats", "--dsn", dsn, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["fleet"]["live_servers"] == 1 and out["fleet"]["max_connections"] == 200
        assert out["fleet"]["budget"] == 200 - 3 - 5
        [server] = out["servers"]
        assert server["server_id"] == s.server_id and server["stats"]["pool_max"] == 2
        assert "contacts_total" in out["dashboard"]

        assert cli.main(["stats", "--dsn", dsn]) == 0
        text = capsys.readouterr().out
        assert s.server_id in text and "budget" in text and "{" not in text


@pytest.mark.pgbouncer
def test_claimer_and_upserter_share_a_zenpool_through_pgbouncer(
    dsn: str, pgbouncer_dsn: str, admin: psycopg.Connection[Any]
) -> None:
    from zenpipe.claim import Claimer
    from zenpipe.upsert import Upserter

    admin.execute(
        "INSERT INTO results (link, data) SELECT 'https://maps.example.com/' || g,"
        " jsonb_build_object('n', g) FROM generate_series(1, 40) AS g"
    )
    with ZenPool(_settings(pgbouncer_dsn, pool_max=3)) as pool:
        assert pool.pgbouncer is True
        with (
            Claimer(pool, owner="zp-1", batch_size=10) as claimer,
            Upserter(pool, server_id=pool.server_id) as upserter,
        ):
            written = 0
            while batch := claimer.claim():
                report = upserter.upsert(
                    [{"source_link": f"https://maps.example.com/{i}"} for i in batch.ids]
                )
                written += report.written
                claimer.complete(batch)
        assert pool.metrics().requests > 0 and pool.metrics().connections_lost == 0
    assert written == 40
    assert admin.execute(
        "SELECT count(*) FILTER (WHERE status = 'done'), count(*) FROM results"
    ).fetchone() == (40, 40)
    assert admin.execute("SELECT count(*) FROM zen_contacts").fetchone() == (40,)


# -- 6. eviction, identity, history (issue 8, points 13 and 14) ----------------------


def _fleet_backends(conn: psycopg.Connection[Any], *server_ids: str) -> int:
    """Open connections (pool and control) of the given servers, from pg_stat_activity."""
    names = [f"zenpipe:{sid}" for sid in server_ids] + [f"zenpipe-ctl:{sid}" for sid in server_ids]
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY(%s)", (names,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _expire(conn: psycopg.Connection[Any], server_id: str) -> None:
    conn.execute(
        "UPDATE zen_servers SET last_heartbeat = now() - interval '1 hour',"
        " expires_at = now() - interval '1 second' WHERE server_id = %s",
        (server_id,),
    )


def test_evicted_server_shrinks_to_its_floor_and_stays_within_budget(
    dsn: str, admin: psycopg.Connection[Any]
) -> None:
    budget = 8
    a = _settings(dsn, pool_min=3, pool_max=3, pool_floor=1, fleet_budget=budget,
                  heartbeat_interval=60)  # fmt: skip
    b = _settings(dsn, pool_min=5, pool_max=5, pool_floor=1, fleet_budget=budget,
                  heartbeat_interval=60)  # fmt: skip
    assert a.server_id is not None and b.server_id is not None
    with ZenPool(a) as pool_a:
        pool_a.wait(timeout=30)
        assert pool_a.fleet is not None
        wait_for(lambda: _fleet_backends(admin, a.server_id or "") == 4)
        # A stall longer than the lease: A's row expires, its 3 + 1 connections are
        # free in the registry, and B and C take the whole budget (5 + 1, 1 + 1).
        _expire(admin, a.server_id)
        with ZenPool(b) as pool_b:
            pool_b.wait(timeout=30)
            assert pool_b.max_size == 5
            c = FleetMember(_settings(dsn, fleet_budget=budget), server_id="c-takes-the-rest")
            assert c.register(pool_max=1, pool_floor=1) == 1
            # A's next heartbeat finds its row expired; re-registering is refused (no
            # share left): the pool must drop to its floor, not run on at full size.
            with pytest.raises(FleetBudgetExceeded):
                pool_a.fleet.beat()
            assert pool_a.max_size == 1 and pool_a.fleet.evictions == 1
            wait_for(lambda: _fleet_backends(admin, a.server_id or "") == 2)
            # C leaves: A's next heartbeat is granted a share again (what is left: 1).
            c.stop()
            pool_a.fleet.beat()
            assert pool_a.max_size == 1
            live = admin.execute(
                "SELECT sum(pool_size + 1) FROM zen_servers WHERE expires_at > now()"
            ).fetchone()
            assert live == (budget,)
            wait_for(lambda: _fleet_backends(admin, a.server_id or "", b.server_id or "") == 8)
            assert _fleet_backends(admin, a.server_id, b.server_id) <= budget
            with pool_a.connection() as conn:  # still serving, at its floor
                assert conn.execute("SELECT 1").fetchone() == (1,)


def test_heartbeat_waits_for_the_registration_lock(
    dsn: str, admin: psycopg.Connection[Any]
) -> None:
    """A heartbeat cannot revive a row while a registration is counting the fleet: it
    takes the fleet lock in shared mode, registration takes it exclusively."""
    m = FleetMember(_settings(dsn, heartbeat_interval=60), server_id="beater")
    m.register(pool_max=2, pool_floor=0)
    done = threading.Event()
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            m.beat()
        except BaseException as e:
            errors.append(e)
        done.set()

    try:
        with admin.transaction():
            admin.execute("SELECT pg_advisory_xact_lock(%s, 1)", (NAMESPACE_FLEET,))
            t = threading.Thread(target=beat)
            t.start()
            wait_for(
                lambda: (
                    admin.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND NOT granted AND mode = 'ShareLock'"
                        " AND classid = %s::bigint::oid AND objid = 1 AND objsubid = 2",
                        (NAMESPACE_FLEET,),
                    ).fetchone()
                    == (1,)
                )
            )
            assert not done.is_set()
            # The "registration" counts the row out meanwhile.
            _expire(admin, "beater")
        t.join(timeout=30)
        assert done.is_set() and errors == []
        # The waiting heartbeat did not revive the row: it registered again instead.
        assert m.evictions == 1
    finally:
        m.stop()


def test_same_host_and_pid_do_not_take_over_each_others_row(
    dsn: str, admin: psycopg.Connection[Any]
) -> None:
    """Two pools in one process share host and pid, as two containers with pid 1 on
    one hostname do: neither may take over the other's row."""
    # Default server ids: each pool gets its own row.
    first = ZenPool(_settings(dsn, server_id=None), fleet=True)
    try:
        second = ZenPool(_settings(dsn, server_id=None), fleet=True)
        try:
            assert first.server_id != second.server_id
            rows = admin.execute(
                "SELECT count(*), count(DISTINCT instance_id) FROM zen_servers"
                " WHERE expires_at > now()"
            ).fetchone()
            assert rows == (2, 2)
        finally:
            second.close()
        assert first.fleet is not None
        first.fleet.beat()  # its row is still its own
        assert first.fleet.evictions == 0
    finally:
        first.close()
    # The same explicit id: the second is refused, the first's row is untouched.
    s = _settings(dsn, server_id="twin", pool_max=3)
    with ZenPool(s) as one:
        before = admin.execute(
            "SELECT instance_id, pool_size FROM zen_servers WHERE server_id = 'twin'"
        ).fetchone()
        with pytest.raises(ServerIdInUse, match="twin"):
            ZenPool(_settings(dsn, server_id="twin", pool_max=2))
        after = admin.execute(
            "SELECT instance_id, pool_size FROM zen_servers WHERE server_id = 'twin'"
        ).fetchone()
        assert after == before and after is not None and after[1] == 3
        assert one.fleet is not None
        one.fleet.beat()
        assert one.fleet.evictions == 0


def test_job_history_survives_a_clean_shutdown(dsn: str, admin: psycopg.Connection[Any]) -> None:
    s = _settings(dsn, server_id="historian")
    with ZenPool(s):
        admin.execute(
            "INSERT INTO zen_jobs (server_id, status, finished_at, rows_claimed)"
            " VALUES ('historian', 'done', now(), 7)"
        )
    assert admin.execute("SELECT count(*) FROM zen_servers").fetchone() == (0,)
    assert admin.execute("SELECT server_id, rows_claimed FROM zen_jobs").fetchall() == [
        ("historian", 7)
    ]


def test_registration_with_many_jobs_of_an_expired_server(
    dsn: str, admin: psycopg.Connection[Any]
) -> None:
    """A crashed server with a long job history: its row is purged (outside the
    registration lock) and nothing cascades into zen_jobs."""
    admin.execute(
        "INSERT INTO zen_servers (server_id, host, pid, pool_size, version, started_at,"
        " last_heartbeat, expires_at) VALUES ('crashed', 'gone', 4242, 4, 'x',"
        " now() - interval '3 hours', now() - interval '3 hours', now() - interval '2 hours')"
    )
    admin.execute(
        "INSERT INTO zen_jobs (server_id, status, started_at, finished_at)"
        " SELECT 'crashed', 'done', now() - interval '3 hours', now() - interval '3 hours'"
        " FROM generate_series(1, 200000)"
    )
    # No foreign key references zen_servers: deleting a server row touches no job.
    assert admin.execute(
        "SELECT count(*) FROM pg_constraint WHERE confrelid = 'zen_servers'::regclass"
    ).fetchone() == (0,)
    with ZenPool(_settings(dsn, server_id="fresh", pool_max=2)) as pool:
        assert pool.max_size == 2
        wait_for(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM zen_servers WHERE server_id = 'crashed'"
                ).fetchone()
                == (0,)
            )
        )
    assert admin.execute(
        "SELECT count(*) FROM zen_jobs WHERE server_id = 'crashed'"
    ).fetchone() == (200000,)


def test_deleting_a_results_row_uses_an_index_on_every_contacts_partition(
    dsn: str, admin: psycopg.Connection[Any]
) -> None:
    """zen_contacts.source_id references results(id) ON DELETE SET NULL: the cascade
    looks the rows up by source_id in every partition, so each needs an index on it."""
    leaves = admin.execute(
        """
        SELECT c.relname,
               EXISTS (SELECT 1 FROM pg_index x
                       WHERE x.indrelid = c.oid AND x.indisvalid
                         AND x.indkey[0] = (SELECT attnum FROM pg_attribute
                                            WHERE attrelid = c.oid AND attname = 'source_id'))
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'zen_contacts'::regclass
        """
    ).fetchall()
    assert len(leaves) == 32
    assert [name for name, indexed in leaves if not indexed] == []
    # The statement the foreign key's trigger runs, planned generically as the trigger
    # plans it: with sequential scans discouraged, an unindexed partition still shows
    # a Seq Scan.
    with admin.transaction():
        admin.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        admin.execute("SET LOCAL enable_seqscan = off")
        admin.execute(
            "PREPARE setnull(bigint) AS"
            " UPDATE zen_contacts SET source_id = NULL WHERE $1 = source_id"
        )
        plan = "\n".join(r[0] for r in admin.execute("EXPLAIN EXECUTE setnull(1)").fetchall())
        admin.execute("DEALLOCATE setnull")
    assert "Seq Scan" not in plan, plan
    assert "Index" in plan
    # And the delete itself works (the contact keeps its row, loses the reference).
    rid = admin.execute(
        "INSERT INTO results (link, data) VALUES ('https://maps.example.com/x', '{}') RETURNING id"
    ).fetchone()
    assert rid is not None
    from zenpipe import keys

    link = "https://maps.example.com/x"
    admin.execute(
        "INSERT INTO zen_contacts (source_link, partition_key, source_id) VALUES (%s, %s, %s)",
        (link, keys.partition_key(link), rid[0]),
    )
    admin.execute("DELETE FROM results WHERE id = %s", (rid[0],))
    assert admin.execute("SELECT source_id FROM zen_contacts").fetchall() == [(None,)]


# -- 7. one connection policy: guarded_pool and the PgBouncer probe (point 15) -----------


class _Forwarder(threading.Thread):
    """A transparent TCP proxy on a port of its own (as a Docker port mapping or a
    TCP load balancer): not a PgBouncer, sessions stay sessions."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.halt = threading.Event()

    def run(self) -> None:
        self.listener.settimeout(0.2)
        while not self.halt.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        with a, b:
            while not self.halt.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)
        self.listener.close()


@pytest.mark.pgbouncer
def test_pgbouncer_probe_tells_a_bouncer_from_a_port_forward(dsn: str, pgbouncer_dsn: str) -> None:
    with psycopg.connect(pgbouncer_dsn, autocommit=True, prepare_threshold=None) as conn:
        assert detect_pgbouncer(conn) is True
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        assert detect_pgbouncer(conn) is False
        host, port = conn.info.host, conn.info.port
    forward = _Forwarder(host, port)
    forward.start()
    try:
        proxied = psycopg.conninfo.make_conninfo(dsn, port=forward.port)
        with psycopg.connect(proxied, autocommit=True, prepare_threshold=None) as conn:
            assert conn.info.port != port
            assert detect_pgbouncer(conn) is False  # a port of its own, but not a bouncer
    finally:
        forward.stop()


def _timeouts(conn: psycopg.Connection[Any]) -> tuple[str, str, str]:
    row = conn.execute("SHOW statement_timeout").fetchone()
    lock = conn.execute("SHOW lock_timeout").fetchone()
    idle = conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()
    assert row is not None and lock is not None and idle is not None
    return (row[0], lock[0], idle[0])


def _lock_wait_raises(
    pool: psycopg_pool.ConnectionPool[Any], admin: psycopg.Connection[Any]
) -> None:
    admin.execute("CREATE TABLE IF NOT EXISTS t_stuck (id int)")
    with admin.transaction():  # a stuck transaction holding the table
        admin.execute("LOCK TABLE t_stuck IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(psycopg.errors.LockNotAvailable), pool.connection() as conn:
            conn.execute("SELECT * FROM t_stuck")


@pytest.mark.parametrize("mode", [None, False, True])
def test_guarded_pool_carries_the_timeouts(
    dsn: str, admin: psycopg.Connection[Any], mode: bool | None
) -> None:
    s = Settings(statement_timeout="4s", lock_timeout="300ms", idle_in_tx_timeout="20s",
                 pgbouncer=mode)  # fmt: skip
    with guarded_pool(dsn, name="claimer-test", min_size=1, max_size=2, settings=s) as pool:
        assert isinstance(pool, psycopg_pool.ConnectionPool)
        assert (pool.min_size, pool.max_size) == (1, 2)
        with pool.connection() as conn:
            assert _timeouts(conn) == ("4s", "300ms", "20s")
            # Prepared statements only when known to be direct (told, or probed).
            assert (conn.prepare_threshold is None) == (mode is True)
            assert conn.info.parameter_status("application_name") == "claimer-test"
        _lock_wait_raises(pool, admin)


@pytest.mark.pgbouncer
def test_guarded_pool_through_pgbouncer(
    dsn: str, pgbouncer_dsn: str, admin: psycopg.Connection[Any]
) -> None:
    s = Settings(statement_timeout="4s", lock_timeout="300ms", idle_in_tx_timeout="20s")
    with guarded_pool(pgbouncer_dsn, name="upserter-test", min_size=1, max_size=3,
                      settings=s) as pool:  # fmt: skip
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(30):
                    with pool.connection() as conn:
                        assert conn.prepare_threshold is None
                        assert _timeouts(conn) == ("4s", "300ms", "20s")
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        _lock_wait_raises(pool, admin)


def test_guarded_pool_keeps_the_options_of_the_dsn(dsn: str) -> None:
    """The timeouts are added to the DSN's own startup options, not put in their place
    (a DSN asking for synchronous_commit = off, say, keeps it)."""
    own = f"{dsn} options='-c synchronous_commit=off -c work_mem=7MB'"
    s = Settings(lock_timeout="300ms", pgbouncer=False)
    with (
        guarded_pool(own, name="opts", min_size=1, max_size=1, settings=s) as pool,
        pool.connection() as conn,
    ):
        shown = [conn.execute(f"SHOW {g}").fetchone() for g in ("synchronous_commit", "work_mem")]
        timeout = conn.execute("SHOW lock_timeout").fetchone()
    assert shown == [("off",), ("7MB",)]
    assert timeout == ("300ms",)
