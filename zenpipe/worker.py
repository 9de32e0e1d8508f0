"""The worker loop: claim a batch, enrich it, write the contacts and settle the rows.

A `Worker` ties the pieces together the one safe way: rows are claimed in a short
transaction, enriched with no transaction open (the lease, extended in the background
while enrichment runs, is what holds them), then the contacts are upserted and the rows
marked done in one commit (`Upserter.upsert_and_complete`).  A row whose enrichment
raised is recorded as failed (and parked after ``max_attempts``); a batch whose lease
was lost is dropped without writing anything (another worker owns it now).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from .claim import Batch, Claim, Claimer
from .errors import StaleClaimError
from .queries import load
from .upsert import Upserter

__all__ = ["Enrich", "Worker", "WorkerStats"]

logger = logging.getLogger("zenpipe.worker")

#: Turns one claimed source row into a contact record (see `zenpipe.validate`), or None
#: when the row yields no contact.  Raising marks the row failed with the error text.
Enrich = Callable[[Claim], Mapping[str, Any] | None]


@dataclass
class WorkerStats:
    """What a worker did so far."""

    batches: int = 0
    claimed: int = 0
    written: int = 0
    rejected: int = 0
    failed: int = 0
    stale_batches: int = 0
    idle_polls: int = 0


class _LeaseKeeper:
    """Extends a batch's lease every third of the lease while enrichment runs."""

    def __init__(self, claimer: Claimer, batch: Batch) -> None:
        self._claimer = claimer
        self._batch = batch
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="zenpipe-lease", daemon=True)

    def _run(self) -> None:
        interval = self._claimer.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                self._claimer.extend(self._batch)
            except StaleClaimError:
                self.lost = True
                return
            except psycopg.Error as e:  # transient trouble: the next beat retries
                logger.warning("lease extension failed: %s", e)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """One worker of one server: claims, enriches and writes until told to stop.

    *conninfo* is a connection string or a pool (`zenpipe.ZenPool` in production) shared
    by the worker's claimer and upserter.  *enrich* runs once per claimed row, outside
    any transaction.  Not thread-safe: run one Worker per thread or process.
    """

    def __init__(
        self,
        conninfo: str | ConnectionPool[Any],
        enrich: Enrich,
        *,
        server_id: str,
        name: str = "w0",
        batch_size: int = 100,
        lease_seconds: float = 300.0,
        max_attempts: int = 5,
        idle_sleep: float = 1.0,
    ) -> None:
        self.server_id = server_id
        self.enrich = enrich
        self.idle_sleep = idle_sleep
        self.stats = WorkerStats()
        # One pool for the claimer, the upserter and the bookkeeping: a DSN gets a small
        # pool of the worker's own (two connections: the lease keeper may extend while
        # the main thread settles), a pool passed in is shared as it is.
        self._own_pool = isinstance(conninfo, str)
        self._pool: ConnectionPool[Any] = (
            ConnectionPool(
                conninfo,
                min_size=1,
                max_size=2,
                kwargs={"prepare_threshold": None},
                open=True,
                name=f"zenpipe-worker-{server_id}/{name}",
            )
            if isinstance(conninfo, str)
            else conninfo
        )
        self.claimer = Claimer(
            self._pool,
            owner=f"{server_id}/{name}",
            batch_size=batch_size,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
        )
        self.upserter = Upserter(self._pool, server_id=server_id)
        self._queries = load("worker")

    def close(self) -> None:
        """Close the connections the worker opened."""
        self.claimer.close()
        self.upserter.close()
        if self._own_pool:
            self._pool.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_once(self) -> int:
        """Process one batch; return how many rows it claimed (0: nothing eligible).

        Raises what the database raises after the claimer's and upserter's retries.
        """
        batch = self.claimer.claim()
        if not batch:
            return 0
        started = time.monotonic()
        records: list[Mapping[str, Any]] = []
        ok: list[Claim] = []
        failures: dict[str, list[Claim]] = {}
        with _LeaseKeeper(self.claimer, batch) as keeper:
            for claim in batch.claims:
                try:
                    record = self.enrich(claim)
                except Exception as e:
                    failures.setdefault(f"{type(e).__name__}: {e}"[:2000], []).append(claim)
                    continue
                ok.append(claim)
                if record is not None:
                    records.append(record)
        stats = self.stats
        stats.batches += 1
        stats.claimed += len(batch)
        if keeper.lost:
            stats.stale_batches += 1
            logger.warning("lease of a %d-row batch was lost during enrichment", len(batch))
            return len(batch)
        written = rejected = emails = 0
        try:
            for error, claims in failures.items():
                self.claimer.fail(claims, error)
                stats.failed += len(claims)
            if ok:
                report = self.upserter.upsert_and_complete(
                    records, self.claimer, replace(batch, claims=tuple(ok))
                )
                written, rejected = report.written, report.rejected
                emails = sum(len(r.get("emails") or ()) for r in records)
        except StaleClaimError:
            stats.stale_batches += 1
            logger.warning("a %d-row batch was taken over before it was written", len(batch))
            return len(batch)
        stats.written += written
        stats.rejected += rejected
        self._record(
            claimed=len(batch),
            written=written,
            rejected=rejected,
            failed=sum(map(len, failures.values())),
            emails=emails,
            secs=time.monotonic() - started,
        )
        return len(batch)

    def run(self, stop: threading.Event | None = None, *, until_idle: bool = False) -> WorkerStats:
        """Process batches until *stop* is set (or, with *until_idle*, until a claim finds
        nothing to do); sleep *idle_sleep* seconds between empty claims."""
        while stop is None or not stop.is_set():
            if self.run_once():
                continue
            self.stats.idle_polls += 1
            if until_idle:
                break
            if stop is not None:
                stop.wait(self.idle_sleep)
            else:
                time.sleep(self.idle_sleep)
        return self.stats

    def _record(
        self, *, claimed: int, written: int, rejected: int, failed: int, emails: int, secs: float
    ) -> None:
        # Bookkeeping only: a failure here must not undo the batch, which has committed.
        try:
            with self._pool.connection() as conn:
                conn.execute(
                    self._queries["record_batch"],
                    {
                        "server_id": self.server_id,
                        "worker": self.claimer.owner,
                        "claimed": claimed,
                        "written": written,
                        "rejected": rejected,
                        "failed": failed,
                        "emails": emails,
                        "seconds": secs,
                    },
                )
        except psycopg.Error as e:
            logger.warning("could not record batch statistics: %s", e)
