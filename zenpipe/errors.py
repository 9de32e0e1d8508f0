"""The exceptions zenpipe raises.

Every exception derives from `ZenpipeError`, so a worker can catch everything zenpipe
raises in one place, or exactly the case it can act on.
"""

from __future__ import annotations

import psycopg
import psycopg_pool


class ZenpipeError(Exception):
    """Root of every exception raised by zenpipe."""


#: SQLSTATEs after which the same work, retried on a fresh transaction, can succeed.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "57P01",  # admin_shutdown (pg_terminate_backend, server restart)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (server starting up)
        "53300",  # too_many_connections
        "25P03",  # idle_in_transaction_session_timeout (the session is gone; a new one works)
        "08000",  # connection_exception
        "08003",  # connection_does_not_exist
        "08006",  # connection_failure
        "08001",  # sqlclient_unable_to_establish_sqlconnection
        "08004",  # sqlserver_rejected_establishment_of_sqlconnection
    }
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the failed transaction may succeed.

    The one place that decides retries: deadlocks, serialization failures, lock
    timeouts, terminated backends, lost connections and a server that is restarting.
    Data errors (bad values, constraint violations) are never transient.
    """
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is not None:
            return state in TRANSIENT_SQLSTATES or state.startswith("08")
        # No SQLSTATE: the connection broke before the server could answer.
        return isinstance(exc, psycopg.OperationalError)
    return False


class ServerStartError(ZenpipeError):
    """A throwaway PostgreSQL server could not be found, initialised or started."""


class SchemaError(ZenpipeError):
    """The database cannot hold zenpipe's schema (wrong encoding, too old a server...)."""


class MigrationError(SchemaError):
    """A migration could not be read or applied."""


class MigrationChecksumError(MigrationError):
    """An already-applied migration was edited afterwards.

    Applied migrations are history: change the schema with a new migration instead.
    """

    def __init__(self, version: int, name: str, recorded: str, current: str) -> None:
        self.version = version
        self.name = name
        self.recorded = recorded
        self.current = current
        super().__init__(
            f"migration {version:04d}_{name} was applied with checksum {recorded[:12]}... "
            f"but the file now has {current[:12]}...: applied migrations must not be edited; "
            "add a new migration instead"
        )


class MigrationLockTimeout(MigrationError):
    """Another process held the migration lock for longer than the timeout."""


# -- configuration and connection pool (zenpipe.config, zenpipe.pool) ------------------


class ConfigError(ZenpipeError, ValueError):
    """A setting (keyword argument or ``ZENPIPE_*`` variable) has an invalid value.

    The message names the variable and the value, never the DSN's password.
    """


class PoolError(ZenpipeError):
    """A connection could not be handed out by zenpipe's pool."""


class PoolTimeoutError(PoolError, psycopg_pool.PoolTimeout):
    """No connection became free within the pool timeout.

    Also a `psycopg_pool.PoolTimeout` (so a `psycopg.OperationalError`): handlers
    written for plain psycopg_pool still catch it.  *figures* holds the pool's gauges
    when the limit was hit (``pool_size``, ``pool_max``, ``used``, ``free``, ``waiting``).
    """

    def __init__(self, message: str, figures: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.figures: dict[str, int] = dict(figures or {})


class PoolQueueFullError(PoolError, psycopg_pool.TooManyRequests):
    """The waiting queue was full (``max_waiting`` callers already waiting).

    Also a `psycopg_pool.TooManyRequests`.  *figures* as in `PoolTimeoutError`.
    """

    def __init__(self, message: str, figures: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.figures: dict[str, int] = dict(figures or {})


class FleetBudgetExceeded(PoolError):
    """The fleet's connection budget cannot fit this server's pool.

    Raised at start instead of pushing PostgreSQL over ``max_connections``.  The
    message gives the arithmetic; *budget*, *in_use*, *needed* hold its figures.
    """

    def __init__(self, message: str, *, budget: int, in_use: int, needed: int) -> None:
        super().__init__(message)
        self.budget = budget
        self.in_use = in_use
        self.needed = needed


class ServerIdInUse(PoolError):
    """Another live process holds this server id in ``zen_servers``."""


class StaleClaimError(ZenpipeError):
    """A claim was settled or extended with a token that no longer holds its rows.

    The lease ran out and another worker claimed the rows (or they were requeued):
    nothing of the refused call was applied.  ``ids`` lists the rows no longer held.
    """

    def __init__(self, operation: str, ids: list[int]) -> None:
        self.operation = operation
        self.ids = ids
        shown = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
        super().__init__(
            f"{operation} refused: {len(ids)} row(s) no longer held under this claim's "
            f"token ({shown}); nothing was applied"
        )


class UpsertError(ZenpipeError):
    """The writer was used in a way it cannot honour (e.g. an autocommit connection).

    Bad records never raise: they are rejected into ``zen_rejects`` and reported.
    """


class EmptyBatchError(UpsertError, ValueError):
    """`Upserter.upsert_and_complete` was given a batch with no claims.

    Such a write would carry no fencing token, so nothing could stop it from landing
    after the rows were taken over: refused before anything is written.  Use
    `Upserter.upsert` for records that belong to no claim.
    """


class EnrichTargetError(ZenpipeError):
    """``MODULE:CALLABLE`` given to ``zenpipe worker`` cannot be used: malformed, the
    module does not import, the attribute is missing, or it is not callable.

    The message names the target and the reason (the import error's own text).
    """
