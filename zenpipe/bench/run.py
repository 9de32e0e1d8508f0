"""One bench run: database, data, fleet, faults, invariants, report.

`run` makes a database of its own (``zenbench_<random>``: on a throwaway PostgreSQL when
no DSN is given, else on the server the DSN names) and applies the schema; loads the
generated source rows through `zenpipe.Producer`; starts ``servers`` bench servers
(``python -m zenpipe.bench``: a `zenpipe.runtime.Supervisor` of ``workers`` worker
processes each, every one a fleet member with its own pool), injects the faults asked
for while it samples progress and connections; when every row is settled it stops the
servers gracefully, checks the invariants (`zenpipe.bench.invariants`) and drops the
database (and stops the throwaway server): only what it created is removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .. import schema
from ..embedded import ThrowawayPostgres
from ..produce import Producer
from ..queries import load
from ..worker import PARTITION_AFFINITY
from . import data as bench_data
from .faults import KINDS, RATE_KINDS, FaultLog, Schedule, children, signal_all
from .invariants import ClaimRecord, RunFacts, Violation, check
from .proxy import CommitProxy

__all__ = ["BenchConfig", "BenchResult", "run"]

logger = logging.getLogger("zenpipe.bench")

#: zenpipe's own reserve in the fleet budget (`zenpipe.config.Settings.reserved_connections`).
_RESERVE = 5
#: Connections of one worker process: a pool of 3 and its control connection.
_PER_PROCESS = 4


@dataclass
class BenchConfig:
    """Everything a run needs; the CLI's options one to one."""

    rows: int = 10_000
    servers: int = 10
    workers: int = 6
    batch: int = 100
    #: Claimer partition_affinity of every worker (0: claims in plain order).
    affinity: int = PARTITION_AFFINITY
    lease: float = 4.0
    max_attempts: int = 5
    seed: int = 11
    latency: float = 0.0
    fail_rate: float = 0.02
    poison_rate: float = 0.003
    bad_rate: float = 0.02
    crash_rate: float = 0.0
    #: faults per second, per kind of `zenpipe.bench.faults.RATE_KINDS`
    rates: dict[str, float] = field(default_factory=dict)
    restart_postgres: bool = False
    timeout: float = 900.0
    grace: float = 5.0
    keep: bool = False
    #: run the seed and SKIP LOCKED loops too (`zenpipe.bench.baselines.compare`)
    compare: bool = False
    #: time cap of each --compare loop (seconds)
    compare_seconds: float = 600.0
    #: the physical reference (`zenpipe.bench.baselines.physical_reference`)
    reference: bool = True
    #: the crash-safe floor (`zenpipe.bench.baselines.crash_safe_floor`), in this many
    #: sessions at the run's batch size (0: not run)
    floor_sessions: int = 0
    #: test-only: drop an item of every merged array after the run (a writer that
    #: skipped the union); the invariant check must catch it
    broken_merge: bool = False

    @property
    def proxied(self) -> bool:
        return any(self.rates.get(k, 0) > 0 for k in ("drop_commit_acks", "cut_before_commit"))


@dataclass
class BenchResult:
    report: dict[str, Any]
    violations: list[Violation]

    @property
    def ok(self) -> bool:
        return not self.violations


class _Events:
    """Tails the worker processes' JSON-lines files (`zenpipe.bench.enrich`)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}
        self.batches: list[dict[str, Any]] = []
        self.claims: list[ClaimRecord] = []
        self.crashes: list[dict[str, Any]] = []
        self.rss: dict[int, int] = {}  # pid -> peak KiB
        self.pid_server: dict[int, int] = {}
        self.starts = 0
        #: wall-clock time of the first row any worker claimed (None before it)
        self.first_claim: float | None = None

    def read(self) -> list[dict[str, Any]]:
        new: list[dict[str, Any]] = []
        for name in os.listdir(self.folder):
            if not name.endswith(".jsonl"):
                continue
            path = os.path.join(self.folder, name)
            pid = int(name.split(".")[0])
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets.get(name, 0))
                    chunk = f.read()
            except OSError:
                continue
            self._offsets[name] = self._offsets.get(name, 0) + len(chunk)
            chunk = self._partial.pop(name, b"") + chunk
            lines = chunk.split(b"\n")
            if lines[-1]:
                self._partial[name] = lines[-1]
            for raw in lines[:-1]:
                if not raw:
                    continue
                line = orjson.loads(raw)
                line["pid"] = pid
                new.append(line)
        for line in new:
            kind = line["k"]
            if kind == "c":
                self.claims.append(ClaimRecord(line["id"], line["tok"], line["cid"]))
                if self.first_claim is None or line["t"] < self.first_claim:
                    self.first_claim = line["t"]
            elif kind == "b":
                self.batches.append(line)
                self.rss[line["pid"]] = max(self.rss.get(line["pid"], 0), line["rss"])
            elif kind == "crash":
                self.crashes.append(line)
            elif kind == "start":
                self.starts += 1
                self.pid_server[line["pid"]] = line["s"]
        return new


@dataclass
class _Server:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None
    stopped_until: float | None = None
    starts: int = 0


def _dbname(conninfo: str) -> str:
    return str(conninfo_to_dict(conninfo).get("dbname") or "")


@contextlib.contextmanager
def _database(
    dsn: str | None, config: BenchConfig
) -> Iterator[tuple[str, ThrowawayPostgres | None, str]]:
    """A database of the run's own (and the throwaway server it lives on); dropped at
    the end.  Yields its DSN, the server and the server's admin DSN."""
    name = f"zenbench_{secrets.token_hex(4)}"
    q = load("bench")
    server: ThrowawayPostgres | None = None
    if dsn is None:
        need = config.servers * config.workers * _PER_PROCESS
        server = ThrowawayPostgres(settings={"max_connections": str(max(200, need * 2 + 40))})
        server.start()
        admin = server.dsn
    else:
        admin = dsn
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(q["create_database"].format(name=sql.Identifier(name)))
        try:
            yield make_conninfo(admin, dbname=name), server, admin
        finally:
            if not config.keep:
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(q["drop_database"].format(name=sql.Identifier(name)))
    finally:
        if server is not None and not config.keep:
            server.stop()


class _Sampler:
    """The bench's own direct connection: progress, connections, terminations; it
    reconnects after a PostgreSQL restart."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self.q = load("bench")

    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self.dsn, autocommit=True, application_name="zenbench", connect_timeout=5
            )
        return self._conn

    def one(self, name: str, params: dict[str, Any] | None = None) -> tuple[Any, ...] | None:
        try:
            row = self.conn().execute(self.q[name], params).fetchone()
        except psycopg.Error:
            self.close()
            return None
        return None if row is None else tuple(row)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


def _load(dsn: str, dataset: bench_data.Dataset) -> float:
    started = time.monotonic()
    with Producer(dsn, batch_size=5000) as producer:
        for row in dataset.rows:
            producer.add(row.link, row.data, priority=row.priority)
    return time.monotonic() - started


def run(
    config: BenchConfig,
    *,
    dsn: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    corrupt: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the bench; return the report and the violated invariants.

    *dsn*: a server to run on (in a database of the run's own); None: a throwaway
    PostgreSQL.  *on_progress* is called about twice a second with the live figures.
    *corrupt* (tests only) is called with the database's DSN after the fleet stopped
    and before the invariants are checked.
    """
    if config.restart_postgres and dsn is not None:
        raise ValueError("--restart-postgres needs the throwaway server (no --dsn)")
    dataset = bench_data.generate(
        config.rows,
        seed=config.seed,
        bad_rate=config.bad_rate,
        poison_rate=config.poison_rate,
        fail_rate=config.fail_rate,
        crash_rate=config.crash_rate,
    )
    expected = bench_data.expect(dataset)
    folder = tempfile.mkdtemp(prefix="zenbench-")
    events_dir = os.path.join(folder, "events")
    os.mkdir(events_dir)
    try:
        if config.broken_merge and corrupt is None:
            corrupt = _break_merge
        with _database(dsn, config) as (bench_dsn, server, admin):
            result = _run_on(
                config=config, bench_dsn=bench_dsn, pg=server, dataset=dataset,
                expected=expected, events_dir=events_dir, folder=folder,
                on_progress=on_progress, corrupt=corrupt,
            )  # fmt: skip
            _baselines(config, admin, dataset, expected, result.report)
    finally:
        if not config.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return result


def _run_on(
    *,
    config: BenchConfig,
    bench_dsn: str,
    pg: ThrowawayPostgres | None,
    dataset: bench_data.Dataset,
    expected: bench_data.Expected,
    events_dir: str,
    folder: str,
    on_progress: Callable[[dict[str, Any]], None] | None,
    corrupt: Callable[[str], None] | None,
) -> BenchResult:
    q = load("bench")
    applied = schema.apply(bench_dsn)
    with psycopg.connect(bench_dsn, autocommit=True) as conn:
        conn.execute(
            q["bench_settings"],
            {"max_attempts": config.max_attempts, "retry_base": 0.05, "retry_max": 0.5},
        )
    load_seconds = _load(bench_dsn, dataset)
    params = conninfo_to_dict(bench_dsn)
    proxy: CommitProxy | None = None
    worker_dsn = bench_dsn
    if config.proxied:
        proxy = CommitProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
        worker_dsn = make_conninfo(bench_dsn, host="127.0.0.1", port=str(proxy.port))
    env = dict(
        os.environ,
        ZENPIPE_DSN=worker_dsn,
        ZENPIPE_BENCH_EVENTS=events_dir,
        ZENPIPE_BENCH_LATENCY=str(config.latency),
        ZENPIPE_LISTEN="off",
        ZENPIPE_POOL_MAX="3",
        ZENPIPE_POOL_FLOOR="1",
        ZENPIPE_HEARTBEAT_INTERVAL="1",
        ZENPIPE_HEARTBEAT_MISSES="3",
    )
    env.pop("ZENPIPE_SERVER_ID", None)
    servers = [_Server(i) for i in range(config.servers)]
    log_path = os.path.join(folder, "servers.log")
    log = open(log_path, "ab")  # noqa: SIM115  (closed below)
    events = _Events(events_dir)
    faults = FaultLog()
    schedule = Schedule(config.rates, seed=config.seed)
    sampler = _Sampler(bench_dsn)
    budget_row = sampler.one("budget", {"reserve": _RESERVE})
    budget = int(budget_row[0]) if budget_row else 0
    timeline: list[dict[str, Any]] = []
    peak = 0
    processes_killed = 0
    restarted_pg = False

    def spawn(s: _Server) -> None:
        s.starts += 1
        spec = {
            "server": s.index,
            "workers": config.workers,
            "restart_window": 3.0,
            "process": {
                "index": 0,
                "target": "zenpipe.bench.enrich:enrich",
                "batch_size": config.batch,
                "partition_affinity": config.affinity,
                "lease_seconds": config.lease,
                "max_attempts": None,  # the bench's zen_settings decide
                "idle_sleep": 0.2,
                "grace": config.grace,
                "on_event": "zenpipe.bench.enrich:on_event",
            },
        }
        s.proc = subprocess.Popen(
            [sys.executable, "-m", "zenpipe.bench", json.dumps(spec)],
            env=dict(env, ZENPIPE_BENCH_SERVER=str(s.index)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            process_group=0,
        )
        s.restart_at = None

    def alive(s: _Server) -> bool:
        return s.proc is not None and s.proc.poll() is None

    def inject(kind: str, t: float) -> bool:
        """Inject one fault of *kind*; False when it found nothing to hit."""
        nonlocal processes_killed
        running = [s for s in servers if alive(s) and s.stopped_until is None]
        if kind == "kill_workers" and running:
            s = servers[schedule.choice([x.index for x in running])]
            assert s.proc is not None
            kids = children(s.proc.pid)
            if kids:
                pid = schedule.choice(kids)
                if signal_all([pid], signal.SIGKILL):
                    processes_killed += 1
                    faults.add(kind, t, f"server {s.index}: worker pid {pid}")
                    return True
        elif kind == "kill_servers" and running:
            s = servers[schedule.choice([x.index for x in running])]
            assert s.proc is not None
            kids = children(s.proc.pid)
            signal_all([s.proc.pid, *kids], signal.SIGKILL)
            s.proc.wait()
            processes_killed += len(kids)
            s.restart_at = time.monotonic() + 0.5
            faults.add(kind, t, f"server {s.index}: supervisor and {len(kids)} workers")
            return True
        elif kind == "stop_servers" and running and all(x.stopped_until is None for x in servers):
            s = servers[schedule.choice([x.index for x in running])]
            assert s.proc is not None
            signal_all([s.proc.pid, *children(s.proc.pid)], signal.SIGSTOP)
            s.stopped_until = time.monotonic() + config.lease * 1.5
            faults.add(kind, t, f"server {s.index} for {config.lease * 1.5:.1f} s")
            return True
        elif kind == "terminate_backends":
            hit = False
            try:
                pids = [r[0] for r in sampler.conn().execute(q["zenpipe_backends"], {"n": 3})]
                for pid in pids:
                    sampler.conn().execute(q["terminate"], {"pid": pid})
                    faults.add(kind, t, f"backend {pid}")
                    hit = True
            except psycopg.Error:
                sampler.close()
            return hit
        elif kind in ("drop_commit_acks", "cut_before_commit") and proxy and proxy.armed < 2:
            proxy.arm("drop_ack" if kind == "drop_commit_acks" else "cut")
            return True
        return False

    for s in servers:
        spawn(s)
    t0 = time.monotonic()
    wall0 = time.time()
    settled = 0
    total = len(dataset.rows)
    last_sample = 0.0
    timed_out = False
    try:
        while True:
            now = time.monotonic()
            t = now - t0
            events.read()
            for s in servers:
                if s.stopped_until is not None and now >= s.stopped_until:
                    if s.proc is not None:
                        signal_all([s.proc.pid, *children(s.proc.pid)], signal.SIGCONT)
                    s.stopped_until = None
                if s.proc is not None and s.proc.poll() is not None and s.restart_at is None:
                    logger.warning("bench server %d exited with %s; restarting", s.index,
                                   s.proc.returncode)  # fmt: skip
                    s.restart_at = now + 0.5
                if s.restart_at is not None and now >= s.restart_at:
                    spawn(s)
            for kind in schedule.due(t):
                if not inject(kind, t):
                    schedule.missed(kind, t)
            if (
                config.restart_postgres
                and not restarted_pg
                and pg is not None
                and settled >= total * 0.3
            ):
                restarted_pg = True
                faults.add("restart_postgres", t, "immediate")
                sampler.close()
                pg.restart(mode="immediate")
            if now - last_sample >= 0.5:
                last_sample = now
                prog = sampler.one("progress", {"total": total})
                conns = sampler.one("connections")
                if prog is not None:
                    settled = int(prog[0])
                if conns is not None:
                    peak = max(peak, int(conns[0]))
                point = {
                    "t": round(t, 2),
                    "settled": settled,
                    "connections": int(conns[0]) if conns else None,
                    "faults": faults.total() + len(events.crashes) + _fired(proxy),
                }
                timeline.append(point)
                if on_progress is not None:
                    on_progress(
                        _live(point, timeline, total, events, faults, proxy, (peak, budget))
                    )
            if settled >= total:
                break
            if t > config.timeout:
                timed_out = True
                break
            time.sleep(0.1)  # pacing of the sampling loop only; never for correctness
    finally:
        _stop_servers(servers, config)
        log.close()
    events.read()
    stop_seconds = time.monotonic() - t0
    _wait_registry(sampler, timeout=10.0)
    if proxy is not None:
        for at, mode in proxy.fired:
            kind = "drop_commit_acks" if mode == "drop_ack" else "cut_before_commit"
            faults.add(kind, at - wall0, "")
        proxy.close()
    for line in events.crashes:
        faults.add("crash_rows", line["t"] - wall0, f"row {line['id']} killed pid {line['pid']}")
    processes_killed += len(events.crashes)
    if corrupt is not None:
        corrupt(bench_dsn)
    wall_seconds = timeline[-1]["t"] if timeline else stop_seconds
    # The fleet's start-up (60 Python processes importing psycopg and connecting: about
    # 20 s on 2 cores at 10 x 6) is reported on its own; the throughput counts from the
    # first claim, as the physical reference's clock starts with its data built.
    startup = 0.0
    if events.first_claim is not None:
        startup = min(max(0.0, events.first_claim - wall0), wall_seconds)
    with psycopg.connect(bench_dsn, autocommit=True) as conn:
        parked_by_faults = frozenset(
            n
            for (n,) in conn.execute(q["parked_by_expiry"]).fetchall()
            if dataset.rows[n].kind not in ("poison", "crash")
        )
        if parked_by_faults and (processes_killed or faults.counts()["stop_servers"]):
            # the claimer parks a row whose lease ran out while it was claimed alone
            # max_attempts times (docs/claiming.md): under kill faults a good row can be
            # so unlucky; it is then parked with that reason and has no effect.
            expected = bench_data.expect(dataset, parked_by_faults)
        facts = RunFacts(events.claims, peak, budget, processes_killed)
        violations = check(conn, dataset, expected, facts)
        partitions: dict[str, int] = dict(conn.execute(q["partition_counts"]).fetchall())
        totals = conn.execute(q["claim_totals"]).fetchone()
        summary = conn.execute(q["summary"]).fetchone()
    if timed_out:
        violations.insert(
            0, Violation("rows_settled", total - settled, [f"timed out after {config.timeout} s"])
        )
    sampler.close()
    from .report import build  # noqa: PLC0415  (report imports run's types)

    report = build(
        config=config,
        dataset=dataset,
        seconds=wall_seconds - startup,
        startup_seconds=startup,
        load_seconds=load_seconds,
        events=events,
        faults=faults,
        timeline=timeline,
        peak=peak,
        budget=budget,
        partitions=partitions,
        claim_totals=totals,
        violations=violations,
        mode="throwaway" if pg is not None else "dsn",
        applied=len(applied),
        logs=os.path.join(folder, "servers.log") if config.keep else None,
    )
    report["parked_by_faults"] = sorted(parked_by_faults)
    if summary is not None:
        done, parked, left_over, contacts, rejects = (int(x) for x in summary)
        report["checks"] = {
            "rows_done": done,
            "rows_parked_failed": parked,
            "rows_left": left_over,
            "contacts": contacts,
            "expected_contacts": len(expected.contacts),
            "rejects": rejects,
            "expected_rejects": sum(expected.rejects.values()),
        }
    return BenchResult(report, violations)


def _break_merge(dsn: str) -> None:
    """``--broken-merge`` (tests): leave what a writer that skipped the union would."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(load("bench")["broken_merge"])


def _baselines(config: BenchConfig, admin: str, dataset: bench_data.Dataset,
               expected: bench_data.Expected, report: dict[str, Any]) -> None:  # fmt: skip
    """The physical reference, (--floor) the crash-safe floor and (--compare) the
    baseline loops, on the same server
    after the fleet's run, each in a fresh database; their figures and zenpipe's ratio
    to each go into *report*."""
    from . import baselines  # noqa: PLC0415  (imports run's neighbours only when used)

    rate = report.get("rows_per_s") or 0.0
    if config.reference:
        ref = baselines.physical_reference(admin, dataset, expected)
        wall = report.get("wall_rows_per_s") or 0.0
        per_s = ref["rows_per_s"]
        ref["zenpipe_ratio"] = round(rate / per_s, 3) if per_s else None
        ref["zenpipe_wall_ratio"] = round(wall / per_s, 3) if per_s else None
        report["physical_reference"] = ref
    if config.floor_sessions > 0:
        floor = baselines.crash_safe_floor(
            admin, dataset, expected, sessions=config.floor_sessions, batch=config.batch
        )
        per_s = floor["rows_per_s"]
        floor["zenpipe_ratio"] = round(rate / per_s, 3) if per_s else None
        ref_per_s = report.get("physical_reference", {}).get("rows_per_s")
        floor["reference_ratio"] = round(per_s / ref_per_s, 3) if per_s and ref_per_s else None
        report["crash_safe_floor"] = floor
    if config.compare:
        found = baselines.compare(
            admin, dataset, expected, processes=config.servers * config.workers,
            batch=config.batch, lease=config.lease, latency=config.latency,
            cap=config.compare_seconds,
        )  # fmt: skip
        for b in found:
            b["zenpipe_ratio"] = round(rate / b["rows_per_s"], 2) if b["rows_per_s"] else None
        report["baselines"] = found


def _fired(proxy: CommitProxy | None) -> int:
    return len(proxy.fired) if proxy is not None else 0


def _live(point: dict[str, Any], timeline: list[dict[str, Any]], total: int, events: _Events,  # noqa: PLR0917
          faults: FaultLog, proxy: CommitProxy | None,
          peak_budget: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
    window = [p for p in timeline if p["t"] >= point["t"] - 5]
    if len(window) < 2:  # samples further apart than the window (a slow, busy server)
        window = timeline[-2:]
    rate = 0.0
    if len(window) > 1 and window[-1]["t"] > window[0]["t"]:
        rate = (window[-1]["settled"] - window[0]["settled"]) / (window[-1]["t"] - window[0]["t"])
    counts = faults.counts()
    counts["crash_rows"] = len(events.crashes)
    if proxy is not None:
        counts["drop_commit_acks"] = sum(1 for _, m in proxy.fired if m == "drop_ack")
        counts["cut_before_commit"] = sum(1 for _, m in proxy.fired if m == "cut")
    errors = sum(1 for b in events.batches if b["outcome"] != "settled")
    return {
        "t": point["t"],
        "settled": point["settled"],
        "total": total,
        "rows_per_s": rate,
        "errors": errors,
        "failed_rows": sum(b["failed"] for b in events.batches),
        "faults": {k: v for k, v in counts.items() if v},
        "connections": point["connections"],
        "peak_connections": peak_budget[0],
        "budget": peak_budget[1],
        "processes": events.starts,
    }


def _stop_servers(servers: list[_Server], config: BenchConfig) -> None:
    """SIGCONT what is stopped, SIGTERM every supervisor (graceful: rows released, fleet
    rows deleted), SIGKILL what is still there after the grace."""
    for s in servers:
        if s.proc is not None and s.proc.poll() is None:
            signal_all([s.proc.pid, *children(s.proc.pid)], signal.SIGCONT)
            s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + config.grace + 20
    for s in servers:
        if s.proc is None:
            continue
        try:
            s.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_all([s.proc.pid, *children(s.proc.pid)], signal.SIGKILL)
            s.proc.wait()


def _wait_registry(sampler: _Sampler, *, timeout: float) -> None:
    """Wait until no live zen_servers row is left (a killed member's row expires after
    its heartbeat lease), at most *timeout* seconds; the invariant check decides."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = sampler.conn().execute(sampler.q["live_servers"]).fetchall()
        except psycopg.Error:
            sampler.close()
            rows = [("?",)]
        if not rows:
            return
        threading.Event().wait(0.2)


def config_dict(config: BenchConfig) -> dict[str, Any]:
    d = asdict(config)
    d["rates"] = {k: config.rates.get(k, 0.0) for k in RATE_KINDS}
    d["kinds"] = list(KINDS)
    return d
