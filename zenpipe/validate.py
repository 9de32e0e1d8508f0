"""Validation and normalization of contact records, before anything is sent.

Pure functions, no database: `validate_record` turns one input mapping into a `Contact`
ready for the writer, or into the list of `Problem` s that make PostgreSQL (or the
merge) unable to take it.  Every problem names the field and a stable reason code.

What is checked, and why (each rule stops a whole batch from failing on the server or a
value from poisoning the merge):

- ``source_link``: a non-empty string of at most 2,048 UTF-8 bytes (the table's CHECK).
- Text: strings only; no NUL byte (PostgreSQL text cannot hold ``\\x00``); no lone
  surrogate (cannot be encoded to UTF-8).  Empty or blank strings mean "unknown" (None),
  so that they never erase a known value.  Anything else is stored verbatim, including
  strings that look like SQL: values are always bound, never interpolated.
- Numbers: ints must be ints (not bools) within the column's range; floats must be
  finite.  ``-0.0`` becomes ``0.0`` so that equal values have one representation.
- ``country_code``: trimmed and upper-cased, then exactly two ASCII letters.
- ``latitude`` in [-90, 90], ``longitude`` in [-180, 180], ``rating`` in [0, 5].
- JSON fields: objects that orjson can encode, with finite numbers, string keys and no
  NUL; integral floats become ints (``1.0`` and ``1`` are equal in jsonb, they must also
  look equal).
- ``emails``: strings, trimmed and lower-cased, ``local@domain`` without blanks.
- ``phones``, ``whatsapp``, ``maps_phone``: canonical form, see `normalize_phone`.
- Arrays: deduplicated and sorted (code point order, which is PostgreSQL's "C" order);
  more distinct items than the cap is a problem.
- ``observed_at``: an aware datetime, not more than an hour in the future (a far-future
  time would win every later merge); missing means "now".
- Any other key is an unknown field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

__all__ = [
    "ARRAY_FIELDS",
    "MAX_LINK_BYTES",
    "SCALAR_FIELDS",
    "Contact",
    "Problem",
    "normalize_email",
    "normalize_json",
    "normalize_phone",
    "validate_record",
]

#: Longest ``source_link`` in UTF-8 bytes (``zen_contacts_source_link_check``).
MAX_LINK_BYTES = 2048
#: Observations further in the future than this are refused (clock skew guard).
MAX_FUTURE_US = 3_600_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_INT2 = 32767
_INT4 = 2**31 - 1
_INT8 = 2**63 - 1
_MAX_JSON_DEPTH = 100
_SCRAPE_STATUSES = frozenset({"pending", "success", "partial", "failed"})
_COUNTRY = re.compile(r"[A-Z]{2}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_PHONE_CHARS = re.compile(r"\+?[0-9 ()./\-]+")
_NOT_DIGITS = re.compile(r"[^0-9]")


class Problem(NamedTuple):
    """Why a record cannot be written: the field, a stable reason code, a message."""

    field: str
    reason: str
    detail: str


class Contact(NamedTuple):
    """A validated, normalized record, in the writer's column order.

    ``scalars`` follows `SCALAR_FIELDS`; None means "not observed".  Arrays are sorted
    and duplicate-free.
    """

    source_link: str
    observed_us: int
    scalars: tuple[Any, ...]
    emails: list[str]
    phones: list[str]
    whatsapp: list[str]


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _check_str(v: str) -> None:
    if "\x00" in v:
        raise _Bad("nul_byte", "contains a NUL byte, which PostgreSQL text cannot store")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Bad("lone_surrogate", f"not encodable as UTF-8: {e.reason}") from None


def _text(v: Any) -> str | None:
    if type(v) is str and v.isascii():  # the common case, checked inline (hot path)
        if "\x00" in v:
            raise _Bad("nul_byte", "contains a NUL byte, which PostgreSQL text cannot store")
        return v if v and not v.isspace() else None
    if not isinstance(v, str):
        raise _Bad("wrong_type", f"expected a string, got {type(v).__name__}")
    s: str = str(v)
    _check_str(s)
    if not s or s.isspace():
        return None
    return s


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int:
            raise _Bad("wrong_type", f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _Bad("out_of_range", f"{v} is outside [{lo}, {hi}]")
        return v

    return check


def _float_in(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if type(v) is float and lo <= v <= hi:  # the common case (NaN fails the test)
            return v + 0.0  # -0.0 -> 0.0
        if type(v) is bool or not isinstance(v, int | float):
            raise _Bad("wrong_type", f"expected a number, got {type(v).__name__}")
        f = float(v)
        if not math.isfinite(f):
            raise _Bad("not_finite", f"{f} is not a finite number")
        if not lo <= f <= hi:
            raise _Bad("out_of_range", f"{f} is outside [{lo}, {hi}]")
        return f + 0.0  # -0.0 -> 0.0

    return check


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Bad("wrong_type", f"expected a boolean, got {type(v).__name__}")
    return v


def _country(v: Any) -> str | None:
    s = _text(v)
    if s is None:
        return None
    s = s.strip().upper()
    if not _COUNTRY.fullmatch(s):
        raise _Bad("bad_country_code", f"{s!r} is not two letters A-Z")
    return s


def _status(v: Any) -> str | None:
    s = _text(v)
    if s is not None and s not in _SCRAPE_STATUSES:
        raise _Bad("out_of_range", f"{s!r} is not one of {sorted(_SCRAPE_STATUSES)}")
    return s


def normalize_email(v: Any) -> str | None:
    """Trim and lower-case an email; None for a blank one.

    Raises `ValueError` (with a reason code as its first argument) when the item is not
    a string, cannot be stored, or is not ``local@domain`` without blanks.
    """
    try:
        return _email(v)
    except _Bad as e:
        raise ValueError(e.reason, e.detail) from None


def _email(v: Any) -> str | None:
    if type(v) is not str:
        raise _Bad("wrong_type", f"expected a string item, got {type(v).__name__}")
    _check_str(v)
    s = v.strip().lower()
    if not s:
        return None
    if len(s) > 320 or not _EMAIL.fullmatch(s):
        raise _Bad("bad_email", f"{s[:80]!r} is not an email address")
    return s


def normalize_phone(v: Any) -> str | None:
    """Canonical phone number: ``+`` and digits when international, else digits only.

    Spaces, dots, dashes, slashes and parentheses are dropped; a leading ``00`` counts as
    ``+``.  4 to 15 digits (E.164's maximum).  No country is guessed for national
    numbers: ``0812 345`` stays ``0812345``.  None for a blank string.  Raises
    `ValueError` (reason code first) for anything else.
    """
    try:
        return _phone(v)
    except _Bad as e:
        raise ValueError(e.reason, e.detail) from None


_PHONE_SEPARATORS = str.maketrans("", "", " ()./-")


def _phone(v: Any) -> str | None:
    # Fast path for the common well-formed ASCII number; anything unusual (and every
    # error, with its message) goes through _phone_checked, which defines the result.
    if type(v) is str and v.isascii():
        s = v.strip()
        intl = s[:1] == "+"
        digits = (s[1:] if intl else s).translate(_PHONE_SEPARATORS)
        if digits.isdigit():  # ASCII here, so 0-9 only; no NUL, no letters, no '+'
            if not intl and digits[:2] == "00":
                intl = True
                digits = digits[2:]
            if 4 <= len(digits) <= 15:
                return "+" + digits if intl else digits
    return _phone_checked(v)


def _phone_checked(v: Any) -> str | None:
    if type(v) is not str:
        raise _Bad("wrong_type", f"expected a string item, got {type(v).__name__}")
    _check_str(v)
    s = v.strip()
    if not s:
        return None
    if not _PHONE_CHARS.fullmatch(s):
        raise _Bad("bad_phone", f"{s[:80]!r} has characters other than digits, + ( ) . / -")
    digits = _NOT_DIGITS.sub("", s)
    intl = s.startswith("+")
    if not intl and digits.startswith("00"):
        intl = True
        digits = digits[2:]
    if not 4 <= len(digits) <= 15:
        raise _Bad("bad_phone", f"{s[:80]!r} has {len(digits)} digits, expected 4 to 15")
    return "+" + digits if intl else digits


def normalize_json(v: Any) -> Any:
    """Return a JSON value PostgreSQL's jsonb takes and compares like Python does.

    Raises `ValueError` (reason code first) for values orjson cannot encode (non-string
    keys, sets, 128-bit ints, too deep), non-finite floats and NUL bytes.
    """
    try:
        return _json(v, 0)
    except _Bad as e:
        raise ValueError(e.reason, e.detail) from None


def _json(v: Any, depth: int) -> Any:
    if depth > _MAX_JSON_DEPTH:
        raise _Bad("not_json", f"nested deeper than {_MAX_JSON_DEPTH}")
    t = type(v)
    if v is None or t is bool:
        return v
    if t is str:
        _check_str(v)
        return v
    if t is int:
        if not -(2**63) <= v < 2**64:
            raise _Bad("not_json", f"integer {v} does not fit in 64 bits")
        return v
    if t is float:
        if not math.isfinite(v):
            raise _Bad("not_finite", f"{v} is not a finite number")
        if v.is_integer() and abs(v) < 2**53:
            return int(v)
        return v
    if t is dict:
        out = {}
        for k, item in v.items():
            if type(k) is not str:
                raise _Bad("not_json", f"object key {k!r} is not a string")
            _check_str(k)
            out[k] = _json(item, depth + 1)
        return out
    if t is list or t is tuple:
        return [_json(item, depth + 1) for item in v]
    raise _Bad("not_json", f"{t.__name__} cannot be encoded as JSON")


def _json_object(v: Any) -> dict[str, Any] | None:
    if not isinstance(v, dict):
        raise _Bad("wrong_type", f"expected a JSON object, got {type(v).__name__}")
    out = _json(v, 0)
    return out or None  # {} is the column default: "nothing known"


def _maps_phone(v: Any) -> str | None:
    return _phone(v)


#: Record fields merged as scalars, in ``zen_contacts.observed_us`` slot order, with the
#: function that validates and normalizes each.  ``last_scrape_server`` (the writer's
#: server id) follows them in the table; records do not carry it.
SCALAR_FIELDS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("source_id", _int_in(1, _INT8)),
    ("business_name", _text),
    ("business_category", _text),
    ("website", _text),
    ("website_domain", _text),
    ("description", _text),
    ("price_level", _int_in(1, 4)),
    ("business_status", _text),
    ("country_code", _country),
    ("region", _text),
    ("city", _text),
    ("district", _text),
    ("address", _text),
    ("postal_code", _text),
    ("latitude", _float_in(-90.0, 90.0)),
    ("longitude", _float_in(-180.0, 180.0)),
    ("timezone", _text),
    ("plus_code", _text),
    ("place_id", _text),
    ("google_cid", _text),
    ("maps_url", _text),
    ("rating", _float_in(0.0, 5.0)),
    ("reviews_count", _int_in(0, _INT4)),
    ("maps_phone", _maps_phone),
    ("opening_hours", _json_object),
    ("photos_count", _int_in(0, _INT4)),
    ("is_claimed", _bool),
    ("emails_validated", _json_object),
    ("primary_email", _email),
    ("whatsapp_validated", _json_object),
    ("facebook_url", _text),
    ("instagram_url", _text),
    ("linkedin_url", _text),
    ("twitter_url", _text),
    ("youtube_url", _text),
    ("tiktok_url", _text),
    ("website_title", _text),
    ("website_status_code", _int_in(100, 599)),
    ("website_language", _text),
    ("contact_page_url", _text),
    ("pages_crawled", _int_in(0, _INT4)),
    ("scrape_status", _status),
    ("scrape_error", _text),
)

#: Array fields (unioned on merge) and the normalizer of their items.
ARRAY_FIELDS: tuple[tuple[str, Callable[[Any], str | None]], ...] = (
    ("emails", _email),
    ("phones", _phone),
    ("whatsapp", _phone),
)

_SLOT = {name: i for i, (name, _) in enumerate(SCALAR_FIELDS)}
_SCALAR_CHECK = dict(SCALAR_FIELDS)
#: name -> (slot, check, plain text?): one lookup per field on the hot path.
_DISPATCH = {name: (i, fn, fn is _text) for i, (name, fn) in enumerate(SCALAR_FIELDS)}
_ARRAY_CHECK = dict(ARRAY_FIELDS)
_N = len(SCALAR_FIELDS)


def _array(v: Any, norm: Callable[[Any], str | None], cap: int) -> list[str]:
    if isinstance(v, str | bytes) or not isinstance(v, list | tuple | set | frozenset):
        raise _Bad("wrong_type", f"expected a list of strings, got {type(v).__name__}")
    items = set()
    for i, item in enumerate(v):
        try:
            s = norm(item)
        except _Bad as e:
            raise _Bad(e.reason, f"item {i}: {e.detail}") from None
        if s is not None:
            items.add(s)
    if len(items) > cap:
        raise _Bad("too_many_items", f"{len(items)} distinct items, the cap is {cap}")
    return sorted(items)


def _observed(v: Any, now_us: int) -> int:
    if not isinstance(v, datetime):
        raise _Bad("wrong_type", f"expected a datetime, got {type(v).__name__}")
    if v.tzinfo is None or v.utcoffset() is None:
        raise _Bad("naive_datetime", "observed_at needs a time zone")
    us = (v - _EPOCH) // _US
    if us > now_us + MAX_FUTURE_US:
        raise _Bad("in_future", f"{v.isoformat()} is more than an hour ahead of now")
    return int(us)


def _link(v: Any) -> str:
    if type(v) is not str:
        raise _Bad("wrong_type", f"expected a string, got {type(v).__name__}")
    if not v:
        raise _Bad("empty_link", "source_link is empty")
    _check_str(v)
    if len(v) * 4 > MAX_LINK_BYTES and len(v.encode("utf-8")) > MAX_LINK_BYTES:
        raise _Bad("link_too_long", f"source_link is longer than {MAX_LINK_BYTES} bytes")
    return v


def validate_record(record: Any, *, max_array_items: int, now_us: int) -> Contact | list[Problem]:
    """Validate and normalize one record; return a `Contact` or every `Problem` found.

    Never raises for bad input.  *now_us* (epoch microseconds) stands for "now": the
    observation time of a record without ``observed_at``, and the reference for the
    future-time guard.
    """
    if not isinstance(record, Mapping):
        return [Problem("", "not_a_mapping", f"expected a mapping, got {type(record).__name__}")]
    problems: list[Problem] = []
    scalars: list[Any] = [None] * _N
    arrays: dict[str, list[str]] = {}
    link = ""
    observed_us = now_us
    saw_link = False
    for key, value in record.items():
        try:
            spec = _DISPATCH.get(key)
            if spec is not None:
                if value is None:
                    continue
                slot, check, plain = spec
                # plain ASCII text without NUL, inline: most fields of most records
                if plain and type(value) is str and value.isascii() and "\x00" not in value:
                    scalars[slot] = value if value and not value.isspace() else None
                else:
                    scalars[slot] = check(value)
            elif key == "source_link":
                saw_link = True
                link = _link(value)
            elif key in _ARRAY_CHECK:
                if value is not None:
                    arrays[key] = _array(value, _ARRAY_CHECK[key], max_array_items)
            elif key == "observed_at":
                if value is not None:
                    observed_us = _observed(value, now_us)
            else:
                name = key if isinstance(key, str) else repr(key)
                problems.append(Problem(name, "unknown_field", f"{name[:100]!r} is not a field"))
        except _Bad as e:
            problems.append(Problem(str(key), e.reason, e.detail))
    if not saw_link:
        problems.append(Problem("source_link", "empty_link", "source_link is missing"))
    if problems:
        return problems
    return Contact(
        link,
        observed_us,
        tuple(scalars),
        arrays.get("emails", []),
        arrays.get("phones", []),
        arrays.get("whatsapp", []),
    )
