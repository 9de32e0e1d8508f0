"""The crash-safe floor against the physical reference, in one run on one server.

`zenpipe bench` reports the fleet's end-to-end throughput as a ratio to the physical
reference (one process COPYing the final contacts into an empty ``zen_contacts`` and
settling every source row with one bulk ``UPDATE``). This benchmark asks how much of
that ratio any pipeline with a committed lease could reach on the same server: the
*floor* runs, in the server alone, the statements such a pipeline cannot do without,
per batch of ``--batch`` rows:

1. claim with ``FOR UPDATE SKIP LOCKED``, record owner, lease and fencing token, COMMIT
   (the claim must be durable before the work starts, or a crash loses or repeats it);
2. write the batch's contacts with one ``INSERT ... ON CONFLICT DO UPDATE`` that sets
   the new values (less than any correct merge: no newest-wins, no union, a link's
   second scrape in the batch dropped), mark the rows done under the token, COMMIT.

The contacts are staged before the clock starts (``zen_floor_rows``, from the source
rows' data: no enrichment, no validation, no client at all), and each of ``--sessions``
connections runs the loop as one ``CALL`` of a plpgsql procedure (sql/queries/bench.sql,
``floor_procedure``; `zenpipe.bench.baselines.crash_safe_floor`, also ``zenpipe bench
--floor``), so the figure has no round trip and no Python in it. Whatever a
real pipeline adds (the claimer's advisory locks and expiry accounting, the merge rules,
validation, rejects, bookkeeping, the client's CPU on the same cores) can only make it
slower: when the floor is below a target ratio, no design with these guarantees
reaches it on this server.

Same data as `zenpipe bench` (`zenpipe.bench.data.generate`, ``--rows``, ``--seed``), a
fresh database per measurement, ``--reps`` interleaved repetitions, medians and min-max.

    python -m benchmarks.bench_floor                       # 30,000 rows, 1 and 2 sessions
    python -m benchmarks.bench_floor --rows 60000 --sessions 1 2 6 --batch 100 400
"""

from __future__ import annotations

import statistics
from typing import Any

from zenpipe.bench import data as bench_data
from zenpipe.bench.baselines import crash_safe_floor, physical_reference

from .common import add_repetitions, base_parser, repetitions, server, write_report


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=11, help="data seed (as zenpipe bench)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[100])
    add_repetitions(parser)
    args = parser.parse_args()
    dataset = bench_data.generate(args.rows, seed=args.seed)
    expected = bench_data.expect(dataset)
    runs: list[dict[str, Any]] = []
    with server(args.dsn) as server_dsn:
        for rep in repetitions(args):  # interleaved: every method once per repetition
            ref = physical_reference(server_dsn, dataset, expected)
            print(rep, ref, flush=True)
            if rep >= 0:  # not a warm-up
                runs.append({**ref, "rep": rep, "batch": None, "sessions": 1})
            for batch in args.batch:
                for sessions in args.sessions:
                    r = crash_safe_floor(
                        server_dsn, dataset, expected, sessions=sessions, batch=batch
                    )
                    r["method"] = f"floor x{sessions}"
                    print(rep, r, flush=True)
                    if rep >= 0:
                        runs.append({**r, "rep": rep})
    table = []
    summary: dict[str, Any] = {}
    refs = {r["rep"]: r["rows_per_s"] for r in runs if r["method"] == "physical_reference"}
    keys = sorted({(r["method"], r["batch"] or 0) for r in runs}, key=lambda k: (k[1], k[0]))
    for method, batch in keys:
        mine = [r for r in runs if r["method"] == method and (r["batch"] or 0) == batch]
        rates = [r["rows_per_s"] for r in mine]
        ratios = [r["rows_per_s"] / refs[r["rep"]] for r in mine]
        row = {
            "method": method,
            "batch": batch or "",
            "rows/s median": f"{statistics.median(rates):,.0f}",
            "rows/s min-max": f"{min(rates):,.0f}-{max(rates):,.0f}",
            "x reference median": f"{statistics.median(ratios):.2f}",
            "x reference min-max": f"{min(ratios):.2f}-{max(ratios):.2f}",
        }
        table.append(row)
        summary[f"{method} batch {batch}"] = row
    write_report(
        "bench_floor",
        args.out,
        {"rows": args.rows, "seed": args.seed, "runs": runs, "summary": summary},
        table,
    )


if __name__ == "__main__":
    main()
