"""deliver_all: the whole engine (dispatcher + sender) against a real loopback server."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from worker.core.models import DeliveryStatus, ErrorKind, OutcomeKind
from worker.core.signing import generate_secret
from worker.delivery.standalone import deliver_all

pytestmark = pytest.mark.timeout(20)


def header(seen, name: str) -> str:
    return {k.lower(): v for k, v in seen.headers.items()}[name]


async def test_500_deliveries_arrive_exactly_once_and_succeed(server, make_settings,
                                                              make_delivery):
    secret = generate_secret()
    deliveries = [
        make_delivery(server.url(), secrets=(secret,), payload=b'{"n":%d}' % i)
        for i in range(500)
    ]

    records = await asyncio.wait_for(
        deliver_all(deliveries, make_settings(request_timeout=5.0, connect_timeout=5.0),
                    timeout=15),
        20,
    )

    arrived = Counter(header(r, "webhook-id") for r in server.requests)
    assert len(server.requests) == 500
    assert set(arrived) == {d.id for d in deliveries}
    assert set(arrived.values()) == {1}
    assert len(records) == 500
    assert Counter(r.delivery.id for r in records) == Counter(d.id for d in deliveries)
    assert all(r.next_status is DeliveryStatus.SUCCEEDED for r in records)
    assert all(r.outcome.kind is OutcomeKind.SUCCESS for r in records)
    assert all(r.attempt_number == 1 and r.next_attempt_at is None for r in records)
    bodies = {d.id: d.payload for d in deliveries}
    webhook = Webhook(secret)
    for seen in server.requests:
        assert seen.body == bodies[header(seen, "webhook-id")]
        webhook.verify(seen.body, seen.headers)


async def test_in_flight_bound_holds_end_to_end(server, make_settings, make_delivery):
    state = {"now": 0, "peak": 0}

    async def slowish(request: web.Request, body: bytes) -> web.StreamResponse:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        try:
            await asyncio.sleep(0.02)
        finally:
            state["now"] -= 1
        return web.Response(text="ok")

    server.default = slowish
    deliveries = [make_delivery(server.url()) for _ in range(200)]

    records = await deliver_all(deliveries, make_settings(max_in_flight=10), timeout=10)

    assert len(records) == 200
    assert len(server.requests) == 200
    assert 1 < state["peak"] <= 10


async def test_mixed_outcomes_are_recorded_per_delivery(server, make_settings, make_delivery,
                                                        closed_port):
    async def failing(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=500, text="nope")

    server.on("/fail", failing)
    ok = [make_delivery(server.url("/ok")) for _ in range(10)]
    fail = [make_delivery(server.url("/fail")) for _ in range(10)]
    refused = [make_delivery(f"http://127.0.0.1:{closed_port}/x") for _ in range(5)]

    records = await deliver_all([*ok, *fail, *refused], make_settings(), timeout=10)

    by_id = {r.delivery.id: r for r in records}
    assert len(records) == len(by_id) == 25
    for d in ok:
        assert by_id[d.id].next_status is DeliveryStatus.SUCCEEDED
    for d in fail:
        record = by_id[d.id]
        assert record.next_status is DeliveryStatus.PENDING
        assert record.next_attempt_at is not None
        assert record.result.status_code == 500
        assert record.result.response_excerpt == "nope"
    for d in refused:
        assert by_id[d.id].next_status is DeliveryStatus.PENDING
        assert by_id[d.id].outcome.error_kind is ErrorKind.CONNECT
    assert len(server.hits("/ok")) == 10
    assert len(server.hits("/fail")) == 10


async def test_blocked_destination_is_failed_without_a_request(server, make_settings,
                                                               make_delivery):
    deliveries = [make_delivery(server.url()) for _ in range(3)]

    records = await deliver_all(deliveries, make_settings(allowed_networks=""), timeout=5)

    assert len(records) == 3
    assert all(r.next_status is DeliveryStatus.FAILED for r in records)
    assert all(r.outcome.kind is OutcomeKind.BLOCKED for r in records)
    assert server.requests == []


async def test_nothing_to_deliver_returns_at_once(make_settings):
    assert await asyncio.wait_for(deliver_all([], make_settings()), 2) == []


async def test_timeout_bounds_deliver_all(server, make_settings, make_delivery):
    async def stuck(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.Response(text="late")

    server.default = stuck
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await deliver_all([make_delivery(server.url())], make_settings(request_timeout=5.0),
                          timeout=0.3)
    assert time.monotonic() - started < 2.0
