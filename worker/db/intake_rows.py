"""New delivery rows, built without I/O (PROVISIONAL copy of the contract on main: part 2
lands the real module; on merge, main's version wins)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite

from worker.core.errors import StoreUnavailable
from worker.core.health import CIRCUIT_WAIT
from worker.core.models import DeliveryStatus, Endpoint, usable_endpoint
from worker.core.validation import ValidEvent
from worker.db.schema import deliveries


@dataclass(frozen=True, slots=True)
class NewRow:
    row: dict[str, Any]
    send_now: bool


def delivery_row(delivery_id: str, event: ValidEvent, endpoint: Endpoint,
                 now: datetime) -> NewRow:
    """A complete, unleased `deliveries` row for `event` bound for `endpoint`."""
    row: dict[str, Any] = {
        "id": delivery_id, "endpoint_id": endpoint.id, "event_type": event.event_type,
        "idempotency_key": event.idempotency_key, "payload": event.payload,
        "status": DeliveryStatus.PENDING.value, "attempts": 0, "retry_base": 0,
        "next_attempt_at": now, "locked_until": None, "last_status_code": None,
        "last_error": None, "created_at": now, "updated_at": now, "task_id": None,
        "ordering_key": getattr(event, "ordering_key", None), "fifo_seq": None,
    }
    usable = usable_endpoint(endpoint.id, endpoint)
    if not isinstance(usable, Endpoint):
        row.update(status=DeliveryStatus.HELD.value, next_attempt_at=None,
                   last_error=usable.message)
        return NewRow(row, False)
    if endpoint.circuit_open_until is not None:
        row.update(next_attempt_at=max(endpoint.circuit_open_until, now),
                   last_error=CIRCUIT_WAIT)
        return NewRow(row, False)
    return NewRow(row, True)


def insert_ignoring_duplicates(dialect_name: str) -> Any:
    """INSERT … ON CONFLICT DO NOTHING on deliveries."""
    if dialect_name == "postgresql":
        return postgresql.insert(deliveries).on_conflict_do_nothing()
    if dialect_name == "sqlite":
        return sqlite.insert(deliveries).on_conflict_do_nothing()
    raise StoreUnavailable(f"idempotency keys need PostgreSQL or SQLite, not {dialect_name}")
