"""Turns producer messages into committed, leased deliveries and hands them to the scheduler."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from worker.core.clock import SYSTEM_CLOCK, Clock
from worker.core.errors import InvalidEvent
from worker.core.ids import derived_id
from worker.core.messages import fan_out_body, task_id_of
from worker.core.models import (
    ENDPOINT_ID_MAX,
    AcceptReport,
    Delivery,
    EventIn,
    Incoming,
    Refusal,
    Rejection,
    usable_endpoint,
)
from worker.core.validation import ValidEvent, rejected_payload, validate_event
from worker.db.intake_rows import delivery_row
from worker.db.store import Store
from worker.delivery.scheduler import Scheduler
from worker.settings import Settings

log = logging.getLogger("webhooks.intake")

# "!" is not allowed in endpoint ids: a rejection's id can never be a delivery's.
REJECTION_SUFFIX = "!rejected"


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    max_payload_bytes: int
    accept_timeout: float
    lease_seconds: float
    idempotency_window: float

    @classmethod
    def from_settings(cls, s: Settings) -> IntakeConfig:
        return cls(s.max_payload_bytes, s.accept_timeout, s.lease_seconds, s.idempotency_window)


def _identity(item: Incoming) -> tuple[str, str]:
    """What a delivery id derives from: the message and the endpoint."""
    return item.message_id, str(item.event.webhook_id)


def _endpoint_id_for_record(value: Any) -> str:
    return str(value)[:ENDPOINT_ID_MAX]


class Intake:
    def __init__(self, config: IntakeConfig, store: Store, scheduler: Scheduler, *,
                 clock: Clock = SYSTEM_CLOCK,
                 on_queued: Callable[[datetime], object] | None = None) -> None:
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self._clock = clock
        self._on_queued = on_queued  # FIFO deliveries were committed, due at the time given

    def _check(self, item: Incoming) -> ValidEvent | Rejection:
        e = item.event
        if item.problem is not None:
            return Rejection(webhook_id=_endpoint_id_for_record(e.webhook_id),
                             code=item.problem.code, message=str(item.problem),
                             payload=item.excerpt)
        try:
            return validate_event(
                e.webhook_id, e.event_data, max_payload_bytes=self.config.max_payload_bytes,
                idempotency_key=e.idempotency_key, event_type=e.event_type,
                ordering_key=e.ordering_key,
            )
        except InvalidEvent as exc:
            return Rejection(
                webhook_id=_endpoint_id_for_record(e.webhook_id), code=exc.code, message=str(exc),
                payload=rejected_payload(e.event_data, self.config.max_payload_bytes),
            )

    async def accept(self, items: Sequence[Incoming]) -> AcceptReport:
        """Validate, commit (one transaction), queue. Returns once the batch is durable.

        An item that came earlier in `items` (the broker handed the same message over twice)
        is counted as a duplicate, never sent twice.
        """
        unique = list({_identity(item): item for item in reversed(items)}.values())[::-1]
        checked = [(item.message_id, self._check(item)) for item in unique]
        valid = [(mid, ev) for mid, ev in checked if isinstance(ev, ValidEvent)]
        rejections = [(mid, r) for mid, r in checked if isinstance(r, Rejection)]
        eps = await self.store.endpoints_by_id(ev.webhook_id for _, ev in valid)
        rows: list[dict[str, Any]] = []
        pending: list[Delivery] = []
        queued = False  # FIFO rows among them: the claim loop hands out their queues' heads
        now = self._clock.now()
        for mid, ev in valid:
            ep = usable_endpoint(ev.webhook_id, eps.get(ev.webhook_id))
            if isinstance(ep, Refusal) and ep.code != "endpoint_disabled":
                rejections.append((mid, Rejection(ev.webhook_id, ep.code, ep.message,
                                                  idempotency_key=ev.idempotency_key,
                                                  event_type=ev.event_type, payload=ev.payload)))
                continue
            endpoint = eps[ev.webhook_id]
            delivery_id = derived_id("msg", mid, endpoint.id)
            new = delivery_row(delivery_id, ev, endpoint, now)
            new.row["task_id"] = task_id_of(mid)
            if new.send_now:
                pending.append(Delivery(id=delivery_id, endpoint_id=endpoint.id,
                                        url=endpoint.url,
                                        secrets=endpoint.signing_secrets(now),
                                        payload=ev.payload, event_type=ev.event_type,
                                        policy=endpoint.policy, enqueued_at=now.timestamp()))
            elif new.row["ordering_key"] is not None:
                queued = True
            rows.append(new.row)
        report = await self._commit(rows, pending, rejections)
        report.duplicates += len(items) - len(unique)
        if queued and self._on_queued is not None:
            self._on_queued(now)
        return report

    async def _commit(self, rows: list[dict[str, Any]], pending: list[Delivery],
                      rejections: list[tuple[str, Rejection]]) -> AcceptReport:
        c = self.config
        # Back-pressure before the commit, so a committed batch is queued at once.
        if not await self.scheduler.wait_for_room(len(pending), c.accept_timeout / 2):
            log.warning("queue still full after %.0fs; taking %d more anyway",
                        c.accept_timeout / 2, len(pending))
        now = self._clock.now()
        lease_until = now + timedelta(seconds=c.lease_seconds)
        # Each rejection names its task, so `deliveries show <task id>` finds it too.
        rejections = [(mid, replace(r, task_id=task_id_of(mid))) for mid, r in rejections]
        inserted = await self.store.insert_intake(
            rows,
            [(derived_id("msg", mid, REJECTION_SUFFIX), r) for mid, r in rejections],
            lease={d.id for d in pending},
            lease_until=lease_until,
            idempotency_cutoff=now - timedelta(seconds=c.idempotency_window),
        )
        lease_ts = lease_until.timestamp()
        fresh = [replace(d, lease_until=lease_ts) for d in pending if d.id in inserted]
        self.scheduler.submit(fresh)
        accepted = [row["id"] for row in rows if row["id"] in inserted]
        report = AcceptReport(accepted=accepted, duplicates=len(rows) - len(accepted),
                              rejected=[r for _, r in rejections],
                              task_of={row["id"]: row["task_id"] for row in rows})
        for rejection in report.rejected:
            log.warning("rejected event for %s: %s: %s", rejection.webhook_id, rejection.code,
                        rejection.message)
        return report

    async def fan_out(
        self, message_id: str, event_type: str, data: Any, idempotency_key: str | None
    ) -> AcceptReport:
        """One event to every enabled endpoint subscribed to `event_type`."""
        body = fan_out_body(event_type, data, self._clock.now())
        eps = await self.store.subscribed_endpoints(event_type)
        return await self.accept([
            Incoming(message_id, EventIn(ep.id, body, idempotency_key, event_type)) for ep in eps
        ])
