"""The ``zenpipe`` command, run as users run it."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

pytestmark = pytest.mark.pg18


def zenpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zenpipe", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_schema_apply_on_a_throwaway_server_prints_what_it_created() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "ZENPIPE_DSN"}
    done = zenpipe("schema", "apply", env=env)
    assert done.returncode == 0, done.stderr
    assert "throwaway PostgreSQL" in done.stderr
    assert "applied 0001_servers" in done.stdout
    assert "partitions (32): zen_contacts_p0 .. zen_contacts_p31" in done.stdout
    assert "zen_array_union_v1" in done.stdout


def test_schema_apply_and_status_with_dsn(empty_dsn: str) -> None:
    done = zenpipe("schema", "apply", "--dsn", empty_dsn)
    assert done.returncode == 0, done.stderr
    again = zenpipe("schema", "apply", "--dsn", empty_dsn)
    assert again.stdout.strip() == "schema is up to date; nothing applied"
    status = zenpipe("schema", "status", "--dsn", empty_dsn)
    assert "0003_contacts  applied" in status.stdout
    assert "pending" not in status.stdout
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT to_regclass('zen_contacts')").fetchone() == ("zen_contacts",)


def test_bad_dsn_is_a_clear_error() -> None:
    done = zenpipe("schema", "apply", "--dsn", "host=127.0.0.1 port=1 connect_timeout=2")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "port 1" in done.stderr or "connection" in done.stderr.lower()
