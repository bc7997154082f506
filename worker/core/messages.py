"""What a task message carries, read without trusting it: pure, no I/O.

The task shells call these on the worker side, and the producer-side checks call them too,
so a call refused at `.delay()` is exactly a call the worker would record as rejected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.core.errors import InvalidEvent
from worker.core.models import REJECTED_EXCERPT_BYTES, TASK_ID_MAX, EventIn, Incoming

SINGLE_FIELDS = ("webhook_id", "event_data", "idempotency_key", "ordering_key")
FAN_OUT_FIELDS = ("event_type", "data", "idempotency_key")


def single_event(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> EventIn:
    """The event a `deliver_event` call carries; InvalidEvent for a malformed call."""
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    if len(args) > len(SINGLE_FIELDS):
        raise InvalidEvent("bad_arguments", f"deliver_event takes at most {len(SINGLE_FIELDS)} "
                           "arguments: webhook_id, event_data, idempotency_key, ordering_key")
    fields = dict(zip(SINGLE_FIELDS, args, strict=False))
    unknown = set(kwargs) - set(SINGLE_FIELDS)
    if unknown:
        names = ", ".join(sorted(map(str, unknown)))
        raise InvalidEvent("bad_arguments", f"unknown argument(s): {names}")
    twice = set(fields) & set(kwargs)
    if twice:
        raise InvalidEvent("bad_arguments", f"argument(s) given twice: {', '.join(sorted(twice))}")
    fields.update(kwargs)
    if "webhook_id" not in fields or "event_data" not in fields:
        raise InvalidEvent("bad_arguments", "deliver_event needs webhook_id and event_data")
    return EventIn(fields["webhook_id"], fields["event_data"], fields.get("idempotency_key"),
                   ordering_key=fields.get("ordering_key"))


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


# -- broker messages, read defensively ---------------------------------------------------------

DELIVER_EVENT = "webhooks.deliver_event"
DELIVER_EVENTS = "webhooks.deliver_events"
PUBLISH_EVENT = "webhooks.publish_event"
MALFORMED = "malformed_message"
# Bodies past this are not parsed: no producer of ours sends one (events are <= 256 KiB,
# a batch message <= 1000 of them would be checked at `.delay()`).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TaskCall:
    """The task, id and arguments a broker message carries, once they are known to be sane."""

    task: str
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def raw_message_id(raw: bytes) -> str:
    """An id for a message that carries none: the same bytes always get the same id."""
    return "raw-" + hashlib.blake2b(raw, digest_size=16).hexdigest()


def task_id_of(message_id: str) -> str | None:
    """The Celery task id in a message id (`{task_id}:{index}`); None for an id made from
    a message's bytes. Cut to the column's size."""
    task_id, sep, index = message_id.rpartition(":")
    if not sep or not task_id or not (index.isascii() and index.isdigit()):
        return None
    return task_id[:TASK_ID_MAX]


def first_message_id(headers: Any, raw: bytes) -> str:
    """The id of a message's first event, from its task id or else from its bytes."""
    task_id = headers.get("id") if isinstance(headers, Mapping) else None
    return f"{task_id}:0" if isinstance(task_id, str) and task_id else raw_message_id(raw)


def read_call(headers: Any, decoded: Any) -> TaskCall:
    """Task name, id and arguments of a Celery protocol 2 (or 1) message; InvalidEvent if not.

    `decoded` is the body as the broker's serializer decoded it.
    """
    if isinstance(headers, Mapping) and "task" in headers:  # protocol 2
        task, task_id = headers.get("task"), headers.get("id")
        if not (isinstance(decoded, list | tuple) and len(decoded) == 3):
            raise InvalidEvent(MALFORMED, "a task message body must be [args, kwargs, embed], "
                               f"not {_shape(decoded)}")
        args, kwargs, embed = decoded
        if not isinstance(embed, Mapping | None):
            raise InvalidEvent(MALFORMED, f"the body's embed must be an object, not "
                               f"{_shape(embed)}")
    elif isinstance(decoded, Mapping):  # protocol 1: everything in the body
        task, task_id = decoded.get("task"), decoded.get("id")
        args, kwargs = decoded.get("args", ()), decoded.get("kwargs", {})
    else:
        raise InvalidEvent(MALFORMED, "the message names no task")
    if not isinstance(task, str) or not isinstance(task_id, str) or not task_id:
        raise InvalidEvent(MALFORMED, "the message lacks a task name or a task id")
    if not isinstance(args, list | tuple):
        raise InvalidEvent(MALFORMED, f"args must be a list, not {_shape(args)}")
    if not isinstance(kwargs, Mapping):
        raise InvalidEvent(MALFORMED, f"kwargs must be an object, not {_shape(kwargs)}")
    if not all(isinstance(key, str) for key in kwargs):
        raise InvalidEvent(MALFORMED, "kwargs must have string keys")
    return TaskCall(task, task_id, tuple(args), dict(kwargs))


def events_of(call: TaskCall, max_events: int) -> list[Incoming]:
    """The events a `deliver_event` or `deliver_events` call carries, bad ones as problems."""
    if call.task == DELIVER_EVENT:
        return [incoming(f"{call.task_id}:0", single_event, call.args, call.kwargs)]
    if call.task == DELIVER_EVENTS:
        events = call.kwargs.get("events", call.args[0] if call.args else None)
        if not isinstance(events, list | tuple):
            return [unreadable(f"{call.task_id}:0", InvalidEvent(
                "bad_arguments", f"deliver_events takes events=[...], not {_shape(events)}"))]
        return [incoming(f"{call.task_id}:{i}", event_from_mapping, item)
                for i, item in enumerate(events[:max_events])]
    raise InvalidEvent(MALFORMED, f"{call.task} carries no events")


def unreadable(message_id: str, problem: InvalidEvent, raw: bytes | None = None) -> Incoming:
    """A placeholder that records why a message could not be read, with its first bytes."""
    excerpt = raw[:REJECTED_EXCERPT_BYTES] if raw is not None else None
    return Incoming(message_id, EventIn("?", None), problem=problem, excerpt=excerpt)


def _read_message(headers: Any, raw: bytes, decode: Callable[[], Any]) -> TaskCall:
    """The task call a broker message carries; InvalidEvent for anything unreadable."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(MALFORMED, f"message of {len(raw)} bytes; the limit is "
                           f"{MAX_MESSAGE_BYTES}")
    try:
        decoded = decode()
    except Exception as exc:  # any decoder's error: the bytes are not a message we can read
        raise _undecodable(exc) from exc
    return read_call(headers, decoded)


def _undecodable(exc: Exception) -> InvalidEvent:
    return InvalidEvent(MALFORMED, f"undecodable body: {type(exc).__name__}: {str(exc)[:200]}")


def message_problem(headers: Any, raw: bytes, decode: Callable[[], Any]) -> InvalidEvent | None:
    """Why a broker message cannot even be read as a task call; None when it can."""
    try:
        _read_message(headers, raw, decode)
    except InvalidEvent as exc:
        return exc
    except Exception as exc:  # whatever else the bytes make the reader trip on
        return _undecodable(exc)
    return None


def message_events(headers: Any, raw: bytes, decode: Callable[[], Any],
                   max_events: int) -> list[Incoming]:
    """Every event a broker message of ours carries; never raises.

    What cannot be read becomes one placeholder whose problem is recorded as a rejection,
    under the message's task id (or an id derived from its bytes when it has none).
    """
    try:
        return events_of(_read_message(headers, raw, decode), max_events)
    except InvalidEvent as exc:
        problem = exc
    except Exception as exc:  # whatever else the bytes make the reader trip on
        problem = _undecodable(exc)
    return [unreadable(first_message_id(headers, raw), problem, raw)]


def _shape(value: Any) -> str:
    return "null" if value is None else type(value).__name__
