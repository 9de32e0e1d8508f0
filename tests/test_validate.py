"""Record validation and normalization: pure functions, no database."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zenpipe.validate import (
    MAX_INDEXED_TEXT_BYTES,
    MAX_JSON_BYTES,
    MAX_TEXT_BYTES,
    SCALAR_FIELDS,
    Contact,
    Problem,
    normalize_email,
    normalize_json,
    normalize_phone,
    observation_us,
    validate_record,
)

NOW = datetime(2025, 1, 1, tzinfo=UTC)
NOW_US = (NOW - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def check(record: Any, cap: int = 10) -> Contact | list[Problem]:
    return validate_record(record, max_array_items=cap, now_us=NOW_US)


def problems(record: Any, cap: int = 10) -> list[tuple[str, str]]:
    got = check(record, cap)
    assert isinstance(got, list), got
    return [(p.field, p.reason) for p in got]


def scalar(c: Contact | list[Problem], name: str) -> Any:
    assert isinstance(c, Contact), c
    return c.scalars[[n for n, _ in SCALAR_FIELDS].index(name)]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("country_code", "USA", "bad_country_code"),
        ("country_code", "u1", "bad_country_code"),
        ("country_code", "ÜS", "bad_country_code"),
        ("country_code", "US\n", None),  # trimmed: accepted as "US"
        ("latitude", 90.5, "out_of_range"),
        ("longitude", -180.01, "out_of_range"),
        ("latitude", math.nan, "not_finite"),
        ("longitude", math.inf, "not_finite"),
        ("rating", 5.1, "out_of_range"),
        ("rating", -0.1, "out_of_range"),
        ("rating", "4.5", "wrong_type"),
        ("reviews_count", True, "wrong_type"),
        ("reviews_count", -1, "out_of_range"),
        ("reviews_count", 2**31, "out_of_range"),
        ("price_level", 5, "out_of_range"),
        ("website_status_code", 99, "out_of_range"),
        ("is_claimed", 1, "wrong_type"),
        ("business_name", "a\x00b", "nul_byte"),
        ("business_name", "a\ud800b", "lone_surrogate"),
        ("business_name", 42, "wrong_type"),
        ("scrape_status", "done", "out_of_range"),
        ("opening_hours", {"mon": math.nan}, "not_finite"),
        ("opening_hours", {1: "x"}, "not_json"),
        ("opening_hours", {"mon": {1, 2}}, "not_json"),
        ("opening_hours", {"mon": 2**70}, "not_json"),
        ("opening_hours", {"mon": "a\x00"}, "nul_byte"),
        ("opening_hours", [1, 2], "wrong_type"),
        ("emails", ["a@b.c", 3], "wrong_type"),
        ("emails", "a@b.c", "wrong_type"),
        ("emails", ["not an email"], "bad_email"),
        ("emails", ["a\x00@b.c"], "nul_byte"),
        ("phones", ["call me"], "bad_phone"),
        ("phones", ["12"], "bad_phone"),
        ("whatsapp", ["+1234567890123456"], "bad_phone"),
        ("observed_at", datetime(2025, 1, 1), "naive_datetime"),
        ("observed_at", NOW + timedelta(hours=2), "in_future"),
        ("observed_at", "2025-01-01", "wrong_type"),
        ("no_such_field", 1, "unknown_field"),
    ],
)
def test_each_rule_names_field_and_reason(field: str, value: Any, reason: str | None) -> None:
    record = {"source_link": "https://x", field: value}
    if reason is None:
        assert isinstance(check(record), Contact)
    else:
        assert problems(record) == [(field, reason)]


@pytest.mark.parametrize(
    ("link", "reason"),
    [
        ("", "empty_link"),
        (None, "wrong_type"),
        ("x" * 2049, "link_too_long"),
        ("é" * 1025, "link_too_long"),  # 2050 bytes, 1025 characters
        ("https://a\x00", "nul_byte"),
        ("https://\udfff", "lone_surrogate"),
    ],
)
def test_bad_links(link: Any, reason: str) -> None:
    assert problems({"source_link": link}) == [("source_link", reason)]


def test_link_limits_are_bytes_and_exact() -> None:
    assert isinstance(check({"source_link": "x" * 2048}), Contact)
    assert isinstance(check({"source_link": "é" * 1024}), Contact)
    assert problems({}) == [("source_link", "empty_link")]
    assert problems(["not", "a", "mapping"]) == [("", "not_a_mapping")]


def test_every_problem_of_a_record_is_reported() -> None:
    got = problems({"source_link": "", "rating": 9, "x": 1})
    assert sorted(got) == [
        ("rating", "out_of_range"),
        ("source_link", "empty_link"),
        ("x", "unknown_field"),
    ]


def test_array_cap_counts_distinct_normalized_items() -> None:
    emails = [f" User{i}@X.com" for i in range(3)] * 5
    assert isinstance(check({"source_link": "l", "emails": emails}, cap=3), Contact)
    assert problems({"source_link": "l", "emails": [*emails, "z@x.com"]}, cap=3) == [
        ("emails", "too_many_items")
    ]


def test_normalization() -> None:
    c = check(
        {
            "source_link": "https://x",
            "country_code": " id ",
            "emails": [" B@X.COM", "b@x.com", "a@x.com", "  "],
            "phones": ["+62 812-345-678", "0062 812 345 678", "(021) 555.1234"],
            "latitude": -0.0,
            "business_name": "   ",
            "opening_hours": {"mon": 1.0, "tue": [2.5, -0.0]},
            "emails_validated": {},
        }
    )
    assert isinstance(c, Contact)
    assert c.emails == ["a@x.com", "b@x.com"]
    assert c.phones == ["+62812345678", "0215551234"]
    assert scalar(c, "country_code") == "ID"
    assert math.copysign(1.0, scalar(c, "latitude")) == 1.0
    assert scalar(c, "business_name") is None  # blank means unknown, never erases
    assert scalar(c, "opening_hours") == {"mon": 1, "tue": [2.5, 0]}
    assert scalar(c, "emails_validated") is None


def test_sql_looking_strings_pass_verbatim() -> None:
    evil = "'); DROP TABLE zen_contacts; -- \\' $$ %s %(x)s"
    c = check({"source_link": evil, "business_name": evil})
    assert isinstance(c, Contact)
    assert c.source_link == evil
    assert scalar(c, "business_name") == evil


def test_observed_at_in_microseconds_and_default_now() -> None:
    c = check({"source_link": "l", "observed_at": NOW - timedelta(microseconds=1)})
    assert isinstance(c, Contact) and c.observed_us == NOW_US - 1
    c = check({"source_link": "l"})
    assert isinstance(c, Contact) and c.observed_us == NOW_US


@given(st.lists(st.text(alphabet="abcXYZ@. +-019", max_size=20), max_size=20))
def test_emails_normalize_idempotently(items: list[str]) -> None:
    out = []
    for item in items:
        try:
            e = normalize_email(item)
        except ValueError as err:
            assert err.args[0] == "bad_email"
            continue
        if e is not None:
            assert e == e.strip().lower()
            assert normalize_email(e) == e
            out.append(e)


@given(st.text(alphabet="0123456789 +-().", max_size=25))
def test_phones_canonical_form_is_a_fixed_point(s: str) -> None:
    try:
        p = normalize_phone(s)
    except ValueError as err:
        assert err.args[0] == "bad_phone"
        return
    if p is None:
        return
    assert p.lstrip("+").isdigit() and 4 <= len(p.lstrip("+")) <= 15
    assert normalize_phone(p) == p


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_normalized_json_always_encodes_and_round_trips(v: Any) -> None:
    try:
        n = normalize_json(v)
    except ValueError as err:
        assert err.args[0] in {"not_finite", "nul_byte", "lone_surrogate", "not_json"}
        return
    data = orjson.dumps(n)  # never raises
    assert b"\\u0000" not in data and b"NaN" not in data
    assert orjson.loads(data) == n
    assert normalize_json(n) == n


@given(
    st.dictionaries(
        st.sampled_from([n for n, _ in SCALAR_FIELDS] + ["emails", "zz"]),
        st.none() | st.integers() | st.floats() | st.text() | st.booleans(),
        max_size=8,
    )
)
def test_validation_never_raises(fields: dict[str, Any]) -> None:
    got = check({"source_link": "l", **fields})
    assert isinstance(got, Contact | list)


@given(st.text(alphabet="0123456789 +-().x\t\n\x00/", max_size=25) | st.text(max_size=8))
def test_phone_fast_path_agrees_with_the_checked_path(s: str) -> None:
    from zenpipe.validate import _Bad, _phone, _phone_checked

    def outcome(f: Any) -> Any:
        try:
            return f(s)
        except _Bad as e:
            return (e.reason, e.detail)

    assert outcome(_phone) == outcome(_phone_checked)


# -- validation never raises (issue 8, point 1) ------------------------------------------


class Hostile:
    """An object every protocol method of which raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("__eq__")

    def __hash__(self) -> int:
        raise RuntimeError("__hash__")

    def __float__(self) -> float:
        raise RuntimeError("__float__")

    def __index__(self) -> int:
        raise RuntimeError("__index__")

    def __iter__(self) -> Any:
        raise RuntimeError("__iter__")

    def __len__(self) -> int:
        raise RuntimeError("__len__")


class SpoofedFloat(Hostile):
    """Claims to be a float (``isinstance(x, float)`` is true) and is not one."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return float


class HostileStr(str):
    def __str__(self) -> str:
        raise RuntimeError("__str__")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__")

    def strip(self, chars: Any = None) -> str:
        raise RuntimeError("strip")


class HostileFloat(float):
    def __float__(self) -> float:
        raise RuntimeError("__float__")

    def __le__(self, other: Any) -> bool:
        raise RuntimeError("__le__")


class HostileInt(int):
    def __le__(self, other: Any) -> bool:
        raise RuntimeError("__le__")

    def __float__(self) -> float:
        raise RuntimeError("__float__")


class HostileList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        raise RuntimeError("__iter__")


class KeyLike:
    """A key that hashes like a real field name but cannot be compared or printed."""

    def __init__(self, like: str) -> None:
        self.like = like

    def __hash__(self) -> int:
        return hash(self.like)

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("__eq__")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__")

    def __str__(self) -> str:
        raise RuntimeError("__str__")


class BadOffset(tzinfo):
    def utcoffset(self, dt: Any) -> Any:
        raise RuntimeError("utcoffset")


class HostileDatetime(datetime):
    def __sub__(self, other: Any) -> Any:
        raise RuntimeError("__sub__")

    def isoformat(self, *a: Any, **k: Any) -> str:
        raise RuntimeError("isoformat")


class HostileMapping(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise RuntimeError("items")


def deep(n: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(n):
        out = [out]
    return out


HOSTILE_VALUES: list[Any] = [
    10**400,
    -(10**400),
    10**5000,  # str() of it raises ValueError (int max str digits)
    2**1024,
    Decimal("1.5"),
    Decimal("NaN"),
    Decimal("1e400"),
    b"bytes",
    bytearray(b"x"),
    Hostile(),
    SpoofedFloat(),
    HostileStr("abc"),
    HostileFloat(1.0),
    HostileInt(3),
    HostileList(["a@b.c"]),
    [Hostile()],
    {"k": Hostile()},
    {KeyLike("x"): 1},
    {"deep": deep(10_000)},
    deep(10_000),
    datetime(2025, 1, 1, tzinfo=BadOffset()),
    HostileDatetime(2025, 1, 1, tzinfo=UTC),
    datetime.max.replace(tzinfo=UTC),
    datetime.min.replace(tzinfo=timezone(timedelta(hours=14))),
    "x" * 3_000_000,
    "é" * 1_000_000,
    object(),
    type,
    math.inf,
    1j,
]
ALL_FIELDS = [n for n, _ in SCALAR_FIELDS] + [
    "source_link",
    "emails",
    "phones",
    "whatsapp",
    "observed_at",
]


def assert_valid_outcome(got: Any) -> None:
    if isinstance(got, Contact):
        return
    assert isinstance(got, list) and got
    for p in got:
        assert isinstance(p, Problem)
        assert type(p.field) is str and type(p.reason) is str and type(p.detail) is str
        assert len(p.field) <= 1000 and len(p.detail) <= 1000


@pytest.mark.parametrize("field", ALL_FIELDS)
def test_no_value_makes_validation_raise(field: str) -> None:
    for value in HOSTILE_VALUES:
        got = check({"source_link": "https://x", field: value})
        assert_valid_outcome(got)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("latitude", 10**400, "out_of_range"),  # OverflowError before issue 8
        ("longitude", -(10**400), "out_of_range"),
        ("rating", 2**1024, "out_of_range"),
        ("reviews_count", 10**5000, "out_of_range"),  # str(v) raised ValueError
        ("opening_hours", {"mon": 10**5000}, "not_json"),
        ("latitude", Decimal("1.5"), "wrong_type"),
        ("business_name", b"bytes", "wrong_type"),
        ("latitude", SpoofedFloat(), "wrong_type"),  # isinstance() would believe it
        ("business_name", HostileStr("abc"), None),  # a str subclass: its text is used
        ("latitude", HostileFloat(1.0), None),
        ("reviews_count", HostileInt(3), "wrong_type"),
        ("emails", HostileList(["a@b.c"]), "invalid_value"),
        ("observed_at", datetime(2025, 1, 1, tzinfo=BadOffset()), "invalid_value"),
        ("observed_at", HostileDatetime(2025, 1, 1, tzinfo=UTC), "invalid_value"),
        ("observed_at", datetime.min.replace(tzinfo=timezone(timedelta(hours=14))), None),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_odd_values_are_problems_naming_the_field(
    field: str, value: Any, reason: str | None
) -> None:
    got = check({"source_link": "https://x", field: value})
    if reason is None:
        assert isinstance(got, Contact), got
    else:
        assert problems({"source_link": "https://x", field: value}) == [(field, reason)]


def test_hostile_keys_and_mappings_are_problems() -> None:
    # A key that is not a plain string is never a field (its __eq__ is never called).
    got = problems({"source_link": "https://x", KeyLike("city"): 1})
    assert [r for _, r in got] == ["unknown_field"]
    got = problems({"source_link": "https://x", KeyLike("nothing"): 1})
    assert [r for _, r in got] == ["unknown_field"]
    assert problems(HostileMapping(source_link="https://x")) == [("", "invalid_value")]
    assert problems(Hostile()) == [("", "not_a_mapping")]
    assert problems({"source_link": "https://x", b"city": 1}) == [("b'city'", "unknown_field")]
    long_key = "k" * 100_000
    got = check({"source_link": "https://x", long_key: 1})
    assert_valid_outcome(got)


class _Anything:
    """Hypothesis strategies for any value a caller might hand the validator."""

    # by index: hypothesis reprs its strategies, and repr(10**5000) raises
    # ints beyond float's range (2**1024) and beyond str()'s limit (10**4300)
    huge_ints = st.builds(
        lambda bits, n, sign: sign * (2**bits + n),
        st.integers(900, 20_000),
        st.integers(),
        st.sampled_from([1, -1]),
    )
    hostile = st.integers(0, len(HOSTILE_VALUES) - 1).map(lambda i: HOSTILE_VALUES[i])
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | huge_ints
        | st.floats()
        | st.decimals()
        | st.text()
        | st.binary()
        | st.complex_numbers()
        | st.datetimes(timezones=st.timezones() | st.none())
        | hostile
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.tuples(inner, inner)
            | st.frozensets(st.integers() | st.text(), max_size=3)
            | st.dictionaries(st.text() | st.integers() | st.binary(), inner, max_size=4)
        ),
        max_leaves=12,
    )
    keys = st.sampled_from(ALL_FIELDS) | st.text(max_size=5) | st.integers() | st.binary(max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_FIELDS), _Anything.huge_ints | _Anything.values)
def test_validation_never_raises_for_any_value_of_any_field(field: str, value: Any) -> None:
    assert_valid_outcome(check({"source_link": "l", field: value}))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_Anything.keys, _Anything.values, max_size=10))
def test_validation_never_raises_for_any_record(fields: dict[Any, Any]) -> None:
    assert_valid_outcome(check({"source_link": "l", **fields}))
    assert_valid_outcome(check(fields))


# -- phones written with a parenthesised country code (point 19) -------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("(+62) 812 3456 7890", "+6281234567890"),
        ("(+62)81234567890", "+6281234567890"),
        ("( +62 ) 812-3456-7890", "+6281234567890"),
        ("(0062) 812 3456 7890", "+6281234567890"),
    ],
)
def test_parenthesised_country_code_is_accepted(raw: str, canonical: str) -> None:
    assert normalize_phone(raw) == canonical
    c = check({"source_link": "l", "phones": [raw], "maps_phone": raw})
    assert isinstance(c, Contact) and c.phones == [canonical]
    assert scalar(c, "maps_phone") == canonical


@pytest.mark.parametrize("raw", ["62+812345", "(62) +812345", "++62812345", "+(+62)812345"])
def test_a_plus_anywhere_but_first_is_still_bad(raw: str) -> None:
    with pytest.raises(ValueError, match="bad_phone"):
        normalize_phone(raw)


# -- text size caps (point 12) -----------------------------------------------------------


def test_text_is_capped_below_the_index_row_limit() -> None:
    assert isinstance(
        check({"source_link": "l", "business_category": "c" * MAX_INDEXED_TEXT_BYTES}), Contact
    )
    assert problems(
        {"source_link": "l", "business_category": "c" * (MAX_INDEXED_TEXT_BYTES + 1)}
    ) == [("business_category", "too_long")]
    # bytes, not characters: é is 2 bytes in UTF-8
    assert problems(
        {"source_link": "l", "business_category": "é" * (MAX_INDEXED_TEXT_BYTES // 2 + 1)}
    ) == [("business_category", "too_long")]
    assert MAX_INDEXED_TEXT_BYTES < 2700 < MAX_TEXT_BYTES
    assert isinstance(check({"source_link": "l", "description": "d" * MAX_TEXT_BYTES}), Contact)
    for field in ("description", "city", "scrape_error", "website_title"):
        assert problems({"source_link": "l", field: "d" * (MAX_TEXT_BYTES + 1)}) == [
            (field, "too_long")
        ]
    assert problems({"source_link": "l", "opening_hours": {"a": "x" * MAX_JSON_BYTES}}) == [
        ("opening_hours", "too_long")
    ]


# -- observation time left to the database clock (point 10) ------------------------------


def test_missing_observed_at_is_marked_for_the_database_clock() -> None:
    c = check({"source_link": "l"})
    assert isinstance(c, Contact) and c.observed_default is True
    c = check({"source_link": "l", "observed_at": NOW})
    assert isinstance(c, Contact) and c.observed_default is False


@given(st.datetimes(timezones=st.timezones() | st.none()) | _Anything.values)
def test_observation_us_agrees_with_validation(v: Any) -> None:
    # The writer reads observation times before validation, for the database's future
    # guard: it must read the same time validation does, and None where it refuses.
    got = validate_record({"source_link": "l", "observed_at": v}, max_array_items=10, now_us=2**62)
    if isinstance(got, Contact):
        assert observation_us(v) == (None if got.observed_default else got.observed_us)
    else:
        assert observation_us(v) is None
