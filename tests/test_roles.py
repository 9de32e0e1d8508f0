"""Least-privilege roles (zenpipe.roles): each can do its job and nothing more."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest

from zenpipe import cli, dashboard, stats
from zenpipe.retention import prune
from zenpipe.roles import create_roles
from zenpipe.worker import Worker


def as_role(dsn: str, role: str) -> str:
    return f"{dsn} options='-c role={role}'"


def refused(conn: psycopg.Connection[Any], statement: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_worker_role_claims_upserts_registers_and_nothing_more(dsn: str) -> None:
    create_roles(dsn)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "INSERT INTO results (link, data) SELECT 'https://maps.example.com/' || g,"
            " '{}' FROM generate_series(1, 25) g"
        )
    worker_dsn = as_role(dsn, "zen_worker")
    with Worker(
        worker_dsn,
        lambda c: {"source_link": c.link, "emails": ["a@b.example"]},
        server_id="w",
        batch_size=10,
    ) as w:
        w.run(until_idle=True)
    assert w.stats.written == 25 and w.stats.failed == 0
    with psycopg.connect(worker_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("zen_worker",)
        conn.execute(  # fleet registration, heartbeat, leave
            "INSERT INTO zen_servers (server_id, host, pid, pool_size, version)"
            " VALUES ('w1', 'h', 1, 2, 'x')"
        )
        conn.execute("UPDATE zen_servers SET last_heartbeat = now() WHERE server_id = 'w1'")
        conn.execute("DELETE FROM zen_servers WHERE server_id = 'w1'")
        conn.execute("INSERT INTO results (link, data) VALUES ('https://load.example/1', '{}')")
        for statement in (
            "DROP TABLE results",
            "ALTER TABLE results ADD COLUMN x int",
            "TRUNCATE results",
            "DELETE FROM results",
            "DELETE FROM zen_contacts",
            "CREATE TABLE mine (i int)",
            "SELECT zen_refresh_dashboard_v1()",
            "UPDATE zen_settings SET max_attempts = 1",
            "CREATE INDEX ON zen_jobs (worker)",
        ):
            refused(conn, statement)


def test_reader_role_reads_the_dashboard_and_stats_only(dsn: str) -> None:
    create_roles(dsn)
    with psycopg.connect(as_role(dsn, "zen_reader"), autocommit=True) as conn:
        board = dashboard.read(conn)
        assert board.figures["source_total"] == 0
        status, _ = stats.fleet_overview(conn)
        assert status.totals()["live_servers"] == 0
        assert stats.hours(conn, 24) == []
        for statement in (
            "SELECT * FROM results",
            "SELECT * FROM zen_contacts",
            "INSERT INTO zen_stats_hourly (hour, server_id) VALUES (now(), 's')",
            "SELECT zen_refresh_dashboard_v1()",
            "DROP MATERIALIZED VIEW zen_mv_dashboard",
        ):
            refused(conn, statement)


def test_admin_role_operates_but_cannot_alter_or_drop(dsn: str) -> None:
    create_roles(dsn)
    admin_dsn = as_role(dsn, "zen_admin")
    dashboard.refresh(admin_dsn)
    stats.rollup(admin_dsn)
    prune(admin_dsn, older_than=timedelta(days=1))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("UPDATE zen_settings SET max_attempts = 4")
        for statement in (
            "DROP TABLE results",
            "ALTER TABLE zen_contacts ADD COLUMN x int",
            "DROP MATERIALIZED VIEW zen_mv_dashboard",
        ):
            refused(conn, statement)


def test_roles_command_is_idempotent(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["roles", "create", "--dsn", dsn]) == 0
    assert cli.main(["roles", "create", "--dsn", dsn]) == 0
    assert "none (all existed)" in capsys.readouterr().out
