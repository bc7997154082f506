"""What Celery's own tools see of messages that skip Celery's task machinery.

Single `deliver_event` messages are committed by the engine's gatherer and acknowledged
there, so Celery never runs them as tasks. For Flower, celery-exporter and `inspect stats`
they are reported here as if it had: `task-received` when the message arrives,
`task-succeeded` (or `task-failed` when every event of it was rejected) once its commit
landed, a count in `celery.worker.state`, and, with a result backend, the acceptance stored
as the task's result so `AsyncResult.get()` returns it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery import states
from celery.backends.base import DisabledBackend
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state

from worker.core.models import AcceptReport

log = logging.getLogger("webhooks.monitoring")

RESULT_BACKEND_SETTING = "WEBHOOKS_RESULT_BACKEND"
NO_BACKEND = (f"no result backend configured: set {RESULT_BACKEND_SETTING}=redis://… on the "
              "producer and the worker to get each task's acceptance from .get() (see the "
              "README, 'Monitoring with Flower'); without one, `webhooks deliveries show "
              "<task id>` shows what a task became")
# What a task-received event carries of the arguments (Celery's own argsrepr is ≤ 1024).
REPR_MAX = 1024
# Acceptances waiting to be stored in the result backend, per process, before some are
# dropped (with a warning): the backend must never hold up acknowledgements.
RESULT_QUEUE_MAX = 10_000
# Task events are sent together at most this late (s), or once this many are waiting.
FLUSH_INTERVAL = 0.1
FLUSH_EVENTS = 500
# Seconds between two warnings about results that could not be stored.
WARN_EVERY = 60.0


def acceptance(report: AcceptReport) -> dict[str, Any]:
    """A task's result: its delivery ids, its rejections with their reasons, duplicates."""
    return {"accepted": report.accepted, "duplicates": report.duplicates,
            "rejected": [{"webhook_id": r.webhook_id, "code": r.code, "message": r.message}
                         for r in report.rejected]}


def outcome_event(task_id: str, result: Mapping[str, Any],
                  runtime: float) -> tuple[str, dict[str, Any]]:
    """The Celery event that ends a single event's task: failed when all it carried was
    rejected, else succeeded (duplicates of a redelivered message count as success)."""
    rejected = result.get("rejected") or []
    if rejected and not result.get("accepted") and not result.get("duplicates"):
        first = rejected[0]
        return "task-failed", {
            "uuid": task_id, "exception": f"rejected: {first['code']}: {first['message']}",
            "traceback": "", "runtime": runtime}
    return "task-succeeded", {"uuid": task_id, "result": saferepr(dict(result)),
                              "runtime": runtime}


def received_fields(task_name: str, headers: Any) -> dict[str, Any] | None:
    """The task-received event of a protocol 2 message, from its headers; None without an id.

    The headers come from the broker and are not trusted: only strings are passed on, cut.
    """
    if not isinstance(headers, Mapping):
        return None
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return None

    def text(key: str) -> str | None:
        value = headers.get(key)
        return value[:REPR_MAX] if isinstance(value, str) else None

    return {"uuid": task_id, "name": task_name, "args": text("argsrepr") or "()",
            "kwargs": text("kwargsrepr") or "{}", "root_id": text("root_id"),
            "parent_id": text("parent_id"), "retries": 0, "eta": None, "expires": None}


class TaskEvents:
    """Celery task events and counts for one task's gathered messages.

    Every method runs on the consumer thread: the event dispatcher is not thread-safe, and
    the consumer replaces it when the broker connection is restarted, so it is looked up at
    each flush. Events are stamped when they happen and sent together every
    FLUSH_INTERVAL (or FLUSH_EVENTS): Celery would publish them once per loop turn, which
    for one message a turn is one broker round trip per event.
    """

    def __init__(self, consumer: Any, task_name: str, send_events: bool) -> None:
        self._consumer = consumer
        self._name = task_name
        self._send_events = send_events
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._flush_due = False

    def _dispatcher(self) -> Any:
        dispatcher = getattr(self._consumer, "event_dispatcher", None)
        if not self._send_events or dispatcher is None or not dispatcher.enabled:
            return None
        # Task events off (WEBHOOKS_TASK_EVENTS=false) until `celery control enable_events`.
        groups = dispatcher.groups
        return None if groups and "task" not in groups else dispatcher

    def received(self, headers: Any) -> None:
        if self._dispatcher() is None:
            return
        fields = received_fields(self._name, headers)
        if fields is not None:
            self._queue("task-received", fields)

    def settled(self, task_id: str, result: Mapping[str, Any], started: float) -> None:
        """Count the task as done (for `inspect stats`) and report how it ended."""
        worker_state.total_count[self._name] += 1
        worker_state.all_total_count[0] += 1
        if self._dispatcher() is not None:
            self._queue(*outcome_event(task_id, result, time.monotonic() - started))

    def _queue(self, kind: str, fields: dict[str, Any]) -> None:
        self._pending.append((kind, {**fields, "timestamp": time.time()}))
        if len(self._pending) >= FLUSH_EVENTS:
            self.flush()
        elif not self._flush_due:
            self._flush_due = True
            self._consumer.hub.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Hand every queued event to the dispatcher at once (one broker message)."""
        self._flush_due = False
        pending, self._pending = self._pending, []
        dispatcher = self._dispatcher()
        if dispatcher is None:
            return
        for kind, fields in pending:
            dispatcher.send(kind, **fields)


class ResultRecorder:
    """Stores acceptances in the result backend from a thread of its own, never blocking the
    caller: at most RESULT_QUEUE_MAX wait; past that they are dropped, with a warning."""

    def __init__(self, backend: Callable[[], Any], limit: int = RESULT_QUEUE_MAX) -> None:
        self._backend = backend  # called on the recorder's thread (Celery's is per thread)
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(limit)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_warning = 0.0
        self.stats = {"stored": 0, "dropped": 0, "failed": 0}

    def put(self, task_id: str, result: dict[str, Any]) -> None:
        """Queue `result` as the task's; returns at once."""
        self._start()
        try:
            self._queue.put_nowait((task_id, result))
        except queue.Full:
            self.stats["dropped"] += 1
            self._warn("result backend too slow: dropped the result of task %s", task_id)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="webhooks-results",
                                          daemon=True)
                thread.start()
                self._thread = thread

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued result was handled (for tests); whether it was."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _run(self) -> None:
        backend = self._backend()
        while True:
            task_id, result = self._queue.get()
            try:
                backend.store_result(task_id, result, states.SUCCESS)
                self.stats["stored"] += 1
            except Exception as exc:  # a backend outage costs results, never deliveries
                self.stats["failed"] += 1
                self._warn("could not store the result of task %s: %s: %s", task_id,
                           type(exc).__name__, exc)
            finally:
                self._queue.task_done()

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.warning(message + " (%s)", *args, self.stats)


class NoResultBackend(DisabledBackend):
    """Celery's disabled backend, with an error that names the setting to configure."""

    def _is_disabled(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(NO_BACKEND)

    def as_uri(self, *args: Any, **kwargs: Any) -> str:
        return "disabled://"

    get_state = get_status = get_result = get_traceback = _is_disabled
    get_task_meta_for = wait_for = get_many = _is_disabled
