"""Process helpers shared by the throwaway server and the fleet registry."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import weakref

__all__ = ["Watchdog", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The watchdog's whole program.  It holds a pidfd of its target (so a recycled pid is never
# hit), ignores the signals a terminal or a supervisor sends to the whole process group, and
# blocks on its stdin: the read end of a pipe whose only write end lives in the owning
# process.  b"d" on the pipe disarms it (a clean stop); end of file without it means the
# owner is gone, however it died (SIGKILL included): signal the target, give it *grace*
# seconds, then SIGKILL.
_WATCHDOG_PROGRAM = r"""
import os, select, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(s, signal.SIG_IGN)
pid, sig, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
try:
    pidfd = os.pidfd_open(pid)
except ProcessLookupError:
    sys.exit(0)
except (AttributeError, OSError):
    pidfd = None
while True:
    chunk = os.read(0, 64)
    if b"d" in chunk:
        sys.exit(0)
    if not chunk:
        break
def send(s):
    try:
        if pidfd is None:
            os.kill(pid, s)
        else:
            signal.pidfd_send_signal(pidfd, s)
    except (ProcessLookupError, PermissionError):
        sys.exit(0)
send(sig)
if pidfd is not None:
    if not select.select([pidfd], [], [], grace)[0]:
        send(signal.SIGKILL)
else:
    import time
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.1)
    send(signal.SIGKILL)
"""

_armed: weakref.WeakSet[Watchdog] = weakref.WeakSet()


class Watchdog:
    """Signal process *pid* when this process exits, however it exits.

    Starts a small helper process that waits on a pipe whose only write end this process
    holds.  When the pipe closes without `disarm()` (normal exit, an exception, SIGKILL
    of this process) the helper sends *sig* to *pid*, then SIGKILL after *grace* seconds.
    Unlike ``prctl(PR_SET_PDEATHSIG)`` it follows the process, not the thread that forked
    *pid*, and it needs no ``preexec_fn``.  The write end is not inherited by spawned
    programs and is closed in children forked from this process, so no child keeps *pid*
    alive after this process died.  Linux and other POSIX systems; raises `OSError` when
    the helper cannot start.
    """

    def __init__(self, pid: int, sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
        read_end, write_end = os.pipe()  # both ends non-inheritable (PEP 446)
        try:
            self._helper: subprocess.Popen[bytes] | None = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _WATCHDOG_PROGRAM,
                    str(pid),
                    str(sig),
                    str(grace),
                ],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._fd: int | None = write_end
        self.pid = pid
        _armed.add(self)

    def disarm(self) -> None:
        """Let the helper exit without signalling anything; idempotent, waits for it."""
        fd, self._fd = self._fd, None
        helper, self._helper = self._helper, None
        _armed.discard(self)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, b"d")
            os.close(fd)
        if helper is not None:
            try:
                helper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait(timeout=30)

    def _forget_in_child(self) -> None:
        # A forked child must not hold the pipe open (the server would outlive us while the
        # child lives) nor reap a helper that is not its own.
        fd, self._fd = self._fd, None
        self._helper = None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _after_fork_in_child() -> None:  # pragma: no cover - runs in forked children
    for watchdog in list(_armed):
        watchdog._forget_in_child()
    _armed.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
