"""A bounded connection pool that shares PostgreSQL's connections with the whole fleet.

`ZenPool` is a `psycopg_pool.ConnectionPool` (code that takes a ConnectionPool takes a
ZenPool) with zenpipe's rules on top:

- bounded: a caller waits at most ``pool_timeout`` seconds (then `PoolTimeoutError`) and
  at most ``max_waiting`` callers wait at once (then `PoolQueueFullError`); both say
  which limit was hit and the pool's figures at that moment;
- fleet budget: before opening, the server registers in ``zen_servers`` and takes its
  pool size from what the live servers leave of ``max_connections`` (`Budget`); a
  background thread heartbeats and reports metrics; a dead server's share comes back
  when its lease runs out;
- resilient: connections are checked before use, replaced after ``max_lifetime`` and
  when idle above ``pool_min`` for ``max_idle``; each connection carries
  ``statement_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout``;
- PgBouncer transaction mode (flag, or a probe that cannot mistake a port-forward for
  a bouncer): no prepared statements, no session state; the timeouts are set per
  transaction instead.

`guarded_pool` builds the same guarded pool for code that is handed a DSN (one
connection policy: the timeouts and the PgBouncer handling of `ZenPool`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from . import __version__
from ._process import pid_alive
from .config import Settings, redacted_dsn
from .errors import (
    FleetBudgetExceeded,
    PoolQueueFullError,
    PoolTimeoutError,
    ServerIdInUse,
    is_transient,
)
from .locks import NAMESPACE_FLEET
from .queries import load
from .wakeup import Waker

__all__ = [
    "CONTROL_CONNECTIONS",
    "Budget",
    "FleetMember",
    "FleetStatus",
    "PoolMetrics",
    "ZenPool",
    "bare_connection",
    "connect_kwargs",
    "detect_pgbouncer",
    "fleet_status",
    "guarded_pool",
    "local_timeouts",
]

logger = logging.getLogger("zenpipe.pool")

#: The statement and parameters that set a pool's timeouts for one transaction
#: (`local_timeouts`).
Timeouts = tuple[sql.SQL, tuple[str, str, str]]

_FLEET_KEY = 1
#: Connections a server holds besides its pool: the control connection that registers
#: and heartbeats (never taken from the pool, so a saturated pool cannot stop heartbeats).
CONTROL_CONNECTIONS = 1
#: Expired rows are deleted this long after their lease ended.
_PURGE_AFTER_S = 3600.0
#: Rows one purge statement deletes at most, and statements one registration runs at most.
_PURGE_BATCH = 500
_PURGE_ROUNDS = 20

Conn = psycopg.Connection[TupleRow]


# -- connection parameters -----------------------------------------------------------


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000))


def connect_kwargs(
    settings: Settings,
    *,
    pgbouncer: bool,
    server_id: str,
    application_name: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `psycopg.Connection.connect` for a pooled connection.

    Direct connections get the three timeouts as startup ``options`` (set before the
    first query, kept for the session, no extra round trip).  Behind PgBouncer the
    startup ``options`` are refused, or dropped when listed in
    ``ignore_startup_parameters``, and server connections are shared, so there the
    timeouts are set per transaction (`ZenPool.connection`) and prepared statements are
    off (``prepare_threshold=None``): another client's server connection does not know
    ours.  *application_name* defaults to ``zenpipe:<server_id>``.
    """
    kwargs: dict[str, Any] = {
        # PgBouncer forwards application_name, so pg_stat_activity names the server.
        "application_name": (application_name or f"zenpipe:{server_id}")[:63],
        "connect_timeout": max(1, round(settings.connect_timeout)),
    }
    if pgbouncer:
        kwargs["prepare_threshold"] = None
    else:
        # The DSN's own options come last, so a setting the user chose there wins; the
        # keyword would otherwise replace them entirely.
        own = conninfo_to_dict(settings.dsn).get("options") if settings.dsn else None
        kwargs["options"] = (
            f"-c statement_timeout={_ms(settings.statement_timeout)}"
            f" -c lock_timeout={_ms(settings.lock_timeout)}"
            f" -c idle_in_transaction_session_timeout={_ms(settings.idle_in_tx_timeout)}"
            + (f" {own}" if own else "")
        )
    return kwargs


def detect_pgbouncer(conn: psycopg.Connection[Any]) -> bool:
    """Whether *conn* reaches PostgreSQL through a pooler such as PgBouncer.

    One query, no session state read or left: a direct connection's startup message
    (BackendKeyData) carries the pid of its backend, which ``pg_backend_pid()`` reports
    too.  PgBouncer, in any pool mode, gives each client a random cancel key of its own
    (so does every pooler that multiplexes clients onto server connections): the two
    differ.  A transparent TCP proxy or port-forward (Docker's ``-p 5433:5432``, a load
    balancer) passes the backend's key through and is rightly seen as direct, whatever
    its port; a PgBouncer on port 5432 is seen as a PgBouncer.

    Returns True (the safe answer: no prepared statements, per-transaction timeouts)
    when the probe cannot tell: libpq reports no backend pid, or the query fails.  Set
    ``ZENPIPE_PGBOUNCER=on|off`` to decide instead of probing.
    """
    reported = conn.info.backend_pid
    if not reported:
        return True
    try:
        row = conn.execute(load("pool")["backend_pid"]).fetchone()
    except psycopg.Error as e:
        logger.warning("PgBouncer probe failed (%s): assuming a pooler", e)
        return True
    return row is None or int(row[0]) != int(reported)


def check_connection(conn: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection before it hands it out, without a round trip
    when nothing came in: an idle connection has nothing to read, and a backend that
    was terminated (``pg_terminate_backend``, a server shutdown or restart) has sent its
    FATAL error and closed the socket, which makes it readable.  Only then is the
    connection checked with a query (psycopg_pool's `check_connection`), which raises
    for a dead one (the pool discards it and tries another); anything else readable (a
    notification) passes that query.  Does not block.  A peer that vanished without a
    word (a cut network) is found at first use instead, as it would be a moment after
    any check; the claim and the write retry such errors on another connection.
    """
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLPRI)
    if poller.poll(0):
        psycopg_pool.ConnectionPool.check_connection(conn)


def _probe_pgbouncer(settings: Settings) -> bool:
    """`detect_pgbouncer` on a connection of its own; True (safe) when none can be made."""
    try:
        with psycopg.connect(
            settings.dsn,
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=max(1, round(settings.connect_timeout)),
        ) as probe:
            return detect_pgbouncer(probe)
    except psycopg.OperationalError as e:
        logger.warning(
            "PgBouncer probe could not connect to %s (%s): assuming a pooler "
            "(set ZENPIPE_PGBOUNCER=off for a direct connection)",
            redacted_dsn(settings.dsn),
            e,
        )
        return True


# -- the fleet budget ----------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """The arithmetic of the fleet's connection budget.

    ``total`` = ``max_connections`` - ``superuser_reserved_connections`` -
    ``reserved_connections`` (PostgreSQL 16+) - zenpipe's own reserve, unless a fixed
    ``fleet_budget`` is configured.  Connections of other applications are not counted:
    the reserve is there for them (admin, migrations, monitoring).
    """

    max_connections: int
    superuser_reserved: int
    pg_reserved: int
    reserve: int
    fixed: int | None = None

    @property
    def total(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return self.max_connections - self.superuser_reserved - self.pg_reserved - self.reserve

    def explain(self) -> str:
        if self.fixed is not None:
            return f"fleet budget {self.fixed} (fixed by fleet_budget)"
        return (
            f"fleet budget {self.total} = max_connections {self.max_connections}"
            f" - superuser_reserved_connections {self.superuser_reserved}"
            + (f" - reserved_connections {self.pg_reserved}" if self.pg_reserved else "")
            + f" - zenpipe reserve {self.reserve}"
        )

    def grant(
        self,
        *,
        pool_max: int,
        pool_floor: int,
        in_use: int,
        live_servers: int,
        dedicated: int = CONTROL_CONNECTIONS,
    ) -> int:
        """The pool size a new server gets: ``min(pool_max, left - dedicated)``, where
        *dedicated* counts the connections it holds besides its pool (control, and the
        listener when it listens).

        Raises `FleetBudgetExceeded` with the arithmetic when that is below
        *pool_floor* (or below *pool_max* when *pool_floor* is 0), or below 1.
        """
        left = self.total - in_use
        granted = min(pool_max, left - dedicated)
        floor = max(1, pool_floor or pool_max)
        if granted < floor:
            raise FleetBudgetExceeded(
                f"{self.explain()}; {live_servers} live server(s) hold {in_use}, "
                f"{max(left, 0)} left; this server needs {CONTROL_CONNECTIONS} control + "
                + ("1 listener + " if dedicated > CONTROL_CONNECTIONS else "")
                + f"{floor} pool connection(s) (pool_max {pool_max}, pool_floor {pool_floor}): "
                "not starting, so as not to push PostgreSQL over max_connections "
                "(set ZENPIPE_POOL_FLOOR to start with a smaller pool)",
                budget=self.total,
                in_use=in_use,
                needed=dedicated + floor,
            )
        return granted


class FleetMember:
    """This process's row in ``zen_servers``: registration, heartbeats, departure.

    Holds one control connection of its own (counted in the budget), so heartbeats go
    on when every pooled connection is busy.  `register` blocks on the fleet lock while
    another server registers and retries transient errors (a restarting server, "too
    many clients") for at most ``pool_timeout`` seconds.  The heartbeat thread is a
    daemon; `stop` ends it and deletes the row.

    A row is ours only when it carries our *instance_id* (a random UUID per member):
    host and pid do not tell two containers on one hostname apart.  When a heartbeat
    finds our row expired (evicted: a stall longer than the lease), *on_evict* is called
    first (the pool drops to its floor), then the member registers again; while that is
    refused, every heartbeat tries again and the pool stays at its floor.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        server_id: str,
        stats: Callable[[], dict[str, Any]] = dict,
        on_resize: Callable[[int], None] | None = None,
        on_evict: Callable[[int], None] | None = None,
        instance_id: uuid.UUID | None = None,
        listen: bool | None = False,
    ) -> None:
        self.settings = settings
        #: Whether this server holds a listening connection (None: unless PgBouncer).
        self.listen = listen
        self.server_id = server_id
        self.instance_id = instance_id or uuid.uuid4()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pool_size = 0
        self.budget: Budget | None = None
        self.pgbouncer: bool | None = settings.pgbouncer
        self.heartbeats = 0
        self.heartbeat_errors = 0
        self.evictions = 0
        self.evicted = False
        self._stats = stats
        self._on_resize = on_resize
        self._on_evict = on_evict
        self._conn: Conn | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lease(self) -> float:
        """Seconds a heartbeat keeps the row live."""
        return self.settings.heartbeat_interval * self.settings.heartbeat_misses

    def _control(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                with suppress(Exception):
                    self._conn.close()
            # No startup options (a PgBouncer may refuse them) and no prepared
            # statements: this connection may be the autodetection probe.
            self._conn = psycopg.connect(
                self.settings.dsn,
                autocommit=True,
                prepare_threshold=None,
                application_name=f"zenpipe-ctl:{self.server_id}"[:63],
                connect_timeout=max(1, round(self.settings.connect_timeout)),
            )
            if self.pgbouncer is None:
                self.pgbouncer = detect_pgbouncer(self._conn)
        return self._conn

    @property
    def listening(self) -> bool:
        """Whether this server holds a LISTEN connection: asked for, or by default
        unless it reaches the database through PgBouncer (LISTEN needs a session)."""
        if self.listen is not None:
            return self.listen
        return self.pgbouncer is False

    @property
    def dedicated(self) -> int:
        """Connections this server holds besides its pool, counted in the budget."""
        return CONTROL_CONNECTIONS + (1 if self.listening else 0)

    @property
    def floor(self) -> int:
        """The pool size this member drops to while its row is expired."""
        return max(1, self.settings.pool_floor)

    def _retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception(
                lambda e: is_transient(e) and not isinstance(e, FleetBudgetExceeded)
            ),
            stop=stop_after_delay(self.settings.pool_timeout),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )

    def register(self, *, pool_max: int, pool_floor: int) -> int:
        """Take a share of the budget and insert (or refresh) our row; return the size.

        Raises `FleetBudgetExceeded` when the share would be below the floor and
        `ServerIdInUse` when another live process (another instance) holds our server
        id.  Once registered, deletes rows expired for an hour, outside the fleet lock.
        """
        granted: int | None = None
        for attempt in self._retrying():
            with attempt, self._lock:
                try:
                    granted = self._register_once(pool_max, pool_floor)
                except psycopg.Error:
                    self._drop_control()
                    raise
        assert granted is not None
        self._purge()
        return granted

    def _purge(self) -> None:
        """Delete long-expired rows in bounded batches, each its own short statement.

        Best effort: a failure is logged (the next registration tries again).
        """
        with self._lock:
            try:
                conn = self._control()
                for _ in range(_PURGE_ROUNDS):
                    cur = conn.execute(
                        load("pool")["purge_expired"],
                        {"after": _PURGE_AFTER_S, "batch": _PURGE_BATCH},
                    )
                    if cur.rowcount < _PURGE_BATCH:
                        break
            except psycopg.Error as e:
                logger.warning("server %s: purge of expired rows failed: %s", self.server_id, e)

    def _register_once(self, pool_max: int, pool_floor: int) -> int:
        q = load("pool")
        s = self.settings
        conn = self._control()
        ident = {"server_id": self.server_id}
        with conn.transaction():
            conn.execute(
                q["set_local_timeouts"],
                (_ms(s.statement_timeout), _ms(s.lock_timeout), _ms(s.idle_in_tx_timeout)),
            )
            conn.execute(q["fleet_lock"], (NAMESPACE_FLEET, _FLEET_KEY))
            limits = conn.execute(q["server_limits"]).fetchone()
            assert limits is not None
            owner = conn.execute(q["own_row"], ident).fetchone()
            if owner is not None and owner[3] and owner[2] != self.instance_id:
                # Another instance's live row. Taken over only when it is a process on
                # this host that is gone (a restart within the lease); a live pid -- our
                # own included: two containers on one hostname both run as pid 1 --
                # may be another process: refuse.
                owner_pid = int(owner[1])
                same_host_dead = (
                    owner[0] == self.host and owner_pid != self.pid and not pid_alive(owner_pid)
                )
                if not same_host_dead:
                    raise ServerIdInUse(
                        f"server id {self.server_id!r} is held by live process {owner[1]} "
                        f"on {owner[0]} (instance {owner[2]}; its lease has not run out): "
                        "give each process its own ZENPIPE_SERVER_ID"
                    )
            usage = conn.execute(q["live_usage"], ident).fetchone()
            assert usage is not None
            budget = Budget(
                max_connections=int(limits[0]),
                superuser_reserved=int(limits[1]),
                pg_reserved=int(limits[2]),
                reserve=s.reserved_connections,
                fixed=s.fleet_budget,
            )
            granted = budget.grant(
                pool_max=pool_max,
                pool_floor=pool_floor,
                in_use=int(usage[1]),
                live_servers=int(usage[0]),
                dedicated=self.dedicated,
            )
            conn.execute(
                q["register"],
                {
                    **ident,
                    "instance_id": self.instance_id,
                    "host": self.host,
                    "pid": self.pid,
                    "pool_size": granted,
                    "dedicated": self.dedicated,
                    "version": __version__,
                    "lease": self.lease,
                },
            )
        self.pool_size = granted
        self.budget = budget
        logger.info(
            "server %s registered: pool of %d (%s; %d live server(s) held %d)",
            self.server_id,
            granted,
            budget.explain(),
            usage[0],
            usage[1],
        )
        return granted

    def beat(self) -> None:
        """Extend our lease and report the pool's metrics (one short transaction).

        Takes the fleet lock in shared mode first, so a heartbeat never runs while a
        registration counts the live rows (it waits for it, bounded by
        ``lock_timeout``).  When the row expired meanwhile (a long stall: its share may
        be someone else's now), the pool drops to its floor at once (*on_evict*), then
        the member registers again under the fleet lock and the pool is resized to the
        new share.  Raises what the database raises, and `FleetBudgetExceeded` while no
        share can be granted (the pool stays at its floor); the heartbeat thread logs
        it and tries again at the next beat.
        """
        q = load("pool")
        s = self.settings
        with self._lock:
            try:
                conn = self._control()
                with conn.transaction():
                    conn.execute(
                        q["set_local_timeouts"],
                        (_ms(s.statement_timeout), _ms(s.lock_timeout), _ms(s.idle_in_tx_timeout)),
                    )
                    conn.execute(q["fleet_lock_shared"], (NAMESPACE_FLEET, _FLEET_KEY))
                    row = conn.execute(
                        q["heartbeat"],
                        {
                            "server_id": self.server_id,
                            "instance_id": self.instance_id,
                            "lease": self.lease,
                            "stats": Jsonb(self._stats()),
                        },
                    ).fetchone()
            except psycopg.Error:
                self._drop_control()
                raise
        self.heartbeats += 1
        if row is not None:
            return
        if not self.evicted:
            self.evicted = True
            self.evictions += 1
            logger.warning(
                "server %s: lease expired; pool down to its floor (%d), registering again",
                self.server_id,
                self.floor,
            )
            if self._on_evict is not None:
                self._on_evict(self.floor)
        floor = s.pool_floor or s.pool_max
        granted = self.register(pool_max=s.pool_max, pool_floor=floor)
        self.evicted = False
        if self._on_resize is not None:
            self._on_resize(granted)

    def start_heartbeats(self) -> None:
        """Start the daemon heartbeat thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"zenpipe-heartbeat-{self.server_id}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                self.beat()
            except Exception as e:
                self.heartbeat_errors += 1
                logger.warning("server %s: heartbeat failed: %s", self.server_id, e)

    def stop(self, *, leave: bool = True) -> None:
        """Stop heartbeats; with *leave*, delete our row so its share is free at once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.settings.connect_timeout + 5)
        if leave:
            with self._lock, suppress(psycopg.Error):
                self._control().execute(
                    load("pool")["leave"],
                    {"server_id": self.server_id, "instance_id": self.instance_id},
                )
        self._drop_control()

    def _drop_control(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                conn.close()


# -- metrics -------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolMetrics:
    """A pool's figures at one moment: gauges, then counters since the pool opened."""

    pool_max: int
    pool_size: int
    used: int
    free: int
    waiting: int
    requests: int
    requests_waited: int
    wait_ms: int
    timeouts: int
    queue_full: int
    connections_opened: int
    connection_errors: int
    connections_lost: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# -- the pool ------------------------------------------------------------------------


class ZenPool(psycopg_pool.ConnectionPool[Conn]):
    """A `psycopg_pool.ConnectionPool` sized by the fleet budget and bounded everywhere.

    The constructor blocks while it registers the server (fleet lock, at most
    ``pool_timeout`` seconds of retries on transient errors) and, with ``open=True``,
    starts the pool without waiting for connections (call `wait()` for that).  It raises
    `FleetBudgetExceeded` when the budget cannot fit this server and `ServerIdInUse`
    when another live process holds its id.  With ``fleet=False`` no registry is used
    and the pool has ``pool_max`` connections.

    `getconn`/`connection` wait at most ``pool_timeout`` seconds and raise
    `PoolTimeoutError` (a `psycopg_pool.PoolTimeout`), or `PoolQueueFullError` (a
    `psycopg_pool.TooManyRequests`) when ``max_waiting`` callers already wait.
    `close` stops the heartbeats and deletes the server's row.

    The server id defaults to ``<hostname>:<pid>:<8 hex digits of the instance id>``, so
    two processes never share a row by accident.  When the fleet evicts this server
    (its row expired), the pool closes connections down to ``max(1, pool_floor)`` until
    a share is granted again: idle ones at once, busy ones when they are returned.
    *name* names the pool and its connections (``application_name``); default
    ``zenpipe:<server_id>``.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        fleet: bool = True,
        open: bool = True,
        configure: Callable[[Conn], None] | None = None,
        name: str | None = None,
        listen: bool | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = Settings.from_env(**overrides)
        elif overrides:
            settings = settings.replace(**overrides)
        self.settings = settings
        self.instance_id = uuid.uuid4()
        self.server_id = (
            settings.server_id or f"{socket.gethostname()}:{os.getpid()}:{self.instance_id.hex[:8]}"
        )
        pool_name = name or f"zenpipe:{self.server_id}"
        self._counter_lock = threading.Lock()
        self._timeouts = 0
        self._queue_full = 0
        self.fleet: FleetMember | None = None

        size = settings.pool_max
        pgbouncer = settings.pgbouncer
        if fleet:
            self.fleet = FleetMember(
                settings,
                server_id=self.server_id,
                stats=self._heartbeat_stats,
                on_resize=self._resize_to_share,
                on_evict=self._resize_to_share,
                instance_id=self.instance_id,
                listen=settings.listen if listen is None else listen,
            )
            try:
                size = self.fleet.register(
                    pool_max=settings.pool_max, pool_floor=settings.pool_floor
                )
            except BaseException:
                self.fleet.stop(leave=False)  # closes the control connection
                raise
            pgbouncer = self.fleet.pgbouncer
        elif pgbouncer is None:
            pgbouncer = _probe_pgbouncer(settings)
        self.pgbouncer: bool = bool(pgbouncer)
        #: Whether `waker` listens: a fleet member does unless behind PgBouncer (the
        #: budget counts the connection); a pool outside the fleet only when asked.
        self.listening: bool = (
            self.fleet.listening if self.fleet is not None else bool(listen) and not self.pgbouncer
        )
        self._waker: Waker | None = None
        self._waker_lock = threading.Lock()
        self._pool_name = pool_name
        self._local_timeouts = (
            _ms(settings.statement_timeout),
            _ms(settings.lock_timeout),
            _ms(settings.idle_in_tx_timeout),
        )
        try:
            super().__init__(
                settings.dsn,
                kwargs=connect_kwargs(
                    settings,
                    pgbouncer=self.pgbouncer,
                    server_id=self.server_id,
                    application_name=pool_name,
                ),
                min_size=min(settings.pool_min, size),
                max_size=size,
                open=open,
                configure=configure,
                check=check_connection,
                name=pool_name,
                timeout=settings.pool_timeout,
                max_waiting=settings.max_waiting,
                max_lifetime=settings.max_lifetime,
                max_idle=settings.max_idle,
                reconnect_timeout=settings.reconnect_timeout,
                reconnect_failed=self._reconnect_failed,
            )
        except BaseException:
            if self.fleet is not None:
                self.fleet.stop()
            raise
        if self.fleet is not None:
            self.fleet.start_heartbeats()
        logger.info(
            "pool %s: max %d, min %d, %s, dsn %s",
            self.name,
            size,
            self.min_size,
            "PgBouncer transaction mode" if self.pgbouncer else "direct",
            redacted_dsn(settings.dsn),
        )

    # -- bounded acquisition ----------------------------------------------------------

    def getconn(self, timeout: float | None = None) -> Conn:
        """Obtain a connection; prefer `connection()`.

        Waits at most *timeout* (default ``pool_timeout``) seconds.  Raises
        `PoolTimeoutError` when none became free in time and `PoolQueueFullError` when
        ``max_waiting`` callers are already waiting; both carry the pool's figures.
        """
        wait = self.timeout if timeout is None else timeout
        try:
            return super().getconn(timeout)
        except psycopg_pool.TooManyRequests as e:
            with self._counter_lock:
                self._queue_full += 1
            figures = self._figures()
            raise PoolQueueFullError(
                f"pool {self.name}: waiting queue full (max_waiting {self.max_waiting}): "
                f"{self._describe(figures)}",
                figures,
            ) from e
        except psycopg_pool.PoolTimeout as e:
            with self._counter_lock:
                self._timeouts += 1
            figures = self._figures()
            raise PoolTimeoutError(
                f"pool {self.name}: no connection free after {wait:.2f} s "
                f"(pool_timeout): {self._describe(figures)}",
                figures,
            ) from e

    @contextmanager
    def connection(self, timeout: float | None = None, *, timeouts: bool = True) -> Iterator[Conn]:
        """A connection for the ``with`` block, returned to the pool at its end.

        Waits and raises as `getconn`.  Behind PgBouncer, when the connection is not in
        autocommit mode, the block's transaction starts with the configured timeouts set
        for that transaction (``set_config(..., true)``): the only setting that cannot
        leak to, or be lost on, a shared server connection.  A block that commits and
        goes on, or uses autocommit, runs its later transactions without them (see
        `apply_timeouts`).  With ``timeouts=False`` the block gets the connection idle
        and sets them itself in each transaction it opens (`local_timeouts`): a block
        that sends its transaction in one pipeline saves the round trip of a separate
        statement.
        """
        with super().connection(timeout) as conn:
            if timeouts and self.pgbouncer and not conn.autocommit:
                self.apply_timeouts(conn)
            yield conn

    def local_timeouts(self) -> Timeouts | None:
        """The statement and parameters that set the configured timeouts for the current
        transaction, when connections need them per transaction (behind PgBouncer);
        None on a direct connection, which has them for the whole session."""
        if not self.pgbouncer:
            return None
        return load("pool")["set_local_timeouts"], self._local_timeouts

    def apply_timeouts(self, conn: Conn) -> None:
        """Set the configured timeouts for *conn*'s current transaction only.

        Opens the transaction when none is open (outside autocommit).  Needed only
        behind PgBouncer; direct connections have them for the whole session.
        """
        conn.execute(load("pool")["set_local_timeouts"], self._local_timeouts)

    # -- metrics ----------------------------------------------------------------------

    def _figures(self) -> dict[str, int]:
        stats = self.get_stats()
        size = stats.get("pool_size", 0)
        free = stats.get("pool_available", 0)
        return {
            "pool_max": self.max_size,
            "pool_size": size,
            "used": max(size - free, 0),
            "free": free,
            "waiting": stats.get("requests_waiting", 0),
        }

    @staticmethod
    def _describe(figures: dict[str, int]) -> str:
        return (
            f"{figures['used']} in use, {figures['free']} free, {figures['pool_size']} open "
            f"of max {figures['pool_max']}, {figures['waiting']} waiting"
        )

    def metrics(self) -> PoolMetrics:
        """The pool's gauges and counters now (cheap: no database round trip)."""
        stats = self.get_stats()
        figures = self._figures()
        with self._counter_lock:
            timeouts, queue_full = self._timeouts, self._queue_full
        return PoolMetrics(
            pool_max=figures["pool_max"],
            pool_size=figures["pool_size"],
            used=figures["used"],
            free=figures["free"],
            waiting=figures["waiting"],
            requests=stats.get("requests_num", 0),
            requests_waited=stats.get("requests_queued", 0),
            wait_ms=stats.get("requests_wait_ms", 0),
            timeouts=timeouts,
            queue_full=queue_full,
            connections_opened=stats.get("connections_num", 0),
            connection_errors=stats.get("connections_errors", 0),
            connections_lost=stats.get("connections_lost", 0) + stats.get("returns_bad", 0),
        )

    def _heartbeat_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.metrics().as_dict()
        out["pgbouncer"] = self.pgbouncer
        return out

    # -- lifecycle --------------------------------------------------------------------

    def _resize_to_share(self, size: int) -> None:
        """Resize to the fleet's share *size*, closing what is above it.

        psycopg_pool's `resize` only moves the limits: connections above a smaller
        ``max_size`` would stay open (idle ones until ``max_idle`` brings the pool down
        to ``min_size``, one per period; returned ones forever).  So the idle surplus
        is closed here and busy ones when they come back (`_return_connection`).
        """
        if size != self.max_size:
            logger.warning(
                "pool %s: resized from %d to %d by the fleet budget", self.name, self.max_size, size
            )
            self.resize(min(self.settings.pool_min, size), size)
        self._close_surplus()

    def _close_surplus(self) -> None:
        surplus: list[Conn] = []
        with self._lock:
            while self._nconns > self._max_size and self._pool:
                surplus.append(self._pool.pop())
                self._nconns -= 1
        for conn in surplus:
            self._close_connection(conn)

    def _return_connection(self, conn: Conn, *args: Any, **kwargs: Any) -> None:
        # A connection coming back to a pool that holds more than its (shrunk) max_size
        # is closed instead of kept: see _resize_to_share. Counted under the pool's lock,
        # as psycopg_pool's own shrinking does.
        with self._lock:
            over = self._nconns > self._max_size
            if over:
                self._nconns -= 1
        if over:
            self._close_connection(conn)
            return
        super()._return_connection(conn, *args, **kwargs)

    def _reconnect_failed(self, pool: psycopg_pool.ConnectionPool[Any]) -> None:
        logger.error(
            "pool %s: could not reconnect to %s for %.0f s",
            self.name,
            redacted_dsn(self.settings.dsn),
            self.reconnect_timeout,
        )

    def waker(self) -> Waker | None:
        """The process's `zenpipe.wakeup.Waker` on a dedicated connection (started on
        first use, closed with the pool), or None when this pool does not listen
        (PgBouncer in transaction mode: workers poll only)."""
        if not self.listening:
            return None
        with self._waker_lock:
            if self._waker is None:
                kwargs = connect_kwargs(
                    self.settings,
                    pgbouncer=self.pgbouncer,
                    server_id=self.server_id,
                    application_name=f"{self._pool_name}:listen",
                )
                self._waker = Waker(self.settings.dsn, connect_kwargs=kwargs).start()
            return self._waker

    def close(self, timeout: float = 5.0) -> None:
        """Close every connection (waiting at most *timeout* seconds for the workers),
        then stop the waker and the heartbeats and delete the server's row."""
        try:
            super().close(timeout)
        finally:
            waker, self._waker = self._waker, None
            if waker is not None:
                waker.close()
            if self.fleet is not None:
                self.fleet.stop()


def guarded_pool(
    conninfo: str,
    *,
    name: str,
    min_size: int,
    max_size: int,
    settings: Settings | None = None,
    fleet: bool = False,
    open: bool = True,
) -> ZenPool:
    """A bounded pool for code handed a DSN, with the connection policy of `ZenPool`.

    Every connection carries ``statement_timeout``, ``lock_timeout`` and
    ``idle_in_transaction_session_timeout`` from *settings* (default
    `Settings.from_env()`): as startup ``options`` on a direct connection, per
    transaction (``set_config(..., true)`` at the start of each non-autocommit
    ``connection()`` block) behind PgBouncer, where session settings do not stick.
    Prepared statements are off (``prepare_threshold=None``) unless the connection is
    known to be direct: ``settings.pgbouncer`` is False (``ZENPIPE_PGBOUNCER=off``), or
    it is None (``auto``) and `detect_pgbouncer` finds no pooler; a probe that cannot
    connect counts as a pooler.  Waits are bounded as in `ZenPool` (``pool_timeout``,
    ``max_waiting``).

    *name* names the pool and its connections (``application_name``).  With
    ``fleet=False`` (default) the pool is outside the fleet budget and has
    *max_size* connections at most; with ``fleet=True`` it registers in
    ``zen_servers`` like a `ZenPool` (blocking, may raise `FleetBudgetExceeded`) and
    *max_size* is its ``pool_max``.  The constructor probes (auto mode) with one short
    connection; with ``open=True`` it starts the pool without waiting for connections.
    Raises `ConfigError` for sizes the settings refuse.
    """
    base = settings if settings is not None else Settings.from_env()
    s = base.replace(
        dsn=conninfo,
        pool_min=min_size,
        pool_max=max_size,
        pool_floor=min(base.pool_floor, max_size),
    )
    return ZenPool(s, fleet=fleet, open=open, name=name)


def bare_connection(
    pool: psycopg_pool.ConnectionPool[Any], timeout: float | None = None
) -> contextlib.AbstractContextManager[Any]:
    """*pool*'s ``connection()`` with no transaction opened for the timeouts (a
    `ZenPool` behind PgBouncer opens one): the caller sets them itself in each
    transaction it opens, with `local_timeouts`."""
    if isinstance(pool, ZenPool):
        return pool.connection(timeout, timeouts=False)
    return pool.connection(timeout)


def local_timeouts(
    pool: psycopg_pool.ConnectionPool[Any],
) -> Timeouts | None:
    """`ZenPool.local_timeouts` for a `ZenPool`; None for another pool (its connections
    carry whatever their caller configured)."""
    return pool.local_timeouts() if isinstance(pool, ZenPool) else None


def one_trip(
    pool: psycopg_pool.ConnectionPool[Any],
    conn: psycopg.Connection[Any],
    send: Callable[[psycopg.Connection[Any]], psycopg.Cursor[Any]],
) -> psycopg.Cursor[Any]:
    """Run the statement *send* executes as its own transaction in one round trip.

    *conn* is idle, from *pool* by `bare_connection`.  On a direct connection the
    statement runs alone in autocommit; behind PgBouncer, BEGIN, the pool's timeouts
    (`local_timeouts`), the statement and COMMIT go in one pipeline.  Returns *send*'s
    cursor, its rows ready.  Raises the statement's error, rolled back; *conn* is left
    out of autocommit once idle again (a lost connection is the pool's to discard).
    """
    q = load("pool")
    conn.autocommit = True
    try:
        timeouts = local_timeouts(pool)
        if timeouts is None:
            return send(conn)
        with conn.pipeline():
            conn.execute(q["begin"])
            conn.execute(*timeouts)
            cur = send(conn)
            conn.execute(q["commit"])
        return cur
    finally:
        if not conn.closed:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with suppress(psycopg.Error):  # lost: the pool discards it
                    conn.execute(q["rollback"])
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                conn.autocommit = False


# -- fleet figures -------------------------------------------------------------------


@dataclass(frozen=True)
class FleetStatus:
    """The fleet as ``zen_servers`` and the PostgreSQL server see it."""

    budget: Budget
    backend_connections: int
    servers: list[dict[str, Any]]
    dashboard: dict[str, Any]

    @property
    def live(self) -> list[dict[str, Any]]:
        return [s for s in self.servers if s["live"]]

    def totals(self) -> dict[str, Any]:
        """Budget, reserved connections and the live servers' summed pool metrics."""
        live = self.live
        out: dict[str, Any] = {
            "max_connections": self.budget.max_connections,
            "budget": self.budget.total,
            "budget_explained": self.budget.explain(),
            "live_servers": len(live),
            "expired_servers": len(self.servers) - len(live),
            "fleet_connections": sum(
                s["pool_size"] + s.get("dedicated", CONTROL_CONNECTIONS) for s in live
            ),
            "backend_connections": self.backend_connections,
        }
        for key in (
            "used",
            "free",
            "waiting",
            "wait_ms",
            "timeouts",
            "queue_full",
            "connections_lost",
        ):
            out[key] = sum(int(s["stats"].get(key, 0)) for s in live)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"fleet": self.totals(), "servers": self.servers, "dashboard": self.dashboard}

    def to_json(self) -> str:
        """`as_dict` as indented JSON (timestamps and numerics as strings)."""
        return json.dumps(self.as_dict(), indent=2, default=str)

    def render(self) -> str:
        """Plain text for ``zenpipe stats``: fleet totals, one line per server, dashboard."""
        t = self.totals()
        lines = [
            f"{t['budget_explained']}",
            f"fleet: {t['live_servers']} live server(s) ({t['expired_servers']} expired) "
            f"hold {t['fleet_connections']} of {t['budget']} budgeted connections; "
            f"PostgreSQL has {t['backend_connections']} client connection(s) of "
            f"max_connections {t['max_connections']}",
            f"pools: {t['used']} used, {t['free']} free, {t['waiting']} waiting, "
            f"{t['wait_ms']} ms waited, {t['timeouts']} timeouts, "
            f"{t['queue_full']} queue full, {t['connections_lost']} connections lost",
            "",
            "servers:",
        ]
        for srv in self.servers:
            st = srv["stats"]
            lines.append(
                f"  {srv['server_id']}  {'live' if srv['live'] else 'expired'}  "
                f"host {srv['host']} pid {srv['pid']}  pool {srv['pool_size']}  "
                f"used {st.get('used', '-')} free {st.get('free', '-')} "
                f"waiting {st.get('waiting', '-')} timeouts {st.get('timeouts', '-')}  "
                f"heartbeat {srv['last_heartbeat']}  v{srv['version']}"
            )
        if not self.servers:
            lines.append("  (none)")
        lines += ["", "dashboard:"]
        lines += [f"  {key}: {value}" for key, value in self.dashboard.items()]
        return "\n".join(lines)


def fleet_status(conn: psycopg.Connection[Any], settings: Settings | None = None) -> FleetStatus:
    """Read the fleet's rows, the budget and ``zen_v_dashboard`` over *conn*.

    *settings* gives the reserve and fixed budget used in the arithmetic (default: from
    the environment).
    """
    s = settings or Settings.from_env(dsn="")
    q = load("pool")
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    limits = conn.execute(q["server_limits"]).fetchone()
    assert limits is not None
    backends = conn.execute(q["backend_connections"]).fetchone()
    servers = cur.execute(q["fleet_servers"]).fetchall()
    dashboard = cur.execute(q["dashboard"]).fetchone() or {}
    for row in servers:
        for key, value in row.items():
            if isinstance(value, datetime):
                row[key] = value.isoformat()
    return FleetStatus(
        budget=Budget(
            int(limits[0]), int(limits[1]), int(limits[2]), s.reserved_connections, s.fleet_budget
        ),
        backend_connections=int(backends[0]) if backends else 0,
        servers=servers,
        dashboard=dict(dashboard),
    )
