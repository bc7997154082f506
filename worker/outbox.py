"""Transactional enqueue: webhook deliveries written in the producer's own transaction.

`.delay()` sends a message to Redis beside the producer's transaction, so a rolled-back
transaction can still send its webhook, and a process dying between commit and `.delay()`
loses it. Here the delivery row is written by the producer's own connection, in its own
transaction, into the worker's tables (the same database): committed means delivered,
rolled back means never sent. No Celery message is involved: every worker's claim loop
claims due rows in bulk, woken by a PostgreSQL NOTIFY sent on commit (SQLite: a short poll).

    from sqlalchemy.orm import Session
    from worker import outbox

    with Session(engine) as session, session.begin():
        session.add(application)
        outbox.enqueue(session, webhook_id="webhook-xyz",
                       event_data={"type": "application.submitted", "data": {...}},
                       idempotency_key=f"app-{application.id}-submitted")

    async with AsyncSession(async_engine) as session, session.begin():
        await outbox.enqueue_async(session, webhook_id="webhook-xyz", event_data={...})

`conn` is a SQLAlchemy `Session` or `Connection` (sync functions) or an `AsyncSession` or
`AsyncConnection` (the `*_async` twins). Nothing here commits. Refusals are raised before
anything is written, so the transaction stays usable: `InvalidEvent` (with `.code`: a bad
payload or id as at `.delay()`, or `unknown_endpoint`) and `OutboxError` (the database is
not the worker's, or not migrated). A disabled endpoint's event is kept `held`, as with
`.delay()`. An idempotency key used inside `WEBHOOKS_IDEMPOTENCY_WINDOW` gives `None`
instead of an id, without an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from worker.core.errors import InvalidEvent, OutboxError
from worker.core.ids import new_id
from worker.core.messages import fan_out_body
from worker.core.models import Endpoint
from worker.core.validation import ValidEvent, validate_event
from worker.db import outbox_store
from worker.db.intake_rows import delivery_row
from worker.db.rows import utcnow
from worker.settings import Settings, get_settings

__all__ = ["enqueue", "enqueue_async", "enqueue_many", "enqueue_many_async", "publish",
           "publish_async"]

EVENT_FIELDS = frozenset({"webhook_id", "event_data", "idempotency_key", "ordering_key"})
# Delivery ids: time-ordered and random, with the prefix every delivery id has. Not derived
# from the idempotency key: once the key's window has passed, a new delivery may reuse it,
# and a derived id would collide with the old row for ever.
ID_PREFIX = "msg"


# -- pure: validation and rows ----------------------------------------------------------------

def _validate(webhook_id: Any, event_data: Any, idempotency_key: Any, ordering_key: Any,
              settings: Settings, event_type: Any = None) -> ValidEvent:
    """One event checked exactly as `.delay()` checks it; raises InvalidEvent."""
    return validate_event(webhook_id, event_data, max_payload_bytes=settings.max_payload_bytes,
                          idempotency_key=idempotency_key, event_type=event_type,
                          ordering_key=ordering_key)


def _from_mapping(item: Any, settings: Settings) -> ValidEvent:
    if not isinstance(item, Mapping):
        raise InvalidEvent("bad_arguments", "each event must be a mapping with webhook_id and "
                           f"event_data, not {type(item).__name__}")
    unknown = set(item) - EVENT_FIELDS
    if unknown:
        raise InvalidEvent("bad_arguments",
                           f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    if "webhook_id" not in item or "event_data" not in item:
        raise InvalidEvent("bad_arguments", "each event needs webhook_id and event_data")
    return _validate(item["webhook_id"], item["event_data"], item.get("idempotency_key"),
                     item.get("ordering_key"), settings)


def plan_rows(events: Sequence[ValidEvent], eps: Mapping[str, Endpoint],
              now: datetime) -> list[dict[str, Any]]:
    """The delivery rows for `events`, given their endpoints; raises InvalidEvent (code
    `unknown_endpoint`) for an endpoint that does not exist, before anything is written."""
    unknown = sorted({ev.webhook_id for ev in events if ev.webhook_id not in eps})
    if unknown:
        names = ", ".join(repr(u) for u in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise InvalidEvent("unknown_endpoint", f"no endpoint with id {names}")
    return [delivery_row(new_id(ID_PREFIX), ev, eps[ev.webhook_id], now).row for ev in events]


# -- on the producer's connection (sync; the async twins run it through run_sync) ---------

def _write(conn: Connection, events: Sequence[ValidEvent], settings: Settings) -> list[str | None]:
    outbox_store.check_schema(conn)
    eps = outbox_store.read_endpoints(conn, (ev.webhook_id for ev in events))
    now = utcnow()
    rows = plan_rows(events, eps, now)
    inserted = outbox_store.insert_rows(
        conn, rows, now - timedelta(seconds=settings.idempotency_window))
    return [row["id"] if row["id"] in inserted else None for row in rows]


def _fan_out(conn: Connection, template: ValidEvent, settings: Settings) -> list[str]:
    outbox_store.check_schema(conn)
    assert template.event_type is not None
    eps = outbox_store.read_subscribed(conn, template.event_type)
    now = utcnow()
    events = [replace(template, webhook_id=ep.id) for ep in eps]
    rows = plan_rows(events, {ep.id: ep for ep in eps}, now)
    inserted = outbox_store.insert_rows(
        conn, rows, now - timedelta(seconds=settings.idempotency_window))
    return [row["id"] for row in rows if row["id"] in inserted]


def _fan_out_event(event_type: Any, data: Any, idempotency_key: Any,
                   settings: Settings) -> ValidEvent:
    """The Standard Webhooks envelope, checked once for every subscribed endpoint."""
    if not isinstance(event_type, str):
        raise InvalidEvent("invalid_event_type", "event_type must be a non-empty string")
    body = fan_out_body(event_type, data, utcnow())
    # The endpoint id is filled in per subscriber.
    return _validate("fan-out", body, idempotency_key, None, settings, event_type=event_type)


def _sync_connection(conn: Session | Connection) -> Connection:
    if isinstance(conn, Session):
        return conn.connection()  # the session's transaction, begun if need be
    if isinstance(conn, Connection):
        return conn
    raise OutboxError(f"outbox needs a SQLAlchemy Session or Connection, not "
                      f"{type(conn).__name__} (use the *_async functions for async ones)")


async def _async_connection(conn: AsyncSession | AsyncConnection) -> AsyncConnection:
    if isinstance(conn, AsyncSession):
        return await conn.connection()
    if isinstance(conn, AsyncConnection):
        return conn
    raise OutboxError(f"outbox's *_async functions need an AsyncSession or AsyncConnection, "
                      f"not {type(conn).__name__}")


# -- the API -------------------------------------------------------------------------------

def enqueue(conn: Session | Connection, *, webhook_id: str, event_data: Mapping[str, Any],
            idempotency_key: str | None = None, ordering_key: str | None = None,
            settings: Settings | None = None) -> str | None:
    """Write one delivery in `conn`'s transaction; its id, or None if the idempotency key
    was used already (inside the window)."""
    s = settings or get_settings()
    event = _validate(webhook_id, event_data, idempotency_key, ordering_key, s)
    return _write(_sync_connection(conn), [event], s)[0]


def enqueue_many(conn: Session | Connection, events: Iterable[Mapping[str, Any]], *,
                 settings: Settings | None = None) -> list[str | None]:
    """Write many deliveries in one statement: `events` are mappings of webhook_id,
    event_data and optionally idempotency_key and ordering_key. Returns, in order, each one's
    id or None (its idempotency key was used already). One bad event refuses the lot."""
    s = settings or get_settings()
    checked = [_from_mapping(item, s) for item in events]
    if not checked:
        return []
    return _write(_sync_connection(conn), checked, s)


def publish(conn: Session | Connection, *, event_type: str, data: Any,
            idempotency_key: str | None = None, settings: Settings | None = None) -> list[str]:
    """One event to every enabled endpoint subscribed to `event_type` (the body is
    `{"type", "timestamp", "data"}`, as `publish_webhook_event` sends); returns the ids
    written (none for an endpoint that already had this idempotency key)."""
    s = settings or get_settings()
    template = _fan_out_event(event_type, data, idempotency_key, s)
    return _fan_out(_sync_connection(conn), template, s)


async def enqueue_async(conn: AsyncSession | AsyncConnection, *, webhook_id: str,
                        event_data: Mapping[str, Any], idempotency_key: str | None = None,
                        ordering_key: str | None = None,
                        settings: Settings | None = None) -> str | None:
    """`enqueue` for an AsyncSession or AsyncConnection."""
    s = settings or get_settings()
    event = _validate(webhook_id, event_data, idempotency_key, ordering_key, s)
    aconn = await _async_connection(conn)
    return (await aconn.run_sync(_write, [event], s))[0]


async def enqueue_many_async(conn: AsyncSession | AsyncConnection,
                             events: Iterable[Mapping[str, Any]], *,
                             settings: Settings | None = None) -> list[str | None]:
    """`enqueue_many` for an AsyncSession or AsyncConnection."""
    s = settings or get_settings()
    checked = [_from_mapping(item, s) for item in events]
    if not checked:
        return []
    aconn = await _async_connection(conn)
    return await aconn.run_sync(_write, checked, s)


async def publish_async(conn: AsyncSession | AsyncConnection, *, event_type: str, data: Any,
                        idempotency_key: str | None = None,
                        settings: Settings | None = None) -> list[str]:
    """`publish` for an AsyncSession or AsyncConnection."""
    s = settings or get_settings()
    template = _fan_out_event(event_type, data, idempotency_key, s)
    aconn = await _async_connection(conn)
    return await aconn.run_sync(_fan_out, template, s)
