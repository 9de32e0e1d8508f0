"""Small helpers shared by the test modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import psycopg

from zenpipe.locks import leftovers

T = TypeVar("T")


def assert_no_leaks(dsn: str) -> None:
    """No zenpipe advisory lock held and no idle-in-transaction session on the database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = leftovers(conn)
    assert left.advisory_locks == 0, left
    assert left.idle_in_transaction == 0, left


def wait_for(cond: Callable[[], T], timeout: float = 60.0) -> T:
    """Poll *cond* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def wait_past(dsn: str, moment: datetime, timeout: float = 60.0) -> None:
    """Wait until the server's clock is past *moment*: a lease has run out where it is
    judged, whatever the client's clock says."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_for(
            lambda: conn.execute("SELECT clock_timestamp() > %s", (moment,)).fetchone() == (True,),
            timeout,
        )
