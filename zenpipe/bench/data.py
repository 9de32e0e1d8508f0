"""The bench's source rows and the table they must produce, computed independently.

`generate` makes deterministic Google-Maps-like source rows (a seed gives the same rows
on every machine): businesses with a website, 0-5 emails and 0-3 phones drawn from the
business's own pool (so re-scrapes overlap and their arrays merge), re-scrapes of the
same links with other data and other observation times, bad records of every kind the
validator rejects (one reason each), rows whose enrichment fails a few times and then
succeeds, poison rows that always fail, rows whose enrichment yields no contact, and
(when asked) rows whose enrichment kills its own process.

`expect` derives, from the generated rows alone and the documented merge rules
(docs/upserting.md), what the database must hold at the end: the status of every source
row, one contact per valid link with its ``scrape_count``, array unions and newest
scalars, and the multiset of rejects.  It never calls zenpipe's validator or writer:
normalization of the few value shapes the generator emits is re-implemented here.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "BAD_REASONS",
    "SCALARS",
    "Dataset",
    "Expected",
    "ExpectedContact",
    "SourceRow",
    "canonical_phone",
    "expect",
    "generate",
]

#: The scalar columns the bench writes and checks (newest observation wins).
SCALARS = (
    "business_name",
    "business_category",
    "website",
    "city",
    "country_code",
    "latitude",
    "longitude",
    "rating",
    "reviews_count",
    "is_claimed",
    "maps_phone",
    "scrape_status",
)

#: Column defaults of zen_contacts a contact keeps when no write observed the column.
_DEFAULTS: dict[str, Any] = {"scrape_status": "pending"}

#: (field, reason) of every bad record kind: `zenpipe.bench.enrich` builds the record,
#: the writer must reject it with exactly this reason and keep it in ``zen_rejects``.
BAD_REASONS: tuple[tuple[str, str], ...] = (
    ("source_link", "empty_link"),
    ("source_link", "link_too_long"),
    ("reviews_count", "wrong_type"),
    ("business_name", "nul_byte"),
    ("business_name", "lone_surrogate"),
    ("business_category", "too_long"),
    ("latitude", "out_of_range"),
    ("rating", "not_finite"),
    ("country_code", "bad_country_code"),
    ("emails", "bad_email"),
    ("phones", "bad_phone"),
    ("emails", "too_many_items"),
    ("observed_at", "naive_datetime"),
    ("observed_at", "in_future"),
    ("colour", "unknown_field"),
    ("opening_hours", "not_json"),
    ("source_id", "unknown_source_id"),
)

_CATEGORIES = ["Cafe", "Dentist", "Hotel", "Restaurant", "Bakery", "Gym", "Pharmacy", "Salon"]
_COUNTRIES = ["ID", "MY", "SG", "TH", "VN", "PH", "DE", "US"]
_STATUSES = ["success", "partial", "success", "success"]
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
#: Observation times are a minute apart, closer in runs of more than 432,000 rows, so
#: the newest stays within _SPAN of _EPOCH, in the past: the writer rejects an
#: observation ahead of the database clock (in_future), and a 1,000,000-row run a
#: minute apart reached into 2027 (half its good rows rejected as from the future).
_SPAN = timedelta(days=300)


def observation_step(rows: int) -> timedelta:
    """The time between consecutive observations of a *rows*-row dataset."""
    return min(timedelta(minutes=1), _SPAN / max(rows, 1))


#: Plain text columns, where a blank value means "not seen".
_BLANKABLE = frozenset({"business_name", "business_category", "website", "city"})


@dataclass(frozen=True)
class SourceRow:
    """One row for ``results``: *data* carries everything the stand-in enrichment needs
    (``n`` the row's number, ``seen`` its observation time, ``place`` the contact, and
    the flags ``bad``, ``fail``, ``poison``, ``crash``, ``none``)."""

    link: str
    data: dict[str, Any]
    priority: int = 0

    @property
    def kind(self) -> str:
        d = self.data
        for flag in ("crash", "poison", "bad", "none"):
            if flag in d:
                return flag
        return "good"


@dataclass
class Dataset:
    rows: list[SourceRow]
    seed: int

    def counts(self) -> dict[str, int]:
        c = Counter(r.kind for r in self.rows)
        links = Counter(r.link for r in self.rows)
        return {
            "rows": len(self.rows),
            "links": len(links),
            "rescrapes": sum(n - 1 for n in links.values()),
            "good": c["good"],
            "bad": c["bad"],
            "poison": c["poison"],
            "crash": c["crash"],
            "no_contact": c["none"],
            "transient_failures": sum(1 for r in self.rows if "fail" in r.data),
        }


def _phone(rng: random.Random, digits: str) -> str:
    """One of the written shapes of a phone number (the writer canonicalizes them)."""
    shape = rng.randrange(3)
    if shape == 0:
        return f"+62 {digits[:3]}-{digits[3:7]}-{digits[7:]}"
    if shape == 1:
        return f"0062 {digits[:3]} {digits[3:7]} {digits[7:]}"
    return f"(+62) {digits[:3]}.{digits[3:]}"


def canonical_phone(written: str) -> str:
    """The canonical form of the shapes `_phone` writes (docs/upserting.md: separators
    dropped, ``00`` or ``+`` becomes ``+``)."""
    s = "".join(ch for ch in written if ch not in " ()./-")
    if s.startswith("00"):
        s = "+" + s[2:]
    return s


def _business(rng: random.Random, i: int, seed: int) -> dict[str, Any]:
    domain = f"biz{seed}-{i}.example"
    return {
        "link": f"https://www.google.com/maps/place/biz-{seed}-{i}/@{rng.uniform(-8, 20):.5f}z",
        "domain": domain,
        "emails": [f"{name}@{domain}" for name in ("info", "sales", "hello", "owner", "jobs")],
        "phones": [f"{rng.randrange(10**9, 10**10)}" for _ in range(4)],
        "lat": round(rng.uniform(-10, 20), 6),
        "lng": round(rng.uniform(95, 140), 6),
    }


def _place(rng: random.Random, biz: dict[str, Any], scrape: int) -> dict[str, Any]:
    """A scrape of *biz*: other data on every scrape, some columns missing."""
    emails = rng.sample(biz["emails"], rng.randrange(6))
    # some emails written in another case or with blanks: the writer normalizes them
    emails = [e.upper() + " " if rng.random() < 0.2 else e for e in emails]
    phones = [_phone(rng, d) for d in rng.sample(biz["phones"], rng.randrange(4))]
    place: dict[str, Any] = {
        "business_name": f"Business {biz['domain'].split('.')[0]} v{scrape}",
        "business_category": rng.choice(_CATEGORIES),
        "website": f"https://{biz['domain']}/",
        "city": f"City {rng.randrange(97)}",
        "country_code": rng.choice(_COUNTRIES),
        "latitude": round(biz["lat"] + rng.uniform(-0.001, 0.001), 6),
        "longitude": round(biz["lng"] + rng.uniform(-0.001, 0.001), 6),
        "rating": round(rng.uniform(1, 5), 1),
        "reviews_count": rng.randrange(5000),
        "is_claimed": rng.random() < 0.5,
        "maps_phone": "+62" + rng.choice(biz["phones"]),
        "scrape_status": rng.choice(_STATUSES),
        "emails": emails,
        "phones": phones,
    }
    for column in SCALARS:  # a re-scrape that did not see a column: NULL never erases
        if rng.random() < 0.1:
            blank = column in _BLANKABLE and rng.random() < 0.3
            place[column] = "  " if blank else None  # blank text means unknown too
    if place["country_code"] and rng.random() < 0.1:
        place["country_code"] = f" {place['country_code'].lower()}"  # trimmed, upper-cased
    return place


def generate(
    rows: int,
    *,
    seed: int = 11,
    rescrape_rate: float = 0.35,
    bad_rate: float = 0.02,
    poison_rate: float = 0.003,
    fail_rate: float = 0.02,
    none_rate: float = 0.01,
    crash_rate: float = 0.0,
) -> Dataset:
    """*rows* deterministic source rows (same *seed*, same rows).

    *rescrape_rate* of the rows re-scrape an earlier link; *bad_rate* carry a bad record
    (every kind of `BAD_REASONS` at least once when there is room); *poison_rate* always
    fail; *fail_rate* fail once or twice, then succeed; *crash_rate* kill their worker
    process on every attempt (at least one row when positive).
    """
    rng = random.Random(seed)
    out: list[SourceRow] = []
    businesses: list[dict[str, Any]] = []
    scrapes: Counter[str] = Counter()
    times = list(range(rows))
    step = observation_step(rows)
    rng.shuffle(times)  # observation times unrelated to load order: merges see both orders
    n_crash = max(1, round(rows * crash_rate)) if crash_rate > 0 else 0
    n_bad = max(len(BAD_REASONS), round(rows * bad_rate)) if bad_rate > 0 else 0
    special = rng.sample(range(rows), min(rows, n_crash + n_bad))
    crash_at = set(special[:n_crash])
    bad_at = {at: BAD_REASONS[k % len(BAD_REASONS)] for k, at in enumerate(special[n_crash:])}
    for n in range(rows):
        if businesses and rng.random() < rescrape_rate:
            biz = rng.choice(businesses)
        else:
            biz = _business(rng, len(businesses), seed)
            businesses.append(biz)
        scrapes[biz["link"]] += 1
        seen = _EPOCH + step * times[n]
        data: dict[str, Any] = {
            "n": n,
            "seen": seen.isoformat(),
            "place": _place(rng, biz, scrapes[biz["link"]]),
        }
        if n in crash_at:
            data["crash"] = 1
        elif n in bad_at:
            data["bad"] = bad_at[n][1]
        elif rng.random() < poison_rate:
            data["poison"] = 1
        elif rng.random() < none_rate:
            data["none"] = 1
        elif rng.random() < fail_rate:
            data["fail"] = rng.choice((1, 1, 2))
        out.append(SourceRow(biz["link"], data, priority=rng.choice((0, 0, 0, 1))))
    return Dataset(out, seed)


# -- the expected table --------------------------------------------------------------------


@dataclass
class ExpectedContact:
    link: str
    scrape_count: int = 0
    emails: set[str] = field(default_factory=set)
    phones: set[str] = field(default_factory=set)
    #: column -> (observed at, value) of the newest non-NULL observation
    newest: dict[str, tuple[str, Any]] = field(default_factory=dict)

    def scalars(self) -> dict[str, Any]:
        return {c: self.newest[c][1] if c in self.newest else _DEFAULTS.get(c) for c in SCALARS}


@dataclass
class Expected:
    #: row number -> "done" or "failed"
    status: dict[int, str]
    contacts: dict[str, ExpectedContact]
    #: (source_link as stored, reason) -> how many rejects
    rejects: Counter[tuple[str, str]]


def _norm_scalar(column: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None  # blank means unknown
        if column == "country_code":
            return value.upper()
        if column == "maps_phone":
            return canonical_phone(value)
    return value


def bad_link(row: SourceRow) -> str:
    """The source_link a bad record of *row* carries (what ``zen_rejects`` stores)."""
    reason = row.data.get("bad")
    if reason == "empty_link":
        return ""
    if reason == "link_too_long":
        return row.link + "/" + "x" * 2100
    return row.link


def expect(dataset: Dataset, parked: frozenset[int] = frozenset()) -> Expected:
    """What the database must hold once every row of *dataset* is settled.

    *parked*: numbers of rows the run's faults parked (their lease ran out while they
    were claimed alone ``max_attempts`` times, docs/claiming.md): failed, no effect.
    """
    status: dict[int, str] = {}
    contacts: dict[str, ExpectedContact] = {}
    rejects: Counter[tuple[str, str]] = Counter()
    for row in dataset.rows:
        d = row.data
        n = d["n"]
        kind = row.kind
        if kind in ("poison", "crash") or n in parked:
            status[n] = "failed"
            continue
        status[n] = "done"
        if kind == "none":
            continue
        if kind == "bad":
            rejects[(bad_link(row), d["bad"])] += 1
            continue
        c = contacts.setdefault(row.link, ExpectedContact(row.link))
        c.scrape_count += 1
        place = d["place"]
        c.emails.update(e.strip().lower() for e in place["emails"])
        c.phones.update(canonical_phone(p) for p in place["phones"])
        seen = d["seen"]  # ISO strings of one offset: they sort as times do
        for column in SCALARS:
            value = _norm_scalar(column, place.get(column))
            if value is None:
                continue
            if column not in c.newest or c.newest[column][0] < seen:
                c.newest[column] = (seen, value)
    return Expected(status, contacts, rejects)
