"""What a task message carries, read without trusting it: pure, no I/O.

The task shells call these on the worker side, and the producer-side checks call them too,
so a call refused at `.delay()` is exactly a call the worker would record as rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from worker.core.errors import InvalidEvent
from worker.core.models import EventIn, Incoming

SINGLE_FIELDS = ("webhook_id", "event_data", "idempotency_key")
FAN_OUT_FIELDS = ("event_type", "data", "idempotency_key")


def single_event(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> EventIn:
    """The event a `deliver_event` call carries; InvalidEvent for a malformed call."""
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    if len(args) > len(SINGLE_FIELDS):
        raise InvalidEvent("bad_arguments", f"deliver_event takes at most {len(SINGLE_FIELDS)} "
                           "arguments: webhook_id, event_data, idempotency_key")
    fields = dict(zip(SINGLE_FIELDS, args, strict=False))
    unknown = set(kwargs) - set(SINGLE_FIELDS)
    if unknown:
        raise InvalidEvent("bad_arguments", f"unknown argument(s): {', '.join(sorted(unknown))}")
    twice = set(fields) & set(kwargs)
    if twice:
        raise InvalidEvent("bad_arguments", f"argument(s) given twice: {', '.join(sorted(twice))}")
    fields.update(kwargs)
    if "webhook_id" not in fields or "event_data" not in fields:
        raise InvalidEvent("bad_arguments", "deliver_event needs webhook_id and event_data")
    return EventIn(fields["webhook_id"], fields["event_data"], fields.get("idempotency_key"))


def event_from_mapping(item: Any) -> EventIn:
    """One item of a `deliver_events` call."""
    if not isinstance(item, Mapping):
        raise InvalidEvent("bad_arguments", "each event must be an object with webhook_id and "
                           f"event_data, not {type(item).__name__}")
    return single_event((), item)


def incoming(message_id: str, parse: Callable[..., EventIn], *raw: Any) -> Incoming:
    """The parsed event, or a placeholder carrying why it could not be parsed."""
    try:
        return Incoming(message_id, parse(*raw))
    except InvalidEvent as exc:
        fields = raw[-1] if raw and isinstance(raw[-1], Mapping) else {}
        webhook_id = fields.get("webhook_id")
        return Incoming(message_id, EventIn(webhook_id if isinstance(webhook_id, str) else "?",
                                            None), problem=exc)


def fan_out_body(event_type: str, data: Any, timestamp: datetime) -> dict[str, Any]:
    """The Standard Webhooks envelope a fan-out sends to every subscribed endpoint."""
    return {"type": event_type, "timestamp": timestamp.isoformat(), "data": data}
