"""What the record modules share: the clock they stamp rows with, rows to models, errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from worker.core.models import Endpoint

# What a database that is away (or refusing) raises.
UNAVAILABLE = (OperationalError, DBAPIError, OSError)


def utcnow() -> datetime:
    return datetime.now(UTC)


def endpoint_from_row(row: Any) -> Endpoint:
    return Endpoint(
        id=row.id,
        url=row.url,
        secrets=tuple(row.secrets),
        event_types=tuple(row.event_types or ()),
        enabled=bool(row.enabled),
        disabled_reason=row.disabled_reason,
        description=row.description,
        created_at=row.created_at,
    )
