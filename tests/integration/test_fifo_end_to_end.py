"""Ordered delivery end to end: FIFO endpoints through real worker processes on PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from tests.integration.conftest import serving, wait_until
from tests.integration.test_health_end_to_end import add, status_counts, with_store
from worker.core.models import Ordering

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)]


@dataclass
class Hit:
    path: str
    key: str
    n: int
    at: float
    status: int


@dataclass
class OrderedReceiver:
    """Answers a path's first `fail_first[path]` requests with 500, then 200, each after
    `delay[path]` seconds; notes on arrival which event (`key`, `n`) each request carried."""

    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _counts: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        with self.lock:
            self._counts[request.path] += 1
            status = 500 if self._counts[request.path] <= self.fail_first.get(
                request.path, 0) else 200
            self.hits.append(Hit(request.path, event.get("key", ""), event["n"], time.time(),
                                 status))
        await asyncio.sleep(self.delay.get(request.path, 0.0))
        return web.Response(status=status)


@pytest.fixture(scope="module")
def ordered() -> Iterator[OrderedReceiver]:
    state = OrderedReceiver()
    with serving(state.handle, "fifo-receiver") as state.port:
        yield state


def _fifo_endpoint(database_url: str, endpoint_id: str, url: str) -> None:
    add(database_url, endpoint_id, url)

    async def fifo(store: Any) -> Any:
        return await store.update_endpoint(endpoint_id, ordering=Ordering.FIFO.value)

    with_store(database_url, fifo)


def _wait_committed(database_url: str, endpoint_id: str, count: int) -> None:
    wait_until(lambda: sum(status_counts(database_url, endpoint_id).values()) >= count, 20,
               f"{count} deliveries committed")


def _send_in_order(database_url: str, endpoint_id: str, events: list[dict[str, Any]],
                   per_message: int) -> None:
    """Publish `events` in messages of `per_message`, each once the one before is committed:
    with two workers taking messages, that makes the publishing order the enqueue order."""
    from worker.tasks.webhook_delivery import deliver_webhook_events

    for start in range(0, len(events), per_message):
        chunk = events[start:start + per_message]
        deliver_webhook_events.delay(events=[
            {"webhook_id": endpoint_id, "event_data": {"type": "t", **e},
             **({"ordering_key": e["key"]} if e.get("key") else {})} for e in chunk])
        _wait_committed(database_url, endpoint_id, start + len(chunk))


def test_a_fifo_endpoint_answering_500_then_200_gets_every_event_in_order_from_two_workers(
    database_url: str, ordered: OrderedReceiver, start_worker: Any
) -> None:
    path = f"/fifo-{time.time_ns()}"
    ordered.fail_first[path] = 5
    _fifo_endpoint(database_url, "ep-fifo", ordered.url(path))
    # Retry schedule 1,1,1: event 0 fails 4 times -> failed; event 1 fails once, then 200.
    start_worker(database_url, WEBHOOKS_CLAIM_INTERVAL="0.5")
    start_worker(database_url, WEBHOOKS_CLAIM_INTERVAL="0.5")
    total = 30
    _send_in_order(database_url, "ep-fifo", [{"n": n} for n in range(total)], per_message=5)

    wait_until(lambda: sum(1 for h in ordered.to(path) if h.status == 200) >= total - 1, 90,
               "every event but the first delivered")
    wait_until(lambda: status_counts(database_url, "ep-fifo") == Counter(
        {"succeeded": total - 1, "failed": 1}), 20, "the outcomes recorded")
    time.sleep(0.5)  # room for a stray request to show up
    hits = ordered.to(path)
    print(f"\nfifo requests (n:status): {' '.join(f'{h.n}:{h.status}' for h in hits[:12])} …")
    assert [h.n for h in hits[:4]] == [0, 0, 0, 0]  # the head's retries before anything else
    assert [h.status for h in hits[:6]] == [500] * 5 + [200]
    assert [h.n for h in hits if h.status == 200] == list(range(1, total))
    # Retries of 0 until it ended failed, then 1 (one 500, then 200), then the rest in order.
    for before, after in itertools.pairwise(hits[4:]):
        assert after.n >= before.n, f"{after.n} was sent after {before.n}"
        if after.n > before.n:
            assert before.status == 200 and after.n == before.n + 1


def test_fifo_queues_run_side_by_side_at_the_receivers_pace(
    database_url: str, ordered: OrderedReceiver, start_worker: Any
) -> None:
    """100 ms per answer: one ordering key gets about 10 a second, and eight keys about
    eight times that, each in its own order."""
    path = f"/paced-{time.time_ns()}"
    ordered.delay[path] = 0.1
    _fifo_endpoint(database_url, "ep-paced", ordered.url(path))
    start_worker(database_url, WEBHOOKS_CLAIM_INTERVAL="2")

    per_key, keys = 20, 8
    one = [{"key": "solo", "n": n} for n in range(per_key)]
    _send_in_order(database_url, "ep-paced", one, per_message=per_key)
    wait_until(lambda: len(ordered.to(path)) >= per_key, 30, "one key's events")
    solo = ordered.to(path)
    solo_rate = (len(solo) - 1) / (solo[-1].at - solo[0].at)

    many = [{"key": f"k{k}", "n": n} for n in range(per_key) for k in range(keys)]
    _send_in_order(database_url, "ep-paced", many, per_message=len(many))
    wait_until(lambda: len(ordered.to(path)) >= per_key * (keys + 1), 60, "eight keys' events")
    hits = ordered.to(path)[per_key:]
    many_rate = (len(hits) - 1) / (hits[-1].at - hits[0].at)
    print(f"\nFIFO at 100 ms per answer: one key {solo_rate:.1f}/s; "
          f"{keys} keys {many_rate:.1f}/s together ({many_rate / keys:.1f}/s each)")
    for key in ["solo", *(f"k{k}" for k in range(keys))]:
        mine = [h.n for h in ordered.to(path) if h.key == key]
        assert mine == list(range(per_key)), f"queue {key} out of order: {mine}"
    assert solo_rate >= 6.0, f"one key: {solo_rate:.1f}/s"
    assert many_rate >= 4 * solo_rate, f"{keys} keys: {many_rate:.1f}/s vs {solo_rate:.1f}/s"


def test_a_worker_killed_with_the_head_in_flight_loses_nothing_and_keeps_the_order(
    database_url: str, ordered: OrderedReceiver, start_worker: Any
) -> None:
    """SIGKILL while a queue's head is being sent: nothing behind it goes until its lease
    runs out and another worker sends it again; then the rest, in order."""
    path = f"/crash-{time.time_ns()}"
    ordered.delay[path] = 1.5
    _fifo_endpoint(database_url, "ep-crash", ordered.url(path))
    first = start_worker(database_url, WEBHOOKS_LEASE_SECONDS="4",
                         WEBHOOKS_REQUEST_TIMEOUT="3", WEBHOOKS_CLAIM_INTERVAL="0.5")
    total = 6
    _send_in_order(database_url, "ep-crash", [{"n": n} for n in range(total)], per_message=total)
    wait_until(lambda: ordered.to(path), 20, "the head's first request")
    first.kill()
    ordered.delay[path] = 0.0
    start_worker(database_url, WEBHOOKS_LEASE_SECONDS="4", WEBHOOKS_REQUEST_TIMEOUT="3",
                 WEBHOOKS_CLAIM_INTERVAL="0.5")
    wait_until(lambda: status_counts(database_url, "ep-crash") == Counter(
        {"succeeded": total}), 60, "every event delivered after the crash")
    sent = [h.n for h in ordered.to(path)]
    print(f"\nrequests after a SIGKILL with the head in flight: {sent}")
    # The head twice (the dead worker's answer was never recorded), then each once, in order.
    assert sent == [0, 0, *range(1, total)]
