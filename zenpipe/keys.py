"""Partition keys computed in Python exactly as PostgreSQL computes them.

``zen_contacts.partition_key`` is ``hashtext(source_link)``: Bob Jenkins' lookup3
``hash_bytes`` over the UTF-8 bytes of the link, as a signed int4.  A ``CHECK``
constraint recomputes it on the server, so a client that disagrees cannot store a row.

The table is ``PARTITION BY HASH (partition_key)``; PostgreSQL hashes the key again
(``hashint4extended`` with the partition seed) to pick one of 32 leaves.
:func:`partition_of` repeats that too, so writers can group rows by the leaf they land
in without asking the server.

Nothing here uses ``abs()`` or ``%`` on signed values: ``abs(hashtext())`` overflows on
``INT_MIN`` in SQL, and ``%`` disagrees between SQL and Python for negative numbers.
"""

from __future__ import annotations

from struct import Struct

__all__ = [
    "NUM_PARTITIONS",
    "hashtext",
    "partition_key",
    "partition_of",
    "partition_table",
]

#: Number of hash partitions of ``zen_contacts`` (``zen_contacts_p0`` .. ``_p31``).
NUM_PARTITIONS = 32

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B9 + 3923095
# HASH_PARTITION_SEED in src/include/catalog/partition.h
_PARTITION_SEED = 0x7A5B22367996DCFD
_HASH_COMBINE = 0x49A0F4DD15E5A8E3
_WORDS3 = Struct("<3I")
_ZERO12 = bytes(12)


def _hash_bytes(data: bytes) -> int:
    """lookup3 ``hash_bytes`` as in src/common/hashfn.c (little-endian), unsigned.

    The hot path of every writer: the ``mix`` steps are written out, with the first
    additions folded together, which is about a third faster than the literal form.
    """
    m = _M32
    length = len(data)
    a = b = c = (_GOLDEN + length) & m
    unpack = _WORDS3.unpack_from
    off = 0
    last_block = length - 12
    while off <= last_block:
        x, y, z = unpack(data, off)
        # a += x; b += y; c += z; then mix(a, b, c)
        a = (a + x - c - z) & m
        c = (c + z) & m
        a ^= ((c << 4) & m) | (c >> 28)
        c = (c + b + y) & m
        b = (b + y - a) & m
        b ^= ((a << 6) & m) | (a >> 26)
        a = (a + c) & m
        c = (c - b) & m
        c ^= ((b << 8) & m) | (b >> 24)
        b = (b + a) & m
        a = (a - c) & m
        a ^= ((c << 16) & m) | (c >> 16)
        c = (c + b) & m
        b = (b - a) & m
        b ^= ((a << 19) & m) | (a >> 13)
        a = (a + c) & m
        c = (c - b) & m
        c ^= ((b << 4) & m) | (b >> 28)
        b = (b + a) & m
        off += 12
    rest = length - off
    if rest:
        # The low byte of c is reserved for the length: tail bytes 8..10 go in shifted.
        x, y, z = unpack(data[off:] + _ZERO12[rest:])
        a = (a + x) & m
        b = (b + y) & m
        c = (c + (z << 8)) & m
    # PostgreSQL runs the final mix even when no bytes remain.
    return _final(a, b, c)[2]


def _final(a: int, b: int, c: int) -> tuple[int, int, int]:
    c ^= b
    c = (c - ((b << 14) | (b >> 18))) & _M32
    a ^= c
    a = (a - ((c << 11) | (c >> 21))) & _M32
    b ^= a
    b = (b - ((a << 25) | (a >> 7))) & _M32
    c ^= b
    c = (c - ((b << 16) | (b >> 16))) & _M32
    a ^= c
    a = (a - ((c << 4) | (c >> 28))) & _M32
    b ^= a
    b = (b - ((a << 14) | (a >> 18))) & _M32
    c ^= b
    c = (c - ((b << 24) | (b >> 8))) & _M32
    return a, b, c


def hashtext(text: str) -> int:
    """Return PostgreSQL's ``hashtext(text)`` for a UTF-8 database, as a signed int4.

    Raises `UnicodeEncodeError` for strings PostgreSQL cannot store either (lone
    surrogates); callers validating input should reject those first.
    """
    h = _hash_bytes(text.encode("utf-8"))
    return h - 0x100000000 if h & 0x80000000 else h


#: ``zen_contacts.partition_key`` for a ``source_link``; the schema's CHECK agrees.
partition_key = hashtext


def _hashint4extended(value: int, seed: int) -> int:
    """``hashint4extended(value, seed)`` (``hash_uint32_extended``), unsigned 64-bit."""
    a = b = c = (_GOLDEN + 4) & _M32
    if seed:
        a = (a + (seed >> 32)) & _M32
        b = (b + (seed & _M32)) & _M32
        # mix(a, b, c)
        a = (a - c) & _M32
        a ^= ((c << 4) | (c >> 28)) & _M32
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= ((a << 6) | (a >> 26)) & _M32
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= ((b << 8) | (b >> 24)) & _M32
        b = (b + a) & _M32
        a = (a - c) & _M32
        a ^= ((c << 16) | (c >> 16)) & _M32
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= ((a << 19) | (a >> 13)) & _M32
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= ((b << 4) | (b >> 28)) & _M32
        b = (b + a) & _M32
    a = (a + (value & _M32)) & _M32
    a, b, c = _final(a, b, c)
    return (b << 32) | c


def partition_of(key: int, modulus: int = NUM_PARTITIONS) -> int:
    """Return the hash-partition remainder PostgreSQL routes an int4 ``key`` to.

    Mirrors ``compute_partition_hash_value()``: one key column, combined into a zero
    row hash with ``hash_combine64``, then reduced modulo the greatest modulus.
    """
    h = _hashint4extended(key, _PARTITION_SEED)
    row_hash = (h + _HASH_COMBINE) & _M64  # hash_combine64(0, h)
    return row_hash % modulus


def partition_table(source_link: str) -> str:
    """Name of the ``zen_contacts`` leaf partition that stores ``source_link``."""
    return f"zen_contacts_p{partition_of(hashtext(source_link))}"
