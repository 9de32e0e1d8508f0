"""The fleet-wide settings stored in the database (``zen_settings``).

Unlike `zenpipe.config.Settings` (how one process connects), these govern the whole
fleet at once and live in one row every claimer reads at each statement that needs it:
``max_attempts`` (claims of a row before a failure parks it) and the retry backoff of
failed rows, ``min(retry_max_seconds, retry_base_seconds * 2^(attempt - 1))`` times
``1 - retry_jitter * random()``.  `zenpipe settings` shows and changes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from .errors import ConfigError
from .queries import load

__all__ = ["FleetSettings", "read_fleet_settings", "update_fleet_settings"]


@dataclass(frozen=True)
class FleetSettings:
    """The row of ``zen_settings``."""

    max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    retry_jitter: float
    updated_at: datetime


def read_fleet_settings(conn: psycopg.Connection[Any]) -> FleetSettings:
    """The fleet's settings as they are now (one short read)."""
    row = conn.execute(load("fleet_settings")["show"]).fetchone()
    if row is None:
        raise ConfigError("zen_settings is empty: apply the schema (zenpipe schema apply)")
    return FleetSettings(*row)


def update_fleet_settings(
    conn: psycopg.Connection[Any],
    *,
    max_attempts: int | None = None,
    retry_base_seconds: float | None = None,
    retry_max_seconds: float | None = None,
    retry_jitter: float | None = None,
) -> FleetSettings:
    """Change the settings given (None: unchanged) in one statement, committed by the
    caller's transaction; return the new row.  Every claimer of the fleet uses them
    from its next statement on.  Raises `ConfigError` naming the setting a CHECK
    refused (the row is then unchanged)."""
    params = {
        "max_attempts": max_attempts,
        "retry_base_seconds": retry_base_seconds,
        "retry_max_seconds": retry_max_seconds,
        "retry_jitter": retry_jitter,
    }
    try:
        with conn.transaction():
            row = conn.execute(load("fleet_settings")["update"], params).fetchone()
    except psycopg.errors.CheckViolation as e:
        raise ConfigError(
            f"zen_settings refused the change ({e.diag.constraint_name}): {e.diag.message_primary}"
        ) from None
    if row is None:
        raise ConfigError("zen_settings is empty: apply the schema (zenpipe schema apply)")
    return FleetSettings(*row)
