"""Claim throughput: FOR UPDATE SKIP LOCKED (plain and with a committed lease), zenpipe,
and optionally the seed's advisory-lock pattern (``--seed``).

One run, one server, the same data for each method (a fresh database each): ``--rows``
pending rows drained by ``--workers`` processes, each claiming a batch and marking it done
until nothing is left; at every batch size of ``--batches``, ``--reps`` interleaved
repetitions (every method once per repetition), medians and min-max reported, zenpipe's
ratio taken to the lease loop of the same repetition; claim latency p50/p99 and the
client processes' CPU per 1,000 rows. After an empty claim a loop asks whether work is
left with two EXISTS probes (not a count(*) over the table).

* ``seed``: ``SELECT ... WHERE status = 'pending' AND pg_try_advisory_xact_lock(id)
  LIMIT 100``, then mark the rows done and commit (the audit's recommendation). Capped at
  ``--seed-seconds``: it is slow, so its rows/s is measured on the rows it got through.
* ``skip_locked``: ``SELECT ... ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED``, then mark
  done, commit.
* ``skip_locked_lease``: the same, but the claim is recorded on the rows (status, lease)
  and committed before the rows are marked done in a second transaction: what SKIP LOCKED
  needs to give the crash-safe, no-open-transaction lease zenpipe gives.
* ``zenpipe``: `Claimer.claim()` with ``--batch`` rows (default 500), then
  `Claimer.complete()`: two short transactions per batch, one statement each.

Reported per method: rows/s, rows claimed more than once (duplicates), the peak number of
advisory locks one backend held (sampled from pg_locks every few ms by a monitor thread),
errors, and zenpipe's rate relative to the SKIP LOCKED loop.

    python -m benchmarks.bench_claim                      # 100,000 rows, 8 workers, 100/500
    python -m benchmarks.bench_claim --rows 20000 --workers 4 --reps 1 --batches 100
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time
from array import array
from typing import Any

import psycopg

from zenpipe.claim import Claimer

from .common import add_repetitions, base_parser, fresh_database, repetitions, server, write_report

SEED_CLAIM = """
SELECT id, data FROM results
WHERE status = 'pending' AND pg_try_advisory_xact_lock(id)
LIMIT 100
"""
SKIP_LOCKED_CLAIM = """
SELECT id, data FROM results
WHERE status = 'pending'
ORDER BY priority DESC, id
LIMIT %(batch)s
FOR UPDATE SKIP LOCKED
"""
SKIP_LOCKED_LEASE = """
UPDATE results SET status = 'claimed', claim_owner = 'bench', claim_token = 0,
    lease_until = now() + interval '5 minutes', attempts = attempts + 1
WHERE id = ANY(%s)
"""
MARK_DONE = "UPDATE results SET status = 'done', done_at = now() WHERE id = ANY(%s)"
# Whether work is left, after an empty claim: two index probes (a count(*) over the table
# cost 32 ms per empty claim, 5.7 s of 9.4 s of server time at batch 100: issue 10).
LEFT = (
    "SELECT EXISTS (SELECT FROM results WHERE status = 'pending') "
    "OR EXISTS (SELECT FROM results WHERE status = 'claimed')"
)


def _loop_plain(
    dsn: str, claim_sql: str, deadline: float, *, batch_size: int = 100, lease: bool = False
) -> tuple[array[int], int, array[float]]:
    """Claim, mark done, commit, until nothing is left or the deadline passes.

    With *lease*: record a lease on the rows and commit first (what a worker needs to
    scrape for minutes without an open transaction), then mark done in a second
    transaction.
    """
    ids: array[int] = array("q")
    latency: array[float] = array("d")
    errors = 0
    with psycopg.connect(dsn) as conn:
        while time.monotonic() < deadline:
            try:
                t = time.perf_counter()
                rows = conn.execute(claim_sql, {"batch": batch_size}).fetchall()
                if rows:
                    batch = [r[0] for r in rows]
                    if lease:
                        conn.execute(SKIP_LOCKED_LEASE, (batch,))
                        conn.commit()
                        latency.append(time.perf_counter() - t)
                    conn.execute(MARK_DONE, (batch,))
                conn.commit()
            except psycopg.Error:
                errors += 1  # "out of shared memory" from the seed pattern, typically
                conn.rollback()
                time.sleep(0.01)
                continue
            if rows:
                ids.extend(batch)
                continue
            left = conn.execute(LEFT).fetchone()
            conn.commit()
            if left is None or not left[0]:
                break
            time.sleep(0.005)
    return ids, errors, latency


def _loop_zenpipe(
    dsn: str, batch_size: int, owner: str, deadline: float
) -> tuple[array[int], int, int, array[float], float]:
    ids: array[int] = array("q")
    latency: array[float] = array("d")
    claim_cpu = 0.0
    with (
        Claimer(dsn, owner=owner, batch_size=batch_size) as claimer,
        psycopg.connect(dsn, autocommit=True) as side,
    ):
        while time.monotonic() < deadline:
            t, c = time.perf_counter(), time.process_time()
            batch = claimer.claim()
            claim_cpu += time.process_time() - c
            if batch:
                latency.append(time.perf_counter() - t)
                claimer.complete(batch)
                ids.extend(batch.ids)
                continue
            if batch.contended:
                continue
            left = side.execute(LEFT).fetchone()
            if left is None or not left[0]:
                break
            time.sleep(0.005)
        return ids, 0, claimer.race_rollbacks, latency, claim_cpu


def _worker(  # noqa: PLR0917 - multiprocessing passes arguments positionally
    method: str, dsn: str, batch: int, index: int, deadline_in: float, start: Any, out: Any
) -> None:
    start.wait()
    deadline = time.monotonic() + deadline_in
    cpu0 = time.process_time()
    claim_cpu = 0.0
    if method == "zenpipe":
        ids, errors, races, latency, claim_cpu = _loop_zenpipe(
            dsn, batch, f"bench-{index}", deadline
        )
    else:
        sql = SEED_CLAIM if method == "seed" else SKIP_LOCKED_CLAIM
        ids, errors, latency = _loop_plain(
            dsn, sql, deadline, batch_size=batch, lease=method == "skip_locked_lease"
        )
        races = 0
    cpu = time.process_time() - cpu0
    out.put((ids.tobytes(), errors, races, latency.tobytes(), cpu, claim_cpu))


class LockMonitor(threading.Thread):
    """Samples pg_locks: the most advisory locks one backend held, and all together."""

    def __init__(self, dsn: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.dsn = dsn
        self.stop = threading.Event()
        self.peak_backend = 0
        self.peak_total = 0
        self.samples = 0
        self.full = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                try:
                    rows = self._sample(conn)
                except psycopg.Error:
                    # pg_locks itself needs a lock slot: under the seed pattern the
                    # table can be full ("out of shared memory"); count it and go on.
                    self.full += 1
                    self.peak_backend = max(self.peak_backend, 0)
                    time.sleep(self.interval)
                    continue
                self._account(rows)
                time.sleep(self.interval)

    def _sample(self, conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
        return conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) GROUP BY pid"
        ).fetchall()

    def _account(self, rows: list[tuple[Any, ...]]) -> None:
        counts = [int(r[0]) for r in rows]
        self.peak_backend = max([self.peak_backend, *counts])
        self.peak_total = max(self.peak_total, sum(counts))
        self.samples += 1


def _fill(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO results (link, data) "
            "SELECT 'https://maps.example.com/place/' || g, "
            "jsonb_build_object('name', 'Place ' || g, 'city', 'Jakarta', 'n', g) "
            "FROM generate_series(1, %s) AS g",
            (rows,),
        )
        conn.execute("VACUUM ANALYZE results")


def run_method(
    server_dsn: str, method: str, *, rows: int, workers: int, batch: int, cap: float
) -> dict[str, Any]:
    with fresh_database(server_dsn) as dsn:
        _fill(dsn, rows)
        ctx = mp.get_context("spawn")
        start = ctx.Event()
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(method, dsn, batch, i, cap, start, out))
            for i in range(workers)
        ]
        for p in procs:
            p.start()
        time.sleep(1.0)  # let the interpreters import before the clock starts
        monitor = LockMonitor(dsn, 0.02)
        monitor.start()
        t0 = time.monotonic()
        start.set()
        results = [out.get() for _ in procs]
        elapsed = time.monotonic() - t0
        monitor.stop.set()
        monitor.join()
        for p in procs:
            p.join()
        claimed: array[int] = array("q")
        latency: array[float] = array("d")
        for raw, _, _, lat, _, _ in results:
            part: array[int] = array("q")
            part.frombytes(raw)
            claimed.extend(part)
            lats: array[float] = array("d")
            lats.frombytes(lat)
            latency.extend(lats)
        distinct = len(set(claimed))
        with psycopg.connect(dsn) as conn:
            done_row = conn.execute("SELECT count(*) FROM results WHERE status = 'done'").fetchone()
        done = int(done_row[0]) if done_row else 0
        ordered = sorted(latency)
        cpu = sum(r[4] for r in results)
        claim_cpu = sum(r[5] for r in results)
        return {
            "method": method,
            "batch": batch,
            "rows_done": done,
            "complete": done == rows,
            "seconds": round(elapsed, 2),
            "rows_per_s": round(done / elapsed, 1) if elapsed else 0.0,
            "duplicates": len(claimed) - distinct,
            "claim_p50_ms": round(_pct(ordered, 0.50) * 1000, 2),
            "claim_p99_ms": round(_pct(ordered, 0.99) * 1000, 2),
            "python_cpu_ms_per_1000_rows": round(cpu / max(done, 1) * 1e6, 1),
            "claim_cpu_ms_per_1000_rows": round(claim_cpu / max(done, 1) * 1e6, 1),
            "peak_locks_backend": monitor.peak_backend,
            "peak_locks_total": monitor.peak_total,
            "errors": sum(r[1] for r in results),
            "claim_retries": sum(r[2] for r in results),
            "lock_samples": monitor.samples,
            "lock_table_full_samples": monitor.full,
        }


def _pct(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 500])
    add_repetitions(parser)
    parser.add_argument("--seed", action="store_true", help="also run the seed pattern")
    parser.add_argument(
        "--seed-seconds", type=float, default=60.0, help="time cap of the seed pattern (it is slow)"
    )
    parser.add_argument(
        "--cap-seconds", type=float, default=900.0, help="time cap of the other methods"
    )
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    methods = ["skip_locked", "skip_locked_lease", "zenpipe"]
    with server(args.dsn, settings={"max_connections": "100"}) as server_dsn:
        if args.seed:
            r = run_method(
                server_dsn, "seed", rows=args.rows, workers=args.workers, batch=100,
                cap=args.seed_seconds,
            )  # fmt: skip
            print(r, flush=True)
            runs.append({**r, "rep": 0})
        for rep in repetitions(args):  # interleaved: every method once per repetition
            for batch in args.batches:
                for method in methods:
                    r = run_method(
                        server_dsn, method, rows=args.rows, workers=args.workers, batch=batch,
                        cap=args.cap_seconds,
                    )  # fmt: skip
                    print(rep, r, flush=True)
                    if rep >= 0:  # not a warm-up
                        runs.append({**r, "rep": rep})
    rows_out = []
    summary: dict[str, Any] = {}
    for batch in args.batches:
        for method in methods:
            mine = [r for r in runs if r["method"] == method and r["batch"] == batch]
            lease = {
                r["rep"]: r["rows_per_s"]
                for r in runs
                if r["method"] == "skip_locked_lease" and r["batch"] == batch
            }
            rates = [r["rows_per_s"] for r in mine]
            ratios = [r["rows_per_s"] / max(lease[r["rep"]], 1e-9) for r in mine]
            row = {
                "method": method,
                "batch": batch,
                "rows/s median": statistics.median(rates),
                "rows/s min-max": f"{min(rates):,.0f}-{max(rates):,.0f}",
                "x lease median": round(statistics.median(ratios), 2),
                "x lease min-max": f"{min(ratios):.2f}-{max(ratios):.2f}",
                "p50 ms": statistics.median(r["claim_p50_ms"] for r in mine),
                "p99 ms": statistics.median(r["claim_p99_ms"] for r in mine),
                "CPU ms/1000 rows": statistics.median(
                    r["python_cpu_ms_per_1000_rows"] for r in mine
                ),
                "duplicates": sum(r["duplicates"] for r in mine),
                "races": sum(r["claim_retries"] for r in mine),
            }
            rows_out.append(row)
            summary[f"{method}@{batch}"] = {
                "rows_per_s": _spread(rates),
                "x_skip_locked_lease": _spread(ratios),
            }
    zen = [summary[f"zenpipe@{b}"]["x_skip_locked_lease"]["median"] for b in args.batches]
    report = {
        "rows": args.rows,
        "workers": args.workers,
        "batches": args.batches,
        "reps": args.reps,
        "warmup": args.warmup,
        "durable": True,
        "summary": summary,
        "targets": {"zenpipe_vs_skip_locked_lease_min": 1.0, "zenpipe_duplicates": 0},
        "targets_met": all(z >= 1.0 for z in zen)
        and all(r["duplicates"] == 0 for r in runs if r["method"] == "zenpipe"),
        "runs": runs,
    }
    write_report("bench_claim", args.out, report, rows_out)


if __name__ == "__main__":
    main()
