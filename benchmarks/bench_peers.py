"""Claim + complete against real peers, same server, same run: PgQueuer and procrastinate.

Installs nothing: the peers are the optional extra ``bench-peers``
(``pip install '.[bench-peers]'``); a peer that cannot be imported is reported as missing
and the others still run.  Every method drains a fresh database of ``--rows`` no-op jobs
with ``--workers`` processes; repetitions are interleaved (every method once per
repetition), and medians with min-max are reported, with each peer's ratio to zenpipe in
the same repetition.

* ``zenpipe``: `Claimer.claim()` + `Claimer.complete()` at ``--batch`` (as bench_claim).
* ``pgqueuer``: PgQueuer's batch dequeue (``Queries.dequeue(batch_size=...)``, which is
  what its QueueManager runs) and ``log_jobs`` for the batch, over asyncpg as its docs
  recommend.
* ``procrastinate``: ``JobManager.fetch_job`` (one job per fetch: procrastinate has no
  batch fetch) and ``finish_job``, on its psycopg connector; fewer rows
  (``--procrastinate-rows``) since it is slow, rows/s measured on those.
* ``skip_locked`` and ``skip_locked_lease``: bench_claim's two SKIP LOCKED loops (mark
  done only; a committed lease first, then mark done), as references: every method's
  rate is also given as a ratio to PgQueuer's in the same repetition, so the report
  shows how far above PgQueuer the lease loop, the least a crash-safe claim does, runs.

    python -m benchmarks.bench_peers --rows 100000 --batch 100
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing as mp
import statistics
import time
import uuid
from datetime import timedelta
from typing import Any

import psycopg

from .bench_claim import SKIP_LOCKED_CLAIM, _fill, _loop_plain, _pct, _spread
from .common import add_repetitions, base_parser, fresh_database, repetitions, server, write_report

PEERS = {"pgqueuer": "pgqueuer", "procrastinate": "procrastinate"}
#: bench_claim's SKIP LOCKED loops, on zenpipe's schema.
REFERENCES = ("skip_locked", "skip_locked_lease")


def available(method: str) -> bool:
    module = PEERS.get(method)
    if module is None:
        return True
    if importlib.util.find_spec(module) is None:
        return False
    return method != "pgqueuer" or importlib.util.find_spec("asyncpg") is not None


# -- zenpipe ------------------------------------------------------------------------------


def _zenpipe(dsn: str, batch: int, index: int, deadline: float) -> tuple[int, list[float]]:
    from zenpipe.claim import Claimer

    done = 0
    latency: list[float] = []
    with Claimer(dsn, owner=f"peer-{index}", batch_size=batch) as claimer:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            b = claimer.claim()
            if b:
                latency.append(time.perf_counter() - t)
                claimer.complete(b)
                done += len(b)
                continue
            if b.contended:
                continue
            break
    return done, latency


# -- PgQueuer ------------------------------------------------------------------------------


async def _pgqueuer_setup(dsn: str, rows: int) -> None:
    import asyncpg
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(_url(dsn))
    try:
        q = Queries.from_asyncpg_connection(conn)
        await q.install()
        step = 10_000
        for lo in range(0, rows, step):
            n = min(step, rows - lo)
            await q.enqueue(["bench"] * n, [None] * n, [0] * n)
    finally:
        await conn.close()


async def _pgqueuer_loop(dsn: str, batch: int, deadline: float) -> tuple[int, list[float]]:
    import asyncpg
    from pgqueuer.ports.repository import EntrypointExecutionParameter
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(_url(dsn))
    done = 0
    latency: list[float] = []
    try:
        q = Queries.from_asyncpg_connection(conn)
        entry = {"bench": EntrypointExecutionParameter(concurrency_limit=0)}
        qm_id = uuid.uuid4()
        while time.monotonic() < deadline:
            t = time.perf_counter()
            jobs = await q.dequeue(
                batch_size=batch,
                entrypoints=entry,  # type: ignore[arg-type]
                queue_manager_id=qm_id,  # type: ignore[arg-type]
                global_concurrency_limit=None,
                heartbeat_timeout=timedelta(seconds=300),
            )
            if not jobs:
                break
            latency.append(time.perf_counter() - t)
            await q.log_jobs([(j, "successful", None) for j in jobs])
            done += len(jobs)
    finally:
        await conn.close()
    return done, latency


# -- procrastinate ---------------------------------------------------------------------------


def _procrastinate_app(dsn: str) -> Any:
    import procrastinate

    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))


async def _procrastinate_setup(dsn: str, rows: int) -> None:
    app = _procrastinate_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    with psycopg.connect(dsn) as conn:  # the jobs themselves: one INSERT, outside the clock
        conn.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            "SELECT 'default', 'bench', '{}'::jsonb FROM generate_series(1, %s)",
            (rows,),
        )


async def _procrastinate_loop(dsn: str, deadline: float) -> tuple[int, list[float]]:
    from procrastinate import jobs

    app = _procrastinate_app(dsn)
    done = 0
    latency: list[float] = []
    async with app.open_async():
        manager = app.job_manager
        worker_id = await manager.register_worker()
        try:
            while time.monotonic() < deadline:
                t = time.perf_counter()
                job = await manager.fetch_job(queues=None, worker_id=worker_id)
                if job is None:
                    break
                latency.append(time.perf_counter() - t)
                await manager.finish_job(job, jobs.Status.SUCCEEDED, delete_job=False)
                done += 1
        finally:
            await manager.unregister_worker(worker_id)
    return done, latency


def _url(dsn: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return (
        f"postgresql://{info.get('user', 'postgres')}@{info.get('host', 'localhost')}:"
        f"{info.get('port', 5432)}/{info.get('dbname', 'postgres')}"
    )


# -- driver ----------------------------------------------------------------------------------


def _worker(  # noqa: PLR0917 - multiprocessing passes arguments positionally
    method: str, dsn: str, batch: int, index: int, cap: float, start: Any, out: Any
) -> None:
    start.wait()
    deadline = time.monotonic() + cap
    if method == "zenpipe":
        done, latency = _zenpipe(dsn, batch, index, deadline)
    elif method in REFERENCES:
        ids, _, lat = _loop_plain(
            dsn, SKIP_LOCKED_CLAIM, deadline, batch_size=batch, lease=method == "skip_locked_lease"
        )
        done, latency = len(ids), list(lat)
    elif method == "pgqueuer":
        done, latency = asyncio.run(_pgqueuer_loop(dsn, batch, deadline))
    else:
        done, latency = asyncio.run(_procrastinate_loop(dsn, deadline))
    out.put((done, latency))


def run_method(
    server_dsn: str, method: str, *, rows: int, workers: int, batch: int, cap: float
) -> dict[str, Any]:
    on_zenpipe = method == "zenpipe" or method in REFERENCES
    with fresh_database(server_dsn, migrate=on_zenpipe) as dsn:
        if on_zenpipe:
            _fill(dsn, rows)
        elif method == "pgqueuer":
            asyncio.run(_pgqueuer_setup(dsn, rows))
        else:
            asyncio.run(_procrastinate_setup(dsn, rows))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(method, dsn, batch, i, cap, start, out))
            for i in range(workers)
        ]
        for p in procs:
            p.start()
        time.sleep(1.5)  # let the interpreters import before the clock starts
        t0 = time.monotonic()
        start.set()
        results = [out.get() for _ in procs]
        elapsed = time.monotonic() - t0
        for p in procs:
            p.join()
    done = sum(r[0] for r in results)
    latency = sorted(x for r in results for x in r[1])
    return {
        "method": method,
        "batch": 1 if method == "procrastinate" else batch,
        "rows": rows,
        "rows_done": done,
        "seconds": round(elapsed, 2),
        "rows_per_s": round(done / elapsed, 1) if elapsed else 0.0,
        "claim_p50_ms": round(_pct(latency, 0.50) * 1000, 2),
        "claim_p99_ms": round(_pct(latency, 0.99) * 1000, 2),
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--procrastinate-rows", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 500])
    add_repetitions(parser)
    parser.add_argument("--cap-seconds", type=float, default=600.0)
    args = parser.parse_args()
    methods = ["zenpipe", *REFERENCES, "pgqueuer", "procrastinate"]
    missing = [m for m in methods if not available(m)]
    methods = [m for m in methods if m not in missing]
    runs: list[dict[str, Any]] = []
    with server(args.dsn, settings={"max_connections": "100"}) as server_dsn:
        for rep in repetitions(args):
            for batch in args.batches:
                for method in methods:
                    if method == "procrastinate" and batch != args.batches[0]:
                        continue  # one job per fetch whatever the batch
                    rows = args.procrastinate_rows if method == "procrastinate" else args.rows
                    r = run_method(
                        server_dsn, method, rows=rows, workers=args.workers, batch=batch,
                        cap=args.cap_seconds,
                    )  # fmt: skip
                    r["rep"] = rep
                    print(r, flush=True)
                    if rep >= 0:  # not a warm-up
                        runs.append(r)
    table = []
    summary: dict[str, Any] = {}
    for batch in args.batches:
        zen = {r["rep"]: r["rows_per_s"] for r in runs if r["method"] == "zenpipe"
               and r["batch"] == batch}  # fmt: skip
        pgq = {r["rep"]: r["rows_per_s"] for r in runs if r["method"] == "pgqueuer"
               and r["batch"] == batch}  # fmt: skip
        for method in methods:
            mine = [r for r in runs if r["method"] == method
                    and r["batch"] == (1 if method == "procrastinate" else batch)]  # fmt: skip
            if not mine:
                continue
            rates = [r["rows_per_s"] for r in mine]
            ratios = [zen[r["rep"]] / max(r["rows_per_s"], 1e-9) for r in mine if r["rep"] in zen]
            over_pgq = [r["rows_per_s"] / pgq[r["rep"]] for r in mine if pgq.get(r["rep"])]
            key = f"{method}@{batch}"
            summary[key] = {
                "rows_per_s_median": statistics.median(rates),
                "rows_per_s_min": min(rates),
                "rows_per_s_max": max(rates),
                "zenpipe_x_median": round(statistics.median(ratios), 2),
                "zenpipe_x_min": round(min(ratios), 2),
                "zenpipe_x_max": round(max(ratios), 2),
                "p50_ms": statistics.median(r["claim_p50_ms"] for r in mine),
                "p99_ms": statistics.median(r["claim_p99_ms"] for r in mine),
                "x_pgqueuer": _spread(over_pgq) if over_pgq else None,
            }
            s = summary[key]
            table.append({
                "method": method,
                "zenpipe batch": batch,
                "rows/s median": s["rows_per_s_median"],
                "rows/s min-max": f"{s['rows_per_s_min']:,.0f}-{s['rows_per_s_max']:,.0f}",
                "zenpipe x (median, min-max)":
                    f"{s['zenpipe_x_median']} ({s['zenpipe_x_min']}-{s['zenpipe_x_max']})",
                "x PgQueuer (median, min-max)": (
                    f"{s['x_pgqueuer']['median']} ({s['x_pgqueuer']['min']}-"
                    f"{s['x_pgqueuer']['max']})" if s["x_pgqueuer"] else ""
                ),
                "claim p50 ms": s["p50_ms"],
                "claim p99 ms": s["p99_ms"],
            })  # fmt: skip
    report = {
        "rows": args.rows,
        "procrastinate_rows": args.procrastinate_rows,
        "workers": args.workers,
        "reps": args.reps,
        "warmup": args.warmup,
        "missing_peers": missing,
        "summary": summary,
        "targets": {"x_pgqueuer_min": 2.0, "x_procrastinate_min": 30.0},
        "runs": runs,
    }
    write_report("bench_peers", args.out, report, table)
    if missing:
        print(f"not installed (pip install '.[bench-peers]'): {', '.join(missing)}")


if __name__ == "__main__":
    main()
