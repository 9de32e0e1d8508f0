"""The bench's report: live progress, the final table, JSON and a PNG.

rich (``pip install 'zenpipe[bench]'``) draws the live view and the table when it is
installed and the output is a terminal; otherwise plain lines.  matplotlib
(``zenpipe[plot]``) draws ``--plot``; both are imported only when used.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from collections import Counter
from typing import Any, TextIO

from .faults import KINDS

__all__ = ["LiveView", "build", "percentiles", "plot", "render"]


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95 and p99 in milliseconds (None without values)."""
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    if len(values) == 1:
        v = round(values[0] * 1000, 2)
        return {"p50_ms": v, "p95_ms": v, "p99_ms": v}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50_ms": round(cuts[49] * 1000, 2),
        "p95_ms": round(cuts[94] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
    }


def build(*, config: Any, dataset: Any, seconds: float, startup_seconds: float,
          load_seconds: float, events: Any,
          faults: Any, timeline: list[dict[str, Any]], peak: int, budget: int,
          partitions: dict[str, int], claim_totals: Any, violations: list[Any], mode: str,
          applied: int, logs: str | None) -> dict[str, Any]:  # fmt: skip
    """The report as a JSON-able dict (``--json`` writes it as it is)."""
    from .invariants import INVARIANTS  # noqa: PLC0415
    from .run import config_dict  # noqa: PLC0415

    batches = events.batches
    outcomes = Counter(b["outcome"] for b in batches)
    rows = len(dataset.rows)
    rss = sorted(events.rss.values())
    violated = {v.name for v in violations}
    return {
        "ok": not violations,
        "mode": mode,
        "config": config_dict(config),
        "data": dataset.counts(),
        "migrations_applied": applied,
        "load_seconds": round(load_seconds, 2),
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
        "startup_seconds": round(startup_seconds, 2),
        "wall_rows_per_s": (
            round(rows / (seconds + startup_seconds), 1) if seconds + startup_seconds > 0 else None
        ),
        "batches": len(batches),
        "outcomes": dict(outcomes),
        "rows_written": sum(b["written"] for b in batches),
        "rows_rejected": sum(b["rejected"] for b in batches),
        "row_failures": sum(b["failed"] for b in batches),
        "latency": {
            "claim": percentiles([b["claim_seconds"] for b in batches]),
            "enrich": percentiles([b["enrich_seconds"] for b in batches]),
            "write": percentiles([b["write_seconds"] for b in batches if b["write_seconds"]]),
        },
        "retries": sum(b["retries"] for b in batches),
        "leases_lost": int(claim_totals[0]) if claim_totals else 0,
        "claims_spent": int(claim_totals[1]) if claim_totals else 0,
        "fenced_batches": outcomes.get("stale", 0),
        "peak_connections": peak,
        "fleet_budget": budget,
        "worker_processes_started": events.starts,
        "partitions": {
            "used": len(partitions),
            "min_rows": min(partitions.values()) if partitions else 0,
            "max_rows": max(partitions.values()) if partitions else 0,
            "rows": partitions,
        },
        "peak_rss_mib": {
            "max": round(rss[-1] / 1024, 1) if rss else None,
            "median": round(statistics.median(rss) / 1024, 1) if rss else None,
            "by_pid": {str(pid): round(kib / 1024, 1) for pid, kib in events.rss.items()},
        },
        "faults": faults.counts(),
        "fault_log": [
            {"kind": f.kind, "at": f.at, "detail": f.detail}
            for f in sorted(faults.faults, key=lambda f: f.at)
        ],
        "invariants": {name: name not in violated for name in INVARIANTS},
        "violations": [v.to_dict() for v in violations],
        "timeline": timeline,
        "logs": logs,
    }


def _ms(p: dict[str, float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:,.1f}" for v in p.values())


def _rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    lat = report["latency"]
    parts = report["partitions"]
    rss = report["peak_rss_mib"]
    faults = ", ".join(f"{k} {v}" for k, v in report["faults"].items() if v) or "none"
    d = report["data"]
    outcomes = ", ".join(f"{k} {v}" for k, v in report["outcomes"].items())
    return [
        ("rows", f"{d['rows']:,} ({d['links']:,} links, {d['rescrapes']:,} re-scrapes, "
                 f"{d['bad']} bad, {d['poison']} poison, {d['crash']} crash, "
                 f"{d['transient_failures']} transient)"),
        ("fleet", f"{report['config']['servers']} servers x {report['config']['workers']} "
                  f"worker processes ({report['worker_processes_started']} started)"),
        ("throughput", f"{report['rows_per_s']:,} rows/s ({report['seconds']} s from the "
                       f"first claim; {report['wall_rows_per_s']:,} rows/s with the "
                       f"{report['startup_seconds']} s of fleet start-up)"),
        ("claim p50/p95/p99 ms", _ms(lat["claim"])),
        ("enrich p50/p95/p99 ms", _ms(lat["enrich"])),
        ("write p50/p95/p99 ms", _ms(lat["write"])),
        ("batches", f"{report['batches']:,} ({outcomes})"),
        ("retries", f"{report['retries']}"),
        ("leases lost", f"{report['leases_lost']}"),
        ("fenced batches", f"{report['fenced_batches']}"),
        ("peak connections", f"{report['peak_connections']} (budget {report['fleet_budget']})"),
        ("rows per partition",
         f"{parts['min_rows']}-{parts['max_rows']} over {parts['used']} partitions"),
        ("peak RSS per worker", f"max {rss['max']} MiB, median {rss['median']} MiB"),
        ("faults", faults),
        *_baseline_rows(report),
    ]  # fmt: skip


def _baseline_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The physical reference and the --compare loops: zenpipe's speed as a ratio to
    each, and the loops' invariant violations."""
    out: list[tuple[str, str]] = []
    ref = report.get("physical_reference")
    if ref:
        out.append(("physical reference",
                    f"{ref['rows_per_s']:,} rows/s (COPY {ref['contacts']:,} contacts + one "
                    f"UPDATE, {ref['seconds']} s); zenpipe {ref['zenpipe_ratio']}x "
                    f"({ref['zenpipe_wall_ratio']}x with start-up)"))  # fmt: skip
    floor = report.get("crash_safe_floor")
    if floor:
        vs_ref = (
            ""
            if floor["reference_ratio"] is None
            else (f"; {floor['reference_ratio']}x the physical reference")
        )
        out.append(("crash-safe floor",
                    f"{floor['rows_per_s']:,} rows/s ({floor['sessions']} sessions, batch "
                    f"{floor['batch']}, {floor['seconds']} s{vs_ref}); zenpipe "
                    f"{floor['zenpipe_ratio']}x"))  # fmt: skip
    for b in report.get("baselines", []):
        broken = ", ".join(f"{v['name']} {v['count']}" for v in b["violations"]) or "none"
        done = "" if b["complete"] else f", capped: {b['rows_settled']:,} rows settled"
        out.append((f"baseline {b['method']}",
                    f"{b['rows_per_s']:,} rows/s ({b['seconds']} s{done}); zenpipe "
                    f"{b['zenpipe_ratio']}x; written twice {b['rows_written_more_than_once']}, "
                    f"out of shared memory {b['out_of_shared_memory']}, write errors "
                    f"{b['write_errors']}; violations: {broken}"))  # fmt: skip
    return out


def render(report: dict[str, Any], out: TextIO | None = None) -> None:
    """The final table and the invariants (rich when available and a terminal)."""
    out = out or sys.stdout
    try:
        if not out.isatty():
            raise ImportError
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
    except ImportError:
        for name, value in _rows(report):
            print(f"{name:>22}: {value}", file=out)
        for name, ok in report["invariants"].items():
            print(f"{'invariant':>22}: {name} {'OK' if ok else 'VIOLATED'}", file=out)
    else:
        console = Console(file=out)
        table = Table(title="zenpipe bench", show_header=False)
        for name, value in _rows(report):
            table.add_row(name, value)
        for name, ok in report["invariants"].items():
            table.add_row("invariant", f"{name} [{'green]OK' if ok else 'red]VIOLATED'}[/]")
        console.print(table)
    for v in report["violations"]:
        print(f"VIOLATED {v['name']}: {v['count']} case(s)", file=out)
        for example in v["examples"]:
            print(f"    {example}", file=out)
    print("invariants: OK" if report["ok"] else "invariants: VIOLATED", file=out)


class LiveView:
    """Progress while running: a rich live panel on a terminal, else a line every 5 s
    on *out* (stderr by default)."""

    def __init__(self, out: TextIO | None = None, *, quiet: bool = False) -> None:
        self.out = out or sys.stderr
        self.quiet = quiet
        self._live: Any = None
        self._last = -5.0
        if quiet or not self.out.isatty():
            return
        try:
            from rich.console import Console  # noqa: PLC0415
            from rich.live import Live  # noqa: PLC0415
        except ImportError:
            return
        self._live = Live(console=Console(file=self.out), refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveView:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, p: dict[str, Any]) -> None:
        if self.quiet:
            return
        faults = ", ".join(f"{k} {v}" for k, v in p["faults"].items()) or "none"
        line = (
            f"{p['t']:6.1f} s  settled {p['settled']:,}/{p['total']:,}  "
            f"{p['rows_per_s']:,.0f} rows/s  errors {p['errors']}  failed rows "
            f"{p['failed_rows']}  faults: {faults}  connections {p['connections']} "
            f"(peak {p['peak_connections']}, budget {p['budget']})"
        )
        if self._live is not None:
            from rich.progress_bar import ProgressBar  # noqa: PLC0415
            from rich.table import Table  # noqa: PLC0415

            grid = Table.grid(padding=(0, 2))
            grid.add_row(ProgressBar(total=p["total"], completed=p["settled"], width=40),
                         f"{p['settled']:,}/{p['total']:,} rows settled")  # fmt: skip
            grid.add_row("rows/s", f"{p['rows_per_s']:,.0f}")
            grid.add_row("errors", f"{p['errors']} batches, {p['failed_rows']} row failures")
            grid.add_row("faults", faults)
            grid.add_row(
                "connections",
                f"{p['connections']} (peak {p['peak_connections']}, budget {p['budget']})",
            )
            grid.add_row("processes started", str(p["processes"]))
            self._live.update(grid)
        elif p["t"] - self._last >= 5:
            self._last = p["t"]
            print(line, file=self.out, flush=True)


def plot(report: dict[str, Any], path: str) -> None:
    """Throughput, connections and faults over time as a PNG (needs matplotlib)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tl = report["timeline"]
    ts = [p["t"] for p in tl]
    rates = [0.0]
    for a, b in itertools.pairwise(tl):
        dt = b["t"] - a["t"]
        rates.append((b["settled"] - a["settled"]) / dt if dt > 0 else 0.0)
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].plot(ts, rates, color="tab:blue")
    axes[0].set_ylabel("rows/s settled")
    axes[1].plot(ts, [p["connections"] or 0 for p in tl], color="tab:green")
    axes[1].axhline(report["fleet_budget"], color="tab:red", linestyle="--", label="budget")
    axes[1].set_ylabel("connections")
    axes[1].legend(loc="upper right")
    for i, kind in enumerate(k for k in KINDS if report["faults"].get(k)):
        at = [f["at"] for f in report["fault_log"] if f["kind"] == kind]
        axes[2].scatter(at, [i] * len(at), label=f"{kind} ({len(at)})", s=12)
    axes[2].set_ylabel("faults")
    axes[2].set_yticks([])
    if report["fault_log"]:
        axes[2].legend(loc="upper right", fontsize=7)
    axes[2].set_xlabel("seconds")
    fig.suptitle(
        f"zenpipe bench: {report['data']['rows']:,} rows, {report['rows_per_s']} rows/s, "
        f"invariants {'OK' if report['ok'] else 'VIOLATED'}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
