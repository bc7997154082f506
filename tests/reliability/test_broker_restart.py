"""Redis restarts (AOF on) while a producer keeps publishing: every event is delivered, and
single events sent afterwards at a trickle are not left waiting for a full gather."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.reliability.conftest import StartWorker
from tests.reliability.harness import FAST, Database, Producer, RedisServer, wait_until
from tests.reliability.ledger import Ledger
from tests.reliability.servers import Receiver

pytestmark = pytest.mark.timeout(150)

EVENTS = 300
RATE = 50.0  # per second, so the restart lands mid-flow
TRICKLE = 5  # single events after the restart, one at a time
TRICKLE_DEADLINE = 5.0  # seconds each may take to arrive
SETTLE_LIMIT = 30.0  # from Redis back (and the last publish) to every event delivered


def test_redis_restart_mid_flow_loses_nothing_and_strands_no_single_event(
    start_worker: StartWorker, producer: Producer, receiver: Receiver, database: Database,
    redis_server: RedisServer, endpoints: Callable[[dict[str, str]], None],
    make_ledger: Callable[[str, str], Ledger],
) -> None:
    ledger = make_ledger(
        "redis-restart",
        f"redis-server shutdown + restart (AOF) while {EVENTS} single .delay() go out at "
        f"{RATE:.0f}/s; then {TRICKLE} singles at a trickle")
    endpoints({"ep-redis": "ok"})
    worker = start_worker(**FAST)

    # The producer retries its own publish while Redis is away; its idempotency keys make a
    # publish that landed before the error count once.
    producer.submit("single", [ledger.single("ep-redis", idempotent=True) for _ in range(EVENTS)],
                    rate=RATE, retry_seconds=30)
    wait_until(lambda: len(receiver.delivered_ns()) >= 50, 30, "deliveries before the restart")
    redis_server.restart(down_seconds=1.0)
    back = time.monotonic()
    answer = producer.result(60)
    ledger.wait_settled(receiver, database, SETTLE_LIMIT)
    ledger.recovery_seconds = time.monotonic() - back
    first_wave_left = ledger.outstanding(receiver, database)

    # After the reconnect: a few single events, one at a time, each alone in the queue.
    trickle: dict[int, float | None] = {}
    for _ in range(TRICKLE):
        call = ledger.single("ep-redis", idempotent=True)
        n = call["event_data"]["n"]
        sent_at = producer.send("single", [call], retry_seconds=10)["sent"][0]["at"]
        try:
            wait_until(lambda n=n: n in receiver.delivered_ns(), TRICKLE_DEADLINE,
                       f"trickled event n={n}")
        except AssertionError:
            trickle[n] = None
        else:
            arrived = min(h.at for h in receiver.snapshot() if h.n == n and h.delivered)
            trickle[n] = arrived - sent_at
        time.sleep(1.0)
    if any(v is None for v in trickle.values()):
        ledger.wait_settled(receiver, database, 10)  # for the record: do they come at all?

    settled = ledger.finish(receiver, database)
    print(f"producer retried {answer['retries']} publishes; trickle latencies {trickle}; "
          f"broker still holds {redis_server.event_messages_held()}")
    assert worker.alive(), f"worker exited ({worker.returncode}) across the Redis restart"
    assert not first_wave_left, (
        f"{len(first_wave_left)} of the {EVENTS} events published around the restart were not "
        f"delivered within {SETTLE_LIMIT:.0f}s of Redis coming back "
        f"(n={sorted(first_wave_left)[:10]})")
    stranded = [n for n, latency in trickle.items() if latency is None]
    assert not stranded, (
        f"after the broker reconnect, {len(stranded)} of {TRICKLE} single events sent one at "
        f"a time were not delivered within {TRICKLE_DEADLINE:.0f}s each (n={stranded}): "
        "single events are stranded after a reconnect (waiting for a full gather?)")
    Ledger.assert_promise(settled, context=f"broker holds {redis_server.event_messages_held()}; ")
