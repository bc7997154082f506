"""Intake on a real database: commit, dedupe, reject, and sweeping a backlog."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from worker.db.schema import deliveries
from worker.db.store import Store
from worker.delivery.dispatcher import Dispatcher
from worker.delivery.intake import Incoming, Intake
from worker.delivery.models import AttemptRecord, Delivery, Endpoint, EventIn, HttpResult
from worker.delivery.signing import generate_secret
from worker.settings import Settings


class InstantSender:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, delivery: Delivery) -> HttpResult:
        self.sent.append(delivery.id)
        return HttpResult(status_code=204)


class CountingRecorder:
    def __init__(self, store: Store) -> None:
        self.store, self.count = store, 0

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        await self.store.record_attempts(records)
        self.count += len(records)


async def make_intake(store: Store, **overrides: Any) -> tuple[Intake, Dispatcher, InstantSender]:
    settings = Settings(database_url="sqlite://", **overrides)
    sender = InstantSender()
    dispatcher = Dispatcher(settings, sender, CountingRecorder(store))
    dispatcher.start()
    await store.add_endpoint(Endpoint(id="ep-a", url="http://127.0.0.1:9/", secrets=(
        generate_secret(),)))
    return Intake(settings, store, dispatcher), dispatcher, sender


async def wait_recorded(dispatcher: Dispatcher, count: int) -> None:
    async with asyncio.timeout(10):
        while dispatcher.stats["recorded"] < count:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.01)


async def test_accept_commits_dedupes_redelivery_and_records_rejections(store: Store) -> None:
    intake, dispatcher, sender = await make_intake(store)
    items = [Incoming(f"task-{n}:0", EventIn("ep-a", {"n": n})) for n in range(50)]
    items.append(Incoming("task-x:0", EventIn("nope", {"n": 1})))
    items.append(Incoming("task-y:0", EventIn("ep-a", ["not", "an", "object"])))
    report = await intake.accept(items)
    assert len(report.accepted) == 50 and report.duplicates == 0
    assert sorted(r.code for r in report.rejected) == ["payload_not_object", "unknown_endpoint"]

    again = await intake.accept(items)  # the broker redelivered the same messages
    assert again.accepted == [] and again.duplicates == 50
    await wait_recorded(dispatcher, 50)
    assert sorted(sender.sent) == sorted(report.accepted)
    assert await store.status_counts() == {"succeeded": 50, "rejected": 2}
    await dispatcher.drain(1)


async def test_sweep_drains_a_backlog_larger_than_one_sweep(store: Store) -> None:
    intake, dispatcher, sender = await make_intake(store, sweep_limit=100, max_queued=300)
    # 450 committed deliveries whose worker died: leases already expired.
    now = datetime.now(UTC)
    rows = [{"id": f"msg_{n:04d}", "endpoint_id": "ep-a", "event_type": None,
             "idempotency_key": None, "payload": b"{}"} for n in range(450)]
    await store.insert_intake(rows, [], lease_until=now - timedelta(seconds=1),
                              idempotency_cutoff=now - timedelta(days=1))
    async with store.engine.begin() as conn:
        await conn.execute(update(deliveries).values(next_attempt_at=now - timedelta(seconds=1)))

    claimed, failed = await intake.sweep_for(10)
    assert (claimed, failed) == (450, 0)
    await wait_recorded(dispatcher, 450)
    assert len(sender.sent) == len(set(sender.sent)) == 450
    assert await store.status_counts() == {"succeeded": 450}
    await dispatcher.drain(1)
