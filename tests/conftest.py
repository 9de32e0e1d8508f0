"""Shared fixtures: one throwaway PostgreSQL per test session, a template database built
once from the migrations, and a fresh clone of it per test (pytest-postgresql).

There is no skip path: when no server can start, the session errors.  The one exception
is PgBouncer: outside CI (``CI`` unset or not true) a test marked ``pgbouncer`` skips, with
the reason shown, when the ``pgbouncer`` binary is absent; under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pytest_postgresql import factories
from pytest_postgresql.executors import NoopExecutor
from pytest_postgresql.janitor import DatabaseJanitor

from zenpipe import schema
from zenpipe.embedded import ThrowawayPgBouncer, ThrowawayPostgres, find_pgbouncer


def conninfo(host: str, port: int, user: str, dbname: str) -> str:
    return f"host={host} port={port} user={user} dbname={dbname}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ThrowawayPostgres]:
    """The session's PostgreSQL (Debian's, PG_BINDIR's, or embedded 18 when
    ZENPIPE_PG_SOURCE=embedded)."""
    with ThrowawayPostgres() as server:
        with psycopg.connect(server.dsn) as conn:
            version = conn.info.server_version
        print(f"\nzenpipe tests on PostgreSQL {version // 10000} ({server.bindir})")
        if os.environ.get("ZENPIPE_PG_SOURCE") == "embedded":
            assert version >= 180000, "the embedded run must test PostgreSQL 18"
        yield server


@pytest.fixture(scope="session")
def pg_base(pg_server: ThrowawayPostgres) -> NoopExecutor:
    return NoopExecutor(
        host=pg_server.host,
        port=pg_server.port,
        user=pg_server.user,
        options="",
        dbname="zen",
    )


def load_schema(host: str, port: int, user: str, dbname: str, **_: Any) -> None:
    schema.apply(conninfo(host, port, user, dbname))


@pytest.fixture(scope="session")
def zen_pg(pg_base: NoopExecutor) -> Iterator[NoopExecutor]:
    """A template database with every migration applied, built once per session."""
    janitor = DatabaseJanitor(
        user=pg_base.user,
        host=pg_base.host,
        port=pg_base.port,
        dbname=pg_base.template_dbname,
        as_template=True,
    )
    with janitor:
        janitor.load(load_schema)
        yield pg_base


postgresql = factories.postgresql("zen_pg")


@pytest.fixture
def dsn(postgresql: psycopg.Connection[Any]) -> str:
    """Connection string of this test's own database (schema applied, no rows)."""
    info = postgresql.info
    return conninfo(info.host, info.port, info.user, info.dbname)


@pytest.fixture
def empty_dsn(pg_base: NoopExecutor) -> Iterator[str]:
    """Connection string of a new, empty database (no migrations applied)."""
    name = f"empty_{uuid.uuid4().hex[:12]}"
    janitor = DatabaseJanitor(
        user=pg_base.user,
        host=pg_base.host,
        port=pg_base.port,
        dbname=name,
        password=None,
    )
    with janitor:
        yield conninfo(pg_base.host, pg_base.port, pg_base.user, name)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _needs_pgbouncer(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    return item.get_closest_marker("pgbouncer") is not None or "pgbouncer" in fixtures


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that reaches PgBouncer through the fixtures is a PgBouncer test even when its
    # author forgot the marker, so that -m "not pgbouncer" and the skip below see it.
    for item in items:
        if _needs_pgbouncer(item) and item.get_closest_marker("pgbouncer") is None:
            item.add_marker(pytest.mark.pgbouncer)


def _citus_missing(item: pytest.Item) -> None:
    """A ``citus`` test needs ZENPIPE_CITUS_SOURCE: skip without it, fail under CI=true."""
    if item.get_closest_marker("citus") is None or os.environ.get("ZENPIPE_CITUS_SOURCE"):
        return
    reason = (
        "ZENPIPE_CITUS_SOURCE not set: Citus tests need a Citus source tarball "
        "(e.g. ../shared/citus/citus-14.0.1.tar.gz); .ci/run runs them with pytest -m citus"
    )
    if _in_ci():
        pytest.fail(f"{reason}, and CI=true", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _citus_missing(item)
    if not _needs_pgbouncer(item) or find_pgbouncer() is not None:
        return
    where = os.environ.get("ZENPIPE_PGBOUNCER_BIN") or "PATH, /usr/sbin, /usr/bin"
    if _in_ci():
        pytest.fail(
            f"pgbouncer not installed ({where}) and CI=true: CI must install it "
            "(apt-get install pgbouncer)",
            pytrace=False,
        )
    pytest.skip(f"pgbouncer not installed ({where}): apt-get install pgbouncer")


def pytest_report_header() -> str:
    return f"zenpipe PostgreSQL source: {os.environ.get('ZENPIPE_PG_SOURCE', 'auto')}"


@pytest.fixture(scope="session")
def pgbouncer(pg_server: ThrowawayPostgres) -> Iterator[ThrowawayPgBouncer]:
    """A real PgBouncer in transaction mode in front of the session's server.

    Tests using it are PgBouncer tests: without the binary they skip outside CI and fail
    under ``CI=true`` (see `pytest_runtest_setup`).
    """
    with ThrowawayPgBouncer(pg_server, pool_mode="transaction") as bouncer:
        yield bouncer


@pytest.fixture
def pgbouncer_dsn(pgbouncer: ThrowawayPgBouncer, postgresql: psycopg.Connection[Any]) -> str:
    """This test's database, reached through PgBouncer in transaction mode.

    Connect with ``prepare_threshold=None``.
    """
    return pgbouncer.dsn_for(postgresql.info.dbname)
