"""The fleet runtime: concurrent enrichment throughput and the idle fleet's load.

Two measurements on one throwaway server, each against a baseline of the same run:

* **Throughput** (issue 9, point 2): ``zenpipe worker`` with 1 server x ``--processes``
  processes x ``--concurrency``, an enrichment that waits ``--latency`` seconds per row
  (I/O, as scraping is), until every row is done. The target is 80% of
  ``processes * concurrency / latency`` rows/s, or of the database's own limit when that
  is lower: the same command with no latency, measured in the same run.
* **Idle load** (point 5): ``--servers`` processes x ``--workers`` idle worker threads
  each (one fleet pool per process), for ``--idle-seconds``: statements per second the
  fleet sends while there is nothing to do, polling every second (before: no LISTEN,
  fixed 1 s interval) and with wake-ups (LISTEN, polling backoff up to ``idle_max``).
  Then a few rows are enqueued and the time until they are done is reported.

``python -m benchmarks.bench_runtime`` writes ``benchmarks/results/bench_runtime.json``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import base_parser, fresh_database, server, write_report

_ENRICH = """
import os, time
LATENCY = float(os.environ.get("BENCH_LATENCY", "0"))

def enrich(claim):
    if LATENCY:
        time.sleep(LATENCY)
    return {"source_link": claim.link, "source_id": claim.id, "country_code": "ID"}

async def enrich_async(claim):
    import asyncio
    if LATENCY:
        await asyncio.sleep(LATENCY)
    return {"source_link": claim.link, "source_id": claim.id, "country_code": "ID"}
"""

_IDLE_SERVER = """
import sys, threading
from zenpipe.config import Settings
from zenpipe.pool import ZenPool
from zenpipe.worker import Worker

dsn, workers, listen = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

def enrich(claim):
    return {"source_link": claim.link, "source_id": claim.id}

settings = Settings(dsn=dsn, pool_max=workers + 1, pool_min=1, listen=listen,
                    heartbeat_interval=5.0)
stop = threading.Event()
with ZenPool(settings) as pool:
    kw = {} if listen else {"idle_max": 1.0}
    ws = [Worker(pool, enrich, server_id=pool.server_id, name=f"w{i}", idle_sleep=1.0, **kw)
          for i in range(workers)]
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in ws]
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.read()
    stop.set()
    if pool.waker() is not None:
        pool.waker().wake()
    for t in threads:
        t.join()
    for w in ws:
        w.close()
"""


def _seed(dsn: str, n: int) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO results (link, data) SELECT 'https://maps.example.com/b' || g, "
            "jsonb_build_object('n', g) FROM generate_series(1, %s) AS g",
            (n,),
        )


def _done(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM results WHERE status = 'done'").fetchone()
    return int(row[0]) if row else 0


def _throughput(
    server_dsn: str, *, rows: int, processes: int, concurrency: int, batch: int,
    latency: float, target: str, folder: Path,
) -> dict[str, Any]:  # fmt: skip
    with fresh_database(server_dsn) as dsn:
        _seed(dsn, rows)
        env = {**os.environ, "ZENPIPE_DSN": dsn, "BENCH_LATENCY": str(latency),
               "PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
        cmd = [sys.executable, "-m", "zenpipe", "worker", f"bench_enrich:{target}",
               "--processes", str(processes), "--concurrency", str(concurrency),
               "--batch", str(batch), "--lease", "60", "--grace", "10"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            # The clock starts at the first row done (process start-up is not throughput).
            while _done(dsn) == 0:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read() if proc.stderr else "worker died")
                time.sleep(0.02)
            t0, n0 = time.monotonic(), _done(dsn)
            while (n := _done(dsn)) < rows:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read() if proc.stderr else "worker died")
                time.sleep(0.05)
            secs = time.monotonic() - t0
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
    return {"rows": rows, "seconds": secs, "rows_per_s": (n - n0) / secs}


def _statements(server_dsn: str, dsn: str) -> int:
    """Statements run so far in *dsn*'s database (read where the extension lives)."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)",
            (dbname,),
        ).fetchone()
    return int(row[0]) if row else 0


def _idle(
    server_dsn: str, *, servers: int, workers: int, seconds: float, listen: bool, warmup: float
) -> dict[str, Any]:
    from zenpipe import enqueue

    with fresh_database(server_dsn) as dsn:
        procs = [
            subprocess.Popen([sys.executable, "-c", _IDLE_SERVER, dsn, str(workers),
                              "1" if listen else "0"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(servers)
        ]  # fmt: skip
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            time.sleep(warmup)  # past the first polls and the backoff's ramp: steady state
            before = _statements(server_dsn, dsn)
            time.sleep(seconds)
            calls = _statements(server_dsn, dsn) - before
            t0 = time.monotonic()
            enqueue(dsn, [{"link": f"https://maps.example.com/i{i}", "data": {}}
                          for i in range(10)])  # fmt: skip
            while _done(dsn) < 10:
                time.sleep(0.01)
            latency = time.monotonic() - t0
        finally:
            for p in procs:
                assert p.stdin is not None
                p.stdin.close()
            for p in procs:
                p.wait(timeout=120)
    return {
        "servers": servers,
        "workers_per_server": workers,
        "listen": listen,
        "statements_per_s": calls / seconds,
        "new_rows_done_after_s": latency,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--servers", type=int, default=10)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--idle-seconds", type=float, default=20.0,
                        help="0: skip the idle measurement")  # fmt: skip
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--idle-warmup", type=float, default=40.0,
                        help="seconds idle before counting")  # fmt: skip
    args = parser.parse_args(argv)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"zenbench-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_enrich.py").write_text(_ENRICH)
    settings = {"shared_preload_libraries": "pg_stat_statements", "max_connections": "200"}
    rows_out: list[dict[str, Any]] = []
    with server(args.dsn, settings) as server_dsn:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        common = {"processes": args.processes, "concurrency": args.concurrency,
                  "batch": args.batch, "folder": folder}  # fmt: skip
        ideal = args.processes * args.concurrency / args.latency
        db_limit = {"rows_per_s": float("nan")}
        if not args.skip_throughput:
            db_limit = _throughput(server_dsn, rows=args.rows, latency=0.0, target="enrich",
                                   **common)  # fmt: skip
        reference = min(ideal, db_limit["rows_per_s"])
        for target in () if args.skip_throughput else ("enrich", "enrich_async"):
            got = _throughput(server_dsn, rows=args.rows, latency=args.latency, target=target,
                              **common)  # fmt: skip
            rows_out.append({
                "measure": f"throughput, {args.latency * 1000:.0f} ms per row, {target}",
                "rows/s": got["rows_per_s"],
                "reference rows/s": reference,
                "ratio": got["rows_per_s"] / reference,
            })  # fmt: skip
        if not args.skip_throughput:
            rows_out.append({"measure": "throughput, no latency (database limit)",
                             "rows/s": db_limit["rows_per_s"], "reference rows/s": ideal,
                             "ratio": db_limit["rows_per_s"] / ideal})  # fmt: skip
        idle = []
        for listen in (False, True) if args.idle_seconds > 0 else ():
            got = _idle(server_dsn, servers=args.servers, workers=args.workers,
                        seconds=args.idle_seconds, listen=listen,
                        warmup=args.idle_warmup)  # fmt: skip
            idle.append(got)
            rows_out.append({
                "measure": f"idle {args.servers}x{args.workers}, "
                           + ("LISTEN + backoff" if listen else "polling every 1 s"),
                "rows/s": got["statements_per_s"],
                "reference rows/s": got["new_rows_done_after_s"],
                "ratio": got["statements_per_s"] / max(idle[0]["statements_per_s"], 1e-9),
            })  # fmt: skip
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "ideal_rows_per_s": ideal,
        "database_limit_rows_per_s": db_limit["rows_per_s"],
        "idle": idle,
        "note": "idle rows: 'rows/s' is statements/s, 'reference' the seconds until 10 new "
        "rows were done, 'ratio' the statements against polling",
        "rows": rows_out,
    }
    write_report("bench_runtime", args.out, report, rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
