"""New `deliveries` rows, as the `.delay()` intake and the outbox both write them (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Update, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from worker.core.errors import StoreUnavailable
from worker.core.health import CIRCUIT_WAIT
from worker.core.models import ENDPOINT_ID_MAX, DeliveryStatus, Endpoint, Ordering, Rejection
from worker.core.validation import ValidEvent
from worker.db.schema import deliveries

# A FIFO endpoint's deliveries without an ordering key share this one queue.
WHOLE_ENDPOINT = ""


@dataclass(frozen=True, slots=True)
class NewRow:
    row: dict[str, Any]  # a complete deliveries row, unleased
    send_now: bool  # nothing stands in its way: the intake may lease it and send at once


def row_defaults(now: datetime) -> dict[str, Any]:
    return {"status": DeliveryStatus.PENDING.value, "attempts": 0, "retry_base": 0,
            "next_attempt_at": now, "locked_until": None, "created_at": now, "updated_at": now,
            "last_status_code": None, "last_error": None, "task_id": None,
            "ordering_key": None, "fifo_seq": None}


def delivery_row(delivery_id: str, event: ValidEvent, endpoint: Endpoint,
                 now: datetime) -> NewRow:
    """The row for `event` to `endpoint`: held while the endpoint is disabled, waiting for an
    open circuit, queued behind its predecessors on a FIFO endpoint, else due now."""
    row = {**row_defaults(now), "id": delivery_id, "endpoint_id": endpoint.id,
           "event_type": event.event_type, "idempotency_key": event.idempotency_key,
           "payload": event.payload}
    fifo = endpoint.ordering is Ordering.FIFO
    if fifo:
        # Its place (fifo_seq) is given in the inserting transaction (worker.db.fifo).
        row["ordering_key"] = event.ordering_key or WHOLE_ENDPOINT
    if not endpoint.enabled:
        # Kept, not refused: it is sent once the endpoint is enabled again.
        reason = endpoint.disabled_reason or "by operator"
        row.update(status=DeliveryStatus.HELD.value, next_attempt_at=None,
                   last_error=f"endpoint {endpoint.id!r} is disabled: {reason}")
        return NewRow(row, send_now=False)
    if endpoint.circuit_open_until is not None:
        # The circuit decides when; the claim loop hands it out then, no attempt before.
        row.update(next_attempt_at=max(endpoint.circuit_open_until, now),
                   last_error=CIRCUIT_WAIT)
        return NewRow(row, send_now=False)
    # A FIFO delivery waits for the claim loop, which hands out only each queue's head.
    return NewRow(row, send_now=not fifo)


def rejection_row(row_id: str, rejection: Rejection, now: datetime) -> dict[str, Any]:
    """The record of an event that was refused: never attempted, kept for the operator."""
    return {**row_defaults(now), "id": row_id,
            "endpoint_id": rejection.webhook_id[:ENDPOINT_ID_MAX],
            "event_type": rejection.event_type, "idempotency_key": None,
            "payload": rejection.payload, "status": DeliveryStatus.REJECTED.value,
            "next_attempt_at": None, "last_error": f"{rejection.code}: {rejection.message}",
            "task_id": rejection.task_id}


def release_expired_keys(rows: Sequence[Mapping[str, Any]], cutoff: datetime) -> Update | None:
    """The UPDATE that frees the rows' (endpoint, idempotency key) pairs last used before
    `cutoff` (outside the idempotency window), so the unique index no longer refuses them;
    run it before inserting `rows`. None when no row has a key."""
    keyed = sorted({(row["endpoint_id"], row["idempotency_key"]) for row in rows
                    if row.get("idempotency_key") is not None})
    if not keyed:
        return None
    return (update(deliveries)
            .where(tuple_(deliveries.c.endpoint_id, deliveries.c.idempotency_key).in_(keyed),
                   deliveries.c.created_at < cutoff)
            .values(idempotency_key=None))


def insert_ignoring_duplicates(dialect_name: str) -> Any:
    """INSERT INTO deliveries … ON CONFLICT DO NOTHING: a known id or a used idempotency key
    leaves the row out instead of failing the transaction."""
    if dialect_name == "postgresql":
        return postgresql.insert(deliveries).on_conflict_do_nothing()
    if dialect_name == "sqlite":
        return sqlite.insert(deliveries).on_conflict_do_nothing()
    raise StoreUnavailable(f"idempotency keys need PostgreSQL or SQLite, not {dialect_name}")
