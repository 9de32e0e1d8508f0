"""zenpipe.keys against the live server: hashtext() and hash-partition routing."""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zenpipe import keys
from zenpipe.embedded import ThrowawayPostgres

pytestmark = pytest.mark.pg18

VECTORS = [
    "",
    "a",
    "abc",
    "abcdefghijk",  # 11 bytes: every tail byte
    "abcdefghijkl",  # exactly one block
    "abcdefghijklm",
    "https://www.google.com/maps/place/Caf%C3%A9+Zen/@-6.2,106.8,17z",
    "é",
    "日本語のテキスト",
    "😀",
    "😀🚀🇮🇩 emoji + text",
    "x" * 10_000,
    "https://zen.n>8S0Mw>wQx",  # hashtext() = INT_MIN
    "\t\n\r ",
    "SELECT * FROM zen_contacts; --",
]


@pytest.fixture(scope="module")
def conn(pg_server: ThrowawayPostgres) -> Iterator[psycopg.Connection[tuple[int]]]:
    with psycopg.connect(pg_server.dsn, autocommit=True) as c:
        yield c


def server_hashes(conn: psycopg.Connection[tuple[int]], texts: list[str]) -> list[int]:
    rows = conn.execute(
        "SELECT hashtext(t) FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
        (texts,),
    ).fetchall()
    return [r[0] for r in rows]


def test_known_vectors_without_server() -> None:
    assert keys.hashtext("abc") == -785388649
    assert keys.hashtext("https://zen.n>8S0Mw>wQx") == -(2**31)


def test_vectors_match_server(conn: psycopg.Connection[tuple[int]]) -> None:
    assert [keys.hashtext(t) for t in VECTORS] == server_hashes(conn, VECTORS)


def test_every_length_up_to_100_bytes_matches(conn: psycopg.Connection[tuple[int]]) -> None:
    rng = random.Random(7)
    texts = ["".join(rng.choices(string.printable, k=n)) for n in range(101)]
    texts += ["€" * n for n in range(40)]  # 3-byte characters across block edges
    assert [keys.hashtext(t) for t in texts] == server_hashes(conn, texts)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.text(max_size=300), min_size=50, max_size=50))
def test_hashtext_property_matches_server(
    conn: psycopg.Connection[tuple[int]], texts: list[str]
) -> None:
    # 100 examples x 50 strings: >= 5,000 strings per run, any code point but NUL
    # (PostgreSQL text cannot hold it) and lone surrogates (UTF-8 cannot encode them).
    texts = [t.replace("\x00", "") for t in texts]
    assert [keys.hashtext(t) for t in texts] == server_hashes(conn, texts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=120), max_size=200))
def test_vectorized_route_matches_scalar(texts: list[str]) -> None:
    keys_v, parts_v = keys.route(texts)
    assert keys_v == [keys.hashtext(t) for t in texts]
    assert parts_v == [keys.partition_of(k) for k in keys_v]
    assert keys.partition_keys(texts) == keys_v


def test_vectorized_route_matches_server(conn: psycopg.Connection[tuple[int]]) -> None:
    texts = [*VECTORS, *("€" * n for n in range(40)), *("y" * n for n in range(0, 2100, 7))]
    keys_v, _ = keys.route(texts)
    assert keys_v == server_hashes(conn, texts)
    assert keys.route([]) == ([], [])


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(UnicodeEncodeError):
        keys.hashtext("bad \ud800 link")
    with pytest.raises(UnicodeEncodeError):
        keys.route(["fine", "bad \ud800 link"])


def test_partition_of_matches_server_routing(conn: psycopg.Connection[tuple[int]]) -> None:
    rng = random.Random(11)
    values = [rng.randint(-(2**31), 2**31 - 1) for _ in range(5000)]
    values += [-(2**31), -1, 0, 1, 2**31 - 1]
    with conn.transaction(force_rollback=True):
        conn.execute("CREATE TEMP TABLE routed (k int) PARTITION BY HASH (k)")
        for r in range(32):
            conn.execute(
                f"CREATE TEMP TABLE routed_p{r} PARTITION OF routed "
                f"FOR VALUES WITH (MODULUS 32, REMAINDER {r})"
            )
        conn.execute("INSERT INTO routed SELECT unnest(%s::int[])", (values,))
        rows = conn.execute("SELECT k, tableoid::regclass::text FROM routed").fetchall()
    assert len(rows) == len(values)
    mismatched = [(k, t) for k, t in rows if t != f"routed_p{keys.partition_of(k)}"]
    assert mismatched == []


def test_partition_spread_of_100k_links_in_zen_contacts(
    postgresql: psycopg.Connection[tuple[object, ...]],
) -> None:
    """Rows land where keys.partition_table() says, and every partition gets 1/32 +-10%."""
    rng = random.Random(2026)
    alphabet = string.ascii_letters + string.digits + "-_/%.é日😀"
    links = {
        "https://maps.example.com/place/" + "".join(rng.choices(alphabet, k=rng.randint(5, 60)))
        for _ in range(100_000)
    }
    expected = Counter(keys.partition_table(link) for link in links)
    with postgresql.cursor() as cur:
        with cur.copy("COPY zen_contacts (source_link, partition_key) FROM STDIN") as copy:
            for link in links:
                copy.write_row((link, keys.partition_key(link)))
        cur.execute("SELECT tableoid::regclass::text, count(*) FROM zen_contacts GROUP BY 1")
        actual = dict(cur.fetchall())
    postgresql.commit()
    assert actual == dict(expected)
    assert len(actual) == keys.NUM_PARTITIONS
    share = len(links) / keys.NUM_PARTITIONS
    assert all(abs(n - share) <= 0.10 * share for n in actual.values()), actual
