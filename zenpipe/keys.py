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

from collections.abc import Sequence
from struct import Struct

import numpy as np
import numpy.typing as npt

__all__ = [
    "NUM_PARTITIONS",
    "hashtext",
    "partition_key",
    "partition_keys",
    "partition_of",
    "partition_table",
    "route",
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


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """lookup3 ``mix``; `_hash_bytes` has it written out in its loop for speed."""
    a = ((a - c) & _M32) ^ (((c << 4) & _M32) | (c >> 28))
    c = (c + b) & _M32
    b = ((b - a) & _M32) ^ (((a << 6) & _M32) | (a >> 26))
    a = (a + c) & _M32
    c = ((c - b) & _M32) ^ (((b << 8) & _M32) | (b >> 24))
    b = (b + a) & _M32
    a = ((a - c) & _M32) ^ (((c << 16) & _M32) | (c >> 16))
    c = (c + b) & _M32
    b = ((b - a) & _M32) ^ (((a << 19) & _M32) | (a >> 13))
    a = (a + c) & _M32
    c = ((c - b) & _M32) ^ (((b << 4) & _M32) | (b >> 28))
    b = (b + a) & _M32
    return a, b, c


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
        a, b, c = _mix((a + (seed >> 32)) & _M32, (b + (seed & _M32)) & _M32, c)
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


# -- vectorized: a whole batch at once ------------------------------------------------

_U32 = np.uint32
_Array = npt.NDArray[np.uint32]


def _rot(x: _Array, k: int) -> _Array:
    return (x << _U32(k)) | (x >> _U32(32 - k))


def _mix_v(a: _Array, b: _Array, c: _Array) -> tuple[_Array, _Array, _Array]:
    a = a - c
    a ^= _rot(c, 4)
    c = c + b
    b = b - a
    b ^= _rot(a, 6)
    a = a + c
    c = c - b
    c ^= _rot(b, 8)
    b = b + a
    a = a - c
    a ^= _rot(c, 16)
    c = c + b
    b = b - a
    b ^= _rot(a, 19)
    a = a + c
    c = c - b
    c ^= _rot(b, 4)
    b = b + a
    return a, b, c


def _final_v(a: _Array, b: _Array, c: _Array) -> tuple[_Array, _Array, _Array]:
    c = (c ^ b) - _rot(b, 14)
    a = (a ^ c) - _rot(c, 11)
    b = (b ^ a) - _rot(a, 25)
    c = (c ^ b) - _rot(b, 16)
    a = (a ^ c) - _rot(c, 4)
    b = (b ^ a) - _rot(a, 14)
    c = (c ^ b) - _rot(b, 24)
    return a, b, c


def _hashtext_v(links: Sequence[str]) -> _Array:
    """``hash_bytes`` of every link at once, unsigned, in input order.

    Each link is padded with zeros to whole 12-byte blocks plus one tail block (zero
    padding adds nothing to the tail words), so all links advance block by block
    together; links with fewer blocks drop out of the prefix as the rounds go on.
    """
    n = len(links)
    encoded = [link.encode("utf-8") for link in links]
    nbytes = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n)
    full = nbytes // 12
    pad = 12 * (full + 1) - nbytes
    buf = b"".join([e + _PAD[p] for e, p in zip(encoded, pad.tolist(), strict=True)])
    words = np.frombuffer(buf, dtype="<u4")
    start = np.zeros(n, dtype=np.int64)
    np.cumsum(3 * (full[:-1] + 1), out=start[1:])
    order = np.argsort(-full, kind="stable")
    full_sorted = full[order]
    base = start[order]
    init = ((_GOLDEN + nbytes[order]) & _M32).astype(np.uint32)
    a, b, c = init.copy(), init.copy(), init.copy()
    rounds = int(full_sorted[0]) if n else 0
    # active[j] = how many (sorted) links still have a full block at round j
    active = np.searchsorted(-full_sorted, -np.arange(rounds), side="left")
    for j in range(rounds):
        k = int(active[j])
        idx = base[:k] + 3 * j
        a[:k] += words[idx]
        b[:k] += words[idx + 1]
        c[:k] += words[idx + 2]
        a[:k], b[:k], c[:k] = _mix_v(a[:k], b[:k], c[:k])
    tail = base + 3 * full_sorted
    a += words[tail]
    b += words[tail + 1]
    c += words[tail + 2] << _U32(8)
    c = _final_v(a, b, c)[2]
    out = np.empty(n, dtype=np.uint32)
    out[order] = c
    return out


_PAD = [bytes(i) for i in range(13)]
_SEED_HI = _U32(_PARTITION_SEED >> 32)
_SEED_LO = _U32(_PARTITION_SEED & _M32)
_COMBINE_LO = _U32(_HASH_COMBINE & _M32)


def _partition_of_v(unsigned_keys: _Array) -> _Array:
    n = len(unsigned_keys)
    init = np.full(n, (_GOLDEN + 4) & _M32, dtype=np.uint32)
    a, b, c = _mix_v(init + _SEED_HI, init + _SEED_LO, init.copy())
    a = a + unsigned_keys
    c = _final_v(a, b, c)[2]
    # (b << 32 | c) + combine, modulo 32: only the low bits of c matter.
    return (c + _COMBINE_LO) & _U32(NUM_PARTITIONS - 1)


def partition_keys(links: Sequence[str]) -> list[int]:
    """`partition_key` of every link, computed together (vectorized with NumPy).

    Same results as calling `partition_key` on each link, at a small fraction of the
    cost for batches; raises `UnicodeEncodeError` for lone surrogates.
    """
    result: list[int] = _hashtext_v(links).view(np.int32).tolist()
    return result


def route(links: Sequence[str]) -> tuple[list[int], list[int]]:
    """``(partition keys, partition remainders)`` of every link, vectorized."""
    h = _hashtext_v(links)
    signed: list[int] = h.view(np.int32).tolist()
    parts: list[int] = _partition_of_v(h).tolist()
    return signed, parts


def partition_table(source_link: str) -> str:
    """Name of the ``zen_contacts`` leaf partition that stores ``source_link``."""
    return f"zen_contacts_p{partition_of(hashtext(source_link))}"
