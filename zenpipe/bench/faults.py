"""The faults a bench run injects, when, and the record of every one injected.

Kinds (each on its own flag, all at once with ``--chaos RATE``):

=====================  ==============================================================
``kill_workers``       SIGKILL one worker process of a random server (the server's
                       supervisor restarts it)
``kill_servers``       SIGKILL a whole server: its supervisor and every worker process
                       at once (the bench starts it again)
``stop_servers``       SIGSTOP a whole server for 1.5 leases, then SIGCONT (its leases
                       run out, its batches are taken over and must be fenced)
``terminate_backends`` ``pg_terminate_backend`` of up to 3 random zenpipe backends
``restart_postgres``   one immediate restart of the throwaway PostgreSQL mid-run
``drop_commit_acks``   the proxy forwards a COMMIT, lets it land, loses the reply
``cut_before_commit``  the proxy cuts a connection instead of forwarding its COMMIT
``crash_rows``         rows whose enrichment SIGKILLs its process (a data property:
                       counted when the enrichment reports it, just before dying)
=====================  ==============================================================

`Schedule` decides when each rate-driven kind is due: the first one early in the run
(staggered, so a short run sees every kind), then a Poisson process at the kind's rate
(faults per second), from a seeded generator.
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["KINDS", "RATE_KINDS", "Fault", "FaultLog", "Schedule", "children", "signal_all"]

#: Kinds injected at a rate (faults per second).
RATE_KINDS = (
    "kill_workers",
    "kill_servers",
    "stop_servers",
    "terminate_backends",
    "drop_commit_acks",
    "cut_before_commit",
)
KINDS = (*RATE_KINDS, "restart_postgres", "crash_rows")


@dataclass(frozen=True)
class Fault:
    kind: str
    #: seconds since the start of the run
    at: float
    detail: str = ""


@dataclass
class FaultLog:
    faults: list[Fault] = field(default_factory=list)

    def add(self, kind: str, at: float, detail: str = "") -> None:
        self.faults.append(Fault(kind, round(at, 3), detail))

    def counts(self) -> dict[str, int]:
        c = Counter(f.kind for f in self.faults)
        return {k: c[k] for k in KINDS}

    def total(self) -> int:
        return len(self.faults)


class Schedule:
    """When each kind with a positive rate is due next (seconds since the start)."""

    def __init__(self, rates: dict[str, float], *, seed: int, first_at: float = 2.0) -> None:
        self._rng = random.Random(seed)  # not security: reproducible chaos
        self.rates = {k: r for k, r in rates.items() if r > 0}
        self._next = {kind: first_at + 0.8 * i for i, kind in enumerate(sorted(self.rates))}

    def due(self, now: float) -> list[str]:
        """The kinds due at *now* (each advanced to its next time)."""
        out = []
        for kind, at in self._next.items():
            if now >= at:
                out.append(kind)
                self._next[kind] = now + self._rng.expovariate(self.rates[kind])
        return out

    def missed(self, kind: str, now: float, retry: float = 0.5) -> None:
        """*kind* was due at *now* but found nothing to hit (no worker started yet, a
        server down, the database restarting): due again after *retry* seconds, not
        after a whole gap of the rate, so a short run still gets every kind."""
        self._next[kind] = min(self._next[kind], now + retry)

    def choice(self, items: list[int]) -> int:
        return self._rng.choice(items)


def children(pid: int) -> list[int]:
    """Pids of the live child processes of *pid* (Linux ``/proc``)."""
    out: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def signal_all(pids: list[int], sig: signal.Signals) -> int:
    """Send *sig* to each pid; return how many received it."""
    n = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            n += 1
        except ProcessLookupError:
            continue
    return n
