"""The invariants a bench run must leave true, read back from the database.

`check` compares what the database holds with `zenpipe.bench.data.Expected` (computed
from the generated rows and the documented merge rules) and with what the run observed
(the workers' claim log, the sampled peak of connections, the faults that killed
processes).  Each invariant has a stable name; a violation carries how many cases and up
to five examples.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..keys import route
from ..locks import leftovers
from ..queries import load
from .data import SCALARS, Dataset, Expected

__all__ = ["INVARIANTS", "ClaimRecord", "RunFacts", "Violation", "check"]

#: Every invariant, in the order they are checked and reported.
INVARIANTS = (
    "rows_settled",
    "parked_with_reason",
    "no_effect_applied_twice",
    "one_contact_per_valid_link",
    "routed_partition",
    "arrays_are_unions",
    "counts_equal_lengths",
    "newest_scalar_wins",
    "rejects_exactly_once",
    "nothing_good_rejected",
    "fencing_tokens_unique",
    "no_advisory_locks_left",
    "no_idle_transactions_left",
    "connections_within_budget",
    "registry_empty",
)


@dataclass(frozen=True)
class ClaimRecord:
    """One row a worker enriched under a claim: from the workers' event files."""

    row_id: int
    token: int
    claim_id: str


@dataclass
class RunFacts:
    """What the run observed, for the invariants the database alone cannot show."""

    claims: list[ClaimRecord] = field(default_factory=list)
    peak_connections: int = 0
    budget: int = 0
    #: worker processes killed (faults and crash rows): their registry rows may be left
    #: to expire, they cannot delete them
    processes_killed: int = 0


@dataclass
class Violation:
    name: str
    count: int
    examples: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "examples": self.examples}


class _Found:
    def __init__(self) -> None:
        self.cases: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter[str] = Counter()

    def add(self, name: str, example: str) -> None:
        self.counts[name] += 1
        if len(self.cases[name]) < 5:
            self.cases[name].append(example[:300])

    def violations(self) -> list[Violation]:
        return [
            Violation(name, self.counts[name], self.cases[name])
            for name in INVARIANTS
            if self.counts[name]
        ]


def _same(column: str, got: Any, want: Any) -> bool:
    if got is None or want is None:
        return got is want
    if column in ("latitude", "longitude", "rating"):
        return math.isclose(float(got), float(want), rel_tol=0, abs_tol=1e-9)
    return bool(got == want)


def check(conn: psycopg.Connection[Any], dataset: Dataset, expected: Expected,
          facts: RunFacts) -> list[Violation]:  # fmt: skip
    """Every violated invariant (empty: all hold).  *conn*: autocommit, on the bench's
    database, opened directly (not through the fault proxy)."""
    q = load("bench")
    found = _Found()
    _check_rows(conn, q, dataset, expected, found)
    _check_contacts(conn, q, expected, found)
    _check_rejects(conn, q, expected, found)
    _check_fencing(conn, q, facts.claims, found)
    left = leftovers(conn)
    if left.advisory_locks:
        found.add("no_advisory_locks_left", f"{left.advisory_locks} zenpipe advisory lock(s)")
    if left.idle_in_transaction:
        found.add(
            "no_idle_transactions_left",
            f"{left.idle_in_transaction} idle-in-transaction session(s)",
        )
    if facts.peak_connections > facts.budget:
        found.add(
            "connections_within_budget",
            f"peak {facts.peak_connections} connections > fleet budget {facts.budget}",
        )
    live = [r[0] for r in conn.execute(q["live_servers"]).fetchall()]
    for server_id in live:
        found.add("registry_empty", f"live zen_servers row {server_id!r} after shutdown")
    rows = [r[0] for r in conn.execute(q["all_servers"]).fetchall()]
    if len(rows) > facts.processes_killed:
        found.add(
            "registry_empty",
            f"{len(rows)} zen_servers rows left, more than the {facts.processes_killed} "
            f"killed processes that could not delete theirs: {rows[:5]}",
        )
    return found.violations()


def _check_rows(conn: psycopg.Connection[Any], q: dict[str, Any], dataset: Dataset,
                expected: Expected, found: _Found) -> None:  # fmt: skip
    seen: Counter[int] = Counter()
    for n, status, last_error, row_id, *_ in conn.execute(q["results_rows"]).fetchall():
        seen[n] += 1
        want = expected.status.get(n)
        if status not in ("done", "failed"):
            found.add("rows_settled", f"row n={n} (id {row_id}) is {status}")
            continue
        if status == "failed" and not last_error:
            found.add("parked_with_reason", f"row n={n} (id {row_id}) parked without a reason")
        if want is not None and status != want:
            found.add(
                "parked_with_reason" if want == "done" else "rows_settled",
                f"row n={n} (id {row_id}, {dataset.rows[n].kind}) is {status}, expected {want}"
                + (f": {last_error}" if last_error else ""),
            )
    for n in expected.status:
        if seen[n] != 1:
            found.add("rows_settled", f"row n={n} found {seen[n]} times in results")


def _check_contacts(conn: psycopg.Connection[Any], q: dict[str, Any], expected: Expected,
                    found: _Found) -> None:  # fmt: skip
    rows = conn.execute(q["contacts_rows"]).fetchall()
    links = [r[1] for r in rows]
    _, parts = route(links) if links else ([], [])
    got_links: Counter[str] = Counter(links)
    for link, n in got_links.items():
        if n > 1:
            found.add("one_contact_per_valid_link", f"{n} contacts for {link}")
        if link not in expected.contacts:
            found.add(
                "one_contact_per_valid_link", f"contact for a link with no valid record: {link}"
            )
    for link in expected.contacts.keys() - got_links.keys():
        found.add("one_contact_per_valid_link", f"no contact for valid link {link}")
    for row, part in zip(rows, parts, strict=True):
        leaf, link, scrape_count, emails, phones, n_emails, n_phones = row[:7]
        if leaf != f"zen_contacts_p{part}":
            found.add("routed_partition", f"{link} is in {leaf}, routed to zen_contacts_p{part}")
        want = expected.contacts.get(link)
        if n_emails != len(emails) or n_phones != len(phones):
            found.add(
                "counts_equal_lengths",
                f"{link}: emails_count {n_emails} for {len(emails)}, phones_count {n_phones} "
                f"for {len(phones)}",
            )
        if want is None:
            continue
        if scrape_count != want.scrape_count:
            found.add(
                "no_effect_applied_twice",
                f"{link}: scrape_count {scrape_count}, completed valid rows {want.scrape_count}",
            )
        if emails != sorted(want.emails) or phones != sorted(want.phones):
            found.add(
                "arrays_are_unions",
                f"{link}: emails {emails} phones {phones}, union of writes "
                f"{sorted(want.emails)} {sorted(want.phones)}",
            )
        scalars = want.scalars()
        for column, got in zip(SCALARS, row[7:], strict=True):
            if not _same(column, got, scalars[column]):
                found.add(
                    "newest_scalar_wins",
                    f"{link}: {column} = {got!r}, newest observation {scalars[column]!r}",
                )


def _check_rejects(conn: psycopg.Connection[Any], q: dict[str, Any], expected: Expected,
                   found: _Found) -> None:  # fmt: skip
    got: Counter[tuple[str, str]] = Counter(
        (link, reason) for link, reason in conn.execute(q["reject_rows"]).fetchall()
    )
    for key, want in expected.rejects.items():
        if got[key] != want:
            found.add(
                "rejects_exactly_once",
                f"{key[1]} for {key[0][:80]!r}: {got[key]} reject(s), expected {want}",
            )
    for key, n in got.items():
        if key not in expected.rejects:
            found.add(
                "nothing_good_rejected", f"{n} unexpected reject(s) {key[1]} for {key[0][:80]}"
            )


def _check_fencing(conn: psycopg.Connection[Any], q: dict[str, Any],
                   claims: Iterable[ClaimRecord], found: _Found) -> None:  # fmt: skip
    for token, n, ids in conn.execute(q["shared_tokens"]).fetchall():
        found.add("fencing_tokens_unique", f"token {token} carries {n} claim ids (rows {ids[:5]})")
    by_token: dict[int, set[str]] = defaultdict(set)
    by_claim: dict[str, set[int]] = defaultdict(set)
    pairs: Counter[tuple[int, int]] = Counter()
    for c in claims:
        by_token[c.token].add(c.claim_id)
        by_claim[c.claim_id].add(c.token)
        pairs[(c.row_id, c.token)] += 1
    for token, ids in by_token.items():
        if len(ids) > 1:
            found.add("fencing_tokens_unique", f"token {token} issued to {len(ids)} claims")
    for claim_id, tokens in by_claim.items():
        if len(tokens) > 1:
            found.add("fencing_tokens_unique", f"claim {claim_id} under tokens {sorted(tokens)}")
    for (row_id, token), n in pairs.items():
        if n > 1:
            found.add(
                "fencing_tokens_unique", f"row {row_id} handed out {n} times under token {token}"
            )
