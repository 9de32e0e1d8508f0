"""``zenpipe worker``: real supervisor and worker processes, real signals, real
PostgreSQL (issue 9, point 1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import assert_no_leaks, wait_for

TESTS = Path(__file__).parent


def one(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def _fill(dsn: str, n: int, tag: str = "r", **data: Any) -> list[int]:
    """*n* rows with *data*; links ``.../<tag><i>`` (one contact per link)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "INSERT INTO results (link, data) SELECT 'https://maps.example.com/' || %s || g, "
            "%s::jsonb || jsonb_build_object('n', g) "
            "FROM generate_series(1, %s) AS g RETURNING id",
            (tag, json.dumps(data), n),
        ).fetchall()
    return [r[0] for r in rows]


class Server:
    """``zenpipe worker`` in a session of its own, as a terminal would start it."""

    def __init__(self, dsn: str, tmp: Path, target: str, *args: str) -> None:
        self.log = tmp / "stderr.log"
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
            RUNTIME_TEST_DIR=str(tmp),
            ZENPIPE_HEARTBEAT_INTERVAL="1",
        )
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "zenpipe", "worker", f"runtime_enrich:{target}"),
                    *("--dsn", dsn, "--lease", "5", "--idle-sleep", "0.2", *args),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_until(self, cond: Callable[[], object], timeout: float) -> None:
        """`wait_for` that shows the server's log (and exit code) when it fails."""
        try:
            wait_for(cond, timeout=timeout)
        except AssertionError:
            raise AssertionError(
                f"condition not met in {timeout} s; exit code {self.proc.poll()}; "
                f"log:\n{self.stderr()[-6000:]}"
            ) from None

    def interrupt(self) -> float:
        """Ctrl-C: SIGINT to the whole process group; return when it was sent."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _status(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT status::text, count(*) FROM results GROUP BY 1").fetchall()
    return {s: int(n) for s, n in rows}


def _done(dsn: str, n: int) -> bool:
    return _status(dsn).get("done", 0) == n


def _no_worker_connections(dsn: str) -> bool:
    return not one(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'zenpipe%%'",
    )


def _assert_quiet(text: str, max_lines: int) -> None:
    assert "Traceback" not in text, text
    assert len(text.splitlines()) < max_lines, text


@pytest.mark.slow
def test_sigint_to_the_process_group_stops_within_5s_leaving_nothing_claimed(
    dsn: str, tmp_path: Path
) -> None:
    """Ctrl-C in the middle of the work: exit 0 within 5 s, every batch in flight
    finished (nothing claimed, no attempt spent on the rest), no traceback, a few lines
    of log; the fleet rows are gone.  Started again, it completes the rest; Ctrl-C when
    idle stops it just as cleanly."""
    n = 400
    _fill(dsn, n, sleep=0.01)
    server = Server(dsn, tmp_path, "enrich", "--processes", "2", "--batch", "10")
    try:
        server.wait_until(lambda: _status(dsn).get("done", 0) >= 40, timeout=120)
        assert one(dsn, "SELECT count(*) FROM zen_servers") == 2  # one fleet member each
        sent = server.interrupt()
        assert server.wait(timeout=5) == 0
        print(f"stopped {time.monotonic() - sent:.2f} s after SIGINT while working")
    finally:
        server.kill()
    status = _status(dsn)
    assert status.get("claimed", 0) == 0, status
    assert status.get("done", 0) < n, "the work should have been interrupted"
    assert one(dsn, "SELECT count(*) FROM results WHERE status = 'pending' AND attempts > 0") == 0
    assert one(dsn, "SELECT count(*) FROM zen_servers") == 0
    text = server.stderr()
    _assert_quiet(text, 20)
    assert text.count("stopped: ") == 3, text  # two processes and the supervisor
    assert_no_leaks(dsn)

    again = Server(dsn, tmp_path, "enrich", "--processes", "2", "--batch", "10")
    try:
        again.wait_until(lambda: _done(dsn, n), timeout=120)
        sent = again.interrupt()
        assert again.wait(timeout=5) == 0
        print(f"stopped {time.monotonic() - sent:.2f} s after SIGINT while idle")
    finally:
        again.kill()
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == n
    assert one(dsn, "SELECT count(*) FROM results WHERE attempts <> 1") == 0
    _assert_quiet(again.stderr(), 20)
    assert_no_leaks(dsn)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM to the supervisor"])
def test_grace_running_out_releases_the_rows_of_a_blocked_enrichment(
    dsn: str, tmp_path: Path, how: str
) -> None:
    """An enrichment that never returns: when --grace runs out the process gives its
    rows back (pending, attempt count as before the claim) and exits 0 anyway; the same
    whether Ctrl-C reaches the whole group or a service manager signals the supervisor."""
    ids = _fill(dsn, 3, block=True)
    server = Server(dsn, tmp_path, "enrich", "--batch", "3", "--grace", "2")
    try:
        server.wait_until((tmp_path / f"entered-{ids[0]}").exists, timeout=120)
        assert _status(dsn) == {"claimed": 3}
        if how.startswith("SIGINT"):
            sent = server.interrupt()
        else:
            server.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
        assert server.wait(timeout=2 + 10) == 0
        print(f"stopped {time.monotonic() - sent:.2f} s after {how} (grace 2 s)")
    finally:
        server.kill()
    assert _status(dsn) == {"pending": 3}
    assert one(dsn, "SELECT max(attempts) FROM results") == 0
    text = server.stderr()
    assert "released 3" in text, text
    _assert_quiet(text, 20)
    assert_no_leaks(dsn)


@pytest.mark.slow
def test_a_killed_worker_process_is_restarted_and_the_work_completes(
    dsn: str, tmp_path: Path
) -> None:
    """A worker process SIGKILLed in the middle of a batch: the supervisor logs the
    signal, starts a new one, and every row is done once the dead one's lease ran out."""
    n = 40
    _fill(dsn, n)
    _fill(dsn, 1, tag="k", kill_once=True)
    server = Server(dsn, tmp_path, "enrich", "--processes", "2", "--batch", "5")
    try:
        server.wait_until(lambda: _done(dsn, n + 1), timeout=180)
        server.interrupt()
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
    text = server.stderr()
    assert (tmp_path / "killed").exists()
    assert "was killed by SIGKILL" in text, text
    assert "restarting in 0.5 s" in text, text
    assert "1 restart(s)" in text, text
    assert "Traceback" not in text, text
    assert one(dsn, "SELECT count(*) FROM zen_contacts") == n + 1


@pytest.mark.slow
def test_a_crash_loop_makes_the_supervisor_give_up_with_the_reason(
    dsn: str, tmp_path: Path
) -> None:
    """Every worker process dies on its first row: after --max-restarts restarts within
    the window the supervisor stops and exits 1, naming the crash loop and the signal."""
    _fill(dsn, 50, kill=True)
    server = Server(dsn, tmp_path, "enrich", "--batch", "2", "--max-restarts", "2")
    try:
        assert server.wait(timeout=120) == 1
    finally:
        server.kill()
    text = server.stderr()
    assert "crash loop, 3 deaths within 60 s (--max-restarts 2)" in text, text
    assert text.count("was killed by SIGKILL") == 3, text
    assert "Traceback" not in text, text
    assert wait_for(lambda: _no_worker_connections(dsn), timeout=30)


def test_a_second_sigint_exits_at_once(dsn: str, tmp_path: Path) -> None:
    """Ctrl-C twice: the supervisor does not wait for the grace (60 s): it kills its
    worker processes at once and exits 130; their rows wait out the lease."""
    ids = _fill(dsn, 2, block=True)
    server = Server(dsn, tmp_path, "enrich", "--batch", "2", "--grace", "60")
    try:
        server.wait_until((tmp_path / f"entered-{ids[0]}").exists, timeout=120)
        server.interrupt()
        server.wait_until(lambda: "stopping (SIGTERM)" in server.stderr(), timeout=30)
        sent = server.interrupt()
        assert server.wait(timeout=10) == 130
        print(f"exited {time.monotonic() - sent:.2f} s after the second SIGINT")
    finally:
        server.kill()
    assert wait_for(lambda: _no_worker_connections(dsn), timeout=30)
    assert _status(dsn) == {"claimed": 2}  # killed: the lease brings them back
    text = server.stderr()
    assert "second signal: killed 1 worker process(es)" in text, text
    assert "Traceback" not in text, text


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_here:enrich", "cannot import 'no_such_module_here'"),
        ("runtime_enrich:nothing", "has no attribute 'nothing'"),
        ("runtime_enrich:not_callable", "int object is not callable"),
        ("runtime_enrich", "expected MODULE:CALLABLE"),
    ],
)
def test_a_bad_target_is_refused_before_any_process_starts(
    dsn: str, tmp_path: Path, target: str, message: str
) -> None:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    done = subprocess.run(
        [sys.executable, "-m", "zenpipe", "worker", target, "--dsn", dsn],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert one(dsn, "SELECT count(*) FROM zen_servers") == 0


def test_a_negative_affinity_is_refused_before_any_process_starts(dsn: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    done = subprocess.run(
        [sys.executable, "-m", "zenpipe", "worker", "runtime_enrich:enrich", "--dsn", dsn,
         "--affinity", "-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert "--affinity must be 0 (off) or more, got -1" in done.stderr
    assert one(dsn, "SELECT count(*) FROM zen_servers") == 0


def test_worker_without_a_database_refuses(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ZENPIPE_DSN"}
    done = subprocess.run(
        [sys.executable, "-m", "zenpipe", "worker", "runtime_enrich:enrich", "--processes", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "needs your database" in done.stderr


@pytest.mark.slow
def test_worker_processes_stop_when_the_supervisor_is_killed(dsn: str, tmp_path: Path) -> None:
    """The supervisor SIGKILLed (no chance to forward anything): its worker processes
    notice their parent is gone, stop as on SIGTERM (rows released when the grace runs
    out) and leave the fleet; nothing stays claimed, no orphan keeps working."""
    ids = _fill(dsn, 2, block=True)
    server = Server(dsn, tmp_path, "enrich", "--batch", "2", "--grace", "1")
    try:
        server.wait_until((tmp_path / f"entered-{ids[0]}").exists, timeout=120)
        server.proc.kill()
        server.proc.wait()
        assert wait_for(lambda: _no_worker_connections(dsn), timeout=60)
    finally:
        server.kill()
    assert _status(dsn) == {"pending": 2}
    assert one(dsn, "SELECT max(attempts) FROM results") == 0
    assert one(dsn, "SELECT count(*) FROM zen_servers") == 0
    text = server.stderr()
    assert "stopping (supervisor gone)" in text, text
    assert "released 2" in text, text
