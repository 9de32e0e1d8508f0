"""The writer against a real PostgreSQL: routing, merge rules, rejects, retries."""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from helpers import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zenpipe import keys, queries
from zenpipe.claim import Claimer
from zenpipe.config import Settings
from zenpipe.errors import EmptyBatchError, UpsertError
from zenpipe.pool import guarded_pool
from zenpipe.upsert import SCALAR_COLUMNS, Upserter

T0 = datetime(2025, 6, 1, tzinfo=UTC)

# Every column except the ones that depend on when or by whom-in-time the row was made.
SNAPSHOT = """
SELECT source_link, partition_key, source_id, business_name, business_category, website,
       country_code, city, latitude, longitude, rating, reviews_count, maps_phone,
       opening_hours, is_claimed, emails_validated, primary_email, scrape_status,
       last_scrape_server, emails, emails_count, phones, phones_count, whatsapp,
       whatsapp_count, observed_us, observed_at, scrape_count
FROM zen_contacts ORDER BY source_link
"""


@pytest.fixture
def upserter(dsn: str) -> Iterator[Upserter]:
    with Upserter(dsn, server_id="srv-a") as up:
        yield up


def snapshot(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    conn.rollback()
    rows = conn.execute(SNAPSHOT).fetchall()
    conn.rollback()
    return rows


def one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params or None).fetchone()
    conn.rollback()
    assert row is not None
    return row[0] if len(row) == 1 else row


def test_sql_column_order_matches_python(postgresql: psycopg.Connection[Any]) -> None:
    merge = queries.load("upsert")["merge_rows"].as_string()
    picked = re.findall(r"(\w+) = zen_pick_v1\(c\.\1, c\.observed_us\[(\d+)\]", merge)
    assert [(c, int(i)) for c, i in picked] == [(c, i + 1) for i, c in enumerate(SCALAR_COLUMNS)]
    # the staged arrays, unnest()ed in the same order as the observation slots
    staged = re.search(r"AS u \(([^)]*)\)", merge)
    assert staged is not None
    assert ", ".join(SCALAR_COLUMNS) in " ".join(staged.group(1).split())
    # Every column of the table is either merged here, derived, or bookkeeping.
    cols = {
        r[0]
        for r in postgresql.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'zen_contacts'::regclass "
            "AND attnum > 0 AND NOT attisdropped"
        )
    }
    handled = set(SCALAR_COLUMNS) | {
        "id",
        "partition_key",
        "source_link",
        "emails",
        "phones",
        "whatsapp",
        "emails_count",
        "phones_count",
        "whatsapp_count",
        "has_email",
        "has_phone",
        "has_whatsapp",
        "observed_us",
        "observed_at",
        "scrape_count",
        "created_at",
        "updated_at",
    }
    assert cols == handled


def test_batch_lands_merged_with_counts_equal_to_lengths(
    upserter: Upserter, postgresql: psycopg.Connection[Any]
) -> None:
    recs = [
        {
            "source_link": f"https://maps/{i}",
            "emails": [f"U{i}@X.com", "a@x.com"],
            "phones": ["+62 811 000", "0062811000"],
            "observed_at": T0,
            "business_name": f"B{i}",
        }
        for i in range(300)
    ]
    report = upserter.upsert(recs)
    assert (report.written, report.rejected, report.merged_in_batch) == (300, 0, 0)
    # The idempotency key (issue 8) and one merge of bound arrays per chunk (issue 10: no
    # staging table to create, fill and drop): no per-row round trip.
    chunks = -(-300 // upserter.chunk_rows)
    assert chunks == 2  # the default chunk_rows, 250
    assert report.statements == 1 + chunks
    report = upserter.upsert(
        [
            {"source_link": f"https://maps/{i}", "emails": [f"new{i}@x.com", "a@x.com"]}
            for i in range(300)
        ]
    )
    assert report.written == 300
    bad = one(
        postgresql,
        "SELECT count(*) FROM zen_contacts WHERE emails_count <> cardinality(emails) "
        "OR phones_count <> cardinality(phones) OR scrape_count <> 2 "
        'OR emails <> ARRAY(SELECT DISTINCT e COLLATE "C" FROM unnest(emails) e ORDER BY 1)',
    )
    assert bad == 0
    row = one(
        postgresql,
        "SELECT emails, phones, partition_key FROM zen_contacts "
        "WHERE source_link = 'https://maps/7'",
    )
    assert row == (
        ["a@x.com", "new7@x.com", "u7@x.com"],
        ["+62811000"],
        keys.partition_key("https://maps/7"),
    )


def test_rows_land_in_the_partition_keys_predict(
    upserter: Upserter, postgresql: psycopg.Connection[Any]
) -> None:
    links = [f"https://l/{i}" for i in range(200)]
    upserter.upsert([{"source_link": link} for link in links])
    rows = postgresql.execute(
        "SELECT source_link, tableoid::regclass::text FROM zen_contacts"
    ).fetchall()
    assert {link: keys.partition_table(link) for link in links} == dict(rows)


def test_duplicate_links_in_one_batch_merge_like_separate_writes(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    recs = [
        {
            "source_link": "https://dup",
            "business_name": "old",
            "emails": ["a@x.com"],
            "observed_at": T0,
        },
        {
            "source_link": "https://dup",
            "business_name": "new",
            "city": "Bandung",
            "emails": ["b@x.com"],
            "observed_at": T0 + timedelta(hours=1),
        },
        {
            "source_link": "https://dup",
            "business_name": None,
            "city": "Jakarta",
            "observed_at": T0 - timedelta(hours=1),
        },
        {"source_link": "https://other", "observed_at": T0},
    ]
    with Upserter(dsn, server_id="s") as up:
        report = up.upsert(recs)
    assert (report.written, report.merged_in_batch) == (4, 2)
    together = snapshot(postgresql)
    postgresql.execute("TRUNCATE zen_contacts")
    postgresql.commit()
    with Upserter(dsn, server_id="s") as up:
        for rec in reversed(recs):
            up.upsert([rec])
    assert snapshot(postgresql) == together
    row = one(
        postgresql,
        "SELECT business_name, city, emails, scrape_count FROM zen_contacts "
        "WHERE source_link = 'https://dup'",
    )
    assert row == ("new", "Bandung", ["a@x.com", "b@x.com"], 3)


def test_newest_observation_wins_and_null_never_erases(
    upserter: Upserter, postgresql: psycopg.Connection[Any]
) -> None:
    link = "https://x"
    upserter.upsert(
        [
            {
                "source_link": link,
                "business_name": "new",
                "rating": 4.0,
                "observed_at": T0 + timedelta(days=1),
            }
        ]
    )
    upserter.upsert(
        [
            {
                "source_link": link,
                "business_name": "stale",
                "rating": 2.0,
                "city": "Depok",
                "observed_at": T0,
            }
        ]
    )
    upserter.upsert(
        [
            {
                "source_link": link,
                "business_name": None,
                "rating": None,
                "observed_at": T0 + timedelta(days=2),
            }
        ]
    )
    row = one(
        postgresql,
        "SELECT business_name, rating::float8, city, scrape_count, observed_at FROM zen_contacts",
    )
    assert row == ("new", 4.0, "Depok", 3, T0 + timedelta(days=2))
    # Equal observation times: the greater value wins, whatever the order.
    upserter.upsert([{"source_link": link, "city": "Aceh", "observed_at": T0}])
    assert one(postgresql, "SELECT city FROM zen_contacts") == "Depok"


def test_sql_looking_strings_are_stored_verbatim(
    upserter: Upserter, postgresql: psycopg.Connection[Any]
) -> None:
    evil = "x'); DROP TABLE zen_contacts; -- $$ %s %(round)s \\ \"'"
    report = upserter.upsert(
        [
            {
                "source_link": evil,
                "business_name": evil,
                "opening_hours": {evil: evil},
                "emails": ["o'neil');DROP--TABLE@x.com"],
            }
        ]
    )
    assert report.written == 1
    row = one(
        postgresql, "SELECT source_link, business_name, opening_hours, emails FROM zen_contacts"
    )
    assert row == (evil, evil, {evil: evil}, ["o'neil');drop--table@x.com"])


BAD_RECORDS: list[tuple[dict[str, Any], str, str]] = [
    ({"source_link": "https://b/1", "country_code": "IDN"}, "country_code", "bad_country_code"),
    ({"source_link": "https://b/2", "latitude": 91.0}, "latitude", "out_of_range"),
    ({"source_link": "https://b/3", "rating": float("nan")}, "rating", "not_finite"),
    ({"source_link": "https://b/4", "business_name": "a\x00b"}, "business_name", "nul_byte"),
    ({"source_link": "https://b/5", "city": "\ud800"}, "city", "lone_surrogate"),
    ({"source_link": "https://b/6", "emails": ["a@b.c", 7]}, "emails", "wrong_type"),
    (
        {"source_link": "https://b/7", "emails": [f"{i}@x.c" for i in range(11)]},
        "emails",
        "too_many_items",
    ),
    ({"source_link": ""}, "source_link", "empty_link"),
    ({"source_link": "x" * 2049}, "source_link", "link_too_long"),
    ({"source_link": "https://b/8", "opening_hours": {"mon": {1, 2}}}, "opening_hours", "not_json"),
    ({"source_link": "https://b/9", "longitude": float("inf")}, "longitude", "not_finite"),
    ({"source_link": "https://b/10", "colour": "red"}, "colour", "unknown_field"),
    ({"source_link": "https://b/\x00"}, "source_link", "nul_byte"),
]


def test_bad_records_go_to_rejects_and_the_rest_commits(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    good = [{"source_link": f"https://g/{i}", "city": "Solo"} for i in range(20)]
    batch: list[Any] = []
    for i, g in enumerate(good):
        batch.append(g)
        if i < len(BAD_RECORDS):
            batch.append(BAD_RECORDS[i][0])
    with Upserter(dsn, server_id="srv-r", max_array_items=10) as up:
        report = up.upsert(batch)
    assert report.written == 20
    assert report.rejected == len(BAD_RECORDS)
    assert [(r.field, r.reason) for r in report.rejections] == [(f, r) for _, f, r in BAD_RECORDS]
    assert [r.index for r in report.rejections] == [2 * i + 1 for i in range(len(BAD_RECORDS))]
    assert sum(report.reasons.values()) == len(BAD_RECORDS)
    assert one(postgresql, "SELECT count(*) FROM zen_contacts") == 20
    stored = postgresql.execute(
        "SELECT row_index, field, reason, server_id, payload, payload_is_repr, source_link "
        "FROM zen_rejects ORDER BY row_index"
    ).fetchall()
    assert [(r[1], r[2]) for r in stored] == [(f, r) for _, f, r in BAD_RECORDS]
    assert {r[3] for r in stored} == {"srv-r"}
    by_reason = {r[2]: r for r in stored}
    # JSON payload when it is lossless, a repr otherwise; nothing is dropped.
    assert by_reason["bad_country_code"][4] == {"source_link": "https://b/1", "country_code": "IDN"}
    reprs = " ".join(r[4]["repr"] for r in stored if r[5])
    assert "'rating': nan" in reprs and "'longitude': inf" in reprs
    assert "'business_name': 'a\\x00b'" in reprs and "'city': '\\ud800'" in reprs
    assert "'https://b/\\x00'" in [r[6] for r in stored]  # the link itself, as a safe repr


def test_rows_postgresql_refuses_are_bisected_out(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    postgresql.execute("INSERT INTO results (id, link, data) VALUES (1, 'r', '{}')")
    # Valid for Python, refused by PostgreSQL. Since issue 8 the writer checks source_id
    # and caps indexed text itself (test_unknown_source_id_is_rejected_whatever_the_order,
    # test_oversized_indexed_text_is_rejected_up_front_whatever_the_order), so the
    # constraints it cannot foresee are added here: a foreign key and a btree index it
    # does not know about, on columns it does not cap to an index's size.
    postgresql.execute("CREATE TABLE known_places (place_id text PRIMARY KEY)")
    postgresql.execute("INSERT INTO known_places VALUES ('p1')")
    postgresql.execute(
        "ALTER TABLE zen_contacts ADD CONSTRAINT zen_contacts_place_id_fkey "
        "FOREIGN KEY (place_id) REFERENCES known_places (place_id)"
    )
    postgresql.execute("CREATE INDEX zen_contacts_description_idx ON zen_contacts (description)")
    postgresql.commit()
    rnd = random.Random(7)
    huge = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(9000))
    batch: list[dict[str, Any]] = [
        {"source_link": f"https://p/{i}", "source_id": 1, "place_id": "p1"} for i in range(200)
    ]
    batch[17]["place_id"] = "p999"
    batch[150]["description"] = huge
    with Upserter(dsn, server_id="s") as up:
        report = up.upsert(batch)
    assert report.written == 198
    assert [(r.index, r.reason) for r in report.rejections] == [
        (17, "db_foreign_key_violation"),
        (150, "db_program_limit_exceeded"),
    ]
    assert report.rejections[0].field == "zen_contacts_place_id_fkey"
    assert report.statements < 40  # bisection, not a statement per row
    assert one(postgresql, "SELECT count(*) FROM zen_contacts") == 198
    assert one(postgresql, "SELECT count(*) FROM zen_rejects WHERE reason LIKE 'db_%'") == 2


def test_conn_mode_joins_the_callers_transaction(
    upserter: Upserter, dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(dsn) as conn:
        report = upserter.upsert([{"source_link": "https://t/1"}], conn=conn)
        upserter.upsert([{"source_link": "https://t/2"}], conn=conn)  # same transaction
        assert report.written == 1
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.rollback()
    assert one(postgresql, "SELECT count(*) FROM zen_contacts") == 0
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(UpsertError):
        upserter.upsert([{"source_link": "https://t/3"}], conn=conn)


@pytest.mark.pgbouncer
def test_works_behind_pgbouncer_transaction_mode(
    pgbouncer_dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    with Upserter(pgbouncer_dsn, server_id="s") as up:
        for n in range(5):
            up.upsert(
                [{"source_link": f"https://pb/{i}", "emails": [f"{n}@x.com"]} for i in range(50)]
            )
    assert one(postgresql, "SELECT sum(scrape_count), sum(emails_count) FROM zen_contacts") == (
        250,
        250,
    )


@pytest.mark.pgbouncer
def test_behind_pgbouncer_the_fast_write_carries_the_pool_timeouts(
    dsn: str, pgbouncer_dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    """Behind PgBouncer the pool opens no transaction for the fast write: its own
    transactions set the timeouts (seen from inside, by the bookkeeping hook, which runs
    only on the fast path), and a merge stuck behind a row lock fails at lock_timeout.
    A batch with a row PostgreSQL refuses falls back to the careful write, which
    carries them too."""
    settings = Settings(lock_timeout="300ms", statement_timeout="20s")
    pool = guarded_pool(pgbouncer_dsn, name="pbw", min_size=1, max_size=3, settings=settings)
    postgresql.execute(
        "INSERT INTO results (link, data)"
        " SELECT 'https://pbw/' || g, '{}' FROM generate_series(1, 3) g"
    )
    # a constraint the writer cannot foresee (see test_rows_postgresql_refuses_...)
    postgresql.execute("CREATE TABLE known_places (place_id text PRIMARY KEY)")
    postgresql.execute(
        "ALTER TABLE zen_contacts ADD CONSTRAINT zen_contacts_place_id_fkey "
        "FOREIGN KEY (place_id) REFERENCES known_places (place_id)"
    )
    postgresql.commit()
    seen: list[tuple[Any, ...]] = []

    def after(conn: psycopg.Connection[Any], written: int, rejected: int) -> None:
        row = conn.execute(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
        ).fetchone()
        assert row is not None
        seen.append(row)

    with (
        pool,
        Claimer(pool, owner="pbw") as claimer,
        Upserter(pool, server_id="pbw", max_retries=0, chunk_rows=1) as up,
    ):
        assert pool.pgbouncer is True
        batch = claimer.claim()
        records = [{"source_link": c.link, "source_id": c.id} for c in batch.claims]
        report = up.upsert_and_complete(records, claimer, batch, settling=True, after=after)
        assert report.after_committed is True and report.written == 3
        assert seen == [("300ms", "20s")]
        # A link merged before https://pbw/1 (chunks go in partition order), with an
        # unknown place: the fast write fails on it, never reaching the lock, and the
        # careful write then meets the lock.
        first = keys.partition_of(keys.hashtext("https://pbw/1"))
        bad = next(
            f"https://pbw/{i}"
            for i in range(2, 1000)
            if keys.partition_of(keys.hashtext(f"https://pbw/{i}")) < first
        )
        out: dict[str, Any] = {}

        def write(records: list[dict[str, Any]]) -> None:
            try:
                out["report"] = up.upsert(records)
            except BaseException as e:
                out["error"] = e

        with psycopg.connect(dsn) as blocker:
            blocker.execute(
                "SELECT 1 FROM zen_contacts WHERE source_link = 'https://pbw/1' FOR UPDATE"
            )
            for records in (
                [{"source_link": "https://pbw/1"}],  # the fast write meets the lock
                [{"source_link": "https://pbw/1"}, {"source_link": bad, "place_id": "nowhere"}],
            ):
                out.clear()
                t = threading.Thread(target=write, args=(records,))
                t.start()
                t.join(60)  # a bound, not a pace: the write fails within 300 ms
                assert isinstance(out.get("error"), psycopg.errors.LockNotAvailable), out
            blocker.rollback()
        report = up.upsert(
            [{"source_link": "https://pbw/1"}, {"source_link": bad, "place_id": "x"}]
        )
        assert report.written == 1
        assert [(r.link, r.reason) for r in report.rejections] == [
            (bad, "db_foreign_key_violation")
        ]
    link = "https://pbw/1"
    assert (
        one(postgresql, "SELECT scrape_count FROM zen_contacts WHERE source_link = %s", link) == 2
    )


def _waiting_pids(conn: psycopg.Connection[Any]) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    ).fetchall()
    conn.rollback()
    return [r[0] for r in rows]


def test_terminated_backend_mid_write_is_retried_and_lands_once(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    link = "https://term"
    with Upserter(dsn, server_id="s") as up:
        up.upsert([{"source_link": link, "emails": ["a@x.com"]}])
        # Hold the row so the writer's merge blocks mid-transaction (after its COPY).
        blocker = psycopg.connect(dsn)
        blocker.execute("SELECT 1 FROM zen_contacts WHERE source_link = %s FOR UPDATE", [link])
        result: dict[str, Any] = {}
        batch = [{"source_link": link, "emails": ["b@x.com"]}, {"source_link": "https://term/2"}]
        t = threading.Thread(target=lambda: result.setdefault("r", up.upsert(batch)))
        t.start()
        victim = wait_for(lambda: _waiting_pids(postgresql))[0]
        assert one(postgresql, "SELECT pg_terminate_backend(%s)", victim) is True
        # The retry blocks on the same lock again; release it once it waits.
        wait_for(lambda: [p for p in _waiting_pids(postgresql) if p != victim])
        blocker.rollback()
        blocker.close()
        t.join(60)
    report = result["r"]
    assert report.retries >= 1 and report.written == 2
    row = one(
        postgresql, "SELECT emails, scrape_count FROM zen_contacts WHERE source_link = %s", link
    )
    assert row == (["a@x.com", "b@x.com"], 2)
    assert one(postgresql, "SELECT count(*) FROM zen_contacts") == 2


@pytest.mark.parametrize(("chunk_rows", "parallel"), [(1000, 1), (37, 1), (37, 2)])
def test_opposite_input_orders_never_deadlock(
    dsn: str, postgresql: psycopg.Connection[Any], chunk_rows: int, parallel: int
) -> None:
    # Chunks are cut from the globally sorted batch and written in order, and partition
    # groups are disjoint: locks are still taken in one global order.
    links = [f"https://dl/{i}" for i in range(400)]
    errors: list[BaseException] = []
    retries: list[int] = []

    def writer(order: list[str], server: str) -> None:
        try:
            with Upserter(
                dsn, server_id=server, max_retries=0, chunk_rows=chunk_rows, parallel=parallel
            ) as up:
                for _ in range(5):
                    retries.append(up.upsert([{"source_link": x} for x in order]).retries)
        except BaseException as e:  # pragma: no cover - the failure being tested
            errors.append(e)

    threads = [
        threading.Thread(target=writer, args=(links, "s1")),
        threading.Thread(target=writer, args=(list(reversed(links)), "s2")),
        threading.Thread(target=writer, args=(random.Random(3).sample(links, 400), "s3")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []  # max_retries=0: a deadlock would surface here
    assert one(postgresql, "SELECT min(scrape_count), max(scrape_count) FROM zen_contacts") == (
        15,
        15,
    )


def _mixed_batch(version: int) -> list[dict[str, Any]]:
    rnd = random.Random(version)
    recs: list[dict[str, Any]] = []
    for i in range(400):
        link = f"https://par/{rnd.randrange(300)}"  # about a quarter repeat in the batch
        recs.append(
            {
                "source_link": link,
                "observed_at": T0 + timedelta(minutes=rnd.randrange(4)),
                "business_name": rnd.choice([None, "a", "b", f"n{i}"]),
                "rating": rnd.choice([None, 1.5, 4.5]),
                "opening_hours": rnd.choice([None, {"a": 1}, {"b": 2}]),
                "emails": [f"{rnd.randrange(5)}@{i % 7}.example"],
                "phones": [f"+62 811 {rnd.randrange(3)}00"],
            }
        )
    recs[13]["country_code"] = "IDN"  # rejected by validation
    recs[77]["source_link"] = ""  # rejected before routing
    recs[140]["city"] = "a\x00b"
    return recs


def test_chunked_and_parallel_writes_give_the_same_table(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    tables = []
    summaries = []
    for chunk_rows, parallel in [(1000, 1), (7, 1), (7, 3), (1000, 2)]:
        postgresql.execute("TRUNCATE zen_contacts, zen_rejects")
        postgresql.commit()
        with Upserter(dsn, server_id="s", chunk_rows=chunk_rows, parallel=parallel) as up:
            reports = [up.upsert(_mixed_batch(v)) for v in range(3)]
        assert [r.transactions for r in reports] == [parallel] * 3
        summaries.append(
            [(r.written, r.merged_in_batch, r.rejected, sorted(r.reasons.items())) for r in reports]
        )
        rejects = postgresql.execute(
            "SELECT row_index, field, reason FROM zen_rejects ORDER BY 1, 2, 3"
        ).fetchall()
        tables.append((snapshot(postgresql), rejects))
    assert all(s == summaries[0] for s in summaries)
    assert all(t == tables[0] for t in tables)
    assert summaries[0][0][1] > 50 and summaries[0][0][2] == 3  # repeats and rejects seen
    assert len(tables[0][1]) == 9


def test_python_work_is_done_once_and_reported(dsn: str) -> None:
    with Upserter(dsn, server_id="s", chunk_rows=50) as up:
        prepared = up._prepare(_mixed_batch(0))
        first = [id(c) for c in prepared.chunks()]
        assert len(first) == 8 and [id(c) for c in prepared.chunks()] == first  # memoized
        report = up.upsert(_mixed_batch(1))
    assert report.prepare_seconds > 0
    # the key, then per 50-row chunk a merge per round, and the rejects
    assert report.statements >= 1 + 8 + 1


# -- order independence (hypothesis) ---------------------------------------------------

LINKS = ["https://o/1", "https://o/2", "https://o/3"]
write_strategy = st.fixed_dictionaries(
    {
        "source_link": st.sampled_from(LINKS),
        "observed_at": st.integers(0, 3).map(lambda h: T0 + timedelta(hours=h)),
        "business_name": st.none() | st.sampled_from(["a", "b", "c"]),
        "city": st.none() | st.sampled_from(["x", "y"]),
        "rating": st.none() | st.sampled_from([1.0, 2.5, 4.9]),
        "is_claimed": st.none() | st.booleans(),
        "opening_hours": st.none() | st.sampled_from([{"a": 1}, {"a": 2}, {"b": [1]}]),
        "emails": st.lists(st.sampled_from(["p@x.c", "q@x.c", "r@x.c"]), max_size=2),
        "phones": st.lists(st.sampled_from(["+6281100", "+6281199"]), max_size=2),
        "scrape_status": st.none() | st.sampled_from(["success", "failed"]),
    }
)
writes_strategy = st.lists(
    st.tuples(st.sampled_from(["s1", "s2"]), write_strategy), min_size=1, max_size=8
)


def _apply(
    ups: dict[str, Upserter],
    writes: list[tuple[str, dict[str, Any]]],
    rnd: random.Random,
    concurrent: bool,
) -> None:
    if not concurrent:
        order = writes[:]
        rnd.shuffle(order)
        i = 0
        while i < len(order):  # random batch sizes, each batch from one server
            n = rnd.randint(1, 3)
            chunk = order[i : i + n]
            i += n
            for server in {s for s, _ in chunk}:
                ups[server].upsert([w for s, w in chunk if s == server])
        return
    per_server = {s: [w for s2, w in writes if s2 == s] for s in ups}
    for recs in per_server.values():
        rnd.shuffle(recs)
    threads = [
        threading.Thread(target=ups[s].upsert, args=(recs,)) for s, recs in per_server.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(writes=writes_strategy, seed=st.integers(0, 2**32))
def test_final_row_does_not_depend_on_write_order(
    dsn: str,
    postgresql: psycopg.Connection[Any],
    writes: list[tuple[str, dict[str, Any]]],
    seed: int,
) -> None:
    rnd = random.Random(seed)
    ups = {s: Upserter(dsn, server_id=s) for s in ("s1", "s2")}
    try:
        results = []
        for concurrent in (False, False, True):
            postgresql.execute("TRUNCATE zen_contacts")
            postgresql.commit()
            _apply(ups, writes, rnd, concurrent)
            results.append(snapshot(postgresql))
    finally:
        for up in ups.values():
            up.close()
    assert results[0] == results[1] == results[2]
    counts = {r[0]: r[-1] for r in results[0]}
    assert counts == {
        link: sum(1 for _, w in writes if w["source_link"] == link) for link in counts
    }


# -- exactly-once with the claimer -------------------------------------------------------


def test_upsert_and_complete_is_one_transaction(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    postgresql.execute(
        "INSERT INTO results (link, data) SELECT 'https://c/' || i, "
        "jsonb_build_object('business_name', 'n' || i) FROM generate_series(1, 30) AS i"
    )
    postgresql.commit()
    with Claimer(dsn, owner="w1", batch_size=30) as claimer, Upserter(dsn, server_id="s") as up:
        batch = claimer.claim()
        assert len(batch.claims) == 30
        recs = [{"source_link": c.link, "source_id": c.id, **c.data} for c in batch.claims]
        report = up.upsert_and_complete(recs, claimer, batch)
        assert report.written == 30
        assert one(postgresql, "SELECT count(*) FROM results WHERE status = 'done'") == 30
        assert one(postgresql, "SELECT count(*) FROM zen_contacts") == 30
        # A retry after a lost COMMIT acknowledgement recognises its own commit.
        with up._pool.connection() as conn:
            assert up._batch_done(conn, batch) is True


# -- issue 8 hardening -------------------------------------------------------------------


class _ItemsRaise(dict):  # type: ignore[type-arg]
    """A mapping that gives its link but breaks when its fields are read."""

    def items(self) -> Any:
        raise RuntimeError("items() broke")


class _GetRaises(dict):  # type: ignore[type-arg]
    def get(self, *a: Any) -> Any:
        raise RuntimeError("get() broke")


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("__repr__")

    def __str__(self) -> str:
        raise RuntimeError("__str__")


def test_one_records_exception_never_abandons_its_batch(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    # Each of these made validate_record (or the writer around it) raise before issue 8:
    # the whole batch failed and nothing reached zen_rejects.
    hostile: list[Any] = [
        {"source_link": "https://h/1", "latitude": 10**400},  # OverflowError
        {"source_link": "https://h/2", "reviews_count": 10**5000},  # int -> str ValueError
        {"source_link": "https://h/3", "business_name": _Unprintable()},
        {"source_link": _Unprintable()},
        _ItemsRaise(source_link="https://h/5"),
        _GetRaises(source_link="https://h/6"),
        {"source_link": "https://h/7", "opening_hours": {"a": 10**5000}},
        {"source_link": "https://h/8", "city": "x" * 50_000_000},
    ]
    batch: list[Any] = []
    for i in range(10):
        batch.append({"source_link": f"https://ok/{i}", "city": "Solo"})
        if i < len(hostile):
            batch.append(hostile[i])
    with Upserter(dsn, server_id="s") as up:
        report = up.upsert(batch)
    assert report.written == 10
    assert report.rejected == len(hostile)
    assert [r.index for r in report.rejections] == [2 * i + 1 for i in range(len(hostile))]
    assert one(postgresql, "SELECT count(*) FROM zen_contacts") == 10
    stored = postgresql.execute(
        "SELECT row_index, field, reason FROM zen_rejects ORDER BY row_index"
    ).fetchall()
    postgresql.rollback()
    assert [r[0] for r in stored] == [2 * i + 1 for i in range(len(hostile))]
    assert stored[0][1:] == ("latitude", "out_of_range")
    assert stored[1][1:] == ("reviews_count", "out_of_range")
    assert stored[7][1:] == ("city", "too_long")
    assert {r[2] for r in stored} <= {
        "out_of_range",
        "invalid_value",
        "wrong_type",
        "not_json",
        "too_long",
    }


def test_upsert_and_complete_refuses_an_empty_batch(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    # A batch with no claims has nothing to fence the write with.
    with Claimer(dsn, owner="w1", batch_size=10) as claimer, Upserter(dsn, server_id="s") as up:
        empty = claimer.claim()  # nothing pending: an empty batch
        assert not empty.claims
        with pytest.raises(EmptyBatchError, match="no claims"):
            up.upsert_and_complete([{"source_link": "https://unfenced"}], claimer, empty)
        with pytest.raises(ValueError):  # also a ValueError
            up.upsert_and_complete([], claimer, empty)
    assert one(postgresql, "SELECT count(*) FROM zen_contacts") == 0
    assert one(postgresql, "SELECT count(*) FROM zen_rejects") == 0


def test_unknown_source_id_is_rejected_whatever_the_order(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    postgresql.execute("INSERT INTO results (id, link, data) VALUES (1, 'r', '{}')")
    postgresql.commit()
    link = "https://fk"
    newer = {"source_link": link, "source_id": 1, "city": "new", "observed_at": T0}
    older = {
        "source_link": link,
        "source_id": 999,  # no such results row
        "city": "old",
        "observed_at": T0 - timedelta(hours=1),
    }
    outcomes = []
    for order in ([newer, older], [older, newer]):
        postgresql.execute("TRUNCATE zen_contacts, zen_rejects")
        postgresql.commit()
        with Upserter(dsn, server_id="s") as up:
            reports = [up.upsert([rec]) for rec in order]
        outcomes.append(
            (
                snapshot(postgresql),
                postgresql.execute(
                    "SELECT field, reason, payload->>'city' FROM zen_rejects"
                ).fetchall(),
                sorted((r.field, r.reason) for rep in reports for r in rep.rejections),
            )
        )
        postgresql.rollback()
    assert outcomes[0] == outcomes[1]
    table, rejects, reported = outcomes[0]
    assert rejects == [("source_id", "unknown_source_id", "old")]
    assert reported == [("source_id", "unknown_source_id")]
    assert [(r[0], r[2], r[3], r[-1]) for r in table] == [(link, 1, None, 1)]


def test_unknown_source_ids_are_checked_in_one_query_per_batch(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    postgresql.execute(
        "INSERT INTO results (id, link, data) SELECT i, 'r' || i, '{}' "
        "FROM generate_series(1, 100) AS i"
    )
    postgresql.commit()
    batch = [{"source_link": f"https://q/{i}", "source_id": i + 1} for i in range(300)]
    with Upserter(dsn, server_id="s", chunk_rows=50) as up:
        clean = up.upsert(batch[:100])
        report = up.upsert(batch)
    assert report.written == 100 and report.rejected == 200
    assert {r.reason for r in report.rejections} == {"unknown_source_id"}
    assert [r.index for r in report.rejections] == list(range(100, 300))
    # no bisection: the same statements as a clean batch of as many chunks, per chunk
    assert report.statements <= clean.statements + 2 * (300 - 100) // 50 + 1


def test_oversized_indexed_text_is_rejected_up_front_whatever_the_order(
    dsn: str, postgresql: psycopg.Connection[Any]
) -> None:
    rnd = random.Random(5)
    huge = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(9000))
    link = "https://big"
    newer = {"source_link": link, "business_category": "shop", "observed_at": T0}
    older = {"source_link": link, "business_category": huge, "observed_at": T0 - timedelta(1)}
    tables = []
    for order in ([newer, older], [older, newer]):
        postgresql.execute("TRUNCATE zen_contacts, zen_rejects")
        postgresql.commit()
        with Upserter(dsn, server_id="s") as up:
            for rec in order:
                up.upsert([rec])
        tables.append(
            (
                snapshot(postgresql),
                postgresql.execute("SELECT field, reason FROM zen_rejects").fetchall(),
            )
        )
        postgresql.rollback()
    assert tables[0] == tables[1]
    assert tables[0][1] == [("business_category", "too_long")]


def test_default_observation_time_is_the_database_clock(
    dsn: str, postgresql: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    link = "https://clock"
    real_ns = time.time_ns
    with Upserter(dsn, server_id="fast") as fast, Upserter(dsn, server_id="honest") as honest:
        # The fast server's clock runs two hours ahead; the database's does not.
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 2 * 3600 * 10**9)
        fast.upsert([{"source_link": link, "business_name": "fast"}])
        monkeypatch.setattr(time, "time_ns", real_ns)
        honest.upsert([{"source_link": link, "business_name": "honest"}])
    row = one(
        postgresql,
        "SELECT business_name, last_scrape_server, "
        "abs(extract(epoch FROM observed_at - clock_timestamp())) < 600 FROM zen_contacts",
    )
    assert row == ("honest", "honest", True)


def test_future_guard_uses_the_database_clock(
    dsn: str, postgresql: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    db_now = one(postgresql, "SELECT clock_timestamp()")
    real_ns = time.time_ns
    with Upserter(dsn, server_id="fast") as fast:
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 2 * 3600 * 10**9)
        report = fast.upsert(
            [
                {"source_link": "https://f/1", "observed_at": db_now + timedelta(minutes=90)},
                {"source_link": "https://f/2", "observed_at": db_now + timedelta(minutes=10)},
                {"source_link": "https://f/3"},
            ]
        )
        monkeypatch.setattr(time, "time_ns", real_ns)
    # 90 minutes ahead of the database passes the fast writer's own check (30 minutes
    # behind its clock) but not the database's.
    assert [(r.index, r.field, r.reason) for r in report.rejections] == [
        (0, "observed_at", "in_future")
    ]
    assert report.written == 2
    assert one(postgresql, "SELECT array_agg(source_link ORDER BY 1) FROM zen_contacts") == [
        "https://f/2",
        "https://f/3",
    ]
    assert one(postgresql, "SELECT field, reason FROM zen_rejects") == ("observed_at", "in_future")
