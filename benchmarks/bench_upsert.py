"""Upsert throughput: zenpipe's writer against plain COPY and the seed's approaches.

One run, one server, the same generated records (38 fields, arrays that overlap on
re-upsert) for every method:

- ``copy_reference``: plain single-stream binary COPY of fresh rows into zen_contacts
  (tuples built before the clock starts: the floor any writer has to beat);
- ``seed_per_row``: per-row autocommit UPSERT with SQL-side ``ARRAY(SELECT DISTINCT ...)``
  (the seed's approach), on a sample, extrapolated;
- ``executemany_100``: the same UPSERT through ``executemany`` in batches of 100, on a
  sample, extrapolated;
- ``zenpipe_fresh``: `Upserter.upsert` of fresh rows;
- ``zenpipe_conflict``: `Upserter.upsert` of the same links again, every row conflicting
  and bringing one new email (plus a newer observation of every scalar).

Stages of zenpipe's own paths, to show where its time goes (each timed on rows whose
earlier stages ran before the clock started):

- ``copy_path_ready``: zenpipe's COPY statement (its clock read, savepoint, binary COPY
  of the columns the merge inserts, commit) of COPY rows already built: the server's
  part of the fresh path;
- ``copy_path_built``: the same, building the COPY rows from validated rows inside the
  clock (validation and routing still outside it);
- ``merge_ready``: zenpipe's merge statement (``merge_rows``) of another full-conflict
  round, its parameters built before the clock (psycopg still encodes them inside it):
  the server's part of the conflict path, against ``update_floor``.

Also: the Python-side share (validation, hashing, sorting: ``Upserter._prepare``) of
zenpipe's time, peak RSS, and the cost of re-upserting a row that already holds
thousands of emails.

    python -m benchmarks.bench_upsert [--rows 200000] [--batch 5000] [--dsn ...]
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from benchmarks.common import (
    add_repetitions,
    base_parser,
    fresh_database,
    peak_rss_mb,
    repetitions,
    server,
    write_report,
)
from zenpipe import keys
from zenpipe.upsert import (
    _COPY_PATH_TYPES,
    CHUNK_ROWS,
    SCALAR_COLUMNS,
    Upserter,
    _chunk_rounds,
    _copy_rows,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
COUNTRIES = ["ID", "MY", "SG", "TH", "VN", "PH", "US", "DE"]
CATEGORIES = ["Restaurant", "Cafe", "Dentist", "Hotel", "Bakery", "Gym", "Salon", "Garage"]


def record(i: int, version: int) -> dict[str, Any]:
    """Record *i*; version 1 re-observes it later with one more email."""
    r = random.Random(i * 7 + version)
    link = f"https://www.google.com/maps/place/business-{i}/@-6.{i % 9973},106.{i % 7919},17z"
    emails = [f"info{i}@biz{i}.example", f"sales{i}@biz{i}.example"]
    if version:
        emails.append(f"new{version}.{i}@biz{i}.example")
    return {
        "source_link": link,
        "observed_at": T0 + timedelta(hours=version, seconds=i),
        "business_name": f"Business {i} {r.choice(CATEGORIES)}",
        "business_category": r.choice(CATEGORIES),
        "website": f"https://biz{i}.example/",
        "website_domain": f"biz{i}.example",
        "description": "A fine place. " * r.randint(1, 5),
        "price_level": r.randint(1, 4),
        "business_status": "OPERATIONAL",
        "country_code": r.choice(COUNTRIES),
        "region": f"Region {i % 50}",
        "city": f"City {i % 500}",
        "district": f"District {i % 2000}",
        "address": f"Jl. Example No. {i}, RT {i % 20}/RW {i % 10}",
        "postal_code": f"{10000 + i % 89999}",
        "latitude": r.uniform(-11, 6),
        "longitude": r.uniform(95, 141),
        "timezone": "Asia/Jakarta",
        "plus_code": f"6P58+{i % 99}X",
        "place_id": f"ChIJ{i:012d}",
        "google_cid": str(10**15 + i),
        "maps_url": f"https://maps.google.com/?cid={10**15 + i}",
        "rating": round(r.uniform(1, 5), 1),
        "reviews_count": r.randint(0, 5000) + version,
        "maps_phone": f"+62 21 {i % 10000:04d} {i % 997:03d}",
        "opening_hours": {"mon": "08:00-17:00", "tue": "08:00-17:00", "sat": "closed"},
        "photos_count": r.randint(0, 300),
        "is_claimed": r.random() < 0.5,
        "emails": emails,
        "phones": [f"+62 812 {i % 10000:04d} {i % 991:03d}", f"(021) {i % 9999:04d}-1"],
        "whatsapp": [f"+62 812 {i % 10000:04d} {i % 991:03d}"],
        "facebook_url": f"https://facebook.com/biz{i}",
        "instagram_url": f"https://instagram.com/biz{i}",
        "website_title": f"Business {i} - Home",
        "website_status_code": 200,
        "website_language": "id",
        "pages_crawled": r.randint(1, 20),
        "scrape_status": "success",
    }


def batches(rows: int, size: int, version: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, rows, size):
        yield [record(i, version) for i in range(start, min(rows, start + size))]


COPY_COLUMNS = [
    "partition_key", "source_link", "business_name", "business_category", "website",
    "website_domain", "description", "price_level", "business_status", "country_code",
    "region", "city", "district", "address", "postal_code", "latitude", "longitude",
    "timezone", "plus_code", "place_id", "google_cid", "maps_url", "rating", "reviews_count",
    "maps_phone", "opening_hours", "photos_count", "is_claimed", "emails", "phones",
    "whatsapp", "facebook_url", "instagram_url", "website_title", "website_status_code",
    "website_language", "pages_crawled", "scrape_status", "observed_at",
]  # fmt: skip
COPY_TYPES = [
    "int4", "text", "text", "text", "text", "text", "text", "int2", "text", "text", "text",
    "text", "text", "text", "text", "float8", "float8", "text", "text", "text", "text",
    "text", "numeric", "int4", "text", "jsonb", "int4", "bool", "text[]", "text[]",
    "text[]", "text", "text", "text", "int2", "text", "int4", "text", "timestamptz",
]  # fmt: skip

SEED_UPSERT = """
INSERT INTO zen_contacts AS z (partition_key, source_link, business_name, business_category,
    website, country_code, city, address, latitude, longitude, rating, reviews_count,
    maps_phone, emails, phones, whatsapp, facebook_url, scrape_status, scrape_count)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1)
ON CONFLICT (source_link, partition_key) DO UPDATE SET
    business_name = COALESCE(EXCLUDED.business_name, z.business_name),
    business_category = COALESCE(EXCLUDED.business_category, z.business_category),
    website = COALESCE(EXCLUDED.website, z.website),
    country_code = COALESCE(EXCLUDED.country_code, z.country_code),
    city = COALESCE(EXCLUDED.city, z.city),
    address = COALESCE(EXCLUDED.address, z.address),
    latitude = COALESCE(EXCLUDED.latitude, z.latitude),
    longitude = COALESCE(EXCLUDED.longitude, z.longitude),
    rating = COALESCE(EXCLUDED.rating, z.rating),
    reviews_count = COALESCE(EXCLUDED.reviews_count, z.reviews_count),
    maps_phone = COALESCE(EXCLUDED.maps_phone, z.maps_phone),
    emails = ARRAY(SELECT DISTINCT unnest FROM unnest(
        COALESCE(z.emails, '{}') || COALESCE(EXCLUDED.emails, '{}')) WHERE unnest <> ''),
    phones = ARRAY(SELECT DISTINCT unnest FROM unnest(
        COALESCE(z.phones, '{}') || COALESCE(EXCLUDED.phones, '{}')) WHERE unnest <> ''),
    whatsapp = ARRAY(SELECT DISTINCT unnest FROM unnest(
        COALESCE(z.whatsapp, '{}') || COALESCE(EXCLUDED.whatsapp, '{}')) WHERE unnest <> ''),
    facebook_url = COALESCE(EXCLUDED.facebook_url, z.facebook_url),
    scrape_status = EXCLUDED.scrape_status,
    scrape_count = z.scrape_count + 1,
    updated_at = now()
"""


def seed_params(rec: dict[str, Any]) -> tuple[Any, ...]:
    link = rec["source_link"]
    return (
        keys.hashtext(link), link, rec["business_name"], rec["business_category"],
        rec["website"], rec["country_code"], rec["city"], rec["address"], rec["latitude"],
        rec["longitude"], rec["rating"], rec["reviews_count"], rec["maps_phone"],
        rec["emails"], rec["phones"], rec["whatsapp"], rec["facebook_url"],
        rec["scrape_status"],
    )  # fmt: skip


def copy_tuple(rec: dict[str, Any]) -> tuple[Any, ...]:
    from psycopg.types.json import Jsonb

    vals = [keys.hashtext(rec["source_link"])]
    for c in COPY_COLUMNS[1:]:
        v = rec[c]
        if c == "opening_hours":
            v = Jsonb(v)
        elif c == "rating":
            from decimal import Decimal

            v = Decimal(str(v))
        vals.append(v)
    return tuple(vals)


def settle(dsn: str) -> None:
    """VACUUM and CHECKPOINT, so that each pass of updates starts from the same state:
    no dead row versions left by the previous pass, no full-page writes pending."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM zen_contacts")
        conn.execute("CHECKPOINT")


def truncate(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE zen_contacts, zen_rejects")
        conn.execute("CHECKPOINT")


def run_copy(dsn: str, rows: int, size: int) -> float:
    total = 0.0
    with psycopg.connect(dsn) as conn:
        for batch in batches(rows, size, 0):
            tuples = [copy_tuple(r) for r in batch]
            t = time.perf_counter()
            with conn.cursor() as cur:
                cols = ", ".join(COPY_COLUMNS)
                with cur.copy(f"COPY zen_contacts ({cols}) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(COPY_TYPES)
                    for tup in tuples:
                        cp.write_row(tup)
            conn.commit()
            total += time.perf_counter() - t
    return total


def run_seed(dsn: str, rows: int, *, many: bool) -> float:
    total = 0.0
    with psycopg.connect(dsn, autocommit=not many) as conn:
        for batch in batches(rows, 100, 0):
            params = [seed_params(r) for r in batch]
            t = time.perf_counter()
            with conn.cursor() as cur:
                if many:
                    cur.executemany(SEED_UPSERT, params)
                    conn.commit()
                else:
                    for p in params:
                        cur.execute(SEED_UPSERT, p)
            total += time.perf_counter() - t
    return total


def run_zenpipe(
    dsn: str, rows: int, size: int, version: int, *, parallel: int = 1, chunk: int = 1000
) -> dict[str, float]:
    """Seconds of the upsert calls (records generated outside the clock), with the
    Python-side CPU seconds (routing, validation, COPY rows; `UpsertReport`
    ``prepare_seconds``) and the part of it the writer waited for."""
    total = python = waited = 0.0
    written = 0
    with Upserter(
        dsn, server_id="bench", max_array_items=10_000, parallel=parallel, chunk_rows=chunk
    ) as up:
        for batch in batches(rows, size, version):
            t = time.perf_counter()
            report = up.upsert(batch)
            total += time.perf_counter() - t
            written += report.written
            python += report.prepare_seconds
            waited += report.prepare_wait_seconds
    assert written == rows, (written, rows)
    return {"seconds": total, "python_seconds": python, "python_wait_seconds": waited}


def _validated_chunks(up: Upserter, batch: list[dict[str, Any]]) -> list[Any]:
    """The batch routed, sorted and validated as `Upserter.upsert` would (its chunks)."""
    return list(up._prepare(batch).chunks())


def run_copy_path(dsn: str, rows: int, size: int, *, build: bool) -> float:
    """Seconds of zenpipe's COPY path statements for fresh rows validated before the
    clock: with *build*, building the COPY rows inside the clock, else before it."""
    total = 0.0
    with Upserter(dsn, server_id="bench", max_array_items=10_000, chunk_rows=size) as up:
        q = up._queries
        with up._pool.connection() as conn:
            for batch in batches(rows, size, 0):
                chunks = [c.rows for c in _validated_chunks(up, batch)]
                ready = None if build else [_copy_rows(r) for r in chunks]
                t = time.perf_counter()
                built = [_copy_rows(r) for r in chunks] if ready is None else ready
                with conn.cursor() as cur:
                    cur.execute(q["copy_clock"]).fetchone()
                    cur.execute(q["savepoint"])
                    with up._copy_cursor(conn) as copy_cur:
                        for c in built:
                            assert c is not None
                            with copy_cur.copy(up._copy_sql) as cp:
                                cp.set_types(_COPY_PATH_TYPES)
                                for tup in c.tuples:
                                    cp.write_row(tup)
                    cur.execute(q["release"])
                conn.commit()
                total += time.perf_counter() - t
    return total


def run_merge_ready(dsn: str, rows: int, size: int, version: int) -> float:
    """Seconds of zenpipe's merge statements (`merge_rows`) for re-observed rows whose
    parameters were built (validated, routed, arrays encoded) before the clock."""
    total = 0.0
    written = 0
    with Upserter(dsn, server_id="bench", max_array_items=10_000, chunk_rows=size) as up:
        merge = up._queries["merge_rows"]
        with up._pool.connection() as conn:
            for batch in batches(rows, size, version):
                params = [
                    up._round_params(r)
                    for c in _validated_chunks(up, batch)
                    for r in _chunk_rounds(c, 0)
                ]
                t = time.perf_counter()
                with conn.cursor() as cur:
                    for p in params:
                        written += len(cur.execute(merge, p).fetchall())
                conn.commit()
                total += time.perf_counter() - t
    assert written == rows, (written, rows)
    return total


def big_row_costs(dsn: str, emails: int, reps: int) -> dict[str, float]:
    """Milliseconds per re-upsert of a row that already holds *emails* emails."""
    link = "https://big/row"
    out: dict[str, float] = {}
    with Upserter(dsn, server_id="bench", max_array_items=emails + reps + 10) as up:
        up.upsert([{"source_link": link, "emails": [f"e{i:06d}@x.example" for i in range(emails)]}])
        t = time.perf_counter()
        for _ in range(reps):
            up.upsert([{"source_link": link, "emails": ["e000001@x.example"]}])
        out["nothing_new_ms"] = (time.perf_counter() - t) / reps * 1000
        t = time.perf_counter()
        for k in range(reps):
            up.upsert([{"source_link": link, "emails": [f"new{k}@x.example"]}])
        out["one_new_ms"] = (time.perf_counter() - t) / reps * 1000
        t = time.perf_counter()
        for _ in range(reps):
            up.upsert([{"source_link": "https://small/row", "emails": ["a@x.example"]}])
        out["small_row_ms"] = (time.perf_counter() - t) / reps * 1000
    return out


MERGED_COLUMNS = [
    *SCALAR_COLUMNS,
    "emails", "phones", "whatsapp", "observed_us", "observed_at", "scrape_count",
]  # fmt: skip


def snapshot_floor_stage(dsn: str, size: int) -> None:
    """The final values of every merged column, precomputed (untimed), in a plain
    analyzed staging table numbered by batch: what the floor UPDATE sets."""
    cols = psycopg.sql.SQL(", ").join(psycopg.sql.Identifier(c) for c in MERGED_COLUMNS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS floor_stage")
        conn.execute(
            psycopg.sql.SQL(
                "CREATE TABLE floor_stage AS SELECT (row_number() OVER () - 1) / {} AS batch_no, "
                "partition_key, source_link, {} FROM zen_contacts"
            ).format(psycopg.sql.Literal(size), cols)
        )
        conn.execute("CREATE INDEX ON floor_stage (batch_no)")
        conn.execute("ANALYZE floor_stage")
        conn.execute("CHECKPOINT")


def run_update_floor(dsn: str, rows: int, size: int) -> float:
    """The floor of any merge: one bare ``UPDATE zen_contacts ... FROM`` a staging table
    per batch, setting the merged columns to their precomputed values (and updated_at,
    as the merge does), committed per batch.

    Its plan is pinned to what a floor is: each staged row finds its row by the unique
    index (a nested loop; the merge's ON CONFLICT probes the same index), and after five
    batches psycopg prepares the statement (the merge is prepared too).  Left to itself
    the planner hashes the whole of zen_contacts for every 1,000-row batch (a sequential
    scan of every partition: quadratic in the table's size), which made the "floor" of
    earlier runs 2-8 times slower than the index path at 100,000 rows."""
    sets = psycopg.sql.SQL(", ").join(
        psycopg.sql.SQL("{} = s.{}").format(psycopg.sql.Identifier(c), psycopg.sql.Identifier(c))
        for c in MERGED_COLUMNS
    )
    stmt = psycopg.sql.SQL(
        "UPDATE zen_contacts AS c SET {}, updated_at = now() FROM floor_stage AS s "
        "WHERE s.batch_no = %s AND c.source_link = s.source_link "
        "AND c.partition_key = s.partition_key"
    ).format(sets)
    total = 0.0
    done = 0
    with psycopg.connect(dsn) as conn:
        conn.execute("SET enable_hashjoin = off")
        conn.execute("SET enable_mergejoin = off")
        conn.commit()
        for k in range((rows + size - 1) // size):
            t = time.perf_counter()
            done += conn.execute(stmt, (k,)).rowcount
            conn.commit()
            total += time.perf_counter() - t
    assert done == rows, (done, rows)
    return total


def _wal_segments(dsn: str) -> int | None:
    """Files in pg_wal (None without the right to list it: pg_monitor or superuser)."""
    with psycopg.connect(dsn) as conn:
        try:
            row = conn.execute("SELECT count(*) FROM pg_ls_waldir()").fetchone()
        except psycopg.errors.InsufficientPrivilege:
            return None
    return int(row[0]) if row else None


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="records per upsert call")
    add_repetitions(parser)
    parser.add_argument("--chunk", type=int, default=CHUNK_ROWS, help="Upserter chunk_rows")
    args = parser.parse_args()
    rows, size = args.rows, args.batch
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with server(args.dsn) as server_dsn, fresh_database(server_dsn) as dsn:
        # every method once per repetition, in turn, after the untimed warm-up ones (on
        # a new server the update floor's first pass ran at a third of its later rate)
        for rep in repetitions(args):
            wal = _wal_segments(dsn)
            truncate(dsn)
            copy_s = run_copy(dsn, rows, size)
            truncate(dsn)
            ready_s = run_copy_path(dsn, rows, size, build=False)
            truncate(dsn)
            built_s = run_copy_path(dsn, rows, size, build=True)
            truncate(dsn)
            fresh = run_zenpipe(dsn, rows, size, 0, chunk=args.chunk)
            settle(dsn)
            conflict = run_zenpipe(dsn, rows, size, 1, chunk=args.chunk)
            snapshot_floor_stage(dsn, size)
            settle(dsn)
            floor_s = run_update_floor(dsn, rows, size)
            settle(dsn)
            merge_s = run_merge_ready(dsn, rows, size, 2)
            run = {
                "rep": rep,
                "wal_segments_before": wal,
                "copy_rows_per_s": rows / copy_s,
                "fresh_rows_per_s": rows / fresh["seconds"],
                "conflict_rows_per_s": rows / conflict["seconds"],
                "update_floor_rows_per_s": rows / floor_s,
                "copy_path_ready_rows_per_s": rows / ready_s,
                "copy_path_built_rows_per_s": rows / built_s,
                "merge_ready_rows_per_s": rows / merge_s,
                "fresh_python_cpu_ms_per_1000": fresh["python_seconds"] / rows * 1e6,
                "conflict_python_cpu_ms_per_1000": conflict["python_seconds"] / rows * 1e6,
            }
            run["fresh_x_copy"] = run["fresh_rows_per_s"] / run["copy_rows_per_s"]
            run["conflict_x_floor"] = run["conflict_rows_per_s"] / run["update_floor_rows_per_s"]
            run["copy_path_ready_x_copy"] = copy_s / ready_s
            run["copy_path_built_x_copy"] = copy_s / built_s
            run["merge_ready_x_floor"] = floor_s / merge_s
            print(run, flush=True)
            if rep >= 0:
                runs.append(run)
        with psycopg.connect(dsn) as conn:
            check = conn.execute(
                "SELECT count(*), min(emails_count), max(emails_count), min(scrape_count), "
                "max(scrape_count) FROM zen_contacts"
            ).fetchone()
    summary = {
        k: _spread([r[k] for r in runs]) for k in runs[0] if k not in {"rep", "wal_segments_before"}
    }
    table = [
        {"figure": k, "median": v["median"], "min": v["min"], "max": v["max"]}
        for k, v in summary.items()
    ]
    report = {
        "rows": rows,
        "batch": size,
        "reps": args.reps,
        "warmup": args.warmup,
        "durable": True,
        "summary": summary,
        "runs": runs,
        "after_check": list(check) if check else None,
        "peak_rss_mb": peak_rss_mb(),
        "targets": {
            "fresh_x_copy>=0.8": summary["fresh_x_copy"]["median"] >= 0.8,
            "conflict_x_update_floor>=0.9": summary["conflict_x_floor"]["median"] >= 0.9,
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    write_report("bench_upsert", args.out, report, table)
    print(f"targets: {report['targets']}")


if __name__ == "__main__":
    main()
