"""Schema v3 and the migration runner, on a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import wait_for
from psycopg import errors as pgerr
from psycopg.types.json import Jsonb

from zenpipe import keys, schema
from zenpipe.errors import MigrationChecksumError, MigrationError, SchemaError
from zenpipe.queries import sql_dir

pytestmark = pytest.mark.pg18

MIGRATIONS = schema.load_migrations()


def copy_migrations(dest: Path, upto: int | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for m in MIGRATIONS:
        if upto is None or m.version <= upto:
            (dest / f"{m.label}.sql").write_text(m.text, encoding="utf-8")
    return dest


def one(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def contact(link: str, **extra: Any) -> dict[str, Any]:
    return {"source_link": link, "partition_key": keys.partition_key(link), **extra}


def insert(conn: psycopg.Connection[Any], row: dict[str, Any]) -> None:
    cols = psycopg.sql.SQL(", ").join(psycopg.sql.Identifier(c) for c in row)
    vals = psycopg.sql.SQL(", ").join(psycopg.sql.Placeholder() for _ in row)
    conn.execute(
        psycopg.sql.SQL("INSERT INTO zen_contacts ({}) VALUES ({})").format(cols, vals),
        list(row.values()),
    )


# -- what schema v3 contains ------------------------------------------------------------


def test_migrations_are_numbered_and_shipped() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert (sql_dir() / "migrations").is_dir()


def test_zen_contacts_has_32_hash_partitions(postgresql: psycopg.Connection[Any]) -> None:
    rows = postgresql.execute(
        """
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'zen_contacts'::regclass
        """
    ).fetchall()
    bounds = dict(rows)
    assert sorted(bounds) == sorted(f"zen_contacts_p{r}" for r in range(32))
    for r in range(32):
        assert bounds[f"zen_contacts_p{r}"] == f"FOR VALUES WITH (modulus 32, remainder {r})"
    strategy = one(
        postgresql,
        "SELECT pg_get_partkeydef('zen_contacts'::regclass)",
    )
    assert strategy == "HASH (partition_key)"


def test_zen_contacts_columns(postgresql: psycopg.Connection[Any]) -> None:
    cols = {
        name: (dtype, generated)
        for name, dtype, generated in postgresql.execute(
            """
            SELECT column_name, data_type, is_generated FROM information_schema.columns
            WHERE table_name = 'zen_contacts'
            """
        )
    }
    assert 55 <= len(cols) <= 75
    for name in (
        "business_name", "business_category", "website", "country_code", "city", "address",
        "postal_code", "latitude", "longitude", "rating", "reviews_count", "maps_phone",
        "place_id", "opening_hours", "emails", "emails_count", "emails_validated", "phones",
        "phones_count", "whatsapp", "whatsapp_count", "whatsapp_validated", "facebook_url",
        "instagram_url", "linkedin_url", "twitter_url", "youtube_url", "tiktok_url",
        "scrape_status", "last_scrape_server", "scrape_count", "source_id", "created_at",
        "updated_at", "has_email", "has_phone", "has_whatsapp",
    ):  # fmt: skip
        assert name in cols, name
    for name in ("emails", "phones", "whatsapp"):
        assert cols[name][0] == "ARRAY"
    for name in ("has_email", "has_phone", "has_whatsapp", "emails_count"):
        assert cols[name][1] == "ALWAYS", name


def test_keys_and_foreign_key(postgresql: psycopg.Connection[Any]) -> None:
    defs = dict(
        postgresql.execute(
            """
            SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
            WHERE conrelid = 'zen_contacts'::regclass
            """
        ).fetchall()
    )
    assert defs["zen_contacts_pkey"] == "PRIMARY KEY (id, partition_key)"
    assert defs["zen_contacts_source_link_key"] == "UNIQUE (source_link, partition_key)"
    assert defs["zen_contacts_source_id_fkey"] == (
        "FOREIGN KEY (source_id) REFERENCES results(id) ON DELETE SET NULL"
    )


def test_indexes_exist_on_parent_and_every_partition(postgresql: psycopg.Connection[Any]) -> None:
    expected = {
        "idx_zc_country": "btree", "idx_zc_category": "btree",
        "idx_zc_country_category": "btree", "idx_zc_status": "btree",
        "idx_zc_country_status": "btree", "idx_zc_link_hash": "hash",
        "idx_zc_updated": "btree", "idx_zc_has_email": "btree",
        "idx_zc_has_whatsapp": "btree", "idx_zc_server": "btree",
        "idx_zc_emails_gin": "gin", "idx_zc_created_brin": "brin",
    }  # fmt: skip
    rows = postgresql.execute(
        """
        SELECT c.relname, am.amname, x.indisvalid,
               (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid)
        FROM pg_index x
        JOIN pg_class c ON c.oid = x.indexrelid
        JOIN pg_am am ON am.oid = c.relam
        WHERE x.indrelid = 'zen_contacts'::regclass
        """
    ).fetchall()
    found = {name: (am, valid, leaves) for name, am, valid, leaves in rows}
    for name, am in expected.items():
        assert found[name] == (am, True, 32), name
    partial = one(postgresql, "SELECT pg_get_indexdef('idx_zc_has_email'::regclass)")
    assert "WHERE has_email" in partial


# -- constraints --------------------------------------------------------------------------


def test_partition_key_check_refuses_a_mismatching_key(postgresql: psycopg.Connection[Any]) -> None:
    link = "https://maps.example.com/a"
    with pytest.raises(pgerr.CheckViolation) as exc:
        insert(postgresql, {"source_link": link, "partition_key": keys.partition_key(link) + 1})
    assert exc.value.diag.constraint_name == "zen_contacts_partition_key_check"


def test_int_min_link_is_stored_without_overflow(postgresql: psycopg.Connection[Any]) -> None:
    link = "https://zen.n>8S0Mw>wQx"
    insert(postgresql, contact(link))
    stored = one(
        postgresql, "SELECT partition_key FROM zen_contacts WHERE source_link = %s", (link,)
    )
    assert stored == -(2**31)
    table = one(
        postgresql, "SELECT tableoid::regclass::text FROM zen_contacts WHERE source_link = %s",
        (link,),
    )  # fmt: skip
    assert table == keys.partition_table(link)


@pytest.mark.parametrize(
    ("field", "value", "constraint"),
    [
        ("country_code", "id", "zen_contacts_country_code_check"),
        ("country_code", "IDN", "zen_contacts_country_code_check"),
        ("latitude", 90.5, "zen_contacts_latitude_check"),
        ("longitude", -180.1, "zen_contacts_longitude_check"),
        ("rating", 5.1, "zen_contacts_rating_check"),
        ("reviews_count", -1, "zen_contacts_reviews_count_check"),
        ("scrape_count", -1, "zen_contacts_scrape_count_check"),
        ("emails_validated", Jsonb([1, 2]), "zen_contacts_emails_validated_check"),
        ("whatsapp_validated", Jsonb("x"), "zen_contacts_whatsapp_validated_check"),
        ("opening_hours", Jsonb([]), "zen_contacts_opening_hours_check"),
        ("scrape_status", "weird", "zen_contacts_scrape_status_check"),
    ],
)  # fmt: skip
def test_check_constraints(
    postgresql: psycopg.Connection[Any], field: str, value: Any, constraint: str
) -> None:
    with pytest.raises(pgerr.CheckViolation) as exc:
        insert(postgresql, contact("https://maps.example.com/x", **{field: value}))
    assert exc.value.diag.constraint_name == constraint


def test_empty_source_link_is_refused(postgresql: psycopg.Connection[Any]) -> None:
    with pytest.raises(pgerr.CheckViolation) as exc:
        insert(postgresql, contact(""))
    assert exc.value.diag.constraint_name == "zen_contacts_source_link_check"


def test_valid_row_counts_flags_and_updated_at_trigger(postgresql: psycopg.Connection[Any]) -> None:
    link = "https://maps.example.com/ok"
    insert(
        postgresql,
        contact(
            link, country_code="ID", latitude=-6.2, longitude=106.8, rating=4.5,
            emails=["a@x.io", "b@x.io"], whatsapp=["+628123"],
            emails_validated=Jsonb({"a@x.io": True}),
        ),
    )  # fmt: skip
    postgresql.commit()
    row = postgresql.execute(
        "SELECT emails_count, phones_count, whatsapp_count, has_email, has_phone, has_whatsapp,"
        " updated_at FROM zen_contacts WHERE source_link = %s",
        (link,),
    ).fetchone()
    assert row is not None
    assert row[:6] == (2, 0, 1, True, False, True)
    postgresql.commit()
    time.sleep(0.01)
    postgresql.execute("UPDATE zen_contacts SET city = 'Jakarta' WHERE source_link = %s", (link,))
    postgresql.commit()
    after = one(postgresql, "SELECT updated_at FROM zen_contacts WHERE source_link = %s", (link,))
    assert after > row[6]


def test_foreign_key_sets_null_when_source_row_is_deleted(
    postgresql: psycopg.Connection[Any],
) -> None:
    rid = one(postgresql, "INSERT INTO results (data) VALUES ('{}') RETURNING id")
    insert(postgresql, contact("https://maps.example.com/fk", source_id=rid))
    postgresql.execute("DELETE FROM results WHERE id = %s", (rid,))
    assert one(postgresql, "SELECT source_id FROM zen_contacts") is None
    with pytest.raises(pgerr.ForeignKeyViolation):
        insert(postgresql, contact("https://maps.example.com/fk2", source_id=rid))


@pytest.mark.parametrize(
    ("current", "new", "expected"),
    [
        ([], ["b", "a"], ["b", "a"]),  # trusted: the writer sends sorted, deduplicated
        (["a", "c"], [], ["a", "c"]),
        (["a", "c"], ["c"], ["a", "c"]),
        (["a", "c"], ["b", "d"], ["a", "b", "c", "d"]),
        (["B", "a"], ["a", "Z"], ["B", "Z", "a"]),  # "C" collation: byte order
        (None, ["x"], ["x"]),
        (["x"], None, ["x"]),
    ],
)
def test_array_union_v1(
    postgresql: psycopg.Connection[Any], current: Any, new: Any, expected: list[str]
) -> None:
    got = one(postgresql, "SELECT zen_array_union_v1(%s::text[], %s::text[])", (current, new))
    assert got == expected


def test_array_union_v1_is_order_independent(postgresql: psycopg.Connection[Any]) -> None:
    a, b = sorted({"x@a.io", "y@b.io", "é@c.io"}), sorted({"y@b.io", "z@d.io"})
    ab = one(postgresql, "SELECT zen_array_union_v1(%s::text[], %s::text[])", (a, b))
    ba = one(postgresql, "SELECT zen_array_union_v1(%s::text[], %s::text[])", (b, a))
    assert ab == ba == sorted(set(a) | set(b))


def test_partition_key_function_matches_python(postgresql: psycopg.Connection[Any]) -> None:
    links = ["", "a", "https://zen.n>8S0Mw>wQx", "ü😀"]
    got = [one(postgresql, "SELECT zen_partition_key_v1(%s)", (x,)) for x in links]
    assert got == [keys.partition_key(x) for x in links]


def test_dashboard_view_and_stats_function(postgresql: psycopg.Connection[Any]) -> None:
    postgresql.execute("SELECT zen_record_stats_v1('s1', 10, 8, 1, 1, 20)")
    postgresql.execute("SELECT zen_record_stats_v1('s1', 5, 5, 0, 0, 3)")
    postgresql.execute(
        "INSERT INTO results (data, status) VALUES ('{}', 'done'), ('{}', 'pending')"
    )
    postgresql.execute(
        "INSERT INTO results (data, status, claim_owner, claim_token, lease_until) VALUES "
        "('{}', 'claimed', 'w', 1, now() + interval '1 hour'), "
        "('{}', 'claimed', 'dead', 2, now() - interval '1 minute')"
    )
    insert(postgresql, contact("https://maps.example.com/d", emails=["a@b.c"], country_code="ID"))
    cur = postgresql.execute("SELECT * FROM zen_v_dashboard")
    assert cur.description is not None
    row = dict(zip([d.name for d in cur.description], cur.fetchone() or (), strict=True))
    assert row["source_total"] == 4
    assert row["source_done"] == 1
    assert row["source_claimed"] == 1
    assert row["source_lease_expired"] == 1
    assert row["contacts_with_email"] == 1
    assert row["emails_total"] == 1
    assert row["rows_written_24h"] == 13
    assert row["rows_rejected_24h"] == 1


# -- migration runner -------------------------------------------------------------------


def test_apply_is_idempotent(empty_dsn: str) -> None:
    first = schema.apply(empty_dsn)
    assert [m.version for m in first] == [m.version for m in MIGRATIONS]
    assert schema.apply(empty_dsn) == []
    recorded = schema.status(empty_dsn)
    assert [(r.version, r.checksum) for r in recorded] == [
        (m.version, m.checksum) for m in MIGRATIONS
    ]


def test_edited_migration_is_refused(empty_dsn: str, tmp_path: Path) -> None:
    folder = copy_migrations(tmp_path / "m", upto=2)
    schema.apply(empty_dsn, directory=folder)
    edited = folder / f"{MIGRATIONS[0].label}.sql"
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")
    (folder / f"{MIGRATIONS[2].label}.sql").write_text(MIGRATIONS[2].text)
    with pytest.raises(MigrationChecksumError) as exc:
        schema.apply(empty_dsn, directory=folder)
    assert exc.value.version == 1
    assert "must not be edited" in str(exc.value)
    # Refused before anything ran: the pending migration 3 was not applied.
    assert [r.version for r in schema.status(empty_dsn)] == [1, 2]


def test_failed_migration_rolls_back_and_records_nothing(empty_dsn: str, tmp_path: Path) -> None:
    folder = copy_migrations(tmp_path / "m", upto=1)
    (folder / "0002_broken.sql").write_text("CREATE TABLE half_done (x int);\nSELECT 1/0;\n")
    with pytest.raises(pgerr.DivisionByZero):
        schema.apply(empty_dsn, directory=folder)
    assert [r.version for r in schema.status(empty_dsn)] == [1]
    with psycopg.connect(empty_dsn) as conn:
        assert one(conn, "SELECT to_regclass('half_done')") is None


def test_badly_named_or_unsupported_concurrent_migration(tmp_path: Path) -> None:
    (tmp_path / "2_bad.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        schema.load_migrations(tmp_path)
    (tmp_path / "2_bad.sql").unlink()
    (tmp_path / "0001_x.sql").write_text("-- zenpipe: concurrently\nDROP TABLE results;\n")
    (m,) = schema.load_migrations(tmp_path)
    with pytest.raises(MigrationError, match="only hold"):
        m.index_steps()


def test_non_utf8_database_is_refused(pg_server: Any) -> None:
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS zen_latin1")
        conn.execute(
            "CREATE DATABASE zen_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    try:
        with pytest.raises(SchemaError, match="UTF8"):
            schema.apply(pg_server.dsn_for("zen_latin1"))
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute("DROP DATABASE zen_latin1")


APPLY_SCRIPT = """
import json, sys, time
from zenpipe import schema
start_at = float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
applied = schema.apply(sys.argv[1])
print(json.dumps([m.version for m in applied]))
"""


def test_ten_processes_apply_each_migration_exactly_once(empty_dsn: str) -> None:
    start_at = time.time() + 2.0  # all ten start their apply() at the same instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", APPLY_SCRIPT, empty_dsn, str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(10)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, [err for _, err in outputs]
    applied = [v for out, _ in outputs for v in json.loads(out)]
    assert sorted(applied) == [m.version for m in MIGRATIONS]
    assert [r.version for r in schema.status(empty_dsn)] == [m.version for m in MIGRATIONS]


# -- building indexes on a populated table without blocking writers ----------------------


def _writer(dsn: str, stop: threading.Event, stats: dict[str, Any]) -> None:
    # Writes with a short lock_timeout: being blocked by the index build would fail it.
    with psycopg.connect(dsn, autocommit=True, options="-c lock_timeout=1500") as conn:
        i = 0
        while not stop.is_set():
            link = f"https://maps.example.com/live/{i}"
            try:
                insert(conn, contact(link, emails=[f"{i}@live.io"]))
                conn.execute(
                    "UPDATE zen_contacts SET city = 'x'"
                    " WHERE source_link = %s AND partition_key = %s",
                    (link, keys.partition_key(link)),
                )
                stats["writes"].append(time.monotonic())
            except psycopg.Error as e:  # pragma: no cover - the assertion reports it
                stats["errors"].append(repr(e))
            i += 1


@pytest.mark.slow
def test_concurrent_index_migration_does_not_block_writers(empty_dsn: str, tmp_path: Path) -> None:
    concurrent = [m for m in MIGRATIONS if m.concurrently]
    assert concurrent, "schema v3 adds its search indexes concurrently"
    first = concurrent[0].version
    schema.apply(empty_dsn, directory=copy_migrations(tmp_path / "before", upto=first - 1))
    copy_sql = "COPY zen_contacts (source_link, partition_key, emails) FROM STDIN"
    with psycopg.connect(empty_dsn) as conn, conn.cursor() as cur, cur.copy(copy_sql) as cp:
        for i in range(60_000):
            link = f"https://maps.example.com/old/{i}"
            cp.write_row((link, keys.partition_key(link), [f"{i}@old.io", f"x{i}@old.io"]))
    stats: dict[str, Any] = {"writes": [], "errors": []}
    stop = threading.Event()
    writer = threading.Thread(target=_writer, args=(empty_dsn, stop, stats))
    writer.start()
    try:
        wait_for(lambda: stats["writes"] or stats["errors"])  # the writer is going
        began = time.monotonic()
        applied = schema.apply(empty_dsn, directory=copy_migrations(tmp_path / "after"))
        ended = time.monotonic()
    finally:
        stop.set()
        writer.join(timeout=30)
    assert [m.version for m in applied] == [m.version for m in MIGRATIONS if m.version >= first]
    assert stats["errors"] == []
    during = [t for t in stats["writes"] if began <= t <= ended]
    assert len(during) > 10, "writes kept committing while the indexes were built"
    with psycopg.connect(empty_dsn) as conn:
        invalid = conn.execute(
            """
            SELECT c.relname FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
            WHERE NOT x.indisvalid
            """
        ).fetchall()
        assert invalid == []
        attached = one(
            conn,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'idx_zc_emails_gin'::regclass",
        )
        assert attached == 32
        hit = conn.execute(
            "EXPLAIN (COSTS OFF) SELECT id FROM zen_contacts WHERE emails @> ARRAY['7@old.io']"
        ).fetchall()
        assert any("idx_zc_emails_gin" in line[0] for line in hit)


def test_interrupted_concurrent_build_is_resumed(empty_dsn: str, tmp_path: Path) -> None:
    """The leftovers of an interrupted run (an attached leaf, an invalid leaf) are resumed."""
    from psycopg.sql import SQL, Identifier

    concurrent = next(m for m in MIGRATIONS if m.concurrently)
    before = copy_migrations(tmp_path / "before", upto=concurrent.version - 1)
    schema.apply(empty_dsn, directory=before)
    step = concurrent.index_steps()[0]
    body = SQL(step.body)  # type: ignore[arg-type]
    # Two links in one leaf, so a unique index build on it fails and stays invalid.
    first = "https://a.example/0"
    leaf = keys.partition_table(first)
    second = next(
        link
        for link in (f"https://a.example/{i}" for i in range(1, 10_000))
        if keys.partition_table(link) == leaf
    )
    invalid_name = f"{step.name}_{leaf.removeprefix('zen_contacts_')}"
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            SQL("CREATE INDEX {} ON ONLY zen_contacts {}").format(Identifier(step.name), body)
        )
        if leaf != "zen_contacts_p0":
            conn.execute(
                SQL("CREATE INDEX {} ON zen_contacts_p0 {}").format(
                    Identifier(f"{step.name}_p0"), body
                )
            )
            conn.execute(
                SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                    Identifier(step.name), Identifier(f"{step.name}_p0")
                )
            )
        for link in (first, second):
            insert(conn, contact(link, city="dup"))
        with pytest.raises(pgerr.UniqueViolation):
            conn.execute(
                SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} (city)").format(
                    Identifier(invalid_name), Identifier(leaf)
                )
            )
        assert (
            one(
                conn,
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                (invalid_name,),
            )
            is False
        )
    schema.apply(empty_dsn, directory=copy_migrations(tmp_path / "after"))
    with psycopg.connect(empty_dsn) as conn:
        assert (
            one(
                conn,
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                (step.name,),
            )
            is True
        )
        assert (
            one(
                conn,
                "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass(%s)",
                (step.name,),
            )
            == 32
        )
        assert one(conn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
        # The rebuilt leaf is the migration's index, not the leftover unique one.
        assert (
            one(
                conn,
                "SELECT indisunique FROM pg_index WHERE indexrelid = to_regclass(%s)",
                (invalid_name,),
            )
            is False
        )


def test_wheel_ships_the_sql_files(tmp_path: Path) -> None:
    import zipfile

    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None:  # pragma: no cover
        pytest.fail("git is needed to build from a clean copy")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("zenpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for m in MIGRATIONS:
        assert f"zenpipe/sql/migrations/{m.label}.sql" in names
    shipped_queries = {p.name for p in (root / "sql" / "queries").glob("*.sql")}
    assert shipped_queries
    for q in shipped_queries:
        assert f"zenpipe/sql/queries/{q}" in names
