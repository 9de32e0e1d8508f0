"""The connection the operations commands use (dashboard, stats, doctor, prune, ...).

One short-lived direct connection per command, autocommit, named in
``pg_stat_activity`` (``zenpipe:<purpose>``), with a ``lock_timeout`` so that an
operation never queues behind (and in front of) the workers' locks, and a
``statement_timeout`` chosen by the operation (a refresh of the dashboard may take
longer than a worker's statement is allowed to).  Prepared statements are off, so it
also works through PgBouncer for the commands that need no session state.
"""

from __future__ import annotations

from typing import Any

import psycopg

__all__ = ["Conn", "connect"]

Conn = psycopg.Connection[Any]


def connect(
    dsn: str, *, purpose: str, statement_timeout: float = 60.0, lock_timeout: float = 5.0
) -> Conn:
    """An autocommit connection for one operation; the caller closes it.

    Timeouts are in seconds (0: none).  They are set with ``set_config`` after
    connecting rather than as startup options, so a DSN's own options stay untouched.
    """
    conn = psycopg.connect(
        dsn, autocommit=True, prepare_threshold=None, application_name=f"zenpipe:{purpose}"[:63]
    )
    try:
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false),"
            " set_config('lock_timeout', %s, false)",
            (f"{round(statement_timeout * 1000)}", f"{round(lock_timeout * 1000)}"),
        )
    except BaseException:
        conn.close()
        raise
    return conn
