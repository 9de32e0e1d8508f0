"""The bench's stand-in enrichment, run by every worker process (``zenpipe worker``'s
runtime), and its `BatchEvent` sink.

`enrich` derives the contact record from the source row's data alone (so the expected
table is computable, `zenpipe.bench.data.expect`), sleeps the configured latency, and:

- raises for a row marked ``fail`` while ``claim.attempt <= fail`` (transient: a later
  attempt succeeds);
- raises on every attempt for a ``poison`` row (parked after ``max_attempts``);
- SIGKILLs its own process for a ``crash`` row, on every attempt (the claimer's expiry
  halving then parks that row alone);
- returns None for a ``none`` row (no contact), and a bad record of the kind named by
  ``bad`` (the writer rejects it with that reason).

Parameters come from the environment the bench sets for its servers:
``ZENPIPE_BENCH_LATENCY`` (mean seconds per row, uniform in [0.5, 1.5] x it),
``ZENPIPE_BENCH_EVENTS`` (a folder: each process appends JSON lines to ``<pid>.jsonl``)
and ``ZENPIPE_BENCH_SERVER`` (the server's number, written into every line).

Lines: ``{"k": "start"}`` once, ``{"k": "c", ...}`` per claimed row enriched (row id,
fencing token, claim id, attempt: the fencing audit), ``{"k": "b", ...}`` per batch (the
`BatchEvent` and the process's peak RSS), ``{"k": "crash"}`` just before a crash row
kills the process.
"""

from __future__ import annotations

import math
import os
import random
import resource
import signal
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import orjson

from ..claim import Claim
from ..events import BatchEvent

__all__ = ["build_record", "enrich", "on_event"]

_lock = threading.Lock()
_file: TextIO | None = None
_LATENCY = float(os.environ.get("ZENPIPE_BENCH_LATENCY", "0") or 0)
_SERVER = int(os.environ.get("ZENPIPE_BENCH_SERVER", "0") or 0)


def _write(line: dict[str, Any]) -> None:
    global _file
    folder = os.environ.get("ZENPIPE_BENCH_EVENTS")
    if not folder:
        return
    line["t"] = time.time()
    line["s"] = _SERVER
    text = orjson.dumps(line).decode() + "\n"
    with _lock:
        if _file is None:
            path = os.path.join(folder, f"{os.getpid()}.jsonl")
            _file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            _file.write(orjson.dumps({"k": "start", "t": time.time(), "s": _SERVER}).decode())
            _file.write("\n")
        _file.write(text)  # line-buffered: one write per line, seen at once by the bench


def build_record(link: str, source_id: int, data: dict[str, Any]) -> dict[str, Any] | None:
    """The contact record of a source row (None for a row without a contact); a bad
    record when the row's data says ``bad``."""
    if data.get("none"):
        return None
    record: dict[str, Any] = {
        "source_link": link,
        "source_id": source_id,
        "observed_at": datetime.fromisoformat(data["seen"]),
        **data["place"],
    }
    bad = data.get("bad")
    if bad is not None:
        _spoil(record, bad)
    return record


def _spoil(record: dict[str, Any], reason: str) -> None:
    """Make *record* bad in exactly one way: the one `reason` names."""
    if reason == "empty_link":
        record["source_link"] = ""
    elif reason == "link_too_long":
        record["source_link"] = record["source_link"] + "/" + "x" * 2100
    elif reason == "wrong_type":
        record["reviews_count"] = "many"
    elif reason == "nul_byte":
        record["business_name"] = "Bad\x00Name"
    elif reason == "lone_surrogate":
        record["business_name"] = "Bad \ud800 Name"
    elif reason == "too_long":
        record["business_category"] = "c" * 2001
    elif reason == "out_of_range":
        record["latitude"] = 123.0
    elif reason == "not_finite":
        record["rating"] = math.nan
    elif reason == "bad_country_code":
        record["country_code"] = "Indonesia"
    elif reason == "bad_email":
        record["emails"] = ["not an email"]
    elif reason == "bad_phone":
        record["phones"] = ["call me maybe"]
    elif reason == "too_many_items":
        record["emails"] = [f"list{i}@spam.example" for i in range(1001)]
    elif reason == "naive_datetime":
        record["observed_at"] = datetime(2026, 1, 1)
    elif reason == "in_future":
        record["observed_at"] = datetime.now(UTC) + timedelta(hours=3)
    elif reason == "unknown_field":
        record["colour"] = "red"
    elif reason == "not_json":
        record["opening_hours"] = {1: "09:00-17:00"}
    elif reason == "unknown_source_id":
        record["source_id"] = 2**62
    else:  # pragma: no cover - data.BAD_REASONS and this table are kept in step
        raise ValueError(f"unknown bad kind {reason!r}")


def enrich(claim: Claim) -> dict[str, Any] | None:
    """The stand-in scraper: see the module docstring."""
    data = claim.data
    _write(
        {"k": "c", "id": claim.id, "tok": claim.token, "cid": str(claim.claim_id),
         "att": claim.attempt}
    )  # fmt: skip
    if _LATENCY > 0:
        time.sleep(_LATENCY * random.Random(claim.id).uniform(0.5, 1.5))  # not security
    if data.get("crash"):
        _write({"k": "crash", "id": claim.id})
        os.kill(os.getpid(), signal.SIGKILL)
    if data.get("poison"):
        raise ValueError("poison row: the page can never be parsed")
    if claim.attempt <= int(data.get("fail", 0)):
        raise ConnectionError(f"transient: site timed out (attempt {claim.attempt})")
    if claim.link is None:  # pragma: no cover - the bench always loads a link
        raise ValueError("row without a link")
    return build_record(claim.link, claim.id, data)


def on_event(event: BatchEvent) -> None:
    """`Worker.on_event` sink: one line per batch, with the process's peak RSS (KiB)."""
    line = asdict(event)
    line["k"] = "b"
    line["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _write(line)
