"""zenpipe.config: environment and keyword settings, validation, a DSN that never leaks."""

from __future__ import annotations

import logging

import pytest

from zenpipe.config import ENVIRONMENT, Settings, parse_duration, redacted_dsn
from zenpipe.errors import ConfigError, ZenpipeError

SECRET = "s3cr3t-Pa55"


def test_defaults_are_bounded() -> None:
    s = Settings()
    assert s.pool_timeout > 0 and s.max_waiting >= 1
    assert min(s.statement_timeout, s.lock_timeout, s.idle_in_tx_timeout) > 0
    assert s.pgbouncer is None


def test_environment_is_read_and_keywords_win() -> None:
    env = {
        "ZENPIPE_DSN": "host=db port=5433 dbname=zen",
        "ZENPIPE_POOL_MIN": "1",
        "ZENPIPE_POOL_MAX": "7",
        "ZENPIPE_POOL_FLOOR": "2",
        "ZENPIPE_POOL_TIMEOUT": "1500ms",
        "ZENPIPE_MAX_WAITING": "9",
        "ZENPIPE_STATEMENT_TIMEOUT": "2min",
        "ZENPIPE_LOCK_TIMEOUT": "3",
        "ZENPIPE_IDLE_IN_TX_TIMEOUT": "45s",
        "ZENPIPE_SERVER_ID": "scraper-07",
        "ZENPIPE_PGBOUNCER": "yes",
        "ZENPIPE_RESERVED_CONNECTIONS": "4",
        "ZENPIPE_FLEET_BUDGET": "",
        "ZENPIPE_HEARTBEAT_INTERVAL": "2",
        "ZENPIPE_HEARTBEAT_MISSES": "5",
    }
    s = Settings.from_env(env)
    assert (s.dsn, s.pool_min, s.pool_max, s.pool_floor) == (
        "host=db port=5433 dbname=zen",
        1,
        7,
        2,
    )
    assert s.pool_timeout == 1.5 and s.max_waiting == 9
    assert (s.statement_timeout, s.lock_timeout, s.idle_in_tx_timeout) == (120.0, 3.0, 45.0)
    assert s.server_id == "scraper-07" and s.pgbouncer is True
    assert s.reserved_connections == 4 and s.fleet_budget is None
    assert (s.heartbeat_interval, s.heartbeat_misses) == (2.0, 5)

    k = Settings.from_env(env, pool_max=3, pgbouncer=False, lock_timeout="250ms")
    assert (k.pool_max, k.pgbouncer, k.lock_timeout) == (3, False, 0.25)
    assert k.pool_min == 1  # the rest still from the environment


def test_every_field_has_one_variable() -> None:
    import dataclasses

    assert {f.name for f in dataclasses.fields(Settings)} == set(ENVIRONMENT)
    assert all(v.startswith("ZENPIPE_") for v in ENVIRONMENT.values())


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ZENPIPE_POOL_MAX", "ten"),
        ("ZENPIPE_POOL_MAX", "0"),
        ("ZENPIPE_POOL_MIN", "99"),
        ("ZENPIPE_POOL_TIMEOUT", "forever"),
        ("ZENPIPE_POOL_TIMEOUT", "0"),
        ("ZENPIPE_MAX_WAITING", "0"),
        ("ZENPIPE_STATEMENT_TIMEOUT", "-1"),
        ("ZENPIPE_PGBOUNCER", "maybe"),
        ("ZENPIPE_HEARTBEAT_MISSES", "0"),
        ("ZENPIPE_FLEET_BUDGET", "1"),
    ],
)
def test_invalid_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)
    assert isinstance(info.value, ZenpipeError) and isinstance(info.value, ValueError)


def test_invalid_keyword_names_the_keyword() -> None:
    with pytest.raises(ConfigError, match="pool_timeout"):
        Settings.from_env({}, pool_timeout="soon")
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.from_env({}, pool_size=3)


def test_parse_duration() -> None:
    assert parse_duration("250ms", name="x") == 0.25
    assert parse_duration("1.5", name="x") == 1.5
    assert parse_duration("2 min", name="x") == 120.0
    assert parse_duration(3, name="x") == 3.0
    with pytest.raises(ConfigError, match="x"):
        parse_duration("3 days", name="x")


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=db user=zen password={SECRET} dbname=zen",
        f"postgresql://zen:{SECRET}@db:5432/zen?sslmode=disable",
        f"host=db password='{SECRET}' dbname=zen",
    ],
)
def test_password_never_shown(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(dsn=dsn)
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert SECRET not in redacted_dsn(dsn) and "host=db" in redacted_dsn(dsn)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("zenpipe.test").info("settings: %s / %r / %s", s, s, s.redacted_dsn)
    assert "host=db" in caplog.text
    assert SECRET not in caplog.text


def test_unparseable_dsn_is_not_echoed() -> None:
    bad = f"host='db password={SECRET}"
    assert redacted_dsn(bad) == "<unparseable dsn>"
    with pytest.raises(ConfigError) as info:
        Settings(dsn=bad)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("auto", None),
        ("", None),
        ("on", True),
        ("ON", True),
        ("true", True),
        ("yes", True),
        ("off", False),
        ("false", False),
        ("no", False),
    ],
)
def test_pgbouncer_setting_is_auto_on_or_off(value: str, mode: bool | None) -> None:
    assert Settings.from_env({"ZENPIPE_PGBOUNCER": value}).pgbouncer is mode
    assert Settings.from_env({}).pgbouncer is None  # auto unless told


def test_pgbouncer_setting_names_its_choices() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ZENPIPE_PGBOUNCER": "maybe"})
    assert "ZENPIPE_PGBOUNCER" in str(info.value)
    assert all(word in str(info.value) for word in ("on", "off", "auto"))
