"""The retry sweep on a real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from worker.db.schema import deliveries
from worker.db.store import Store


async def test_sweep_drains_a_backlog_larger_than_one_sweep(
    store: Store, engine_parts: Any
) -> None:
    parts = await engine_parts(store, sweep_limit=100, max_queued=300)
    sender = parts.sender
    # 450 committed deliveries whose worker died: leases already expired.
    now = datetime.now(UTC)
    rows = [{"id": f"msg_{n:04d}", "endpoint_id": "ep-a", "event_type": None,
             "idempotency_key": None, "payload": b"{}"} for n in range(450)]
    await store.insert_intake(rows, [], lease_until=now - timedelta(seconds=1),
                              idempotency_cutoff=now - timedelta(days=1))
    async with store.engine.begin() as conn:
        await conn.execute(update(deliveries).values(next_attempt_at=now - timedelta(seconds=1)))

    claimed, failed = await parts.sweeper.sweep_for(10)
    assert (claimed, failed) == (450, 0)
    await parts.wait_recorded(450)
    assert len(sender.sent) == len(set(sender.sent)) == 450
    assert await store.status_counts() == {"succeeded": 450}
    await parts.stop()
