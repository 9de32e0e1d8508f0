"""The supervisor of ``zenpipe worker``: N worker processes, restarted when they die,
stopped gracefully on SIGTERM or SIGINT.

Each worker process (`zenpipe.runtime.process`) is a fleet member of its own and runs
in a process group of its own, so a terminal's Ctrl-C reaches the supervisor only and
the supervisor alone decides how the fleet member stops:

- first SIGTERM or SIGINT: every worker process gets SIGTERM (no new claims; the batch
  in flight is finished, or its rows released when ``grace`` runs out); the supervisor
  waits ``grace`` + `KILL_MARGIN` seconds, then SIGKILLs the process groups still
  there (their claimed rows come back when their lease runs out: logged) and exits 0
  when every process stopped cleanly, 1 otherwise;
- a second signal: SIGKILL to every worker process group at once, exit 130.

A worker process that dies while not asked to stop is restarted after a backoff that
doubles from `BACKOFF_INITIAL` to `BACKOFF_MAX` seconds per process (reset when it had
run ``restart_window`` seconds); the exit code or the signal that killed it is logged.
More than ``max_restarts`` deaths within ``restart_window`` seconds is a crash loop:
the others are stopped gracefully and the supervisor exits 1 with the reason.  A
process that reports a configuration error (`EXIT_CONFIG`) is not restarted: the
supervisor stops and exits 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from types import FrameType

from ..errors import ConfigError
from .process import EXIT_CONFIG, EXIT_OK, ProcessSpec
from .target import resolve

__all__ = ["BACKOFF_INITIAL", "BACKOFF_MAX", "KILL_MARGIN", "Supervisor", "describe_exit"]

logger = logging.getLogger("zenpipe.runtime")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
#: Seconds past the grace the supervisor waits before SIGKILL: releasing rows and
#: closing a pool take a few round trips.
KILL_MARGIN = 5.0
_POLL = 0.1
_FIGURES = ("batches", "claimed", "written", "rejected", "failed", "stale_batches", "released")


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL`` for a `Popen.returncode`."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


@dataclass
class _Slot:
    """One of the N worker processes, across its restarts."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    runs: int = 0
    restart_at: float | None = None
    backoff: float = BACKOFF_INITIAL
    stats_path: str = ""


@dataclass
class _Totals:
    figures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_FIGURES, 0))
    restarts: int = 0

    def add(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                got = json.load(f)
            os.unlink(path)
        except (OSError, ValueError):
            return  # killed before it could report
        for key in _FIGURES:
            self.figures[key] += int(got.get(key, 0))


class Supervisor:
    """Runs *processes* worker processes of *spec* against *dsn* until stopped.

    `run` blocks until the server stopped and returns the exit code; it installs
    SIGTERM and SIGINT handlers in the calling (main) thread.  Raises `ConfigError`
    for sizes that make no sense and `zenpipe.errors.EnrichTargetError` when the target
    cannot be imported, before any process starts.
    """

    def __init__(
        self,
        spec: ProcessSpec,
        *,
        dsn: str,
        processes: int = 1,
        max_restarts: int = 5,
        restart_window: float = 60.0,
    ) -> None:
        checks = [
            (processes >= 1, f"--processes must be at least 1, got {processes}"),
            (spec.batch_size >= 1, f"--batch must be at least 1, got {spec.batch_size}"),
            (spec.lease_seconds > 0, f"--lease must be positive, got {spec.lease_seconds}"),
            (spec.grace >= 0, f"--grace must not be negative, got {spec.grace}"),
            (spec.concurrency >= 1, f"--concurrency must be at least 1, got {spec.concurrency}"),
            (
                spec.partition_affinity >= 0,
                f"--affinity must be 0 (off) or more, got {spec.partition_affinity}",
            ),
            (
                spec.max_attempts is None or spec.max_attempts >= 1,
                f"--max-attempts must be at least 1, got {spec.max_attempts}",
            ),
            (max_restarts >= 0, f"--max-restarts must not be negative, got {max_restarts}"),
            (restart_window > 0, f"--restart-window must be positive, got {restart_window}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if not dsn:
            raise ConfigError("a worker needs a database: pass --dsn or set ZENPIPE_DSN")
        self.spec = spec
        self.dsn = dsn
        self.processes = processes
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._slots = [_Slot(i) for i in range(processes)]
        self._deaths: deque[float] = deque()
        self._signals = 0
        self._last_signal = ""
        self._wake = threading.Event()
        self._stopping = False
        self._kill_at = 0.0
        self._code = EXIT_OK
        self._totals = _Totals()

    # -- signals ----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self._last_signal = signal.Signals(signum).name
        self._wake.set()

    # -- processes --------------------------------------------------------------------

    def _spawn(self, slot: _Slot, folder: str) -> None:
        slot.runs += 1
        slot.stats_path = os.path.join(folder, f"{slot.index}-{slot.runs}.json")
        spec = replace(
            self.spec, index=slot.index, supervisor_pid=os.getpid(), stats_path=slot.stats_path
        )
        env = dict(os.environ, ZENPIPE_DSN=self.dsn)
        # A group of its own: a terminal's Ctrl-C reaches the supervisor, which decides.
        slot.proc = subprocess.Popen(
            spec.argv(), env=env, stdin=subprocess.DEVNULL, process_group=0
        )
        slot.started = time.monotonic()
        slot.restart_at = None

    def _alive(self) -> list[_Slot]:
        return [s for s in self._slots if s.proc is not None]

    def _kill(self, slot: _Slot) -> None:
        assert slot.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(slot.proc.pid, signal.SIGKILL)
        slot.proc.wait()

    def _begin_stop(self, why: str, code: int | None = None) -> None:
        if code is not None:
            self._code = code
        if self._stopping:
            return
        self._stopping = True
        self._kill_at = time.monotonic() + self.spec.grace + KILL_MARGIN
        alive = self._alive()
        logger.info(
            "%s: stopping %d worker process(es) (grace %.0f s)", why, len(alive), self.spec.grace
        )
        for slot in self._slots:
            slot.restart_at = None
        for slot in alive:
            assert slot.proc is not None
            if slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)

    def _reap(self, now: float) -> None:
        for slot in self._slots:
            proc = slot.proc
            if proc is None or proc.poll() is None:
                continue
            slot.proc = None
            rc = proc.returncode
            self._totals.add(slot.stats_path)
            lived = now - slot.started
            if self._stopping:
                if rc not in (EXIT_OK, -signal.SIGTERM):
                    logger.warning("worker %d (pid %d) %s", slot.index, proc.pid, describe_exit(rc))
                    self._code = self._code or 1
                continue
            reason = f"worker {slot.index} (pid {proc.pid}) {describe_exit(rc)} after {lived:.1f} s"
            if rc == EXIT_CONFIG:
                logger.error("%s: a configuration error (see above), not restarting", reason)
                self._begin_stop("configuration error", 2)
                continue
            self._deaths.append(now)
            while self._deaths and self._deaths[0] < now - self.restart_window:
                self._deaths.popleft()
            if len(self._deaths) > self.max_restarts:
                logger.error(
                    "%s: crash loop, %d deaths within %.0f s (--max-restarts %d); giving up",
                    reason,
                    len(self._deaths),
                    self.restart_window,
                    self.max_restarts,
                )
                self._begin_stop("crash loop", 1)
                continue
            if lived >= self.restart_window:
                slot.backoff = BACKOFF_INITIAL
            slot.restart_at = now + slot.backoff
            logger.warning("%s; restarting in %.1f s", reason, slot.backoff)
            slot.backoff = min(slot.backoff * 2, BACKOFF_MAX)
            self._totals.restarts += 1

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Start the processes and supervise them until stopped; return the exit code:
        0 stopped cleanly, 1 a crash loop or a process that had to be killed, 2 a
        configuration error, 130 a second signal."""
        resolve(self.spec.target)  # a clear error now rather than N crashing processes
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        folder = tempfile.mkdtemp(prefix="zenpipe-worker-")
        try:
            return self._supervise(folder)
        finally:
            for slot in self._alive():
                self._kill(slot)
            shutil.rmtree(folder, ignore_errors=True)

    def _supervise(self, folder: str) -> int:
        for slot in self._slots:
            self._spawn(slot, folder)
        logger.info(
            "supervising %d worker process(es) of %s (pids %s); SIGTERM or Ctrl-C stops them",
            self.processes,
            self.spec.target,
            ", ".join(str(s.proc.pid) for s in self._slots if s.proc is not None),
        )
        while True:
            self._wake.wait(_POLL)
            self._wake.clear()
            now = time.monotonic()
            if self._signals >= 2:
                return self._abort()
            if self._signals == 1 and not self._stopping:
                self._begin_stop(f"{self._last_signal} received")
            self._reap(now)
            if self._stopping:
                if not self._alive():
                    break
                if now >= self._kill_at:
                    self._kill_stragglers()
                continue
            for slot in self._slots:
                if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot, folder)
        self._log_totals()
        return self._code

    def _kill_stragglers(self) -> None:
        for slot in self._alive():
            assert slot.proc is not None
            logger.error(
                "worker %d (pid %d) still running %.0f s after the stop: killed; its claimed "
                "rows come back when their lease runs out (at most %.0f s)",
                slot.index,
                slot.proc.pid,
                self.spec.grace + KILL_MARGIN,
                self.spec.lease_seconds,
            )
            self._kill(slot)
            slot.proc = None
        self._code = self._code or 1

    def _abort(self) -> int:
        alive = self._alive()
        for slot in alive:
            self._kill(slot)
            slot.proc = None
        logger.warning(
            "second signal: killed %d worker process(es); rows they held come back when "
            "their lease runs out (at most %.0f s)",
            len(alive),
            self.spec.lease_seconds,
        )
        return 130

    def _log_totals(self) -> None:
        t = self._totals.figures
        logger.info(
            "stopped: %d process(es), %d restart(s); %d batches, %d rows claimed, %d written, "
            "%d rejected, %d failed; released %d",
            self.processes,
            self._totals.restarts,
            t["batches"],
            t["claimed"],
            t["written"],
            t["rejected"],
            t["failed"],
            t["released"],
        )
