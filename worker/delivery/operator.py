"""Operator events (Svix calls them operational webhooks): an endpoint disabled, a circuit
opened, deliveries that failed for good, a backlog grown too old.

They are sent as ordinary deliveries to the operator's own endpoint (WEBHOOKS_OPERATOR_ENDPOINT),
so they are signed, retried and recorded like any other, and survive a restart once
committed. Nothing about the operator endpoint itself is sent to it (no loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from worker.core.clock import SYSTEM_CLOCK, Clock
from worker.core.health import HealthChange, HealthEvent
from worker.core.ids import new_id
from worker.core.messages import fan_out_body
from worker.core.models import AcceptReport, AttemptRecord, DeliveryStatus, EventIn, Incoming
from worker.settings import Settings

log = logging.getLogger("webhooks.operator")

# Events kept while they cannot be committed; past it the oldest are dropped (and counted).
MAX_PENDING = 10_000
# Failed deliveries named per event (the event carries the count of all of them).
SAMPLE_IDS = 20


class DueReader(Protocol):
    async def oldest_due(self, now: datetime) -> datetime | None: ...


Accept = Callable[[Sequence[Incoming]], Awaitable[AcceptReport]]


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    endpoint_id: str
    flush_interval: float = 1.0
    backlog_alert_seconds: float = 300.0
    backlog_check_interval: float = 60.0
    backlog_realert_seconds: float = 900.0

    @classmethod
    def from_settings(cls, s: Settings) -> OperatorConfig | None:
        if not s.operator_endpoint:
            return None
        return cls(s.operator_endpoint, backlog_alert_seconds=s.backlog_alert_seconds)


def health_events(changes: Sequence[HealthChange], operator: str
                  ) -> list[tuple[str, dict[str, Any]]]:
    """(event type, data) for the health changes an operator hears about."""
    events: list[tuple[str, dict[str, Any]]] = []
    for change in changes:
        if change.endpoint_id == operator:
            continue
        if change.event is HealthEvent.DISABLED:
            events.append(("operator.endpoint.disabled",
                           {"endpoint": change.endpoint_id, "reason": change.reason}))
        elif change.event is HealthEvent.OPENED:
            until = change.until.isoformat() if change.until else None
            events.append(("operator.endpoint.circuit_opened",
                           {"endpoint": change.endpoint_id, "until": until,
                            "last_error": change.reason}))
    return events


def failure_events(records: Sequence[AttemptRecord], operator: str
                   ) -> list[tuple[str, dict[str, Any]]]:
    """One `operator.deliveries.failed` per endpoint whose deliveries ended failed here."""
    failed: dict[str, list[AttemptRecord]] = {}
    for record in records:
        if (record.next_status is DeliveryStatus.FAILED
                and record.delivery.endpoint_id != operator):
            failed.setdefault(record.delivery.endpoint_id, []).append(record)
    return [("operator.deliveries.failed",
             {"endpoint": endpoint, "count": len(ended),
              "deliveries": [r.delivery.id for r in ended[:SAMPLE_IDS]],
              "last_error": ended[-1].outcome.error,
              "last_outcome": ended[-1].outcome.kind.value})
            for endpoint, ended in sorted(failed.items())]


class OperatorEvents:
    """Collects operator events and commits them, every `flush_interval`, through intake."""

    def __init__(self, config: OperatorConfig, accept: Accept, store: DueReader, *,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self._accept = accept
        self._store = store
        self._clock = clock
        # (event type, data, message id or None for a fresh one)
        self._pending: list[tuple[str, dict[str, Any], str | None]] = []
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._last_backlog_alert: float | None = None
        self.stats = {"operator_events": 0, "operator_dropped": 0}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhooks-operator")

    async def close(self) -> None:
        """Commit what is waiting (one try), then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()

    def on_health(self, changes: Sequence[HealthChange]) -> None:
        self._add(health_events(changes, self.config.endpoint_id))

    def on_written(self, records: Sequence[AttemptRecord]) -> None:
        self._add(failure_events(records, self.config.endpoint_id))

    def _add(self, events: list[tuple[str, dict[str, Any]]], message_id: str | None = None
             ) -> None:
        self._pending.extend((kind, data, message_id) for kind, data in events)
        excess = len(self._pending) - MAX_PENDING
        if excess > 0:
            del self._pending[:excess]
            self.stats["operator_dropped"] += excess

    async def flush(self) -> int:
        """Commit the waiting events as deliveries to the operator endpoint."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        now = self._clock.now()
        items = [Incoming(message_id or new_id("op"),
                          EventIn(self.config.endpoint_id, fan_out_body(kind, data, now), None,
                                  kind))
                 for kind, data, message_id in batch]
        try:
            report = await self._accept(items)
        except Exception:
            self._pending[:0] = batch  # kept for the next flush
            raise
        for rejection in report.rejected:
            log.error("operator event not accepted (%s: %s): is WEBHOOKS_OPERATOR_ENDPOINT an "
                      "existing endpoint?", rejection.code, rejection.message)
        self.stats["operator_events"] += len(report.accepted)
        return len(report.accepted)

    async def check_backlog(self) -> None:
        """Raise `operator.backlog.too_old` when the oldest due delivery waits too long."""
        now = self._clock.now()
        oldest = await self._store.oldest_due(now)
        age = 0.0 if oldest is None else (now - oldest).total_seconds()
        if age < self.config.backlog_alert_seconds:
            self._last_backlog_alert = None
            return
        at = self._clock.monotonic()
        last = self._last_backlog_alert
        if last is not None and at - last < self.config.backlog_realert_seconds:
            return
        self._last_backlog_alert = at
        log.error("backlog too old: the oldest due delivery has waited %.0fs (alert at %.0fs)",
                  age, self.config.backlog_alert_seconds)
        # Every worker process checks; the id is the same for all of them within one re-alert
        # window, so the operator gets one event per window, not one per process.
        window = int(self._clock.time() // self.config.backlog_realert_seconds)
        self._add([("operator.backlog.too_old",
                    {"oldest_due_seconds": round(age, 1),
                     "threshold_seconds": self.config.backlog_alert_seconds})],
                  message_id=f"operator-backlog-{window}")

    async def _run(self) -> None:
        c = self.config
        next_check = self._clock.monotonic()
        while True:
            await asyncio.sleep(c.flush_interval)
            try:
                if self._clock.monotonic() >= next_check:
                    next_check = self._clock.monotonic() + c.backlog_check_interval
                    await self.check_backlog()
                await self.flush()
            except Exception as exc:  # the database is away: the events wait for the next flush
                if not self._failing:
                    log.warning("operator events not committed yet (%d waiting; retried every "
                                "%.0fs): %s: %s", len(self._pending), c.flush_interval,
                                type(exc).__name__, exc)
                self._failing = True
            else:
                self._failing = False
