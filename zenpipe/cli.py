"""The ``zenpipe`` command.

Every subcommand takes ``--dsn`` (or ``ZENPIPE_DSN``); without one it runs against a
throwaway PostgreSQL that is created for the command and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

import psycopg

from . import schema
from .citus import ThrowawayCitus
from .embedded import ThrowawayPostgres
from .errors import ZenpipeError
from .queries import load
from .worker import PARTITION_AFFINITY

__all__ = ["main"]


@contextmanager
def _database(dsn: str | None) -> Iterator[str]:
    """Yield the DSN given, or the DSN of a throwaway server that lives for the command."""
    dsn = dsn or os.environ.get("ZENPIPE_DSN")
    if dsn:
        yield dsn
        return
    with ThrowawayPostgres() as server:
        print(
            f"no --dsn or ZENPIPE_DSN: using a throwaway PostgreSQL on "
            f"{server.host}:{server.port} ({server.bindir}), deleted on exit",
            file=sys.stderr,
        )
        yield server.dsn


def _cmd_schema_apply(args: argparse.Namespace) -> int:
    if args.citus and not (args.dsn or os.environ.get("ZENPIPE_DSN")):
        with ThrowawayCitus() as cluster:
            print(
                f"no --dsn or ZENPIPE_DSN: using a throwaway Citus cluster (coordinator "
                f"{cluster.dsn}, {len(cluster.workers)} workers), deleted on exit",
                file=sys.stderr,
            )
            args.dsn = cluster.dsn
            return _cmd_schema_apply(args)
    with _database(args.dsn) as dsn:
        # --citus: the distributed variant, required; without it, detected
        applied = schema.apply(
            dsn, lock_timeout=args.lock_timeout, citus=True if args.citus else None
        )
        if not applied:
            print("schema is up to date; nothing applied")
        for m in applied:
            print(f"applied {m.label}")
        if applied:
            _print_inventory(dsn)
    return 0


def _print_inventory(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        q = load("schema")
        rows = conn.execute(q["inventory_relations"]).fetchall()
        funcs = conn.execute(q["inventory_functions"]).fetchall()
    tables = [name for kind, name, part in rows if kind in ("r", "p") and not part]
    partitions = sorted(
        (name for kind, name, part in rows if kind == "r" and part),
        key=lambda n: (n.rstrip("0123456789"), int(n[len(n.rstrip("0123456789")) :] or 0)),
    )
    views = [name for kind, name, _ in rows if kind == "v"]
    indexes = [name for kind, name, _ in rows if kind == "I"] + [
        name for kind, name, part in rows if kind == "i" and not part
    ]
    print(f"tables ({len(tables)}): {', '.join(tables)}")
    print(
        f"partitions ({len(partitions)}): {partitions[0]} .. {partitions[-1]}" if partitions else ""
    )
    print(f"views ({len(views)}): {', '.join(views)}")
    print(f"functions ({len(funcs)}): {', '.join(f[0] for f in funcs)}")
    print(f"indexes ({len(indexes)} on parents, plus one per partition): {', '.join(indexes)}")


def _cmd_schema_status(args: argparse.Namespace) -> int:
    with _database(args.dsn) as dsn:
        for m in schema.status(dsn):
            print(
                f"{m.version:04d}_{m.name}  applied {m.applied_at:%Y-%m-%d %H:%M:%S}  "
                f"{m.checksum[:12]}"
            )
        for p in schema.pending(dsn):
            print(f"{p.label}  pending")
    return 0


def _add_requeue(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe requeue``: put parked (failed) rows, or any rows given, back to pending."""

    def run(args: argparse.Namespace) -> int:
        from .claim import requeue  # noqa: PLC0415 - keeps `zenpipe --help` light

        ids = args.ids or None
        if args.all and ids is not None:
            raise ZenpipeError("give --id or --all, not both")
        if args.any_status and ids is None:
            raise ZenpipeError(
                "--any-status needs --id: it moves done and claimed rows too; "
                "to re-run EVERY non-pending row say --all"
            )
        with _database(args.dsn) as dsn:
            moved = requeue(dsn, ids, failed_only=not (args.all or args.any_status))
        print(f"requeued {moved} row{'' if moved == 1 else 's'}")
        return 0

    text = "put failed rows (or the rows given) back to pending with a fresh attempt budget"
    p = sub.add_parser("requeue", help=text, description=text)
    p.add_argument(
        "--dsn", help="libpq connection string (default: $ZENPIPE_DSN, else a throwaway server)"
    )
    p.add_argument(
        "--id",
        dest="ids",
        type=int,
        action="append",
        default=[],
        help="a results id (repeatable); default: every failed row",
    )
    p.add_argument(
        "--any-status",
        action="store_true",
        help="with --id: requeue those rows whatever their status (done, claimed)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="requeue EVERY non-pending row (a full re-run); live claims are fenced",
    )
    p.set_defaults(func=run)


def _add_settings(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe settings``: show or change the fleet-wide settings (zen_settings)."""

    def run(args: argparse.Namespace) -> int:
        from .fleet_settings import read_fleet_settings, update_fleet_settings  # noqa: PLC0415

        dsn = args.dsn or os.environ.get("ZENPIPE_DSN")
        if not dsn:
            raise ZenpipeError("zenpipe settings needs --dsn or ZENPIPE_DSN")
        changes = {
            "max_attempts": args.max_attempts,
            "retry_base_seconds": args.retry_base,
            "retry_max_seconds": args.retry_max,
            "retry_jitter": args.retry_jitter,
        }
        with psycopg.connect(dsn, prepare_threshold=None) as conn:
            if any(v is not None for v in changes.values()):
                got = update_fleet_settings(conn, **changes)
            else:
                got = read_fleet_settings(conn)
        if args.json:
            print(json.dumps({k: str(v) if k == "updated_at" else v
                              for k, v in vars(got).items()}))  # fmt: skip
        else:
            print(f"max_attempts        {got.max_attempts}")
            print(f"retry_base_seconds  {got.retry_base_seconds:g}")
            print(f"retry_max_seconds   {got.retry_max_seconds:g}")
            print(f"retry_jitter        {got.retry_jitter:g}")
            print(f"updated_at          {got.updated_at.isoformat()}")
        return 0

    text = "show or change the fleet-wide settings: max_attempts and the retry backoff"
    p = sub.add_parser("settings", help=text, description=text)
    p.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN)")
    p.add_argument("--max-attempts", type=int, help="claims of a row before it is parked")
    p.add_argument("--retry-base", type=float, help="backoff of a first failure, seconds")
    p.add_argument("--retry-max", type=float, help="longest backoff, seconds")
    p.add_argument("--retry-jitter", type=float, help="0..1: share of the backoff drawn at random")
    p.add_argument("--json", action="store_true", help="print the settings as JSON")
    p.set_defaults(func=run)


def _add_stats(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe stats``: the fleet's budget, servers and pool metrics, the materialized
    dashboard (and how old it is), ``--hours N`` of hourly figures; ``stats rollup``."""

    def run(args: argparse.Namespace) -> int:
        from . import stats  # noqa: PLC0415 (keeps `zenpipe --help` light)

        throwaway = not (args.dsn or os.environ.get("ZENPIPE_DSN"))
        with _database(args.dsn) as dsn:
            if throwaway:
                schema.apply(dsn)
            if getattr(args, "stats_command", None) == "rollup":
                report = stats.rollup(dsn, since=args.since, margin=args.margin)
                print(json.dumps(report.__dict__, default=str) if args.json else report.render())
                return 0
            with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
                status, board = stats.fleet_overview(conn)
                hourly = stats.hours(conn, args.hours) if args.hours else None
        if args.json:
            out = status.as_dict()
            out["dashboard"] = board.as_dict()
            if hourly is not None:
                out["hours"] = hourly
            print(json.dumps(out, indent=2, default=str))
        else:
            print(status.render())
            print(f"  (zen_mv_dashboard, {board.age_seconds:.1f} s old: zenpipe refresh-dashboard)")
            if hourly is not None:
                print()
                print(stats.render_hours(hourly))
        return 0

    text = "show the fleet's connection budget, live servers, pool metrics and the dashboard"
    p = sub.add_parser("stats", help=text, description=text)
    p.add_argument(
        "--dsn", help="libpq connection string (default: $ZENPIPE_DSN, else a throwaway server)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--hours", type=int, default=0, help="also show the last N hours of stats")
    p.set_defaults(func=run)
    stats_sub = p.add_subparsers(dest="stats_command")
    r = stats_sub.add_parser(
        "rollup",
        help="recompute closed hours of zen_stats_hourly from zen_jobs (idempotent)",
        description="Recompute every closed hour after the watermark (or from --since) "
        "from the zen_jobs ledger, setting the figures (never adding), then move the "
        "watermark. Re-running counts nothing twice.",
    )
    r.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN)")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    r.add_argument("--hours", type=int, default=0, help=argparse.SUPPRESS)
    r.add_argument(
        "--since",
        type=datetime.fromisoformat,
        default=None,
        help="recompute from this time (ISO 8601) instead of the watermark",
    )
    r.add_argument(
        "--margin",
        type=float,
        default=600.0,
        help="seconds after its end before an hour counts as closed",
    )
    r.set_defaults(func=run)


def _ops_dsn(args: argparse.Namespace, command: str) -> str:
    dsn: str | None = args.dsn or os.environ.get("ZENPIPE_DSN")
    if not dsn:
        raise ZenpipeError(
            f"zenpipe {command} needs your database: pass --dsn or set ZENPIPE_DSN "
            "(a throwaway server would have nothing to work on)"
        )
    return dsn


def _add_refresh_dashboard(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe refresh-dashboard``: REFRESH MATERIALIZED VIEW CONCURRENTLY."""

    def run(args: argparse.Namespace) -> int:
        from . import dashboard  # noqa: PLC0415

        report = dashboard.refresh(
            _ops_dsn(args, "refresh-dashboard"), statement_timeout=args.timeout
        )
        print(
            f"dashboard refreshed concurrently in {report.seconds:.3f} s "
            f"(refreshed_at {report.refreshed_at.isoformat()})"
        )
        return 0

    text = "recompute zen_mv_dashboard concurrently (readers are not blocked)"
    p = sub.add_parser("refresh-dashboard", help=text, description=text)
    p.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN; required)")
    p.add_argument("--timeout", type=float, default=0.0, help="statement_timeout, s (0: none)")
    p.set_defaults(func=run)


def _add_doctor(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe doctor``: one OK/WARN/FAIL line per health check, with its SQL."""

    def run(args: argparse.Namespace) -> int:
        from . import doctor  # noqa: PLC0415

        report = doctor.run(_ops_dsn(args, "doctor"))
        print(report.to_json() if args.json else report.render(show_sql=not args.no_sql))
        return report.exit_code

    text = "check the database's health: vacuum, transactions, locks, leases, indexes, ..."
    p = sub.add_parser(
        "doctor",
        help=text,
        description=f"{text}. Exit 0: no check failed (warnings allowed); 1: a check failed.",
    )
    p.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN; required)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-sql", action="store_true", help="leave out the SQL of each check")
    p.set_defaults(func=run)


def _add_prune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe prune --older-than``: retention of done results and old rejects."""

    def run(args: argparse.Namespace) -> int:
        from .retention import parse_age, prune  # noqa: PLC0415

        age = parse_age(args.older_than)
        rejects = (
            None
            if args.rejects_older_than is None
            else parse_age(args.rejects_older_than, name="--rejects-older-than")
        )
        report = prune(
            _ops_dsn(args, "prune"),
            older_than=age,
            rejects_older_than=rejects,
            batch=args.batch,
            archive=args.archive,
        )
        print(report.render())
        return 0

    text = "delete (or --archive) done results rows and zen_rejects rows older than a cutoff"
    p = sub.add_parser("prune", help=text, description=text + ", in bounded batches.")
    p.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN; required)")
    p.add_argument("--older-than", required=True, help="age, e.g. 30d, 12h, 3600 (seconds)")
    p.add_argument("--rejects-older-than", default=None, help="age for zen_rejects (default: same)")
    p.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    p.add_argument("--archive", action="store_true", help="move the rows to zen_archive")
    p.set_defaults(func=run)


def _add_migrate_legacy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe migrate-legacy --from v1|v2``: the audit's old tables into zen_contacts."""

    def run(args: argparse.Namespace) -> int:
        from .legacy import migrate  # noqa: PLC0415

        report = migrate(_ops_dsn(args, "migrate-legacy"), args.source, batch=args.batch)
        print(report.render())
        return 0 if report.verified else 1

    text = "merge the V1 scraped_contacts or V2 scraped_contacts_v2 table into zen_contacts"
    p = sub.add_parser(
        "migrate-legacy",
        help=text,
        description=text + " through the upserter; resumable, idempotent, verified counts.",
    )
    p.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN; required)")
    p.add_argument("--from", dest="source", choices=("v1", "v2"), required=True)
    p.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    p.set_defaults(func=run)


def _add_roles(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe roles create``: zen_worker, zen_reader, zen_admin (NOLOGIN groups)."""

    def run(args: argparse.Namespace) -> int:
        from .roles import create_roles  # noqa: PLC0415

        created = create_roles(_ops_dsn(args, "roles create"))
        print(
            f"roles created: {', '.join(created) or 'none (all existed)'}; "
            "grants applied to zen_worker, zen_reader, zen_admin"
        )
        return 0

    p = sub.add_parser("roles", help="least-privilege group roles")
    roles_sub = p.add_subparsers(dest="roles_command", required=True)
    c = roles_sub.add_parser(
        "create", help="create zen_worker, zen_reader, zen_admin and apply their grants"
    )
    c.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN; required)")
    c.set_defaults(func=run)


def _cmd_demo(args: argparse.Namespace) -> int:
    """``zenpipe demo``: a small preset of ``zenpipe bench`` (no faults)."""
    from .bench import BenchConfig, run  # noqa: PLC0415  (spawns processes; only when asked)
    from .bench.report import LiveView, render  # noqa: PLC0415

    dsn = args.dsn or os.environ.get("ZENPIPE_DSN") or None
    config = BenchConfig(
        rows=args.rows, servers=args.servers, workers=args.workers, batch=args.batch
    )
    print(
        f"demo (zenpipe bench preset): {args.rows:,} raw rows, {args.servers} servers x "
        f"{args.workers} worker processes, batches of {args.batch}",
        file=sys.stderr,
    )
    with LiveView(quiet=args.json) as live:
        result = run(config, dsn=dsn, on_progress=live.update)
    report = result.report
    report["seeded"] = report["data"]
    report["errors"] = [f"{v.name}: {v.count} case(s)" for v in result.violations]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return 0 if result.ok else 1


def _affinity_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--affinity",
        type=int,
        default=PARTITION_AFFINITY,
        metavar="K",
        help=f"claim from a window of K x batch rows, partition by partition of zen_contacts "
        f"(cheaper merges; 0: plain priority-then-age order; default {PARTITION_AFFINITY})",
    )


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on synthetic scrapes and check its invariants",
        description="A small preset of zenpipe bench: seed raw rows, run servers x "
        "worker processes until every row is settled, check the invariants.",
    )
    p.add_argument(
        "--dsn", help="libpq connection string (default: $ZENPIPE_DSN, else a throwaway server)"
    )
    p.add_argument("--rows", type=int, default=5_000)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=3, help="worker processes per server")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_demo)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run  # noqa: PLC0415  (spawns processes; only when asked)
    from .bench.faults import RATE_KINDS  # noqa: PLC0415
    from .bench.report import LiveView, plot, render  # noqa: PLC0415

    dsn = args.dsn or os.environ.get("ZENPIPE_DSN") or None
    rates = {}
    for kind in RATE_KINDS:
        given = getattr(args, kind)
        rates[kind] = given if given is not None else (args.chaos or 0.0)
    if args.plot:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            print("zenpipe: error: --plot needs matplotlib: pip install 'zenpipe[plot]'",
                  file=sys.stderr)  # fmt: skip
            return 2
    restart_pg = args.restart_postgres or (bool(args.chaos) and dsn is None)
    if args.restart_postgres and dsn is not None:
        print("zenpipe: error: --restart-postgres needs the throwaway server (no --dsn)",
              file=sys.stderr)  # fmt: skip
        return 2
    crash = args.crash_rows if args.crash_rows is not None else (0.001 if args.chaos else 0.0)
    config = BenchConfig(
        rows=args.rows,
        servers=args.servers,
        workers=args.workers,
        batch=args.batch,
        affinity=args.affinity,
        lease=args.lease,
        max_attempts=args.max_attempts,
        seed=args.seed,
        latency=args.latency,
        fail_rate=args.fail_rate,
        poison_rate=args.poison_rate,
        bad_rate=args.bad_rate,
        crash_rate=crash,
        rates=rates,
        restart_postgres=restart_pg,
        timeout=args.timeout,
        keep=args.keep,
        compare=args.compare,
        compare_seconds=args.compare_seconds,
        floor_sessions=(os.cpu_count() or 1) if args.floor else 0,
        broken_merge=args.broken_merge,
    )
    where = "your server, in a database of its own" if dsn else "a throwaway PostgreSQL"
    print(
        f"bench: {config.rows:,} source rows, {config.servers} servers x {config.workers} "
        f"worker processes, batches of {config.batch}, on {where}",
        file=sys.stderr,
    )
    with LiveView(quiet=args.quiet) as live:
        result = run(config, dsn=dsn, on_progress=live.update)
    report = result.report
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    render(report)
    return 0 if result.ok else 1


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe bench``: the multi-server benchmark and chaos harness (docs/benchmarking.md)."""
    p = sub.add_parser(
        "bench",
        help="run servers x worker processes on generated scrapes, with faults; check "
        "every invariant",
        description="Load deterministic Google-Maps-like source rows, run --servers bench "
        "servers (each a supervisor of --workers worker processes) until every row is "
        "settled, inject the faults asked for, then check the invariants from the "
        "database (exit 1 naming any violated). Without --dsn it runs on a throwaway "
        "PostgreSQL; with --dsn or ZENPIPE_DSN it creates a database of its own, "
        "zenbench_<random>, on that server (the role needs CREATEDB) and drops it at the "
        "end: nothing else is touched. See docs/benchmarking.md.",
    )
    p.add_argument("--dsn", help="a server to run on, in a database of its own (default: "
                   "$ZENPIPE_DSN, else a throwaway PostgreSQL)")  # fmt: skip
    p.add_argument("--rows", type=int, default=10_000, help="source rows (default 10,000)")
    p.add_argument("--servers", type=int, default=10, help="bench servers (default 10)")
    p.add_argument("--workers", type=int, default=6,
                   help="worker processes per server (default 6)")  # fmt: skip
    p.add_argument("--batch", type=int, default=100, help="rows per claim (default 100)")
    _affinity_argument(p)
    p.add_argument("--lease", type=float, default=4.0, help="lease seconds (default 4)")
    p.add_argument("--max-attempts", type=int, default=5, help="claims before a row is parked")
    p.add_argument("--seed", type=int, default=11, help="data and chaos seed")
    p.add_argument("--latency", type=float, default=0.0,
                   help="mean enrichment seconds per row (default 0)")  # fmt: skip
    p.add_argument("--fail-rate", type=float, default=0.02,
                   help="rows whose enrichment fails once or twice, then succeeds")  # fmt: skip
    p.add_argument("--poison-rate", type=float, default=0.003,
                   help="rows whose enrichment always fails (parked)")  # fmt: skip
    p.add_argument(
        "--bad-rate",
        type=float,
        default=0.02,
        help="rows whose record the validator rejects (every reason at least once)",
    )
    g = p.add_argument_group("faults (RATE: faults per second; --chaos sets every one)")
    g.add_argument("--chaos", type=float, metavar="RATE",
                   help="every fault below at RATE, one PostgreSQL restart (throwaway "
                   "server) and crash rows (0.1%%) unless given on their own")  # fmt: skip
    for kind, text in (
        ("kill_workers", "SIGKILL a worker process"),
        ("kill_servers", "SIGKILL a whole server (supervisor and workers), then restart it"),
        ("stop_servers", "SIGSTOP a whole server for 1.5 leases"),
        ("terminate_backends", "pg_terminate_backend of up to 3 zenpipe backends"),
        ("drop_commit_acks", "lose a COMMIT's reply after it landed (TCP proxy)"),
        ("cut_before_commit", "cut a connection just before its COMMIT (TCP proxy)"),
    ):
        g.add_argument(f"--{kind.replace('_', '-')}", type=float, metavar="RATE", help=text)
    g.add_argument("--restart-postgres", action="store_true",
                   help="restart the throwaway PostgreSQL once mid-run (immediate)")  # fmt: skip
    g.add_argument("--crash-rows", type=float, metavar="FRACTION",
                   help="rows whose enrichment SIGKILLs its process (parked alone)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many s")
    p.add_argument("--compare", action="store_true",
                   help="also run the seed's advisory-lock loop and a FOR UPDATE SKIP LOCKED "
                   "loop (servers x workers processes, per-row UPSERT) on the same data, "
                   "each in a fresh database: ratios and their invariant violations")  # fmt: skip
    p.add_argument("--compare-seconds", type=float, default=600.0,
                   help="time cap of each --compare loop (default 600)")  # fmt: skip
    p.add_argument("--floor", action="store_true",
                   help="also run the crash-safe floor on the same data: the server alone "
                   "doing the least any pipeline with a committed lease per claim must do "
                   "(one session per CPU, the run's batch): how near the fleet gets")  # fmt: skip
    # test-only: after the run, drop an item of every merged array (a writer that
    # skipped the union): the invariant check must exit 1 naming arrays_are_unions
    p.add_argument("--broken-merge", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="PNG of throughput, connections and faults (zenpipe[plot])")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--keep", action="store_true",
                   help="keep the database, the server and the logs (debugging)")  # fmt: skip
    p.set_defaults(func=_cmd_bench)


def _add_worker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe worker MODULE:CALLABLE``: run one server of the fleet (see docs/runtime.md)."""

    def run(args: argparse.Namespace) -> int:
        # Spawns processes; only when asked (keeps `zenpipe --help` light).
        from .runtime import ProcessSpec, Supervisor  # noqa: PLC0415
        from .runtime.process import configure_logging  # noqa: PLC0415

        dsn = args.dsn or os.environ.get("ZENPIPE_DSN")
        if not dsn:
            raise ZenpipeError(
                "zenpipe worker needs your database: pass --dsn or set ZENPIPE_DSN "
                "(a throwaway server would have no rows to work on)"
            )
        configure_logging("")
        spec = ProcessSpec(
            index=0,
            target=args.target,
            batch_size=args.batch,
            lease_seconds=args.lease,
            max_attempts=args.max_attempts,
            idle_sleep=args.idle_sleep,
            concurrency=args.concurrency,
            partition_affinity=args.affinity,
            grace=args.grace,
        )
        return Supervisor(
            spec,
            dsn=dsn,
            processes=args.processes,
            max_restarts=args.max_restarts,
            restart_window=args.restart_window,
        ).run()

    text = "run one server of the fleet: N worker processes enriching with MODULE:CALLABLE"
    p = sub.add_parser(
        "worker",
        help=text,
        description=text + ". SIGTERM or Ctrl-C stops it gracefully; a second one at once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("target", metavar="MODULE:CALLABLE", help="enrich(claim) -> record or None")
    p.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN; required)")
    p.add_argument("--processes", type=int, default=1, help="worker processes")
    p.add_argument("--batch", type=int, default=100, help="rows per claim")
    _affinity_argument(p)
    p.add_argument("--lease", type=float, default=300.0, help="seconds a claim holds its rows")
    p.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="claims before a row is parked (None: the fleet-wide zen_settings.max_attempts)",
    )
    p.add_argument("--idle-sleep", type=float, default=1.0, help="seconds between empty claims")
    p.add_argument("--concurrency", type=int, default=1, help="rows enriched at once per process")
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds a stopping process may finish its batch before its rows are released",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="worker deaths tolerated within --restart-window before giving up",
    )
    p.add_argument("--restart-window", type=float, default=60.0, help="seconds (crash loop)")
    p.set_defaults(func=run)


def _add_load(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``zenpipe load FILE``: source rows into ``results`` (see docs/producing.md)."""

    def run(args: argparse.Namespace) -> int:
        from .produce import BadInputError, BadLine, load_file  # noqa: PLC0415

        if args.batch < 1:
            raise ZenpipeError(f"--batch must be at least 1, got {args.batch}")
        if not -32768 <= args.priority <= 32767:
            raise ZenpipeError(f"--priority must be in -32768..32767, got {args.priority}")
        dsn = args.dsn or os.environ.get("ZENPIPE_DSN")
        if not dsn:
            raise ZenpipeError(
                "zenpipe load needs your database: pass --dsn or set ZENPIPE_DSN "
                "(a throwaway server would drop the rows on exit)"
            )

        def on_bad(bad: BadLine) -> None:
            print(bad, file=sys.stderr)

        refused = False
        try:
            report = load_file(
                dsn,
                args.file,
                fmt=args.format,
                priority=args.priority,
                skip_existing=args.skip_existing,
                continue_on_error=args.continue_on_error,
                batch_size=args.batch,
                on_bad=on_bad,
            )
        except BadInputError as e:
            report, refused = e.report, True
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        elif refused:
            print(
                f"refused {args.file}: {report.bad} bad line{'' if report.bad == 1 else 's'}, "
                "nothing loaded (--continue-on-error loads the good lines)",
                file=sys.stderr,
            )
        else:
            print(
                f"loaded {report.loaded:,}, skipped {report.skipped:,}, bad {report.bad:,} "
                f"from {args.file} in {report.seconds:.2f} s ({report.rows_per_s:,.0f} rows/s)"
            )
        return 2 if refused else 1 if report.bad else 0

    text = "load source rows into results from a JSON Lines or CSV file ('-': stdin)"
    p = sub.add_parser(
        "load",
        help=text,
        description=f"{text}. Exit 0: every line loaded or skipped; 1: bad lines skipped "
        "under --continue-on-error; 2: file refused, nothing loaded. Bad lines go to "
        "stderr as FILE:LINE: reason.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="JSON Lines or CSV file, '-' for stdin")
    p.add_argument("--dsn", help="libpq connection string (default: $ZENPIPE_DSN; required)")
    p.add_argument(
        "--format",
        choices=("auto", "jsonl", "csv"),
        default="auto",
        help="auto: by suffix (.jsonl .ndjson .json .csv), else by the first byte",
    )
    p.add_argument(
        "--priority", type=int, default=0, help="priority of rows that give none (higher first)"
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave out links already pending or claimed, and repeats within the file",
    )
    p.add_argument("--batch", type=int, default=5000, help="rows per COPY batch")
    p.add_argument(
        "--continue-on-error",
        action="store_true",
        help="load the good lines and report the bad ones; without it one bad line refuses all",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zenpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_text: str,
    ) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--dsn", help="libpq connection string (default: $ZENPIPE_DSN, else a throwaway server)"
        )
        p.set_defaults(func=func)
        return p

    schema_p = sub.add_parser("schema", help="apply or inspect the schema migrations")
    schema_sub = schema_p.add_subparsers(dest="schema_command", required=True)
    apply_p = add(schema_sub, "apply", _cmd_schema_apply, "apply pending migrations")
    apply_p.add_argument(
        "--lock-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for another process's migration run",
    )
    apply_p.add_argument(
        "--citus",
        action="store_true",
        help="apply the Citus variant (sql/citus) too, and fail unless the database is a "
        "Citus coordinator (default: applied when one is detected); without --dsn, on a "
        "throwaway Citus cluster built from $ZENPIPE_CITUS_SOURCE",
    )
    add(schema_sub, "status", _cmd_schema_status, "list applied and pending migrations")
    # Further subcommands register here, one call each.
    _add_bench(sub)
    _add_demo(sub)
    _add_stats(sub)
    _add_requeue(sub)
    _add_settings(sub)
    _add_load(sub)
    _add_worker(sub)
    _add_refresh_dashboard(sub)
    _add_doctor(sub)
    _add_prune(sub)
    _add_migrate_legacy(sub)
    _add_roles(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a throwaway server is stopped and deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return int(args.func(args))
    except ZenpipeError as e:
        print(f"zenpipe: error: {e}", file=sys.stderr)
        return 2
    except psycopg.Error as e:
        print(f"zenpipe: database error: {str(e).strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
