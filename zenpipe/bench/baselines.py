"""What zenpipe is measured against in the same run, on the same data and server.

Each baseline runs in a fresh database of its own (``zenbench_<random>``, the schema
applied, the same generated source rows loaded through `zenpipe.Producer`), made on the
server the bench runs on and dropped afterwards.

`physical_reference`: one process COPYs the expected contact rows
(`zenpipe.bench.data.expect`) into the empty ``zen_contacts`` and settles every source
row with one bulk ``UPDATE results SET status = 'done'``: the least work any pipeline
can do for these rows, so zenpipe's end-to-end throughput is reported as a ratio to it.

`crash_safe_floor` (``zenpipe bench --floor``, `benchmarks.bench_floor`): the least any
pipeline with a committed lease per claim must do, run by the server alone: sessions
each looping, as one ``CALL`` of a plpgsql procedure, claim by ``FOR UPDATE SKIP
LOCKED`` with a lease and a token, COMMIT, one ``INSERT ... ON CONFLICT DO UPDATE``
setting the new values (no merge rules), settle under the token, COMMIT, over contacts
staged before the clock starts. No client work, no round trip: a real pipeline can only
be slower, so its ratio to the physical reference bounds what any such design reaches
on that server.

`compare` (``zenpipe bench --compare``): two hand-written loops, ``servers x workers``
OS processes each, with the same stand-in enrichment (`zenpipe.bench.enrich`'s records
and latency; transient failures go back to pending, poison and crash rows are parked
without killing anything), both writing with the seed's per-row UPSERT:

- ``seed``: the audit's ``WHERE status = 'pending' AND pg_try_advisory_xact_lock(id)
  LIMIT n`` claim (lock released at the end of the statement, rows left pending);
- ``skip_locked``: ``FOR UPDATE SKIP LOCKED`` with a lease written and committed before
  enrichment.

The same invariant checker (`zenpipe.bench.invariants.check`) then reads each baseline's
database; its violations, the rows written more than once and the "out of shared
memory" errors are reported with its throughput.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import secrets
import threading
import time
from array import array
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .. import schema
from ..keys import hashtext
from ..produce import Producer
from ..queries import load
from . import data as bench_data
from .enrich import build_record
from .invariants import RunFacts, check

__all__ = ["METHODS", "compare", "crash_safe_floor", "physical_reference"]

#: The loops of ``--compare``, in the order they run.
METHODS = ("seed", "skip_locked")

_SCALAR_PARAMS = bench_data.SCALARS


@contextlib.contextmanager
def fresh_database(admin: str, dataset: bench_data.Dataset) -> Iterator[str]:
    """A database of its own with the schema and *dataset*'s source rows; dropped at the
    end.  Yields its DSN."""
    q = load("bench")
    name = f"zenbench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(q["create_database"].format(name=sql.Identifier(name)))
    try:
        dsn = make_conninfo(admin, dbname=name)
        schema.apply(dsn)
        with Producer(dsn, batch_size=5000) as producer:
            for row in dataset.rows:
                producer.add(row.link, row.data, priority=row.priority)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(q["analyze_results"])
        yield dsn
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(q["drop_database"].format(name=sql.Identifier(name)))


def physical_reference(
    admin: str, dataset: bench_data.Dataset, expected: bench_data.Expected
) -> dict[str, Any]:
    """COPY the expected contacts into an empty zen_contacts and mark every source row
    done in one UPDATE, timed together; *admin*: a DSN on the bench's server."""
    q = load("bench")
    contacts = []
    for c in expected.contacts.values():
        s = c.scalars()
        contacts.append(
            (c.link, hashtext(c.link), c.scrape_count, sorted(c.emails), sorted(c.phones),
             *(s[col] for col in bench_data.SCALARS))
        )  # fmt: skip
    with fresh_database(admin, dataset) as dsn, psycopg.connect(dsn) as conn:
        started = time.monotonic()
        with conn.cursor().copy(q["reference_copy_contacts"]) as copy:
            for row in contacts:
                copy.write_row(row)
        conn.commit()
        conn.execute(q["reference_mark_done"])
        conn.commit()
        seconds = time.monotonic() - started
    rows = len(dataset.rows)
    return {
        "method": "physical_reference",
        "processes": 1,
        "rows": rows,
        "contacts": len(contacts),
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
    }


def crash_safe_floor(
    admin: str,
    dataset: bench_data.Dataset,
    expected: bench_data.Expected,
    *,
    sessions: int,
    batch: int,
) -> dict[str, Any]:
    """Run the floor loop in *sessions* connections at once until every source row is
    settled, in a fresh database; *admin*: a DSN on the bench's server.  Blocks until
    the loops end; raises RuntimeError when a source row is left unsettled or the
    contacts are not one per link of *expected*, and a loop's own error as it is."""
    q = load("bench")
    with fresh_database(admin, dataset) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(q["floor_staging"])
            conn.execute(q["floor_procedure"])
        errors: list[BaseException] = []
        conns = [psycopg.connect(dsn, autocommit=True) for _ in range(sessions)]
        go = threading.Barrier(sessions + 1)

        def loop(conn: psycopg.Connection[Any]) -> None:
            go.wait()
            try:
                conn.execute(q["floor_call"], {"batch": batch})
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=loop, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        go.wait()
        started = time.monotonic()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        for c in conns:
            c.close()
        if errors:
            raise errors[0]
        with psycopg.connect(dsn) as conn:
            left = conn.execute(q["floor_left"]).fetchone()
            contacts = conn.execute(q["floor_contacts"]).fetchone()
        assert left is not None and contacts is not None
        if left[0]:
            raise RuntimeError(f"the floor left {left[0]} source rows unsettled")
        if contacts[0] != len(expected.contacts):
            raise RuntimeError(
                f"the floor wrote {contacts[0]} contacts for {len(expected.contacts)} links"
            )
    rows = len(dataset.rows)
    return {
        "method": "crash_safe_floor",
        "sessions": sessions,
        "batch": batch,
        "rows": rows,
        "contacts": contacts[0],
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
    }


# -- the --compare loops (each a process of its own) ---------------------------------------


def _enrich(data: dict[str, Any], link: str, row_id: int, attempt: int, latency: float) -> Any:
    """The bench's stand-in enrichment, without the process kills: the same record
    (`zenpipe.bench.enrich.build_record`) and latency; raises for poison and crash rows
    and for a transient row's first attempts."""
    if latency > 0:
        time.sleep(latency * random.Random(row_id).uniform(0.5, 1.5))  # not security
    if data.get("poison") or data.get("crash"):
        raise ValueError("poison row: the page can never be parsed")
    if attempt <= int(data.get("fail", 0)):
        raise ConnectionError(f"transient: site timed out (attempt {attempt})")
    return build_record(link, row_id, data)


def _params(record: dict[str, Any]) -> dict[str, Any]:
    out = {col: record.get(col) for col in _SCALAR_PARAMS}
    out["source_link"] = record.get("source_link")
    out["source_id"] = record.get("source_id")
    out["emails"] = list(record.get("emails") or [])
    out["phones"] = list(record.get("phones") or [])
    return out


def _loop(method: str, dsn: str, batch: int, lease: float, latency: float,  # noqa: PLR0917
          deadline: float) -> tuple[array[int], int, int]:  # fmt: skip
    """Claim, enrich, write row by row, settle, until nothing is left or *deadline*.
    Returns the ids written, the write errors and the "out of shared memory" errors."""
    q = load("bench")
    written: array[int] = array("q")
    errors = oom = 0
    owner = f"{method}-{os.getpid()}"
    bump = 1 if method == "seed" else 0  # skip_locked_claim counts the attempt itself
    with psycopg.connect(dsn, autocommit=True, application_name=f"zenbench-{method}") as conn:
        while time.monotonic() < deadline:
            try:
                if method == "seed":
                    rows = conn.execute(q["seed_claim"], {"n": batch}).fetchall()
                else:
                    rows = conn.execute(
                        q["skip_locked_claim"], {"n": batch, "owner": owner, "lease": lease}
                    ).fetchall()
            except psycopg.errors.OutOfMemory:
                oom += 1  # "out of shared memory": the lock table is full
                continue
            except psycopg.Error:
                errors += 1
                continue
            if not rows:
                if method == "skip_locked":
                    conn.execute(q["skip_locked_reclaim"])
                left = conn.execute(q["baseline_left"]).fetchone()
                if left is None or left[0] == 0:
                    break
                time.sleep(0.01)  # pacing of an idle loop only
                continue
            for row_id, link, data, attempts in rows:
                try:
                    record = _enrich(data, link, row_id, attempts + 1, latency)
                except (ConnectionError, ValueError) as e:
                    status = "pending" if isinstance(e, ConnectionError) else "failed"
                    conn.execute(
                        q["baseline_fail"],
                        {"id": row_id, "status": status, "error": str(e), "bump": bump},
                    )
                    continue
                if record is not None:
                    try:
                        conn.execute(q["baseline_upsert_row"], _params(record))
                        written.append(row_id)
                    except psycopg.errors.OutOfMemory:
                        oom += 1
                    except (psycopg.Error, UnicodeEncodeError):
                        errors += 1  # a bad record the seed writer cannot store
                conn.execute(q["baseline_done"], {"id": row_id})
    return written, errors, oom


def _worker(method: str, dsn: str, batch: int, lease: float, latency: float,  # noqa: PLR0917
            cap: float, start: Any, out: Any) -> None:  # fmt: skip
    start.wait()
    try:
        written, errors, oom = _loop(method, dsn, batch, lease, latency,
                                     time.monotonic() + cap)  # fmt: skip
    except Exception as e:
        out.put((b"", 1, 0, repr(e)))
        return
    out.put((written.tobytes(), errors, oom, ""))


def run_method(method: str, admin: str, dataset: bench_data.Dataset,
               expected: bench_data.Expected, *, processes: int, batch: int, lease: float,
               latency: float, cap: float) -> dict[str, Any]:  # fmt: skip
    """One baseline loop in a fresh database: throughput and invariant violations."""
    with fresh_database(admin, dataset) as dsn:
        ctx = mp.get_context("spawn")
        start = ctx.Event()
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_worker,
                        args=(method, dsn, batch, lease, latency, cap, start, out))
            for _ in range(processes)
        ]  # fmt: skip
        for p in procs:
            p.start()
        time.sleep(1.0)  # interpreters import before the clock starts (not correctness)
        t0 = time.monotonic()
        start.set()
        results = [out.get() for _ in procs]
        seconds = time.monotonic() - t0
        for p in procs:
            p.join()
        ids: array[int] = array("q")
        for raw, _, _, _ in results:
            part: array[int] = array("q")
            part.frombytes(raw)
            ids.extend(part)
        with psycopg.connect(dsn, autocommit=True) as conn:
            settled_row = conn.execute(
                load("bench")["progress"], {"total": len(dataset.rows)}
            ).fetchone()
            settled = int(settled_row[0]) if settled_row else 0
            violations = check(conn, dataset, expected, RunFacts())
    return {
        "method": method,
        "processes": processes,
        "batch": batch,
        "seconds": round(seconds, 2),
        "rows_settled": settled,
        "complete": settled == len(dataset.rows),
        "rows_per_s": round(settled / seconds, 1) if seconds > 0 else None,
        "rows_written_more_than_once": len(ids) - len(set(ids)),
        "write_errors": sum(r[1] for r in results),
        "out_of_shared_memory": sum(r[2] for r in results),
        "crashed": [r[3] for r in results if r[3]][:3],
        "violations": [v.to_dict() for v in violations],
    }


def compare(admin: str, dataset: bench_data.Dataset, expected: bench_data.Expected, *,
            processes: int, batch: int, lease: float, latency: float,
            cap: float) -> list[dict[str, Any]]:  # fmt: skip
    """Every loop of `METHODS`, one after another, each capped at *cap* seconds."""
    return [
        run_method(m, admin, dataset, expected, processes=processes, batch=batch,
                   lease=lease, latency=latency, cap=cap)
        for m in METHODS
    ]  # fmt: skip
