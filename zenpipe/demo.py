"""The pipeline end to end on synthetic scrapes: the ``zenpipe demo`` command.

Seeds ``results`` with Google-Maps-like raw rows (some links repeated, some records a
writer must reject, some rows whose enrichment always fails), then runs *servers*
processes, each with a fleet-budgeted `ZenPool` and *workers* `Worker` threads, until
nothing is left to claim.  Finally it checks the invariants from the database: every row
done or parked, one contact per valid link, every bad record kept in ``zen_rejects``, no
advisory lock and no idle transaction left behind.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg

from .claim import Claim
from .locks import leftovers
from .pool import ZenPool
from .queries import load
from .worker import Worker, WorkerStats

__all__ = ["enrich", "run", "seed"]

_CATEGORIES = ["Cafe", "Dentist", "Hotel", "Restaurant", "Bakery", "Gym", "Pharmacy"]
_COUNTRIES = ["ID", "MY", "SG", "TH", "VN", "PH", "DE", "US"]


def seed(dsn: str, rows: int, *, seed_value: int = 7) -> dict[str, int]:
    """Insert *rows* raw scrape rows; return how many of each kind were made.

    About 5% of the rows repeat an earlier link (a re-scrape), 1% carry an invalid
    country code (the writer rejects them) and 0.5% are poison (enrichment raises).
    """
    rng = random.Random(seed_value)
    kinds = {"rows": rows, "repeats": 0, "bad": 0, "poison": 0}
    links: list[str] = []
    copy_sql = "COPY results (link, data, priority) FROM STDIN"
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, cur.copy(copy_sql) as copy:
        for i in range(rows):
            if links and rng.random() < 0.05:
                link = rng.choice(links)
                kinds["repeats"] += 1
            else:
                link = f"https://www.google.com/maps/place/biz-{seed_value}-{i}/@{i % 90}z"
                links.append(link)
            n = rng.randrange(1_000_000)
            data: dict[str, Any] = {
                "title": f"Business {n}",
                "category": rng.choice(_CATEGORIES),
                "country": rng.choice(_COUNTRIES),
                "city": f"City {n % 97}",
                "lat": round(rng.uniform(-10, 20), 6),
                "lng": round(rng.uniform(95, 140), 6),
                "rating": round(rng.uniform(1, 5), 1),
                "reviews": rng.randrange(5000),
                "phone": f"+62 812 {n:07d}",
                "website": f"https://biz{n}.example/",
                "emails": [f"info@biz{n}.example", f"Sales{n % 5}@biz{n}.example "],
                "scraped_at": (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)).isoformat(),
            }
            if rng.random() < 0.01:
                data["country"] = "Indonesia"  # not an ISO code: rejected, kept
                kinds["bad"] += 1
            elif rng.random() < 0.005:
                data["poison"] = True
                kinds["poison"] += 1
            copy.write_row((link, orjson.dumps(data).decode(), rng.choice((0, 0, 0, 1))))
    return kinds


def enrich(claim: Claim) -> dict[str, Any]:
    """Turn a raw demo row into a contact record (a real worker scrapes the website)."""
    d = claim.data
    if d.get("poison"):
        raise ValueError("the page could not be parsed")
    return {
        "source_link": claim.link,
        "source_id": claim.id,
        "observed_at": datetime.fromisoformat(d["scraped_at"]),
        "business_name": d["title"],
        "business_category": d["category"],
        "country_code": d["country"],
        "city": d["city"],
        "latitude": d["lat"],
        "longitude": d["lng"],
        "rating": d["rating"],
        "reviews_count": d["reviews"],
        "maps_phone": d["phone"],
        "website": d["website"],
        "emails": d["emails"],
        "phones": [d["phone"]],
        "scrape_status": "success",
    }


def _server(dsn: str, server_id: str, workers: int, batch: int, out: Any) -> None:
    stats: list[WorkerStats] = []
    errors: list[str] = []
    with ZenPool(dsn=dsn, server_id=server_id, pool_max=workers + 1, pool_min=1) as pool:

        def work(name: str) -> None:
            try:
                with Worker(
                    pool, enrich, server_id=server_id, name=name, batch_size=batch,
                    lease_seconds=60, max_attempts=2,
                ) as w:  # fmt: skip
                    stats.append(w.run(until_idle=True))
            except Exception as e:  # reported to the parent
                errors.append(f"{name}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out.put({"server": server_id, "stats": [asdict(s) for s in stats], "errors": errors})


def _one_row(
    conn: psycopg.Connection[Any], query: Any, params: dict[str, Any] | None = None
) -> tuple[Any, ...]:
    row = conn.execute(query, params).fetchone()
    if row is None:  # pragma: no cover - aggregates always return a row
        raise RuntimeError("an aggregate returned no row")
    return tuple(row)


def run(dsn: str, *, rows: int, servers: int, workers: int, batch: int = 200) -> dict[str, Any]:
    """Seed, run the fleet until idle, check the invariants; return the report."""
    kinds = seed(dsn, rows)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    started = time.monotonic()
    procs = [
        ctx.Process(target=_server, args=(dsn, f"demo-{i}", workers, batch, out))
        for i in range(servers)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    elapsed = time.monotonic() - started
    totals: dict[str, int] = {}
    for r in results:
        for s in r["stats"]:
            for k, v in s.items():
                totals[k] = totals.get(k, 0) + v
    q = load("demo")
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Aggregates: each statement returns exactly one row.
        done, parked, left_over, valid_links = _one_row(conn, q["results_by_status"])
        contacts, writes, rejects = _one_row(conn, q["contacts_and_rejects"])
        left = leftovers(conn)
        locks, idle = left.advisory_locks, left.idle_in_transaction
    checks = {
        "rows_done": done,
        "rows_parked_failed": parked,
        "rows_left": left_over,
        "contacts": contacts,
        "expected_contacts": valid_links,
        "rejects": rejects,
        "zenpipe_locks_left": locks,
        "idle_in_transaction": idle,
        "contacts_scrape_count": writes,
    }
    ok = (
        checks["rows_left"] == 0
        and checks["rows_done"] + checks["rows_parked_failed"] == rows
        and checks["rows_parked_failed"] == kinds["poison"]
        and checks["contacts"] == checks["expected_contacts"]
        and checks["rejects"] == kinds["bad"]
        and checks["zenpipe_locks_left"] == 0
        and checks["idle_in_transaction"] == 0
        and not any(r["errors"] for r in results)
    )
    return {
        "ok": ok,
        "seeded": kinds,
        "servers": servers,
        "workers_per_server": workers,
        "batch": batch,
        "seconds": round(elapsed, 2),
        "rows_per_s": round(rows / elapsed, 1) if elapsed else None,
        "worker_totals": totals,
        "checks": checks,
        "errors": [e for r in results for e in r["errors"]],
    }
