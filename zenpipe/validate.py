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
- Text sizes, in UTF-8 bytes: at most `MAX_INDEXED_TEXT_BYTES` for a column a btree
  index holds (PostgreSQL refuses an index row over about 2,700 bytes, and would refuse
  it only when the value wins the merge: an order-dependent outcome), at most
  `MAX_TEXT_BYTES` for the others, `MAX_JSON_BYTES` of JSON per object.
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
  time would win every later merge); missing means "now" (``Contact.observed_default``:
  the writer then leaves the time to the database clock).
- Any other key is an unknown field.

`validate_record` never raises: a value that breaks a check in an unforeseen way (an
object whose ``__str__`` or ``__eq__`` raises, a mapping that fails while iterated) is a
problem with reason ``invalid_value`` naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

__all__ = [
    "ARRAY_FIELDS",
    "MAX_FUTURE_US",
    "MAX_INDEXED_TEXT_BYTES",
    "MAX_JSON_BYTES",
    "MAX_LINK_BYTES",
    "MAX_TEXT_BYTES",
    "SCALAR_FIELDS",
    "Contact",
    "Problem",
    "normalize_email",
    "normalize_json",
    "normalize_phone",
    "observation_us",
    "validate_record",
]

#: Longest ``source_link`` in UTF-8 bytes (``zen_contacts_source_link_check``).
MAX_LINK_BYTES = 2048
#: Observations further in the future than this are refused (clock skew guard).
MAX_FUTURE_US = 3_600_000_000
#: Longest text, in UTF-8 bytes, of a column a btree index holds (``business_category``:
#: ``idx_zc_category``, ``idx_zc_country_category``): below PostgreSQL's index row limit
#: (about 2,700 bytes on 8 kB pages) with room for the other columns of the index.
#: ``country_code`` and ``scrape_status``, also indexed, are short by their own rules.
MAX_INDEXED_TEXT_BYTES = 2000
#: Longest text, in UTF-8 bytes, of every other text column.
MAX_TEXT_BYTES = 100_000
#: Largest JSON object (encoded) of a jsonb column.
MAX_JSON_BYTES = 1_000_000
#: Longest field name or value excerpt quoted in a `Problem`.
_MAX_QUOTE = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_INT2 = 32767
_INT4 = 2**31 - 1
_INT8 = 2**63 - 1
_MAX_JSON_DEPTH = 100
_SCRAPE_STATUSES = frozenset({"pending", "success", "partial", "failed"})
_COUNTRY = re.compile(r"[A-Z]{2}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_PHONE_SHAPE = re.compile(r"\+?[0-9]*")


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
    #: True when the record had no ``observed_at``: *observed_us* is then only the
    #: caller's "now", and the writer lets the database clock decide instead.
    observed_default: bool = False


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _type_name(v: Any) -> str:
    try:
        name = type(v).__name__
    except Exception:  # a metaclass with a hostile __name__
        return "object"
    return name if type(name) is str else "object"


def _quote(v: Any) -> str:
    """A short printable quote of *v* for a message; never raises."""
    if type(v) is int and v.bit_length() > 64:
        return f"<an integer of {v.bit_length()} bits>"
    try:
        text = ascii(v)
    except Exception:
        return f"<unprintable {_type_name(v)}>"
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 3] + "..."


def _field_name(key: Any) -> str:
    """The name of a record key for a `Problem`: the key itself when it is a short
    plain string, else a short quote of it."""
    if type(key) is str and len(key) <= _MAX_QUOTE:
        return key
    return _quote(key)


def _check_str(v: str) -> None:
    if "\x00" in v:
        raise _Bad("nul_byte", "contains a NUL byte, which PostgreSQL text cannot store")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Bad("lone_surrogate", f"not encodable as UTF-8: {e.reason}") from None


def _check_size(s: str, cap: int) -> None:
    # A character is 1 to 4 UTF-8 bytes: encode only when the length alone cannot tell.
    if len(s) > cap or (len(s) * 4 > cap and len(s.encode("utf-8")) > cap):
        raise _Bad("too_long", f"{len(s)} characters, longer than {cap} UTF-8 bytes")


def _text_capped(cap: int) -> Callable[[Any], str | None]:
    def text(v: Any) -> str | None:
        if type(v) is str and v.isascii():  # the common case, checked inline (hot path)
            if "\x00" in v:
                raise _Bad("nul_byte", "contains a NUL byte, which PostgreSQL text cannot store")
            if len(v) > cap:
                raise _Bad("too_long", f"{len(v)} characters, longer than {cap} bytes")
            return v if v and not v.isspace() else None
        if not issubclass(type(v), str):  # type(), not isinstance(): __class__ can lie
            raise _Bad("wrong_type", f"expected a string, got {_type_name(v)}")
        s: str = str.__str__(v)  # a plain copy: a subclass's own __str__ is not called
        _check_str(s)
        _check_size(s, cap)
        if not s or s.isspace():
            return None
        return s

    return text


_text = _text_capped(MAX_TEXT_BYTES)
_indexed_text = _text_capped(MAX_INDEXED_TEXT_BYTES)


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int:
            raise _Bad("wrong_type", f"expected an integer, got {_type_name(v)}")
        if not lo <= v <= hi:
            raise _Bad("out_of_range", f"{_quote(v)} is outside [{lo}, {hi}]")
        return v

    return check


def _float_in(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if type(v) is float and lo <= v <= hi:  # the common case (NaN fails the test)
            return v + 0.0  # -0.0 -> 0.0
        t = type(v)  # type(), not isinstance(): __class__ can lie
        if t is bool or not issubclass(t, int | float):
            raise _Bad("wrong_type", f"expected a number, got {_type_name(v)}")
        if issubclass(t, int):
            # Compare as exact ints first: float() of an int beyond 2**1024 overflows.
            n = int.__int__(v)  # a plain copy: a subclass's own methods are not called
            if not lo <= n <= hi:
                raise _Bad("out_of_range", f"{_quote(n)} is outside [{lo}, {hi}]")
            return float(n) + 0.0
        f = float.__float__(v)
        if not math.isfinite(f):
            raise _Bad("not_finite", f"{f} is not a finite number")
        if not lo <= f <= hi:
            raise _Bad("out_of_range", f"{f} is outside [{lo}, {hi}]")
        return f + 0.0  # -0.0 -> 0.0

    return check


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Bad("wrong_type", f"expected a boolean, got {_type_name(v)}")
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
        raise _Bad("wrong_type", f"expected a string item, got {_type_name(v)}")
    _check_str(v)
    s = v.strip().lower()
    if not s:
        return None
    if len(s) > 320 or not _EMAIL.fullmatch(s):
        raise _Bad("bad_email", f"{s[:80]!r} is not an email address")
    return s


def normalize_phone(v: Any) -> str | None:
    """Canonical phone number: ``+`` and digits when international, else digits only.

    Spaces, dots, dashes, slashes and parentheses are dropped wherever they are; what
    remains must be digits, with at most a ``+`` in front (so ``(+62) 812 3456 7890`` is
    ``+6281234567890``); a leading ``00`` counts as ``+``.  4 to 15 digits (E.164's
    maximum).  No country is guessed for national
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
        s = v.strip().translate(_PHONE_SEPARATORS)
        intl = s[:1] == "+"
        digits = s[1:] if intl else s
        if digits.isdigit():  # ASCII here, so 0-9 only; no NUL, no letters, no '+'
            if not intl and digits[:2] == "00":
                intl = True
                digits = digits[2:]
            if 4 <= len(digits) <= 15:
                return "+" + digits if intl else digits
    return _phone_checked(v)


def _phone_checked(v: Any) -> str | None:
    if type(v) is not str:
        raise _Bad("wrong_type", f"expected a string item, got {_type_name(v)}")
    _check_str(v)
    s = v.strip()
    if not s:
        return None
    bare = s.translate(_PHONE_SEPARATORS)
    if not _PHONE_SHAPE.fullmatch(bare):
        raise _Bad(
            "bad_phone",
            f"{s[:80]!r} has characters other than digits, separators ( ) . / - and a leading +",
        )
    intl = bare[:1] == "+"
    digits = bare[1:] if intl else bare
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
        if len(v) > MAX_JSON_BYTES:  # the object's size is checked once it is built
            raise _Bad("too_long", f"a string of {len(v)} characters")
        return v
    if t is int:
        if not -(2**63) <= v < 2**64:
            raise _Bad("not_json", f"integer {_quote(v)} does not fit in 64 bits")
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
                raise _Bad("not_json", f"object key {_quote(k)} is not a string")
            _check_str(k)
            out[k] = _json(item, depth + 1)
        return out
    if t is list or t is tuple:
        return [_json(item, depth + 1) for item in v]
    raise _Bad("not_json", f"{_type_name(v)} cannot be encoded as JSON")


def _json_object(v: Any) -> dict[str, Any] | None:
    if not issubclass(type(v), dict):
        raise _Bad("wrong_type", f"expected a JSON object, got {_type_name(v)}")
    out = _json(v, 0)
    if len(out) > 0 and len(orjson.dumps(out)) > MAX_JSON_BYTES:
        raise _Bad("too_long", f"more than {MAX_JSON_BYTES} bytes as JSON")
    return out or None  # {} is the column default: "nothing known"


def _maps_phone(v: Any) -> str | None:
    return _phone(v)


#: Record fields merged as scalars, in ``zen_contacts.observed_us`` slot order, with the
#: function that validates and normalizes each.  ``last_scrape_server`` (the writer's
#: server id) follows them in the table; records do not carry it.
SCALAR_FIELDS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("source_id", _int_in(1, _INT8)),
    ("business_name", _text),
    ("business_category", _indexed_text),
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
#: One lookup per field on the hot path.
#: name -> (slot, check, cap): cap > 0 for plain text of at most that many bytes.
_TEXT_CAPS = {_text: MAX_TEXT_BYTES, _indexed_text: MAX_INDEXED_TEXT_BYTES}
_DISPATCH = {name: (i, fn, _TEXT_CAPS.get(fn, 0)) for i, (name, fn) in enumerate(SCALAR_FIELDS)}
_ARRAY_CHECK = dict(ARRAY_FIELDS)
_N = len(SCALAR_FIELDS)


def _array(v: Any, norm: Callable[[Any], str | None], cap: int) -> list[str]:
    if not issubclass(type(v), list | tuple | set | frozenset):
        raise _Bad("wrong_type", f"expected a list of strings, got {_type_name(v)}")
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
    if not issubclass(type(v), datetime):
        raise _Bad("wrong_type", f"expected a datetime, got {_type_name(v)}")
    if v.tzinfo is None or v.utcoffset() is None:
        raise _Bad("naive_datetime", "observed_at needs a time zone")
    try:
        us = (v - _EPOCH) // _US
    except OverflowError:  # only at the very ends of datetime's range
        raise _Bad("out_of_range", "observed_at is out of range") from None
    if type(us) is not int:
        raise _Bad("invalid_value", "observed_at does not subtract like a datetime")
    if us > now_us + MAX_FUTURE_US:
        raise _Bad("in_future", f"{v.isoformat()} is more than an hour ahead of now")
    return us


def observation_us(value: Any) -> int | None:
    """Epoch microseconds of an ``observed_at`` value; None when it is not a valid one.

    The writer's own reading of a record's observation time, taken before validation
    (for the database's future guard).  No future check here.  Never raises.
    """
    try:
        if type(value) is datetime:  # the common case; naive - aware raises TypeError
            us: int = (value - _EPOCH) // _US
            return us
        return _observed(value, 2**62)
    except Exception:
        return None


def _link(v: Any) -> str:
    if type(v) is not str:
        raise _Bad("wrong_type", f"expected a string, got {_type_name(v)}")
    if not v:
        raise _Bad("empty_link", "source_link is empty")
    _check_str(v)
    if len(v) * 4 > MAX_LINK_BYTES and len(v.encode("utf-8")) > MAX_LINK_BYTES:
        raise _Bad("link_too_long", f"source_link is longer than {MAX_LINK_BYTES} bytes")
    return v


def validate_record(record: Any, *, max_array_items: int, now_us: int) -> Contact | list[Problem]:
    """Validate and normalize one record; return a `Contact` or every `Problem` found.

    Never raises, whatever *record* holds: a value that fails a check in a way no rule
    foresaw becomes a problem with reason ``invalid_value`` naming its field (and a
    mapping that cannot even be read, one naming no field).  *now_us* (epoch
    microseconds) stands for "now": the reference for the future-time guard, and the
    observation time of a record without ``observed_at`` (flagged
    ``Contact.observed_default``).
    """
    try:
        if not isinstance(record, Mapping):
            return [Problem("", "not_a_mapping", f"expected a mapping, got {_type_name(record)}")]
        return _validate_mapping(record, max_array_items, now_us)
    except Exception as e:  # the mapping itself broke (items(), iteration...)
        return [Problem("", "invalid_value", f"the record could not be read: {_type_name(e)}")]


def _validate_mapping(
    record: Mapping[Any, Any], max_array_items: int, now_us: int
) -> Contact | list[Problem]:
    problems: list[Problem] = []
    scalars: list[Any] = [None] * _N
    arrays: dict[str, list[str]] = {}
    link = ""
    observed_us = now_us
    observed_default = True
    saw_link = False
    for key, value in record.items():
        try:
            # Only plain strings are looked up: a key of another type is never a field,
            # and its own __hash__ and __eq__ are never called.
            k = key if type(key) is str else None
            spec = _DISPATCH.get(k) if k is not None else None
            if spec is not None:
                if value is None:
                    continue
                slot, check, cap = spec
                # plain short ASCII text without NUL, inline: most fields of most records
                if (
                    cap
                    and type(value) is str
                    and len(value) <= cap
                    and value.isascii()
                    and "\x00" not in value
                ):
                    scalars[slot] = value if value and not value.isspace() else None
                else:
                    scalars[slot] = check(value)
            elif k == "source_link":
                saw_link = True
                link = _link(value)
            elif k in _ARRAY_CHECK:
                if value is not None:
                    arrays[k] = _array(value, _ARRAY_CHECK[k], max_array_items)
            elif k == "observed_at":
                if value is not None:
                    observed_us = _observed(value, now_us)
                    observed_default = False
            else:
                name = _field_name(key)
                problems.append(Problem(name, "unknown_field", f"{_quote(key)} is not a field"))
        except _Bad as e:
            problems.append(Problem(_field_name(key), e.reason, e.detail))
        except Exception as e:  # last resort: an unforeseen failure names its field
            problems.append(
                Problem(
                    _field_name(key),
                    "invalid_value",
                    f"checking the value raised {_type_name(e)}",
                )
            )
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
        observed_default,
    )
