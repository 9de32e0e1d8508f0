"""Keys per second: zenpipe.keys.partition_key against the server's hashtext().

Baselines measured in the same run: asking the server for each key (one round trip per
link, what a writer without a Python port would do) and for a whole batch at once
(``unnest``, the best a client can do by asking).  Also checks every key against the
server and reports the partition spread.

    python -m benchmarks.bench_keys [--links 200000] [--dsn ...]
"""

from __future__ import annotations

import random
import string
import time
from collections import Counter

import psycopg

from benchmarks.common import base_parser, server, write_report
from zenpipe import keys


def make_links(n: int, seed: int = 42) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "-_/%.é日😀"
    return [
        "https://www.google.com/maps/place/" + "".join(rng.choices(alphabet, k=rng.randint(10, 80)))
        for _ in range(n)
    ]


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--links", type=int, default=200_000)
    parser.add_argument("--roundtrip-sample", type=int, default=5_000)
    args = parser.parse_args()
    links = make_links(args.links)

    t0 = time.perf_counter()
    py_keys = [keys.partition_key(link) for link in links]
    py_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    parts = [keys.partition_of(k) for k in py_keys]
    route_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    v_keys, v_parts = keys.route(links)
    vec_s = time.perf_counter() - t0
    if v_keys != py_keys or v_parts != parts:
        raise SystemExit("vectorized keys disagree with the scalar ones")

    with server(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        rows = conn.execute(
            "SELECT hashtext(t) FROM unnest(%s::text[]) WITH ORDINALITY u(t, n) ORDER BY n",
            (links,),
        ).fetchall()
        batch_s = time.perf_counter() - t0
        server_keys = [r[0] for r in rows]

        sample = links[: args.roundtrip_sample]
        t0 = time.perf_counter()
        for link in sample:
            conn.execute("SELECT hashtext(%s)", (link,)).fetchone()
        rt_s = time.perf_counter() - t0

    mismatches = sum(a != b for a, b in zip(py_keys, server_keys, strict=True))
    spread = Counter(parts)
    share = len(links) / keys.NUM_PARTITIONS
    worst = max(abs(n - share) / share for n in spread.values())
    py_rate = len(links) / py_s
    rows_out = [
        {"method": "zenpipe.keys.partition_key (Python)", "keys_per_s": py_rate, "ratio": 1.0},
        {
            "method": "zenpipe.keys.route (vectorized keys + routing)",
            "keys_per_s": len(links) / vec_s,
            "ratio": (len(links) / vec_s) / py_rate,
        },
        {
            "method": "server hashtext(), one batch (unnest)",
            "keys_per_s": len(links) / batch_s,
            "ratio": (len(links) / batch_s) / py_rate,
        },
        {
            "method": "server hashtext(), one round trip per key",
            "keys_per_s": len(sample) / rt_s,
            "ratio": (len(sample) / rt_s) / py_rate,
        },
        {
            "method": "zenpipe.keys.partition_of (leaf routing)",
            "keys_per_s": len(links) / route_s,
            "ratio": (len(links) / route_s) / py_rate,
        },
    ]
    write_report(
        "bench_keys",
        args.out,
        {
            "links": len(links),
            "mismatches_vs_server": mismatches,
            "partitions_used": len(spread),
            "worst_partition_deviation": worst,
            "results": rows_out,
        },
        rows_out,
    )
    print(
        f"mismatches vs server: {mismatches}; partitions used: {len(spread)}/32; "
        f"worst deviation from 1/32: {worst:.2%}"
    )
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
