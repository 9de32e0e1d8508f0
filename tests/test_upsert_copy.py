"""The writer's COPY path (issue 10): a chunk of fresh rows sent by binary COPY gives
exactly the rows the merge gives, and any conflict or refused row falls back to the
merge with the same outcome (rows, rejects, report)."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from helpers import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from zenpipe import queries
from zenpipe.keys import route
from zenpipe.upsert import _COPY_COLUMNS, Upserter, _Chunk
from zenpipe.validate import MAX_FUTURE_US

T0 = datetime(2025, 6, 1, tzinfo=UTC)
TEXTS = ["plain", 'a "quoted" one', "back\\slash", "{braces,comma}", "NULL", " sp ", "é漢字🙂"]
RATINGS = [0.0, 0.05, 0.15, 0.25, 0.35, 2.45, 2.55, 4.94999, 4.95, 5.0, 1 / 3, 2 / 3]


def _columns(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'zen_contacts' AND table_schema = current_schema() "
        "ORDER BY ordinal_position"
    ).fetchall()
    return [r[0] for r in rows]


def snapshot(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Every column of every row, in insertion order, but the id (a COPY rolled back
    uses up sequence values) and the two clocks, which differ from one transaction to
    the next (compared: whether they are equal, the row made by the write's transaction
    and last changed by it)."""
    conn.rollback()
    cols = [c for c in _columns(conn) if c not in ("id", "created_at", "updated_at")]
    query = sql.SQL("SELECT {}, created_at = updated_at FROM zen_contacts ORDER BY id").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    )
    rows = conn.execute(query).fetchall()
    conn.rollback()
    return rows


def rejects(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    conn.rollback()
    rows = conn.execute(
        "SELECT server_id, row_index, source_link, field, reason, detail, problems, payload, "
        "payload_is_repr FROM zen_rejects ORDER BY row_index"
    ).fetchall()
    conn.rollback()
    return rows


def reset(conn: psycopg.Connection[Any]) -> None:
    conn.rollback()
    conn.execute("TRUNCATE zen_contacts, zen_rejects RESTART IDENTITY")
    conn.commit()


def record(r: random.Random, link: str, sids: list[int]) -> dict[str, Any]:
    """A record with a random subset of the fields, tricky values included."""
    rec: dict[str, Any] = {"source_link": link}
    tz = timezone(timedelta(hours=r.choice([0, 7, -5])))
    rec["observed_at"] = (T0 + timedelta(microseconds=r.randint(-(10**13), 10**12))).astimezone(tz)
    optional: dict[str, Callable[[], Any]] = {
        "source_id": lambda: r.choice(sids),
        "business_name": lambda: r.choice(TEXTS),
        "business_category": lambda: r.choice(["Cafe", "Dentist"]),
        "website": lambda: "https://x.example/" + r.choice(TEXTS),
        "description": lambda: r.choice(TEXTS) * r.randint(1, 3),
        "price_level": lambda: r.randint(1, 4),
        "country_code": lambda: r.choice(["ID", "SG"]),
        "city": lambda: r.choice(TEXTS),
        "latitude": lambda: r.uniform(-90, 90),
        "longitude": lambda: r.choice([r.uniform(-180, 180), -0.0, 180.0]),
        "rating": lambda: r.choice([*RATINGS, r.uniform(0, 5)]),
        "reviews_count": lambda: r.randint(0, 2**31 - 1),
        "maps_phone": lambda: "+62 21 5550 123",
        "opening_hours": lambda: r.choice(
            [{}, {"mon": "08-17", "n": [1, 2.5, None, True]}, {"ü": {"nested": "\"'\\"}}]
        ),
        "photos_count": lambda: r.randint(0, 300),
        "is_claimed": lambda: r.random() < 0.5,
        "emails_validated": lambda: {"a@x.example": r.random() < 0.5},
        "primary_email": lambda: "Boss@X.example",
        "whatsapp_validated": lambda: {"+6281100": True},
        "facebook_url": lambda: r.choice(TEXTS),
        "website_status_code": lambda: r.choice([200, 404, 599]),
        "pages_crawled": lambda: r.randint(0, 20),
        "scrape_status": lambda: r.choice(["success", "partial", "failed"]),
        "scrape_error": lambda: r.choice(TEXTS),
    }
    for name, make in optional.items():
        if r.random() < 0.6:
            rec[name] = make()
    pool = ["a@x.example", "B@x.example", 'q"o@x.example', "z@y.example"]
    rec["emails"] = r.sample(pool, r.randint(0, 3))
    if r.random() < 0.7:
        rec["phones"] = r.sample(["+6281100", "+6281199", "(021) 555-1"], r.randint(0, 2))
    if r.random() < 0.5:
        rec["whatsapp"] = ["+6281100"]
    return rec


def batch(seed: int, n: int, sids: list[int], *, repeats: bool = True) -> list[dict[str, Any]]:
    r = random.Random(seed)
    links = [f"https://copy/{seed}/{i}" for i in range(n)]
    if repeats:  # some links twice or three times: later rounds of the same chunk
        links += r.sample(links, n // 5) + r.sample(links, n // 10)
        r.shuffle(links)
    return [record(r, link, sids) for link in links]


def results(conn: psycopg.Connection[Any], n: int) -> list[int]:
    rows = conn.execute(
        "INSERT INTO results (link, data) SELECT 'https://r/' || g, '{}' "
        "FROM generate_series(1, %s) g RETURNING id",
        (n,),
    ).fetchall()
    conn.commit()
    return [r[0] for r in rows]


def write(up: Upserter, dsn: str, records: list[dict[str, Any]], how: str) -> Any:
    """Write *records* by the fast path (plain upsert) or the careful one (conn=)."""
    if how == "fast":
        return up.upsert(records)
    with psycopg.connect(dsn) as conn:
        report = up.upsert(records, conn=conn)
        conn.commit()
    return report


def both_ways(
    dsn: str,
    conn: psycopg.Connection[Any],
    records: list[dict[str, Any]],
    *,
    how: str = "fast",
    chunk_rows: int = 1000,
    before: Callable[[], None] = lambda: None,
) -> tuple[Any, Any, Upserter]:
    """The same batch written by the merge path and by the COPY path, each on the same
    starting state: (snapshots and rejects, reports, the COPY upserter)."""
    out = []
    reports = []
    kept = None
    for copy_rows in (None, 1):
        reset(conn)
        before()
        with Upserter(dsn, server_id="s", copy_rows=copy_rows, chunk_rows=chunk_rows) as up:
            reports.append(write(up, dsn, records, how))
            kept = up
        out.append((snapshot(conn), rejects(conn)))
    assert kept is not None
    return out, reports, kept


def _same_reports(a: Any, b: Any) -> None:
    assert (a.written, a.merged_in_batch, a.rejected) == (b.written, b.merged_in_batch, b.rejected)
    assert a.rejections == b.rejections
    assert a.reasons == b.reasons


# -- the two paths agree -----------------------------------------------------------------


def test_copy_columns_are_the_merges_inserted_columns() -> None:
    merge = queries.load("upsert")["merge_rows"].as_string()
    m = re.search(r"INSERT INTO zen_contacts AS c \((.*?)\)\s*SELECT", merge, re.S)
    assert m is not None
    inserted = [c.strip() for c in m.group(1).split(",")]
    assert inserted == [*_COPY_COLUMNS, "updated_at"]


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 40),
    how=st.sampled_from(["fast", "careful"]),
    chunk_rows=st.sampled_from([7, 1000]),
)
def test_copy_path_writes_what_the_merge_writes(
    dsn: str, postgresql: psycopg.Connection[Any], *, seed: int, n: int, how: str, chunk_rows: int
) -> None:
    sids = results(postgresql, 3)
    records = batch(seed, n, sids)
    (merged, copied), reports, up = both_ways(
        dsn, postgresql, records, how=how, chunk_rows=chunk_rows
    )
    assert copied == merged
    _same_reports(*reports)
    assert up.copy_attempts >= 1
    assert up.copy_fallbacks == 0


@pytest.mark.parametrize("how", ["fast", "careful"])
def test_copy_path_table_of_values(dsn: str, postgresql: psycopg.Connection[Any], how: str) -> None:
    """Every tricky value at least once: ratings on the rounding edge, quotes and
    backslashes in arrays, empty and nested JSON, missing optional fields, far times."""
    sids = results(postgresql, 2)
    records: list[dict[str, Any]] = [
        {"source_link": f"https://t/r{i}", "observed_at": T0, "rating": v}
        for i, v in enumerate(RATINGS)
    ]
    records += [
        {"source_link": "https://t/bare", "observed_at": T0},
        {"source_link": "https://t/old", "observed_at": datetime(1700, 1, 1, tzinfo=UTC)},
        {
            "source_link": "https://t/1969",
            "observed_at": datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        },
        {
            "source_link": "https://t/arrays",
            "observed_at": T0 + timedelta(microseconds=1),
            "emails": ['q"o@x.example', "b@x.example", "A@x.example"],
            "phones": ["+6281100", "(021) 555-1"],
            "whatsapp": [],
            "opening_hours": {"a": {"b": [1, "\\", '"']}},
            "emails_validated": {},
            "source_id": sids[1],
            "scrape_status": "failed",
        },
        {"source_link": "https://t/arrays", "observed_at": T0, "emails": ["n@x.example"]},
        {"source_link": "https://t/bad", "observed_at": T0, "price_level": 9},  # rejected
    ]
    (merged, copied), reports, up = both_ways(dsn, postgresql, records, how=how)
    assert copied == merged
    _same_reports(*reports)
    assert reports[1].rejected == 1, reports[1].rejections
    assert up.copy_attempts == 1 and up.copy_fallbacks == 0


def test_rows_without_observed_at_are_merged_not_copied(dsn: str) -> None:
    records: list[dict[str, Any]] = [
        {"source_link": f"https://o/{i}", "observed_at": T0} for i in range(10)
    ]
    records[3] = {"source_link": "https://o/3"}  # the database clock decides: merge
    with Upserter(dsn, server_id="s", copy_rows=1) as up:
        assert up.upsert(records).written == 10
        assert up.copy_attempts == 0


def test_observation_past_the_database_future_guard_is_not_copied(dsn: str) -> None:
    with Upserter(dsn, server_id="s", copy_rows=1) as up:
        row = (0, 0, 1, "https://f/", 10**15, *([None] * 44), [], [], [])
        chunk = _Chunk([row], [[0]], [], 0, 0.0)
        assert up._copy_tuples(chunk, 10**15 - MAX_FUTURE_US) is not None
        assert up._copy_tuples(chunk, 10**15 - MAX_FUTURE_US - 1) is None


# -- fallbacks ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fast", "careful"])
def test_existing_link_falls_back_to_the_merge(
    dsn: str, postgresql: psycopg.Connection[Any], how: str
) -> None:
    sids = results(postgresql, 3)
    records = batch(7, 40, sids)
    records.append({"source_link": "https://t/bad", "observed_at": T0, "country_code": "x"})
    existing = records[len(records) // 2]["source_link"]

    def before() -> None:
        with Upserter(dsn, server_id="old", copy_rows=None) as up:
            up.upsert([{"source_link": existing, "observed_at": T0, "city": "Old", "emails": []}])

    (merged, copied), reports, up = both_ways(dsn, postgresql, records, how=how, before=before)
    assert copied == merged
    _same_reports(*reports)
    assert reports[1].rejected == 1
    assert up.copy_attempts == 1 and up.copy_fallbacks == 1
    got = postgresql.execute(
        "SELECT scrape_count FROM zen_contacts WHERE source_link = %s", (existing,)
    ).fetchone()
    assert got == (1 + sum(r["source_link"] == existing for r in records),)


def test_unknown_source_id_is_rejected_as_before(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    sids = results(postgresql, 3)
    records = batch(11, 30, sids, repeats=False)
    records[5]["source_id"] = 10**12  # no such results row
    (merged, copied), reports, up = both_ways(dsn, postgresql, records)
    assert copied == merged
    _same_reports(*reports)
    assert [(r.field, r.reason) for r in reports[1].rejections] == [
        ("source_id", "unknown_source_id")
    ]
    assert up.copy_attempts == 1 and up.copy_fallbacks == 1


def test_concurrent_insert_of_the_same_link_is_waited_for_then_merged(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    link = "https://race/0"
    records = [{"source_link": f"https://race/{i}", "observed_at": T0} for i in range(1, 20)]
    records.append({"source_link": link, "observed_at": T0 + timedelta(hours=1), "city": "New"})
    done: list[Any] = []
    with (
        psycopg.connect(dsn) as other,
        Upserter(dsn, server_id="ours", copy_rows=1) as up,
        Upserter(dsn, server_id="theirs", copy_rows=None) as them,
    ):
        other_pid = other.info.backend_pid
        them.upsert([{"source_link": link, "observed_at": T0, "business_name": "Old"}], conn=other)

        def ours() -> None:
            done.append(up.upsert(records))

        t = threading.Thread(target=ours)
        t.start()
        try:
            wait_for(
                lambda: (
                    postgresql.execute(
                        "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) "
                        "WHERE NOT l.granted AND a.pid <> %s AND a.datname = current_database() "
                        "AND a.query LIKE 'COPY%%'",
                        (other_pid,),
                    ).fetchone()[0]  # type: ignore[index]
                    > 0
                )
            )
            postgresql.rollback()
            assert up.copy_attempts == 1 and not done
        finally:
            other.commit()
            t.join(60)
    assert done and done[0].written == 20
    assert up.copy_fallbacks == 1
    row = postgresql.execute(
        "SELECT business_name, city, scrape_count, last_scrape_server FROM zen_contacts "
        "WHERE source_link = %s",
        (link,),
    ).fetchone()
    assert row == ("Old", "New", 2, "ours")
    n = postgresql.execute("SELECT count(*), sum(scrape_count) FROM zen_contacts").fetchone()
    assert n == (20, 21)


def test_fallbacks_back_off(dsn: str, postgresql: psycopg.Connection[Any]) -> None:
    """After a COPY that falls back, the next 1, 2, 4 ... candidate chunks are merged
    without trying; a COPY that succeeds resets the back-off."""
    attempts = []
    with Upserter(dsn, server_id="s", copy_rows=1) as up:

        def call(k: int, *, conflict: bool) -> None:
            recs = [{"source_link": f"https://b/{k}/{i}", "observed_at": T0} for i in range(5)]
            if conflict:
                recs.append({"source_link": "https://b/seen", "observed_at": T0})
            assert up.upsert(recs).written == len(recs)
            attempts.append((up.copy_attempts, up.copy_fallbacks))

        call(0, conflict=True)  # fresh: the row the next calls conflict with
        for k in range(1, 8):
            call(k, conflict=True)
        for k in range(8, 14):
            call(k, conflict=False)
    assert attempts == [
        (1, 0),  # fresh: copied
        (2, 1),  # conflict: fell back, skip 1
        (2, 1),  # skipped
        (3, 2),  # conflict: fell back, skip 2
        (3, 2),
        (3, 2),
        (4, 3),  # conflict: fell back, skip 4
        (4, 3),
        (4, 3),  # fresh from here on, still skipped
        (4, 3),
        (4, 3),
        (5, 3),  # copied: back-off reset
        (6, 3),
        (7, 3),
    ]
    total = postgresql.execute("SELECT count(*), sum(scrape_count) FROM zen_contacts").fetchone()
    assert total == (14 * 5 + 1, 14 * 5 + 1 + 7)


def test_copy_path_off_below_copy_rows(dsn: str) -> None:
    with Upserter(dsn, server_id="s", copy_rows=50) as up:
        up.upsert([{"source_link": f"https://s/{i}", "observed_at": T0} for i in range(49)])
        assert up.copy_attempts == 0
        up.upsert([{"source_link": f"https://s2/{i}", "observed_at": T0} for i in range(50)])
        assert up.copy_attempts == 1
    with pytest.raises(ValueError):
        Upserter(dsn, server_id="s", copy_rows=0)


# -- chunks share one COPY ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["fast", "careful"])
def test_consecutive_chunks_share_one_copy(
    dsn: str, postgresql: psycopg.Connection[Any], how: str
) -> None:
    """The first rounds of consecutive candidate chunks go in one COPY (the server stores
    each while the next is validated), with the same rows as the merge."""
    sids = results(postgresql, 3)
    records = batch(21, 60, sids)  # 84 records, repeated links included: later rounds
    (merged, copied), reports, up = both_ways(dsn, postgresql, records, how=how, chunk_rows=9)
    assert copied == merged
    _same_reports(*reports)
    assert (up.copy_attempts, up.copy_fallbacks) == (1, 0)


@pytest.mark.parametrize("how", ["fast", "careful"])
def test_a_chunk_that_cannot_be_copied_ends_the_copy(
    dsn: str, postgresql: psycopg.Connection[Any], how: str
) -> None:
    """A chunk with a record COPY cannot write exactly (an observation time the merge
    computes in float8) is merged between two COPYs."""
    records: list[dict[str, Any]] = [
        {"source_link": f"https://run/{i:03d}", "observed_at": T0, "city": f"c{i}"}
        for i in range(60)
    ]
    # the sorted order is by partition first: take a record from the middle of it
    order = sorted(range(60), key=lambda i: _sort_key(records[i]["source_link"]))
    records[order[30]]["observed_at"] = datetime(1500, 1, 1, tzinfo=UTC)
    (merged, copied), reports, up = both_ways(dsn, postgresql, records, how=how, chunk_rows=10)
    assert copied == merged
    _same_reports(*reports)
    assert (up.copy_attempts, up.copy_fallbacks) == (2, 0)


def test_copy_rows_counts_the_whole_call(dsn: str, postgresql: psycopg.Connection[Any]) -> None:
    with Upserter(dsn, server_id="s", copy_rows=50, chunk_rows=20) as up:
        up.upsert([{"source_link": f"https://w/{i}", "observed_at": T0} for i in range(49)])
        assert up.copy_attempts == 0
        up.upsert([{"source_link": f"https://w2/{i}", "observed_at": T0} for i in range(50)])
        assert up.copy_attempts == 1
    total = postgresql.execute("SELECT count(*) FROM zen_contacts").fetchone()
    assert total == (99,)


def _sort_key(link: str) -> tuple[int, int, str]:
    (key,), (part,) = route([link])
    return part, key, link
