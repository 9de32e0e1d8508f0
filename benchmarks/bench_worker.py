"""One `Worker` over many rows: peak RSS (flat after warm-up?) and Python CPU per 1,000
rows for the claim and for the write.

A fresh database with ``--rows`` pending rows (1,000,000 by default; ``--quick``:
200,000) is drained by one Worker (batch ``--batch``, pipelined settle, no-op
enrichment returning a small contact). RSS is sampled from ``/proc/self/statm`` after
every batch (``on_event``); the report gives it at the end of warm-up (first 5% of the
rows), its peak, and its growth after warm-up. CPU: the process's CPU seconds per 1,000
rows for the whole run, and separately, on the same database, a claim + complete loop
and an ``upsert_and_complete`` loop of ``--sample`` rows each, CPU seconds of this
process (``time.process_time``) per 1,000 rows.

    python -m benchmarks.bench_worker --quick
"""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg

from zenpipe.claim import Claim, Claimer
from zenpipe.events import BatchEvent
from zenpipe.upsert import Upserter
from zenpipe.worker import Worker

from .common import base_parser, fresh_database, peak_rss_mb, server, write_report

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def enrich(claim: Claim) -> dict[str, Any]:
    return {
        "source_link": claim.link,
        "source_id": claim.id,
        "business_name": f"Place {claim.id}",
        "city": "Jakarta",
        "country_code": "ID",
        "emails": [f"info{claim.id}@x.example"],
        "phones": ["+62 811 000"],
    }


def fill(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        step = 200_000
        for lo in range(0, rows, step):
            conn.execute(
                "INSERT INTO results (link, data) "
                "SELECT 'https://maps.example.com/place/' || g, jsonb_build_object('n', g) "
                "FROM generate_series(%s::bigint, %s::bigint) AS g",
                (lo + 1, min(rows, lo + step)),
            )
        conn.execute("VACUUM ANALYZE results")


def run_worker(dsn: str, rows: int, batch: int) -> dict[str, Any]:
    samples: list[tuple[int, float]] = []
    seen = 0

    def on_event(event: BatchEvent) -> None:
        nonlocal seen
        seen += event.rows
        samples.append((seen, rss_mb()))

    t, cpu = time.perf_counter(), time.process_time()
    with Worker(dsn, enrich, server_id="bench", batch_size=batch, on_event=on_event) as w:
        stats = w.run(until_idle=True)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    warm = next((r for n, r in samples if n >= rows * 0.05), samples[0][1])
    after = [r for n, r in samples if n >= rows * 0.05]
    return {
        "rows": stats.written,
        "seconds": round(wall, 1),
        "rows_per_s": round(stats.written / wall, 1),
        "rss_after_warmup_mb": round(warm, 1),
        "rss_peak_after_warmup_mb": round(max(after), 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "rss_growth_after_warmup_mb": round(max(after) - warm, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "process_cpu_ms_per_1000_rows": round(cpu / max(stats.written, 1) * 1e6, 1),
        "rss_samples": samples[:: max(1, len(samples) // 50)],
    }


def cpu_loops(dsn: str, rows: int, batch: int) -> dict[str, float]:
    fill(dsn, rows)
    out: dict[str, float] = {}
    with Claimer(dsn, owner="cpu", batch_size=batch) as claimer:
        n, cpu = 0, 0.0
        while True:
            c = time.process_time()
            b = claimer.claim()
            if not b:
                break
            claimer.complete(b)
            cpu += time.process_time() - c
            n += len(b)
        out["claim_complete_cpu_ms_per_1000_rows"] = round(cpu / max(n, 1) * 1e6, 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE results SET status = 'pending', lease_until = NULL")
    with (
        Claimer(dsn, owner="cpu2", batch_size=batch) as claimer,
        Upserter(dsn, server_id="cpu") as up,
    ):
        n, cpu = 0, 0.0
        while True:
            b = claimer.claim()
            if not b:
                break
            recs = [enrich(c) for c in b.claims]
            c = time.process_time()
            up.upsert_and_complete(recs, claimer, b, settling=True)
            cpu += time.process_time() - c
            n += len(b)
        out["upsert_and_complete_cpu_ms_per_1000_rows"] = round(cpu / max(n, 1) * 1e6, 1)
    return out


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="200,000 rows")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--sample", type=int, default=20_000)
    args = parser.parse_args()
    rows = 200_000 if args.quick else args.rows
    with server(args.dsn) as server_dsn:
        with fresh_database(server_dsn) as dsn:
            fill(dsn, rows)
            worker = run_worker(dsn, rows, args.batch)
        with fresh_database(server_dsn) as dsn:
            loops = cpu_loops(dsn, args.sample, args.batch)
    report = {"rows": rows, "batch": args.batch, "worker": worker, "cpu": loops,
              "load_average": os.getloadavg()}  # fmt: skip
    table = [
        {"figure": k, "value": v} for k, v in {**worker, **loops}.items() if k != "rss_samples"
    ]
    write_report("bench_worker", args.out, report, table)


if __name__ == "__main__":
    main()
