"""zenpipe's configuration: one frozen `Settings`, from keyword arguments and ``ZENPIPE_*``.

`Settings.from_env()` reads the environment variables listed in `ENVIRONMENT` and lets
keyword arguments win over them; constructing `Settings` directly reads no environment.
Every value is checked once, here: an invalid one raises `ConfigError` naming the
variable (or keyword) and the value, so a typo fails at start, not at the first query.

The DSN may hold a password.  It is never shown: `Settings.__repr__` and every log line
use `redacted_dsn()`.  The table in ``docs/pooling.md`` documents every setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConfigError

__all__ = ["ENVIRONMENT", "Settings", "parse_duration", "redacted_dsn"]

_REDACTED = "********"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0}

#: Field name -> environment variable.  The one list of what the environment can set.
ENVIRONMENT: Mapping[str, str] = {
    "dsn": "ZENPIPE_DSN",
    "server_id": "ZENPIPE_SERVER_ID",
    "pool_min": "ZENPIPE_POOL_MIN",
    "pool_max": "ZENPIPE_POOL_MAX",
    "pool_floor": "ZENPIPE_POOL_FLOOR",
    "pool_timeout": "ZENPIPE_POOL_TIMEOUT",
    "max_waiting": "ZENPIPE_MAX_WAITING",
    "max_lifetime": "ZENPIPE_MAX_LIFETIME",
    "max_idle": "ZENPIPE_MAX_IDLE",
    "reconnect_timeout": "ZENPIPE_RECONNECT_TIMEOUT",
    "connect_timeout": "ZENPIPE_CONNECT_TIMEOUT",
    "statement_timeout": "ZENPIPE_STATEMENT_TIMEOUT",
    "lock_timeout": "ZENPIPE_LOCK_TIMEOUT",
    "idle_in_tx_timeout": "ZENPIPE_IDLE_IN_TX_TIMEOUT",
    "pgbouncer": "ZENPIPE_PGBOUNCER",
    "listen": "ZENPIPE_LISTEN",
    "reserved_connections": "ZENPIPE_RESERVED_CONNECTIONS",
    "fleet_budget": "ZENPIPE_FLEET_BUDGET",
    "heartbeat_interval": "ZENPIPE_HEARTBEAT_INTERVAL",
    "heartbeat_misses": "ZENPIPE_HEARTBEAT_MISSES",
}

# Durations: a bare number is seconds everywhere (as in psycopg_pool), or give a unit.
_DURATION_FIELDS = frozenset(
    {
        "statement_timeout",
        "lock_timeout",
        "idle_in_tx_timeout",
        "pool_timeout",
        "max_lifetime",
        "max_idle",
        "reconnect_timeout",
        "connect_timeout",
        "heartbeat_interval",
    }
)
_INT_FIELDS = frozenset(
    {
        "pool_min",
        "pool_max",
        "pool_floor",
        "max_waiting",
        "reserved_connections",
        "fleet_budget",
        "heartbeat_misses",
    }
)


def redacted_dsn(dsn: str) -> str:
    """Return *dsn* as a ``key=value`` string with the password hidden.

    Accepts both libpq forms (``key=value`` and ``postgresql://`` URIs).  A string libpq
    cannot parse is not echoed at all, since it may hold a password in any shape.
    """
    if not dsn:
        return ""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparseable dsn>"
    if "password" in params:
        params["password"] = _REDACTED
    return make_conninfo("", **params)


def parse_duration(value: str | float, *, name: str) -> float:
    """Seconds from ``"250ms"``, ``"5s"``, ``"2min"``, ``"1h"`` or a bare number of seconds.

    Raises `ConfigError` naming *name* when the value is not a non-negative duration.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{name}: must not be negative, got {value!r}")
        return float(value)
    m = _DURATION.match(str(value))
    if m is None:
        raise ConfigError(
            f"{name}: expected a duration such as 500ms, 5s, 2min or a bare number of "
            f"seconds, got {value!r}"
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _parse_int(value: str | int, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def _parse_bool_or_auto(value: str | bool | None, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    if text in ("", "auto"):
        return None
    raise ConfigError(f"{name}: expected on, off or auto (or true/false), got {value!r}")


def _coerce(name: str, value: Any, label: str) -> Any:
    """Convert one raw value (from the environment or a keyword) to the field's type."""
    if name in _DURATION_FIELDS:
        return parse_duration(value, name=label)
    if name in _INT_FIELDS:
        if value is None and name == "fleet_budget":
            return None
        if isinstance(value, str) and not value.strip() and name == "fleet_budget":
            return None
        return _parse_int(value, label)
    if name in ("pgbouncer", "listen"):
        return _parse_bool_or_auto(value, label)
    if name == "server_id":
        return None if value is None or str(value) == "" else str(value)
    return value


@dataclass(frozen=True)
class Settings:
    """How a zenpipe server connects: pool sizes, timeouts, fleet budget, PgBouncer mode.

    Durations are stored in seconds (floats).  Construction validates every field and
    raises `ConfigError` naming the one that is wrong.  ``repr()`` hides the password.
    """

    #: libpq connection string or URI ("" lets libpq use its PG* variables).
    dsn: str = field(default="", repr=False)
    #: This process's row in zen_servers; default ``<hostname>:<pid>:<instance>`` (8 hex
    #: digits of the pool's random instance id, so two processes never share a row).
    server_id: str | None = None
    #: Connections the pool keeps open even when idle.
    pool_min: int = 2
    #: Per-server cap on the pool size (the fleet budget may grant less).
    pool_max: int = 10
    #: Smallest pool this server accepts when the budget cannot fit pool_max; 0 means
    #: "pool_max or nothing".
    pool_floor: int = 0
    #: Seconds a caller waits for a free connection before `PoolTimeoutError`.
    pool_timeout: float = 30.0
    #: Callers allowed to wait at once; one more raises `PoolQueueFullError`.
    max_waiting: int = 64
    #: Seconds after which a connection is closed and replaced (on its return).
    max_lifetime: float = 3600.0
    #: Seconds an idle connection above pool_min is kept.
    max_idle: float = 600.0
    #: Seconds the pool keeps trying to reconnect before giving up on a slot.
    reconnect_timeout: float = 300.0
    #: Seconds libpq waits for a new connection (connect_timeout).
    connect_timeout: float = 10.0
    #: Per-statement limit set on every connection (0 disables).
    statement_timeout: float = 60.0
    #: Longest wait for a row or table lock (0 disables).
    lock_timeout: float = 10.0
    #: A session idle inside a transaction for this long is ended by the server.
    idle_in_tx_timeout: float = 60.0
    #: ``ZENPIPE_PGBOUNCER=on`` (True): PgBouncer transaction mode, no prepared statements,
    #: timeouts per transaction; ``off`` (False): direct connection; ``auto`` (None, the
    #: default): probe each pool's server once (`zenpipe.pool.detect_pgbouncer`), and take
    #: the safe PgBouncer behaviour when the probe cannot tell.
    pgbouncer: bool | None = None
    #: ``ZENPIPE_LISTEN``: whether a fleet member holds a LISTEN connection that wakes its
    #: idle workers when rows arrive (counted in the budget; `zenpipe.wakeup`). ``auto``
    #: (None, the default): yes unless behind PgBouncer, where LISTEN cannot work.
    listen: bool | None = None
    #: Connections the fleet leaves free for admin, migrations and monitoring.
    reserved_connections: int = 5
    #: Fixed fleet budget (overrides the one derived from max_connections).
    fleet_budget: int | None = None
    #: Seconds between heartbeats.
    heartbeat_interval: float = 10.0
    #: Missed heartbeats after which a server's row expires and frees its share.
    heartbeat_misses: int = 3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            raw = getattr(self, f.name)
            value = _coerce(f.name, raw, f.name)
            if value is not raw:
                object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"{name} ({ENVIRONMENT[name]}): {why}, got {getattr(self, name)!r}")

        if not isinstance(self.dsn, str):
            fail("dsn", "must be a string")
        if self.dsn and redacted_dsn(self.dsn) == "<unparseable dsn>":
            raise ConfigError("dsn (ZENPIPE_DSN): libpq cannot parse it (value not shown)")
        if self.server_id is not None and not 0 < len(self.server_id) <= 200:
            fail("server_id", "must be 1 to 200 characters")
        if self.pool_max < 1:
            fail("pool_max", "must be at least 1")
        if not 0 <= self.pool_min <= self.pool_max:
            fail("pool_min", f"must be between 0 and pool_max ({self.pool_max})")
        if not 0 <= self.pool_floor <= self.pool_max:
            fail("pool_floor", f"must be between 0 and pool_max ({self.pool_max})")
        if self.max_waiting < 1:
            fail("max_waiting", "must be at least 1 (the waiting queue is always bounded)")
        if self.pool_timeout <= 0:
            fail("pool_timeout", "must be positive (a caller never waits forever)")
        for name in (
            "max_lifetime",
            "max_idle",
            "reconnect_timeout",
            "connect_timeout",
            "heartbeat_interval",
        ):
            if getattr(self, name) <= 0:
                fail(name, "must be positive")
        if self.reserved_connections < 0:
            fail("reserved_connections", "must not be negative")
        if self.fleet_budget is not None and self.fleet_budget < 2:
            fail("fleet_budget", "must be at least 2 (one control and one pool connection)")
        if self.heartbeat_misses < 1:
            fail("heartbeat_misses", "must be at least 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``ZENPIPE_*`` variables, with *overrides* winning.

        *environ* defaults to `os.environ`.  Raises `ConfigError` naming the variable
        (or keyword) of the first invalid value, and on an unknown keyword.
        """
        env = os.environ if environ is None else environ
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, var in ENVIRONMENT.items():
            if name in overrides:
                continue
            raw = env.get(var)
            if raw is not None:
                values[name] = _coerce(name, raw, var)
        for name, raw in overrides.items():
            values[name] = _coerce(name, raw, name)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with *changes* applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def redacted_dsn(self) -> str:
        """The DSN with its password hidden: safe to log."""
        return redacted_dsn(self.dsn)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        return f"Settings(dsn={self.redacted_dsn!r}, {shown})"

    __str__ = __repr__
