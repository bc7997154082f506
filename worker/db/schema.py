"""The tables. Core, not ORM: every write is a bulk statement."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import DateTime, TypeDecorator

from worker.core.models import (
    ENDPOINT_ID_MAX,
    EVENT_TYPE_MAX,
    IDEMPOTENCY_KEY_MAX,
    ORDERING_KEY_MAX,
    TASK_ID_MAX,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every dialect."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite compares the stored text: keep one naive UTC spelling there.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

endpoints = Table(
    "endpoints",
    metadata,
    Column("id", String(ENDPOINT_ID_MAX), primary_key=True),
    Column("url", Text, nullable=False),
    # Signing secrets and static headers, sealed together (worker.core.credentials): the
    # table holds no secret in any encoding.
    Column("credentials", Text, nullable=False),
    Column("event_types", JSON, nullable=False),  # empty list: every type
    Column("enabled", Boolean, nullable=False, default=True),
    Column("disabled_reason", Text),
    Column("description", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("verify_tls", Boolean, nullable=False, default=True),
    Column("max_in_flight", Integer),  # NULL: the global default
    Column("rate_limit", Float),  # events per second across all workers; NULL: none
    Column("rate_burst", Integer),
    # Health, shared by every worker: the circuit breaker and the automatic disable read it.
    Column("failure_streak", Integer, nullable=False, default=0),
    Column("failing_since", UTCDateTime),
    Column("circuit_open_until", UTCDateTime),
    # "fifo": one delivery at a time per ordering key, in enqueue order; "none": any order.
    Column("ordering", String(8), nullable=False, default="none", server_default="none"),
)

# endpoint_id is not a foreign key: rejected events name endpoints that do not exist,
# and delivery history outlives a deleted endpoint.
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("endpoint_id", String(ENDPOINT_ID_MAX), nullable=False),
    Column("event_type", String(EVENT_TYPE_MAX)),
    Column("idempotency_key", String(IDEMPOTENCY_KEY_MAX)),
    Column("payload", LargeBinary),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    # Attempts made before the last replay: the retry budget counts from here, while attempt
    # numbers run on across replays.
    Column("retry_base", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime),
    Column("locked_until", UTCDateTime),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The Celery task (message) that brought it, so a task id leads to its deliveries.
    Column("task_id", String(TASK_ID_MAX)),
    # FIFO endpoints only: the queue within the endpoint ("" is the whole endpoint) and the
    # place in it, given at enqueue under a lock on that queue.
    Column("ordering_key", String(ORDERING_KEY_MAX)),
    Column("fifo_seq", BigInteger),
    Index("ix_deliveries_due", "status", "next_attempt_at"),
    Index("ix_deliveries_created_at", "created_at"),
    Index("ix_deliveries_endpoint", "endpoint_id", "created_at"),
    Index("uq_deliveries_idempotency", "endpoint_id", "idempotency_key", unique=True),
    Index("ix_deliveries_task", "task_id"),
    # Status before place: "is anything still unsent ahead of me" and "the last unsent
    # place" are then a probe or two, however long the queue's history.
    Index("ix_deliveries_fifo", "endpoint_id", "ordering_key", "status", "fifo_seq"),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", String(40), nullable=False, index=True),
    Column("attempt_number", Integer, nullable=False),
    Column("attempted_at", UTCDateTime, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("status_code", Integer),
    Column("outcome", String(16), nullable=False),
    Column("error_kind", String(32)),
    Column("error", Text),
    Column("response_excerpt", Text),
    # The headers sent, secrets left out (static header values are replaced by "(sealed)").
    Column("request_headers", JSON),
)
