"""Versioned, checksummed, concurrency-safe schema migrations.

Migrations are the files ``sql/migrations/NNNN_name.sql``, applied in order, each once,
and recorded in ``zen_schema_migrations`` with a SHA-256 of the file.  Many processes may
call `apply()` at the same time (every server of a fleet does at start-up): a session
advisory lock lets one apply while the others wait, then find nothing left to do.

A file whose first line is ``-- zenpipe: concurrently`` runs outside a transaction and may
only hold ``CREATE INDEX <name> ON <table> <definition>;`` statements.  Each is built
without blocking writers: on a partitioned table with ``CREATE INDEX ... ON ONLY`` the
parent, ``CREATE INDEX CONCURRENTLY`` on every leaf and ``ALTER INDEX ... ATTACH
PARTITION``; every step is idempotent, so a run interrupted half-way resumes cleanly.

Migrations need a session: run them on a direct connection, not through PgBouncer in
transaction mode.

On a Citus coordinator (``citus`` extension installed, or ``citus=True``) `apply()` then
applies the distributed variant's own steps, ``sql/citus/NNNN_name.sql``, under the same
lock: they are recorded in the same table as versions ``CITUS_VERSION_BASE + N``, so
each shape keeps its own numbering and the shared migrations stay one set for both.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from .errors import MigrationChecksumError, MigrationError, MigrationLockTimeout, SchemaError
from .locks import NAMESPACE_MIGRATION
from .queries import load, sql_dir, trusted

__all__ = [
    "CITUS_VERSION_BASE",
    "AppliedMigration",
    "Migration",
    "apply",
    "load_migrations",
    "status",
]

logger = logging.getLogger("zenpipe.schema")

MIN_SERVER_VERSION = 150000
_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_CONCURRENTLY = re.compile(r"\A--\s*zenpipe:\s*concurrently\s*$", re.MULTILINE)
_CREATE_INDEX = re.compile(
    r"^CREATE\s+INDEX\s+(?P<name>[a-z_][a-z0-9_]*)\s+ON\s+(?P<table>[a-z_][a-z0-9_]*)\s+"
    r"(?P<body>.+)$",
    re.IGNORECASE | re.DOTALL,
)
_LOCK_KEY = 1
#: Versions of the Citus steps (``sql/citus/NNNN_name.sql``) in ``zen_schema_migrations``.
CITUS_VERSION_BASE = 900_000
# Brief DDL steps (ON ONLY, ATTACH) wait at most this long for a lock before retrying,
# so they never queue writers behind them for longer.
_DDL_LOCK_TIMEOUT = "2s"
_DDL_ATTEMPTS = 60


@dataclass(frozen=True)
class IndexStep:
    """One ``CREATE INDEX`` of a concurrent migration."""

    name: str
    table: str
    body: str


@dataclass(frozen=True)
class Migration:
    """A migration file: its version, name, text and checksum."""

    version: int
    name: str
    text: str
    checksum: str
    concurrently: bool

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def index_steps(self) -> list[IndexStep]:
        """The statements of a ``concurrently`` migration, parsed and checked."""
        body = "\n".join(
            line for line in self.text.splitlines() if not line.lstrip().startswith("--")
        )
        steps = []
        for raw in body.split(";"):
            stmt = raw.strip()
            if not stmt:
                continue
            m = _CREATE_INDEX.match(stmt)
            if m is None:
                raise MigrationError(
                    f"{self.label}: a concurrently migration may only hold "
                    f"'CREATE INDEX <name> ON <table> ...;' statements, got: {stmt[:80]!r}"
                )
            steps.append(IndexStep(m["name"], m["table"], m["body"].strip()))
        return steps


@dataclass(frozen=True)
class AppliedMigration:
    """A row of ``zen_schema_migrations``."""

    version: int
    name: str
    checksum: str
    applied_at: datetime
    duration_ms: int


def load_migrations(
    directory: str | Path | Traversable | None = None, *, version_base: int = 0
) -> list[Migration]:
    """Read and order the migration files (by default the ones shipped with zenpipe);
    each file's number is added to *version_base*."""
    folder: Traversable | Path
    if directory is None:
        folder = sql_dir() / "migrations"
    elif isinstance(directory, str):
        folder = Path(directory)
    else:
        folder = directory
    migrations: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        m = _FILENAME.match(entry.name)
        if m is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = version_base + int(m.group(1))
        if version in migrations:
            raise MigrationError(f"two migrations numbered {version:04d}")
        raw = entry.read_bytes()
        text = raw.decode("utf-8")
        migrations[version] = Migration(
            version=version,
            name=m.group(2),
            text=text,
            checksum=hashlib.sha256(raw).hexdigest(),
            concurrently=bool(_CONCURRENTLY.search(text.split("\n", 1)[0])),
        )
    return [migrations[v] for v in sorted(migrations)]


def apply(
    conninfo: str,
    *,
    directory: str | Path | Traversable | None = None,
    lock_timeout: float = 600.0,
    citus: bool | None = None,
) -> list[Migration]:
    """Apply the pending migrations; return the ones this call applied.

    *citus*: also apply the Citus steps (``sql/citus``) after the shared ones; None
    (default) does so when the database has the ``citus`` extension and no *directory*
    is given.  ``citus=True`` raises `SchemaError` on a server that is not a Citus
    coordinator.

    Blocks while another process holds the migration lock, at most *lock_timeout*
    seconds, then raises `MigrationLockTimeout`.  Raises `MigrationChecksumError` before
    applying anything when an applied migration's file was edited, and `SchemaError`
    when the server is older than PostgreSQL 15 or its encoding is not UTF-8 (partition
    keys hash the UTF-8 bytes of the links).
    """
    migrations = load_migrations(directory)
    q = load("schema")
    with psycopg.connect(conninfo, autocommit=True, row_factory=tuple_row) as conn:
        _check_server(conn)
        if citus is None:
            citus = directory is None and _has_citus(conn)
        if citus:
            if not _has_citus(conn):
                raise SchemaError("citus=True, but the database is not a Citus coordinator")
            migrations += load_migrations(sql_dir() / "citus", version_base=CITUS_VERSION_BASE)
        with _migration_lock(conn, lock_timeout):
            conn.execute(q["create_migrations_table"])
            recorded = {row[0]: (row[1], row[2]) for row in conn.execute(q["applied_checksums"])}
            for m in migrations:
                if m.version in recorded and recorded[m.version][1] != m.checksum:
                    raise MigrationChecksumError(
                        m.version, m.name, recorded[m.version][1], m.checksum
                    )
            applied = []
            for m in migrations:
                if m.version in recorded:
                    continue
                started = time.monotonic()
                if m.concurrently:
                    for step in m.index_steps():
                        _build_index(conn, step)
                    conn.execute(
                        q["record_migration"],
                        (m.version, m.name, m.checksum, _ms_since(started)),
                    )
                else:
                    with conn.transaction():
                        conn.execute(m.text.encode("utf-8"))
                        conn.execute(
                            q["record_migration"],
                            (m.version, m.name, m.checksum, _ms_since(started)),
                        )
                logger.info("applied migration %s in %d ms", m.label, _ms_since(started))
                applied.append(m)
            return applied


def status(conninfo: str) -> list[AppliedMigration]:
    """The migrations recorded in the database, oldest first (empty when none)."""
    q = load("schema")
    with psycopg.connect(conninfo, autocommit=True, row_factory=tuple_row) as conn:
        exists = conn.execute(q["migrations_table_exists"]).fetchone()
        if exists is None or not exists[0]:
            return []
        return [AppliedMigration(*row) for row in conn.execute(q["applied_migrations"])]


def pending(conninfo: str, directory: str | Path | Traversable | None = None) -> list[Migration]:
    """The migrations not yet applied to the database."""
    done = {m.version for m in status(conninfo)}
    return [m for m in load_migrations(directory) if m.version not in done]


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _has_citus(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    """Whether *conn* is a Citus coordinator."""
    q = load("schema")
    row = conn.execute(q["has_citus"]).fetchone()
    if row is None or not row[0]:
        return False
    row = conn.execute(q["is_citus_coordinator"]).fetchone()
    return row is not None and bool(row[0])


def _check_server(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    if conn.info.server_version < MIN_SERVER_VERSION:
        raise SchemaError(
            f"PostgreSQL {conn.info.server_version} is too old: zenpipe needs 15 or newer"
        )
    row = conn.execute("SHOW server_encoding").fetchone()
    if row is None or str(row[0]).upper() not in ("UTF8", "UTF-8"):
        raise SchemaError(
            f"database encoding is {row[0] if row else '?'}: zenpipe needs UTF8, because "
            "partition keys hash the UTF-8 bytes of source links"
        )


@contextmanager
def _migration_lock(conn: psycopg.Connection[tuple[object, ...]], timeout: float) -> Iterator[None]:
    """Hold the session-level migration lock.

    Waiters poll with the try-variant instead of blocking in ``pg_advisory_lock``: a
    blocked waiter keeps a snapshot open, and ``CREATE INDEX CONCURRENTLY`` run by the
    lock holder would wait for that snapshot to end, a deadlock.
    """
    q = load("schema")
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        row = conn.execute(q["try_migration_lock"], (NAMESPACE_MIGRATION, _LOCK_KEY)).fetchone()
        if row is not None and row[0]:
            break
        if time.monotonic() >= deadline:
            raise MigrationLockTimeout(
                f"another process held the migration lock for more than {timeout:g} s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute(q["migration_unlock"], (NAMESPACE_MIGRATION, _LOCK_KEY))


def _brief_ddl(conn: psycopg.Connection[tuple[object, ...]], stmt: sql.Composed) -> None:
    """Run DDL that needs a strong lock only for an instant, without queueing writers."""
    for attempt in range(_DDL_ATTEMPTS):
        try:
            with conn.transaction():
                conn.execute(load("schema")["set_local_lock_timeout"], (_DDL_LOCK_TIMEOUT,))
                conn.execute(stmt)
            return
        except psycopg.errors.LockNotAvailable:
            logger.info("DDL waited too long for its lock, retrying (%d)", attempt + 1)
            time.sleep(min(0.1 * (attempt + 1), 2.0))
    raise MigrationError(f"could not take the lock for {stmt!r} in {_DDL_ATTEMPTS} attempts")


def _index_state(
    conn: psycopg.Connection[tuple[object, ...]], name: str
) -> tuple[bool, bool] | None:
    """``(valid, attached)`` for an index, or None when it does not exist."""
    row = conn.execute(load("schema")["index_state"], (name,)).fetchone()
    return None if row is None else (bool(row[0]), bool(row[1]))


def _build_index(conn: psycopg.Connection[tuple[object, ...]], step: IndexStep) -> None:
    q = load("schema")
    body = trusted(step.body)
    table = sql.Identifier(step.table)
    index = sql.Identifier(step.name)
    row = conn.execute(q["relation_kind"], (step.table,)).fetchone()
    if row is None:
        raise MigrationError(f"index {step.name}: table {step.table} does not exist")
    if row[0] != "p":
        _build_leaf(conn, step.name, table, body)
        return
    _brief_ddl(
        conn,
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON ONLY {} {}").format(index, table, body),
    )
    leaves: Sequence[tuple[object, ...]] = conn.execute(
        q["leaf_partitions"], (step.table,)
    ).fetchall()
    for (leaf,) in leaves:
        leaf_name = str(leaf)
        suffix = leaf_name.removeprefix(step.table + "_")
        leaf_index = f"{step.name}_{suffix}"
        if len(leaf_index.encode()) > 63:
            raise MigrationError(f"index name {leaf_index!r} is longer than 63 bytes")
        _build_leaf(conn, leaf_index, sql.Identifier(leaf_name), body)
        state = _index_state(conn, leaf_index)
        if state is not None and not state[1]:
            _brief_ddl(
                conn,
                sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                    index, sql.Identifier(leaf_index)
                ),
            )
    state = _index_state(conn, step.name)
    if state is None or not state[0]:
        raise MigrationError(f"index {step.name} is not valid after attaching every partition")


def _build_leaf(
    conn: psycopg.Connection[tuple[object, ...]],
    name: str,
    table: sql.Identifier,
    body: sql.SQL,
) -> None:
    state = _index_state(conn, name)
    if state is not None and state[0]:
        return
    if state is not None:
        # Left invalid by an interrupted CREATE INDEX CONCURRENTLY: build it again.
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
    conn.execute(
        sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} {}").format(sql.Identifier(name), table, body)
    )
