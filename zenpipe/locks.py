"""Advisory-lock namespaces.

zenpipe takes advisory locks only in the two-key ``(int4, int4)`` form, with one of the
namespaces below as the first key.  The two-key space never overlaps the one-key
``bigint`` space, so zenpipe's locks cannot collide with another application's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from .queries import load

__all__ = [
    "ALL_NAMESPACES",
    "NAMESPACE_CLAIM",
    "NAMESPACE_FLEET",
    "NAMESPACE_MIGRATION",
    "NAMESPACE_PRODUCE",
    "Leftovers",
    "leftovers",
]

#: ``b"ZEN\x00"``: schema migrations (one session lock around a migration run).
NAMESPACE_MIGRATION = 0x5A454E00
#: ``b"ZEN\x01"``: claims of ``results`` rows (transaction locks, second key from the id).
NAMESPACE_CLAIM = 0x5A454E01
#: ``b"ZEN\x02"``: fleet registration (transaction lock around the budget arithmetic).
NAMESPACE_FLEET = 0x5A454E02
#: ``b"ZEN\x03"``: producers loading with ``skip_existing`` (one transaction lock, second
#: key 0, from before the first insert to commit; see zenpipe.produce).
NAMESPACE_PRODUCE = 0x5A454E03

ALL_NAMESPACES = (NAMESPACE_MIGRATION, NAMESPACE_CLAIM, NAMESPACE_FLEET, NAMESPACE_PRODUCE)


@dataclass(frozen=True)
class Leftovers:
    """What a finished run must not leave behind on its database."""

    advisory_locks: int
    idle_in_transaction: int

    def __bool__(self) -> bool:
        return bool(self.advisory_locks or self.idle_in_transaction)


def leftovers(conn: psycopg.Connection[Any]) -> Leftovers:
    """Count zenpipe advisory locks (every namespace) and idle-in-transaction sessions
    on *conn*'s database, *conn*'s own session excluded.

    Both should be zero whenever no claim is in flight: transaction locks end with their
    transaction, and zenpipe never leaves one open (tests, the demo and monitoring use
    this to prove it).
    """
    row = conn.execute(load("locks")["leftovers"], {"namespaces": list(ALL_NAMESPACES)}).fetchone()
    if row is None:  # pragma: no cover - an aggregate always returns a row
        raise RuntimeError("leftovers query returned no row")
    return Leftovers(int(row[0]), int(row[1]))


#: ``b"ZEN\x0c"``: operations (issue 12), transaction locks, second key below: one
#: dashboard refresh, one hourly rollup, one prune, one legacy migration per source at a
#: time across the fleet.
NAMESPACE_OPS = 0x5A454E0C
OPS_DASHBOARD = 1
OPS_ROLLUP = 2
OPS_PRUNE = 3
OPS_LEGACY_V1 = 4
OPS_LEGACY_V2 = 5
#: Every namespace, the operations' included (`zenpipe.doctor` looks for leftovers in all).
ZENPIPE_NAMESPACES = (*ALL_NAMESPACES, NAMESPACE_OPS)
__all__ += ["NAMESPACE_OPS", "ZENPIPE_NAMESPACES"]
