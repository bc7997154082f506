"""The database goes away while the broker keeps handing out events: nothing is lost."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import PG_ADMIN_URL, _pg_admin
from tests.integration.conftest import Receiver, wait_until
from tests.integration.test_pipeline import add_endpoint, status_counts
from worker.db.migrate import upgrade

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def own_pg_database() -> Iterator[tuple[str, str]]:
    name = f"webhooks_outage_{uuid.uuid4().hex[:10]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{name}"
    upgrade(url)
    try:
        yield name, url
    finally:
        _pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_events_sent_during_a_database_outage_are_delivered_after_it(
    own_pg_database: tuple[str, str], receiver: Receiver, start_worker: Any
) -> None:
    from worker.celery_app import app
    from worker.tasks.webhook_delivery import deliver_webhook_event, deliver_webhook_events

    name, url = own_pg_database
    path = f"/ok/outage-{time.time_ns()}"
    ep = add_endpoint(url, "ep-outage", receiver.url(path))
    worker = start_worker(url, WEBHOOKS_REQUEUE_DELAY="0.5")
    deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "before"})
    wait_until(lambda: len(receiver.requests_to(path)) == 1, 30, "a delivery before the outage")

    _pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    _pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    for n in range(20):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "during", "n": n})
    deliver_webhook_events.delay(events=[
        {"webhook_id": ep.id, "event_data": {"type": "batch", "n": n}} for n in range(10)])
    # A malformed message among the gathered ones must not take the worker down.
    app.send_task("webhooks.deliver_event", kwargs={"webhook_id": ep.id})

    wait_until(lambda: "next try in" in worker.log() and "retrying in" in worker.log(), 30,
               "the worker to keep the messages while the database is away")
    time.sleep(2)
    assert len(receiver.requests_to(path)) == 1  # nothing delivered without a commit
    assert worker.proc is not None and worker.proc.poll() is None

    _pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    wait_until(lambda: len(receiver.requests_to(path)) >= 31, 60, "the 30 kept events")
    wait_until(lambda: status_counts(url, ep.id) == {"succeeded": 31, "rejected": 1}, 30,
               "31 succeeded and the malformed message rejected")
    ids = [s.headers["webhook-id"] for s in receiver.requests_to(path)]
    assert len(ids) == len(set(ids)) == 31
