"""Helpers shared by the benchmarks: a database to run on and the report writers.

Every benchmark measures its baselines and zenpipe in the same run, on the same server
and data, and reports ratios; absolute figures vary from machine to machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from zenpipe import schema
from zenpipe.embedded import ThrowawayPostgres

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("ZENPIPE_DSN"),
        help="server to benchmark on (a new database is created there); default: a "
        "throwaway server",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="report folder")
    return parser


def add_repetitions(parser: argparse.ArgumentParser) -> None:
    """``--reps`` interleaved repetitions, after ``--warmup`` untimed ones."""
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed repetitions first, not reported: on a new server the first pass "
        "also creates the WAL segments that later passes recycle",
    )


def repetitions(args: argparse.Namespace) -> range:
    """The repetition numbers to run: the warm-up ones are negative (not reported)."""
    return range(-args.warmup, args.reps)


@contextmanager
def server(dsn: str | None, settings: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the DSN of a server: the one given, or a throwaway one."""
    if dsn:
        yield dsn
        return
    with ThrowawayPostgres(settings=settings) as pg:
        yield pg.dsn


@contextmanager
def fresh_database(server_dsn: str, *, migrate: bool = True) -> Iterator[str]:
    """Create a new database on the server (schema applied), drop it afterwards."""
    name = f"zenbench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(server_dsn, dbname=name)
    try:
        if migrate:
            schema.apply(dsn)
        yield dsn
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(name)
                )
            )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append(f"{v:,.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    name: str, out: Path, report: dict[str, Any], rows: Sequence[dict[str, Any]]
) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` to *out*, print the Markdown; return the
    JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": name, "environment": environment(), **report}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = f"# {name}\n\n{markdown_table(rows)}\n"
    (out / f"{name}.md").write_text(md)
    print(md)
    return json_path
