"""zenpipe: a concurrent, multi-server scraper pipeline on PostgreSQL."""

from __future__ import annotations

from .embedded import ThrowawayPostgres
from .errors import (
    MigrationChecksumError,
    MigrationError,
    MigrationLockTimeout,
    SchemaError,
    ServerStartError,
    ZenpipeError,
)
from .keys import hashtext, partition_key, partition_of, partition_table

__version__ = "0.1.0"

__all__ = [
    "MigrationChecksumError",
    "MigrationError",
    "MigrationLockTimeout",
    "SchemaError",
    "ServerStartError",
    "ThrowawayPostgres",
    "ZenpipeError",
    "__version__",
    "hashtext",
    "partition_key",
    "partition_of",
    "partition_table",
]
