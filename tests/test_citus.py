"""zenpipe on a real Citus cluster: a coordinator and two workers built from source.

Every test here is marked ``citus``: it needs ``ZENPIPE_CITUS_SOURCE`` (a Citus release
tarball; CI points it at ../shared/citus/citus-14.0.1.tar.gz and runs ``pytest -m
citus``). Without it they skip with the reason shown, and fail under ``CI=true``
(tests/conftest.py). One cluster serves the module; each test starts from empty tables.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from helpers import assert_no_leaks, wait_for, wait_past
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg import sql

from zenpipe import ZenPool, demo, schema
from zenpipe.citus import ShardMap, ThrowawayCitus, build_citus
from zenpipe.claim import Claimer
from zenpipe.embedded import _cache_root
from zenpipe.keys import partition_keys, route
from zenpipe.locks import ALL_NAMESPACES, NAMESPACE_CLAIM, leftovers
from zenpipe.upsert import Upserter
from zenpipe.worker import Worker

pytestmark = pytest.mark.citus

# Local tables on the coordinator: TRUNCATE is instant there. zen_contacts is emptied
# with DELETE: a TRUNCATE of its 32 shards x 33 relations takes seconds.
_LOCAL_TABLES = "results, zen_rejects, zen_upsert_keys, zen_jobs, zen_stats_hourly, zen_servers"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCitus]:
    """The module's cluster, with zenpipe's schema applied (Citus detected)."""
    with ThrowawayCitus() as c:
        schema.apply(c.dsn)
        yield c


@pytest.fixture
def citus_dsn(cluster: ThrowawayCitus) -> str:
    """The coordinator, every zenpipe table emptied (distributed ones included)."""
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {_LOCAL_TABLES}")
        conn.execute("DELETE FROM zen_contacts")
    return cluster.dsn


def one(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def seed(dsn: str, n: int, prefix: str = "https://citus.test/") -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO results (link, data) SELECT %s || i, jsonb_build_object("
            "'business_name', 'n' || i, 'emails', jsonb_build_array('e' || i || '@x.com')) "
            "FROM generate_series(0, %s) AS i",
            (prefix, n - 1),
        )


def rows_per_worker(cluster: ThrowawayCitus) -> dict[tuple[str, int], set[str]]:
    """The links stored in each worker's shards of zen_contacts, read on the worker."""
    with psycopg.connect(cluster.dsn) as conn:
        shard_map = ShardMap.load(conn)
    out: dict[tuple[str, int], set[str]] = {}
    for node in cluster.workers:
        links: set[str] = set()
        with psycopg.connect(node.dsn_for(cluster.dbname)) as conn:
            for shard in shard_map.shards:
                if shard.node != (node.host, node.port):
                    continue
                table = sql.Identifier(f"zen_contacts_{shard.shard_id}")
                got = conn.execute(sql.SQL("SELECT source_link FROM {}").format(table))
                links |= {r[0] for r in got}
        out[(node.host, node.port)] = links
    return out


# -- the cluster ---------------------------------------------------------------------


def test_cluster_runs_unprivileged_reuses_its_build_and_removes_everything() -> None:
    bindir = build_citus()
    assert (bindir.parent.parent.parent / "zenpipe-citus-built").exists()
    assert build_citus() == bindir  # cached: keyed by the tarball and the PG version
    assert bindir.is_relative_to(_cache_root())  # beside ThrowawayPostgres's binaries
    with ThrowawayCitus(workers=1) as c:
        datadirs = [n.datadir for n in c.nodes]
        with psycopg.connect(c.dsn, autocommit=True) as conn:
            nodes = conn.execute(
                "SELECT nodename, nodeport, groupid FROM pg_dist_node ORDER BY groupid"
            ).fetchall()
            assert conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
        assert [(h, p) for h, p, _ in nodes] == [(n.host, n.port) for n in c.nodes]
        if os.geteuid() == 0:  # servers refuse root: they run as an unprivileged user
            assert {d.stat().st_uid for d in datadirs} != {0}
    assert not any(d.exists() for d in datadirs)


def test_schema_on_citus_distributes_contacts_and_keeps_claims_on_the_coordinator(
    cluster: ThrowawayCitus, citus_dsn: str
) -> None:
    applied = {m.version: m for m in schema.status(citus_dsn)}
    citus_steps = schema.load_migrations(
        schema.sql_dir() / "citus", version_base=schema.CITUS_VERSION_BASE
    )
    shared = schema.load_migrations()
    for m in [*shared, *citus_steps]:  # versioned and checksummed like the shared ones
        assert applied[m.version].checksum == m.checksum
    assert schema.apply(citus_dsn) == []
    with psycopg.connect(citus_dsn) as conn:
        dist = dict(
            conn.execute(
                "SELECT logicalrelid::text, column_to_column_name(logicalrelid, partkey) "
                "FROM pg_dist_partition WHERE NOT logicalrelid::text LIKE 'zen_contacts_p%'"
            ).fetchall()
        )
        assert dist == {"zen_contacts": "source_link"}  # results & co. stay local
        assert conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'zen_contacts'::regclass "
            "AND NOT tgisinternal"
        ).fetchone() == (0,)
        pkey = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'zen_contacts'::regclass AND contype IN ('p', 'u', 'f')"
        ).fetchall()
        assert pkey == [("PRIMARY KEY (source_link, partition_key)",)]
        assert conn.execute(
            "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'zen_contacts'::regclass"
        ).fetchone() == (32,)
        # the dashboard (refused with GROUPING SETS on Citus) refreshes
        assert conn.execute("SELECT zen_refresh_dashboard_v1()").fetchone()


def test_cli_schema_apply_citus(cluster: ThrowawayCitus, citus_dsn: str) -> None:
    def cli(dsn: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "zenpipe", "schema", "apply", "--citus", "--dsn", dsn],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = cli(citus_dsn)
    assert done.returncode == 0, done.stderr
    assert "schema is up to date" in done.stdout
    # --citus on a database without the extension is refused, before anything is applied
    with psycopg.connect(cluster.dsn_for("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS plain")
        conn.execute("CREATE DATABASE plain")
    plain = cluster.dsn_for("plain")
    done = cli(plain)
    assert done.returncode != 0
    assert "not a Citus coordinator" in done.stderr
    assert schema.status(plain) == []


# -- partition-aware on Citus ----------------------------------------------------------

links_strategy = st.lists(
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        min_size=1,
        max_size=60,
    ),
    min_size=1,
    max_size=50,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(links=links_strategy)
def test_keys_route_predicts_the_shard_citus_picks(
    cluster: ThrowawayCitus, links: list[str]
) -> None:
    links = [*links, "abc", "https://zen.n>8S0Mw>wQx"]  # INT_MIN: the first shard's edge
    with psycopg.connect(cluster.dsn) as conn:
        shard_map = ShardMap.load(conn)
        got = conn.execute(
            "SELECT get_shard_id_for_distribution_column('zen_contacts', l) "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS u (l, i) ORDER BY i",
            (links,),
        ).fetchall()
    keys, _ = route(links)
    assert [shard_map.shard_for_key(k).shard_id for k in keys] == [r[0] for r in got]
    assert [shard_map.shard_for_link(link).shard_id for link in links] == [r[0] for r in got]


def test_rows_land_on_the_shards_python_predicts_on_both_workers(
    cluster: ThrowawayCitus, citus_dsn: str
) -> None:
    links = [f"https://shard.test/{i}" for i in range(1000)]
    with Upserter(citus_dsn, server_id="s1") as up:
        assert up.upsert([{"source_link": link} for link in links]).written == len(links)
    with psycopg.connect(citus_dsn) as conn:
        shard_map = ShardMap.load(conn)
    stored = rows_per_worker(cluster)
    assert len(stored) == 2 and all(stored.values())  # rows on both workers
    predicted: dict[tuple[str, int], set[str]] = {node: set() for node in stored}
    for link in links:
        predicted[shard_map.shard_for_link(link).node].add(link)
    assert stored == predicted


def test_batches_group_by_node_in_shard_order(cluster: ThrowawayCitus) -> None:
    with psycopg.connect(cluster.dsn) as conn:
        shard_map = ShardMap.load(conn)
    rnd = random.Random(7)
    links = [f"https://group.test/{rnd.random()}" for _ in range(500)]
    links += links[:20]  # repeated links stay next to each other
    groups = shard_map.group(links)
    assert [g.node for g in groups] == sorted({s.node for s in shard_map.shards})
    assert sorted(i for g in groups for i in g.indices) == list(range(len(links)))
    keys = partition_keys(links)
    for g in groups:
        shards = [shard_map.shard_for_key(keys[i]) for i in g.indices]
        assert {s.node for s in shards} == {g.node}  # one node per group
        assert [keys[i] for i in g.indices] == sorted(keys[i] for i in g.indices)
        assert g.shard_ids == sorted(set(g.shard_ids), key=g.shard_ids.index)
        assert g.shard_ids == list(dict.fromkeys(s.shard_id for s in shards))
    # with keys given (as route() returns them) the grouping is the same
    assert shard_map.group(links, keys) == groups


# -- the pipeline, unchanged, on the coordinator --------------------------------------

CLAIM_LOOP = """
import json, sys
from zenpipe.claim import Claimer
from zenpipe.embedded import _cache_root
from zenpipe.upsert import Upserter

dsn, owner = sys.argv[1], sys.argv[2]
taken = []
with Claimer(dsn, owner=owner, batch_size=25) as claimer, \\
        Upserter(dsn, server_id=owner) as up:
    while True:
        batch = claimer.claim()
        if not batch:
            if batch.contended:
                continue
            break
        recs = [{"source_link": c.link, "source_id": c.id, **c.data} for c in batch.claims]
        up.upsert_and_complete(recs, claimer, batch)
        taken += batch.ids
print(json.dumps(taken))
"""


@pytest.mark.slow
def test_many_processes_claim_every_row_exactly_once(
    cluster: ThrowawayCitus, citus_dsn: str
) -> None:
    n = 600
    seed(citus_dsn, n)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM_LOOP, citus_dsn, f"p{k}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(4)
    ]
    taken: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        taken += [int(i) for i in out.strip()[1:-1].split(",") if i.strip()]
    assert len(taken) == len(set(taken)) == n  # each row claimed once, by one process
    assert one(citus_dsn, "SELECT count(*) FROM results WHERE status = 'done'") == n
    assert one(citus_dsn, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (n, n)
    assert_no_leaks(citus_dsn)
    for dsn in cluster.worker_dsns:
        assert_no_leaks(dsn)


def test_worker_and_pool_run_unchanged_on_the_coordinator(
    cluster: ThrowawayCitus, citus_dsn: str
) -> None:
    seeded = demo.seed(citus_dsn, 300)
    with (
        ZenPool(dsn=citus_dsn, pool_max=3) as pool,
        Worker(pool, demo.enrich, server_id=pool.server_id, batch_size=50, max_attempts=2) as w,
    ):
        stats = w.run(until_idle=True)
    poison = seeded["poison"]
    assert one(citus_dsn, "SELECT count(*) FROM results WHERE status = 'done'") == 300 - poison
    assert stats.written + stats.rejected == 300 - poison
    assert one(citus_dsn, "SELECT count(*) FROM zen_contacts") == one(
        citus_dsn,
        "SELECT count(DISTINCT link) FROM results WHERE status = 'done' "
        "AND data->>'country' ~ '^[A-Z]{2}$'",
    )
    assert one(citus_dsn, "SELECT count(*) FROM zen_contacts WHERE source_id IS NULL") == 0
    assert_no_leaks(citus_dsn)


def test_workers_hold_no_zenpipe_advisory_locks(cluster: ThrowawayCitus, citus_dsn: str) -> None:
    seed(citus_dsn, 50)
    locks = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND classid = ANY (%s::oid[]) AND objsubid = 2"
    )
    namespaces = list(ALL_NAMESPACES)
    with (
        Claimer(citus_dsn, owner="locks", batch_size=20) as claimer,
        Upserter(citus_dsn, server_id="locks") as up,
        psycopg.connect(citus_dsn) as conn,
    ):
        # a claim whose transaction is still open holds its locks: on the coordinator only
        batch = claimer.claim(conn=conn)
        assert len(batch) == 20
        recs = [{"source_link": c.link, "source_id": c.id} for c in batch.claims]
        up.upsert(recs, conn=conn)  # the same transaction writes to the workers' shards
        held = one(
            citus_dsn,
            locks + " AND classid = %s",
            (namespaces, NAMESPACE_CLAIM),
        )
        assert held == 20
        for dsn in cluster.worker_dsns:
            assert one(dsn, locks, (namespaces,)) == 0
        conn.commit()
    for dsn in [citus_dsn, *cluster.worker_dsns]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert leftovers(conn).advisory_locks == 0


# -- order independence and crashes --------------------------------------------------

writes_strategy = st.lists(
    st.tuples(
        st.sampled_from(["s1", "s2"]),
        st.fixed_dictionaries(
            {
                "source_link": st.sampled_from([f"https://order.test/{i}" for i in range(6)]),
                "observed_at": st.datetimes(
                    min_value=datetime(2024, 1, 1),
                    max_value=datetime(2024, 1, 2),
                    timezones=st.just(UTC),
                ),
            },
            optional={
                "business_name": st.sampled_from(["a", "b", "c"]),
                "rating": st.sampled_from([1.0, 4.5]),
                "emails": st.lists(st.sampled_from(["x@a.com", "y@b.com", "z@c.com"])),
            },
        ),
    ),
    min_size=1,
    max_size=12,
)


_T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _snapshot(dsn: str, prefix: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT source_link, business_name, rating, emails, observed_us, observed_at, "
            "scrape_count FROM zen_contacts WHERE starts_with(source_link, %s) "
            "ORDER BY source_link",
            (prefix,),
        ).fetchall()
    return [(r[0].removeprefix(prefix), *r[1:]) for r in rows]


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(writes=writes_strategy, seed_=st.integers(0, 2**32))
# Two examples may share a seed (hypothesis often draws 0): each must still write links
# of its own, or it merges onto the rows the other left (the distributed table is never
# emptied) and counts their writes too.
@example(writes=[("s1", {"source_link": "https://order.test/0", "observed_at": _T0})], seed_=0)
@example(writes=[("s2", {"source_link": "https://order.test/0", "observed_at": _T0})], seed_=0)
def test_final_row_does_not_depend_on_write_order_on_citus(
    citus_dsn: str, writes: list[tuple[str, dict[str, Any]]], seed_: int
) -> None:
    rnd = random.Random(seed_)
    example_id = uuid.uuid4().hex[:12]
    ups = {s: Upserter(citus_dsn, server_id=s) for s in ("s1", "s2")}
    try:
        snapshots = []
        for run, concurrent in enumerate((False, False, True)):
            # each run writes links of its own (no emptying of the distributed table)
            prefix = f"{example_id}-{run}-"
            renamed = [(s, {**w, "source_link": prefix + w["source_link"]}) for s, w in writes]
            order = list(renamed)
            rnd.shuffle(order)
            if not concurrent:
                for server, w in order:
                    ups[server].upsert([w])
            else:
                per = {s: [w for s2, w in order if s2 == s] for s in ups}
                threads = [
                    threading.Thread(target=ups[s].upsert, args=(recs,))
                    for s, recs in per.items()
                    if recs
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
            snapshots.append(_snapshot(citus_dsn, prefix))
    finally:
        for up in ups.values():
            up.close()
    assert snapshots[0] == snapshots[1] == snapshots[2]
    counts = {r[0]: r[-1] for r in snapshots[0]}
    assert counts == {
        link: sum(1 for _, w in writes if w["source_link"] == link) for link in counts
    }


KILLED_WORKER = """
import sys
from zenpipe.claim import Claimer
from zenpipe.embedded import _cache_root
from zenpipe.upsert import Upserter

dsn, owner = sys.argv[1], sys.argv[2]
with Claimer(dsn, owner=owner, batch_size=100, lease_seconds=2) as claimer, \\
        Upserter(dsn, server_id=owner) as up:
    batch = claimer.claim()
    print("claimed", len(batch.claims), flush=True)
    recs = [{"source_link": c.link, "source_id": c.id, **c.data} for c in batch.claims]
    report = up.upsert_and_complete(recs, claimer, batch)
    print("written", report.written, flush=True)
"""


@pytest.mark.slow
def test_sigkill_mid_write_loses_nothing_and_writes_once(
    cluster: ThrowawayCitus, citus_dsn: str
) -> None:
    n = 40
    blocked_link = "https://citus.test/0"
    seed(citus_dsn, n)
    with psycopg.connect(citus_dsn) as conn:
        conn.execute(
            "INSERT INTO zen_contacts (partition_key, source_link, scrape_count) "
            "VALUES (hashtext(%s), %s, 1)",
            (blocked_link, blocked_link),
        )
    # A row lock on that contact (on its worker) holds the killed writer's merge in the
    # middle of its distributed transaction: staged, merging, claims not completed.
    blocker = psycopg.connect(citus_dsn)
    blocker.execute("SELECT 1 FROM zen_contacts WHERE source_link = %s FOR UPDATE", [blocked_link])
    dsn = citus_dsn + " application_name=zen-killed"
    first = subprocess.Popen(
        [sys.executable, "-c", KILLED_WORKER, dsn, "w-killed"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def waiting_on_a_worker() -> bool:
            if first.poll() is not None:
                raise AssertionError(f"writer exited early: {first.communicate()}")
            for worker_dsn in cluster.worker_dsns:
                if one(
                    worker_dsn,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%INSERT INTO%%zen_contacts%%'",
                ):
                    return True
            return False

        wait_for(waiting_on_a_worker)
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
        assert first.returncode == -signal.SIGKILL
    finally:
        if first.poll() is None:  # pragma: no cover - only if the test failed early
            first.kill()
            first.communicate()
    blocker.rollback()
    blocker.close()
    # The coordinator backend finds its client gone and rolls the distributed
    # transaction back on every node.
    wait_for(
        lambda: (
            not one(
                citus_dsn,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'zen-killed'",
            )
        )
    )
    assert one(citus_dsn, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == (1, 1)
    assert one(citus_dsn, "SELECT count(*) FROM zen_rejects") == 0
    assert one(citus_dsn, "SELECT count(*) FROM results WHERE status = 'claimed'") == n
    for worker_dsn in cluster.worker_dsns:  # no prepared transaction left behind
        assert one(worker_dsn, "SELECT count(*) FROM pg_prepared_xacts") == 0

    lease = one(citus_dsn, "SELECT max(lease_until) FROM results")
    wait_past(citus_dsn, lease)
    second = subprocess.run(
        [sys.executable, "-c", KILLED_WORKER, citus_dsn, "w-second"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    assert f"claimed {n}" in second.stdout and f"written {n}" in second.stdout
    assert (
        one(citus_dsn, "SELECT count(*) FROM results WHERE status = 'done' AND attempts = 2") == n
    )
    assert one(citus_dsn, "SELECT count(*), sum(emails_count) FROM zen_contacts") == (n, n)
    assert (
        one(
            citus_dsn,
            "SELECT scrape_count FROM zen_contacts WHERE source_link = %s",
            (blocked_link,),
        )
        == 2
    )
    assert (
        one(
            citus_dsn,
            "SELECT count(*) FROM zen_contacts WHERE source_link <> %s AND scrape_count = 1 "
            "AND last_scrape_server = 'w-second' AND source_id IS NOT NULL",
            (blocked_link,),
        )
        == n - 1
    )
    assert_no_leaks(citus_dsn)


def test_dashboard_on_citus_agrees_with_the_plain_one(citus_dsn: str, dsn: str) -> None:
    """sql/citus/0002 re-states zen_mv_dashboard without GROUPING SETS (which Citus
    refuses); the two definitions must keep the same columns and the same figures."""
    figures: list[dict[str, Any]] = []
    for target in (dsn, citus_dsn):
        seed(target, 30)
        with (
            Claimer(target, owner="dash", batch_size=10) as claimer,
            Upserter(target, server_id="dash-server") as up,
        ):
            batch = claimer.claim()
            recs = [
                {"source_link": c.link, "source_id": c.id, "country_code": "ID",
                 "emails": [f"{c.id}@dash.example"]}
                for c in batch.claims
            ]  # fmt: skip
            up.upsert_and_complete(recs, claimer, batch)
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("SELECT zen_refresh_dashboard_v1()")
            cur = conn.execute("SELECT * FROM zen_mv_dashboard")
            names = [d.name for d in cur.description]
            rows = cur.fetchall()
            types = conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'zen_mv_dashboard'::regclass AND attnum > 0 "
                "AND NOT attisdropped ORDER BY attnum"
            ).fetchall()
        assert len(rows) == 1
        row = dict(zip(names, rows[0], strict=True))
        row.pop("refreshed_at")
        figures.append({"types": types, "row": row})
    plain, citus = figures
    assert citus["types"] == plain["types"]
    assert citus["row"] == plain["row"]
    assert plain["row"]["source_total"] == 30
