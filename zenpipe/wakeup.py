"""Wake-ups: idle workers wait for new rows instead of polling for them.

Producers send ``NOTIFY zen_results`` in the transaction that inserts rows
(`zenpipe.produce.NOTIFY_CHANNEL`).  A `Waker` holds one dedicated connection per
process that LISTENs on that channel (outside the pool's data connections, counted in
the fleet budget as one of the server's dedicated connections) and wakes every idle
worker of the process when a notification arrives.  Idle workers still poll, with a
growing interval, so rows that arrive without a notification (a producer of another
tool, a retry whose backoff ran out, a lease that expired) are found too.

Behind PgBouncer in transaction mode LISTEN cannot work (the session is not ours), so
no Waker is made there and workers poll only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["Waker"]

logger = logging.getLogger("zenpipe.wakeup")

#: The channel producers notify (`zenpipe.produce.NOTIFY_CHANNEL`; kept equal by a test).
CHANNEL = "zen_results"


class Waker:
    """Wakes the idle workers of one process when rows arrive.

    *conninfo* and *connect_kwargs* make the listening connection (autocommit, no
    prepared statements).  A daemon thread waits for notifications on it and bumps a
    generation counter; `wait` returns early when the counter moves.  The thread
    reconnects with backoff after a lost connection (``listening`` is False
    meanwhile, and workers fall back to polling).  Wake-ups are throttled: at most one
    per *throttle* seconds however many notifications arrive (a busy producer sends one
    per transaction).  `close` stops the thread and closes the connection.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        channel: str = CHANNEL,
        throttle: float = 0.05,
        connect_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.throttle = throttle
        self._kwargs = dict(connect_kwargs or {})
        self._kwargs.pop("options", None)  # no session timeouts on an idle listener
        self._kwargs.update(autocommit=True, prepare_threshold=None)
        self._cond = threading.Condition()
        self._generation = 0
        self._closed = threading.Event()
        #: Notifications received, and wake-ups delivered (fewer: throttled).
        self.notifications = 0
        self.wakeups = 0
        self.listening = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zenpipe-waker", daemon=True)

    def start(self, *, timeout: float = 10.0) -> Waker:
        """Start listening; wait up to *timeout* seconds for the first LISTEN (a server
        that cannot be reached only means polling until it can)."""
        self._thread.start()
        self._ready.wait(timeout)
        return self

    def close(self) -> None:
        """Stop listening, wake every waiter, close the connection."""
        self._closed.set()  # the thread's notifies() wait ends within 0.2 s (no query)
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.wake()

    def __enter__(self) -> Waker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wake(self) -> None:
        """Wake every waiter now (thread-safe; also used to stop them)."""
        with self._cond:
            self._generation += 1
            self.wakeups += 1
            self._cond.notify_all()

    def generation(self) -> int:
        """The current wake-up count, to pass to `wait`."""
        with self._cond:
            return self._generation

    def wait(self, timeout: float, since: int | None = None) -> bool:
        """Block up to *timeout* seconds for a wake-up after generation *since*
        (default: now); return True when woken, False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            start = self._generation if since is None else since
            while self._generation == start:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _run(self) -> None:
        backoff = 0.5
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.conninfo, **self._kwargs) as conn:
                    conn.execute(listen)
                    self.listening = True
                    self._ready.set()
                    backoff = 0.5
                    last = 0.0
                    while not self._closed.is_set():
                        got = False
                        for _ in conn.notifies(timeout=0.2):
                            self.notifications += 1
                            got = True
                            break  # one wake-up per burst: the rest are read below
                        if not got:
                            continue
                        wait = self.throttle - (time.monotonic() - last)
                        if wait > 0 and self._closed.wait(wait):
                            break
                        last = time.monotonic()
                        self.wake()
            except psycopg.Error as e:
                if self._closed.is_set():
                    break
                logger.warning("LISTEN %s lost (%s): polling until it is back", self.channel, e)
            finally:
                self.listening = False
            self._ready.set()
            if self._closed.wait(backoff):
                break
            backoff = min(backoff * 2, 30.0)
