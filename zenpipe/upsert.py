"""The writer: batches of enriched contact records merged into ``zen_contacts``.

One call to `Upserter.upsert` computes every link's partition key at once
(`zenpipe.keys.route`), sorts the batch by (partition, key, link), then, chunk by chunk
in that order, validates the records in Python (`zenpipe.validate`, in a helper thread
one chunk ahead) and merges each chunk's rounds with one ``INSERT ... SELECT ...
ON CONFLICT DO UPDATE`` over bound arrays; in a large call, chunks of links that do not
exist yet go by binary COPY instead (falling back to the merge).  Rejected records go to
``zen_rejects`` in the same transaction; the rest commits.  See
``docs/upserting.md`` for the merge rules column by column.

The merge is order-independent: arrays are unioned, each scalar keeps the value of its
newest observation (ties: the greater value), NULL never erases.  So writes may be
retried, repeated or reordered between servers and the row converges to the same value;
only ``scrape_count`` counts the writes themselves.
"""

from __future__ import annotations

import contextlib
import re
import reprlib
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import psycopg
from psycopg import postgres, pq, sql
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.types.json import Jsonb, set_json_dumps
from psycopg_pool import ConnectionPool
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from . import queries
from .claim import stale_from
from .errors import EmptyBatchError, UpsertError, is_transient
from .keys import route
from .pool import Timeouts, bare_connection, guarded_pool, local_timeouts
from .validate import (
    MAX_FUTURE_US,
    MAX_INDEXED_TEXT_BYTES,
    SCALAR_FIELDS,
    Contact,
    Problem,
    normalize_json,
    observation_us,
    validate_record,
)

if TYPE_CHECKING:
    from .claim import Batch, Claimer

__all__ = ["SCALAR_COLUMNS", "Rejection", "UpsertReport", "Upserter"]

#: Scalar columns merged by observation time, in ``zen_contacts.observed_us`` slot order.
SCALAR_COLUMNS: tuple[str, ...] = (*(name for name, _ in SCALAR_FIELDS), "last_scrape_server")

#: The type of each column that is not text: the COPY path's binary types, the JSON columns.
_BINARY_TYPES: dict[str, str] = {
    "source_id": "int8",
    "price_level": "int2",
    "latitude": "float8",
    "longitude": "float8",
    "rating": "float8",
    "reviews_count": "int4",
    "photos_count": "int4",
    "pages_crawled": "int4",
    "website_status_code": "int2",
    "is_claimed": "bool",
    "opening_hours": "jsonb",
    "emails_validated": "jsonb",
    "whatsapp_validated": "jsonb",
}
#: The COPY path's columns and binary types (`Upserter._copy_tuples` builds the rows):
#: the merge's inserted values, rating as numeric (the server rounds it to numeric(2, 1)
#: the way the merge's cast does).
_COPY_COLUMNS: tuple[str, ...] = (
    "partition_key",
    "source_link",
    *SCALAR_COLUMNS,
    "emails",
    "phones",
    "whatsapp",
    "observed_us",
    "observed_at",
    "scrape_count",
)
_COPY_PATH_TYPES = [
    "int4",
    "text",
    *("numeric" if c == "rating" else _BINARY_TYPES.get(c, "text") for c in SCALAR_COLUMNS),
    "text[]",
    "text[]",
    "text[]",
    "int8[]",
    "timestamptz",
    "int4",
]
_RATING = SCALAR_COLUMNS.index("rating")
_STATUS = SCALAR_COLUMNS.index("scrape_status")
#: jsonb columns (sent as ready binary jsonb) and what the merge inserts for NULL
#: (coalesce(value, '{}'): the slot stays NULL).
_JSON_BINARY = b"\x01"
_COPY_JSON: tuple[tuple[int, bytes | None], ...] = tuple(
    (j, None if c == "opening_hours" else _JSON_BINARY + b"{}")
    for j, c in enumerate(SCALAR_COLUMNS)
    if _BINARY_TYPES.get(c) == "jsonb"
)
#: Default Upserter copy_rows: the smallest call whose chunks go by COPY (measured:
#: docs/upserting.md, "COPY path").
COPY_ROWS = 500
#: Default Upserter chunk_rows: records per merge statement.  250 against 1,000: full
#: conflicts 16-19 % faster (the server merges a chunk while Python validates the
#: next), fresh rows the same (their chunks share one COPY); docs/upserting.md.
CHUNK_ROWS = 250
#: Longest back-off of the COPY path, in chunks, after fallbacks in a row.
_COPY_MAX_BACKOFF = 64
#: The merge computes observed_at as epoch + us * interval '1 microsecond' in float8:
#: exact below 2**53 us (about 285 years either side of 1970); beyond, the merge decides.
_EXACT_US = 2**53
# PostgreSQL's binary array format (array_recv): ndim, has-null flag, element type oid,
# then per dimension its length and lower bound; each element its length (-1: NULL)
# and bytes.
_ARRAY_HEAD = struct.Struct(">iiIii").pack
_LEN = struct.Struct(">i").pack
_INT8_ELEM = struct.Struct(">iq").pack
_NULL_ELEM = _LEN(-1)
_TEXT_OID = postgres.types["text"].oid
_INT8_OID = postgres.types["int8"].oid
_INT8_BINARY = struct.Struct(">q").pack
#: timestamptz in binary: microseconds since 2000-01-01 00:00 UTC
_PG_EPOCH_US = 946_684_800_000_000
_EMPTY_TEXT_ARRAY = struct.pack(">iiI", 0, 0, _TEXT_OID)


class _RawBinary(Dumper):
    """A value the COPY path already encoded in PostgreSQL's binary format: psycopg's
    list dumper, in Python, would cost more than the rest of the row."""

    format = pq.Format.BINARY

    def dump(self, obj: Any) -> Buffer | None:
        return obj  # type: ignore[no-any-return]


#: One pass-through dumper per type the COPY path encodes itself (used by oid, through
#: Copy.set_types, on the COPY path's own cursor only).
_RAW_DUMPERS: tuple[type[Dumper], ...] = tuple(
    type(f"_Raw{oid}", (_RawBinary,), {"oid": oid})
    for oid in (
        postgres.types["text"].array_oid,
        postgres.types["int8"].array_oid,
        postgres.types["jsonb"].oid,
        postgres.types["timestamptz"].oid,
    )
)


def _text_array(items: Sequence[str]) -> bytes:
    """*items* as a binary text[] (what the merge's ``s.emails::text[]`` stores)."""
    if not items:
        return _EMPTY_TEXT_ARRAY
    parts = [_ARRAY_HEAD(1, 0, _TEXT_OID, len(items), 1)]
    for item in items:
        b = item.encode("utf-8")
        parts.append(_LEN(len(b)))
        parts.append(b)
    return b"".join(parts)


_REJECT_TYPES = ["text", "int4", "text", "text", "text", "text", "jsonb", "jsonb", "bool"]
_JSON_COLUMNS = frozenset(c for c, t in _BINARY_TYPES.items() if t == "jsonb")

#: SQLSTATE classes that mean "this row's data", not "this connection": bisect on them.
#: 22 data exception, 23 integrity constraint violation, 54 program limit exceeded
#: (e.g. a value too large for a btree index row).
_ROW_ERROR_CLASSES = frozenset({"22", "23", "54"})
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_MAX_REPR = 100_000
#: Largest JSON payload kept in ``zen_rejects`` (encoded); larger records keep a repr.
_MAX_PAYLOAD_BYTES = 1_000_000
_INT8 = 2**63 - 1


@dataclass(frozen=True)
class Rejection:
    """One refused record: its position in the batch, its link, the field and why."""

    index: int
    link: str | None
    field: str
    reason: str
    detail: str


@dataclass
class UpsertReport:
    """What one `Upserter.upsert` call did.

    ``written``: records merged into ``zen_contacts``; ``merged_in_batch``: records whose
    link already appeared earlier in the same batch (merged in a further statement of the
    same transaction); ``rejected``: records stored in ``zen_rejects`` instead;
    ``reasons``: rejections per reason code; ``retries``: transactions retried after a
    transient error.
    """

    written: int = 0
    merged_in_batch: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    rejections: list[Rejection] = field(default_factory=list)
    retries: int = 0
    statements: int = 0
    #: True when a retry found that the previous attempt's commit had landed after all
    #: (its acknowledgement was lost); nothing was written again.
    already_committed: bool = False
    #: CPU seconds of the Python-side preparation (routing, validation, rows), most of
    #: it in the helper thread, overlapping the server's work.
    prepare_seconds: float = 0.0
    #: Seconds the writer waited for a chunk to be prepared: the Python time that did
    #: not overlap with the server.
    prepare_wait_seconds: float = 0.0
    #: Transactions the call used (1, or one per partition group with ``parallel``).
    transactions: int = 1
    #: Whether `Upserter.upsert_and_complete`'s *after* statements committed with the
    #: write (the fast path); False: they were not run.
    after_committed: bool = False


class _CopyRows(NamedTuple):
    """A chunk's first round as the COPY path sends it (`_copy_rows`)."""

    tuples: list[tuple[Any, ...]]
    max_us: int  # the newest observation: the future guard is checked at write time


class _Chunk(NamedTuple):
    rows: list[tuple[Any, ...]]  # merge rows, ascending ord
    rounds: list[list[int]]  # round -> ords in it, ascending
    rejections: list[tuple[Rejection, list[Problem]]]
    merged_in_batch: int
    cpu_seconds: float
    #: the COPY rows, built ahead by the helper thread for a chunk that may go by COPY
    copy: _CopyRows | None = None


class _Prepared:
    """A batch routed and sorted up front, validated chunk by chunk.

    ``ord`` is a record's position in the batch's (partition, key, link, index) order;
    a chunk is a run of ords (never splitting one link), so writing the chunks in turn
    takes row locks in the same global order as one big statement would.  Chunks are
    validated lazily, one ahead of the writer, in the upserter's helper thread; results
    are memoized, so a retried transaction does no Python work again.
    """

    def __init__(
        self,
        up: Upserter,
        *,
        records: list[Any],
        order: list[int],
        keys: list[int],
        parts: list[int],
        bounds: list[tuple[int, int]],
        early: list[tuple[Rejection, list[Problem]]],
        now_us: int,
        cpu_seconds: float,
        source_ids: dict[int, int],
        observed: dict[int, int],
    ) -> None:
        self.up = up
        self.records = records
        self.order = order  # ord -> index in records
        self.keys = keys  # ord -> partition_key
        self.parts = parts  # ord -> leaf partition (0..31)
        self.bounds = bounds
        self.early = early
        self.now_us = now_us
        self.route_cpu_seconds = cpu_seconds
        self.wait_seconds = 0.0
        # record index -> its source_id / explicit observation time (epoch us), read
        # before validation, for the database's checks (`Upserter._begin`)
        self.source_ids = source_ids
        self.observed = observed
        self._futures: list[Future[_Chunk] | None] = [None] * len(bounds)
        #: records routed into the chunks (the COPY path's threshold is per call)
        self.total = sum(hi - lo for lo, hi in bounds)

    def subset(self, bounds: list[tuple[int, int]], *, early: bool) -> _Prepared:
        """The same batch restricted to *bounds* (a partition group)."""
        return _Prepared(
            self.up,
            records=self.records,
            order=self.order,
            keys=self.keys,
            parts=self.parts,
            bounds=bounds,
            early=self.early if early else [],
            now_us=self.now_us,
            cpu_seconds=self.route_cpu_seconds if early else 0.0,
            source_ids=self.source_ids,
            observed=self.observed,
        )

    def indices(self) -> Iterator[int]:
        """The record indices this (possibly partial) batch writes, in ord order."""
        order = self.order
        for lo, hi in self.bounds:
            for ord_ in range(lo, hi):
                yield order[ord_]

    def _future(self, k: int) -> Future[_Chunk]:
        fut = self._futures[k]
        if fut is None:
            if len(self.bounds) == 1:  # nothing to overlap with: no thread hop
                fut = Future()
                fut.set_result(self._prepare_chunk(k))
            else:
                fut = self.up._helper().submit(self._prepare_chunk, k)
            self._futures[k] = fut
        return fut

    def chunks(self) -> Iterator[_Chunk]:
        """Every chunk in ord order, preparing the next one while the caller writes."""
        for k in range(len(self.bounds)):
            fut = self._future(k)
            if k + 1 < len(self.bounds):
                self._future(k + 1)
            if not fut.done():
                t = time.perf_counter()
                fut.result()
                self.wait_seconds += time.perf_counter() - t
            yield fut.result()

    def rejections(self) -> list[tuple[Rejection, list[Problem]]]:
        out = list(self.early)
        for chunk in self.chunks():
            out += chunk.rejections
        return out

    def merged_in_batch(self) -> int:
        return sum(chunk.merged_in_batch for chunk in self.chunks())

    def cpu_seconds(self) -> float:
        return self.route_cpu_seconds + sum(c.cpu_seconds for c in self.chunks())

    def _prepare_chunk(self, k: int) -> _Chunk:
        t = time.thread_time()
        lo, hi = self.bounds[k]
        records, order, keys = self.records, self.order, self.keys
        cap = self.up.max_array_items
        now_us = self.now_us
        server = self.up.server_id
        rows: list[tuple[Any, ...]] = []
        rounds: list[list[int]] = []
        rejections: list[tuple[Rejection, list[Problem]]] = []
        prev_link: str | None = None
        rnd = 0
        merged = 0
        for ord_ in range(lo, hi):
            i = order[ord_]
            rec = records[i]
            try:
                got = validate_record(rec, max_array_items=cap, now_us=now_us)
            except Exception as e:  # pragma: no cover - validate_record never raises
                got = [Problem("", "invalid_value", f"validation raised {_type_name(e)}")]
            if not isinstance(got, Contact):
                rejections.append(_rejection(i, rec, got))
                continue
            link = got.source_link
            if link == prev_link:
                rnd += 1
                merged += 1
            else:
                rnd = 0
                prev_link = link
            if rnd == len(rounds):
                rounds.append([])
            rounds[rnd].append(ord_)
            # no observed_at: NULL, the merge takes the database clock
            observed = None if got.observed_default else got.observed_us
            rows.append(
                (ord_, rnd, keys[ord_], link, observed, *got.scalars, server,
                 got.emails, got.phones, got.whatsapp)
            )  # fmt: skip
        copy = None
        if rounds and self.up._copy_ahead(self):
            copy = _copy_rows(rows)
        return _Chunk(rows, rounds, rejections, merged, time.thread_time() - t, copy)


class _Written(NamedTuple):
    written: int
    statements: int
    rejections: list[tuple[Rejection, list[Problem]]]
    #: the call's idempotency key was already there: an earlier attempt committed
    already_committed: bool = False


class Upserter:
    """Merges contact records into ``zen_contacts``; one instance per worker process.

    *conninfo* is a libpq connection string (the upserter opens a small
    `zenpipe.pool.guarded_pool` of its own: the fleet's statement, lock and
    idle-in-transaction timeouts, no prepared statements behind PgBouncer) or a
    `psycopg_pool.ConnectionPool` owned by the caller.  *server_id* is stored as
    ``last_scrape_server`` and in ``zen_rejects``.  Records with more than
    *max_array_items* distinct emails (phones, WhatsApp numbers) are rejected.  A batch
    is retried at most *max_retries* times after transient errors, with exponential
    backoff and jitter up to *max_wait* seconds between attempts.

    A batch is written in chunks of about *chunk_rows* records (a link is never split):
    one helper thread validates chunk k+1 while the connection sends and merges chunk k,
    in the same transaction.  With *parallel* > 1, plain `upsert` calls split the
    partitions into that many groups written concurrently over pooled connections (the
    upserter's own pool gets at least *parallel* connections; a caller's pool must have
    them); `upsert_and_complete` and ``conn=`` calls always use one transaction.

    Fresh rows go faster by COPY: in a call of at least *copy_rows* records, the first
    round of a chunk whose records all have an explicit ``observed_at`` the future guard
    accepts is sent by binary COPY inside a savepoint, as the merge would insert it, and
    so are those of the chunks after it, in the same COPY while the helper thread
    validates each next one (the server stores one chunk while Python prepares the
    next).  When a link exists already (or another writer inserts it meanwhile: the
    COPY waits for that transaction), a ``source_id`` is unknown or any row is refused,
    the COPY is rolled back to the savepoint and its chunks merged as usual, and the
    next candidate chunks skip COPY (1, 2, 4 ... up to 64 after fallbacks in a row;
    reset by a COPY that succeeds).  ``copy_rows=None`` turns the path off; it is off on
    a Citus coordinator.

    Not thread-safe: use one instance per thread (they may share a pool).
    """

    def __init__(
        self,
        conninfo: str | ConnectionPool[Any],
        *,
        server_id: str,
        max_array_items: int = 1000,
        max_retries: int = 5,
        max_wait: float = 2.0,
        pool_size: int = 1,
        parallel: int = 1,
        chunk_rows: int = CHUNK_ROWS,
        copy_rows: int | None = COPY_ROWS,
    ) -> None:
        if not server_id or "\x00" in server_id:
            raise ValueError("server_id must be a non-empty string without NUL")
        if len(server_id.encode("utf-8")) > MAX_INDEXED_TEXT_BYTES:  # idx_zc_server
            raise ValueError(f"server_id must be at most {MAX_INDEXED_TEXT_BYTES} UTF-8 bytes")
        self.server_id = server_id
        self.max_array_items = max_array_items
        self.max_retries = max_retries
        self.max_wait = max_wait
        if parallel < 1 or chunk_rows < 1:
            raise ValueError("parallel and chunk_rows must be at least 1")
        self.parallel = parallel
        self.chunk_rows = chunk_rows
        if copy_rows is not None and copy_rows < 1:
            raise ValueError("copy_rows must be at least 1 (None: no COPY path)")
        self.copy_rows = copy_rows
        #: COPY path: first rounds sent by COPY, and those rolled back and merged instead.
        self.copy_attempts = 0
        self.copy_fallbacks = 0
        self._copy_skip = 0  # candidate chunks left to merge without trying COPY
        self._copy_backoff = 1  # the next skip after a fallback; doubles, reset on success
        self._copy_lock = threading.Lock()  # parallel groups share these counters
        self._on_citus = False
        self._queries = queries.load("upsert")
        self._copy_sql = self._queries["copy_rows"].format(
            columns=sql.SQL(", ").join(sql.Identifier(c) for c in _COPY_COLUMNS)
        )
        self._prep_executor: ThreadPoolExecutor | None = None
        self._group_executor: ThreadPoolExecutor | None = None
        if isinstance(conninfo, str):
            self._pool: ConnectionPool[Any] = guarded_pool(
                conninfo,
                name=f"zenpipe-upsert-{server_id}",
                min_size=1,
                max_size=max(pool_size, parallel),
            )
            self._own_pool = True
        else:
            self._pool = conninfo
            self._own_pool = False

    def close(self) -> None:
        """Stop the helper threads; close the pool if the upserter opened it (waits for
        connections in use)."""
        for executor in (self._prep_executor, self._group_executor):
            if executor is not None:
                executor.shutdown(wait=True)
        self._prep_executor = self._group_executor = None
        if self._own_pool:
            self._pool.close()

    def _helper(self) -> ThreadPoolExecutor:
        """The thread that validates the next chunk while the writer sends this one."""
        if self._prep_executor is None:
            self._prep_executor = ThreadPoolExecutor(1, thread_name_prefix="zenpipe-prepare")
        return self._prep_executor

    def __enter__(self) -> Upserter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upsert(
        self, records: Iterable[Mapping[str, Any]], *, conn: psycopg.Connection[Any] | None = None
    ) -> UpsertReport:
        """Validate and merge *records*; return what was written and what was rejected.

        Without *conn*: one transaction on a pooled connection, committed before
        returning, retried as a whole (up to ``max_retries`` times, backoff with jitter)
        on transient errors; blocks while rows it must update are locked by another
        writer.  The transaction carries a random idempotency key (``zen_upsert_keys``):
        a retry after a lost COMMIT acknowledgement finds it, waiting for the earlier
        attempt's outcome if need be, and writes nothing again (the report says
        ``already_committed``).  With *conn*: runs inside the caller's open transaction,
        which it neither commits nor retries; *conn* must not be in autocommit mode.

        With ``parallel=N`` (constructor) and no *conn*, the partitions are split into N
        contiguous groups written concurrently, each in its own transaction on its own
        pooled connection, each retried on its own; the final table is the same as with
        one transaction, but a call that raises may have committed some groups (sending
        the batch again is safe: only ``scrape_count`` counts it twice for those rows,
        since a new call has new keys).

        Bad records never raise: they are stored in ``zen_rejects`` and listed in the
        report.  Raises the last `psycopg.Error` when retries are exhausted or the error
        is not transient (the transaction is then rolled back: nothing was written), and
        `UpsertError` for a misused connection.
        """
        prepared = self._prepare(records)
        if conn is not None:
            if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                raise UpsertError(
                    "upsert(conn=...) needs a connection in a transaction (autocommit is on "
                    "and no transaction is open): each statement would commit on its own"
                )
            return self._report(prepared, self._write(conn, prepared), retries=0)
        groups = self._groups(prepared)
        if len(groups) == 1:
            return self._run(prepared, None, None)
        if self._group_executor is None:
            self._group_executor = ThreadPoolExecutor(
                self.parallel, thread_name_prefix="zenpipe-group"
            )
        futures = [self._group_executor.submit(self._run, g, None, None) for g in groups]
        reports = []
        for fut in futures:  # wait for every group before raising: no thread left behind
            try:
                reports.append(fut.result())
            except BaseException:
                for other in futures:
                    other.exception()
                raise
        return _combine(reports)

    def upsert_and_complete(
        self,
        records: Iterable[Mapping[str, Any]],
        claimer: Claimer,
        batch: Batch,
        *,
        settling: bool = False,
        after: Callable[[psycopg.Connection[Any], int, int], None] | None = None,
    ) -> UpsertReport:
        """Merge *records* and mark *batch*'s claims done, in one transaction.

        Either both effects commit or neither does, so a worker killed at any point
        leaves its claims to expire and be claimed again, and a record is never written
        for a claim that is not marked done.  Retried as a whole on transient errors like
        `upsert`; a retry first locks the batch's ``results`` rows (waiting out an
        earlier attempt whose commit is still in doubt) and writes nothing when they
        are done under the batch's tokens (``already_committed``).  Raises
        `zenpipe.claim.StaleClaimError` (nothing written) when the claims were taken
        over after their lease ran out, and `EmptyBatchError` (a `ValueError`), before
        anything is written, for a batch with no claims: such a write has nothing to
        fence it (use `upsert` for records that belong to no claim).

        With *settling*, the batch is first marked as being written
        (`Claimer.extend` ``settling=True``, all or nothing, committed on its own before
        the write).  *after* (``after(conn, written, rejected)``) runs more statements
        in the write's transaction just before its commit (the worker's bookkeeping);
        ``report.after_committed`` says whether they committed with the write (only on
        the fast path: a first attempt on an idle direct connection, including when a
        retry finds that attempt's commit landed; otherwise they are not run, and the
        caller runs its bookkeeping itself).  On that path the whole
        call is two round trips (docs/upserting.md).
        """
        if not batch.claims:
            raise EmptyBatchError(
                "upsert_and_complete() refused: the batch has no claims, so the write "
                "would not be fenced; use upsert() for records without claims"
            )
        prepared = self._prepare(records)
        return self._run(prepared, claimer, batch, settling=settling, after=after)

    def prune_keys(self, *, older_than: timedelta = timedelta(days=1), limit: int = 10_000) -> int:
        """Delete at most *limit* idempotency keys committed more than *older_than* ago;
        return how many were deleted.

        A key only matters while a retry of its call can still come (seconds to minutes):
        call this now and then (e.g. from a maintenance loop) until it returns less than
        *limit*.  One short statement, in its own transaction; rows another session is
        deleting are skipped.
        """
        with self._pool.connection() as conn, conn.transaction():
            cur = conn.execute(
                self._queries["prune_upsert_keys"], {"older_than": older_than, "limit": limit}
            )
            return int(cur.rowcount)

    # -- internals --------------------------------------------------------------------

    def _run(
        self,
        prepared: _Prepared,
        claimer: Claimer | None,
        batch: Batch | None,
        *,
        settling: bool = False,
        after: Callable[[psycopg.Connection[Any], int, int], None] | None = None,
    ) -> UpsertReport:
        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_random_exponential(multiplier=0.05, max=self.max_wait),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )
        attempts = 0
        # A plain upsert's idempotency key: the same in every attempt of this call.
        key = uuid.uuid4() if batch is None else None
        # Whether *after* ran in the fast attempt's transaction: if a retry then finds
        # the batch done, that transaction committed, and *after*'s statements with it.
        after_ran = False
        hooked = None
        if after is not None:
            run_after = after

            def hooked(conn: psycopg.Connection[Any], written: int, rejected: int) -> None:
                nonlocal after_ran
                run_after(conn, written, rejected)
                after_ran = True

        # Behind PgBouncer the first attempt's transactions carry their own timeouts (in
        # the fast path's pipelines): the pool then opens no transaction for them.
        timeouts = local_timeouts(self._pool)
        for attempt in retrying:
            with attempt:
                attempts += 1
                with (
                    bare_connection(self._pool) if attempts == 1 else self._pool.connection()
                ) as conn:
                    if attempts == 1 and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                        try:
                            fast = self._write_fast(
                                conn, prepared, key=key, claimer=claimer, batch=batch,
                                settling=settling, after=hooked, timeouts=timeouts,
                            )  # fmt: skip
                        except psycopg.Error as e:
                            # In pipeline mode the settle functions' ZC002 may surface at
                            # any later statement of the pipeline, not only at its sync;
                            # its message names the operation.
                            stale = stale_from(e)
                            if stale is None:
                                raise
                            raise stale from None
                        if fast is not None:
                            report = self._report(prepared, fast, retries=0)
                            report.already_committed = fast.already_committed
                            report.after_committed = (
                                after is not None and not fast.already_committed
                            )
                            return report
                        settling = False  # the fast path committed the mark already
                        if timeouts is not None:
                            conn.execute(*timeouts)  # the careful write's transaction
                    if settling and claimer is not None and batch is not None:
                        claimer.extend(batch, settling=True)
                        settling = False
                    with conn.transaction():
                        if attempts > 1 and batch is not None and self._batch_done(conn, batch):
                            report = self._report(
                                prepared, _Written(0, 1, []), retries=attempts - 1
                            )
                            report.already_committed = True
                            report.after_committed = after_ran
                            return report
                        written = self._write(conn, prepared, key=key)
                        if written.already_committed:
                            report = self._report(prepared, written, retries=attempts - 1)
                            report.already_committed = True
                            return report
                        if claimer is not None and batch is not None:
                            claimer.complete(batch, conn=conn)
        return self._report(prepared, written, retries=attempts - 1)

    def _batch_done(self, conn: psycopg.Connection[Any], batch: Batch) -> bool:
        """Whether every claim of *batch* is already done under its claim (token and
        claim_id).

        Locks the batch's rows first: blocks while another transaction (an earlier
        attempt whose commit is in doubt) holds them, then reads their outcome."""
        claims = batch.claims
        if not claims:
            return False
        params = {
            "ids": [c.id for c in claims],
            "tokens": [c.token for c in claims],
            "claim_ids": [c.claim_id for c in claims],
        }
        row = conn.execute(self._queries["batch_done"], params).fetchone()
        return row is not None and int(row[0]) == len(claims)

    def _report(self, prepared: _Prepared, written: _Written, *, retries: int) -> UpsertReport:
        report = UpsertReport(
            written=written.written,
            merged_in_batch=prepared.merged_in_batch(),
            retries=retries,
            statements=written.statements,
            prepare_seconds=prepared.cpu_seconds(),
            prepare_wait_seconds=prepared.wait_seconds,
        )
        for rejection, _ in prepared.rejections() + written.rejections:
            report.rejections.append(rejection)
            report.reasons[rejection.reason] += 1
        report.rejections.sort(key=lambda r: r.index)
        report.rejected = len(report.rejections)
        return report

    def _groups(self, prepared: _Prepared) -> list[_Prepared]:
        """*prepared* split into at most ``parallel`` groups of whole partitions."""
        n = self.parallel
        if n == 1:
            return [prepared]
        per: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for lo, hi in prepared.bounds:
            # a chunk may straddle two partitions: cut it where the group changes
            start = lo
            for ord_ in range(lo + 1, hi + 1):
                if ord_ == hi or prepared.parts[ord_] * n // 32 != prepared.parts[start] * n // 32:
                    per[prepared.parts[start] * n // 32].append((start, ord_))
                    start = ord_
        groups = [prepared.subset(b, early=False) for b in per if b]
        if not groups:  # every record was rejected before routing
            return [prepared]
        groups[0].early = prepared.early
        groups[0].route_cpu_seconds = prepared.route_cpu_seconds
        return groups

    def _prepare(self, records: Iterable[Mapping[str, Any]]) -> _Prepared:
        """Route and sort the batch and cut it into chunks; validation follows lazily,
        chunk by chunk (`_Prepared.chunks`).  Done once per call, not per attempt."""
        t = time.thread_time()
        recs = list(records)
        now_us = time.time_ns() // 1000
        links: list[str] = []
        idx: list[int] = []
        unroutable: list[int] = []
        source_ids: dict[int, int] = {}
        observed: dict[int, int] = {}
        for i, rec in enumerate(recs):
            try:
                if not isinstance(rec, Mapping):
                    unroutable.append(i)
                    continue
                link = rec.get("source_link")
                # what the database checks for the whole batch in one statement
                sid = rec.get("source_id")
                obs = rec.get("observed_at")
            except Exception:  # a record that cannot even be read: validation says why
                unroutable.append(i)
                continue
            if type(link) is str and link and "\x00" not in link:
                links.append(link)
                idx.append(i)
            else:
                unroutable.append(i)
                continue
            if type(sid) is int and 1 <= sid <= _INT8:
                source_ids[i] = sid
            if obs is not None:
                us = observation_us(obs)
                if us is not None:
                    observed[i] = us
        try:
            keys, parts = route(links)
        except UnicodeEncodeError:  # lone surrogates: set those links aside, rarely taken
            bad = {j for j, link in enumerate(links) if not _encodes(link)}
            unroutable += [idx[j] for j in bad]
            links = [link for j, link in enumerate(links) if j not in bad]
            idx = [i for j, i in enumerate(idx) if j not in bad]
            keys, parts = route(links)
        sort = sorted(range(len(links)), key=lambda j: (parts[j], keys[j], links[j], idx[j]))
        order = [idx[j] for j in sort]
        okeys = [keys[j] for j in sort]
        oparts = [parts[j] for j in sort]
        olinks = [links[j] for j in sort]
        bounds: list[tuple[int, int]] = []
        lo, n, size = 0, len(sort), self.chunk_rows
        while lo < n:
            hi = min(lo + size, n)
            while hi < n and olinks[hi] == olinks[hi - 1]:  # one link, one chunk
                hi += 1
            bounds.append((lo, hi))
            lo = hi
        early = []
        for i in sorted(unroutable):  # records without a usable link: always rejected
            got = validate_record(recs[i], max_array_items=self.max_array_items, now_us=now_us)
            if isinstance(got, Contact):  # a mapping whose get() failed but items() did not
                got = [Problem("source_link", "invalid_value", "the record's link cannot be read")]
            early.append(_rejection(i, recs[i], got))
        cpu = time.thread_time() - t
        return _Prepared(
            self,
            records=recs,
            order=order,
            keys=okeys,
            parts=oparts,
            bounds=bounds,
            early=early,
            now_us=now_us,
            cpu_seconds=cpu,
            source_ids=source_ids,
            observed=observed,
        )

    def _begin(
        self, cur: psycopg.Cursor[Any], prepared: _Prepared, key: uuid.UUID | None
    ) -> tuple[int, bool, dict[int, list[Problem]]]:
        """The write's first statement (`begin_write`): take the idempotency *key*, and
        find the records the database refuses whatever the merge order (unknown
        ``source_id``, observation time too far ahead of the database clock).

        Returns (statements run: 0 or 1, whether the key was new, record index ->
        problems).  Skipped (no round trip) when there is no key and nothing to check."""
        sids: dict[int, list[int]] = {}
        obs_index: list[int] = []
        obs_us: list[int] = []
        source_ids, observed = prepared.source_ids, prepared.observed
        if source_ids or observed:
            for i in prepared.indices():
                sid = source_ids.get(i)
                if sid is not None:
                    sids.setdefault(sid, []).append(i)
                us = observed.get(i)
                if us is not None:
                    obs_index.append(i)
                    obs_us.append(us)
        if key is None and not sids and not obs_index:
            return 0, True, {}
        params = {
            "key": key,
            "source_ids": sorted(sids),
            "obs_index": obs_index,
            "obs_us": obs_us,
            "max_future": MAX_FUTURE_US,
        }
        row = cur.execute(self._queries["begin_write"], params).fetchone()
        assert row is not None
        key_inserted, unknown, in_future = row
        bad: dict[int, list[Problem]] = {}
        for sid in unknown:
            for i in sids[sid]:
                bad.setdefault(i, []).append(
                    Problem("source_id", "unknown_source_id", f"results has no row with id {sid}")
                )
        for i in in_future:
            bad.setdefault(i, []).append(
                Problem(
                    "observed_at",
                    "in_future",
                    "observed_at is more than an hour ahead of the database clock",
                )
            )
        return 1, key is None or key_inserted == 1, bad

    def _write(
        self,
        conn: psycopg.Connection[Any],
        prepared: _Prepared,
        *,
        key: uuid.UUID | None = None,
        after: Callable[[psycopg.Connection[Any], int, int], None] | None = None,
    ) -> _Written:
        """Merge round by round inside *conn*'s open transaction, each merge in
        a savepoint so that a data error bisects its rows out; store rejects; no commit.
        The careful path: a caller's transaction (``conn=``), a retry, or a fast write
        that met a row PostgreSQL refuses.  With *key*, writes nothing when an earlier
        attempt holding that key committed (``already_committed``)."""
        q = self._queries
        db_rejects: list[tuple[Rejection, list[Problem]]] = []
        written = 0
        statements = 0
        with conn.cursor() as cur:
            set_json_dumps(orjson.dumps, context=cur)
            if key is not None:
                statements += 1
                if not self._take_key(cur, key):
                    return _Written(0, statements, [], already_committed=True)
            left_out: list[tuple[int, Any]] = []
            clock: int | None = None
            copy_cur: psycopg.Cursor[Any] | None = None
            copy_on = self._copy_possible(prepared)
            chunks = prepared.chunks()
            nxt = next(chunks, None)
            while nxt is not None:
                chunk, nxt = nxt, None
                group = [(chunk, 0)]  # the chunks to merge, each from its round
                if copy_on and self._copy_candidate(chunk):
                    if clock is None:
                        clock = self._clock_from(cur.execute(q["copy_clock"]).fetchone())
                        statements += 1
                    tuples = None if clock is None else self._copy_tuples(chunk, clock)
                    if tuples is not None:
                        assert clock is not None
                        if copy_cur is None:
                            copy_cur = self._copy_cursor(conn)
                        statements += 1
                        cur.execute(q["savepoint"])
                        ok, run, nxt = self._copy_run(copy_cur, chunk, tuples, chunks, clock)
                        if ok:
                            written += sum(n for _, n in run)
                        else:
                            cur.execute(q["rollback_to"])
                        cur.execute(q["release"])
                        group = [(c, int(ok)) for c, _ in run]
                for c, start in group:
                    for rows in _chunk_rounds(c, start):
                        w, s, failed, missing = self._merge(cur, rows)
                        written += w
                        statements += s
                        left_out += missing
                        for ord_, err in failed:
                            i = prepared.order[ord_]
                            db_rejects.append(_db_rejection(i, prepared.records[i], err))
                if nxt is None:
                    nxt = next(chunks, None)
            if copy_cur is not None:
                copy_cur.close()
            if left_out:
                statements += 1
                db_rejects += self._left_out_rejections(cur, prepared, left_out)
            rejects = prepared.rejections() + db_rejects
            if rejects:
                cur.execute(q["insert_rejects"], self._rejects_params(prepared, rejects))
                statements += 1
            if after is not None:
                after(conn, written, len(rejects))
        return _Written(written, statements, db_rejects)

    def _write_fast(
        self,
        conn: psycopg.Connection[Any],
        prepared: _Prepared,
        *,
        key: uuid.UUID | None,
        claimer: Claimer | None,
        batch: Batch | None,
        settling: bool,
        after: Callable[[psycopg.Connection[Any], int, int], None] | None,
        timeouts: Timeouts | None = None,
    ) -> _Written | None:
        """The whole write in two round trips on an idle connection, in psycopg's
        pipeline mode with the transactions spelled out: (1) the settling mark in its own
        committed transaction, then BEGIN, every round's merge, the known rejects and
        the completion; (2) the rejects the merge left out, the bookkeeping (*after*)
        and COMMIT.  *timeouts* (behind PgBouncer: `zenpipe.pool.local_timeouts`) opens
        each transaction, in the same round trip.  No savepoint: a row PostgreSQL
        refuses rolls the transaction back and None is returned (the caller then writes
        carefully, bisecting).  Raises `StaleClaimError` (rolled back, nothing written)
        when the batch is no longer held.
        """
        q = self._queries
        tx = queries.load("pool")  # BEGIN, COMMIT, ROLLBACK
        statements = 0
        conn.autocommit = True
        try:
            cur = conn.cursor()
            set_json_dumps(orjson.dumps, context=cur)
            with contextlib.ExitStack() as stack:
                pipe = stack.enter_context(conn.pipeline())
                held: list[tuple[psycopg.Cursor[Any], None]] = []
                if settling and claimer is not None and batch is not None:
                    cur.execute(tx["begin"])
                    if timeouts is not None:
                        cur.execute(*timeouts)
                    for query, params in claimer.statements("extend_settling", batch.claims):
                        held.append((conn.cursor(), None))
                        held[-1][0].execute(query, params)
                    cur.execute(tx["commit"])
                    statements += len(held)
                cur.execute(tx["begin"])
                if timeouts is not None:
                    cur.execute(*timeouts)
                if key is not None:
                    statements += 1
                    if not self._take_key(cur, key):
                        cur.execute(tx["rollback"])
                        return _Written(0, statements, [], already_committed=True)
                # COPY path: the clock rides along in this round trip
                clock_cur: psycopg.Cursor[Any] | None = None
                if self._copy_possible(prepared):
                    clock_cur = conn.cursor()
                    clock_cur.execute(q["copy_clock"])
                    statements += 1
                clock: int | None = None
                copied = 0
                merges: list[tuple[list[tuple[Any, ...]], psycopg.Cursor[Any]]] = []
                chunks = prepared.chunks()
                nxt = next(chunks, None)
                while nxt is not None:
                    chunk, nxt = nxt, None
                    group = [(chunk, 0)]  # the chunks to merge, each from its round
                    if clock_cur is not None and self._copy_candidate(chunk):
                        # COPY cannot run in a pipeline: send what is queued (and the
                        # savepoint) and leave pipeline mode for it
                        cur.execute(q["savepoint"])
                        try:
                            pipe.sync()
                        except psycopg.Error as e:
                            self._pipeline_error(e)
                            return None
                        stack.close()
                        if clock is None:
                            clock = self._clock_from(clock_cur.fetchone())
                        tuples = None if clock is None else self._copy_tuples(chunk, clock)
                        if tuples is not None:
                            assert clock is not None
                            ok, run, nxt = self._copy_run(
                                self._copy_cursor(conn), chunk, tuples, chunks, clock
                            )
                            group = [(c, int(ok)) for c, _ in run]
                        pipe = stack.enter_context(conn.pipeline())
                        if tuples is not None:
                            statements += 1
                            if ok:
                                copied += sum(n for _, n in run)
                            else:
                                cur.execute(q["rollback_to"])
                        cur.execute(q["release"])
                    for c, start in group:
                        for rows in _chunk_rounds(c, start):
                            mc = conn.cursor()
                            set_json_dumps(orjson.dumps, context=mc)
                            mc.execute(q["merge_rows"], self._round_params(rows))
                            merges.append((rows, mc))
                    if nxt is None:
                        nxt = next(chunks, None)
                statements += len(merges)
                known = prepared.rejections()
                if known:
                    cur.execute(q["insert_rejects"], self._rejects_params(prepared, known))
                    statements += 1
                done: list[psycopg.Cursor[Any]] = []
                if claimer is not None and batch is not None:
                    for query, params in claimer.statements("complete", batch.claims):
                        done.append(conn.cursor())
                        done[-1].execute(query, params)
                    statements += len(done)
                try:
                    pipe.sync()
                except psycopg.Error as e:
                    self._pipeline_error(e)
                    return None  # a row the database refuses: write carefully
                if claimer is not None and batch is not None:
                    rows_held = [r for c, _ in held for r in c.fetchall()]
                    if held:
                        claimer.check_rows(batch.claims, rows_held, "extend")
                    claimer.check_rows(
                        batch.claims, [r for c in done for r in c.fetchall()], "complete"
                    )
                written = copied
                left_out: list[tuple[int, Any]] = []
                for rows, mc in merges:
                    got = {r[0] for r in mc.fetchall()}
                    written += len(got)
                    if len(got) < len(rows):
                        left_out += [(row[0], row) for row in rows if row[3] not in got]
                db_rejects: list[tuple[Rejection, list[Problem]]] = []
                if left_out:
                    db_rejects = self._left_out_rejections(cur, prepared, left_out)
                    cur.execute(q["insert_rejects"], self._rejects_params(prepared, db_rejects))
                    statements += 2
                if after is not None:
                    after(conn, written, len(known) + len(db_rejects))
                cur.execute(tx["commit"])
            return _Written(written, statements, db_rejects)
        finally:
            if not conn.closed:
                if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):  # lost: the pool discards it
                        conn.execute(tx["rollback"])
                if conn.info.transaction_status == pq.TransactionStatus.IDLE:
                    conn.autocommit = False

    @staticmethod
    def _pipeline_error(e: psycopg.Error) -> None:
        """A failed sync of the fast write: return when a row the database refuses
        caused it (the caller then writes carefully); else raise `StaleClaimError` (the
        batch is no longer held) or *e*."""
        if (e.sqlstate or "")[:2] in _ROW_ERROR_CLASSES:
            return
        stale = stale_from(e, "extend")
        if stale is None:
            raise e
        raise stale from None

    def _take_key(self, cur: psycopg.Cursor[Any], key: uuid.UUID) -> bool:
        """Insert the call's idempotency *key* (`begin_write`); False when an earlier
        attempt holding it committed (waits while that attempt is in doubt)."""
        params = {
            "key": key,
            "source_ids": [],
            "obs_index": [],
            "obs_us": [],
            "max_future": MAX_FUTURE_US,
        }
        row = cur.execute(self._queries["begin_write"], params).fetchone()
        assert row is not None
        return int(row[0]) == 1

    def _rounds(self, prepared: _Prepared) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of each statement, chunk by chunk: a chunk's rounds in turn (a link
        repeated in the batch goes to the next round), each in ord order."""
        for chunk in prepared.chunks():
            yield from _chunk_rounds(chunk, 0)

    def _copy_possible(self, prepared: _Prepared) -> bool:
        """Whether *prepared* is large enough for the COPY path (``copy_rows`` records:
        a COPY costs a sync and two round trips more than merging)."""
        n = self.copy_rows
        return n is not None and not self._on_citus and prepared.total >= n

    def _copy_candidate(self, chunk: _Chunk) -> bool:
        """Whether *chunk*'s first round may go by COPY (in a call `_copy_possible`
        accepts): each row with an explicit observation time the merge computes
        exactly, the path on and not backing off.  A candidate turned down by the
        back-off uses up one chunk of it."""
        if self.copy_rows is None or self._on_citus or not chunk.rounds:
            return False
        if chunk.copy is None:
            for row in chunk.rows:
                if row[1] == 0 and (row[4] is None or not -_EXACT_US < row[4] < _EXACT_US):
                    return False  # the database clock, or observed_at in float8: merged
        with self._copy_lock:
            if self._copy_skip > 0:
                self._copy_skip -= 1
                return False
        return True

    def _clock_from(self, row: tuple[Any, ...] | None) -> int | None:
        """The database clock from `copy_clock`'s *row*; None on Citus (and the COPY
        path is off from then on)."""
        assert row is not None
        clock_us, on_citus = row
        if on_citus:
            self._on_citus = True
            return None
        return int(clock_us)

    def _copy_ahead(self, prepared: _Prepared) -> bool:
        """Whether the helper thread should build COPY rows for the chunks of
        *prepared*: a call large enough, the path on and (racy read, a hint) not backing
        off.  `_copy_tuples` builds them at write time otherwise."""
        n = self.copy_rows
        return n is not None and prepared.total >= n and not self._on_citus and not self._copy_skip

    def _copy_tuples(self, chunk: _Chunk, clock_us: int) -> list[tuple[Any, ...]] | None:
        """*chunk*'s first round as the merge would insert it fresh (`copy_rows`
        columns), or None when a row's observation time is past the future guard at
        *clock_us* (a lower bound of the merge's clock) or anything else keeps a row
        from COPY: the merge decides those."""
        copy = chunk.copy if chunk.copy is not None else _copy_rows(chunk.rows)
        if copy is None or copy.max_us > clock_us + MAX_FUTURE_US:
            return None
        return copy.tuples

    @staticmethod
    def _copy_cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
        """A cursor for the COPY path: arrays and JSON go as the bytes it encoded."""
        cur = conn.cursor()
        for dumper in _RAW_DUMPERS:
            cur.adapters.register_dumper(None, dumper)
        return cur

    def _copy_run(
        self,
        cur: psycopg.Cursor[Any],
        first: _Chunk,
        tuples: list[tuple[Any, ...]],
        chunks: Iterator[_Chunk],
        clock_us: int,
    ) -> tuple[bool, list[tuple[_Chunk, int]], _Chunk | None]:
        """COPY the first round of *first* (its *tuples*), then those of the next chunks
        of *chunks* while they are candidates, in one statement (`_copy`): the server
        stores each chunk while the helper thread validates the next one.

        Returns (whether the COPY wrote every row, [(chunk, rows sent)] in order, the
        chunk taken from *chunks* that was not sent, or None when they ran out).
        """
        run = [(first, len(tuples))]
        stopped: list[_Chunk] = []

        def rows() -> Iterator[tuple[Any, ...]]:
            yield from tuples
            for chunk in chunks:
                more = self._copy_tuples(chunk, clock_us) if self._copy_candidate(chunk) else None
                if more is None:
                    stopped.append(chunk)
                    return
                run.append((chunk, len(more)))
                yield from more

        ok = self._copy(cur, rows())
        return ok, run, stopped[0] if stopped else None

    def _copy(self, cur: psycopg.Cursor[Any], tuples: Iterable[tuple[Any, ...]]) -> bool:
        """Send *tuples* by binary COPY, inside the caller's savepoint.

        True: every row written.  False: the database refused the COPY for its data (a
        link that exists, an unknown ``source_id``, a value it rejects): the transaction
        is then in error, for the caller to roll back to its savepoint and merge the
        chunk; the next candidate chunks skip COPY.  Blocks while another transaction
        holds one of the links uncommitted.  Raises any other `psycopg.Error`.
        """
        with self._copy_lock:
            self.copy_attempts += 1
        try:
            with cur.copy(self._copy_sql) as cp:
                cp.set_types(_COPY_PATH_TYPES)
                for t in tuples:
                    cp.write_row(t)
        except psycopg.Error as e:
            client_side = e.sqlstate is None and isinstance(e, psycopg.DataError)
            if not client_side and (e.sqlstate or "")[:2] not in _ROW_ERROR_CLASSES:
                raise
            with self._copy_lock:
                self.copy_fallbacks += 1
                self._copy_skip = self._copy_backoff
                self._copy_backoff = min(2 * self._copy_backoff, _COPY_MAX_BACKOFF)
            return False
        with self._copy_lock:
            self._copy_backoff = 1
        return True

    def _round_params(self, rows: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
        """The bound arrays of one merge (`merge_rows`), one per column."""
        cols = list(zip(*rows, strict=True))
        params: dict[str, Any] = {
            "ord": list(cols[0]),
            "partition_key": list(cols[2]),
            "source_link": list(cols[3]),
            "observed_us": list(cols[4]),
            "max_future": MAX_FUTURE_US,
        }
        for j, name in enumerate(SCALAR_COLUMNS):
            values = list(cols[5 + j])
            if name in _JSON_COLUMNS:
                values = [None if v is None else Jsonb(v) for v in values]
            params[name] = values
        n = 5 + len(SCALAR_COLUMNS)
        params["emails"] = [_array_literal(a) for a in cols[n]]
        params["phones"] = [_array_literal(a) for a in cols[n + 1]]
        params["whatsapp"] = [_array_literal(a) for a in cols[n + 2]]
        return params

    def _left_out_rejections(
        self, cur: psycopg.Cursor[Any], prepared: _Prepared, left_out: list[tuple[int, Any]]
    ) -> list[tuple[Rejection, list[Problem]]]:
        """Why the merge left rows out (its source_id and future checks): asked again
        for those rows only, with the same checks (`begin_write` without a key)."""
        order, records = prepared.order, prepared.records
        sids: dict[int, list[int]] = {}
        obs_index: list[int] = []
        obs_us: list[int] = []
        for ord_, row in left_out:
            i = order[ord_]
            sid = row[5]
            if sid is not None:
                sids.setdefault(sid, []).append(i)
            if row[4] is not None:
                obs_index.append(i)
                obs_us.append(row[4])
        params = {
            "key": None,
            "source_ids": sorted(sids),
            "obs_index": obs_index,
            "obs_us": obs_us,
            "max_future": MAX_FUTURE_US,
        }
        found = cur.execute(self._queries["begin_write"], params).fetchone()
        assert found is not None
        _, unknown, in_future = found
        bad: dict[int, list[Problem]] = {}
        for sid in unknown:
            for i in sids[sid]:
                bad.setdefault(i, []).append(
                    Problem("source_id", "unknown_source_id", f"results has no row with id {sid}")
                )
        future = Problem(
            "observed_at",
            "in_future",
            "observed_at is more than an hour ahead of the database clock",
        )
        for i in in_future:
            bad.setdefault(i, []).append(future)
        out = []
        for ord_, row in left_out:
            i = order[ord_]
            problems = bad.get(i)
            if problems is None:  # the clock moved on meanwhile: the merge's check decided
                detail = f"results has no row with id {row[5]}"
                unknown_sid = Problem("source_id", "unknown_source_id", detail)
                problems = [future] if row[4] is not None else [unknown_sid]
            out.append(_rejection(i, records[i], problems))
        return out

    def _rejects_params(
        self, prepared: _Prepared, rejects: list[tuple[Rejection, list[Problem]]]
    ) -> dict[str, Any]:
        rows = [self._reject_row(prepared.records, r, p) for r, p in rejects]
        return {
            "server_id": self.server_id,
            "row_index": [r[1] for r in rows],
            "source_link": [r[2] for r in rows],
            "field": [r[3] for r in rows],
            "reason": [r[4] for r in rows],
            "detail": [r[5] for r in rows],
            "problems": [Jsonb(r[6]) for r in rows],
            "payload": [Jsonb(r[7]) for r in rows],
            "payload_is_repr": [r[8] for r in rows],
        }

    def _merge(
        self, cur: psycopg.Cursor[Any], rows: Sequence[tuple[Any, ...]]
    ) -> tuple[int, int, list[tuple[int, psycopg.Error]], list[tuple[int, Any]]]:
        """Merge one round; on a data error, bisect with savepoints down to the bad rows.

        Returns (rows written, statements run, [(ord, error)] of the rows refused,
        [(ord, row)] of the rows the merge's checks left out).
        """
        q = self._queries
        merge = q["merge_rows"]
        failed: list[tuple[int, psycopg.Error]] = []
        missing: list[tuple[int, Any]] = []
        written = 0
        statements = 0
        stack = [(0, len(rows))]
        while stack:
            lo, hi = stack.pop()
            part = rows[lo:hi]
            statements += 1
            # explicit: on an idle connection psycopg opens the caller's transaction first
            cur.execute(q["savepoint"])
            try:
                got = {r[0] for r in cur.execute(merge, self._round_params(part)).fetchall()}
                cur.execute(q["release"])
            except psycopg.Error as e:
                if (e.sqlstate or "")[:2] not in _ROW_ERROR_CLASSES:
                    raise
                cur.execute(q["rollback_to"])
                cur.execute(q["release"])
                if hi - lo == 1:
                    failed.append((rows[lo][0], e))
                else:
                    mid = (lo + hi) // 2
                    stack.append((mid, hi))
                    stack.append((lo, mid))
                continue
            written += len(got)
            if len(got) < len(part):
                missing += [(row[0], row) for row in part if row[3] not in got]
        return written, statements, failed, missing

    def _reject_row(
        self, records: list[Any], rejection: Rejection, problems: list[Problem]
    ) -> tuple[Any, ...]:
        payload, is_repr = _payload(records[rejection.index])
        problem_list = [
            {"field": _safe_text(p.field), "reason": p.reason, "detail": _safe_text(p.detail)}
            for p in problems
        ]
        return (
            self.server_id,
            rejection.index,
            rejection.link,
            _safe_text(rejection.field),
            rejection.reason,
            _safe_text(rejection.detail),
            problem_list,
            payload,
            is_repr,
        )


def _copy_rows(rows: list[tuple[Any, ...]]) -> _CopyRows | None:
    """The first round of a chunk's merge *rows* as the COPY path sends them: the values
    the merge inserts for a fresh row (observation slots, observed_at, scrape_count 1,
    the coalesce defaults, rating as numeric), arrays and JSON already binary.  None
    when a row cannot be written exactly so (no explicit observation time, a time the
    merge computes in float8, a value that does not encode): the merge writes it."""
    nslots = len(SCALAR_COLUMNS)
    n = 5 + nslots
    slots_head = (
        _ARRAY_HEAD(1, 1, _INT8_OID, nslots, 1),
        _ARRAY_HEAD(1, 0, _INT8_OID, nslots, 1),
    )
    dumps = orjson.dumps
    out: list[tuple[Any, ...]] = []
    max_us = -_EXACT_US
    try:
        for row in rows:
            if row[1]:
                continue
            us = row[4]
            if us is None or not -_EXACT_US < us < _EXACT_US:
                return None
            max_us = max(us, max_us)
            values = list(row[5:n])
            elem = _INT8_ELEM(8, us)
            slots = [_NULL_ELEM if v is None else elem for v in values]
            slots_bytes = slots_head[None not in values] + b"".join(slots)
            rating = values[_RATING]
            if rating is not None:  # float8 -> numeric as PostgreSQL casts it (15 digits)
                values[_RATING] = Decimal(format(rating, ".15g"))
            for j, default in _COPY_JSON:
                v = values[j]
                values[j] = default if v is None else _JSON_BINARY + dumps(v)
            if values[_STATUS] is None:
                values[_STATUS] = "pending"
            observed_at = _INT8_BINARY(us - _PG_EPOCH_US)  # exact: what the merge computes
            out.append(
                (row[2], row[3], *values, _text_array(row[n]), _text_array(row[n + 1]),
                 _text_array(row[n + 2]), slots_bytes, observed_at, 1)
            )  # fmt: skip
    except (TypeError, ValueError, OverflowError):  # JSON, text, time: let the merge say
        return None
    return _CopyRows(out, max_us)


def _chunk_rounds(chunk: _Chunk, start: int) -> Iterator[list[tuple[Any, ...]]]:
    """*chunk*'s rounds from round *start* on (1: after a COPY of its first), each in
    ord order."""
    if not chunk.rows:
        return
    if len(chunk.rounds) == 1:
        if start == 0:
            yield chunk.rows
        return
    for rnd in range(start, len(chunk.rounds)):
        rows = [row for row in chunk.rows if row[1] == rnd]
        if rows:
            yield rows


def _array_literal(items: Sequence[str]) -> str:
    """*items* as a PostgreSQL array literal (every element quoted, so no value needs
    more than escaping its quotes and backslashes)."""
    if not items:
        return "{}"
    parts = [
        item.replace("\\", "\\\\").replace('"', '\\"') if '"' in item or "\\" in item else item
        for item in items
    ]
    return '{"' + '","'.join(parts) + '"}'


def _rejection(index: int, record: Any, problems: list[Problem]) -> tuple[Rejection, list[Problem]]:
    first = problems[0]
    return Rejection(index, _record_link(record), first.field, first.reason, first.detail), problems


def _record_link(record: Any) -> str | None:
    """The record's link as storable text (or None); never raises."""
    try:
        link = record.get("source_link") if isinstance(record, Mapping) else None
    except Exception:
        return None
    return _safe_link(link)


def _type_name(v: Any) -> str:
    try:
        name = type(v).__name__
    except Exception:
        return "object"
    return name if type(name) is str else "object"


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _combine(reports: list[UpsertReport]) -> UpsertReport:
    """One report for the partition groups of a parallel call."""
    out = UpsertReport(transactions=len(reports))
    for r in reports:
        out.written += r.written
        out.merged_in_batch += r.merged_in_batch
        out.rejections += r.rejections
        out.reasons += r.reasons
        out.retries += r.retries
        out.statements += r.statements
        out.prepare_seconds += r.prepare_seconds
        out.prepare_wait_seconds += r.prepare_wait_seconds
    out.rejections.sort(key=lambda r: r.index)
    out.rejected = len(out.rejections)
    return out


def _db_rejection(
    index: int, record: Mapping[str, Any], err: psycopg.Error
) -> tuple[Rejection, list[Problem]]:
    diag = err.diag
    fieldname = diag.column_name or diag.constraint_name or ""
    reason = "db_" + _CAMEL.sub("_", type(err).__name__).lower()
    detail = f"PostgreSQL {err.sqlstate}: {diag.message_primary or err}"
    if diag.message_detail:
        detail += f" ({diag.message_detail})"
    return Rejection(index, _record_link(record), fieldname, reason, detail), [
        Problem(fieldname, reason, detail)
    ]


def _safe_text(s: Any) -> str:
    """*s* if PostgreSQL text can hold it, else its ASCII repr; never raises."""
    if type(s) is str and "\x00" not in s:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return s
    return _ascii(s)[:_MAX_REPR]


class _Repr(reprlib.Repr):
    """A bounded repr: long strings, big containers and deep nesting are elided, and
    an object whose own repr raises is named instead."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 20
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 1000
        self.maxdeque = self.maxarray = 1000
        self.maxstring = self.maxother = 10_000
        self.maxlong = 200

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 10_000:  # str() of it would raise
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_str(self, x: str, level: int) -> str:
        return ascii(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")


_REPR = _Repr()


def _ascii(v: Any) -> str:
    """``ascii(v)`` when it is cheap and works, else a bounded repr; never raises."""
    try:
        if type(v) is str and len(v) <= _MAX_REPR:
            return ascii(v)
        text = _REPR.repr(v)
    except Exception as e:
        return f"<unrepresentable {_type_name(v)}: {_type_name(e)}>"
    # non-ASCII characters (and lone surrogates) escaped, as ascii() does
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _safe_link(link: Any) -> str | None:
    return None if link is None else _safe_text(link)[:4096]


def _payload(record: Any) -> tuple[Any, bool]:
    """The record as a JSON value, or ``{"repr": ...}`` when JSON would lose or refuse
    something (NaN, NUL, surrogates, non-JSON objects)."""
    try:
        if isinstance(record, Mapping):
            plain = {
                k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()
            }
            payload = normalize_json(plain)
            if len(orjson.dumps(payload)) <= _MAX_PAYLOAD_BYTES:
                return payload, False
    except Exception:  # anything a hostile record does: keep a repr instead
        pass
    text = _ascii(record)  # repr with every non-ASCII character escaped; never raises
    return {"repr": text[:_MAX_REPR]}, True
