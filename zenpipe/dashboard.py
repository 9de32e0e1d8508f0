"""The materialized dashboard: ``zen_mv_dashboard`` (migration 0012).

One row, computed in one pass over each big table (see the migration), refreshed by
`refresh` (``zenpipe refresh-dashboard``) with ``REFRESH MATERIALIZED VIEW
CONCURRENTLY``: readers are never blocked while it runs, they read the previous row
until the new one commits.  `read` returns the row and how old it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row

from ._ops import Conn, connect
from .errors import ZenpipeError
from .locks import NAMESPACE_OPS, OPS_DASHBOARD
from .queries import load

__all__ = ["Dashboard", "RefreshBusy", "RefreshReport", "read", "refresh"]


class RefreshBusy(ZenpipeError):
    """Another session is refreshing the dashboard right now."""


@dataclass(frozen=True)
class Dashboard:
    """The dashboard row, when it was computed and how old it is (database clock)."""

    refreshed_at: datetime
    age_seconds: float
    figures: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "refreshed_at": self.refreshed_at.isoformat(),
            "age_seconds": round(self.age_seconds, 3),
            **self.figures,
        }

    def render(self) -> str:
        """Plain text for ``zenpipe stats``: the age first, then one line per figure."""
        lines = [
            f"dashboard (zen_mv_dashboard) refreshed at {self.refreshed_at:%Y-%m-%d %H:%M:%S%z},"
            f" {_age(self.age_seconds)} old (zenpipe refresh-dashboard renews it)"
        ]
        lines += [f"  {key}: {value}" for key, value in self.figures.items()]
        return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def read(conn: Conn) -> Dashboard:
    """Read the dashboard row over *conn* (one index-free read of a one-row view;
    never blocked by a concurrent refresh)."""
    row = conn.cursor(row_factory=dict_row).execute(load("dashboard")["read"]).fetchone()
    if row is None:  # pragma: no cover - the view always has its one row
        raise ZenpipeError("zen_mv_dashboard is empty")
    refreshed_at = row.pop("refreshed_at")
    age = float(row.pop("age_seconds"))
    row.pop("id", None)
    return Dashboard(refreshed_at=refreshed_at, age_seconds=age, figures=dict(row))


@dataclass(frozen=True)
class RefreshReport:
    refreshed_at: datetime
    seconds: float


def refresh(dsn_or_conn: str | Conn, *, statement_timeout: float = 0.0) -> RefreshReport:
    """Recompute the dashboard concurrently; return when it was computed and how long
    the refresh took.

    Blocks for as long as the refresh runs (one pass over ``results`` and over
    ``zen_contacts``), at most *statement_timeout* seconds (0: no limit).  Readers are
    not blocked meanwhile.  Raises `RefreshBusy` when another refresh is running (one
    at a time across the fleet).  Needs EXECUTE on ``zen_refresh_dashboard_v1()`` (the
    owner, or ``zen_admin``).
    """
    if isinstance(dsn_or_conn, str):
        with connect(
            dsn_or_conn, purpose="refresh-dashboard", statement_timeout=statement_timeout
        ) as conn:
            return _refresh(conn)
    return _refresh(dsn_or_conn)


def _refresh(conn: Conn) -> RefreshReport:
    q = load("dashboard")
    started = time.monotonic()
    with conn.transaction():
        got = conn.execute(
            q["try_refresh_lock"], {"namespace": NAMESPACE_OPS, "key": OPS_DASHBOARD}
        ).fetchone()
        if not (got and got[0]):
            raise RefreshBusy("another session is refreshing the dashboard")
        row = conn.execute(q["refresh"]).fetchone()
    assert row is not None
    return RefreshReport(refreshed_at=row[0], seconds=time.monotonic() - started)
