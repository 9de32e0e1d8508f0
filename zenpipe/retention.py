"""Retention: ``zenpipe prune --older-than``.

Done ``results`` rows and ``zen_rejects`` rows older than a cutoff are deleted (or
moved to ``zen_archive`` with *archive*) in batches of at most *batch* rows, each batch
its own short transaction found through an index (``results_done_idx``,
``zen_rejects_rejected_at_idx``), so no lock is held for long and no batch scans the
table.  The foreign key ``zen_contacts.source_id -> results(id) ON DELETE SET NULL``
looks up the referencing contacts through ``idx_zc_source_id`` on each partition.
Pending, claimed, retrying and parked rows are never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import psycopg

from ._ops import Conn, connect
from .config import parse_duration
from .errors import ZenpipeError, is_transient
from .locks import NAMESPACE_OPS, OPS_PRUNE
from .queries import load

__all__ = ["PruneBusy", "PruneReport", "parse_age", "prune", "prune_batch"]


class PruneBusy(ZenpipeError):
    """Another session is pruning right now."""


@dataclass(frozen=True)
class PruneReport:
    results: int
    rejects: int
    batches: int
    seconds: float
    archived: bool

    @property
    def rows_per_s(self) -> float:
        return (self.results + self.rejects) / self.seconds if self.seconds > 0 else 0.0

    def render(self) -> str:
        verb = "archived" if self.archived else "deleted"
        return (
            f"prune: {verb} {self.results:,} done results row(s) and {self.rejects:,} "
            f"zen_rejects row(s) in {self.batches} batch(es), {self.seconds:.2f} s "
            f"({self.rows_per_s:,.0f} rows/s)"
        )


def parse_age(text: str, *, name: str = "--older-than") -> timedelta:
    """An age such as ``30d``, ``12h``, ``90min``, ``3600`` (seconds)."""
    t = text.strip()
    if t.endswith("d") and t[:-1].replace(".", "", 1).isdigit():
        return timedelta(days=float(t[:-1]))
    return timedelta(seconds=parse_duration(t, name=name))


def prune_batch(
    conn: Conn, table: str, *, older_than: timedelta, limit: int, archive: bool = False
) -> int:
    """Delete (or archive) one batch of at most *limit* rows of *table* (``results`` or
    ``zen_rejects``) older than *older_than*, in the caller's transaction (or as one
    statement in autocommit); return how many went."""
    name = {"results": "prune_results", "zen_rejects": "prune_rejects"}[table]
    row = conn.execute(
        load("retention")[name],
        {"older_than": older_than.total_seconds(), "limit": limit, "archive": archive},
    ).fetchone()
    return int(row[0]) if row else 0


def prune(
    dsn: str,
    *,
    older_than: timedelta,
    batch: int = 1000,
    archive: bool = False,
    max_batches: int | None = None,
    rejects_older_than: timedelta | None = None,
) -> PruneReport:
    """Prune done results rows and zen_rejects rows older than *older_than* (rejects:
    *rejects_older_than*, default the same), *batch* rows per transaction, until none is
    left (or *max_batches* batches ran).  A batch that fails on a transient error
    (deadlock, lock timeout) is retried; raises `PruneBusy` if another prune runs."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    q = load("retention")
    started = time.monotonic()
    counts = {"results": 0, "zen_rejects": 0}
    batches = 0
    with connect(dsn, purpose="prune", statement_timeout=60.0, lock_timeout=2.0) as conn:
        ages = (
            ("results", older_than),
            ("zen_rejects", older_than if rejects_older_than is None else rejects_older_than),
        )
        for table, age in ages:
            while max_batches is None or batches < max_batches:
                n = _one_batch(conn, q, table, age=age, limit=batch, archive=archive)
                batches += 1
                counts[table] += n
                if n < batch:
                    break
    return PruneReport(
        counts["results"], counts["zen_rejects"], batches, time.monotonic() - started, archive
    )


def _one_batch(
    conn: Conn,
    q: dict[str, psycopg.sql.SQL],
    table: str,
    *,
    age: timedelta,
    limit: int,
    archive: bool,
) -> int:
    for attempt in range(6):
        try:
            with conn.transaction():
                got = conn.execute(
                    q["try_lock"], {"namespace": NAMESPACE_OPS, "key": OPS_PRUNE}
                ).fetchone()
                if not (got and got[0]):
                    raise PruneBusy("another session is pruning")
                return prune_batch(conn, table, older_than=age, limit=limit, archive=archive)
        except psycopg.Error as e:
            if not is_transient(e) or attempt == 5:
                raise
            time.sleep(0.05 * 2**attempt)  # backoff before a retry, not a wait on a condition
    return 0  # pragma: no cover
