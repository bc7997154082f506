"""What one engine tells the metrics: its attempts once written, its endpoints' health
changes, and (sampled each second) what it holds.

Attempts count once their outcome is committed (the writer's `on_written`), like the log line
of each attempt: a lost lease or a crash before the write counts nothing, and the attempt made
again later counts then. A metric that cannot be updated never stops a delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from worker.core.health import HealthChange
from worker.core.models import AttemptRecord, Delivery, OutcomeKind
from worker.metrics import Metrics, process_metrics, updating
from worker.settings import Settings

log = logging.getLogger("webhooks.metrics")

# How often the in-flight, waiting and unwritten gauges are brought up to date.
SAMPLE_INTERVAL = 1.0
# The endpoint class of an endpoint past the label limit, and of every endpoint when the
# label is off.
OTHER = "other"
ALL = "all"
NONE = "none"
# At most one warning about failing metric updates per this many seconds.
WARN_EVERY = 300.0
SUCCESS = OutcomeKind.SUCCESS.value


class Holds(Protocol):
    @property
    def in_flight(self) -> int: ...

    @property
    def waiting(self) -> int: ...


class Unwritten(Protocol):
    @property
    def unwritten(self) -> int: ...


class Listened(Unwritten, Protocol):
    def on_written(self, listener: Callable[[Sequence[AttemptRecord]], None]) -> None: ...

    def on_health(self, listener: Callable[[Sequence[HealthChange]], None]) -> None: ...


def status_class(status_code: int | None) -> str:
    """`2xx`, `4xx`, `5xx`...; `none` when no HTTP answer came (timeout, refused, blocked)."""
    if status_code is None or not 100 <= status_code <= 599:
        return NONE
    return f"{status_code // 100}xx"


class EndpointClasses:
    """The `endpoint_class` label: bounded, whatever the number of endpoints.

    `none` (default): `all` for every endpoint. `id`: the endpoint id; `host`: its URL's
    host. Past `limit` distinct values in one process, the rest are `other`.
    """

    def __init__(self, mode: str, limit: int) -> None:
        self.mode = mode
        self.limit = limit
        self._known: dict[str, str] = {}  # endpoint id -> its class
        self._values: set[str] = set()

    def __call__(self, delivery: Delivery) -> str:
        if self.mode == "none":
            return ALL
        known = self._known.get(delivery.endpoint_id)
        if known is not None:
            return known
        if self.mode == "host":
            value = (urlsplit(delivery.url).hostname or NONE).lower()
        else:
            value = delivery.endpoint_id
        if value not in self._values:
            if len(self._values) >= self.limit:
                value = OTHER
            else:
                self._values.add(value)
        if len(self._known) < 10 * self.limit:
            self._known[delivery.endpoint_id] = value
        return value


class EngineMetrics:
    """Feeds this process's metrics from one engine's writer and scheduler."""

    def __init__(self, settings: Settings, writer: Listened, scheduler: Holds, *,
                 metrics: Metrics | None = None,
                 sample_interval: float = SAMPLE_INTERVAL) -> None:
        self.metrics = metrics if metrics is not None else process_metrics(settings)
        self.endpoint_class = EndpointClasses(settings.metrics_endpoint_label,
                                              settings.metrics_endpoint_limit)
        self._writer = writer
        self._scheduler = scheduler
        self._interval = sample_interval
        self._task: asyncio.Task[None] | None = None
        self._held = (-1, -1, -1)
        self._warned_at = -WARN_EVERY
        # Per label set: its attempts counter, duration and latency histograms (bounded: the
        # labels are).
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any]] = {}
        writer.on_written(self.attempts_written)
        writer.on_health(self.health_changed)

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample_every(), name="webhooks-metrics")

    async def stop(self) -> None:
        """Stop sampling; this process holds nothing any more."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.held(0, 0, 0)

    def attempts_written(self, records: Sequence[AttemptRecord]) -> None:
        m, children = self.metrics, self._children
        try:
            with updating():
                for record in records:
                    kind = record.outcome.kind.value
                    endpoint = self.endpoint_class(record.delivery)
                    error = record.outcome.error_kind
                    labels = (kind, error.value if error is not None else NONE,
                              status_class(record.result.status_code), endpoint)
                    counted = children.get(labels)
                    if counted is None:  # label lookups cost more than the increments
                        counted = children[labels] = (
                            m.attempts.labels(*labels),
                            m.attempt_duration.labels(kind, endpoint),
                            m.delivery_latency.labels(endpoint))
                    attempts, duration, latency = counted
                    attempts.inc()
                    duration.observe(max(record.result.duration_ms, 0.0) / 1000.0)
                    enqueued = record.delivery.enqueued_at
                    if kind == SUCCESS and enqueued is not None:
                        latency.observe(max(record.attempted_at.timestamp() - enqueued, 0.0))
        except Exception as exc:
            self._failed(exc)

    def health_changed(self, changes: Sequence[HealthChange]) -> None:
        try:
            with updating():
                for change in changes:
                    self.metrics.circuit_changes.labels(change.event.value).inc()
        except Exception as exc:
            self._failed(exc)

    def held(self, in_flight: int, waiting: int, unwritten: int) -> None:
        """Set the gauges of what this engine holds (only what changed)."""
        now = (in_flight, waiting, unwritten)
        if now == self._held:
            return
        try:
            with updating():
                self.metrics.in_flight.set(in_flight)
                self.metrics.waiting.set(waiting)
                self.metrics.unwritten.set(unwritten)
            self._held = now
        except Exception as exc:
            self._failed(exc)

    def sample(self) -> None:
        s = self._scheduler
        self.held(s.in_flight, s.waiting, self._writer.unwritten)

    async def _sample_every(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval)

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("metrics: could not update (deliveries go on): %s: %s",
                        type(exc).__name__, exc)
