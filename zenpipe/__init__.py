"""zenpipe: a concurrent, multi-server scraper pipeline on PostgreSQL.

Workers `Claimer.claim` batches of ``results`` rows, enrich them, and
`Upserter.upsert_and_complete` the contacts into ``zen_contacts`` in one transaction,
over a fleet-budgeted `ZenPool`.  `schema.apply` installs the schema.
"""

from __future__ import annotations

__version__ = "0.1.0"


from . import keys, schema
from .claim import Batch, Claim, Claimer, requeue
from .config import Settings
from .embedded import ThrowawayPgBouncer, ThrowawayPostgres
from .errors import (
    ConfigError,
    FleetBudgetExceeded,
    MigrationChecksumError,
    MigrationError,
    MigrationLockTimeout,
    PoolError,
    PoolQueueFullError,
    PoolTimeoutError,
    SchemaError,
    ServerIdInUse,
    ServerStartError,
    StaleClaimError,
    UpsertError,
    ZenpipeError,
    is_transient,
)
from .keys import hashtext, partition_key, partition_of, partition_table, route
from .pool import ZenPool
from .produce import LoadReport, Producer, enqueue
from .upsert import Rejection, Upserter, UpsertReport
from .worker import Worker, WorkerStats

__all__ = [
    "Batch",
    "Claim",
    "Claimer",
    "ConfigError",
    "FleetBudgetExceeded",
    "LoadReport",
    "MigrationChecksumError",
    "MigrationError",
    "MigrationLockTimeout",
    "PoolError",
    "PoolQueueFullError",
    "PoolTimeoutError",
    "Producer",
    "Rejection",
    "SchemaError",
    "ServerIdInUse",
    "ServerStartError",
    "Settings",
    "StaleClaimError",
    "ThrowawayPgBouncer",
    "ThrowawayPostgres",
    "UpsertError",
    "UpsertReport",
    "Upserter",
    "Worker",
    "WorkerStats",
    "ZenPool",
    "ZenpipeError",
    "__version__",
    "enqueue",
    "hashtext",
    "is_transient",
    "keys",
    "partition_key",
    "partition_of",
    "partition_table",
    "requeue",
    "route",
    "schema",
]

from .governor import Advice, Governor

__all__ += ["Advice", "Governor"]
