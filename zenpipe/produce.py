"""Producing: source rows into ``results``, by COPY in batches.

`enqueue()` loads an iterable of rows in one transaction; `Producer` buffers rows added
one by one and loads every ``batch_size`` of them in a transaction of their own;
`load_file()` loads a JSON Lines or CSV file in one transaction.  Each batch is one binary
COPY into a ``TEMP ... ON COMMIT DROP`` table and one ``INSERT ... SELECT`` into
``results``, so the client's memory is one batch whatever the size of the input.

A row is ``{"link": str, "data": dict, "priority": int}``: *link* is required (a
non-empty string without NUL, at most 2,048 UTF-8 bytes: the contact merge keys on it),
*data* a JSON object (default ``{}``) without NUL characters (jsonb cannot store
``\\u0000``), *priority* an integer in -32768..32767 (higher is claimed first; default
the producer's *priority*).

``skip_existing=True`` leaves out a row whose link is already pending or claimed in
``results`` (``results_link_idx``), and repeats of a link within the same load; the first
occurrence wins.  Done and failed links are loaded again.  Such loads take one advisory
lock (`zenpipe.locks.NAMESPACE_PRODUCE`) from before their first insert to their commit,
so two of them loading the same link at once insert it once; they commit one at a time.

Every transaction that inserted rows sends ``NOTIFY zen_results`` (`NOTIFY_CHANNEL`),
payload ``{"rows": n}``, delivered at commit: idle workers that LISTEN wake up.
"""

from __future__ import annotations

import csv
import io
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import orjson
import psycopg
from psycopg_pool import ConnectionPool
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .errors import ZenpipeError, is_transient
from .locks import NAMESPACE_PRODUCE
from .pool import guarded_pool
from .queries import load

__all__ = [
    "LINK_KEYS",
    "MAX_LINK_BYTES",
    "NOTIFY_CHANNEL",
    "BadInputError",
    "BadLine",
    "LoadReport",
    "Producer",
    "enqueue",
    "load_file",
]

#: Channel of the NOTIFY sent by every transaction that inserted rows (payload
#: ``{"rows": n}``); workers LISTEN on it to wake up when new rows arrive.
NOTIFY_CHANNEL = "zen_results"
#: Longest link accepted, in UTF-8 bytes (a btree entry must stay far below 2,700 bytes).
MAX_LINK_BYTES = 2048
#: Keys (JSON Lines) or columns (CSV) that give a row's link, first present wins.
LINK_KEYS = ("link", "source_link", "url")
#: Bad lines a `LoadReport` keeps in `LoadReport.errors` (all are counted, and all are
#: passed to *on_bad*).
MAX_KEPT_ERRORS = 1000

_PRIORITY_MIN, _PRIORITY_MAX = -32768, 32767
_ENVELOPE_KEYS = frozenset({"link", "data", "priority"})
_COPY_TYPES = ["int8", "text", "text", "bool", "int2"]
# An escaped NUL in JSON text: \u0000 after an even number of backslashes.
_NUL_ESCAPE = re.compile(rb"(?:^|[^\\])(?:\\\\)*\\u0000")
_BOM = b"\xef\xbb\xbf"

Format = Literal["auto", "jsonl", "csv"]
Target = str | ConnectionPool[Any]
# (link, data as JSON text, whether data is the line's "data" member, priority)
_Row = tuple[str, str, bool, int]


@dataclass(frozen=True)
class BadLine:
    """A line (or row) that was not loaded: where it is and why."""

    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class LoadReport:
    """What a load did.

    *loaded* rows were inserted, *skipped* rows were left out by ``skip_existing``
    (already pending or claimed, or repeated within the load), *bad* lines were refused
    (the first `MAX_KEPT_ERRORS` of them are in *errors*).  *committed* is false when
    the load was refused and nothing of it was kept (then *loaded* and *skipped* are 0).
    """

    source: str = ""
    loaded: int = 0
    skipped: int = 0
    bad: int = 0
    batches: int = 0
    seconds: float = 0.0
    committed: bool = False
    errors: list[BadLine] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        """Rows read (loaded + skipped + bad) per second of the load."""
        return (self.loaded + self.skipped + self.bad) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "skipped": self.skipped,
            "bad": self.bad,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_per_s),
            "committed": self.committed,
            "errors": [{"line": e.line, "reason": e.reason} for e in self.errors],
        }

    def _add_bad(self, bad: BadLine) -> None:
        self.bad += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(bad)


class BadInputError(ZenpipeError, ValueError):
    """Input refused: nothing of it was loaded.

    *report* lists the bad lines (`LoadReport.errors`); its *committed* is false.
    """

    def __init__(self, report: LoadReport, message: str | None = None) -> None:
        self.report = report
        if message is None:
            first = report.errors[0] if report.errors else None
            message = (
                f"{report.source}: {report.bad} bad line{'' if report.bad == 1 else 's'}, "
                f"nothing loaded" + (f"; first: {first}" if first else "")
            )
        super().__init__(message)


class _Bad(Exception):
    """A row's problem (internal: becomes a `BadLine` or a `BadInputError`)."""


class _Refused(Exception):
    """Raised inside the load's transaction to roll it back (the bad lines are counted)."""


class _Fatal(Exception):
    """The input as a whole cannot be read (a CSV without a link column)."""

    def __init__(self, bad: BadLine) -> None:
        self.bad = bad
        super().__init__(str(bad))


# -- validation -------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _check_link(link: object) -> str:
    if link is None:
        raise _Bad(
            f"no link (one of {', '.join(LINK_KEYS)}): every row needs one, "
            "the contact merge keys on it"
        )
    if not isinstance(link, str):
        raise _Bad(f"link must be a string, got {_json_type(link)}")
    if not link.strip():
        raise _Bad("link is empty")
    if "\x00" in link:
        raise _Bad("link contains a NUL character")
    try:
        size = len(link.encode("utf-8"))
    except UnicodeEncodeError:
        raise _Bad("link is not valid UTF-8") from None
    if size > MAX_LINK_BYTES:
        raise _Bad(f"link is {size} bytes long, more than {MAX_LINK_BYTES}")
    return link


def _check_priority(priority: object, default: int) -> int:
    if priority is None:
        return default
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise _Bad(f"priority must be an integer, got {_json_type(priority)}")
    if not _PRIORITY_MIN <= priority <= _PRIORITY_MAX:
        raise _Bad(f"priority {priority} is outside {_PRIORITY_MIN}..{_PRIORITY_MAX}")
    return priority


def _has_nul(encoded: bytes) -> bool:
    return b"\\u0000" in encoded and _NUL_ESCAPE.search(encoded) is not None


def _encode_data(data: object) -> str:
    if data is None:
        return "{}"
    if not isinstance(data, Mapping):
        raise _Bad(f"data must be a JSON object, got {_json_type(data)}")
    try:
        encoded = orjson.dumps(data if isinstance(data, dict) else dict(data))
    except (orjson.JSONEncodeError, TypeError) as e:
        raise _Bad(f"data cannot be encoded as JSON: {e}") from None
    if _has_nul(encoded):
        raise _Bad("data contains a NUL character (\\u0000), which jsonb cannot store")
    return encoded.decode("utf-8")


def _check_row(row: object, default_priority: int) -> _Row:
    """A row of `enqueue` / `Producer.add_many`: ``{"link", "data", "priority"}``."""
    if not isinstance(row, Mapping):
        raise _Bad(f"a row must be a mapping with link, data, priority; got {_json_type(row)}")
    unknown = sorted(str(k) for k in row if k not in _ENVELOPE_KEYS)
    if unknown:
        raise _Bad(f"unknown key {unknown[0]!r} (a row has link, data and priority)")
    return (
        _check_link(row.get("link")),
        _encode_data(row.get("data")),
        False,
        _check_priority(row.get("priority"), default_priority),
    )


# -- readers ----------------------------------------------------------------------------

_Item = tuple[int, "_Row | _Bad"]


def _jsonl_items(fh: IO[bytes], default_priority: int) -> Iterator[_Item]:
    """One item per non-blank line: the row, or what is wrong with it.

    A line is a JSON object, either an envelope ``{"link": ..., "data": {...},
    "priority": n}`` (a ``data`` key and no key besides those three), or flat: the whole
    object is the data, as written, and its ``link`` (else ``source_link``, else
    ``url``) key gives the link; a flat object's ``priority`` is data like any other key.
    """
    for number, raw in enumerate(fh, 1):
        line = raw.removeprefix(_BOM) if number == 1 else raw
        line = line.strip()
        if not line:
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield number, _Bad(f"not valid JSON: {e}")
            continue
        try:
            if not isinstance(obj, dict):
                raise _Bad(f"a line must be a JSON object, got {_json_type(obj)}")
            if _has_nul(line):
                raise _Bad("contains a NUL character (\\u0000), which jsonb cannot store")
            if "data" in obj and obj.keys() <= _ENVELOPE_KEYS:
                if not isinstance(obj["data"], dict):
                    raise _Bad(f"data must be a JSON object, got {_json_type(obj['data'])}")
                link = _check_link(obj.get("link"))
                priority = _check_priority(obj.get("priority"), default_priority)
                yield number, (link, line.decode("utf-8"), True, priority)
            else:
                link = _check_link(next((obj[k] for k in LINK_KEYS if k in obj), None))
                yield number, (link, line.decode("utf-8"), False, default_priority)
        except _Bad as bad:
            yield number, bad


def _csv_items(fh: IO[bytes], default_priority: int, source: str) -> Iterator[_Item]:
    """One item per record after the header row: the row, or what is wrong with it.

    The header names the columns: one of ``link``, ``source_link``, ``url`` gives the
    link, an optional ``priority`` column the priority (empty: the default); every other
    column goes into data as a string.  Bytes that are not UTF-8 make that record bad.
    """
    lines = (raw.decode("utf-8", "surrogateescape") for raw in fh)
    reader = csv.reader(lines, strict=True)
    last = 0
    header: list[str] | None = None
    link_at = priority_at = -1
    while True:
        start = last + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            last = reader.line_num
            if header is None:
                raise _Fatal(BadLine(source, start, f"header row is not valid CSV: {e}")) from e
            yield start, _Bad(f"not valid CSV: {e}")
            continue
        last = reader.line_num
        if not record:
            continue
        if header is None:
            header = [c.removeprefix("\ufeff").strip() for c in record]
            link_at = next((header.index(k) for k in LINK_KEYS if k in header), -1)
            if link_at < 0:
                raise _Fatal(
                    BadLine(source, start, f"header has no link column ({', '.join(LINK_KEYS)})")
                )
            dup = next((c for i, c in enumerate(header) if c in header[:i]), None)
            if dup is not None:
                raise _Fatal(BadLine(source, start, f"header names column {dup!r} twice"))
            priority_at = header.index("priority") if "priority" in header else -1
            continue
        try:
            if len(record) != len(header):
                raise _Bad(f"{len(record)} fields, the header has {len(header)}")
            link = _check_link(record[link_at])
            priority = default_priority
            if priority_at >= 0 and record[priority_at].strip():
                cell = record[priority_at].strip()
                try:
                    priority = int(cell)
                except ValueError:
                    raise _Bad(f"priority must be an integer, got {cell[:40]!r}") from None
                priority = _check_priority(priority, default_priority)
            data = {
                name: value
                for i, (name, value) in enumerate(zip(header, record, strict=True))
                if i not in (link_at, priority_at)
            }
            if any("\x00" in value for value in data.values()):
                raise _Bad("contains a NUL character, which jsonb cannot store")
            try:
                text = orjson.dumps(data).decode("utf-8")
            except TypeError:  # a lone surrogate: bytes that were not UTF-8
                raise _Bad("not valid UTF-8") from None
            yield start, (link, text, False, priority)
        except _Bad as bad:
            yield start, bad


def _detect(path: str, head: bytes) -> Literal["jsonl", "csv"]:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "jsonl" if head.removeprefix(_BOM).lstrip().startswith(b"{") else "csv"


# -- writing ----------------------------------------------------------------------------


class _Writer:
    """The batches of one transaction on *conn*: stage, insert, notify at the end."""

    def __init__(self, conn: psycopg.Connection[Any], *, skip_existing: bool, lock_wait: float):
        self.conn = conn
        self.skip_existing = skip_existing
        self.lock_wait = lock_wait
        self.q = load("produce")
        self.staged = False
        self.locked = False
        self.ord = 0
        self.inserted = 0
        self.skipped = 0
        self.batches = 0

    def write(self, rows: list[_Row]) -> None:
        if not rows:
            return
        q = self.q
        with self.conn.cursor() as cur:
            if not self.staged:
                cur.execute(q["create_stage"])
                self.staged = True
            else:
                cur.execute(q["clear_stage"])
            with cur.copy(q["copy_stage"]) as copy:
                copy.set_types(_COPY_TYPES)
                for link, data, envelope, priority in rows:
                    self.ord += 1
                    copy.write_row((self.ord, link, data, envelope, priority))
            if self.skip_existing:
                if not self.locked:
                    self._lock(cur)
                cur.execute(q["insert_new"])
            else:
                cur.execute(q["insert_all"])
            inserted = max(cur.rowcount, 0)
        self.inserted += inserted
        self.skipped += len(rows) - inserted
        self.batches += 1

    def _lock(self, cur: psycopg.Cursor[Any]) -> None:
        q = self.q
        wait_ms = max(int(self.lock_wait * 1000), 1)
        row = cur.execute(
            q["set_lock_wait"],
            {"wait": f"{wait_ms}ms", "statement_wait": f"{wait_ms + 1000}ms"},
        ).fetchone()
        if row is None:  # pragma: no cover - a SELECT without FROM returns one row
            raise RuntimeError("set_lock_wait returned no row")
        cur.execute(q["take_lock"], {"namespace": NAMESPACE_PRODUCE})
        cur.execute(q["restore_lock_wait"], {"lock_timeout": row[0], "statement_timeout": row[1]})
        self.locked = True

    def finish(self) -> None:
        if self.inserted:
            payload = orjson.dumps({"rows": self.inserted}).decode()
            self.conn.execute(self.q["notify"], {"channel": NOTIFY_CHANNEL, "payload": payload})


def _pool_for(target: Target) -> tuple[ConnectionPool[Any], bool]:
    if isinstance(target, str):
        return guarded_pool(target, name="zenpipe-produce", min_size=1, max_size=1), True
    return target, False


def _check_sizes(batch_size: int, priority: int) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    try:
        _check_priority(priority, 0)
    except _Bad as e:
        raise ValueError(str(e)) from None


def _load(
    pool: ConnectionPool[Any],
    items: Iterable[_Item],
    *,
    source: str,
    skip_existing: bool,
    continue_on_error: bool,
    fail_fast: bool,
    batch_size: int,
    lock_wait: float,
    on_bad: Callable[[BadLine], None] | None,
) -> LoadReport:
    report = LoadReport(source=source)
    started = time.monotonic()

    def bad_line(bad: BadLine) -> None:
        report._add_bad(bad)
        if on_bad is not None:
            on_bad(bad)

    rest = iter(items)
    refused = False
    try:
        with pool.connection() as conn:
            writer = _Writer(conn, skip_existing=skip_existing, lock_wait=lock_wait)
            batch: list[_Row] = []
            for number, item in rest:
                if isinstance(item, _Bad):
                    bad_line(BadLine(source, number, str(item)))
                    if not continue_on_error:
                        raise _Refused  # rolls the transaction back now
                    continue
                batch.append(item)
                if len(batch) >= batch_size:
                    writer.write(batch)
                    batch = []
            writer.write(batch)
            writer.finish()
    except _Fatal as fatal:
        bad_line(fatal.bad)
        refused = True
    except _Refused:
        refused = True
        if not fail_fast:
            # Read on, outside any transaction (no lock held, no session idling in a
            # transaction), so that every bad line is reported.
            try:
                for number, item in rest:
                    if isinstance(item, _Bad):
                        bad_line(BadLine(source, number, str(item)))
            except _Fatal as fatal:  # pragma: no cover - readers raise it at the start only
                bad_line(fatal.bad)
    report.seconds = time.monotonic() - started
    if refused:
        raise BadInputError(report)
    report.loaded, report.skipped, report.batches = writer.inserted, writer.skipped, writer.batches
    report.committed = True
    return report


# -- public API -------------------------------------------------------------------------


def enqueue(
    conninfo_or_pool: Target,
    rows: Iterable[Mapping[str, Any]],
    *,
    priority: int = 0,
    skip_existing: bool = False,
    batch_size: int = 5000,
    lock_wait: float = 300.0,
) -> LoadReport:
    """Insert *rows* (``{"link", "data", "priority"}`` mappings) into ``results`` in one
    transaction, by COPY in batches of *batch_size*; return what was loaded.

    All or nothing: the first bad row raises `BadInputError` (its reason and 1-based
    position in *rows*) and nothing is loaded.  *rows* is consumed once, lazily, so any
    iterator works and memory stays at one batch.  *priority* is the default of rows
    without one.  With *skip_existing*, waits at most *lock_wait* seconds for another
    such load to commit (then a `psycopg.errors.LockNotAvailable`).  Database errors
    propagate as psycopg errors, after a rollback; nothing is retried (*rows* cannot be
    read twice).  *conninfo_or_pool* is a DSN (a one-connection `guarded_pool`, closed on
    return) or a pool the caller owns.
    """
    _check_sizes(batch_size, priority)

    def items() -> Iterator[_Item]:
        for number, row in enumerate(rows, 1):
            try:
                yield number, _check_row(row, priority)
            except _Bad as bad:
                yield number, bad

    pool, owned = _pool_for(conninfo_or_pool)
    try:
        return _load(
            pool,
            items(),
            source="rows",
            skip_existing=skip_existing,
            continue_on_error=False,
            fail_fast=True,
            batch_size=batch_size,
            lock_wait=lock_wait,
            on_bad=None,
        )
    finally:
        if owned:
            pool.close()


def load_file(
    conninfo_or_pool: Target,
    path: str | Path,
    *,
    fmt: Format = "auto",
    priority: int = 0,
    skip_existing: bool = False,
    continue_on_error: bool = False,
    batch_size: int = 5000,
    lock_wait: float = 300.0,
    on_bad: Callable[[BadLine], None] | None = None,
) -> LoadReport:
    """Load a JSON Lines or CSV file (``"-"``: standard input) into ``results`` in one
    transaction, streamed in batches of *batch_size* rows; return what was loaded.

    *fmt* ``"auto"`` goes by the suffix (``.jsonl``, ``.ndjson``, ``.json``, ``.csv``),
    else by the first byte (``{``: JSON Lines).  Formats: `_jsonl_items`, `_csv_items`
    (docs/producing.md).  Every bad line is passed to *on_bad* as it is found (and
    counted in the report).  Without *continue_on_error* one bad line refuses the
    file: the whole file is still read, so that every bad line is reported, then
    `BadInputError` is raised and nothing is loaded.  With it, the good lines load and
    the report lists the bad ones.  A CSV header without a link column refuses the file
    either way.  Raises `ZenpipeError` when the file cannot be opened; see `enqueue` for
    *priority*, *skip_existing*, *lock_wait* and database errors.
    """
    _check_sizes(batch_size, priority)
    name = str(path)
    fh: IO[bytes]
    try:
        fh = sys.stdin.buffer if name == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise ZenpipeError(f"cannot read {name}: {e.strerror or e}") from e
    try:
        if fmt == "auto":
            head = fh.peek(64)[:64] if isinstance(fh, io.BufferedReader) else b""
            fmt = _detect(name, head)
        if fmt == "jsonl":
            items = _jsonl_items(fh, priority)
        elif fmt == "csv":
            items = _csv_items(fh, priority, name)
        else:
            raise ValueError(f"fmt must be auto, jsonl or csv, not {fmt!r}")
        pool, owned = _pool_for(conninfo_or_pool)
        try:
            return _load(
                pool,
                items,
                source=name,
                skip_existing=skip_existing,
                continue_on_error=continue_on_error,
                fail_fast=False,
                batch_size=batch_size,
                lock_wait=lock_wait,
                on_bad=on_bad,
            )
        finally:
            if owned:
                pool.close()
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()


class Producer:
    """Buffers rows and loads every *batch_size* of them in a transaction of their own.

    For a program that discovers links as it goes (a crawler's frontier): `add()` returns
    at once until the buffer is full, then loads it (one COPY, one INSERT, one NOTIFY,
    one commit).  `flush()` loads what is buffered; leaving the ``with`` block flushes,
    unless it exits with an exception (then the buffer is dropped: only rows of earlier
    flushes are in ``results``).  `report` adds up every flush.

    A bad row raises `BadInputError` from `add()`, and nothing of it is buffered.  A
    flush that fails on a transient error (`zenpipe.errors.is_transient`) is retried up
    to *retries* times with backoff, whole: it is one transaction (a commit whose
    acknowledgement was lost can therefore load its rows twice, except with
    *skip_existing*).  *priority*,
    *skip_existing* and *lock_wait* as in `enqueue`; *conninfo_or_pool* is a DSN (a
    one-connection `guarded_pool` that `close()` closes) or a pool the caller owns.
    Not thread-safe: one producer per thread.
    """

    def __init__(
        self,
        conninfo_or_pool: Target,
        *,
        batch_size: int = 5000,
        priority: int = 0,
        skip_existing: bool = False,
        lock_wait: float = 300.0,
        retries: int = 5,
    ) -> None:
        _check_sizes(batch_size, priority)
        self.batch_size = batch_size
        self.priority = priority
        self.skip_existing = skip_existing
        self.lock_wait = lock_wait
        self.retries = retries
        self.report = LoadReport(source="producer", committed=True)
        self._buffer: list[_Row] = []
        self._added = 0
        self._pool, self._owned = _pool_for(conninfo_or_pool)

    def add(
        self, link: str, data: Mapping[str, Any] | None = None, *, priority: int | None = None
    ) -> None:
        """Buffer one row; load the buffer when it holds *batch_size* rows."""
        self.add_many([{"link": link, "data": data, "priority": priority}])

    def add_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Buffer each of *rows* (``{"link", "data", "priority"}``), loading full batches.

        Rows before a bad one stay buffered (or loaded); the bad one raises.
        """
        for row in rows:
            self._added += 1
            try:
                checked = _check_row(row, self.priority)
            except _Bad as bad:
                report = LoadReport(source="producer")
                report._add_bad(BadLine("producer", self._added, str(bad)))
                raise BadInputError(report, f"row {self._added}: {bad}") from None
            self._buffer.append(checked)
            if len(self._buffer) >= self.batch_size:
                self.flush()

    def flush(self) -> None:
        """Load the buffered rows now, in one transaction (nothing to do when empty)."""
        if not self._buffer:
            return
        started = time.monotonic()
        for attempt in Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(max(self.retries, 1)),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        ):
            with attempt, self._pool.connection() as conn:
                writer = _Writer(conn, skip_existing=self.skip_existing, lock_wait=self.lock_wait)
                writer.write(self._buffer)
                writer.finish()
        self._buffer = []
        self.report.loaded += writer.inserted
        self.report.skipped += writer.skipped
        self.report.batches += writer.batches
        self.report.seconds += time.monotonic() - started

    def close(self) -> None:
        """Flush, then close the pool the producer opened (not a pool passed in)."""
        try:
            self.flush()
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the buffered rows without loading them, and close an owned pool."""
        self._buffer = []
        if self._owned:
            self._pool.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
