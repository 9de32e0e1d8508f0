"""The worker loop: claim a batch, enrich it, write the contacts and settle the rows.

A `Worker` ties the pieces together the one safe way: rows are claimed in a short
transaction, enriched with no transaction open (the lease, extended in the background
while enrichment runs, is what holds them), then the contacts are upserted and the rows
marked done in one commit (`Upserter.upsert_and_complete`).  A row whose enrichment
raised is recorded as failed (and parked after ``max_attempts``); a batch whose lease
was lost is dropped without writing anything (another worker owns it now).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, cast

import psycopg
from psycopg_pool import ConnectionPool

from .claim import Batch, Claim, Claimer
from .errors import StaleClaimError, is_transient
from .events import BatchEvent, Outcome
from .governor import Governor
from .pool import ZenPool, bare_connection, guarded_pool, one_trip
from .queries import load
from .upsert import Upserter
from .wakeup import Waker

__all__ = ["Enrich", "Worker", "WorkerStats"]

logger = logging.getLogger("zenpipe.worker")

#: Turns one claimed source row into a contact record (see `zenpipe.validate`), or None
#: when the row yields no contact.  Raising marks the row failed with the error text.
#: A plain function runs in a thread pool of ``concurrency`` threads, an ``async def``
#: function on the worker's event loop, ``concurrency`` rows at a time.
Enrich = (
    Callable[[Claim], Mapping[str, Any] | None]
    | Callable[[Claim], Awaitable[Mapping[str, Any] | None]]
)

#: An enrichment the worker was aborted before starting.
_UNSTARTED = object()

#: Worker's default `Claimer` partition_affinity: a window of 8 x batch candidates,
#: taken partition by partition (about 5 of zen_contacts' 32 leaves per 100-row batch
#: instead of 30; the merge's server time per row halves, docs/claiming.md).
PARTITION_AFFINITY = 8


@dataclass(frozen=True)
class _Failed:
    """An enrichment that raised: the error text recorded on the row."""

    error: str


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
    #: Rows given back unenriched after `Worker.abort` (no attempt spent).
    released: int = 0
    #: Idle waits ended early by a notification of new rows.
    wakeups: int = 0


@dataclass
class _Flight:
    """A claimed batch between its claim and its settle: enriched, lease kept."""

    batch: Batch
    keeper: _LeaseKeeper
    started: float
    claim_seconds: float = 0.0
    enrich_seconds: float = 0.0
    done: list[tuple[Claim, Mapping[str, Any] | None]] = field(default_factory=list)
    failures: list[tuple[Claim, str]] = field(default_factory=list)
    unstarted: list[Claim] = field(default_factory=list)


class _LeaseKeeper:
    """Extends a batch's lease every third of the lease until the batch is settled.

    It runs while the rows are enriched and while they are written (a write retried
    after a killed connection can take longer than a lease); the main thread marks
    the batch as settling first (`Claimer.extend` with ``settling=True``), so a lease
    lost from then on is not taken for a crash.
    """

    def __init__(self, claimer: Claimer, batch: Batch) -> None:
        self._claimer = claimer
        #: The rows to keep; the worker narrows it when it gives rows back.
        self.batch = batch
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="zenpipe-lease", daemon=True)

    def _run(self) -> None:
        interval = self._claimer.lease_seconds / 3
        while not self._stop.wait(interval):
            batch = self.batch
            try:
                self._claimer.extend(batch)
            except StaleClaimError:
                if self.batch is not batch:  # narrowed meanwhile: rows given back
                    continue
                # Taken over, or settled by the main thread while we waited on its rows.
                self.lost = not self._stop.is_set()
                return
            except psycopg.Error as e:  # transient trouble: the next beat retries
                logger.warning("lease extension failed: %s", e)

    def start(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """One worker of one server: claims, enriches and writes until told to stop.

    *conninfo* is a connection string (a `zenpipe.pool.guarded_pool` of three
    connections, with the fleet's timeouts, outside the fleet budget) or a pool
    (`zenpipe.ZenPool` in production, which counts in the budget) shared by the
    worker's claimer and upserter.  *enrich* runs once per claimed row, outside
    any transaction, up to *concurrency* rows of a batch at a time (threads for a plain
    function, the worker's event loop for an ``async def`` one); the lease keeper
    runs beside it.  Not thread-safe, except `abort`: run one Worker per thread or
    process.

    Its claims are partition-affine (`Claimer` *partition_affinity*, default
    `PARTITION_AFFINITY`; 0 claims in plain priority-then-age order): a batch holds
    rows of a few contacts partitions, which makes its merge cheaper.
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
        max_attempts: int | None = None,
        idle_sleep: float = 1.0,
        idle_max: float | None = None,
        concurrency: int = 1,
        pipeline: bool = True,
        on_event: Callable[[BatchEvent], None] | None = None,
        governor: Governor | None = None,
        waker: Waker | None = None,
        partition_affinity: int = PARTITION_AFFINITY,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.server_id = server_id
        self.enrich = enrich
        self.idle_sleep = idle_sleep
        self.concurrency = concurrency
        #: `run` writes batch k in a thread of its own while batch k+1 is claimed and
        #: enriched (at most one batch settles behind), so the write's round trips do
        #: not leave the enrichment idle.
        self.pipeline = pipeline
        #: Called with a `zenpipe.events.BatchEvent` for every batch once it landed.
        self.on_event = on_event
        self._settle_executor: ThreadPoolExecutor | None = None
        #: Shrinks claims or pauses them while vacuum is held back (zenpipe.governor).
        self.governor = governor
        self._paused = 0.0
        self.stats = WorkerStats()
        self._contended = False
        self._retry_in: float | None = None
        self._abort = threading.Event()
        # The batch in flight, for abort(release_in_flight=True) from another thread.
        self._flight = threading.Condition()
        self._in_flight: list[Batch] = []
        self._given_back = False
        self._claiming = False
        self._is_async = inspect.iscoroutinefunction(enrich)
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One pool for the claimer, the upserter and the bookkeeping: a DSN gets a small
        # pool of the worker's own (three connections: a claim, the settle of the batch
        # before, and a lease keeper's beat may run at once), a pool passed in is shared
        # as it is.
        self._own_pool = isinstance(conninfo, str)
        self._pool: ConnectionPool[Any] = (
            guarded_pool(
                conninfo, name=f"zenpipe-worker-{server_id}/{name}", min_size=1, max_size=3
            )
            if isinstance(conninfo, str)
            else conninfo
        )
        #: Wakes the idle loop when rows arrive (LISTEN): given, or the pool's own when
        #: it is a fleet member that listens; None: poll only.
        self.waker = waker
        if waker is None and isinstance(self._pool, ZenPool) and self._pool.fleet is not None:
            self.waker = self._pool.waker()
        self.idle_max = (
            idle_max if idle_max is not None else (30.0 if self.waker is not None else 5.0)
        )
        self.claimer = Claimer(
            self._pool,
            owner=f"{server_id}/{name}",
            batch_size=batch_size,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            partition_affinity=partition_affinity,
        )
        self.upserter = Upserter(self._pool, server_id=server_id)
        self._queries = load("worker")

    def close(self) -> None:
        """Stop the enrichment threads (or event loop) and close the connections the
        worker opened."""
        for executor in (self._executor, self._settle_executor):
            if executor is not None:
                executor.shutdown(wait=True)
        self._executor = self._settle_executor = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self.claimer.close()
        self.upserter.close()
        if self._own_pool:
            self._pool.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_once(self) -> int:
        """Process one batch; return how many rows it claimed (0: nothing claimed).

        Settles every row it claimed: written and done, failed with the error its
        enrichment raised, or (when the lease was lost) left to its new owner.  A record
        that makes the write raise is isolated: the batch is then written row by row
        and only that row fails.  Raises what the claim raises after its retries; a
        write that keeps failing on transient errors is logged and its rows are left to
        their lease (they are claimed again, not counted as a crash).
        """
        flight = self._begin()
        if flight is None:
            return 0
        self._finish(flight)
        return len(flight.batch)

    def _begin(self) -> _Flight | None:
        """Claim a batch and enrich it, its lease keeper running; None when nothing was
        claimed (or the worker was aborted)."""
        if self._abort.is_set():
            return None
        limit = None
        if self.governor is not None:  # vacuum held back: smaller claims, or none
            advice = self.governor.advice()
            self._paused = advice.pause_seconds if advice.batch_size < 1 else 0.0
            if self._paused:
                return None
            limit = min(advice.batch_size, self.claimer.batch_size)
        with self._flight:
            self._claiming = True
        claim_start = time.monotonic()
        try:
            batch = self.claimer.claim(limit)
            self._contended = batch.contended
            self._retry_in = batch.retry_in
            with self._flight:
                given_back = self._given_back
                if batch and not given_back:
                    self._in_flight.append(batch)
            if batch and given_back:  # aborted while this claim ran: nothing is kept
                n = self._release(list(batch.claims))
                with self._flight:
                    self.stats.released += n
                return None
        finally:
            with self._flight:
                self._claiming = False
                self._flight.notify_all()
        if not batch or given_back:
            return None
        self.stats.batches += 1
        self.stats.claimed += len(batch)
        started = time.monotonic()
        flight = _Flight(
            batch,
            _LeaseKeeper(self.claimer, batch).start(),
            started,
            claim_seconds=started - claim_start,
        )
        try:
            for claim, outcome in self._enrich_all(batch.claims):
                if outcome is _UNSTARTED:
                    flight.unstarted.append(claim)
                elif isinstance(outcome, _Failed):
                    flight.failures.append((claim, outcome.error))
                else:
                    flight.done.append((claim, outcome))  # type: ignore[arg-type]
        except BaseException:
            self._land(flight)
            raise
        flight.enrich_seconds = time.monotonic() - started
        return flight

    def _finish(self, flight: _Flight) -> None:
        """Settle an enriched batch (in the settling thread when pipelined), then stop
        its lease keeper."""
        try:
            self._settle_flight(flight)
        finally:
            self._land(flight)

    def _land(self, flight: _Flight) -> None:
        flight.keeper.stop()
        with self._flight:
            self._in_flight = [b for b in self._in_flight if b is not flight.batch]

    def _settle_flight(self, flight: _Flight) -> None:
        batch, keeper, stats = flight.batch, flight.keeper, self.stats
        with self._flight:
            given_back = self._given_back
        if given_back:  # abort(release_in_flight=True) gave the rows back already
            self._emit(flight, "released")
            return
        if flight.unstarted:  # aborted: never tried, so no attempt is spent
            gone = {c.id for c in flight.unstarted}
            batch = replace(batch, claims=tuple(c for c in batch.claims if c.id not in gone))
            keeper.batch = batch  # before the release: its next beat must not see them
            n = self._release(flight.unstarted)
            with self._flight:
                stats.released += n
        write_start = time.monotonic()
        try:
            if keeper.lost:
                raise StaleClaimError("extend", batch.ids)
            book = _Bookkeeping(self, flight)
            if not flight.done:  # nothing to write: the failures alone
                self.claimer.extend(batch, settling=True)
                written, rejected, failed, retries = self._settle(batch, [], flight.failures)
            else:  # mark, write, complete, fail and book in one transaction
                written, rejected, failed, retries = self._settle(
                    batch, flight.done, flight.failures, book=book
                )
        except StaleClaimError:
            stats.stale_batches += 1
            logger.warning("a %d-row batch was taken over before it was written", len(batch))
            self._emit(flight, "stale", write_seconds=time.monotonic() - write_start)
            return
        except psycopg.Error as e:
            logger.error(
                "could not write a %d-row batch (its lease will run out and the rows be "
                "claimed again): %s",
                len(batch),
                e,
            )
            self._emit(flight, "write_error", write_seconds=time.monotonic() - write_start)
            return
        stats.written += written
        stats.rejected += rejected
        stats.failed += failed
        self._emit(
            flight,
            "settled",
            written=written,
            rejected=rejected,
            failed=failed,
            retries=retries,
            write_seconds=time.monotonic() - write_start,
        )
        if not book.committed:
            self._record(**book.figures(written, rejected, failed))

    def _emit(self, flight: _Flight, outcome: Outcome, **figures: Any) -> None:
        if self.on_event is None:
            return
        event = BatchEvent(
            worker=self.claimer.owner,
            outcome=outcome,
            rows=len(flight.batch),
            claim_seconds=flight.claim_seconds,
            enrich_seconds=flight.enrich_seconds,
            **figures,
        )
        try:
            self.on_event(event)
        except Exception:
            logger.exception("on_event handler raised (ignored)")

    def abort(self, *, release_in_flight: bool = False, wait: float = 30.0) -> int:
        """Stop starting enrichments and claims (thread-safe: for a graceful shutdown
        whose grace ran out); return how many rows were given back now.

        Rows of the batch in flight whose enrichment has not started are released
        without spending an attempt when the enrichment loop reaches them; `run_once`
        claims nothing more.  With *release_in_flight*, every row of the batch in flight
        that is still held is given back at once, those being enriched included, and
        the `run_once` that holds it settles nothing when its enrichment returns; a claim
        running at that moment gives its rows back as soon as it returns, and `abort`
        waits for that at most *wait* seconds.
        """
        self._abort.set()
        if not release_in_flight:
            return 0
        with self._flight:
            self._given_back = True
            batches, self._in_flight = self._in_flight, []
        n = sum(self._release(list(b.claims)) for b in batches)
        with self._flight:
            self.stats.released += n
            # A claim running now gives its rows back when it returns: wait for that.
            self._flight.wait_for(lambda: not self._claiming, timeout=wait)
        return n

    def _settler(self) -> ThreadPoolExecutor:
        if self._settle_executor is None:
            self._settle_executor = ThreadPoolExecutor(
                1, thread_name_prefix=f"zenpipe-settle-{self.claimer.owner}"
            )
        return self._settle_executor

    def _enrich_all(self, claims: Sequence[Claim]) -> list[tuple[Claim, object]]:
        """Enrich *claims*, at most ``concurrency`` at a time; return each claim with
        its record (or None), a `_Failed`, or `_UNSTARTED` (aborted before it began)."""
        if self._is_async:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(self._enrich_async(claims))
        if self.concurrency == 1 or len(claims) == 1:
            return [(c, self._enrich_one(c)) for c in claims]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.concurrency, thread_name_prefix=f"zenpipe-enrich-{self.claimer.owner}"
            )
        futures = [self._executor.submit(self._enrich_one, c) for c in claims]
        return [(c, f.result()) for c, f in zip(claims, futures, strict=True)]

    def _enrich_one(self, claim: Claim) -> object:
        if self._abort.is_set():
            return _UNSTARTED
        try:
            return self.enrich(claim)
        except Exception as e:
            return _Failed(_error_text(e))

    async def _enrich_async(self, claims: Sequence[Claim]) -> list[tuple[Claim, object]]:
        gate = asyncio.Semaphore(self.concurrency)
        enrich = cast(Callable[[Claim], Awaitable[Mapping[str, Any] | None]], self.enrich)

        async def one(claim: Claim) -> object:
            async with gate:
                if self._abort.is_set():
                    return _UNSTARTED
                try:
                    return await enrich(claim)
                except Exception as e:
                    return _Failed(_error_text(e))

        outcomes = await asyncio.gather(*(one(c) for c in claims))
        return list(zip(claims, outcomes, strict=True))

    def _release(self, claims: list[Claim]) -> int:
        """`Claimer.release` the claims still held; return how many were given back.

        A release applies nothing when any row is no longer held (`StaleClaimError`
        names them): those are dropped and the rest released again.
        """
        left = claims
        for _ in range(3):
            if not left:
                return 0
            try:
                self.claimer.release(left)
            except StaleClaimError as e:
                gone = set(e.ids)
                left = [c for c in left if c.id not in gone]
                continue
            except psycopg.Error as e:
                logger.warning("could not release %d rows (their lease will run out): %s",
                               len(left), e)  # fmt: skip
                return 0
            return len(left)
        return 0

    def _settle(
        self,
        batch: Batch,
        done: list[tuple[Claim, Mapping[str, Any] | None]],
        failures: list[tuple[Claim, str]],
        *,
        book: _Bookkeeping | None = None,
    ) -> tuple[int, int, int, int]:
        """Record the failures, write the records and complete their rows; return
        (written, rejected, failed, write transactions retried).

        With *book*, the rows written are marked settling, and the failures and the
        bookkeeping go into the write's transaction, in the same round trips
        (`Upserter.upsert_and_complete` with ``settling`` and ``after``): one commit
        for the whole batch where there were four (the mark, each error's fail(), the
        write, the bookkeeping).  When the write cannot take its fast path (a retry),
        the failures are recorded after it in their own transactions; *book* says
        whether the bookkeeping committed with the write.  Without *book*, the failures
        are recorded first.

        `Claimer.fail` is idempotent under the claim, so a retried fail() whose first
        commit landed does not abandon the rest of the batch.
        """
        failed = len(failures)
        failures_recorded = False

        def record_failures(conn: psycopg.Connection[Any] | None = None) -> None:
            if failures:  # one statement, whatever the errors
                self.claimer.fail_each(failures, conn=conn)

        if book is None or not done:
            record_failures()
            failures_recorded = True
        if not done:
            return 0, 0, failed, 0
        records = [r for _, r in done if r is not None]
        ok = replace(batch, claims=tuple(c for c, _ in done))
        try:
            if book is None:
                report = self.upserter.upsert_and_complete(records, self.claimer, ok)
            else:

                def after(conn: psycopg.Connection[Any], written: int, rejected: int) -> None:
                    record_failures(conn)
                    book.write(conn, written, rejected, failed)

                report = self.upserter.upsert_and_complete(
                    records, self.claimer, ok, settling=True, after=after
                )
                book.committed = failures_recorded = report.after_committed
        except StaleClaimError:
            raise
        except Exception as e:  # one record broke the write: isolate it, row by row
            if is_transient(e):  # the database, not a record: retries are spent
                raise
            logger.error("a %d-row batch failed to write (%s): writing it row by row",
                         len(done), _error_text(e))  # fmt: skip
            if not failures_recorded:
                record_failures()
            return self._settle_one_by_one(batch, done, failed)
        if not failures_recorded:
            record_failures()
        return report.written, report.rejected, failed, report.retries

    def _settle_one_by_one(
        self, batch: Batch, done: list[tuple[Claim, Mapping[str, Any] | None]], failed: int
    ) -> tuple[int, int, int, int]:
        written = rejected = retries = 0
        for claim, record in done:
            one = replace(batch, claims=(claim,))
            try:
                report = self.upserter.upsert_and_complete(
                    [] if record is None else [record], self.claimer, one
                )
            except StaleClaimError:
                continue
            except Exception as e:
                if is_transient(e):
                    raise
                self.claimer.fail([claim], _error_text(e))
                failed += 1
                continue
            written += report.written
            rejected += report.rejected
            retries += report.retries
        return written, rejected, failed, retries

    def run(self, stop: threading.Event | None = None, *, until_idle: bool = False) -> WorkerStats:
        """Process batches until *stop* is set (or, with *until_idle*, until a claim finds
        nothing eligible and no failed row waits out its backoff).

        Between empty claims the worker waits *idle_sleep* seconds, doubling up to
        *idle_max* while nothing comes, and wakes at once when the waker reports new rows
        (LISTEN), when *stop* is set, or when a retry falls due.

        A claim that came back empty only because other claimers were taking every
        candidate at that moment (`zenpipe.claim.Batch.contended`) is tried again after
        a short random pause instead: that is not idleness.
        """
        idle = self.idle_sleep
        settling: Future[None] | None = None
        try:
            while stop is None or not stop.is_set():
                since = self.waker.generation() if self.waker is not None else 0
                flight = self._begin()
                if flight is not None:
                    if settling is not None:  # at most one batch settles behind
                        settling.result()
                        settling = None
                    if self.pipeline:
                        settling = self._settler().submit(self._finish, flight)
                    else:
                        self._finish(flight)
                    idle = self.idle_sleep
                    continue
                if settling is not None:  # nothing new: let the last batch land first
                    settling.result()
                    settling = None
                if self._paused:  # the governor's pause: not idleness
                    if stop is not None:
                        stop.wait(self._paused)
                    else:
                        time.sleep(self._paused)
                    continue
                if self._contended:
                    pause = random.uniform(0.005, 0.05)  # jitter, not security
                    if stop is not None:
                        stop.wait(pause)
                    else:
                        time.sleep(pause)
                    continue
                self.stats.idle_polls += 1
                retry_in = self._retry_in
                if until_idle and retry_in is None:
                    break
                pause = idle if retry_in is None else min(idle, retry_in)
                if self._idle_wait(pause, stop, since):
                    self.stats.wakeups += 1
                    idle = self.idle_sleep
                else:  # nothing came: poll less often, up to idle_max
                    idle = min(idle * 2, self.idle_max)
        finally:
            if settling is not None:
                settling.result()
        return self.stats

    def _idle_wait(self, seconds: float, stop: threading.Event | None, since: int) -> bool:
        """Wait *seconds*, or less when rows arrive (waker) or *stop* is set; True when
        woken by the waker."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                return False
            if self.waker is not None:
                if self.waker.wait(min(left, 0.5), since):
                    return True
            elif stop is not None:
                stop.wait(left)
            else:
                time.sleep(left)

    def _record(self, **figures: Any) -> None:
        # Bookkeeping only: a failure here must not undo the batch, which has committed.
        # One round trip (`one_trip`): the pool's connection check aside, BEGIN, the
        # statement and COMMIT were three.
        q = self._queries["record_batch"]
        try:
            with bare_connection(self._pool) as conn:
                one_trip(self._pool, conn, lambda c: c.execute(q, figures))
        except psycopg.Error as e:
            logger.warning("could not record batch statistics: %s", e)


class _Bookkeeping:
    """A batch's ``record_batch`` figures, written inside the batch's write transaction
    (`Upserter.upsert_and_complete` ``after=``) when the write takes its fast path, so
    the bookkeeping costs no round trip of its own; otherwise the worker records them
    after the commit, in a statement of their own."""

    def __init__(self, worker: Worker, flight: _Flight) -> None:
        self._worker = worker
        self._flight = flight
        self.committed = False

    def figures(self, written: int, rejected: int, failed: int) -> dict[str, Any]:
        flight = self._flight
        return {
            "server_id": self._worker.server_id,
            "worker": self._worker.claimer.owner,
            "claimed": len(flight.batch),
            "written": written,
            "rejected": rejected,
            "failed": failed,
            "emails": _count_emails(r for _, r in flight.done),
            "seconds": time.monotonic() - flight.started,
        }

    def write(
        self, conn: psycopg.Connection[Any], written: int, rejected: int, failed: int = 0
    ) -> None:
        conn.execute(self._worker._queries["record_batch"], self.figures(written, rejected, failed))


def _error_text(e: BaseException) -> str:
    """``Type: message`` of an exception, at most 2,000 characters; never raises (an
    exception whose ``__str__`` raises is named by its type)."""
    try:
        text = f"{type(e).__name__}: {e}"
    except Exception:
        text = f"{type(e).__name__}: <unprintable>"
    return text[:2000]


def _count_emails(records: Iterable[Mapping[str, Any] | None]) -> int:
    """Emails the records carry, for the statistics; a record that cannot be read (the
    writer rejected or failed it already) counts none."""
    n = 0
    for r in records:
        try:
            n += len(r.get("emails") or ()) if r is not None else 0
        except Exception:
            continue
    return n
