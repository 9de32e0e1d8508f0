"""``zenpipe bench``: the multi-server benchmark and chaos harness (docs/benchmarking.md).

- `zenpipe.bench.data`: the deterministic source rows and the table they must produce.
- `zenpipe.bench.enrich`: the stand-in enrichment the worker processes run, and their
  `zenpipe.events.BatchEvent` sink.
- `zenpipe.bench.faults`: the faults, their schedule and their log.
- `zenpipe.bench.proxy`: the loopback TCP proxy that loses COMMIT replies.
- `zenpipe.bench.invariants`: what must hold at the end, read back from the database.
- `zenpipe.bench.report`: live view, final table, JSON, PNG.
- `zenpipe.bench.baselines`: the physical reference and the `--compare` loops.
- `zenpipe.bench.run`: one run, end to end (``python -m zenpipe.bench`` is one server).
"""

from __future__ import annotations

from .run import BenchConfig, BenchResult, run

__all__ = ["BenchConfig", "BenchResult", "run"]
