"""The outbox end to end: a producer's own transaction -> a real worker process -> a POST.

No Celery message is involved: the worker's claim loop takes the rows, woken by NOTIFY on
PostgreSQL and by its short poll on SQLite. Beat's sweep is pushed out of the way (300 s) so
it cannot be what delivers them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from tests.conftest import _truncate_pg
from tests.integration.conftest import Receiver, wait_until
from tests.integration.test_pipeline import add_endpoint, status_counts
from tests.test_outbox import sync_url
from worker import outbox
from worker.db.schema import deliveries

pytestmark = pytest.mark.timeout(180)

NO_BEAT = {"WEBHOOKS_SWEEP_INTERVAL": "300"}


@pytest.fixture
def producer(database_url: str) -> Iterator[Engine]:
    engine = create_engine(sync_url(database_url))
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_database: str) -> str:
    _truncate_pg(pg_database)
    return pg_database


def bodies(receiver: Receiver, path: str) -> list[dict[str, Any]]:
    return [orjson.loads(s.body) for s in receiver.requests_to(path)]


def test_rolled_back_sends_nothing_and_committed_is_delivered(
        database_url: str, producer: Engine, receiver: Receiver, start_worker: Any) -> None:
    path = f"/ok/outbox-{time.time_ns()}"
    ep = add_endpoint(database_url, "ep-outbox", receiver.url(path))
    start_worker(database_url, **NO_BEAT)

    with Session(producer) as session:
        outbox.enqueue(session, webhook_id=ep.id, event_data={"type": "t", "n": "rolled-back"})
        session.rollback()
    with Session(producer) as session, session.begin():
        committed = outbox.enqueue(session, webhook_id=ep.id,
                                   event_data={"type": "t", "n": "committed"})
        batch = outbox.enqueue_many(session, [
            {"webhook_id": ep.id, "event_data": {"type": "t", "n": i}} for i in range(100)])

    wait_until(lambda: len(receiver.requests_to(path)) >= 101, 30, "101 deliveries")
    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == 101, 30, "recorded")
    seen = receiver.requests_to(path)
    assert {s.headers["webhook-id"] for s in seen} == {committed, *batch}
    assert "rolled-back" not in {b["n"] for b in bodies(receiver, path)}
    with producer.connect() as conn:
        assert len(conn.execute(select(deliveries.c.id)).scalars().all()) == 101


def test_worker_killed_with_outbox_deliveries_in_flight_loses_nothing(
        pg_url: str, receiver: Receiver, start_worker: Any) -> None:
    path = f"/slow/outbox-kill-{time.time_ns()}"  # answers after 3 s: in flight when killed
    ep = add_endpoint(pg_url, "ep-outbox-kill", receiver.url(path))
    worker = start_worker(pg_url, **NO_BEAT)
    engine = create_engine(sync_url(pg_url))
    try:
        with Session(engine) as session, session.begin():
            ids = outbox.enqueue_many(session, [
                {"webhook_id": ep.id, "event_data": {"type": "t", "n": i}} for i in range(20)])
        wait_until(lambda: len(receiver.requests_to(path)) >= 20, 30, "20 attempts in flight")
        worker.kill()
        assert status_counts(pg_url, ep.id) == {"pending": 20}  # nothing recorded yet
        t0 = time.monotonic()
        start_worker(pg_url, **NO_BEAT)  # leases are 6 s here
        wait_until(lambda: status_counts(pg_url, ep.id)["succeeded"] == 20, 60,
                   "all 20 delivered by the new worker")
        print(f"\nSIGKILL with 20 outbox deliveries in flight: all 20 succeeded "
              f"{time.monotonic() - t0:.1f}s after the new worker started (lease 6 s, "
              f"receiver answers after 3 s)")
        by_id: dict[str, int] = {}
        for s in receiver.requests_to(path):
            by_id[s.headers["webhook-id"]] = by_id.get(s.headers["webhook-id"], 0) + 1
        assert set(by_id) == set(ids)
        assert all(n >= 2 for n in by_id.values())  # sent again under the same webhook-id
    finally:
        engine.dispose()


def test_commit_to_first_byte_is_fast_with_notify(pg_url: str, receiver: Receiver,
                                                  start_worker: Any) -> None:
    path = f"/ok/outbox-latency-{time.time_ns()}"
    ep = add_endpoint(pg_url, "ep-outbox-latency", receiver.url(path))
    # Neither the claim poll (30 s) nor beat's sweep could deliver within the bound: only
    # the NOTIFY can.
    start_worker(pg_url, WEBHOOKS_CLAIM_INTERVAL="30", **NO_BEAT)
    engine = create_engine(sync_url(pg_url))
    latencies: list[float] = []
    try:
        with Session(engine) as session, session.begin():  # warm: connections, endpoint
            outbox.enqueue(session, webhook_id=ep.id, event_data={"type": "warm"})
        wait_until(lambda: len(receiver.requests_to(path)) == 1, 40, "the warm-up delivery")
        for n in range(20):
            with Session(engine) as session:
                outbox.enqueue(session, webhook_id=ep.id, event_data={"type": "t", "n": n})
                session.commit()
                committed = time.time()
            arrived = wait_until(
                lambda n=n: [s.at for s in receiver.requests_to(path)
                             if orjson.loads(s.body).get("n") == n], 10, f"event {n}")
            latencies.append((arrived[0] - committed) * 1000)
    finally:
        engine.dispose()
    latencies.sort()
    p50 = statistics.median(latencies)
    print(f"\ncommit -> receiver, NOTIFY wake-up, 20 transactions: p50 {p50:.1f} ms, "
          f"p90 {latencies[17]:.1f} ms, max {latencies[-1]:.1f} ms")
    assert p50 < 300 and latencies[-1] < 2000
