"""The producer API and the task shells behind it.

    from worker.tasks.webhook_delivery import deliver_webhook_event
    deliver_webhook_event.delay(webhook_id="webhook-xyz", event_data={...})

A shell does no delivery work: it turns its message into delivery rows, waits for the engine
to commit them, and returns; the message is acknowledged after that, so once the broker lets
go of an event the database holds it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.result import AsyncResult
from celery.worker.strategy import default as default_strategy

from worker.celery_app import app, settings
from worker.core import errors as core_errors
from worker.core.errors import MAX_UNEXPECTED_FAILURES, InvalidEvent
from worker.core.messages import (
    DELIVER_EVENT,
    FAN_OUT_FIELDS,
    event_from_mapping,
    fan_out_body,
    first_message_id,
    incoming,
    message_events,
    message_problem,
    single_event,
    task_id_of,
    unreadable,
)
from worker.core.models import AcceptReport, EventIn, Incoming
from worker.core.validation import validate_event
from worker.delivery.rescuer import rescuable
from worker.delivery.runtime import get_runtime
from worker.monitoring import ResultRecorder, TaskEvents, acceptance
from worker.transport import decode_body

log = logging.getLogger("webhooks.tasks")

# Failures that mean "not committed, keep the message": never acknowledged as done.
NOT_COMMITTED = (*core_errors.NOT_COMMITTED, SoftTimeLimitExceeded)
# Cleanup stops short of the soft time limit by this much.
CLEANUP_MARGIN = 10


def _producer_check(event: EventIn) -> None:
    validate_event(event.webhook_id, event.event_data, max_payload_bytes=settings.max_payload_bytes,
                   idempotency_key=event.idempotency_key, ordering_key=event.ordering_key)


class ValidatedTask(Task):  # type: ignore[type-arg]
    """Checks producer calls in the producer's process, where the error can be caught."""

    def check_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        *more: Any,
        **options: Any,
    ) -> AsyncResult[Any]:
        self.check_call(tuple(args or ()), dict(kwargs or {}))
        return super().apply_async(args, kwargs, *more, **options)


# -- single events, gathered by the engine --------------------------------------------------


class SingleEventTask(ValidatedTask):
    """`deliver_event` messages skip Celery's per-task machinery: the consumer reads each one
    (never trusting it), hands its event to the engine's gatherer, and acknowledges it once
    the commit has landed. A message that cannot be read is recorded as rejected; one that
    could not be committed stays unacknowledged, so the broker keeps it.
    """

    def check_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        _producer_check(single_event(args, kwargs))

    Strategy = "worker.tasks.webhook_delivery:single_event_strategy"


def single_event_strategy(task: Any, app: Any, consumer: Any) -> Any:
    """Celery's hook for how a task's messages are handled as they arrive (consumer side)."""
    if consumer.hub is None:  # no event loop to acknowledge on: run as a plain task
        return default_strategy(task, app, consumer)
    runtime = get_runtime()
    if rescuable(settings.broker_url):
        runtime.start_rescuer_threadsafe()
    max_events = settings.max_events_per_message
    connection_errors = consumer.connection_errors
    events = TaskEvents(consumer, task.name, bool(task.send_events))
    results = _result_recorder(app)
    call_soon = consumer.call_soon
    log.info("single events are gathered by the engine of pid %d", os.getpid())

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                   **_: Any) -> None:
        raw, decode = _body_of(message)
        items = message_events(message.headers, raw, decode, max_events)
        events.received(message.headers)
        task_id = task_id_of(items[0].message_id) if items else None
        started = time.monotonic()
        # As Celery does: a producer without a result backend asks for none to be stored.
        keep = results is not None and not _header(message.headers, "ignore_result")

        def settle(part: AcceptReport) -> None:
            # On the engine thread, once the commit landed: the ack and the events go to the
            # consumer's loop (Celery's objects are not thread-safe), the result to its thread.
            ack(log, connection_errors)
            if task_id is None:
                return
            result = acceptance(part)
            call_soon(events.settled, task_id, result, started)
            if keep and results is not None:
                results.put(task_id, result)

        runtime.gather_threadsafe(items, settle)

    return on_message


def _header(headers: Any, name: str) -> Any:
    return headers.get(name) if isinstance(headers, Mapping) else None


_results: ResultRecorder | None = None


def _result_recorder(app: Any) -> ResultRecorder | None:
    """This process's recorder of single events' results; None without a result backend."""
    global _results
    if settings.result_backend is None:
        return None
    if _results is None:
        _results = ResultRecorder(lambda: app.backend)
    return _results


def checked_strategy(task: Any, app: Any, consumer: Any) -> Any:
    """Celery's own handling, behind a check that the message is a readable task call.

    Celery refuses a call it cannot make (kwargs that are not an object, say) outside any
    hook of the task's, and drops the message; read here first, such a message is recorded
    as rejected instead.
    """
    handle = default_strategy(task, app, consumer)
    if consumer.hub is None:
        return handle
    runtime = get_runtime()
    connection_errors = consumer.connection_errors

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                   **kwargs: Any) -> Any:
        raw, decode = _body_of(message)
        problem = message_problem(message.headers, raw, decode)
        if problem is None:
            return handle(message, body, ack, reject, callbacks, **kwargs)
        items = [unreadable(first_message_id(message.headers, raw), problem, raw)]
        runtime.gather_threadsafe(items, lambda _: ack(log, connection_errors))
        return None

    return on_message


def _body_of(message: Any) -> tuple[bytes, Callable[[], Any]]:
    """A message's body bytes, and how to decode them."""
    body = message.body
    raw = body if isinstance(body, bytes) else str(body).encode("utf-8", "replace")
    return raw, lambda: decode_body(raw, message.content_type, message.content_encoding)


@app.task(bind=True, base=SingleEventTask, name=DELIVER_EVENT, acks_late=True, max_retries=None)
def deliver_webhook_event(
    self: Task,  # type: ignore[type-arg]
    webhook_id: str,
    event_data: dict[str, Any],
    idempotency_key: str | None = None,
    ordering_key: str | None = None,
) -> dict[str, Any]:
    """Deliver one event to endpoint `webhook_id`: `.delay(webhook_id=..., event_data=...)`.

    `ordering_key` picks the queue on a FIFO endpoint (default: one queue per endpoint).

    Runs as a task only in a worker without an event loop; otherwise the strategy above
    takes the message.
    """
    item = Incoming(f"{self.request.id}:0", EventIn(webhook_id, event_data, idempotency_key,
                                                    ordering_key=ordering_key))
    try:
        return acceptance(get_runtime().accept_blocking([item]))
    except Exception as exc:
        _retry_later(self, exc, 1)


# -- many events in one message ---------------------------------------------------------------


class EventBatchTask(ValidatedTask):
    Strategy = "worker.tasks.webhook_delivery:checked_strategy"

    def check_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        events = kwargs.get("events", args[0] if args else None)
        if not isinstance(events, list | tuple) or not events:
            raise InvalidEvent("bad_arguments", "deliver_events takes events=[...], non-empty")
        if len(events) > settings.max_events_per_message:
            raise InvalidEvent("too_many_events", f"{len(events)} events in one message; the "
                               f"limit is {settings.max_events_per_message}")
        for index, item in enumerate(events):
            try:
                _producer_check(event_from_mapping(item))
            except InvalidEvent as exc:
                raise InvalidEvent(exc.code, f"events[{index}]: {exc}") from exc


@app.task(bind=True, base=EventBatchTask, name="webhooks.deliver_events", acks_late=True,
          max_retries=None)
def deliver_webhook_events(self: Task, events: list[dict[str, Any]]) -> dict[str, Any]:  # type: ignore[type-arg]
    """Deliver many events from one message: `.delay(events=[{webhook_id, event_data}, ...])`."""
    if not isinstance(events, list):
        events = [events]
    items = [incoming(f"{self.request.id}:{i}", event_from_mapping, e)
             for i, e in enumerate(events[: settings.max_events_per_message])]
    try:
        return acceptance(get_runtime().accept_blocking(items))
    except Exception as exc:
        _retry_later(self, exc, len(items))


def _retry_later(task: Task, exc: Exception, count: int) -> NoReturn:  # type: ignore[type-arg]
    """A retry of the same message (same task id, so the same delivery ids) after a backoff.

    An unexpected error (a bug, not an outage) is logged with its traceback and retried
    only `MAX_UNEXPECTED_FAILURES` times.
    """
    retries = task.request.retries
    expected = isinstance(exc, NOT_COMMITTED)
    if not expected and retries >= MAX_UNEXPECTED_FAILURES:
        log.error("giving up on %d events after %d unexpected failures", count, retries + 1,
                  exc_info=exc)
        raise exc
    delay = min(settings.requeue_delay * 2 ** min(retries, 4), settings.max_requeue_delay)
    log.warning("could not commit %d events (%s: %s); retrying in %.1fs", count,
                type(exc).__name__, exc, delay, exc_info=not expected)
    raise task.retry(exc=exc, countdown=delay)


# -- fan-out ---------------------------------------------------------------------------------


class FanOutTask(ValidatedTask):
    Strategy = "worker.tasks.webhook_delivery:checked_strategy"

    def check_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        fields = dict(zip(FAN_OUT_FIELDS, args, strict=False))
        fields.update(kwargs)
        event_type = fields.get("event_type")
        if not isinstance(event_type, str) or not event_type:
            raise InvalidEvent("bad_arguments", "publish_event needs event_type, a string")
        body = fan_out_body(event_type, fields.get("data"), datetime.now(UTC))
        validate_event("fan-out", body, max_payload_bytes=settings.max_payload_bytes,
                       idempotency_key=fields.get("idempotency_key"))


@app.task(bind=True, base=FanOutTask, name="webhooks.publish_event", acks_late=True,
          max_retries=None)
def publish_webhook_event(
    self: Task,  # type: ignore[type-arg]
    event_type: str,
    data: Any,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Deliver `{type, timestamp, data}` to every enabled endpoint subscribed to `event_type`."""
    message_id = str(self.request.id)  # the request context is thread-local: read it here
    try:
        report = get_runtime().fan_out_blocking(message_id, event_type, data, idempotency_key)
    except Exception as exc:
        _retry_later(self, exc, 1)
    return acceptance(report)


# -- periodic ---------------------------------------------------------------------------------


@app.task(name="webhooks.retry_failed_deliveries", acks_late=True)
def retry_failed_deliveries() -> dict[str, bool]:
    """Start claiming due retries and expired leases on this process's engine.

    The sweep runs on the engine loop for up to one sweep interval, so this task returns at
    once and never holds up the consumer; a sweep still running makes it a no-op.
    """
    return {"started": get_runtime().start_sweep_threadsafe()}


@app.task(name="webhooks.cleanup_old_deliveries", acks_late=True)
def cleanup_old_deliveries(retention_days: float | None = None) -> dict[str, int]:
    """Delete finished deliveries and their attempts older than the retention (default 90 d)."""
    days = settings.retention_days if retention_days is None else float(retention_days)
    cutoff = datetime.now(UTC) - timedelta(days=days)
    removed = get_runtime().cleanup_blocking(cutoff, settings.task_soft_time_limit - CLEANUP_MARGIN)
    log.info("cleanup removed %d deliveries older than %.1f days", removed, days)
    return {"removed": removed}

