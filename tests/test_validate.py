"""Record validation and normalization: pure functions, no database."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zenpipe.validate import (
    SCALAR_FIELDS,
    Contact,
    Problem,
    normalize_email,
    normalize_json,
    normalize_phone,
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
