"""`zenpipe doctor`: every check, each provoked on a real server (zenpipe.doctor)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.helpers import wait_for
from zenpipe import cli, doctor, keys
from zenpipe.doctor import Thresholds
from zenpipe.embedded import ThrowawayPostgres
from zenpipe.locks import NAMESPACE_CLAIM


def check(dsn: str, name: str, t: Thresholds | None = None) -> doctor.Check:
    return doctor.run(dsn, t).by_name()[name]


@pytest.fixture
def other(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def test_a_fresh_database_is_healthy_and_every_check_shows_its_sql(dsn: str) -> None:
    report = doctor.run(dsn)
    names = [c.name for c in report.checks]
    assert names == [
        "vacuum",
        "oldest_transaction",
        "idle_in_transaction",
        "advisory_locks",
        "expired_leases",
        "parked_rows",
        "invalid_indexes",
        "duplicate_indexes",
        "unused_indexes",
        "connections",
        "partition_balance",
        "pg_stat_statements",
    ]
    assert all(c.status in ("OK", "SKIP") for c in report.checks), report.render()
    assert all("SELECT" in c.sql for c in report.checks)
    assert report.exit_code == 0


def test_dead_tuples_in_results_are_reported(dsn: str, other: psycopg.Connection[Any]) -> None:
    other.execute("ALTER TABLE results SET (autovacuum_enabled = false)")
    other.execute("INSERT INTO results (data) SELECT '{}' FROM generate_series(1, 2000)")
    other.execute("UPDATE results SET priority = 1")
    other.execute("UPDATE results SET priority = 2")
    t = Thresholds(min_dead=1000)
    got = wait_for(lambda: (c := check(dsn, "vacuum", t)).status == "FAIL" and c)
    assert "results: 4,000 dead" in got.details[0] and "last vacuum never" in got.details[0]


def test_open_and_idle_transactions_are_reported(dsn: str, other: psycopg.Connection[Any]) -> None:
    other.execute("BEGIN")
    other.execute("SELECT pg_current_xact_id()")
    t = Thresholds(xact_age_warn=0.05, idle_in_tx_warn=0.05)
    oldest = wait_for(lambda: (c := check(dsn, "oldest_transaction", t)).status == "WARN" and c)
    assert f"pid {other.info.backend_pid}" in oldest.summary and "holds xid" in oldest.summary
    idle = check(dsn, "idle_in_transaction", t)
    assert idle.status == "WARN" and "1 session(s)" in idle.summary
    other.execute("ROLLBACK")
    assert check(dsn, "idle_in_transaction", t).status == "OK"


def test_a_leftover_advisory_lock_fails(dsn: str, other: psycopg.Connection[Any]) -> None:
    other.execute("SELECT pg_advisory_lock(%s, 42)", (NAMESPACE_CLAIM,))
    got = check(dsn, "advisory_locks")
    assert got.status == "FAIL" and "1 left over" in got.summary
    assert "session lock left behind" in got.details[0]
    other.execute("SELECT pg_advisory_unlock(%s, 42)", (NAMESPACE_CLAIM,))
    assert check(dsn, "advisory_locks").status == "OK"
    assert doctor.run(dsn).exit_code == 0


def test_expired_leases_and_parked_rows_warn(dsn: str, other: psycopg.Connection[Any]) -> None:
    other.execute(
        "INSERT INTO results (data, status, claim_owner, claim_token, lease_until) VALUES"
        " ('{}', 'claimed', 'dead', 1, now() - interval '1 minute')"
    )
    other.execute("INSERT INTO results (data, status) VALUES ('{}', 'failed'), ('{}', 'failed')")
    report = doctor.run(dsn).by_name()
    assert report["expired_leases"].status == "WARN"
    assert report["expired_leases"].summary.startswith("1 claimed row(s) past their lease")
    assert report["parked_rows"].status == "WARN" and "2 row(s)" in report["parked_rows"].summary


def test_invalid_duplicate_and_unused_indexes(dsn: str, other: psycopg.Connection[Any]) -> None:
    other.execute("INSERT INTO zen_jobs (kind, status, finished_at) VALUES ('x', 'done', now())")
    other.execute("INSERT INTO zen_jobs (kind, status, finished_at) VALUES ('x', 'done', now())")
    with pytest.raises(psycopg.errors.UniqueViolation):  # leaves an invalid index behind
        other.execute("CREATE UNIQUE INDEX CONCURRENTLY zen_jobs_kind_bad ON zen_jobs (kind)")
    other.execute(
        "CREATE INDEX results_lease_dup ON results (lease_until) WHERE status = 'claimed'"
    )
    report = doctor.run(dsn, Thresholds(unused_index_bytes=0))
    by = report.by_name()
    assert by["invalid_indexes"].status == "FAIL"
    assert "zen_jobs_kind_bad on zen_jobs" in by["invalid_indexes"].details[0]
    assert by["duplicate_indexes"].status == "WARN"
    assert by["duplicate_indexes"].details == [
        "results_lease_dup duplicates results_lease_idx on results"
    ]
    assert by["unused_indexes"].status == "WARN"
    assert any(d.startswith("results_lease_dup on results") for d in by["unused_indexes"].details)
    assert report.exit_code == 1


def test_connections_against_the_limit_and_the_fleet_budget(
    dsn: str, other: psycopg.Connection[Any]
) -> None:
    assert check(dsn, "connections").status == "OK"
    assert check(dsn, "connections", Thresholds(connections_warn=0.0)).status == "WARN"
    other.execute(  # a fleet that holds more than the budget
        "INSERT INTO zen_servers (server_id, host, pid, pool_size, version, expires_at)"
        " VALUES ('big', 'h', 1, 500, 'x', now() + interval '1 hour')"
    )
    got = check(dsn, "connections")
    assert got.status == "FAIL" and "hold 501 of a budget of" in got.summary


def test_partition_imbalance_warns(dsn: str, other: psycopg.Connection[Any]) -> None:
    links = [f"https://skew.example/{i}" for i in range(20_000)]
    hot = [x for x in links if keys.partition_of(keys.partition_key(x)) == 0][:400]
    rest = links[:3200]
    other.execute(
        "INSERT INTO zen_contacts (partition_key, source_link)"
        " SELECT hashtext(l), l FROM unnest(%s::text[]) AS l ON CONFLICT DO NOTHING",
        (hot + rest,),
    )
    got = wait_for(lambda: (c := check(dsn, "partition_balance")).status == "WARN" and c)
    assert "largest zen_contacts_p0 " in got.summary


def test_pg_stat_statements_is_skipped_when_absent(dsn: str) -> None:
    got = check(dsn, "pg_stat_statements")
    assert got.status == "SKIP" and "not installed" in got.summary


def test_pg_stat_statements_top_statements_when_present(tmp_path: Any) -> None:
    with ThrowawayPostgres(settings={"shared_preload_libraries": "pg_stat_statements"}) as srv:
        with psycopg.connect(srv.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
            conn.execute("SELECT count(*) FROM generate_series(1, 1000)")
        got = doctor.run(srv.dsn, Thresholds(top_statements=50)).by_name()["pg_stat_statements"]
    assert got.status == "OK" and got.details and "generate_series" in "".join(got.details)


def test_doctor_command_text_json_and_exit_code(
    dsn: str, other: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["doctor", "--dsn", dsn]) == 0
    text = capsys.readouterr().out
    assert "OK    vacuum:" in text and "| SELECT" in text and text.rstrip().endswith("doctor: OK")
    other.execute("SELECT pg_advisory_lock(%s, 7)", (NAMESPACE_CLAIM,))
    assert cli.main(["doctor", "--dsn", dsn, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "FAIL"
    [locks] = [c for c in out["checks"] if c["name"] == "advisory_locks"]
    assert locks["status"] == "FAIL" and "pg_locks" in locks["sql"]
