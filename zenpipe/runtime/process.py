"""One worker process of ``zenpipe worker``: a fleet member running one `Worker`.

The supervisor starts it as ``python -m zenpipe.runtime SPEC`` (*SPEC* the JSON
of a `ProcessSpec`; the DSN comes in ``ZENPIPE_DSN``, never on the command line where
``ps`` shows it).  The process builds its own `zenpipe.ZenPool` from
`zenpipe.Settings.from_env` (registered in the fleet under its own instance id), runs
`Worker.run` in a thread, and waits for a stop:

- SIGTERM or SIGINT (the supervisor sends SIGTERM; later signals are ignored, the
  supervisor decides when to kill), or the supervisor gone (the parent pid changed):
  no new claims; the batch in flight is finished if it can be within *grace* seconds
  of the signal, else its rows still held are given back with `Claimer.release` (no
  attempt spent: they are claimable again at once) and the process exits anyway;
- the worker thread raising: logged with its traceback, exit `EXIT_CRASH` (the
  supervisor restarts the process).

On its way out it logs one line with its figures and writes them as JSON to the
spec's *stats_path* for the supervisor's totals.  Exit codes: `EXIT_OK` (stopped,
nothing left claimed by it), `EXIT_CRASH`, `EXIT_CONFIG` (the target or the settings
are wrong: restarting cannot help).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

import psycopg

from ..config import Settings
from ..errors import ConfigError, ZenpipeError
from ..pool import ZenPool
from ..worker import PARTITION_AFFINITY, Enrich, Worker
from .target import resolve

__all__ = ["EXIT_CONFIG", "EXIT_CRASH", "EXIT_OK", "ProcessSpec", "main", "run_process"]

logger = logging.getLogger("zenpipe.runtime")

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 3

#: Pool size of a worker process unless ZENPIPE_POOL_MAX says otherwise: the worker's
#: thread, its lease keeper, and one spare.
DEFAULT_POOL_MAX = 3


@dataclass(frozen=True)
class ProcessSpec:
    """What one worker process runs; the supervisor's side of the command line."""

    index: int
    target: str
    batch_size: int = 100
    lease_seconds: float = 300.0
    #: None: the fleet-wide ``zen_settings.max_attempts`` decides.
    max_attempts: int | None = None
    idle_sleep: float = 1.0
    concurrency: int = 1
    #: `Claimer` partition_affinity of the process's Worker (0: plain order).
    partition_affinity: int = PARTITION_AFFINITY
    grace: float = 30.0
    #: The process exits (gracefully) when its parent pid is no longer this one.
    supervisor_pid: int = 0
    stats_path: str | None = None
    #: ``MODULE:CALLABLE`` of a `zenpipe.events.BatchEvent` handler passed to the
    #: `Worker` as ``on_event`` (harnesses: ``zenpipe bench``); None: no handler.
    on_event: str | None = None

    def argv(self) -> list[str]:
        """The command line that starts the process."""
        return [sys.executable, "-m", "zenpipe.runtime", json.dumps(asdict(self))]

    @classmethod
    def from_json(cls, text: str) -> ProcessSpec:
        return cls(**json.loads(text))


class _StopSignal:
    """The first SIGTERM or SIGINT sets *event* and records when; later ones are
    ignored (the supervisor escalates with SIGKILL when it decides to)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at: float | None = None
        self.reason = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.set(signal.Signals(signum).name)

    def set(self, reason: str) -> None:
        if self.at is None:
            self.at = time.monotonic()
            self.reason = reason
        self.event.set()


def _settings(spec: ProcessSpec) -> Settings:
    """`Settings.from_env` with a worker process's own pool size and server id."""
    overrides: dict[str, Any] = {}
    if "ZENPIPE_POOL_MAX" not in os.environ:
        overrides["pool_max"] = DEFAULT_POOL_MAX
    if "ZENPIPE_POOL_MIN" not in os.environ:
        overrides["pool_min"] = 1
    settings = Settings.from_env(**overrides)
    if settings.server_id:  # one id for the server: each process gets its own row
        settings = settings.replace(server_id=f"{settings.server_id}:p{spec.index}")
    return settings


def _worker_kwargs(spec: ProcessSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "name": f"p{spec.index}",
        "batch_size": spec.batch_size,
        "lease_seconds": spec.lease_seconds,
        "max_attempts": spec.max_attempts,
        "idle_sleep": spec.idle_sleep,
    }
    kwargs["concurrency"] = spec.concurrency
    kwargs["partition_affinity"] = spec.partition_affinity
    if spec.on_event:
        kwargs["on_event"] = resolve(spec.on_event)
    return kwargs


def run_process(spec: ProcessSpec, enrich: Enrich, settings: Settings, stop: _StopSignal) -> int:
    """Run the worker until *stop* is set or its thread fails; return the exit code."""
    if stop.event.is_set():
        return EXIT_OK
    try:
        pool = ZenPool(settings, fleet=True)
    except ConfigError as e:
        logger.error("%s", e)
        return EXIT_CONFIG
    except (ZenpipeError, psycopg.Error) as e:  # budget full, id in use, no server
        logger.error("cannot join the fleet: %s", str(e).strip())
        return EXIT_CRASH
    try:
        worker = Worker(pool, enrich, server_id=pool.server_id, **_worker_kwargs(spec))
    except ZenpipeError as e:  # the on_event target does not resolve
        pool.close()
        logger.error("%s", e)
        return EXIT_CONFIG
    except ValueError as e:  # sizes the worker refuses: restarting cannot help
        pool.close()
        logger.error("%s", e)
        return EXIT_CONFIG
    owner = worker.claimer.owner
    outcome: dict[str, BaseException] = {}

    def body() -> None:
        try:
            worker.run(stop.event)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=body, name=f"zenpipe-worker-p{spec.index}", daemon=True)
    thread.start()
    logger.info("worker %d started: %s as %s", spec.index, spec.target, owner)
    while thread.is_alive() and not stop.event.wait(0.5):
        if spec.supervisor_pid and os.getppid() != spec.supervisor_pid:
            stop.set("supervisor gone")
    if stop.at is not None:
        logger.info(
            "worker %d stopping (%s): no new claims, %.0f s to finish the batch in flight",
            spec.index,
            stop.reason,
            spec.grace,
        )
        thread.join(max(0.0, stop.at + spec.grace - time.monotonic()))
    released = 0
    aborted = thread.is_alive()
    if aborted:  # the grace ran out while enriching: give the rows back, leave
        released = worker.abort(release_in_flight=True, wait=settings.statement_timeout)
        logger.warning(
            "worker %d: grace of %.0f s ran out with a batch in flight: "
            "released %d rows (no attempt spent)",
            spec.index,
            spec.grace,
            released,
        )
        pool.close(timeout=1.0)  # not worker.close(): it would wait for the enrichment
    else:
        worker.close()
        pool.close()
    code = EXIT_OK
    error = outcome.get("error")
    if error is not None and not aborted:
        logger.error("worker %d failed", spec.index, exc_info=error)
        code = EXIT_CRASH
    _report(spec, worker)
    if aborted:  # the enrichment thread may never return: do not wait for it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _report(spec: ProcessSpec, worker: Worker) -> None:
    figures = dataclasses.asdict(worker.stats)  # abort() counted *released* in them
    logger.info(
        "worker %d stopped: %d batches, %d rows claimed, %d written, %d rejected, "
        "%d failed, %d stale batches; released %d",
        spec.index,
        figures["batches"],
        figures["claimed"],
        figures["written"],
        figures["rejected"],
        figures["failed"],
        figures["stale_batches"],
        figures["released"],
    )
    if spec.stats_path:
        try:
            with open(spec.stats_path, "w", encoding="utf-8") as f:
                json.dump(figures, f)
        except OSError as e:
            logger.warning("could not write %s: %s", spec.stats_path, e)


def configure_logging(prefix: str) -> None:
    """One line per event on stderr; psycopg's own loggers only from WARNING."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
    )
    logging.getLogger("psycopg").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m zenpipe.runtime SPEC`` (see ``__main__.py``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    stop = _StopSignal()
    stop.install()
    spec = ProcessSpec.from_json(args[0])
    configure_logging(f"[worker {spec.index} pid {os.getpid()}] ")
    try:
        enrich = resolve(spec.target)
        settings = _settings(spec)
    except ZenpipeError as e:
        logger.error("%s", e)
        return EXIT_CONFIG
    return run_process(spec, enrich, settings, stop)
