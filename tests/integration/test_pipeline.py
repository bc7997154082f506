"""End to end: `.delay()` → Redis → a real Celery worker → signed POST → recorded."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from tests.integration.conftest import Receiver, WorkerProcess, wait_until
from worker.core.models import Endpoint
from worker.core.signing import generate_secret
from worker.db.connection import create_engine
from worker.db.schema import attempts, deliveries, endpoints
from worker.db.store import open_store
from worker.settings import Settings

pytestmark = pytest.mark.timeout(180)


def run_db(database_url: str, query: Any) -> Any:
    """Run `query(conn)` against the database on a loop of its own."""

    async def go() -> Any:
        engine = create_engine(Settings(database_url=database_url))
        try:
            async with engine.connect() as conn:
                return await query(conn)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def add_endpoint(database_url: str, endpoint_id: str, url: str, *secrets: str,
                 event_types: tuple[str, ...] = ()) -> Endpoint:
    async def go() -> Endpoint:
        settings = Settings(database_url=database_url)
        engine = create_engine(settings)
        try:
            return await open_store(engine, settings).add_endpoint(
                Endpoint(id=endpoint_id, url=url, secrets=secrets or (generate_secret(),),
                         event_types=event_types))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def status_counts(database_url: str, endpoint_id: str) -> Counter[str]:
    async def q(conn: Any) -> Counter[str]:
        rows = await conn.execute(
            select(deliveries.c.status, func.count())
            .where(deliveries.c.endpoint_id == endpoint_id)
            .group_by(deliveries.c.status))
        return Counter({status: count for status, count in rows})

    result: Counter[str] = run_db(database_url, q)
    return result


def attempt_rows(database_url: str, endpoint_id: str) -> list[Any]:
    async def q(conn: Any) -> list[Any]:
        rows = await conn.execute(
            select(attempts, deliveries.c.endpoint_id)
            .join(deliveries, deliveries.c.id == attempts.c.delivery_id)
            .where(deliveries.c.endpoint_id == endpoint_id))
        return list(rows)

    result: list[Any] = run_db(database_url, q)
    return result


def test_a_thousand_events_arrive_signed_and_recorded(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event, deliver_webhook_events

    old, new = generate_secret(), generate_secret()
    path = f"/ok/thousand-{time.time_ns()}"
    ep = add_endpoint(database_url, "ep-thousand", receiver.url(path), new, old)
    start_worker(database_url)

    started = time.perf_counter()
    for n in range(1000):
        deliver_webhook_event.delay(
            webhook_id=ep.id, event_data={"type": "application.submitted", "n": n})
    deliver_webhook_events.delay(events=[
        {"webhook_id": ep.id, "event_data": {"type": "batch", "n": n}} for n in range(1000, 1500)])

    wait_until(lambda: len(receiver.requests_to(path)) >= 1500, 120, "1,500 deliveries")
    elapsed = time.perf_counter() - started
    seen = receiver.requests_to(path)
    print(f"\n1,500 events delivered in {elapsed:.2f}s ({1500 / elapsed:.0f}/s) "
          f"on {database_url.split(':')[0]}")

    assert len(seen) == 1500
    assert len({s.headers["webhook-id"] for s in seen}) == 1500
    numbers = sorted(int(s.body.decode().split('"n":')[1].rstrip("}")) for s in seen)
    assert numbers == list(range(1500))
    for s in seen:
        # Both reference verifiers, with either of the two active secrets.
        StandardWebhook(new).verify(s.body, s.headers)
        StandardWebhook(old).verify(s.body, s.headers)
        SvixWebhook(new).verify(s.body, s.headers)
        assert len(s.headers["webhook-signature"].split(" ")) == 2

    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == 1500, 30,
               "1,500 succeeded rows")
    rows = attempt_rows(database_url, ep.id)
    assert len(rows) == 1500
    assert {r.status_code for r in rows} == {204}
    assert {r.outcome for r in rows} == {"success"}
    assert {r.delivery_id for r in rows} == {s.headers["webhook-id"] for s in seen}


def test_a_500_is_retried_with_the_same_webhook_id(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    secret = generate_secret()
    path = f"/flaky/retry-{time.time_ns()}"
    ep = add_endpoint(database_url, "ep-flaky", receiver.url(path), secret)
    start_worker(database_url)
    for n in range(20):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": n})

    wait_until(lambda: len(receiver.requests_to(path)) >= 40, 60, "20 first tries + 20 retries")
    seen = receiver.requests_to(path)
    by_id: dict[str, list[Any]] = {}
    for s in seen:
        by_id.setdefault(s.headers["webhook-id"], []).append(s)
    assert len(by_id) == 20
    for tries in by_id.values():
        assert len(tries) == 2
        first, second = tries
        assert second.at - first.at >= 0.9  # the schedule's 1 s, no sooner
        assert first.body == second.body
        StandardWebhook(secret).verify(second.body, second.headers)

    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == 20, 30, "succeeded")
    rows = attempt_rows(database_url, ep.id)
    assert Counter((r.attempt_number, r.status_code, r.outcome) for r in rows) == {
        (1, 500, "retry"): 20, (2, 204, "success"): 20}


def test_exhausted_retries_end_failed_and_410_disables(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    gone = add_endpoint(database_url, "ep-gone", receiver.url(f"/gone/{time.time_ns()}"))
    dead = add_endpoint(database_url, "ep-dead", "http://127.0.0.1:9/nothing-listens")
    worker = start_worker(database_url, WEBHOOKS_RETRY_SCHEDULE="0.2,0.2")
    deliver_webhook_event.delay(webhook_id=gone.id, event_data={"type": "t"})
    deliver_webhook_event.delay(webhook_id=dead.id, event_data={"type": "t"})

    wait_until(lambda: status_counts(database_url, gone.id)["failed"] == 1, 30, "410 failed")
    wait_until(lambda: status_counts(database_url, dead.id)["failed"] == 1, 30, "dead failed")

    async def endpoint_state(conn: Any) -> Any:
        return (await conn.execute(select(endpoints).where(endpoints.c.id == gone.id))).one()

    state = run_db(database_url, endpoint_state)
    assert state.enabled is False or state.enabled == 0
    assert "410" in state.disabled_reason
    dead_attempts = attempt_rows(database_url, dead.id)
    assert [r.outcome for r in sorted(dead_attempts, key=lambda r: r.attempt_number)] == [
        "retry", "retry", "failed"]
    assert {r.error_kind for r in dead_attempts} == {"connect"}
    # Each attempt is a log line whose level says how it went: the failure feed is
    # `journalctl -p warning`.
    lines = [line for line in worker.log().splitlines() if "webhooks.attempts" in line]
    dead_lines = [line for line in lines if "endpoint=ep-dead" in line]
    assert [line.split()[2] for line in dead_lines] == ["WARNING", "WARNING", "ERROR"]
    assert "attempt=3/3 outcome=failed" in dead_lines[-1] and "error_kind=connect" in dead_lines[-1]
    assert any("endpoint=ep-gone" in line and "ERROR" in line and "outcome=disable" in line
               and "status=410" in line for line in lines)

    # Later events for the disabled endpoint are held, not attempted: enabling it sends them.
    deliver_webhook_event.delay(webhook_id=gone.id, event_data={"type": "t"})
    wait_until(lambda: status_counts(database_url, gone.id)["held"] == 1, 30, "held")


def test_bad_input_is_recorded_and_the_rest_of_the_batch_is_delivered(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    from worker.celery_app import app

    path = f"/ok/mixed-{time.time_ns()}"
    ep = add_endpoint(database_url, "ep-mixed", receiver.url(path))
    start_worker(database_url, WEBHOOKS_MAX_PAYLOAD_BYTES="1000")
    # Messages that skipped the producer-side checks (another language, an old client).
    app.send_task("webhooks.deliver_events", kwargs={"events": [
        {"webhook_id": ep.id, "event_data": {"type": "good", "n": 1}},
        {"webhook_id": "no-such-endpoint", "event_data": {"type": "t"}},
        {"webhook_id": ep.id, "event_data": [1, 2, 3]},
        {"webhook_id": ep.id, "event_data": {"big": "x" * 2000}},
        {"webhook_id": ep.id},
        "not an object",
        {"webhook_id": ep.id, "event_data": {"type": "good", "n": 2}},
    ]})
    app.send_task("webhooks.deliver_event", args=["ep-mixed", {"type": "good", "n": 3}])
    app.send_task("webhooks.deliver_event", kwargs={"webhook_id": ep.id, "oops": 1})

    wait_until(lambda: len(receiver.requests_to(path)) >= 3, 30, "the three good events")

    async def rejected(conn: Any) -> list[str]:
        rows = await conn.execute(select(deliveries.c.last_error)
                                  .where(deliveries.c.status == "rejected"))
        return sorted(r.last_error.split(":")[0] for r in rows)

    codes = wait_until(lambda: (lambda c: c if len(c) == 6 else None)(run_db(database_url,
                                                                             rejected)),
                       30, "six rejections")
    assert codes == sorted(["unknown_endpoint", "payload_not_object", "payload_too_large",
                            "bad_arguments", "bad_arguments", "bad_arguments"])
    time.sleep(0.5)
    assert len(receiver.requests_to(path)) == 3


def test_producer_side_errors_are_raised_at_delay_time() -> None:
    from worker.core.errors import InvalidEvent
    from worker.tasks.webhook_delivery import (
        deliver_webhook_event,
        deliver_webhook_events,
        publish_webhook_event,
    )

    cases: list[tuple[Any, dict[str, Any], str]] = [
        (deliver_webhook_event, {"webhook_id": "ep", "event_data": [1]}, "payload_not_object"),
        (deliver_webhook_event, {"webhook_id": "ep", "event_data": {"x": object()}},
         "payload_not_json"),
        (deliver_webhook_event, {"webhook_id": "ep", "event_data": {"x": "y" * 300_000}},
         "payload_too_large"),
        (deliver_webhook_event, {"webhook_id": "", "event_data": {}}, "invalid_webhook_id"),
        (deliver_webhook_event, {"event_data": {}}, "bad_arguments"),
        (deliver_webhook_events, {"events": []}, "bad_arguments"),
        (deliver_webhook_events, {"events": [{"webhook_id": "ep", "event_data": 1}]},
         "payload_not_object"),
        (publish_webhook_event, {"data": {}}, "bad_arguments"),
    ]
    for task, kwargs, code in cases:
        with pytest.raises(InvalidEvent) as info:
            task.delay(**kwargs)
        assert info.value.code == code, (kwargs, info.value)


def test_idempotency_key_and_fan_out(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event, publish_webhook_event

    stamp = time.time_ns()
    once = add_endpoint(database_url, "ep-once", receiver.url(f"/ok/once-{stamp}"),
                        event_types=("not.fanned.out",))
    for i, types in enumerate([("order.paid",), (), ("order.paid", "x"), ("other",)]):
        add_endpoint(database_url, f"ep-sub-{i}", receiver.url(f"/ok/sub{i}-{stamp}"),
                     event_types=types)
    start_worker(database_url)
    for _ in range(3):  # a producer retrying its .delay()
        deliver_webhook_event.delay(webhook_id=once.id, event_data={"type": "t"},
                                    idempotency_key="producer-event-1")
    publish_webhook_event.delay(event_type="order.paid", data={"order": 7},
                                idempotency_key="order-7")
    publish_webhook_event.delay(event_type="order.paid", data={"order": 7},
                                idempotency_key="order-7")

    wait_until(lambda: all(receiver.requests_to(f"/ok/sub{i}-{stamp}") for i in (0, 1, 2)),
               30, "fan-out to three subscribers")
    time.sleep(1.5)  # room for any duplicate to show up
    once_seen = receiver.requests_to(f"/ok/once-{stamp}")
    assert len(once_seen) == 1, [(s.headers["webhook-id"], s.at) for s in once_seen]
    for i in (0, 1, 2):
        got = receiver.requests_to(f"/ok/sub{i}-{stamp}")
        assert len(got) == 1
        assert b'"type":"order.paid"' in got[0].body and b'"order":7' in got[0].body
    assert receiver.requests_to(f"/ok/sub3-{stamp}") == []


def test_blocked_destination_is_recorded_and_never_contacted(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    path = f"/ok/blocked-{time.time_ns()}"
    ep = add_endpoint(database_url, "ep-blocked", receiver.url(path))
    start_worker(database_url, WEBHOOKS_ALLOWED_NETWORKS="")
    deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t"})
    wait_until(lambda: status_counts(database_url, ep.id)["failed"] == 1, 30, "blocked failure")
    rows = attempt_rows(database_url, ep.id)
    assert [(r.outcome, r.error_kind) for r in rows] == [("blocked", "blocked")]
    assert receiver.requests_to(path) == []


def test_a_killed_worker_loses_nothing(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    """SIGKILL after the commit and the ack: the lease expires, another worker resumes."""
    from worker.tasks.webhook_delivery import deliver_webhook_event

    path = f"/slow/killed-{time.time_ns()}"
    ep = add_endpoint(database_url, "ep-killed", receiver.url(path))
    first: WorkerProcess = start_worker(database_url)
    for n in range(30):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": n})
    # Every event committed (pending, leased) and in flight to the slow receiver: kill.
    wait_until(lambda: len(receiver.requests_to(path)) >= 30, 30, "30 requests in flight")
    assert status_counts(database_url, ep.id) == Counter({"pending": 30})
    first.kill()

    start_worker(database_url)
    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == 30, 60,
               "30 resumed after the lease expired")
    ids = Counter(s.headers["webhook-id"] for s in receiver.requests_to(path))
    assert len(ids) == 30 and set(ids.values()) == {2}  # once per worker: same webhook-id


def test_single_events_through_a_prefork_worker(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    """Gathered batches run in pool children there, each child with its own engine."""
    from worker.tasks.webhook_delivery import deliver_webhook_event

    secret = generate_secret()
    path = f"/ok/prefork-{time.time_ns()}"
    ep = add_endpoint(database_url, "ep-prefork", receiver.url(path), secret)
    worker = start_worker(database_url, pool="prefork")
    for n in range(300):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": n})
    wait_until(lambda: len(receiver.requests_to(path)) >= 300, 60, "300 deliveries")
    seen = receiver.requests_to(path)
    assert len({s.headers["webhook-id"] for s in seen}) == 300
    StandardWebhook(secret).verify(seen[0].body, seen[0].headers)
    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == 300, 30, "recorded")
    assert "Traceback" not in worker.log()
