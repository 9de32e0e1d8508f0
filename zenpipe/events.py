"""What a worker reports about each batch it handled, for harnesses and metrics.

A `Worker` given ``on_event`` calls it once per claimed batch with a `BatchEvent`
once the batch has landed (written, failed, taken over or given back): the timings of
its three phases and what became of its rows.  The call comes from the thread that
settled the batch (the worker's settling thread when pipelined), so a handler must be
thread-safe and quick; an exception it raises is logged and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["BatchEvent", "Outcome"]

#: How a batch ended: ``settled`` (written and/or failed, in the database), ``stale``
#: (its lease was lost: another worker owns the rows now), ``write_error`` (the write
#: kept failing on transient errors: the rows come back after their lease),
#: ``released`` (given back unprocessed by `Worker.abort`).
Outcome = Literal["settled", "stale", "write_error", "released"]


@dataclass(frozen=True)
class BatchEvent:
    """One batch of one worker, from its claim to its landing."""

    worker: str
    outcome: Outcome
    rows: int
    written: int = 0
    rejected: int = 0
    failed: int = 0
    #: Seconds spent claiming, enriching, and writing + settling the batch.
    claim_seconds: float = 0.0
    enrich_seconds: float = 0.0
    write_seconds: float = 0.0
    #: Write transactions retried after transient errors.
    retries: int = 0
