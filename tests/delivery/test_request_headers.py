"""The headers an attempt sent are recorded with it: the signed ones as sent, static header
values (sealed credentials) replaced by "(sealed)", on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select

from worker.core.models import (
    SEALED_VALUE,
    Delivery,
    DeliveryStatus,
    EndpointPolicy,
)
from worker.core.outcome import decide
from worker.core.signing import verify
from worker.db.schema import attempts, deliveries
from worker.db.store import Store
from worker.delivery.sender import USER_AGENT, Sender, SenderConfig
from worker.settings import Settings


async def test_recorded_headers_are_the_signed_ones_with_static_values_sealed(
        store: Store, server: Any, make_settings: Callable[..., Settings],
        make_delivery: Callable[..., Delivery]) -> None:
    policy = EndpointPolicy(headers=(("X-Api-Key", "receiver-api-key-123"),))
    delivery = make_delivery(server.url(), policy=policy)
    now = datetime.now(UTC)
    async with store.engine.begin() as conn:
        await conn.execute(insert(deliveries), [{
            "id": delivery.id, "endpoint_id": delivery.endpoint_id, "payload": delivery.payload,
            "status": DeliveryStatus.PENDING.value, "attempts": 0, "retry_base": 0,
            "created_at": now, "updated_at": now, "next_attempt_at": now}])
    async with Sender(SenderConfig.from_settings(make_settings())) as sender:
        result = await sender.send(delivery)
    assert result.status_code == 200
    record = decide(delivery, result, attempted_at=now, schedule=(), jitter=0.0, rand=0.5,
                    max_retry_after=60.0)
    await store.record_attempts([record])
    async with store.engine.connect() as conn:
        stored = (await conn.execute(select(attempts.c.request_headers)
                                     .where(attempts.c.delivery_id == delivery.id))).scalar()
    assert isinstance(stored, dict)
    assert stored["X-Api-Key"] == SEALED_VALUE
    assert "receiver-api-key-123" not in str(stored)
    assert delivery.secrets[0] not in str(stored)
    assert stored["webhook-id"] == delivery.id
    assert stored["content-type"] == "application/json"
    assert stored["user-agent"] == USER_AGENT
    # What was recorded is what was sent: the receiver's request verifies with it.
    (seen,) = server.hits("/hook")
    assert seen.headers["webhook-signature"] == stored["webhook-signature"]
    verify(delivery.secrets[0], stored, delivery.payload)


async def test_headers_are_recorded_for_an_attempt_that_failed_to_connect(
        make_settings: Callable[..., Settings], make_delivery: Callable[..., Delivery],
        closed_port: int) -> None:
    delivery = make_delivery(f"http://127.0.0.1:{closed_port}/hook")
    async with Sender(SenderConfig.from_settings(make_settings())) as sender:
        result = await sender.send(delivery)
    assert result.status_code is None and result.request_headers is not None
    assert dict(result.request_headers)["webhook-id"] == delivery.id
