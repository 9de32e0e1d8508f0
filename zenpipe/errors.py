"""The exceptions zenpipe raises.

Every exception derives from `ZenpipeError`, so a worker can catch everything zenpipe
raises in one place, or exactly the case it can act on.
"""

from __future__ import annotations

import psycopg


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
