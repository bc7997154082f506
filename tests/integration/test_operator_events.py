"""Operator events end to end: a real worker tells the operator's endpoint, with a signed
webhook, that an endpoint was disabled and that a delivery failed for good."""

from __future__ import annotations

import time
from typing import Any

import orjson
from standardwebhooks import Webhook

from tests.integration.conftest import Receiver, wait_until
from tests.integration.test_pipeline import add_endpoint, status_counts
from worker.core.signing import generate_secret


def test_a_410_reaches_the_operator_as_signed_operator_events(
    database_url: str, receiver: Receiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    stamp = time.time_ns()
    ops_secret = generate_secret()
    ops = add_endpoint(database_url, "ops", receiver.url(f"/ok/ops-{stamp}"), ops_secret)
    gone = add_endpoint(database_url, "ep-gone", receiver.url(f"/gone/{stamp}"))
    start_worker(database_url, WEBHOOKS_OPERATOR_ENDPOINT=ops.id)
    deliver_webhook_event.delay(webhook_id=gone.id, event_data={"type": "t"})

    wait_until(lambda: status_counts(database_url, gone.id)["failed"] == 1, 30, "410 failed")
    wait_until(lambda: len(receiver.requests_to(f"/ok/ops-{stamp}")) >= 2, 30,
               "two operator events")
    seen = receiver.requests_to(f"/ok/ops-{stamp}")
    bodies = [Webhook(ops_secret).verify(s.body, s.headers) for s in seen]  # signed as any other
    by_type = {b["type"]: b["data"] for b in bodies}
    assert by_type["operator.endpoint.disabled"]["endpoint"] == gone.id
    assert "410" in by_type["operator.endpoint.disabled"]["reason"]
    failed = by_type["operator.deliveries.failed"]
    assert (failed["endpoint"], failed["count"], failed["last_outcome"]) == (
        gone.id, 1, "disable")
    wait_until(lambda: status_counts(database_url, ops.id)["succeeded"] == len(seen), 10,
               "the operator deliveries recorded as succeeded")  # recorded like any other
    assert all(orjson.loads(s.body)["timestamp"] for s in seen)
