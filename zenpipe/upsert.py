"""The writer: batches of enriched contact records merged into ``zen_contacts``.

One call to `Upserter.upsert` validates every record in Python (`zenpipe.validate`),
computes each link's partition key (`zenpipe.keys`), sorts the batch by (partition, key,
link), COPYs it in binary into a transaction-scoped staging table and merges it with one
``INSERT ... SELECT ... ON CONFLICT DO UPDATE``.  Rejected records go to ``zen_rejects``
in the same transaction; the rest commits.  See ``docs/upserting.md`` for the merge
rules column by column.

The merge is order-independent: arrays are unioned, each scalar keeps the value of its
newest observation (ties: the greater value), NULL never erases.  So writes may be
retried, repeated or reordered between servers and the row converges to the same value;
only ``scrape_count`` counts the writes themselves.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import psycopg
from psycopg import pq
from psycopg.types.json import set_json_dumps
from psycopg_pool import ConnectionPool
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from . import queries
from .errors import UpsertError, is_transient
from .keys import hashtext, partition_of
from .validate import SCALAR_FIELDS, Contact, Problem, normalize_json, validate_record

if TYPE_CHECKING:
    from .claim import Batch, Claimer

__all__ = ["SCALAR_COLUMNS", "Rejection", "UpsertReport", "Upserter"]

#: Scalar columns merged by observation time, in ``zen_contacts.observed_us`` slot order.
SCALAR_COLUMNS: tuple[str, ...] = (*(name for name, _ in SCALAR_FIELDS), "last_scrape_server")

_STAGE_TYPES: dict[str, str] = {
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
_COPY_TYPES = [
    "int4",
    "int4",
    "int4",
    "text",
    "int8",
    *(_STAGE_TYPES.get(c, "text") for c in SCALAR_COLUMNS),
    "text[]",
    "text[]",
    "text[]",
]
_REJECT_TYPES = ["text", "int4", "text", "text", "text", "text", "jsonb", "jsonb", "bool"]

#: SQLSTATE classes that mean "this row's data", not "this connection": bisect on them.
#: 22 data exception, 23 integrity constraint violation, 54 program limit exceeded
#: (e.g. a value too large for a btree index row).
_ROW_ERROR_CLASSES = frozenset({"22", "23", "54"})
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_MAX_REPR = 100_000


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


class _Prepared(NamedTuple):
    records: list[Any]
    rows: list[tuple[Any, ...]]  # COPY rows, in ord order
    row_index: list[int]  # ord -> index in records
    rounds: list[list[int]]  # round -> ords in it, ascending
    rejections: list[tuple[Rejection, list[Problem]]]
    merged_in_batch: int


class _Written(NamedTuple):
    written: int
    statements: int
    rejections: list[tuple[Rejection, list[Problem]]]


class Upserter:
    """Merges contact records into ``zen_contacts``; one instance per worker process.

    *conninfo* is a libpq connection string (the upserter opens a small pool of its own,
    ``prepare_threshold=None`` so that it works behind PgBouncer in transaction mode) or a
    `psycopg_pool.ConnectionPool` owned by the caller.  *server_id* is stored as
    ``last_scrape_server`` and in ``zen_rejects``.  Records with more than
    *max_array_items* distinct emails (phones, WhatsApp numbers) are rejected.  A batch
    is retried at most *max_retries* times after transient errors, with exponential
    backoff and jitter up to *max_wait* seconds between attempts.

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
    ) -> None:
        if not server_id or "\x00" in server_id:
            raise ValueError("server_id must be a non-empty string without NUL")
        self.server_id = server_id
        self.max_array_items = max_array_items
        self.max_retries = max_retries
        self.max_wait = max_wait
        self._queries = queries.load("upsert")
        if isinstance(conninfo, str):
            self._pool: ConnectionPool[Any] = ConnectionPool(
                conninfo,
                min_size=1,
                max_size=pool_size,
                kwargs={"prepare_threshold": None},
                open=True,
                name=f"zenpipe-upsert-{server_id}",
            )
            self._own_pool = True
        else:
            self._pool = conninfo
            self._own_pool = False

    def close(self) -> None:
        """Close the pool if the upserter opened it (waits for connections in use)."""
        if self._own_pool:
            self._pool.close()

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
        writer.  With *conn*: runs inside the caller's open transaction, which it neither
        commits nor retries; *conn* must not be in autocommit mode.

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
                    "and no transaction is open): the staging table would vanish"
                )
            return self._report(prepared, self._write(conn, prepared), retries=0)
        return self._run(prepared, None, None)

    def upsert_and_complete(
        self, records: Iterable[Mapping[str, Any]], claimer: Claimer, batch: Batch
    ) -> UpsertReport:
        """Merge *records* and mark *batch*'s claims done, in one transaction.

        Either both effects commit or neither does, so a worker killed at any point
        leaves its claims to expire and be claimed again, and a record is never written
        for a claim that is not marked done.  Retried as a whole on transient errors like
        `upsert`.  Raises `zenpipe.claim.StaleClaimError` (nothing written) when the
        claims were taken over after their lease ran out.
        """
        prepared = self._prepare(records)
        return self._run(prepared, claimer, batch)

    # -- internals --------------------------------------------------------------------

    def _run(
        self, prepared: _Prepared, claimer: Claimer | None, batch: Batch | None
    ) -> UpsertReport:
        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_random_exponential(multiplier=0.05, max=self.max_wait),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )
        attempts = 0
        for attempt in retrying:
            with attempt:
                attempts += 1
                with self._pool.connection() as conn, conn.transaction():
                    if attempts > 1 and batch is not None and self._batch_done(conn, batch):
                        report = self._report(prepared, _Written(0, 1, []), retries=attempts - 1)
                        report.already_committed = True
                        return report
                    written = self._write(conn, prepared)
                    if claimer is not None and batch is not None:
                        claimer.complete(batch, conn=conn)
        return self._report(prepared, written, retries=attempts - 1)

    def _batch_done(self, conn: psycopg.Connection[Any], batch: Batch) -> bool:
        """Whether every claim of *batch* is already done under its token."""
        claims = batch.claims
        if not claims:
            return False
        params = {"ids": [c.id for c in claims], "tokens": [c.token for c in claims]}
        row = conn.execute(self._queries["batch_done"], params).fetchone()
        return row is not None and int(row[0]) == len(claims)

    def _report(self, prepared: _Prepared, written: _Written, *, retries: int) -> UpsertReport:
        report = UpsertReport(
            written=written.written,
            merged_in_batch=prepared.merged_in_batch,
            retries=retries,
            statements=written.statements,
        )
        for rejection, _ in prepared.rejections + written.rejections:
            report.rejections.append(rejection)
            report.reasons[rejection.reason] += 1
        report.rejections.sort(key=lambda r: r.index)
        report.rejected = len(report.rejections)
        return report

    def _prepare(self, records: Iterable[Mapping[str, Any]]) -> _Prepared:
        """Validate, hash, sort and round the batch: all the Python-side work, done once
        (not again on a retry)."""
        recs = list(records)
        now_us = time.time_ns() // 1000
        cap = self.max_array_items
        entries: list[tuple[int, int, str, int, Contact]] = []
        rejections: list[tuple[Rejection, list[Problem]]] = []
        for i, rec in enumerate(recs):
            got = validate_record(rec, max_array_items=cap, now_us=now_us)
            if isinstance(got, Contact):
                key = hashtext(got.source_link)
                entries.append((partition_of(key), key, got.source_link, i, got))
            else:
                first = got[0]
                link = rec.get("source_link") if isinstance(rec, Mapping) else None
                rejections.append(
                    (
                        Rejection(i, _safe_link(link), first.field, first.reason, first.detail),
                        got,
                    )
                )
        entries.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
        server = self.server_id
        rows: list[tuple[Any, ...]] = []
        row_index: list[int] = []
        rounds: list[list[int]] = []
        prev_link: str | None = None
        rnd = 0
        merged = 0
        for ord_, (_, key, link, i, c) in enumerate(entries):
            if link == prev_link:
                rnd += 1
                merged += 1
            else:
                rnd = 0
                prev_link = link
            if rnd == len(rounds):
                rounds.append([])
            rounds[rnd].append(ord_)
            row_index.append(i)
            rows.append((ord_, rnd, key, link, c.observed_us, *c.scalars, server, *c[3:]))
        return _Prepared(recs, rows, row_index, rounds, rejections, merged)

    def _write(self, conn: psycopg.Connection[Any], prepared: _Prepared) -> _Written:
        """Stage, merge (bisecting bad rows out), store rejects; no commit."""
        q = self._queries
        db_rejects: list[tuple[Rejection, list[Problem]]] = []
        written = 0
        statements = 0
        with conn.cursor() as cur:
            set_json_dumps(orjson.dumps, context=cur)
            if prepared.rows:
                cur.execute(q["create_stage"])
                with cur.copy(q["copy_stage"]) as copy:
                    copy.set_types(_COPY_TYPES)
                    for row in prepared.rows:
                        copy.write_row(row)
                statements += 2
                for rnd, ords in enumerate(prepared.rounds):
                    w, s, failed = self._merge(cur, rnd, ords)
                    written += w
                    statements += s
                    for ord_, err in failed:
                        i = prepared.row_index[ord_]
                        db_rejects.append(_db_rejection(i, prepared.records[i], err))
                cur.execute(q["drop_stage"])
                statements += 1
            rejects = prepared.rejections + db_rejects
            if rejects:
                with cur.copy(q["copy_rejects"]) as copy:
                    copy.set_types(_REJECT_TYPES)
                    for rejection, problems in rejects:
                        copy.write_row(self._reject_row(prepared.records, rejection, problems))
                statements += 1
        return _Written(written, statements, db_rejects)

    def _merge(
        self, cur: psycopg.Cursor[Any], rnd: int, ords: Sequence[int]
    ) -> tuple[int, int, list[tuple[int, psycopg.Error]]]:
        """Merge one round; on a data error, bisect with savepoints down to the bad rows.

        Returns (rows written, statements run, [(ord, error)] of the rows refused).
        """
        merge = self._queries["merge_round"]
        conn = cur.connection
        failed: list[tuple[int, psycopg.Error]] = []
        written = 0
        statements = 0
        stack = [(0, len(ords))]
        while stack:
            lo, hi = stack.pop()
            statements += 1
            try:
                with conn.transaction():
                    cur.execute(merge, {"round": rnd, "lo": ords[lo], "hi": ords[hi - 1]})
                    written += cur.rowcount
            except psycopg.Error as e:
                if (e.sqlstate or "")[:2] not in _ROW_ERROR_CLASSES:
                    raise
                if hi - lo == 1:
                    failed.append((ords[lo], e))
                else:
                    mid = (lo + hi) // 2
                    stack.append((mid, hi))
                    stack.append((lo, mid))
        return written, statements, failed

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


def _db_rejection(
    index: int, record: Mapping[str, Any], err: psycopg.Error
) -> tuple[Rejection, list[Problem]]:
    diag = err.diag
    fieldname = diag.column_name or diag.constraint_name or ""
    reason = "db_" + _CAMEL.sub("_", type(err).__name__).lower()
    detail = f"PostgreSQL {err.sqlstate}: {diag.message_primary or err}"
    if diag.message_detail:
        detail += f" ({diag.message_detail})"
    link = record.get("source_link")
    return Rejection(index, _safe_link(link), fieldname, reason, detail), [
        Problem(fieldname, reason, detail)
    ]


def _safe_text(s: Any) -> str:
    """*s* if PostgreSQL text can hold it, else its ASCII repr."""
    if isinstance(s, str) and "\x00" not in s:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return s
    return ascii(s)[:_MAX_REPR]


def _safe_link(link: Any) -> str | None:
    return None if link is None else _safe_text(link)[:4096]


def _payload(record: Any) -> tuple[Any, bool]:
    """The record as a JSON value, or ``{"repr": ...}`` when JSON would lose or refuse
    something (NaN, NUL, surrogates, non-JSON objects)."""
    if isinstance(record, Mapping):
        try:
            plain = {
                k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()
            }
            return normalize_json(plain), False
        except (ValueError, TypeError, AttributeError):
            pass
    try:
        text = ascii(record)  # repr with every non-ASCII character escaped
    except Exception as e:  # a broken __repr__ must not lose the reject
        text = f"<unrepresentable {type(record).__name__}: {type(e).__name__}>"
    return {"repr": text[:_MAX_REPR]}, True
