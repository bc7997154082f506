"""Operator events: which changes become events, and that they are committed as ordinary
deliveries to the operator's endpoint (one per backlog window across processes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import select, update

from tests.core.test_attempt_log import record
from worker.core.health import HealthChange, HealthEvent
from worker.core.models import Endpoint, OutcomeKind
from worker.core.signing import generate_secret
from worker.db.schema import deliveries
from worker.db.store import Store
from worker.delivery.operator import (
    OperatorConfig,
    OperatorEvents,
    failure_events,
    health_events,
)

OPS = "ops"


def test_health_changes_become_events_but_never_about_the_operator_endpoint() -> None:
    until = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)
    events = health_events([
        HealthChange("ep-a", HealthEvent.DISABLED, reason="410 Gone"),
        HealthChange("ep-b", HealthEvent.OPENED, until=until, reason="HTTP 500"),
        HealthChange("ep-c", HealthEvent.CLOSED),
        HealthChange(OPS, HealthEvent.DISABLED, reason="its own trouble"),
    ], OPS)
    assert events == [
        ("operator.endpoint.disabled", {"endpoint": "ep-a", "reason": "410 Gone"}),
        ("operator.endpoint.circuit_opened",
         {"endpoint": "ep-b", "until": until.isoformat(), "last_error": "HTTP 500"}),
    ]


def test_deliveries_that_ended_failed_are_one_event_per_endpoint() -> None:
    ended = [record(OutcomeKind.FAILED, status=500, error="HTTP 500") for _ in range(3)]
    retried = record(OutcomeKind.RETRY, status=500, error="HTTP 500")
    ok = record(OutcomeKind.SUCCESS)
    (event,) = failure_events([*ended, retried, ok], OPS)
    kind, data = event
    assert kind == "operator.deliveries.failed"
    assert data["count"] == 3 and data["last_error"] == "HTTP 500"
    assert data["deliveries"] == [r.delivery.id for r in ended]
    assert failure_events([retried, ok], OPS) == []


async def _operator_rows(store: Store) -> list[Any]:
    async with store.engine.connect() as conn:
        return list(await conn.execute(
            select(deliveries).where(deliveries.c.endpoint_id == OPS)))


async def test_events_are_committed_as_deliveries_to_the_operator_endpoint(
        store: Store, engine_parts: Any) -> None:
    parts = await engine_parts(store)
    await store.add_endpoint(Endpoint(id=OPS, url="http://127.0.0.1:9/ops",
                                      secrets=(generate_secret(),)))
    events = OperatorEvents(OperatorConfig(OPS), parts.intake.accept, store)
    events.on_health([HealthChange("ep-a", HealthEvent.DISABLED, reason="410 Gone")])
    events.on_written([record(OutcomeKind.FAILED, status=500, error="HTTP 500")])
    assert await events.flush() == 2
    await parts.wait_recorded(2)
    rows = await _operator_rows(store)
    kinds = sorted(row.event_type for row in rows)
    assert kinds == ["operator.deliveries.failed", "operator.endpoint.disabled"]
    body = orjson.loads(next(r.payload for r in rows
                             if r.event_type == "operator.endpoint.disabled"))
    assert body["type"] == "operator.endpoint.disabled"
    assert body["data"] == {"endpoint": "ep-a", "reason": "410 Gone"}
    assert sorted(parts.sender.sent) == sorted(row.id for row in rows)  # sent like any other
    assert await events.flush() == 0
    await parts.stop()


async def test_a_missing_operator_endpoint_is_recorded_and_said(
        store: Store, engine_parts: Any, caplog: Any) -> None:
    parts = await engine_parts(store)
    events = OperatorEvents(OperatorConfig("no-such-endpoint"), parts.intake.accept, store)
    events.on_health([HealthChange("ep-a", HealthEvent.DISABLED, reason="x")])
    assert await events.flush() == 0
    assert "WEBHOOKS_OPERATOR_ENDPOINT" in caplog.text
    await parts.stop()


async def test_an_old_backlog_is_one_event_per_window_whatever_the_processes(
        store: Store, engine_parts: Any) -> None:
    parts = await engine_parts(store)
    await store.add_endpoint(Endpoint(id=OPS, url="http://127.0.0.1:9/ops",
                                      secrets=(generate_secret(),)))
    config = OperatorConfig(OPS, backlog_alert_seconds=300)
    first = OperatorEvents(config, parts.intake.accept, store)
    second = OperatorEvents(config, parts.intake.accept, store)  # another worker process
    await first.check_backlog()
    assert await first.flush() == 0  # nothing due: nothing to say

    now = datetime.now(UTC)
    await store.insert_intake(
        [{"id": "msg_old", "endpoint_id": "ep-a", "event_type": None, "idempotency_key": None,
          "payload": b"{}"}], [], lease_until=now, idempotency_cutoff=now - timedelta(days=1))
    async with store.engine.begin() as conn:
        await conn.execute(update(deliveries).where(deliveries.c.id == "msg_old").values(
            next_attempt_at=now - timedelta(seconds=400), locked_until=None))
    await first.check_backlog()
    await second.check_backlog()
    await first.check_backlog()  # again within the window: nothing new from this process
    assert await first.flush() == 1
    assert await second.flush() == 0  # the same event id: a duplicate, not a second event
    rows = await _operator_rows(store)
    assert [r.event_type for r in rows] == ["operator.backlog.too_old"]
    assert orjson.loads(rows[0].payload)["data"]["oldest_due_seconds"] >= 400
    await parts.stop()
