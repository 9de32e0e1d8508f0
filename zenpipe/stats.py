"""Hourly statistics (``zen_stats_hourly``) and what ``zenpipe stats`` shows.

Two writers, one truth.  ``zen_jobs`` is the ledger: one row per batch, written by the
worker with the batch's figures (claimed, written, rejected, failed, emails).

* **Live**: the worker's bookkeeping statement also adds the batch to its hour's row
  (``zen_record_stats_v1``, with "+"), so the current hour moves with every batch.
* **Rollup** (`rollup`, ``zenpipe stats rollup``): recomputes every *closed* hour after
  the watermark (``zen_stats_rollup.rolled_up_to``) from ``zen_jobs`` and sets the rows
  with "=", then moves the watermark.  Re-running it, for the same hours or with
  ``since`` reaching back, yields the same rows: nothing is counted twice.  It never
  touches the open hour (whose live increments it would race with), and it repairs
  closed hours whose live increments were lost (a bookkeeping statement that failed
  after its job row was written by another tool, a stats table rebuilt, jobs inserted
  by hand).

A closed hour is one that ended more than *margin* seconds ago: every batch recorded in
it has committed by then (its statement runs for at most ``statement_timeout``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row

from . import dashboard
from ._ops import Conn, connect
from .config import Settings
from .errors import ZenpipeError
from .locks import NAMESPACE_OPS, OPS_ROLLUP
from .pool import Budget, FleetStatus
from .queries import load

__all__ = ["RollupBusy", "RollupReport", "fleet_overview", "hours", "rollup"]

#: Hours recomputed per transaction: bounds the transaction's length and locks.
HOURS_PER_TRANSACTION = 24


class RollupBusy(ZenpipeError):
    """Another session is running the rollup right now."""


@dataclass(frozen=True)
class RollupReport:
    """What a rollup did: the hours it recomputed ([start, end)) and rows it changed."""

    start: datetime | None
    end: datetime | None
    hours: int
    rows_changed: int
    seconds: float

    def render(self) -> str:
        if self.start is None or self.end is None or self.hours == 0:
            return "rollup: nothing to do (no closed hour after the watermark)"
        return (
            f"rollup: recomputed {self.hours} hour(s) {self.start:%Y-%m-%d %H:00} .. "
            f"{self.end:%Y-%m-%d %H:00} UTC from zen_jobs, {self.rows_changed} row(s) "
            f"changed, in {self.seconds:.2f} s"
        )


def rollup(dsn: str, *, since: datetime | None = None, margin: float = 600.0) -> RollupReport:
    """Recompute the closed hours after the watermark (or from *since*) into
    ``zen_stats_hourly`` and move the watermark; idempotent.

    Runs in transactions of `HOURS_PER_TRANSACTION` hours each; a run interrupted
    between two keeps the hours it finished (the watermark moved with them).  Raises
    `RollupBusy` when another rollup holds the lock.  *margin*: seconds after its end
    before an hour counts as closed.
    """
    q = load("stats")
    started = time.monotonic()
    first: datetime | None = None
    last: datetime | None = None
    n_hours = changed = 0
    with connect(dsn, purpose="stats-rollup", statement_timeout=600.0) as conn:
        while True:
            with conn.transaction():
                got = conn.execute(
                    q["try_lock"], {"namespace": NAMESPACE_OPS, "key": OPS_ROLLUP}
                ).fetchone()
                if not (got and got[0]):
                    raise RollupBusy("another session is running the hourly rollup")
                row = conn.execute(q["state"], {"margin": margin}).fetchone()
                assert row is not None
                watermark, closed_until, oldest = row
                lo = since if since is not None else (watermark or oldest)
                if lo is None or lo >= closed_until:
                    break
                lo = _hour(conn, lo)
                hi = min(closed_until, _plus_hours(conn, lo, HOURS_PER_TRANSACTION))
                hours_here = int((hi - lo).total_seconds() // 3600)
                rows = conn.execute(q["recompute"], {"lo": lo, "hi": hi}).fetchall()
                conn.execute(q["advance"], {"hi": hi, "hours": hours_here})
            first = first or lo
            last = hi
            n_hours += hours_here
            changed += len(rows)
            since = hi
    return RollupReport(first, last, n_hours, changed, time.monotonic() - started)


def _hour(conn: Conn, ts: datetime) -> datetime:
    row = conn.execute("SELECT date_trunc('hour', %s::timestamptz, 'UTC')", (ts,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _plus_hours(conn: Conn, ts: datetime, n: int) -> datetime:
    row = conn.execute("SELECT %s::timestamptz + make_interval(hours => %s)", (ts, n)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def hours(conn: Conn, n: int = 24) -> list[dict[str, Any]]:
    """The last *n* hours of ``zen_stats_hourly``, summed over servers, oldest first;
    ``live`` marks hours at or after the watermark (still moving with live increments
    or not rolled up yet)."""
    if n < 1:
        raise ValueError("hours must be at least 1")
    return (
        conn.cursor(row_factory=dict_row).execute(load("stats")["hours"], {"hours": n}).fetchall()
    )


def render_hours(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'hour (UTC)':<17} {'servers':>7} {'claimed':>9} {'written':>9} {'rejected':>8} "
        f"{'failed':>7} {'emails':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['hour']:%Y-%m-%d %H:00} {r['servers']:>8} {r['rows_claimed']:>9} "
            f"{r['rows_written']:>9} {r['rows_rejected']:>8} {r['rows_failed']:>7} "
            f"{r['emails_found']:>8}{'  (live)' if r['live'] else ''}"
        )
    if not rows:
        lines.append("(no rows in zen_stats_hourly for these hours)")
    return "\n".join(lines)


def fleet_overview(conn: Conn, settings: Settings | None = None) -> tuple[FleetStatus, Any]:
    """The fleet (servers, budget, pool metrics) with the *materialized* dashboard.

    Like `zenpipe.pool.fleet_status`, but reads ``zen_mv_dashboard`` (one row) instead
    of the live view, whose two counting passes are what the dashboard is materialized
    to avoid; returns the status and the `zenpipe.dashboard.Dashboard`.
    """
    s = settings or Settings.from_env(dsn="")
    q = load("pool")
    limits = conn.execute(q["server_limits"]).fetchone()
    assert limits is not None
    backends = conn.execute(q["backend_connections"]).fetchone()
    servers = conn.cursor(row_factory=dict_row).execute(q["fleet_servers"]).fetchall()
    for srv in servers:
        for key, value in srv.items():
            if isinstance(value, datetime):
                srv[key] = value.isoformat()
    board = dashboard.read(conn)
    figures = {
        "refreshed_at": board.refreshed_at.isoformat(),
        "age_seconds": round(board.age_seconds, 1),
        **{k: _flat(v) for k, v in board.figures.items()},
    }
    status = FleetStatus(
        budget=Budget(
            int(limits[0]), int(limits[1]), int(limits[2]), s.reserved_connections, s.fleet_budget
        ),
        backend_connections=int(backends[0]) if backends else 0,
        servers=servers,
        dashboard=figures,
    )
    return status, board


def _flat(value: Any) -> Any:
    """JSON figures as plain text for the text output (``ID 12, US 3``)."""
    if isinstance(value, list):
        return ", ".join(
            f"{v.get('country')} {v.get('contacts')}" if isinstance(v, dict) else str(v)
            for v in value
        )
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return value
