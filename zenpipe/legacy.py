"""``zenpipe migrate-legacy``: the audit's V1 and V2 contact tables into ``zen_contacts``.

The shapes supported are in ``sql/legacy/``: V1 ``scraped_contacts`` (flat, lists as
comma-separated text, a link may repeat) and V2 ``scraped_contacts_v2``
(hash-partitioned, arrays, socials in jsonb).  Rows are read in id order, *batch* at a
time, mapped to zenpipe records and written through the normal `zenpipe.Upserter`, so
the merge rules apply (duplicates of a link merge, newest observation wins per
column) and bad rows are quarantined in ``zen_rejects`` (server id ``legacy-v1`` /
``legacy-v2``) with their reason.  Each batch and its resume point
(``zen_legacy_progress``) commit in one transaction: a run killed at any point resumes
after the last committed batch and counts nothing twice, and a finished run re-runs as
a no-op.  The report verifies the counts: every source row read is either written or
rejected, and how many distinct source links now have a contact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from ._ops import Conn, connect
from .errors import ZenpipeError
from .locks import NAMESPACE_OPS, OPS_LEGACY_V1, OPS_LEGACY_V2
from .queries import load
from .upsert import Upserter

__all__ = ["LegacyReport", "MigrationBusy", "migrate", "record_from_v1", "record_from_v2"]

SOCIALS = ("facebook", "instagram", "linkedin", "twitter", "youtube", "tiktok")


class MigrationBusy(ZenpipeError):
    """Another session is migrating the same source right now."""


def _split(text: Any) -> list[str] | None:
    if text is None:
        return None
    if not isinstance(text, str):
        return [text]  # not text: the validator names the problem
    items = [p.strip() for p in text.replace(";", ",").split(",")]
    return [p for p in items if p] or None


def _drop_none(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None}


def record_from_v1(row: Mapping[str, Any]) -> dict[str, Any]:
    """A V1 ``scraped_contacts`` row as a zenpipe record (pure)."""
    rec: dict[str, Any] = {
        "source_link": row["link"],
        "business_name": row["name"],
        "business_category": row["category"],
        "website": row["website"],
        "country_code": row["country"],
        "city": row["city"],
        "address": row["address"],
        "latitude": row["lat"],
        "longitude": row["lng"],
        "rating": None if row["rating"] is None else round(float(row["rating"]), 1),
        "reviews_count": row["reviews"],
        "maps_phone": row["phone"],
        "emails": _split(row["emails"]),
        "phones": _split(row["phones"]),
        "whatsapp": _split(row["whatsapp"]),
        "observed_at": row["scraped_at"],
        "scrape_status": "success",
    }
    for s in SOCIALS:
        rec[f"{s}_url"] = row[s]
    return _drop_none(rec)


def record_from_v2(row: Mapping[str, Any]) -> dict[str, Any]:
    """A V2 ``scraped_contacts_v2`` row as a zenpipe record (pure)."""
    socials = row["socials"] if isinstance(row["socials"], dict) else {}
    rec: dict[str, Any] = {
        "source_link": row["source_link"],
        "business_name": row["business_name"],
        "business_category": row["business_category"],
        "website": row["website"],
        "country_code": row["country_code"],
        "city": row["city"],
        "address": row["address"],
        "latitude": row["latitude"],
        "longitude": row["longitude"],
        # numeric(2,1) arrives as Decimal; the validator takes numbers as float.
        "rating": None if row["rating"] is None else float(row["rating"]),
        "reviews_count": row["reviews_count"],
        "maps_phone": row["maps_phone"],
        "emails": row["emails"] or None,
        "phones": row["phones"] or None,
        "whatsapp": row["whatsapp"] or None,
        "observed_at": row["updated_at"],
        "scrape_status": "success",
    }
    for s in SOCIALS:
        rec[f"{s}_url"] = socials.get(s)
    return _drop_none(rec)


@dataclass(frozen=True)
class _Source:
    name: str
    table: str
    link: str
    batch_query: str
    lock_key: int
    to_record: Callable[[Mapping[str, Any]], dict[str, Any]]


_SOURCES = {
    "v1": _Source("v1", "scraped_contacts", "link", "v1_batch", OPS_LEGACY_V1, record_from_v1),
    "v2": _Source(
        "v2", "scraped_contacts_v2", "source_link", "v2_batch", OPS_LEGACY_V2, record_from_v2
    ),
}


@dataclass(frozen=True)
class LegacyReport:
    """Counts of a migration, as recorded in ``zen_legacy_progress`` plus the check."""

    source: str
    source_rows: int
    rows_read: int
    written: int
    merged: int
    rejected: int
    batches: int
    links_with_contact: int
    this_run_rows: int
    seconds: float

    @property
    def verified(self) -> bool:
        """Every source row read, and each either written or rejected."""
        return self.rows_read == self.source_rows and self.written + self.rejected == self.rows_read

    def render(self) -> str:
        return (
            f"migrate-legacy {self.source}: source rows {self.source_rows:,}, read "
            f"{self.rows_read:,} ({self.this_run_rows:,} in this run, {self.seconds:.2f} s), "
            f"written {self.written:,} (of which merged into a row of the same batch "
            f"{self.merged:,}), rejected {self.rejected:,} (kept in zen_rejects), distinct "
            f"source links with a contact now {self.links_with_contact:,}; "
            + ("verified: read = source, written + rejected = read" if self.verified else
               "NOT VERIFIED: counts disagree")
        )  # fmt: skip


def migrate(
    dsn: str,
    source: str,
    *,
    batch: int = 1000,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> LegacyReport:
    """Copy the V1 or V2 table (*source* ``"v1"`` / ``"v2"``) into ``zen_contacts``,
    resuming where the last run stopped; return the verified counts.

    Each batch is one transaction (read, upsert, progress).  Raises `MigrationBusy`
    when another run migrates the same source, `ZenpipeError` for an unknown source or
    a missing table.
    """
    if source not in _SOURCES:
        raise ZenpipeError(f"unknown legacy source {source!r}: use v1 or v2")
    if batch < 1:
        raise ValueError("batch must be at least 1")
    src = _SOURCES[source]
    q = load("legacy")
    started = time.monotonic()
    this_run = 0
    with (
        connect(dsn, purpose=f"migrate-legacy-{source}", statement_timeout=300.0) as conn,
        Upserter(dsn, server_id=f"legacy-{source}") as upserter,
    ):
        if conn.execute(q["table_exists"], {"table": src.table}).fetchone() != (True,):
            raise ZenpipeError(f"table {src.table} not found (see sql/legacy/)")
        conn.execute(q["start"], {"source": source})
        n = 0
        while max_batches is None or n < max_batches:
            got = _one_batch(conn, q, src, upserter, batch)
            if got < 0:
                break
            n += 1
            this_run += got
            if on_batch is not None:
                on_batch(got)
        return _report(conn, q, src, this_run, time.monotonic() - started)


def _one_batch(
    conn: Conn, q: Mapping[str, sql.SQL], src: _Source, upserter: Upserter, limit: int
) -> int:
    """One batch in one transaction; the number of rows read, -1 when none was left."""
    with conn.transaction():
        got = conn.execute(
            q["try_lock"], {"namespace": NAMESPACE_OPS, "key": src.lock_key}
        ).fetchone()
        if not (got and got[0]):
            raise MigrationBusy(f"another session is migrating {src.name}")
        progress = conn.execute(q["progress"], {"source": src.name}).fetchone()
        assert progress is not None
        rows: Sequence[dict[str, Any]] = (
            conn.cursor(row_factory=dict_row)
            .execute(q[src.batch_query], {"after": progress[0], "limit": limit})
            .fetchall()
        )
        if not rows:
            conn.execute(q["finish"], {"source": src.name})
            return -1
        report = upserter.upsert([src.to_record(r) for r in rows], conn=conn)
        conn.execute(
            q["advance"],
            {
                "source": src.name,
                "last_id": rows[-1]["id"],
                "read": len(rows),
                "written": report.written,
                "merged": report.merged_in_batch,
                "rejected": report.rejected,
            },
        )
    return len(rows)


def _report(
    conn: Conn, q: Mapping[str, sql.SQL], src: _Source, this_run: int, secs: float
) -> LegacyReport:
    table = sql.Identifier(src.table)
    link = sql.Identifier(src.link)
    total = conn.execute(q["source_count"].format(table=table)).fetchone()
    present = conn.execute(q["links_present"].format(table=table, link=link)).fetchone()
    p = conn.execute(q["totals"], {"source": src.name}).fetchone()
    assert total is not None and present is not None and p is not None
    return LegacyReport(
        source=src.name,
        source_rows=int(total[0]),
        rows_read=int(p[0]),
        written=int(p[1]),
        merged=int(p[2]),
        rejected=int(p[3]),
        batches=int(p[4]),
        links_with_contact=int(present[0]),
        this_run_rows=this_run,
        seconds=secs,
    )
