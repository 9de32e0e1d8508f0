"""Advisory-lock namespaces.

zenpipe takes advisory locks only in the two-key ``(int4, int4)`` form, with one of the
namespaces below as the first key.  The two-key space never overlaps the one-key
``bigint`` space, so zenpipe's locks cannot collide with another application's.
"""

from __future__ import annotations

__all__ = ["ALL_NAMESPACES", "NAMESPACE_CLAIM", "NAMESPACE_FLEET", "NAMESPACE_MIGRATION"]

#: ``b"ZEN\x00"``: schema migrations (one session lock around a migration run).
NAMESPACE_MIGRATION = 0x5A454E00
#: ``b"ZEN\x01"``: claims of ``results`` rows (transaction locks, second key from the id).
NAMESPACE_CLAIM = 0x5A454E01
#: ``b"ZEN\x02"``: fleet registration (transaction lock around the budget arithmetic).
NAMESPACE_FLEET = 0x5A454E02

ALL_NAMESPACES = (NAMESPACE_MIGRATION, NAMESPACE_CLAIM, NAMESPACE_FLEET)
