"""Turns producer messages into committed, leased deliveries and hands them on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from worker.db.store import Store
from worker.delivery.dispatcher import Dispatcher
from worker.delivery.models import AcceptReport, Delivery, EventIn, Rejection
from worker.errors import InvalidEvent
from worker.ids import derived_id
from worker.settings import Settings
from worker.validation import ValidEvent, validate_event

log = logging.getLogger("webhooks.intake")


@dataclass(frozen=True, slots=True)
class Incoming:
    """An event plus the broker identity that makes its delivery id deterministic."""

    message_id: str  # Celery task id of the carrying message, plus a position
    event: EventIn
    problem: InvalidEvent | None = None  # the message itself was malformed


def _payload_for_record(event_data: Any, limit: int) -> bytes | None:
    """What to keep of a rejected payload: the JSON if it is small enough, else a prefix."""
    try:
        body = orjson.dumps(event_data)
    except (TypeError, ValueError):
        return repr(event_data)[:2048].encode()
    return body if len(body) <= limit else body[:2048]


class Intake:
    def __init__(self, settings: Settings, store: Store, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher

    def _check(self, item: Incoming) -> ValidEvent | Rejection:
        e = item.event
        if item.problem is not None:
            return Rejection(webhook_id=str(e.webhook_id)[:128], code=item.problem.code,
                             message=str(item.problem))
        try:
            return validate_event(
                e.webhook_id, e.event_data, max_payload_bytes=self.settings.max_payload_bytes,
                idempotency_key=e.idempotency_key, event_type=e.event_type,
            )
        except InvalidEvent as exc:
            return Rejection(
                webhook_id=str(e.webhook_id)[:128], code=exc.code, message=str(exc),
                payload=_payload_for_record(e.event_data, self.settings.max_payload_bytes),
            )

    async def accept(self, items: Sequence[Incoming]) -> AcceptReport:
        """Validate, commit (one transaction), queue. Returns once the batch is durable."""
        report = AcceptReport()
        checked = [(item.message_id, self._check(item)) for item in items]
        valid = [(mid, ev) for mid, ev in checked if isinstance(ev, ValidEvent)]
        eps = await self.store.endpoints_by_id(ev.webhook_id for _, ev in valid)
        rejections: list[tuple[str, Rejection]] = [
            (mid, r) for mid, r in checked if isinstance(r, Rejection)
        ]
        rows: list[dict[str, Any]] = []
        pending: list[Delivery] = []
        for mid, ev in valid:
            ep = eps.get(ev.webhook_id)
            problem = None
            if ep is None:
                problem = ("unknown_endpoint", f"no endpoint with id {ev.webhook_id!r}")
            elif not ep.enabled:
                problem = ("endpoint_disabled",
                           f"endpoint {ep.id!r} is disabled: {ep.disabled_reason or 'by operator'}")
            if problem is not None:
                rejections.append((mid, Rejection(ev.webhook_id, *problem,
                                                  idempotency_key=ev.idempotency_key,
                                                  event_type=ev.event_type, payload=ev.payload)))
                continue
            assert ep is not None
            delivery_id = derived_id("msg", mid, ep.id)
            rows.append({"id": delivery_id, "endpoint_id": ep.id, "event_type": ev.event_type,
                         "idempotency_key": ev.idempotency_key, "payload": ev.payload})
            pending.append(Delivery(id=delivery_id, endpoint_id=ep.id, url=ep.url,
                                    secrets=ep.secrets, payload=ev.payload,
                                    event_type=ev.event_type))
        s = self.settings
        # Back-pressure before the commit, so a committed batch is queued at once.
        if not await self.dispatcher.wait_for_room(len(pending), s.accept_timeout / 2):
            log.warning("queue still full after %.0fs; taking %d more anyway",
                        s.accept_timeout / 2, len(pending))
        now = datetime.now(UTC)
        lease_until = now + timedelta(seconds=s.lease_seconds)
        inserted = await self.store.insert_intake(
            rows,
            # "!" is not allowed in endpoint ids: a rejection's id cannot be a delivery's.
            [(derived_id("msg", mid, "!rejected"), r) for mid, r in rejections],
            lease_until=lease_until,
            idempotency_cutoff=now - timedelta(seconds=s.idempotency_window),
        )
        lease_ts = lease_until.timestamp()
        fresh = [replace(d, lease_until=lease_ts) for d in pending if d.id in inserted]
        self.dispatcher.submit(fresh)
        report.accepted = [d.id for d in fresh]
        report.duplicates = len(pending) - len(fresh)
        report.rejected = [r for _, r in rejections]
        for rejection in report.rejected:
            log.warning("rejected event for %s: %s: %s", rejection.webhook_id, rejection.code,
                        rejection.message)
        return report

    async def fan_out(
        self, message_id: str, event_type: str, data: Any, idempotency_key: str | None
    ) -> AcceptReport:
        """One event to every enabled endpoint subscribed to `event_type`."""
        body = {"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": data}
        eps = await self.store.subscribed_endpoints(event_type)
        return await self.accept([
            Incoming(message_id, EventIn(ep.id, body, idempotency_key, event_type)) for ep in eps
        ])

    async def sweep(self) -> tuple[int, int]:
        """Claim due deliveries (retries, expired leases) up to the free capacity, once."""
        room = min(self.dispatcher.free_capacity, self.settings.sweep_limit)
        if room <= 0:
            return 0, 0
        ready, dead = await self.store.claim_due(room, self.settings.lease_seconds)
        self.dispatcher.submit(ready)
        return len(ready), dead

    async def sweep_for(self, seconds: float) -> tuple[int, int]:
        """Keep claiming due deliveries as room frees up, for at most `seconds`.

        A backlog (after an outage, say) then drains at delivery speed rather than one
        sweep's worth per beat tick. Stops early once nothing more is due.
        """
        deadline = time.monotonic() + seconds
        claimed = failed = 0
        while time.monotonic() < deadline:
            room = min(self.dispatcher.free_capacity, self.settings.sweep_limit)
            if room < min(100, self.settings.sweep_limit):
                await asyncio.sleep(0.05)
                continue
            got, dead = await self.sweep()
            claimed, failed = claimed + got, failed + dead
            if got + dead < room:
                break
        return claimed, failed
