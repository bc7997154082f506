"""A receiver that fails, hangs and rate-limits: everything is still delivered within the
retry schedule, and a 429's Retry-After is honoured."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.reliability.conftest import StartWorker
from tests.reliability.harness import Database, Producer, wait_until
from tests.reliability.ledger import Ledger
from tests.reliability.servers import Receiver

pytestmark = pytest.mark.timeout(150)

SCHEDULE = (1, 1, 2, 2, 4)
REQUEST_TIMEOUT = 2.0
HANG = REQUEST_TIMEOUT + 3.0
# Every attempt plus every delay of the schedule, plus sweeps and gathering: the worst case.
SETTLE_LIMIT = sum(SCHEDULE) + (len(SCHEDULE) + 1) * REQUEST_TIMEOUT + 20
PER_ENDPOINT = {"flaky": 100, "hang": 10, "limited1": 10, "limited3": 10, "ok": 20}


def test_receiver_chaos_everything_delivered_within_the_schedule(
    start_worker: StartWorker, producer: Producer, receiver: Receiver, database: Database,
    endpoints: Callable[[dict[str, str]], None], make_ledger: Callable[[str, str], Ledger],
) -> None:
    ledger = make_ledger(
        "receiver-chaos",
        "30% of webhook-ids get 500 (1-2 times), first attempts that hang past the request "
        "timeout, 429 with Retry-After 1 s and 3 s; retry schedule 1,1,2,2,4")
    receiver.hang_seconds = HANG
    receiver.flaky_percent = 30
    endpoints({f"ep-{name}": name for name in PER_ENDPOINT})
    worker = start_worker(
        WEBHOOKS_RETRY_SCHEDULE=",".join(map(str, SCHEDULE)), WEBHOOKS_RETRY_JITTER="0",
        WEBHOOKS_SWEEP_INTERVAL="0.5", WEBHOOKS_LEASE_SECONDS="6",
        WEBHOOKS_REQUEST_TIMEOUT=str(REQUEST_TIMEOUT), WEBHOOKS_REQUEUE_DELAY="0.5")

    calls = [ledger.single(f"ep-{name}") for name, count in PER_ENDPOINT.items()
             for _ in range(count)]
    random.Random(7).shuffle(calls)
    producer.send("single", calls)
    started = time.monotonic()
    ledger.wait_settled(receiver, database, SETTLE_LIMIT)
    elapsed = time.monotonic() - started
    settled = ledger.finish(receiver, database)
    hits = receiver.snapshot()
    statuses = Counter((h.behaviour, "hung" if h.hung else h.status) for h in hits)
    print(f"settled in {elapsed:.1f}s; receiver answers: {dict(statuses)}")

    assert worker.alive(), f"worker exited ({worker.returncode}):\n{worker.tail()}"
    # The chaos really happened (else this test proves nothing).
    assert statuses[("flaky", 500)] >= 15, f"too few 500s to call it chaos: {dict(statuses)}"
    assert statuses[("hang", "hung")] == PER_ENDPOINT["hang"], dict(statuses)
    assert statuses[("limited1", 429)] == PER_ENDPOINT["limited1"], dict(statuses)
    assert statuses[("limited3", 429)] == PER_ENDPOINT["limited3"], dict(statuses)

    Ledger.assert_promise(settled, expect_failed=0)
    wait_until(lambda: database.status_counts() == {"succeeded": len(calls)}, 10,
               "every outcome recorded as succeeded")
    assert elapsed <= SETTLE_LIMIT

    most = max(r.attempts for r in database.rows())
    assert most <= len(SCHEDULE) + 1, f"a delivery took {most} attempts"

    # Retry-After: the attempt after a 429 comes no sooner than the receiver asked.
    early = []
    for webhook_id, seen in receiver.by_webhook_id().items():
        seen = sorted(seen, key=lambda h: h.at)
        if seen[0].status == 429 and seen[0].behaviour.startswith("limited"):
            asked = float(seen[0].behaviour[-1])
            assert len(seen) >= 2, f"{webhook_id}: no attempt after its 429"
            gap = seen[1].at - seen[0].at
            if gap < asked - 0.1:
                early.append((webhook_id, asked, round(gap, 2)))
    assert not early, f"retried sooner than Retry-After (id, asked s, gap s): {early[:5]}"

    # A hang is a recorded timeout, not a success and not a lost delivery.
    hang_attempts = database.attempts(["ep-hang"])
    first = [a for a in hang_attempts if a["attempt_number"] == 1]
    assert len(first) == PER_ENDPOINT["hang"]
    assert {a["error_kind"] for a in first} == {"timeout"}, [a["error"] for a in first][:3]
    assert all(a["duration_ms"] <= (REQUEST_TIMEOUT + 1.5) * 1000 for a in first), (
        "an attempt against a hanging receiver outlived the request timeout")
