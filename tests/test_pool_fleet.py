"""The fleet budget with real processes against a PostgreSQL with max_connections = 20.

Five servers start at the same instant; each wants a pool of 4 (plus its control
connection) from a budget of 20 - 3 (superuser_reserved_connections) - 5 (zenpipe's
reserve) = 12. The test samples pg_stat_activity throughout and collects every error
the servers see: the fleet never holds more than its budget (client connections never
pass the budget plus the test's own), nobody gets "too many clients", the late servers
fail with the budget arithmetic or start smaller, and a SIGKILLed server's share comes
back once its lease runs out.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from zenpipe import schema
from zenpipe.embedded import ThrowawayPostgres

MAX_CONNECTIONS = 20
RESERVE = 5
BUDGET = MAX_CONNECTIONS - 3 - RESERVE  # superuser_reserved_connections defaults to 3
# Client connections that are not the fleet's: the sampler, the test's own short reads
# of zen_servers (one at a time), and the control connections of the two servers that
# are refused (each holds one while its registration is counted and refused).
OWN_CONNECTIONS = 1 + 1 + 2
# PostgreSQL itself refuses connections past max_connections, so a peak at or below it
# proves nothing: the budget must leave room below it for the bound to mean anything.
assert BUDGET + OWN_CONNECTIONS < MAX_CONNECTIONS - 3

# One zenpipe server: register and open its pool when the go-file appears, hammer the
# pool from four threads until stdin closes, then report every error it saw.
SERVER = r"""
import json, os, sys, threading, time
from zenpipe.config import Settings
from zenpipe.errors import ZenpipeError
from zenpipe.pool import ZenPool

dsn, go, pool_max, pool_floor = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def say(kind, **kw):
    print(json.dumps({"kind": kind, "pid": os.getpid(), **kw}), flush=True)
say("loaded")
while not os.path.exists(go):
    time.sleep(0.005)
# Servers that poll (no LISTEN connection): the arithmetic below counts pool + control;
# the listener's share of the budget is tested in test_wakeup.py.
settings = Settings(dsn=dsn, pool_max=pool_max, pool_min=pool_max, pool_floor=pool_floor,
                    reserved_connections=%(reserve)d, heartbeat_interval=1.0,
                    heartbeat_misses=3, pool_timeout=20, listen=False)
try:
    pool = ZenPool(settings)
    pool.wait(timeout=20)
except ZenpipeError as e:
    say("refused", error=type(e).__name__, message=str(e))
    sys.exit(0)
except Exception as e:
    say("crashed", error=type(e).__name__, message=str(e))
    sys.exit(1)
say("ready", size=pool.max_size)
errors, stop = [], threading.Event()
def work():
    while not stop.is_set():
        try:
            with pool.connection() as conn:
                conn.execute("SELECT pg_sleep(0.01)")
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
sys.stdin.read()
stop.set()
for t in threads:
    t.join()
pool.close()
say("done", errors=errors[:20], heartbeats=pool.fleet.heartbeats,
    heartbeat_errors=pool.fleet.heartbeat_errors)
""".replace("%(reserve)d", str(RESERVE))


class Server:
    def __init__(self, dsn: str, go: Path, pool_max: int, pool_floor: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, dsn, str(go), str(pool_max), str(pool_floor)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(json.loads(line))

    def next(self, timeout: float = 60) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"server {self.proc.pid} said nothing in {timeout} s") from None

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        msg = self.next()
        self.proc.wait(timeout=30)
        return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        """Kill if still running, close the pipes, keep stderr."""
        self.kill()
        assert self.proc.stdin is not None and self.proc.stderr is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        with self.proc.stderr:
            self.stderr = self.proc.stderr.read()
        self._reader.join(timeout=30)


class Sampler(threading.Thread):
    """Counts client backends in pg_stat_activity as fast as it can."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.peak = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            row = self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).fetchone()
            assert row is not None
            self.peak = max(self.peak, int(row[0]))
            self.samples += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        self.conn.close()


@pytest.fixture
def small_pg() -> Iterator[ThrowawayPostgres]:
    settings = {"max_connections": str(MAX_CONNECTIONS), "shared_buffers": "16MB"}
    with ThrowawayPostgres(settings=settings) as pg:
        schema.apply(pg.dsn)
        yield pg


def _registered(dsn: str) -> list[tuple[int, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            (int(r[0]), int(r[1]))
            for r in conn.execute(
                "SELECT pid, pool_size FROM zen_servers WHERE expires_at > now() ORDER BY pid"
            )
        ]


def _all_heartbeated(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) > 0 AND bool_and(last_heartbeat > started_at) FROM zen_servers"
            " WHERE expires_at > now()"
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.slow
def test_fleet_never_exceeds_max_connections(small_pg: ThrowawayPostgres) -> None:
    dsn = small_pg.dsn
    go = Path(tempfile.mkdtemp()) / "go"
    sampler = Sampler(dsn)
    sampler.start()
    servers: list[Server] = []
    try:
        servers = [Server(dsn, go, pool_max=4, pool_floor=1) for _ in range(5)]
        for srv in servers:
            assert srv.next()["kind"] == "loaded"
        go.touch()  # all five register at once
        first = {srv.proc.pid: srv.next() for srv in servers}
        kinds = sorted(m["kind"] for m in first.values())
        assert kinds == ["ready"] * 3 + ["refused"] * 2, first
        ready = [srv for srv in servers if first[srv.proc.pid]["kind"] == "ready"]
        # 4+1 and 4+1 leave 2: the third starts smaller (pool_floor 1), the rest refuse.
        assert sorted(first[s.proc.pid]["size"] for s in ready) == [1, 4, 4]
        for m in first.values():
            if m["kind"] == "refused":
                assert m["error"] == "FleetBudgetExceeded"
                assert f"fleet budget {BUDGET} = max_connections {MAX_CONNECTIONS}" in m["message"]
                assert "0 left" in m["message"]
        assert sum(size + 1 for _, size in _registered(dsn)) == BUDGET

        # A SIGKILLed server's share comes back after its lease (3 x 1 s).
        victim = next(s for s in ready if first[s.proc.pid]["size"] == 4)
        victim.kill()
        deadline = time.monotonic() + 30
        while any(pid == victim.proc.pid for pid, _ in _registered(dsn)):
            assert time.monotonic() < deadline, "the killed server's row never expired"
            time.sleep(0.1)
        late = Server(dsn, go, pool_max=4, pool_floor=4)
        servers.append(late)
        assert late.next()["kind"] == "loaded"
        msg = late.next()
        assert msg["kind"] == "ready" and msg["size"] == 4, msg
        assert sum(size + 1 for _, size in _registered(dsn)) == BUDGET

        # All pools busy until every survivor has heartbeated since it registered.
        deadline = time.monotonic() + 60
        while not _all_heartbeated(dsn):
            assert time.monotonic() < deadline, "a server never heartbeated"
            time.sleep(0.1)
        survivors = [s for s in ready if s is not victim] + [late]
        done = [s.finish() for s in survivors]
    finally:
        for srv in servers:
            srv.close()
        sampler.stop()
    for msg in done:
        assert msg["kind"] == "done"
        assert msg["errors"] == [], msg
        assert msg["heartbeats"] >= 1 and msg["heartbeat_errors"] == 0
    stderr = "".join(srv.stderr for srv in servers)
    assert "too many clients" not in stderr
    assert "too many clients" not in json.dumps(first)
    assert sampler.samples > 10
    assert sampler.peak <= MAX_CONNECTIONS
    # What PostgreSQL cannot enforce for us: the fleet stayed within its budget.
    assert sampler.peak <= BUDGET + OWN_CONNECTIONS, sampler.peak
    print(
        f"\nfleet budget test: peak {sampler.peak} client connections "
        f"(max_connections {MAX_CONNECTIONS}, budget {BUDGET} + {OWN_CONNECTIONS} of the "
        f"test's own, {sampler.samples} samples)",
        file=sys.stderr,
    )
    assert _registered(dsn) == []  # clean shutdowns left
    os.unlink(go)
