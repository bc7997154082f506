"""Settings read from the environment (constructed directly, never via get_settings())."""

from __future__ import annotations

import ipaddress
import os
import re

import pytest
from pydantic import ValidationError

from worker.settings import (
    DEFAULT_RETRY_SCHEDULE,
    STANDARD_RETRY_SCHEDULE,
    Settings,
)


def _env_names() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        for choice in getattr(alias, "choices", ()):
            names.add(str(choice).upper())
    return names


ENV_NAMES = _env_names()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the machine running the tests."""
    for name in list(os.environ):
        if name.upper() in ENV_NAMES:
            monkeypatch.delenv(name)


def test_env_names_cover_the_variables_under_test() -> None:
    assert {"REDIS_HOST", "REDIS_PORT", "REDIS_DB", "CELERY_BROKER_URL",
            "WEBHOOKS_ALLOWED_NETWORKS", "WEBHOOKS_RETRY_SCHEDULE"} <= ENV_NAMES


# --- defaults ----------------------------------------------------------------------------


def test_defaults_without_environment() -> None:
    s = Settings()
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.retry_schedule == DEFAULT_RETRY_SCHEDULE
    assert s.allowed_networks == ()
    assert (s.task_soft_time_limit, s.task_time_limit, s.visibility_timeout) == (240, 300, 3600)
    assert (s.request_timeout, s.lease_seconds) == (15.0, 120.0)


# --- broker ------------------------------------------------------------------------------


def test_broker_url_is_built_from_redis_host_port_db(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "redis.internal")
    monkeypatch.setenv("REDIS_PORT", "6380")
    monkeypatch.setenv("REDIS_DB", "3")
    s = Settings()
    assert (s.redis_host, s.redis_port, s.redis_db) == ("redis.internal", 6380, 3)
    assert s.broker_url == "redis://redis.internal:6380/3"


def test_celery_broker_url_wins_over_redis_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "ignored")
    monkeypatch.setenv("REDIS_PORT", "1")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:secret@broker:6379/9")
    assert Settings().broker_url == "redis://:secret@broker:6379/9"


def test_empty_celery_broker_url_falls_back_to_redis_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "")
    monkeypatch.setenv("REDIS_HOST", "r")
    assert Settings().broker_url == "redis://r:6379/0"


@pytest.mark.parametrize("name", ["REDIS_PORT", "REDIS_DB"])
def test_non_integer_redis_port_or_db_is_an_error(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "six")
    with pytest.raises(ValidationError, match=f"{name}\n.*valid integer"):
        Settings()


# --- allowed networks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.0/8", ("127.0.0.0/8",)),
        ("127.0.0.0/8,::1/128", ("127.0.0.0/8", "::1/128")),
        (" 10.0.0.0/8 , 192.168.0.0/16 ,", ("10.0.0.0/8", "192.168.0.0/16")),
        ("10.1.2.3", ("10.1.2.3/32",)),
        ("10.1.2.3/8", ("10.0.0.0/8",)),  # host bits are dropped (strict=False)
        ("fd00::1/8", ("fd00::/8",)),
        ("", ()),
        (" , ,", ()),
    ],
)
def test_allowed_networks_parses_a_comma_list(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    monkeypatch.setenv("WEBHOOKS_ALLOWED_NETWORKS", value)
    assert Settings().allowed_networks == tuple(ipaddress.ip_network(n) for n in expected)


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-a-network", "10.0.0.0/8,banana",
                                   "300.0.0.0/8", "::1/129"])
def test_allowed_networks_bad_cidr_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("WEBHOOKS_ALLOWED_NETWORKS", value)
    with pytest.raises(ValidationError, match=r"WEBHOOKS_ALLOWED_NETWORKS: .*does not appear"):
        Settings()


def test_allowed_networks_accepts_network_objects_directly() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"),)
    assert Settings(allowed_networks=nets).allowed_networks == nets


# --- retry schedule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("default", DEFAULT_RETRY_SCHEDULE),
        ("standard", STANDARD_RETRY_SCHEDULE),
        ("  standard  ", STANDARD_RETRY_SCHEDULE),
        ("none", ()),
        ("", ()),
        ("1,2.5", (1.0, 2.5)),
        ("1, 2.5 ,10", (1.0, 2.5, 10.0)),
        ("0", (0.0,)),
        ("60", (60.0,)),
    ],
)
def test_retry_schedule_presets_and_lists(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[float, ...]
) -> None:
    monkeypatch.setenv("WEBHOOKS_RETRY_SCHEDULE", value)
    s = Settings()
    assert s.retry_schedule == expected


@pytest.mark.parametrize("value", ["fast", "Default", "1,,2", "1;2", "1,two", "1,", "30s"])
def test_retry_schedule_garbage_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("WEBHOOKS_RETRY_SCHEDULE", value)
    with pytest.raises(ValidationError, match="WEBHOOKS_RETRY_SCHEDULE takes"):
        Settings()


@pytest.mark.parametrize("value", ["-1", "5,-0.5", "-30,60"])
def test_retry_schedule_negative_delay_is_an_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("WEBHOOKS_RETRY_SCHEDULE", value)
    with pytest.raises(ValidationError, match=r"finite, 0\.\.2592000 seconds"):
        Settings()


@pytest.mark.parametrize("value", ["nan", "inf", "5,nan", "60,Infinity"])
def test_retry_schedule_non_finite_delay_is_an_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # a NaN/inf delay reaches decide(), where timedelta(seconds=...) raises
    monkeypatch.setenv("WEBHOOKS_RETRY_SCHEDULE", value)
    with pytest.raises(ValidationError):
        Settings()


# --- model validators --------------------------------------------------------------------


@pytest.mark.parametrize(("soft", "hard"), [("300", "300"), ("301", "300"), ("10", "5")])
def test_soft_time_limit_at_or_above_hard_limit_is_an_error(
    monkeypatch: pytest.MonkeyPatch, soft: str, hard: str
) -> None:
    monkeypatch.setenv("WEBHOOKS_TASK_SOFT_TIME_LIMIT", soft)
    monkeypatch.setenv("WEBHOOKS_TASK_TIME_LIMIT", hard)
    with pytest.raises(ValidationError, match="soft time limit"):
        Settings()


def test_soft_time_limit_just_below_hard_limit_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKS_TASK_SOFT_TIME_LIMIT", "299")
    monkeypatch.setenv("WEBHOOKS_TASK_TIME_LIMIT", "300")
    assert Settings().task_soft_time_limit == 299


@pytest.mark.parametrize("visibility", ["300", "299", "10"])
def test_visibility_timeout_at_or_below_hard_limit_is_an_error(
    monkeypatch: pytest.MonkeyPatch, visibility: str
) -> None:
    monkeypatch.setenv("WEBHOOKS_VISIBILITY_TIMEOUT", visibility)
    monkeypatch.setenv("WEBHOOKS_TASK_TIME_LIMIT", "300")
    with pytest.raises(ValidationError, match="visibility timeout"):
        Settings()


def test_visibility_timeout_just_above_hard_limit_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKS_VISIBILITY_TIMEOUT", "301")
    monkeypatch.setenv("WEBHOOKS_TASK_TIME_LIMIT", "300")
    assert Settings().visibility_timeout == 301


@pytest.mark.parametrize(("lease", "timeout"), [("15", "15"), ("10", "15"), ("15", "15.5")])
def test_lease_at_or_below_request_timeout_is_an_error(
    monkeypatch: pytest.MonkeyPatch, lease: str, timeout: str
) -> None:
    monkeypatch.setenv("WEBHOOKS_LEASE_SECONDS", lease)
    monkeypatch.setenv("WEBHOOKS_REQUEST_TIMEOUT", timeout)
    with pytest.raises(ValidationError, match="lease"):
        Settings()


def test_lease_just_above_request_timeout_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKS_LEASE_SECONDS", "15.5")
    monkeypatch.setenv("WEBHOOKS_REQUEST_TIMEOUT", "15")
    assert Settings().lease_seconds == 15.5


# --- field bounds and other knobs --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WEBHOOKS_RETRY_JITTER", "1"),
        ("WEBHOOKS_RETRY_JITTER", "-0.1"),
        ("WEBHOOKS_CONCURRENCY", "0"),
        ("WEBHOOKS_MAX_PAYLOAD_BYTES", "1"),
        ("WEBHOOKS_REQUEST_TIMEOUT", "0"),
        ("WEBHOOKS_MAX_RETRY_AFTER", "0"),
    ],
)
def test_out_of_range_values_are_errors(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_numeric_knobs_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKS_RETRY_JITTER", "0")
    monkeypatch.setenv("WEBHOOKS_MAX_RETRY_AFTER", "3600")
    monkeypatch.setenv("WEBHOOKS_MAX_PAYLOAD_BYTES", "2")
    s = Settings()
    assert (s.retry_jitter, s.max_retry_after, s.max_payload_bytes) == (0.0, 3600.0, 2)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.redis_host = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("given", "used"), [
    ("postgresql://u:p@db.example:5432/hooks", "postgresql+asyncpg://u:p@db.example:5432/hooks"),
    ("postgres://u@db/hooks", "postgresql+asyncpg://u@db/hooks"),
    ("postgresql+asyncpg://u@db/hooks", "postgresql+asyncpg://u@db/hooks"),
    ("sqlite:///./webhooks.db", "sqlite+aiosqlite:///./webhooks.db"),
    ("sqlite+aiosqlite:////var/lib/w/webhooks.db", "sqlite+aiosqlite:////var/lib/w/webhooks.db"),
])
def test_plain_database_urls_get_the_async_driver(given: str, used: str) -> None:
    assert Settings(database_url=given).database_url == used


@pytest.mark.parametrize(("given", "says"), [
    ("postgresql+psycopg2://u@db/hooks", "postgresql+asyncpg://"),
    ("mysql://u@db/hooks", "postgresql+asyncpg://"),
    ("just-a-path.db", "must look like"),
])
def test_other_database_urls_are_one_clear_error(given: str, says: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(says)):
        Settings(database_url=given)
