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


# -- the engine's own claim loop (issue 10: retries at their time, without beat) ----------------


async def _due_in(store: Store, seconds: float, n: int = 3) -> datetime:
    now = datetime.now(UTC)
    rows = [{"id": f"msg_due_{n}_{i}", "endpoint_id": "ep-a", "event_type": None,
             "idempotency_key": None, "payload": b"{}"} for i in range(n)]
    await store.insert_intake(rows, [], lease_until=now - timedelta(seconds=1),
                              idempotency_cutoff=now - timedelta(days=1))
    due = now + timedelta(seconds=seconds)
    async with store.engine.begin() as conn:
        await conn.execute(update(deliveries).values(next_attempt_at=due, locked_until=None))
    return due


async def test_claim_loop_sends_a_retry_at_its_time_not_at_the_next_poll(
    store: Store, engine_parts: Any
) -> None:
    """Rows due in 0.6 s, a loop that otherwise looks only every 30 s: they go at their time
    (it read the next due time from the database)."""
    import asyncio
    import time

    parts = await engine_parts(store)
    due = await _due_in(store, 0.6)
    parts.sweeper.start_claiming(30.0)
    try:
        await parts.wait_recorded(3, within=5.0)
        late = time.time() - due.timestamp()
        assert -0.05 <= late < 1.0, late  # not before its time, and well before 30 s
        await asyncio.sleep(0)
    finally:
        await parts.sweeper.close()
        await parts.stop()
    assert await store.status_counts() == {"succeeded": 3}


async def test_due_at_wakes_the_loop_for_a_sooner_retry(store: Store, engine_parts: Any) -> None:
    """The loop is asleep until its 30 s poll; a retry written here for 0.3 s from now wakes it
    (as the engine does for every retry it records)."""
    import asyncio

    parts = await engine_parts(store)
    parts.sweeper.start_claiming(30.0)
    try:
        await asyncio.sleep(0.3)  # the loop found nothing due and sleeps
        due = await _due_in(store, 0.3)
        parts.sweeper.due_at(due)
        await parts.wait_recorded(3, within=3.0)
    finally:
        await parts.sweeper.close()
        await parts.stop()


async def test_claim_loop_without_a_wake_waits_for_its_poll(store: Store,
                                                            engine_parts: Any) -> None:
    """The counterpart: rows that became due behind the loop's back wait for its next look."""
    import asyncio

    parts = await engine_parts(store)
    parts.sweeper.start_claiming(30.0)
    try:
        await asyncio.sleep(0.3)
        await _due_in(store, 0.1)
        await asyncio.sleep(1.0)
        assert parts.writer.stats["recorded"] == 0
    finally:
        await parts.sweeper.close()
        await parts.stop()
