"""The producer: enqueue(), Producer, load_file() and ``zenpipe load``, on real PostgreSQL."""

from __future__ import annotations

import csv
import json
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from helpers import assert_no_leaks

from zenpipe import LoadReport, Producer, enqueue
from zenpipe.cli import main
from zenpipe.produce import NOTIFY_CHANNEL, BadInputError, BadLine, load_file


def rows_of(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT link, data, priority, status FROM results ORDER BY id"
        ).fetchall()


def count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM results").fetchone()
    assert row is not None
    return int(row[0])


def write_jsonl(path: Path, objs: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in objs))
    return path


def test_load_jsonl_envelope_and_flat_lines(dsn: str, tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text(
        '{"link": "https://a.example", "data": {"name": "A"}, "priority": 5}\n'
        "\n"  # blank lines are ignored
        '{"source_link": "https://b.example", "name": "B", "priority": 9}\n'
        '{"url": "https://c.example", "big": 123456789012345678901234567890}\n'
    )
    report = load_file(dsn, f)
    assert (report.loaded, report.skipped, report.bad, report.committed) == (3, 0, 0, True)
    got = rows_of(dsn)
    assert got[0] == ("https://a.example", {"name": "A"}, 5, "pending")
    # flat: the whole object is the data, its "priority" key is data, not the priority
    assert got[1] == (
        "https://b.example",
        {"source_link": "https://b.example", "name": "B", "priority": 9},
        0,
        "pending",
    )
    # a flat line is stored as written: an integer beyond 64 bits keeps every digit
    with psycopg.connect(dsn) as conn:
        big = conn.execute("SELECT data->>'big' FROM results WHERE link LIKE '%c.example'")
        assert big.fetchone() == ("123456789012345678901234567890",)


def test_load_csv_link_priority_and_data_columns(dsn: str, tmp_path: Path) -> None:
    f = tmp_path / "in.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "link", "priority", "city"])
        w.writerow(['Café, "quoted"', "https://a.example", "3", "Köln"])
        w.writerow(["B", "https://b.example", "", "multi\nline"])
        w.writerow(["C", "https://c.example", "-2", ""])
    report = load_file(dsn, f, priority=1)
    assert (report.loaded, report.bad) == (3, 0)
    assert rows_of(dsn) == [
        ("https://a.example", {"name": 'Café, "quoted"', "city": "Köln"}, 3, "pending"),
        ("https://b.example", {"name": "B", "city": "multi\nline"}, 1, "pending"),
        ("https://c.example", {"name": "C", "city": ""}, -2, "pending"),
    ]


def test_priority_default_and_per_row_and_claim_order(dsn: str) -> None:
    report = enqueue(
        dsn,
        [
            {"link": "https://low.example"},
            {"link": "https://high.example", "data": {"x": 1}, "priority": 100},
            {"link": "https://mid.example", "priority": 10},
        ],
        priority=-1,
    )
    assert report.loaded == 3
    with psycopg.connect(dsn) as conn:
        got = conn.execute(
            "SELECT link, priority FROM results WHERE status = 'pending' ORDER BY priority DESC, id"
        ).fetchall()
    assert got == [
        ("https://high.example", 100),
        ("https://mid.example", 10),
        ("https://low.example", -1),
    ]


def test_skip_existing_skips_pending_and_claimed_links_not_done_ones(dsn: str) -> None:
    enqueue(dsn, [{"link": f"https://{s}.example"} for s in ("p", "c", "d", "f")])
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE results SET status = 'claimed', claim_owner = 't', claim_token = 1, "
            "lease_until = now() + interval '1 hour' WHERE link = 'https://c.example'"
        )
        conn.execute(
            "UPDATE results SET status = 'done', done_at = now() WHERE link = 'https://d.example'"
        )
        conn.execute("UPDATE results SET status = 'failed' WHERE link = 'https://f.example'")
    new = [{"link": f"https://{s}.example", "data": {"again": True}} for s in "pcdfn"]
    new.append({"link": "https://n.example", "data": {"repeat": True}})  # repeat in the load
    report = enqueue(dsn, new, skip_existing=True)
    assert (report.loaded, report.skipped) == (3, 3)
    with psycopg.connect(dsn) as conn:
        added = conn.execute(
            "SELECT link, data FROM results WHERE data ? 'again' OR data ? 'repeat' ORDER BY id"
        ).fetchall()
    assert added == [
        ("https://d.example", {"again": True}),
        ("https://f.example", {"again": True}),
        ("https://n.example", {"again": True}),  # the first occurrence wins
    ]
    # without skip_existing every row is inserted
    assert enqueue(dsn, new).loaded == len(new)
    assert_no_leaks(dsn)


def test_skip_existing_dedupes_across_batches_of_one_load(dsn: str, tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "dup.jsonl", [{"link": f"https://{i % 7}.example"} for i in range(50)]
    )
    report = load_file(dsn, f, skip_existing=True, batch_size=4)
    assert (report.loaded, report.skipped, report.batches) == (7, 43, 13)
    assert count(dsn) == 7


def test_bad_line_aborts_with_nothing_loaded_and_names_every_line(dsn: str, tmp_path: Path) -> None:
    lines = [orjson.dumps({"link": f"https://{i}.example"}).decode() for i in range(20)]
    lines[3] = '{"link": "https://x.example", "data": [1, 2]}'
    lines[11] = "not json"
    lines[15] = '{"name": "no link"}'
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    seen: list[BadLine] = []

    def on_bad(bad: BadLine) -> None:
        if seen:  # reading on after the first bad line: the transaction is already over
            assert_no_leaks(dsn)
        seen.append(bad)

    with pytest.raises(BadInputError) as err:  # batches before line 4 written, rolled back
        load_file(dsn, f, batch_size=2, skip_existing=True, on_bad=on_bad)
    report = err.value.report
    assert not report.committed
    assert (report.loaded, report.bad) == (0, 3)
    assert [(e.line, e.reason.split(":")[0]) for e in report.errors] == [
        (4, "data must be a JSON object, got array"),
        (12, "not valid JSON"),
        (16, "no link (one of link, source_link, url)"),
    ]
    assert seen == report.errors
    assert str(report.errors[0]) == f"{f}:4: data must be a JSON object, got array"
    assert f"{f}:4:" in str(err.value)
    assert count(dsn) == 0
    assert_no_leaks(dsn)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"link": ""}', "link is empty"),
        ('{"link": 7}', "link must be a string, got number"),
        ('{"link": "https://' + "a" * 2048 + '"}', "link is 2056 bytes long, more than 2048"),
        ('{"link": "https://a\\u0000"}', "contains a NUL character"),
        ('{"link": "https://a", "x": "\\u0000"}', "contains a NUL character"),
        ('{"link": "https://a", "data": {}, "priority": 40000}', "priority 40000 is outside"),
        ('{"link": "https://a", "data": {}, "priority": "1"}', "priority must be an integer"),
        ('{"link": "https://a", "data": {}, "priority": true}', "priority must be an integer"),
        ("[1, 2]", "a line must be a JSON object, got array"),
        ('{"link": "https://a", "v": NaN}', "not valid JSON"),
    ],
)
def test_each_kind_of_bad_jsonl_line_is_named(
    dsn: str, tmp_path: Path, line: str, reason: str
) -> None:
    f = tmp_path / "one.jsonl"
    f.write_text('{"link": "https://ok.example"}\n' + line + "\n")
    with pytest.raises(BadInputError) as err:
        load_file(dsn, f)
    (bad,) = err.value.report.errors
    assert bad.line == 2
    assert bad.reason.startswith(reason), bad.reason


def test_escaped_backslash_before_u0000_is_not_a_nul(dsn: str, tmp_path: Path) -> None:
    f = tmp_path / "bs.jsonl"
    f.write_text('{"link": "https://a.example", "x": "\\\\u0000"}\n')
    assert load_file(dsn, f).loaded == 1
    assert rows_of(dsn)[0][1]["x"] == "\\u0000"


def test_csv_bad_rows_and_refused_header(dsn: str, tmp_path: Path) -> None:
    f = tmp_path / "bad.csv"
    f.write_bytes(
        b"link,priority,name\n"
        b"https://a.example,1,A\n"
        b"https://b.example,x,B\n"
        b"https://c.example,2\n"
        b",3,D\n"
        b"https://e.example,4,\xff\xfe\n"
        b"https://f.example,5,F\n"
    )
    report = load_file(dsn, f, continue_on_error=True)
    assert report.committed
    assert [(e.line, e.reason) for e in report.errors] == [
        (3, "priority must be an integer, got 'x'"),
        (4, "2 fields, the header has 3"),
        (5, "link is empty"),
        (6, "not valid UTF-8"),
    ]
    assert [r[0] for r in rows_of(dsn)] == ["https://a.example", "https://f.example"]
    nolink = tmp_path / "nolink.csv"
    nolink.write_text("name,city\nA,B\n")
    with pytest.raises(BadInputError) as err:
        load_file(dsn, nolink, continue_on_error=True)  # refused even so
    assert [(e.line, e.reason) for e in err.value.report.errors] == [
        (1, "header has no link column (link, source_link, url)")
    ]


def test_continue_on_error_loads_good_lines_and_reports_every_bad_one(
    dsn: str, tmp_path: Path
) -> None:
    objs: list[Any] = [{"link": f"https://{i}.example", "n": i} for i in range(1000)]
    bad_at = {7, 8, 500, 999}
    for i in bad_at:
        objs[i] = {"link": None} if i % 2 else [i]
    f = write_jsonl(tmp_path / "mixed.jsonl", objs)
    report = load_file(dsn, f, continue_on_error=True, batch_size=100)
    assert report.committed
    assert (report.loaded, report.bad) == (996, 4)
    assert sorted(e.line for e in report.errors) == sorted(i + 1 for i in bad_at)
    assert count(dsn) == 996


def test_big_file_streams_in_batches(dsn: str, tmp_path: Path) -> None:
    n, batch = 50_000, 5000
    f = tmp_path / "big.jsonl"
    with f.open("wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps({"link": f"https://{i}.example", "name": f"n{i}"}) + b"\n")
    report = load_file(dsn, f, batch_size=batch)
    assert (report.loaded, report.batches) == (n, n // batch)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), min(id), max(id) FROM results").fetchone()
        first = conn.execute("SELECT data->>'name' FROM results ORDER BY id LIMIT 1").fetchone()
    assert row is not None and row[0] == n and row[2] - row[1] == n - 1
    assert first == ("n0",)  # ids follow file order


def test_memory_stays_at_one_batch_whatever_the_input_size(dsn: str) -> None:
    """Bounded by design: the loader pulls rows from an iterator as it writes them, so
    20 times more rows must not take 20 times the memory (tracemalloc peaks)."""
    from zenpipe.pool import guarded_pool

    def rows(n: int, tag: str) -> Iterator[dict[str, Any]]:
        for i in range(n):
            yield {"link": f"https://{tag}-{i}.example", "data": {"name": f"business {i}"}}

    with guarded_pool(dsn, name="test", min_size=1, max_size=1) as pool:
        enqueue(pool, rows(2000, "warm"), batch_size=1000)  # connection, caches, plans
        tracemalloc.start()
        try:
            enqueue(pool, rows(2000, "small"), batch_size=1000)
            _, small = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            report = enqueue(pool, rows(40_000, "big"), batch_size=1000)
            _, big = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert report.loaded == 40_000 and report.batches == 40
    assert big < 2 * small + 1_000_000, (small, big)


def test_a_source_that_fails_mid_way_leaves_nothing(dsn: str) -> None:
    def broken() -> Iterator[dict[str, Any]]:
        yield from ({"link": f"https://x{i}.example"} for i in range(2500))
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        enqueue(dsn, broken(), batch_size=1000)  # two batches were written, then rolled back
    assert count(dsn) == 0
    assert_no_leaks(dsn)


def test_enqueue_bad_row_raises_and_loads_nothing(dsn: str) -> None:
    with pytest.raises(BadInputError, match="rows:3: data must be a JSON object"):
        enqueue(dsn, [{"link": "https://a"}, {"link": "https://b"}, {"link": "c", "data": 1}])
    with pytest.raises(BadInputError, match="unknown key 'url'"):
        enqueue(dsn, [{"url": "https://a"}])
    with pytest.raises(BadInputError, match="data cannot be encoded as JSON"):
        enqueue(dsn, [{"link": "https://a", "data": {"x": object()}}])
    assert count(dsn) == 0


def test_producer_flushes_every_batch_and_on_exit(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as watcher:
        with Producer(dsn, batch_size=3, priority=2) as producer:
            for i in range(7):
                producer.add(f"https://{i}.example", {"i": i})
                if i == 2:  # the third add loaded the first batch, committed
                    row = watcher.execute("SELECT count(*) FROM results").fetchone()
                    assert row == (3,)
            producer.add_many([{"link": "https://p.example", "priority": 9}])
            with pytest.raises(BadInputError, match="row 9: link is empty"):
                producer.add("  ")
        assert producer.report.loaded == 8 and producer.report.batches == 3
    got = rows_of(dsn)
    assert [r[2] for r in got] == [2] * 7 + [9]
    # an exception inside the block drops the buffer
    with pytest.raises(RuntimeError), Producer(dsn, batch_size=100) as producer:
        producer.add("https://dropped.example")
        raise RuntimeError
    assert count(dsn) == 8


def test_producer_on_a_pool_the_caller_owns(dsn: str) -> None:
    from zenpipe.pool import guarded_pool

    with guarded_pool(dsn, name="test", min_size=1, max_size=2) as pool:
        with Producer(pool, batch_size=10) as producer:
            producer.add_many({"link": f"https://{i}.example"} for i in range(25))
        report: LoadReport = enqueue(pool, [{"link": "https://z.example"}])
        assert report.loaded == 1
        with pool.connection() as conn:  # still open: not the producer's to close
            conn.execute("SELECT 1")
    assert count(dsn) == 26


def test_notify_is_delivered_to_a_listener(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        enqueue(dsn, [{"link": f"https://{i}.example"} for i in range(12)], batch_size=5)
        got = list(listener.notifies(timeout=10, stop_after=1))
    assert [(n.channel, json.loads(n.payload)) for n in got] == [(NOTIFY_CHANNEL, {"rows": 12})]
    # a load that inserts nothing (all skipped) sends nothing
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        enqueue(dsn, [{"link": "https://0.example"}], skip_existing=True)
        enqueue(dsn, [{"link": "https://new.example"}])  # a marker that does notify
        got = list(listener.notifies(timeout=10, stop_after=1))
    assert [json.loads(n.payload) for n in got] == [{"rows": 1}]
    assert count(dsn) == 13


def test_concurrent_producers_with_skip_existing_insert_each_link_once(dsn: str) -> None:
    links = [f"https://shared-{i}.example" for i in range(3000)]
    start = threading.Barrier(4)
    reports: list[LoadReport] = []
    errors: list[BaseException] = []

    def produce(k: int) -> None:
        try:
            start.wait(timeout=30)
            # every producer walks the links in its own order, in small transactions
            order = links[k * 700 :] + links[: k * 700]
            if k % 2:
                order.reverse()
            with Producer(dsn, batch_size=250, skip_existing=True) as producer:
                producer.add_many({"link": link, "data": {"by": k}} for link in order)
            reports.append(producer.report)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(r.loaded for r in reports) == len(links)
    assert sum(r.skipped for r in reports) == 3 * len(links)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT link) FROM results WHERE status = 'pending'"
        ).fetchone()
    assert row == (len(links), len(links))
    assert_no_leaks(dsn)


def test_cli_load_exit_codes_and_bad_lines_on_stderr(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_jsonl(
        tmp_path / "good.jsonl", [{"link": f"https://{i}.example"} for i in range(10)]
    )
    assert main(["load", str(good), "--dsn", dsn, "--priority", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loaded 10, skipped 0, bad 0 from ")
    assert main(["load", str(good), "--dsn", dsn, "--skip-existing", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["loaded"], report["skipped"], report["committed"]) == (0, 10, True)

    bad = tmp_path / "bad.txt"  # no known suffix: sniffed as CSV
    bad.write_text("url,name\nhttps://x.example,X\n,Y\nhttps://z.example,Z,extra\n")
    assert main(["load", str(bad), "--dsn", dsn]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: link is empty\n" in err
    assert f"{bad}:4: 3 fields, the header has 2\n" in err
    assert "nothing loaded" in err
    assert count(dsn) == 10
    assert main(["load", str(bad), "--dsn", dsn, "--continue-on-error", "--batch", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count(f"{bad}:") == 2
    assert "loaded 1, skipped 0, bad 2" in captured.out
    assert count(dsn) == 11
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM results WHERE priority = 4").fetchone() == (10,)

    assert main(["load", str(tmp_path / "missing.jsonl"), "--dsn", dsn]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["load", str(good), "--dsn", dsn, "--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err


def test_skip_existing_check_reads_the_partial_link_index(dsn: str) -> None:
    """insert_new's anti-join reads results_link_idx (partial: pending and claimed), not
    the whole table, however many done rows the table has."""
    from zenpipe.queries import load

    q = load("produce")
    with psycopg.connect(dsn) as conn:
        definition = conn.execute("SELECT pg_get_indexdef('results_link_idx'::regclass)").fetchone()
        assert definition is not None
        assert (
            "(link) WHERE (status = ANY (ARRAY['pending'::text, 'claimed'::text]))"
            in (definition[0])
        )
        conn.execute(
            "INSERT INTO results (link, data, status, done_at) "
            "SELECT 'https://done-' || i || '.example', '{}', 'done', now() "
            "FROM generate_series(1, 100000) AS i"
        )
        conn.execute(
            "INSERT INTO results (link, data) "
            "SELECT 'https://pending-' || i || '.example', '{}' FROM generate_series(1, 2000) i"
        )
        conn.execute("ANALYZE results")
        conn.execute(q["create_stage"])
        with conn.cursor() as cur, cur.copy(q["copy_stage"]) as copy:
            copy.set_types(["int8", "text", "text", "bool", "int2"])
            for i in range(5000):
                copy.write_row((i, f"https://pending-{i}.example", "{}", False, 0))
        plan = "\n".join(
            str(r[0]) for r in conn.execute(b"EXPLAIN (COSTS OFF) " + q["insert_new"].as_bytes())
        )
        assert "results_link_idx" in plan, plan
        assert "Seq Scan on results" not in plan, plan


def test_cli_load_reads_standard_input(dsn: str) -> None:
    import subprocess
    import sys

    lines = "".join(f'{{"link": "https://{i}.example", "name": "n{i}"}}\n' for i in range(5))
    done = subprocess.run(
        [sys.executable, "-m", "zenpipe", "load", "-", "--dsn", dsn, "--skip-existing"],
        input=lines + lines,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("loaded 5, skipped 5, bad 0 from -"), done.stdout
    assert count(dsn) == 5


def test_skip_existing_waits_for_the_produce_lock_at_most_lock_wait(dsn: str) -> None:
    from zenpipe.locks import NAMESPACE_PRODUCE

    with psycopg.connect(dsn) as holder:  # another skip_existing load, not yet committed
        holder.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NAMESPACE_PRODUCE,))
        with pytest.raises(psycopg.errors.LockNotAvailable):
            enqueue(dsn, [{"link": "https://a.example"}], skip_existing=True, lock_wait=0.2)
        # a load without skip_existing never takes the lock
        assert enqueue(dsn, [{"link": "https://a.example"}]).loaded == 1
        holder.rollback()
    report = enqueue(
        dsn, [{"link": "https://a.example"}, {"link": "https://b.example"}], skip_existing=True
    )
    assert (report.loaded, report.skipped) == (1, 1)
    assert_no_leaks(dsn)
