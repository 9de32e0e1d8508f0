"""Throughput on the 3-node throwaway Citus cluster against one server, in the same run.

Both targets run the same PostgreSQL 18.6 binaries (the Citus build; the single server
does not load the extension), get the same schema (the Citus variant on the cluster),
the same ``--rows`` results rows and the same batch size:

* ``pipeline``: ``--workers`` processes each loop `Claimer.claim()` +
  `Upserter.upsert_and_complete()` until no row is left (the worker loop without the
  enrichment).  rows/s over the whole drain.
* ``upsert``: one process upserts the same ``--rows`` contact records in batches of
  ``--batch``; on the cluster once as they come (a batch touches every shard) and once
  with each batch split by node (`zenpipe.citus.ShardMap.group`, one call per node).

Ratios are cluster / single server.  On one machine the three nodes share its cores, so
the cluster does more work (a distributed transaction, two-phase commit, the coordinator
relaying every row) with the same CPU: it is slower here; see docs/scaling.md for what
changes on real nodes.  Needs ``ZENPIPE_CITUS_SOURCE``.

    python -m benchmarks.bench_citus                     # 10,000 rows, 2 workers
    python -m benchmarks.bench_citus --rows 2000 --batch 200
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import psycopg

from zenpipe import schema
from zenpipe.citus import ShardMap, ThrowawayCitus
from zenpipe.claim import Claimer
from zenpipe.embedded import ThrowawayPostgres
from zenpipe.upsert import Upserter

from .common import base_parser, write_report

SEED = (
    "INSERT INTO results (link, data) SELECT 'https://bench.test/' || i, jsonb_build_object("
    "'business_name', 'n' || i, 'city', 'c' || (i %% 97), 'emails', "
    "jsonb_build_array('e' || i || '@x.com')) FROM generate_series(1, %s) AS i"
)


def _drain(dsn: str, owner: str, batch: int) -> int:
    done = 0
    with (
        Claimer(dsn, owner=owner, batch_size=batch) as claimer,
        Upserter(dsn, server_id=owner) as up,
    ):
        while True:
            claimed = claimer.claim()
            if not claimed:
                if claimed.contended:
                    continue
                return done
            recs = [{"source_link": c.link, "source_id": c.id, **c.data} for c in claimed.claims]
            up.upsert_and_complete(recs, claimer, claimed)
            done += len(claimed)


def _pipeline(dsn: str, rows: int, workers: int, batch: int) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        conn.execute(SEED, (rows,))
    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    with ctx.Pool(workers) as pool:
        done = sum(pool.starmap(_drain, [(dsn, f"w{k}", batch) for k in range(workers)]))
    seconds = time.perf_counter() - started
    return {"rows": done, "seconds": seconds, "rows_per_s": done / seconds}


def _records(rows: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"source_link": f"https://upsert.test/{tag}/{i}", "business_name": f"b{i}",
         "emails": [f"u{i}@x.com"]}
        for i in range(rows)
    ]  # fmt: skip


def _upsert(dsn: str, rows: int, batch: int, tag: str, grouped: bool) -> dict[str, Any]:
    recs = _records(rows, tag)
    shard_map = None
    if grouped:
        with psycopg.connect(dsn) as conn:
            shard_map = ShardMap.load(conn)
    statements = 0
    with Upserter(dsn, server_id="bench") as up:
        started = time.perf_counter()
        for lo in range(0, rows, batch):
            chunk = recs[lo : lo + batch]
            if shard_map is None:
                parts = [chunk]
            else:
                groups = shard_map.group([r["source_link"] for r in chunk])
                parts = [[chunk[i] for i in g.indices] for g in groups]
            for part in parts:
                up.upsert(part)
                statements += 1
        seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "calls": statements}


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()

    results: dict[str, dict[str, Any]] = {}
    with ThrowawayCitus() as cluster:
        started = time.perf_counter()
        schema.apply(cluster.dsn)
        schema_s = time.perf_counter() - started
        with ThrowawayPostgres(bindir=cluster.bindir) as single:
            schema.apply(single.dsn)
            for name, dsn in (("single", single.dsn), ("citus", cluster.dsn)):
                results[f"pipeline/{name}"] = _pipeline(dsn, args.rows, args.workers, args.batch)
                results[f"upsert/{name}"] = _upsert(dsn, args.rows, args.batch, name, False)
            results["upsert/citus_grouped_by_node"] = _upsert(
                cluster.dsn, args.rows, args.batch, "grouped", True
            )

    base = {"pipeline": results["pipeline/single"], "upsert": results["upsert/single"]}
    rows_out = []
    for key, r in results.items():
        kind = key.split("/")[0]
        rows_out.append(
            {
                "measure": key,
                "rows": r["rows"],
                "seconds": r["seconds"],
                "rows/s": r["rows_per_s"],
                "vs single": r["rows_per_s"] / base[kind]["rows_per_s"],
            }
        )
    report = {
        "rows": args.rows,
        "workers": args.workers,
        "batch": args.batch,
        "citus_schema_apply_seconds": schema_s,
        "results": results,
    }
    write_report("bench_citus", args.out, report, rows_out)


if __name__ == "__main__":
    main()
