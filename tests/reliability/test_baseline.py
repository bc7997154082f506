"""The control: no fault at all. If this fails, the harness is broken, not the worker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.reliability.conftest import StartWorker
from tests.reliability.harness import FAST, Database, Producer, RedisServer, wait_until
from tests.reliability.ledger import Ledger
from tests.reliability.servers import Receiver

pytestmark = pytest.mark.timeout(90)


def test_no_fault_every_event_delivered_once(
    start_worker: StartWorker, producer: Producer, receiver: Receiver, database: Database,
    redis_server: RedisServer, endpoints: Callable[[dict[str, str]], None],
    make_ledger: Callable[[str, str], Ledger],
) -> None:
    ledger = make_ledger("baseline", "none")
    endpoints({"ep-base": "ok"})
    worker = start_worker(**FAST)
    producer.send("single", [ledger.single("ep-base") for _ in range(50)])
    producer.send("batch", [[{"webhook_id": "ep-base", "event_data": ledger.event_data("ep-base")}
                             for _ in range(50)]])
    ledger.wait_settled(receiver, database, 30)
    ledger.check(receiver, database, duplicates_allowed=False)
    wait_until(lambda: database.status_counts() == {"succeeded": 100}, 10,
               "every outcome recorded as succeeded")
    assert worker.alive()
    assert redis_server.wait_drained() == {"celery list": 0, "unacked hash": 0}
