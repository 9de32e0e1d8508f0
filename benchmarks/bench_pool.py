"""Checkout cost of ZenPool against a plain psycopg_pool.ConnectionPool (same run).

N threads each take a connection, run ``SELECT 1`` and give it back, M times, through:
a plain ConnectionPool (no check), a plain ConnectionPool with ``check_connection``,
and ZenPool (check, fleet registration, heartbeats). The ratio to the plain pool is the
price of checking every connection before use.

    python -m benchmarks.bench_pool [--threads 8] [--ops 2000] [--pool 4]
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg_pool

from zenpipe.config import Settings
from zenpipe.pool import ZenPool

from .common import base_parser, fresh_database, peak_rss_mb, server, write_report


def _run(pool: psycopg_pool.ConnectionPool[Any], threads: int, ops: int) -> float:
    def work() -> None:
        for _ in range(ops):
            with pool.connection() as conn:
                conn.execute("SELECT 1")

    pool.wait(timeout=30)
    workers = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return threads * ops / (time.perf_counter() - t0)


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--ops", type=int, default=2000, help="checkouts per thread")
    parser.add_argument("--pool", type=int, default=4)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with server(args.dsn) as srv, fresh_database(srv) as dsn:
        variants: dict[str, Any] = {
            "ConnectionPool": lambda: psycopg_pool.ConnectionPool(
                dsn, min_size=args.pool, max_size=args.pool, open=True
            ),
            "ConnectionPool + check": lambda: psycopg_pool.ConnectionPool(
                dsn,
                min_size=args.pool,
                max_size=args.pool,
                open=True,
                check=psycopg_pool.ConnectionPool.check_connection,
            ),
            "ZenPool": lambda: ZenPool(
                Settings(dsn=dsn, pool_min=args.pool, pool_max=args.pool, server_id="bench")
            ),
        }
        baseline = 0.0
        for name, make in variants.items():
            with make() as pool:
                rate = _run(pool, args.threads, args.ops)
            baseline = baseline or rate
            rows.append({"pool": name, "checkouts_per_s": rate, "ratio_to_plain": rate / baseline})
    write_report(
        "bench_pool",
        args.out,
        {
            "threads": args.threads,
            "ops_per_thread": args.ops,
            "pool_size": args.pool,
            "rows": rows,
            "peak_rss_mb": peak_rss_mb(),
        },
        rows,
    )


if __name__ == "__main__":
    main()
