"""Claiming ``results`` rows: batches, leases, fencing tokens.

A worker takes a batch with `Claimer.claim()`: one short transaction that picks up to
``batch_size`` eligible rows (pending, or claimed under a lease that ran out) in
priority-then-age order, skips rows other claimers are taking at the same moment with
``pg_try_advisory_xact_lock(NAMESPACE_CLAIM, key)``, and records the claim on the rows
(owner, lease deadline, attempt number, fencing token) before it commits.  Nothing is held
afterwards: no lock, no open transaction.  The lease keeps the rows away from other
claimers while the worker scrapes; `Claimer.extend()` pushes it further; when it runs out
(the worker died) the rows are claimable again.  `Claimer.complete()` and
`Claimer.fail()` only touch rows still held under the batch's token, and apply nothing
and raise `StaleClaimError` otherwise.

Everything is transaction-scoped, so it works through PgBouncer in transaction mode.
The protocol and its proofs are in ``docs/claiming.md``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID, uuid4

import orjson
import psycopg
from psycopg import pq
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .errors import StaleClaimError, is_transient
from .locks import NAMESPACE_CLAIM
from .pool import bare_connection, guarded_pool, local_timeouts, one_trip
from .queries import load

__all__ = ["Batch", "Claim", "Claimer", "claim_lock_key", "requeue", "storable_text"]

logger = logging.getLogger("zenpipe.claim")

T = TypeVar("T")
Conn = psycopg.Connection[Any]


def claim_lock_key(row_id: int) -> int:
    """The int4 second key of a row's claim lock: SQL ``zen_claim_key_v1(id)``.

    The low 32 bits of the id as a signed int4.  Two ids 2^32 apart share a key, which
    can only make a claimer skip a row: the row's status and token are the real fence.
    """
    low = row_id & 0xFFFFFFFF
    return low - 0x1_0000_0000 if low >= 0x8000_0000 else low


@dataclass(frozen=True)
class Claim:
    """One claimed row.

    *token* is the fencing token of the claim and *claim_id* its random id (the two
    together fence every settle, see docs/claiming.md); *attempt* counts the claims of
    this row so far, this one included.
    """

    id: int
    token: int
    attempt: int
    link: str | None
    data: dict[str, Any]
    claim_id: UUID


@dataclass(frozen=True)
class Batch:
    """The rows one `Claimer.claim()` returned, all held by *owner* until *lease_until*.

    An empty batch means nothing was claimed: *contended* then says whether eligible
    rows were seen but all of them were being taken by other claimers at that moment
    (claim again soon) rather than none being eligible (back off).
    """

    owner: str
    claims: tuple[Claim, ...]
    lease_until: datetime
    contended: bool = False
    #: Seconds until the next failed row's backoff is over (0 when one is due now),
    #: None when no row is waiting to be retried.
    retry_in: float | None = None

    def __len__(self) -> int:
        return len(self.claims)

    def __bool__(self) -> bool:
        return bool(self.claims)

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.claims]


class Claimer:
    """Claims batches of ``results`` rows for one worker and settles them.

    *conninfo* is a libpq connection string or a `psycopg_pool.ConnectionPool` the
    caller owns (a `zenpipe.ZenPool` in a fleet: it counts in the fleet budget).  A
    string gets `zenpipe.pool.guarded_pool` of ``pool_size`` connections, closed by
    `close()` or the ``with`` block: the same statement, lock and idle-in-transaction
    timeouts as a `ZenPool` (``ZENPIPE_*`` settings), and no prepared statements unless
    the server is known to be reached directly (``ZENPIPE_PGBOUNCER``), so no claim
    blocks forever behind a stuck transaction and PgBouncer in transaction mode works.

    *owner* names the worker (server + process + thread) in the rows it holds.  Rows are
    held for *lease_seconds* after a claim or `extend()`.  A row that failed
    *max_attempts* times is parked as failed, and so is a row whose lease ran out while
    it was claimed alone that many claims in (its worker died on it); by default
    (None) the fleet-wide ``zen_settings.max_attempts`` decides, read by each statement.
    A failed row below it is retried after the fleet's backoff (``zen_settings``).  A claim looks at
    ``scan_factor * limit`` candidate rows per window, and past up to *scan_windows*
    windows when every candidate is being taken by other claimers at the same moment;
    such rows are skipped, so a batch can come back smaller than asked when many
    claimers start together.

    With *partition_affinity* k (0: off), the window is ``k * limit`` candidates (at
    least the ``scan_factor`` one) and, within each priority, its rows are taken
    grouped by the ``zen_contacts`` partition their link is written to, the partition
    of the oldest candidate first: a batch spans a few leaves instead of nearly all
    32, and its merge costs less than half the server time (each leaf a statement
    routes into costs it that leaf's index and ON CONFLICT set-up).  The oldest
    claimable row is still in the next batch; younger rows of its partition come with
    it, ahead of older rows of other partitions (docs/claiming.md).  `Worker` turns it
    on.

    Methods without *conn* run their own short transaction and retry it (at most
    *retries* times, with backoff) on the errors `zenpipe.errors.is_transient` names.
    """

    def __init__(
        self,
        conninfo: str | ConnectionPool[Any],
        *,
        owner: str,
        batch_size: int = 100,
        lease_seconds: float = 300.0,
        max_attempts: int | None = None,
        scan_factor: int = 4,
        scan_windows: int = 4,
        retries: int = 5,
        pool_size: int = 1,
        partition_affinity: int = 0,
    ) -> None:
        if not owner:
            raise ValueError("owner must name the worker")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if scan_factor < 1 or scan_windows < 1:
            raise ValueError("scan_factor and scan_windows must be at least 1")
        if partition_affinity < 0:
            raise ValueError("partition_affinity must be 0 (off) or positive")
        self.owner = owner
        self.batch_size = batch_size
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = max_attempts
        self.scan_factor = scan_factor
        self.scan_windows = scan_windows
        self.partition_affinity = partition_affinity
        self.retries = retries
        #: Claim statements rolled back because a row locked was claimed by someone else
        #: between the statement's snapshot and its lock (see docs/claiming.md).
        self.race_rollbacks = 0
        #: Rows this claimer parked because their lease ran out ``max_attempts`` times.
        self.parked = 0
        self._next_park = 0.0
        self._queries = load("claim")
        self._own_pool = isinstance(conninfo, str)
        self._pool: ConnectionPool[Any] = (
            guarded_pool(
                conninfo, name=f"zenpipe-claim-{owner}", min_size=pool_size, max_size=pool_size
            )
            if isinstance(conninfo, str)
            else conninfo
        )

    def close(self) -> None:
        """Close the pool the claimer opened (not a pool passed in)."""
        if self._own_pool:
            self._pool.close()

    def __enter__(self) -> Claimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- claim ------------------------------------------------------------------------

    def claim(self, limit: int | None = None, *, conn: Conn | None = None) -> Batch:
        """Claim up to *limit* (default ``batch_size``) eligible rows.

        Without *conn*: one short transaction, committed before returning; retried on
        transient errors.  With *conn*: runs inside the caller's transaction (opened if
        *conn* is idle and not autocommit) and does not commit: the rows are held, and
        the advisory locks taken, until the caller commits.

        Rows whose lease ran out are claimed first, in smaller groups than *limit* (half
        after one expiry, one after two): see docs/claiming.md.  A window of candidates
        entirely locked by other claimers is looked past, up to ``scan_windows``
        windows; an empty batch says whether it came back empty for that reason
        (`Batch.contended`) or because nothing is eligible.

        A batch never comes with more advisory locks held than rows in it: when a
        concurrent commit makes a locked row ineligible, the statement is rolled back
        (releasing its locks) and run again, at most ``retries + 5`` times before an
        empty, contended batch is returned.
        """
        n = self.batch_size if limit is None else limit
        if n < 1:
            raise ValueError("limit must be at least 1")
        if conn is not None:
            _check_open(conn)
            return self._claim_in(conn, n, exact=True)
        self._park_exhausted()
        return self._retrying(lambda c: self._claim_own(c, n), bare=True)

    def _claim_own(self, conn: Conn, n: int) -> Batch:
        # Its own transaction, one round trip (`zenpipe.pool.one_trip`).
        claim_id = uuid4()
        cur = one_trip(self._pool, conn, lambda c: self._send_claim(c, n, claim_id, exact=False))
        return self._claimed(cur, claim_id)

    def _claim_in(self, conn: Conn, n: int, *, exact: bool) -> Batch:
        """One `zen_claim_v4` call (query ``claim``): windows, lock, take and race
        retries run in the server.  *exact*: the transaction stays open after the call
        (a caller's), so a raced attempt is redone until it holds no lock beyond its
        rows; otherwise a raced attempt keeps the rows it took (the commit that follows
        releases every lock)."""
        claim_id = uuid4()
        return self._claimed(self._send_claim(conn, n, claim_id, exact=exact), claim_id)

    def _send_claim(
        self, conn: Conn, n: int, claim_id: UUID, *, exact: bool
    ) -> psycopg.Cursor[Any]:
        """Execute the claim call as *claim_id* (in a pipeline: queue it) on a new
        cursor."""
        params = {
            "owner": self.owner,
            "claim_id": claim_id,
            "batch": n,
            "scan": n * max(self.scan_factor, self.partition_affinity),
            "lease": self.lease_seconds,
            "max_attempts": self.max_attempts,
            "namespace": NAMESPACE_CLAIM,
            "windows": self.scan_windows,
            "tries": self.retries + 5,
            "exact": exact,
            "affine": self.partition_affinity > 0,
        }
        # Results in binary: the seven arrays load without text parsing (about 8% of the
        # call's client CPU at 100 rows); orjson parses the rows' raw data several times
        # faster than json.
        cur = conn.cursor(binary=True)
        set_json_loads(orjson.loads, cur)
        cur.execute(self._queries["claim"], params)
        return cur

    def _claimed(self, cur: psycopg.Cursor[Any], claim_id: UUID) -> Batch:
        """The batch the claim call executed on *cur* returned."""
        row = cur.fetchone()
        assert row is not None
        ids, tokens, attempts, links, data, priorities, leases, contended, retry_in, races = row
        if races:
            self.race_rollbacks += races
            logger.debug("claim raced %d times with other claimers", races)
        if not ids:
            if contended and races:
                logger.warning("claim kept racing with other claimers; returning an empty batch")
            return self._batch([], claim_id, contended=bool(contended), retry_in=retry_in)
        rows = list(zip(ids, tokens, attempts, links, data, priorities, leases, strict=True))
        return self._batch(rows, claim_id, contended=False, retry_in=retry_in)

    def _park_exhausted(self) -> None:
        """Park rows whose lease expired while claimed alone ``max_attempts`` claims in,
        at most once per ``lease_seconds / 4`` per claimer: its own short statement
        (skipping locked rows), never inside a claim, so it holds no lock while the
        claim runs and a claim rolled back never undoes it."""
        now = time.monotonic()
        if now < self._next_park:
            return
        self._next_park = now + self.lease_seconds / 4

        q = self._queries
        params = {"max_attempts": self.max_attempts}

        def park(conn: Conn) -> list[int]:  # one round trip
            cur = one_trip(self._pool, conn, lambda c: c.execute(q["park_exhausted"], params))
            return [int(r[0]) for r in cur.fetchall()]

        parked = self._retrying(park, bare=True)
        if parked:
            self.parked += len(parked)
            logger.warning(
                "parked %d rows whose lease expired while enriched alone at max_attempts: %s",
                len(parked),
                parked[:20],
            )

    def _batch(
        self,
        rows: Sequence[tuple[Any, ...]],
        claim_id: UUID,
        *,
        contended: bool,
        retry_in: float | None,
    ) -> Batch:
        # rows: (id, token, attempts, link, data, priority, lease_until)
        ordered = sorted(rows, key=lambda r: (-r[5], r[0]))
        # positional: a third cheaper per row than keywords (id, token, attempt, link, data)
        claims = tuple(Claim(r[0], r[1], r[2], r[3], r[4], claim_id) for r in ordered)
        lease = min(r[6] for r in ordered) if ordered else datetime.now(UTC)
        return Batch(
            owner=self.owner,
            claims=claims,
            lease_until=lease,
            contended=contended and not claims,
            retry_in=retry_in,
        )

    # -- settle -----------------------------------------------------------------------

    def extend(self, batch: Batch, seconds: float | None = None, *, settling: bool = False) -> None:
        """Push the lease of every row of *batch* to *seconds* (default ``lease_seconds``)
        from now, by the server's clock.

        With *settling*, also mark the batch as being written: from then on a lease that
        runs out is a slow write (the rows are claimed again as they are), not a worker
        that died on them (an expiry, which splits the batch and can park a row).

        One statement, own short transaction, retried on transient errors.  Raises
        `StaleClaimError` and extends nothing when any row is no longer held under the
        batch's token.  Call it well before the lease runs out (every third of it, say).
        """
        if not batch.claims:
            return
        secs = self.lease_seconds if seconds is None else float(seconds)
        if secs <= 0:
            raise ValueError("seconds must be positive")
        # all or nothing in one statement: one round trip for one claim
        if settling:
            self._settle(batch.claims, "extend_settling", {"lease": secs}, None)
        else:
            self._settle(batch.claims, "extend", {"lease": secs, "settling": False}, None)

    def complete(self, batch: Batch, *, conn: Conn | None = None) -> None:
        """Mark every row of *batch* done.

        With *conn*: runs inside the caller's open transaction (opened if *conn* is idle
        and not autocommit) and does not commit, so the caller can write its results and
        mark the rows done in one commit; if that transaction rolls back, the rows stay
        claimed and become claimable again when the lease runs out.  Without *conn*: own
        short transaction, retried on transient errors (a retry after a lost commit
        acknowledgement finds the rows done under the batch's token and succeeds).

        Raises `StaleClaimError`, with nothing of this call applied, when any row is no
        longer held under the batch's token (its lease ran out and another claim took
        it, or it was requeued).  With *conn* the caller's transaction stays usable, but
        it should be rolled back: the rows belong to someone else now.
        """
        self._settle(batch.claims, "complete", {}, conn)

    def fail(
        self, batch_or_claims: Batch | Sequence[Claim], error: str, *, conn: Conn | None = None
    ) -> None:
        """Record *error* on the rows given and release them.

        A row whose attempt count reached ``max_attempts`` is parked as ``failed`` (never
        claimed again until `requeue()`); the others go back to pending.  What text cannot
        hold (NUL bytes, lone surrogates) is stored escaped (`storable_text`).  Transactions,
        retries and `StaleClaimError` as for `complete()`.  Idempotent under the claim:
        a retry after a lost commit acknowledgement (or a second call) finds the rows
        already released by this claim and succeeds, changing nothing.
        """
        claims = (
            batch_or_claims.claims if isinstance(batch_or_claims, Batch) else tuple(batch_or_claims)
        )
        self.fail_each([(c, error) for c in claims], conn=conn)

    def fail_each(self, failures: Sequence[tuple[Claim, str]], *, conn: Conn | None = None) -> None:
        """`fail()` with an error of its own for each row: one statement per claim
        (a batch's failures in one, however many distinct errors they carry)."""
        errors = {c.id: storable_text(error) for c, error in failures}
        self._settle(
            list({c.id: c for c, _ in failures}.values()),
            "fail",
            {"max_attempts": self.max_attempts},
            conn,
            per_row={"errors": errors},
        )

    def release(
        self, batch_or_claims: Batch | Sequence[Claim], *, conn: Conn | None = None
    ) -> None:
        """Give the rows back to pending without spending an attempt.

        For work that was never tried (a worker shutting down with a batch claimed but
        not enriched): the rows are claimable again at once, by anyone, and their
        attempt count is what it was before this claim.  Transactions, retries and
        `StaleClaimError` as for `complete()`; idempotent under the claim like `fail()`.
        """
        claims = (
            batch_or_claims.claims if isinstance(batch_or_claims, Batch) else tuple(batch_or_claims)
        )
        self._settle(claims, "release_rows", {}, conn)

    def _settle(
        self,
        claims: Sequence[Claim],
        operation: str,
        extra: dict[str, Any],
        conn: Conn | None,
        *,
        per_row: dict[str, dict[int, Any]] | None = None,
    ) -> None:
        # per_row: parameters with a value for each row, by id, sent as arrays in the
        # order of each statement's ids
        if not claims:
            return
        groups = [{**g, **extra} for g in _by_token(claims)]
        for param, values in (per_row or {}).items():
            for g in groups:
                g[param] = [values[i] for i in g["ids"]]
        query = self._queries[operation]

        name = "extend" if operation == "extend_settling" else operation  # for errors
        if conn is not None:
            with _stale_as(name), self._savepoint(conn):
                rows = [r for g in groups for r in conn.execute(query, g)]
                _check_all(claims, rows, name)
            return

        def own(c: Conn) -> None:
            alone = _ALL_OR_NOTHING.get(operation)
            with _stale_as(name):
                if alone is not None and len(groups) == 1:
                    # one all-or-nothing statement, its own transaction, one round trip
                    cur = one_trip(
                        self._pool, c, lambda c: c.execute(self._queries[alone], groups[0])
                    )
                    _check_all(claims, cur.fetchall(), name)
                    return
                with c.transaction():
                    if timeouts is not None:  # behind PgBouncer: the connection is bare
                        c.execute(*timeouts)
                    rows = [r for g in groups for r in c.execute(query, g)]
                    _check_all(claims, rows, name)

        timeouts = local_timeouts(self._pool)
        self._retrying(own, bare=True)

    def statements(
        self, operation: str, claims: Sequence[Claim], **extra: Any
    ) -> list[tuple[Any, dict[str, Any]]]:
        """The statements of a settle, as (query, parameters), for a caller that sends
        them itself (in a pipeline, inside the write's round trip): *operation* is
        ``"complete"`` or ``"extend_settling"`` (the lease pushed by ``lease_seconds``
        and the batch marked settling, all or nothing).  One statement per claim; the
        caller checks the rows they return with `check_rows` and rolls back on
        `StaleClaimError`."""
        if operation not in {"complete", "extend_settling"}:
            raise ValueError(f"no pipelined statement for {operation!r}")
        query = self._queries[operation]
        extra.setdefault("lease", self.lease_seconds)
        return [(query, {**g, **extra}) for g in _by_token(claims)]

    @staticmethod
    def check_rows(
        claims: Sequence[Claim], rows: Sequence[tuple[Any, ...]], operation: str
    ) -> None:
        """Raise `StaleClaimError` naming the claims whose row is missing from *rows*
        (the rows a settle statement returned, id first)."""
        _check_all(claims, rows, operation)

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _savepoint(self, conn: Conn) -> Iterator[None]:
        """Run the block in a savepoint of *conn*'s transaction; undo only it on error.

        Opens the transaction when *conn* is idle and not autocommit (psycopg's implicit
        transaction, left for the caller to commit).
        """
        _check_open(conn)
        q = self._queries
        conn.execute(q["savepoint"])
        try:
            yield
        except BaseException:
            if not conn.closed:
                try:
                    conn.execute(q["rollback_to"])
                    conn.execute(q["release"])
                except psycopg.Error:
                    pass  # the transaction is lost anyway; the caller sees the first error
            raise
        conn.execute(q["release"])

    def _retrying(self, fn: Callable[[Conn], T], *, bare: bool = False) -> T:
        """*fn* on a pooled connection, retried on transient errors.  *bare*: *fn* sets
        the timeouts itself behind PgBouncer (`zenpipe.pool.bare_connection`)."""
        for attempt in Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.retries),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        ):
            with (
                attempt,
                bare_connection(self._pool) if bare else self._pool.connection() as conn,
            ):
                return fn(conn)
        raise AssertionError("unreachable")  # pragma: no cover


def storable_text(text: str) -> str:
    """*text* as PostgreSQL text can hold it: NUL bytes as ``\\x00`` and lone surrogates
    (bytes decoded with ``surrogateescape``, say) as ``\\udcXX``; anything else as is.

    For messages: an error quoting the scraped bytes it choked on must still be
    recorded, not make its own recording fail."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _by_token(claims: Sequence[Claim]) -> list[dict[str, Any]]:
    """Parameters of one statement per claim (a batch is one claim: one token, one id).

    Ids sorted: concurrent statements touching the same rows lock them in one order.
    Grouped on the claim id's integer, which hashes in C (a `UUID` hashes in Python).
    """
    groups: defaultdict[tuple[int, int], list[Claim]] = defaultdict(list)
    for c in claims:
        groups[c.token, c.claim_id.int].append(c)
    return [
        {"token": g[0].token, "claim_id": g[0].claim_id, "ids": sorted(c.id for c in g)}
        for _, g in sorted(groups.items())
    ]


def _check_all(claims: Sequence[Claim], rows: Sequence[tuple[Any, ...]], operation: str) -> None:
    done = {int(r[0]) for r in rows}
    stale = sorted(c.id for c in claims if c.id not in done)
    if stale:
        raise StaleClaimError(operation, stale)


#: The all-or-nothing form of a settle, for one claim in its own transaction: one
#: statement that raises ZC002 (`STALE_SQLSTATE`) rather than apply part of it.
_ALL_OR_NOTHING = {
    "complete": "complete_own",
    "fail": "fail",
    "extend": "extend",
    "extend_settling": "extend_settling",
}

#: SQLSTATE of the settle functions (zen_complete_v1, zen_extend_v1, zen_fail_v1; raised by
#: zen_stale_v1 from migration 0022 on): rows no longer held (DETAIL).
STALE_SQLSTATE = "ZC002"


#: How a settle function names its operation in the ZC002 message.
_STALE_MESSAGE = re.compile(r"stale claim \((\w+)\)")


def stale_from(error: psycopg.Error, operation: str = "settle") -> StaleClaimError | None:
    """The `StaleClaimError` a settle function raised in SQL (SQLSTATE ZC002, the
    operation named in its message, else *operation*, and the ids no longer held in its
    DETAIL), or None for any other error."""
    if error.sqlstate != STALE_SQLSTATE:
        return None
    named = _STALE_MESSAGE.search(error.diag.message_primary or "")
    detail = error.diag.message_detail or ""
    return StaleClaimError(
        named.group(1) if named else operation, [int(x) for x in detail.split(",") if x]
    )


@contextmanager
def _stale_as(operation: str) -> Iterator[None]:
    """Raise a settle function's ZC002 as the `StaleClaimError` it names."""
    try:
        yield
    except psycopg.Error as e:
        stale = stale_from(e, operation)
        if stale is None:
            raise
        raise stale from None


def _check_open(conn: Conn) -> None:
    status = conn.info.transaction_status
    if status == pq.TransactionStatus.INERROR:
        raise psycopg.errors.InFailedSqlTransaction("the caller's transaction has failed")
    if status == pq.TransactionStatus.IDLE and conn.autocommit:
        raise ValueError("conn is in autocommit mode with no transaction open")


def requeue(
    conninfo: str | ConnectionPool[Any],
    ids: Sequence[int] | None = None,
    *,
    failed_only: bool = True,
) -> int:
    """Put rows back to pending with a fresh attempt budget; return how many moved.

    By default only parked (``failed``) rows move: all of them, or those of *ids*.  With
    ``failed_only=False`` every non-pending row given (all of them when *ids* is None)
    moves, done and claimed rows included; a claimed row's token is cleared, so its
    worker's `Claimer.complete()` then raises `StaleClaimError`.  One short transaction.
    """
    q = load("claim")
    if ids is not None:
        name = "requeue_failed_ids" if failed_only else "requeue_ids"
        params: dict[str, Any] = {"ids": [int(i) for i in ids]}
    else:
        name = "requeue_failed" if failed_only else "requeue_all"
        params = {}
    if isinstance(conninfo, str):
        with psycopg.connect(conninfo, prepare_threshold=None) as conn, conn.transaction():
            return conn.execute(q[name], params).rowcount
    with conninfo.connection() as conn, conn.transaction():
        return int(conn.execute(q[name], params).rowcount)
