"""One typed settings object, read once from the environment."""

from __future__ import annotations

import ipaddress
import math
import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Original setup: 3 retries, exponential backoff capped at 10 minutes.
DEFAULT_RETRY_SCHEDULE = (30.0, 120.0, 600.0)
# Standard Webhooks' example schedule after the first attempt.
STANDARD_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)
# A delay past this is a misconfiguration, not a schedule.
MAX_RETRY_DELAY = 30 * 86400.0
# A rotated-out secret signing for longer than this is a misconfiguration.
MAX_SECRET_OVERLAP = 30 * 86400.0
RETRY_PRESETS = {"default": DEFAULT_RETRY_SCHEDULE, "standard": STANDARD_RETRY_SCHEDULE}


def _env(name: str, *aliases: str) -> AliasChoices:
    return AliasChoices(name, *aliases)


class Settings(BaseSettings):
    """Every knob of the worker; see the configuration table in the README."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # Broker
    redis_host: str = Field("localhost", validation_alias=_env("REDIS_HOST"))
    redis_port: int = Field(6379, validation_alias=_env("REDIS_PORT"))
    redis_db: int = Field(0, validation_alias=_env("REDIS_DB"))
    celery_broker_url: str | None = Field(None, validation_alias=_env("CELERY_BROKER_URL"))
    result_backend: str | None = Field(
        None, validation_alias=_env("WEBHOOKS_RESULT_BACKEND", "CELERY_RESULT_BACKEND"))
    # Celery task events (task-received, -succeeded…) for Flower and celery-exporter; and
    # task-sent, one more message from the producer for each task.
    task_events: bool = Field(True, validation_alias=_env("WEBHOOKS_TASK_EVENTS"))
    task_sent_events: bool = Field(True, validation_alias=_env("WEBHOOKS_TASK_SENT_EVENTS"))
    visibility_timeout: int = Field(3600, validation_alias=_env("WEBHOOKS_VISIBILITY_TIMEOUT"))
    concurrency: int = Field(4, ge=1, validation_alias=_env("WEBHOOKS_CONCURRENCY"))
    prefetch_multiplier: int = Field(200, ge=1, validation_alias=_env("WEBHOOKS_PREFETCH"))
    task_time_limit: int = Field(300, validation_alias=_env("WEBHOOKS_TASK_TIME_LIMIT"))
    task_soft_time_limit: int = Field(240, validation_alias=_env("WEBHOOKS_TASK_SOFT_TIME_LIMIT"))
    max_tasks_per_child: int = Field(1000, validation_alias=_env("WEBHOOKS_MAX_TASKS_PER_CHILD"))

    # Database
    database_url: str = Field(
        "sqlite+aiosqlite:///./webhooks.db", validation_alias=_env("DATABASE_URL")
    )
    db_pool_size: int = Field(5, ge=1, validation_alias=_env("WEBHOOKS_DB_POOL_SIZE"))

    # Sealing endpoint secrets (see "Secrets at rest" in the README)
    secret_keys: SecretStr | None = Field(None, validation_alias=_env("WEBHOOKS_SECRET_KEYS"))
    secret_key_file: str | None = Field(None, validation_alias=_env("WEBHOOKS_SECRET_KEY_FILE"))
    secret_overlap: float = Field(86400.0, ge=0, le=MAX_SECRET_OVERLAP, allow_inf_nan=False,
                                  validation_alias=_env("WEBHOOKS_SECRET_OVERLAP"))

    # Endpoint health
    breaker_failures: int = Field(5, ge=1, validation_alias=_env("WEBHOOKS_BREAKER_FAILURES"))
    breaker_cooldown: float = Field(
        60.0, gt=0, validation_alias=_env("WEBHOOKS_BREAKER_COOLDOWN")
    )
    disable_after: float = Field(
        5 * 86400.0, gt=0, validation_alias=_env("WEBHOOKS_DISABLE_AFTER")
    )
    rate_limit: float | None = Field(None, gt=0, validation_alias=_env("WEBHOOKS_RATE_LIMIT"))
    rate_burst: int = Field(1, ge=1, validation_alias=_env("WEBHOOKS_RATE_BURST"))

    # Gathering single-event messages (the engine commits them in groups)
    gather_size: int = Field(100, ge=1, validation_alias=_env("WEBHOOKS_GATHER_SIZE"))
    gather_interval: float = Field(0.05, gt=0, validation_alias=_env("WEBHOOKS_GATHER_INTERVAL"))
    max_events_per_message: int = Field(
        1000, ge=1, validation_alias=_env("WEBHOOKS_MAX_EVENTS_PER_MESSAGE")
    )

    # Engine
    max_in_flight: int = Field(1000, ge=1, validation_alias=_env("WEBHOOKS_MAX_IN_FLIGHT"))
    max_queued: int = Field(5000, ge=1, validation_alias=_env("WEBHOOKS_MAX_QUEUED"))
    park_limit: int = Field(500, ge=1, validation_alias=_env("WEBHOOKS_PARK_LIMIT"))
    spill_delay: float = Field(5.0, ge=0, validation_alias=_env("WEBHOOKS_SPILL_DELAY"))
    slow_endpoint_seconds: float = Field(
        1.0, gt=0, validation_alias=_env("WEBHOOKS_SLOW_ENDPOINT_SECONDS")
    )
    per_endpoint_limit: int = Field(
        256, ge=1, validation_alias=_env("WEBHOOKS_PER_ENDPOINT_LIMIT")
    )
    connect_timeout: float = Field(5.0, gt=0, validation_alias=_env("WEBHOOKS_CONNECT_TIMEOUT"))
    request_timeout: float = Field(15.0, gt=0, validation_alias=_env("WEBHOOKS_REQUEST_TIMEOUT"))
    accept_timeout: float = Field(60.0, gt=0, validation_alias=_env("WEBHOOKS_ACCEPT_TIMEOUT"))
    requeue_delay: float = Field(5.0, gt=0, validation_alias=_env("WEBHOOKS_REQUEUE_DELAY"))
    max_requeue_delay: float = Field(
        60.0, gt=0, validation_alias=_env("WEBHOOKS_MAX_REQUEUE_DELAY")
    )
    rescue_after: float = Field(90.0, gt=0, validation_alias=_env("WEBHOOKS_RESCUE_AFTER"))
    rescue_interval: float = Field(15.0, gt=0, validation_alias=_env("WEBHOOKS_RESCUE_INTERVAL"))
    poison_tries: int = Field(3, ge=1, validation_alias=_env("WEBHOOKS_POISON_TRIES"))
    response_excerpt_bytes: int = Field(
        2048, ge=0, validation_alias=_env("WEBHOOKS_RESPONSE_EXCERPT_BYTES")
    )
    max_payload_bytes: int = Field(
        262144, ge=2, validation_alias=_env("WEBHOOKS_MAX_PAYLOAD_BYTES")
    )
    lease_seconds: float = Field(120.0, gt=0, validation_alias=_env("WEBHOOKS_LEASE_SECONDS"))
    flush_interval: float = Field(0.05, gt=0, validation_alias=_env("WEBHOOKS_FLUSH_INTERVAL"))
    flush_size: int = Field(500, ge=1, validation_alias=_env("WEBHOOKS_FLUSH_SIZE"))
    shutdown_grace: float = Field(10.0, ge=0, validation_alias=_env("WEBHOOKS_SHUTDOWN_GRACE"))
    allowed_networks: Annotated[
        tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], NoDecode
    ] = Field((), validation_alias=_env("WEBHOOKS_ALLOWED_NETWORKS"))

    # Retries and retention
    retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        DEFAULT_RETRY_SCHEDULE, validation_alias=_env("WEBHOOKS_RETRY_SCHEDULE")
    )
    retry_jitter: float = Field(0.2, ge=0, lt=1, validation_alias=_env("WEBHOOKS_RETRY_JITTER"))
    max_retry_after: float = Field(86400.0, gt=0, validation_alias=_env("WEBHOOKS_MAX_RETRY_AFTER"))
    # Beat's sweep is a safety net (the original setup's 5 minutes); each engine claims its
    # due retries itself, at their time, waking at least every claim_interval.
    sweep_interval: float = Field(300.0, gt=0, validation_alias=_env("WEBHOOKS_SWEEP_INTERVAL"))
    claim_interval: float = Field(
        2.0, ge=0, validation_alias=_env("WEBHOOKS_CLAIM_INTERVAL"))  # 0: beat's sweep only
    # SQLite has no NOTIFY: outbox rows committed by another process are claimed within this.
    outbox_poll: float = Field(0.25, ge=0, validation_alias=_env("WEBHOOKS_OUTBOX_POLL"))
    sweep_limit: int = Field(2000, ge=1, validation_alias=_env("WEBHOOKS_SWEEP_LIMIT"))
    retention_days: float = Field(90.0, gt=0, validation_alias=_env("WEBHOOKS_RETENTION_DAYS"))
    cleanup_chunk: int = Field(5000, ge=1, validation_alias=_env("WEBHOOKS_CLEANUP_CHUNK"))
    idempotency_window: float = Field(
        86400.0, gt=0, validation_alias=_env("WEBHOOKS_IDEMPOTENCY_WINDOW")
    )

    gc_threshold: int = Field(50_000, ge=0, validation_alias=_env("WEBHOOKS_GC_THRESHOLD"))
    # Operator events go to this endpoint, as ordinary signed deliveries (none when unset).
    operator_endpoint: str | None = Field(
        None, validation_alias=_env("WEBHOOKS_OPERATOR_ENDPOINT"))
    backlog_alert_seconds: float = Field(
        300.0, gt=0, validation_alias=_env("WEBHOOKS_BACKLOG_ALERT_SECONDS"))
    log_level: str = Field("INFO", validation_alias=_env("WEBHOOKS_LOG_LEVEL"))
    log_format: Literal["logfmt", "json"] = Field(
        "logfmt", validation_alias=_env("WEBHOOKS_LOG_FORMAT"))
    # The level of a successful attempt's line: INFO, or DEBUG to keep only trouble at INFO.
    success_log_level: Literal["INFO", "DEBUG"] = Field(
        "INFO", validation_alias=_env("WEBHOOKS_SUCCESS_LOG_LEVEL"))
    stats_interval: float = Field(60.0, gt=0, validation_alias=_env("WEBHOOKS_STATS_INTERVAL"))
    # Set by systemd when stdout goes to the journal.
    journal_stream: str | None = Field(None, validation_alias=_env("JOURNAL_STREAM"))

    # Metrics (see "Metrics" in the README). The directory makes every process of a host
    # (Celery's main process and its prefork children) count into one place.
    metrics_dir: str | None = Field(None, validation_alias=_env("WEBHOOKS_METRICS_DIR"))
    metrics_port: int | None = Field(
        None, ge=1, le=65535, validation_alias=_env("WEBHOOKS_METRICS_PORT"))
    metrics_host: str = Field("127.0.0.1", validation_alias=_env("WEBHOOKS_METRICS_HOST"))
    metrics_database: bool = Field(True, validation_alias=_env("WEBHOOKS_METRICS_DATABASE"))
    metrics_endpoint_label: Literal["none", "id", "host"] = Field(
        "none", validation_alias=_env("WEBHOOKS_METRICS_ENDPOINT_LABEL"))
    metrics_endpoint_limit: int = Field(
        50, ge=1, validation_alias=_env("WEBHOOKS_METRICS_ENDPOINT_LIMIT"))
    metrics_db_timeout: float = Field(
        5.0, gt=0, validation_alias=_env("WEBHOOKS_METRICS_DB_TIMEOUT"))
    metrics_count_limit: int = Field(
        100_000, ge=1, validation_alias=_env("WEBHOOKS_METRICS_COUNT_LIMIT"))

    # The web UI (`webhooks ui`) and the partner portal (`webhooks portal-link`).
    ui_host: str = Field("127.0.0.1", validation_alias=_env("WEBHOOKS_UI_HOST"))
    ui_port: int = Field(8400, ge=0, le=65535, validation_alias=_env("WEBHOOKS_UI_PORT"))
    # Required off loopback; on loopback a random one is made at start when unset.
    ui_token: SecretStr | None = Field(None, validation_alias=_env("WEBHOOKS_UI_TOKEN"))
    # Signs portal links; unset: derived from the sealing key ring (WEBHOOKS_SECRET_KEYS).
    ui_secret: SecretStr | None = Field(None, validation_alias=_env("WEBHOOKS_UI_SECRET"))
    # Where partners reach the UI, the base of portal links; unset: http://UI_HOST:UI_PORT.
    ui_public_url: str | None = Field(None, validation_alias=_env("WEBHOOKS_UI_PUBLIC_URL"))
    # Origins allowed to frame the portal (CSP frame-ancestors); unset: nobody may.
    portal_frame_ancestors: str | None = Field(
        None, validation_alias=_env("WEBHOOKS_PORTAL_FRAME_ANCESTORS"))
    ui_db_timeout: float = Field(5.0, gt=0, validation_alias=_env("WEBHOOKS_UI_DB_TIMEOUT"))

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Plain `postgresql://` and `sqlite://` URLs get the async driver this worker uses."""
        scheme, sep, rest = value.partition("://")
        if not sep:
            raise ValueError(f"DATABASE_URL must look like postgresql+asyncpg://user@host/db or "
                             f"sqlite+aiosqlite:///path, not {value!r}")
        drivers = {"postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg",
                   "sqlite": "sqlite+aiosqlite"}
        if scheme in drivers:
            return f"{drivers[scheme]}://{rest}"
        if scheme not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
            raise ValueError(f"DATABASE_URL uses {scheme!r}; this worker runs on "
                             "postgresql+asyncpg:// or sqlite+aiosqlite://")
        return value

    @field_validator("portal_frame_ancestors")
    @classmethod
    def _check_ancestors(cls, value: str | None) -> str | None:
        """Space-separated CSP sources: origins like https://app.example.com, or 'self'."""
        if value is None or not value.strip():
            return None
        for source in value.split():
            if not re.fullmatch(r"'self'|https?://[A-Za-z0-9.*:\[\]-]+(:[0-9]+)?/?", source):
                raise ValueError(
                    "WEBHOOKS_PORTAL_FRAME_ANCESTORS takes space-separated origins such as "
                    f"https://app.example.com (or 'self'), not {source!r}")
        return " ".join(value.split())

    @field_validator("ui_public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value.strip()):
            raise ValueError(f"WEBHOOKS_UI_PUBLIC_URL must be an http(s) URL, not {value!r}")
        return value.strip().rstrip("/")

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: object) -> object:
        if isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
            try:
                return tuple(ipaddress.ip_network(item, strict=False) for item in items)
            except ValueError as exc:
                raise ValueError(f"WEBHOOKS_ALLOWED_NETWORKS: {exc}") from exc
        return value

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text in RETRY_PRESETS:
                return RETRY_PRESETS[text]
            if text in ("", "none"):
                return ()
            try:
                return tuple(float(part) for part in text.split(","))
            except ValueError as exc:
                raise ValueError(
                    "WEBHOOKS_RETRY_SCHEDULE takes 'default', 'standard', 'none' "
                    f"or comma-separated seconds, not {value!r}"
                ) from exc
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _check_schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(math.isfinite(delay) and 0 <= delay <= MAX_RETRY_DELAY for delay in value):
            raise ValueError(f"retry delays must be finite, 0..{MAX_RETRY_DELAY:.0f} seconds")
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("the soft time limit must be below the hard time limit")
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError("the Redis visibility timeout must exceed the task hard time limit")
        if self.rescue_after <= self.accept_timeout:
            raise ValueError("WEBHOOKS_RESCUE_AFTER must exceed WEBHOOKS_ACCEPT_TIMEOUT: a message "
                             "still being committed must not count as abandoned")
        if self.lease_seconds <= self.request_timeout:
            raise ValueError("the delivery lease must outlast one request (request_timeout)")
        return self

    @property
    def broker_url(self) -> str:
        if self.celery_broker_url:
            return self.celery_broker_url
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
