"""The bloat governor: claimers slow down while vacuum is held back.

Every claim and every completion leaves a dead row version in ``results``.  While a
transaction pins the xmin horizon (an open transaction with an xid, or a REPEATABLE
READ snapshot, a long query, a forgotten cursor), vacuum can remove none of them, and
a fleet claiming at full speed bloats the table and its indexes for as long as it
lasts.  `Governor.advice` reads the doctor's vacuum signals (``vacuum_signals`` in
``sql/queries/doctor.sql``: the age of the oldest transaction holding the horizon, and
the dead tuples of ``results``) with one cheap query, at most every
``refresh_seconds``, and says how big the next claim may be and whether to pause:

* normal: the worker's own batch size;
* **shrink** (horizon older than ``shrink_after`` seconds, or dead tuples above
  ``dead_ratio_shrink``): ``batch_size * shrink_factor`` rows, at least ``min_batch``;
* **pause** (horizon older than ``pause_after`` seconds, or dead tuples above
  ``dead_ratio_pause``): claim nothing for ``pause_seconds``.

When the horizon moves again (the transaction ends) and vacuum catches up, the advice
goes back to normal by itself.  Every change of decision is logged (logger
``zenpipe.governor``) and counted (`Governor.level`, `Governor.changes`,
`Governor.decisions`: plain attributes a metrics exporter reads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from ._ops import connect
from .queries import load

__all__ = ["Advice", "Governor", "Signals"]

logger = logging.getLogger("zenpipe.governor")

NORMAL, SHRINK, PAUSE = "normal", "shrink", "pause"
_LEVEL = {NORMAL: 0, SHRINK: 1, PAUSE: 2}


@dataclass(frozen=True)
class Signals:
    """The vacuum signals the decision is made from."""

    horizon_age_seconds: float
    horizon_pid: int | None
    prepared_age_seconds: float
    results_dead: int
    results_live: int

    @property
    def dead_ratio(self) -> float:
        total = self.results_dead + self.results_live
        return self.results_dead / total if total else 0.0


@dataclass(frozen=True)
class Advice:
    """How to claim next: at most *batch_size* rows, after *pause_seconds* (0: now)."""

    batch_size: int
    pause_seconds: float
    decision: str
    reason: str


class Governor:
    """Reads the vacuum signals and advises claimers; thread-safe, one per process.

    *conninfo* is a DSN (one connection of its own, opened on first use) or a pool it
    borrows a connection from for each refresh.  *batch_size* is the normal claim size.
    A refresh that fails keeps the previous advice (logged): the governor never stops a
    worker because monitoring broke.
    """

    def __init__(
        self,
        conninfo: str | ConnectionPool[Any],
        *,
        batch_size: int = 100,
        shrink_after: float = 300.0,
        pause_after: float = 1800.0,
        dead_ratio_shrink: float = 0.2,
        dead_ratio_pause: float = 0.5,
        min_dead: int = 10_000,
        shrink_factor: float = 0.25,
        min_batch: int = 1,
        pause_seconds: float = 5.0,
        refresh_seconds: float = 5.0,
    ) -> None:
        if batch_size < 1 or min_batch < 1:
            raise ValueError("batch_size and min_batch must be at least 1")
        if not 0 < shrink_factor <= 1:
            raise ValueError("shrink_factor must be in (0, 1]")
        if pause_seconds <= 0:
            raise ValueError("pause_seconds must be positive")
        if pause_after < shrink_after:
            raise ValueError("pause_after must not be below shrink_after")
        self.batch_size = batch_size
        self.shrink_after = shrink_after
        self.pause_after = pause_after
        self.dead_ratio_shrink = dead_ratio_shrink
        self.dead_ratio_pause = dead_ratio_pause
        self.min_dead = min_dead
        self.shrink_factor = shrink_factor
        self.min_batch = min_batch
        self.pause_seconds = pause_seconds
        self.refresh_seconds = refresh_seconds
        self._conninfo = conninfo
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._advice = Advice(batch_size, 0.0, NORMAL, "no signal read yet")
        self._next = 0.0
        #: Metrics: the current decision as a gauge (0 normal, 1 shrink, 2 pause), the
        #: number of decision changes, and advices given per decision.
        self.level = 0
        self.changes = 0
        self.decisions: Counter[str] = Counter()
        self.signals: Signals | None = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Governor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_signals(self) -> Signals:
        """Run the signals query now (one round trip)."""
        q = load("doctor")["vacuum_signals"]
        if isinstance(self._conninfo, str):
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._conninfo, purpose="governor", statement_timeout=5.0)
            row = self._conn.execute(q).fetchone()
        else:
            with self._conninfo.connection() as conn:
                row = conn.execute(q).fetchone()
        assert row is not None
        return Signals(float(row[0]), row[1], float(row[2]), int(row[3]), int(row[4]))

    def decide(self, s: Signals) -> Advice:
        """The advice for these signals (pure)."""
        horizon = max(s.horizon_age_seconds, s.prepared_age_seconds)
        dead = s.results_dead >= self.min_dead
        why_h = f"xmin horizon held {horizon:.1f} s (pid {s.horizon_pid})"
        why_d = f"results {s.dead_ratio:.0%} dead ({s.results_dead:,} tuples)"
        if horizon >= self.pause_after or (dead and s.dead_ratio >= self.dead_ratio_pause):
            reason = why_h if horizon >= self.pause_after else why_d
            return Advice(0, self.pause_seconds, PAUSE, reason)
        if horizon >= self.shrink_after or (dead and s.dead_ratio >= self.dead_ratio_shrink):
            reason = why_h if horizon >= self.shrink_after else why_d
            size = max(self.min_batch, int(self.batch_size * self.shrink_factor))
            return Advice(min(size, self.batch_size), 0.0, SHRINK, reason)
        return Advice(self.batch_size, 0.0, NORMAL, "vacuum can keep up")

    def advice(self) -> Advice:
        """The current advice, refreshed when older than ``refresh_seconds``."""
        with self._lock:
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self.refresh_seconds
                try:
                    self.signals = self.read_signals()
                except psycopg.Error as e:
                    logger.warning("governor: could not read vacuum signals: %s", e)
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
                else:
                    new = self.decide(self.signals)
                    if new.decision != self._advice.decision:
                        self.changes += 1
                        logger.warning(
                            "governor: %s -> %s (%s): claims of at most %d rows%s",
                            self._advice.decision,
                            new.decision,
                            new.reason,
                            new.batch_size,
                            f", paused {new.pause_seconds:g} s" if new.pause_seconds else "",
                        )
                    self._advice = new
                    self.level = _LEVEL[new.decision]
            self.decisions[self._advice.decision] += 1
            return self._advice
