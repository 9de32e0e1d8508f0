"""``zenpipe doctor``: health checks of a zenpipe database, one line per check.

Each `Check` has a status (``OK``, ``WARN``, ``FAIL``, or ``SKIP`` when it cannot run
here, such as ``pg_stat_statements`` on a server that does not load it), a summary,
details, and the SQL it ran, so an operator can run the same query by hand.  Every
check reads catalogs, statistics views or a partial index: none scans a big table.
Thresholds are in `Thresholds` (tests provoke each condition with small ones).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ._ops import Conn, connect
from .config import Settings
from .locks import NAMESPACE_MIGRATION, ZENPIPE_NAMESPACES
from .pool import Budget
from .queries import load

__all__ = ["Check", "Report", "Thresholds", "run"]

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
_RANK = {OK: 0, SKIP: 0, WARN: 1, FAIL: 2}


@dataclass(frozen=True)
class Thresholds:
    """When a check warns or fails.  Seconds, ratios (0..1) and counts."""

    #: Dead tuples / (live + dead) of a table, counted once it has min_dead dead tuples.
    dead_ratio_warn: float = 0.2
    dead_ratio_fail: float = 0.5
    min_dead: int = 10_000
    #: Age of the oldest open transaction.
    xact_age_warn: float = 300.0
    xact_age_fail: float = 3600.0
    #: Time a session has been idle inside a transaction.
    idle_in_tx_warn: float = 10.0
    idle_in_tx_fail: float = 300.0
    #: Seconds a zenpipe advisory lock may be held by a session idle in a transaction.
    lock_idle_warn: float = 10.0
    #: Expired leases and parked rows: warn from this many.
    expired_leases_warn: int = 1
    parked_warn: int = 1
    #: Never-scanned, non-unique indexes of at least this size are reported.
    unused_index_bytes: int = 10 * 1024 * 1024
    #: Connections used / allowed.
    connections_warn: float = 0.8
    connections_fail: float = 0.95
    #: Largest partition / mean partition, once the table has min_partition_rows rows.
    partition_skew_warn: float = 1.5
    min_partition_rows: int = 3200
    #: Statements listed from pg_stat_statements.
    top_statements: int = 5


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    summary: str
    sql: str
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.summary}"


@dataclass(frozen=True)
class Report:
    checks: list[Check]

    @property
    def status(self) -> str:
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=OK)

    @property
    def exit_code(self) -> int:
        """1 when any check failed, else 0 (warnings do not fail a cron job)."""
        return 1 if self.status == FAIL else 0

    def by_name(self) -> dict[str, Check]:
        return {c.name: c for c in self.checks}

    def render(self, *, show_sql: bool = True) -> str:
        lines: list[str] = []
        for c in self.checks:
            lines.append(c.line())
            lines += [f"        {d}" for d in c.details]
            if show_sql:
                lines += [f"        | {ln}" for ln in c.sql.splitlines()]
        lines.append(f"doctor: {self.status}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {"status": self.status, "checks": [asdict(c) for c in self.checks]},
            indent=2,
            default=str,
        )


def _worst(*statuses: str) -> str:
    return max(statuses, key=_RANK.__getitem__, default=OK)


def _rows(conn: Conn, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(load("doctor")[name], params).fetchall()


def _sql(name: str) -> str:
    return load("doctor")[name].as_string(None)


def check_vacuum(conn: Conn, t: Thresholds) -> Check:
    rows = _rows(conn, "vacuum")
    status, details = OK, []
    for r in rows:
        live, dead = int(r["n_live_tup"]), int(r["n_dead_tup"])
        ratio = dead / (live + dead) if live + dead else 0.0
        last = r["last_autovacuum"] or r["last_vacuum"]
        level = OK
        if dead >= t.min_dead:
            level = (
                FAIL if ratio >= t.dead_ratio_fail else WARN if ratio >= t.dead_ratio_warn else OK
            )
        if level != OK or r["relname"] == "results":
            details.append(
                f"{level} {r['relname']}: {dead:,} dead / {live:,} live ({ratio:.0%}), "
                f"last vacuum {last or 'never'}, autovacuums {r['autovacuum_count']}"
            )
        status = _worst(status, level)
    bad = sum(1 for d in details if not d.startswith(OK))
    summary = (
        f"{len(rows)} tables checked (results + zen_contacts partitions); {bad} above "
        f"{t.dead_ratio_warn:.0%} dead tuples"
    )
    return Check("vacuum", status, summary, _sql("vacuum"), details)


def check_transactions(conn: Conn, t: Thresholds) -> list[Check]:
    rows = _rows(conn, "transactions")
    sql = _sql("transactions")
    if rows:
        o = rows[0]
        age = float(o["xact_age"])
        status = FAIL if age >= t.xact_age_fail else WARN if age >= t.xact_age_warn else OK
        pins = "xid" if o["has_xid"] else "snapshot" if o["has_xmin"] else "nothing"
        oldest = Check(
            "oldest_transaction",
            status,
            f"pid {o['pid']} ({o['application_name'] or o['usename']}) open {age:.1f} s, "
            f"holds {pins}, state {o['state']}",
            sql,
            [f"query: {o['query']}"],
        )
    else:
        oldest = Check("oldest_transaction", OK, "no open transaction", sql)
    idle = [r for r in rows if str(r["state"]).startswith("idle in transaction")]
    worst = max((float(r["state_age"]) for r in idle), default=0.0)
    status = (
        FAIL if worst >= t.idle_in_tx_fail else WARN if idle and worst >= t.idle_in_tx_warn else OK
    )
    details = [
        f"pid {r['pid']} ({r['application_name'] or r['usename']}) idle "
        f"{float(r['state_age']):.1f} s in a transaction open {float(r['xact_age']):.1f} s: "
        f"{r['query']}"
        for r in idle
    ]
    idle_check = Check(
        "idle_in_transaction",
        status,
        f"{len(idle)} session(s) idle in a transaction (longest {worst:.1f} s)",
        sql,
        details,
    )
    return [oldest, idle_check]


def check_advisory_locks(conn: Conn, t: Thresholds) -> Check:
    rows = _rows(conn, "advisory_locks", {"namespaces": list(ZENPIPE_NAMESPACES)})
    status, details = OK, []
    for r in rows:
        state = str(r["state"])
        if state == "idle" and r["namespace"] != NAMESPACE_MIGRATION:
            level, why = FAIL, "session lock left behind by an idle session"
        elif state == "idle" or (
            state.startswith("idle in") and r["state_age"] >= t.lock_idle_warn
        ):
            level, why = WARN, f"held by a session {state} for {float(r['state_age']):.1f} s"
        else:
            level, why = OK, "in flight"
        status = _worst(status, level)
        details.append(
            f"{level} pid {r['pid']} ({r['application_name']}) namespace {r['namespace']:#x} "
            f"key {r['key2']}: {why}"
        )
    leftover = sum(1 for d in details if not d.startswith(OK))
    return Check(
        "advisory_locks",
        status,
        f"{len(rows)} zenpipe advisory lock(s) held, {leftover} left over",
        _sql("advisory_locks"),
        details,
    )


def check_leases(conn: Conn, t: Thresholds) -> list[Check]:
    [r] = _rows(conn, "leases")
    sql = _sql("leases")
    expired, parked = int(r["expired"]), int(r["parked"])
    return [
        Check(
            "expired_leases",
            WARN if expired >= t.expired_leases_warn else OK,
            f"{expired} claimed row(s) past their lease"
            + (
                f" (oldest expired {r['oldest_expired']}): a worker died or hangs"
                if expired
                else ""
            ),
            sql,
        ),
        Check(
            "parked_rows",
            WARN if parked >= t.parked_warn else OK,
            f"{parked} row(s) parked as failed" + (" (zenpipe requeue)" if parked else ""),
            sql,
        ),
    ]


def check_indexes(conn: Conn, t: Thresholds) -> list[Check]:
    invalid = _rows(conn, "invalid_indexes")
    dups = _rows(conn, "duplicate_indexes")
    unused = _rows(conn, "unused_indexes", {"min_bytes": t.unused_index_bytes})
    return [
        Check(
            "invalid_indexes",
            FAIL if invalid else OK,
            f"{len(invalid)} invalid index(es)"
            + (": drop and rebuild (an interrupted CREATE INDEX CONCURRENTLY)" if invalid else ""),
            _sql("invalid_indexes"),
            [
                f"{r['nspname']}.{r['index']} on {r['table_name']}: {r['definition']}"
                for r in invalid
            ],
        ),
        Check(
            "duplicate_indexes",
            WARN if dups else OK,
            f"{len(dups)} duplicate index(es)",
            _sql("duplicate_indexes"),
            [f"{r['duplicate']} duplicates {r['kept']} on {r['table_name']}" for r in dups],
        ),
        Check(
            "unused_indexes",
            WARN if unused else OK,
            f"{len(unused)} never-scanned index(es) of {t.unused_index_bytes:,} bytes or more",
            _sql("unused_indexes"),
            [
                f"{r['index']} on {r['table_name']}: {int(r['bytes']):,} bytes, 0 scans"
                for r in unused
            ],
        ),
    ]


def check_connections(conn: Conn, t: Thresholds, settings: Settings) -> Check:
    [r] = _rows(conn, "connections")
    budget = Budget(
        int(r["max_connections"]),
        int(r["superuser_reserved"]),
        int(r["reserved"]),
        settings.reserved_connections,
        settings.fleet_budget,
    )
    allowed = max(1, budget.max_connections - budget.superuser_reserved - budget.pg_reserved)
    used, fleet = int(r["used"]), int(r["fleet_connections"])
    ratio = used / allowed
    status = FAIL if ratio >= t.connections_fail else WARN if ratio >= t.connections_warn else OK
    fleet_ratio = fleet / budget.total if budget.total else 1.0
    fleet_status = (
        FAIL if fleet > budget.total else WARN if fleet_ratio >= t.connections_warn else OK
    )
    return Check(
        "connections",
        _worst(status, fleet_status),
        f"{used} of {allowed} connections in use ({ratio:.0%}); fleet: {r['live_servers']} live "
        f"server(s) hold {fleet} of a budget of {budget.total} ({fleet_ratio:.0%})",
        _sql("connections"),
        [budget.explain()],
    )


def check_partition_balance(conn: Conn, t: Thresholds) -> Check:
    rows = _rows(conn, "partition_balance")
    counts = [int(r["rows"]) for r in rows]
    total = sum(counts)
    mean = total / len(counts) if counts else 0.0
    biggest = max(rows, key=lambda r: int(r["rows"]), default=None)
    skew = (int(biggest["rows"]) / mean) if biggest and mean else 1.0
    status = WARN if total >= t.min_partition_rows and skew >= t.partition_skew_warn else OK
    largest = biggest["partition"] if biggest else "-"
    summary = (
        f"{len(rows)} partitions, about {total:,} rows, largest {largest} at {skew:.2f}x the mean"
        + ("" if total >= t.min_partition_rows else " (too few rows to judge)")
    )
    return Check("partition_balance", status, summary, _sql("partition_balance"))


def check_statements(conn: Conn, t: Thresholds) -> Check:
    sql = _sql("pg_stat_statements_top")
    row = conn.execute(load("doctor")["pg_stat_statements_installed"]).fetchone()
    if not (row and row[0]):
        return Check(
            "pg_stat_statements",
            SKIP,
            "extension not installed here: add it to shared_preload_libraries and "
            "CREATE EXTENSION pg_stat_statements to see the top statements",
            _sql("pg_stat_statements_installed"),
        )
    try:
        with conn.transaction():
            top = _rows(conn, "pg_stat_statements_top", {"limit": t.top_statements})
    except psycopg.errors.ObjectNotInPrerequisiteState as e:  # installed, not preloaded
        return Check("pg_stat_statements", SKIP, f"installed but not loaded: {e}".strip(), sql)
    details = [
        f"{float(r['total_ms']):,.1f} ms total, {r['calls']} calls, {float(r['mean_ms']):.2f} ms "
        f"mean: {r['query']}"
        for r in top
    ]
    return Check("pg_stat_statements", OK, f"top {len(top)} statements by total time", sql, details)


def run(
    dsn_or_conn: str | Conn,
    thresholds: Thresholds | None = None,
    *,
    settings: Settings | None = None,
) -> Report:
    """Run every check on the database; never raises for a check's finding (a check
    whose query fails is reported as FAIL with the error)."""
    t = thresholds or Thresholds()
    s = settings or Settings.from_env(dsn="")
    if isinstance(dsn_or_conn, str):
        with connect(dsn_or_conn, purpose="doctor", statement_timeout=30.0) as conn:
            return _run(conn, t, s)
    return _run(dsn_or_conn, t, s)


def _run(conn: Conn, t: Thresholds, s: Settings) -> Report:
    steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
        ("vacuum", lambda: check_vacuum(conn, t)),
        ("transactions", lambda: check_transactions(conn, t)),
        ("advisory_locks", lambda: check_advisory_locks(conn, t)),
        ("leases", lambda: check_leases(conn, t)),
        ("indexes", lambda: check_indexes(conn, t)),
        ("connections", lambda: check_connections(conn, t, s)),
        ("partition_balance", lambda: check_partition_balance(conn, t)),
        ("pg_stat_statements", lambda: check_statements(conn, t)),
    ]
    checks: list[Check] = []
    for name, step in steps:
        try:
            got = step()
        except psycopg.Error as e:
            checks.append(Check(name, FAIL, f"check could not run: {str(e).strip()}", ""))
            continue
        checks.extend(got if isinstance(got, list) else [got])
    return Report(checks)
