"""The claimer under real processes: many workers, SIGKILL, pg_terminate_backend.

Workers are separate Python processes (``python -c WORKER``) with threads inside, each
thread its own `Claimer`. Every claim is logged in ``claim_log`` (with the lease it got)
and every completion in ``completions`` (primary key: a second completion of a row would
fail the worker), in the same transaction as `Claimer.complete`. The invariants are then
read back from the database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from helpers import assert_no_leaks

pytestmark = pytest.mark.slow

WORKER = r"""
import sys, threading, time
import psycopg
from zenpipe.claim import Claimer

dsn, owner, threads, batch_size, lease, mode = sys.argv[1:7]
threads, batch_size, lease = int(threads), int(batch_size), float(lease)
LOG = (
    "INSERT INTO claim_log (id, token, owner, claimed_at, lease_until) "
    "SELECT unnest(%s::bigint[]), %s, %s, %s - make_interval(secs => %s), %s"
)
DONE = "INSERT INTO completions (id, token, owner) SELECT unnest(%s::bigint[]), %s, %s"
errors = []


def log(conn, batch):
    conn.execute(LOG, (batch.ids, batch.claims[0].token, batch.owner,
                       batch.lease_until, lease, batch.lease_until))


def drain(name):
    try:
        with Claimer(dsn, owner=name, batch_size=batch_size, lease_seconds=lease) as c, \
                psycopg.connect(dsn, autocommit=True) as side, psycopg.connect(dsn) as conn:
            while True:
                batch = c.claim()
                if not batch:
                    left = side.execute(
                        "SELECT count(*) FROM results WHERE status <> 'done'").fetchone()[0]
                    if left == 0:
                        return
                    time.sleep(0.05)
                    continue
                log(side, batch)
                with conn.transaction():
                    conn.execute(DONE, (batch.ids, batch.claims[0].token, name))
                    c.complete(batch, conn=conn)
    except BaseException as e:
        errors.append(repr(e))


if mode == "drain":
    ts = [threading.Thread(target=drain, args=(f"{owner}-t{i}",)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        print("ERRORS", errors, flush=True)
        sys.exit(1)
    sys.exit(0)

with Claimer(dsn, owner=owner, batch_size=batch_size, lease_seconds=lease) as c, \
        psycopg.connect(dsn, autocommit=True) as side:
    batch = c.claim()
    log(side, batch)
    if mode == "hold":
        print("READY", len(batch), flush=True)
        time.sleep(3600)
    # hold_tx: write the effects and complete inside a transaction that never commits
    conn = psycopg.connect(dsn)
    conn.execute(DONE, (batch.ids, batch.claims[0].token, owner))
    c.complete(batch, conn=conn)
    print("READY", conn.info.backend_pid, flush=True)
    try:
        while True:
            time.sleep(0.1)
            conn.execute("SELECT 1")
    except psycopg.OperationalError as e:
        print("TERMINATED", type(e).__name__, flush=True)
        sys.exit(3)
"""


def setup(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE claim_log (id bigint NOT NULL, token bigint NOT NULL, owner text, "
            "claimed_at timestamptz NOT NULL, lease_until timestamptz NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE completions (id bigint PRIMARY KEY, token bigint NOT NULL, owner text)"
        )
        conn.execute(
            "INSERT INTO results (link, data, priority) "
            "SELECT 'https://maps.example.com/' || g, jsonb_build_object('n', g), g %% 3 "
            "FROM generate_series(1, %s) AS g",
            (rows,),
        )


def spawn(
    dsn: str, owner: str, mode: str, *, threads: int = 1, batch: int = 100, lease: float = 300.0
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, dsn, owner, str(threads), str(batch), str(lease), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), (line, proc.stderr.read() if proc.stderr else "")
    return line.split()


def finish(procs: list[subprocess.Popen[str]], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.communicate()
            pytest.fail("workers did not finish in time")
        assert p.returncode == 0, (out, err)


def one(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def assert_exactly_once(dsn: str, rows: int) -> None:
    """Every row done and completed once, by the claim that held it, and no two claims of
    a row ever overlapped in time (the next claim starts after the previous lease ends)."""
    with psycopg.connect(dsn) as conn:
        assert one(conn, "SELECT count(*) FROM results WHERE status = 'done'") == rows
        assert one(conn, "SELECT count(*), count(DISTINCT id) FROM completions") == (rows, rows)
        # The completing claim is the row's latest claim, with its token.
        assert (
            one(
                conn,
                "SELECT count(*) FROM completions AS c JOIN results AS r USING (id) "
                "WHERE r.claim_token <> c.token",
            )
            == 0
        )
        assert (
            one(
                conn,
                "SELECT count(*) FROM results AS r WHERE NOT EXISTS "
                "(SELECT 1 FROM claim_log AS l WHERE l.id = r.id)",
            )
            == 0
        )
        overlapping = one(
            conn,
            "SELECT count(*) FROM (SELECT claimed_at, lag(lease_until) OVER w AS prev_end "
            "FROM claim_log WINDOW w AS (PARTITION BY id ORDER BY claimed_at)) AS s "
            "WHERE claimed_at < prev_end",
        )
        assert overlapping == 0


def test_many_processes_claim_every_row_exactly_once(dsn: str) -> None:
    """8 processes x 2 threads over 50,000 rows, batches of 100, long leases: every row is
    claimed exactly once (no row held by two live claims) and completed exactly once."""
    rows = 50_000
    setup(dsn, rows)
    procs = [spawn(dsn, f"p{i}", "drain", threads=2, batch=100) for i in range(8)]
    finish(procs)
    assert_exactly_once(dsn, rows)
    with psycopg.connect(dsn) as conn:
        # Long leases never ran out: a second claim of any row would be a double claim.
        assert one(conn, "SELECT count(*), count(DISTINCT id) FROM claim_log") == (rows, rows)
        assert one(conn, "SELECT count(DISTINCT owner) FROM completions") == 16
    assert_no_leaks(dsn)


def test_sigkill_mid_batch_loses_nothing(dsn: str) -> None:
    """A worker SIGKILLed while holding a batch: its rows come back when its lease runs
    out and the other workers complete them; nothing is done twice."""
    rows = 3_000
    setup(dsn, rows)
    # One victim at a time: two claims racing for the same window may each come back
    # with fewer than 200 rows (a claim takes *up to* its limit), and the counts below
    # are exact.  CI once saw 393 = 200 + 193 with both victims started together.  The
    # victims' lease outlasts the second one's start, so it cannot take the first's rows.
    victims = []
    for i in range(2):
        victims.append(spawn(dsn, f"victim{i}", "hold", batch=200, lease=8.0))
        assert wait_ready(victims[-1])[1:] == ["200"]
    workers = [spawn(dsn, f"w{i}", "drain", threads=2, batch=100, lease=1.5) for i in range(3)]
    for v in victims:
        os.kill(v.pid, signal.SIGKILL)
        v.communicate(timeout=30)
        assert v.returncode == -signal.SIGKILL
    finish(workers)
    assert_exactly_once(dsn, rows)
    with psycopg.connect(dsn) as conn:
        # The victims' 400 rows were claimed twice: by the victim, then by a worker.
        assert one(conn, "SELECT count(*) FROM claim_log WHERE owner LIKE 'victim%%'") == 400
        assert one(conn, "SELECT count(*) FROM completions WHERE owner LIKE 'victim%%'") == 0
        assert (
            one(
                conn,
                "SELECT count(*) FROM results WHERE attempts = 2 AND id IN "
                "(SELECT id FROM claim_log WHERE owner LIKE 'victim%%')",
            )
            == 400
        )
    assert_no_leaks(dsn)


def test_terminated_backend_mid_transaction_loses_nothing(dsn: str) -> None:
    """A worker's connection killed with pg_terminate_backend in the middle of its
    effects+complete transaction: the transaction is gone (no effect, no completion), the
    worker sees the error, and its rows are completed by others once its lease runs out."""
    rows = 2_000
    setup(dsn, rows)
    victim = spawn(dsn, "victim", "hold_tx", batch=150, lease=1.5)
    _, pid = wait_ready(victim)
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert one(admin, "SELECT pg_terminate_backend(%s)", (int(pid),)) is True
    out, err = victim.communicate(timeout=60)
    assert victim.returncode == 3 and "TERMINATED" in out, (out, err)
    workers = [spawn(dsn, f"w{i}", "drain", threads=2, batch=100, lease=1.5) for i in range(3)]
    finish(workers)
    assert_exactly_once(dsn, rows)
    with psycopg.connect(dsn) as conn:
        assert one(conn, "SELECT count(*) FROM completions WHERE owner = 'victim'") == 0
        assert (
            one(
                conn,
                "SELECT count(*) FROM claim_log WHERE owner <> 'victim' AND id IN "
                "(SELECT id FROM claim_log WHERE owner = 'victim')",
            )
            == 150
        )
    assert_no_leaks(dsn)
