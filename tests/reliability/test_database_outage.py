"""PostgreSQL goes down for 30 s while events keep arriving: nothing is delivered without a
commit, everything is delivered exactly once after, and the worker waits quietly."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.reliability.conftest import StartWorker
from tests.reliability.harness import Database, PgServer, Producer, wait_until
from tests.reliability.ledger import Ledger
from tests.reliability.servers import Receiver

pytestmark = pytest.mark.timeout(240)

OUTAGE = 30.0
# Events arrive one a second through the outage, so a worker that keeps a backoff per
# gathered group (or none) says so once per group per retry. A worker that knows the
# database is down backs off once, doubling from the 5 s requeue delay (5, 10, 20 s: a
# handful of lines), and the retry sweep may say once per 5 s interval that it failed.
MAX_WARNINGS = 15
MAX_CPU_SHARE = 0.25  # of one core, whole worker process tree, during the outage
RECOVERY_LIMIT = 90.0  # the backoff cap (60 s) plus a gather and a delivery


def test_postgres_down_30s_every_event_delivered_once_after_with_bounded_noise(
    start_worker: StartWorker, producer: Producer, receiver: Receiver, database: Database,
    pg_server: PgServer, endpoints: Callable[[dict[str, str]], None],
    make_ledger: Callable[[str, str], Ledger],
) -> None:
    ledger = make_ledger(
        "postgres-outage",
        f"PostgreSQL stopped {OUTAGE:.0f}s (pg_ctl stop -m fast); a batch of 10 and one "
        "single event a second arrive during the outage")
    endpoints({"ep-pg": "ok"})
    # Default requeue delay (5 s) and sweep interval (5 s): their backoff is under test.
    worker = start_worker(WEBHOOKS_RETRY_SCHEDULE="1,1,2", WEBHOOKS_RETRY_JITTER="0",
                          WEBHOOKS_LEASE_SECONDS="6", WEBHOOKS_REQUEST_TIMEOUT="3")
    producer.send("single", [ledger.single("ep-pg") for _ in range(10)])
    wait_until(lambda: database.status_counts() == {"succeeded": 10}, 30,
               "10 events delivered and recorded before the outage")

    pg_server.stop()
    down_at = time.time()
    cpu_before = worker.cpu_seconds()
    producer.send("batch", [[{"webhook_id": "ep-pg", "event_data": ledger.event_data("ep-pg")}
                             for _ in range(10)]])
    producer.submit("single", [ledger.single("ep-pg") for _ in range(int(OUTAGE) - 2)],
                    rate=1.0)
    producer.result(OUTAGE + 10)
    time.sleep(max(0.0, down_at + OUTAGE - time.time()))
    cpu_share = (worker.cpu_seconds() - cpu_before) / (time.time() - down_at)
    delivered_during = len(receiver.delivered_ns()) - 10
    alive_during = worker.alive()
    up_at = time.time()
    pg_server.start()
    back = time.monotonic()

    ledger.wait_settled(receiver, database, RECOVERY_LIMIT)
    ledger.recovery_seconds = time.monotonic() - back
    settled = ledger.finish(receiver, database)
    noisy = worker.lines_at_level(("WARNING", "ERROR", "CRITICAL"), down_at, up_at)
    kinds = Counter(line.split("]: ", 1)[-1][:60] for line in noisy)
    print(f"outage: {len(noisy)} WARNING+ records in {up_at - down_at:.0f}s, worker CPU "
          f"{cpu_share:.0%} of a core; recovery {ledger.recovery_seconds:.1f}s; "
          f"most common: {kinds.most_common(5)}")

    assert alive_during and worker.alive(), (
        f"worker exited ({worker.returncode}) during the database outage:\n{worker.tail()}")
    assert delivered_during == 0, (
        f"{delivered_during} events were delivered while nothing could be committed")
    Ledger.assert_promise(settled, duplicates_allowed=False)
    assert ledger.recovery_seconds <= RECOVERY_LIMIT
    assert len(noisy) <= MAX_WARNINGS, (
        f"{len(noisy)} WARNING+ log records during a {OUTAGE:.0f}s database outage (limit "
        f"{MAX_WARNINGS}): the worker is not backing off; most common: "
        f"{kinds.most_common(3)}")
    assert cpu_share <= MAX_CPU_SHARE, (
        f"worker used {cpu_share:.0%} of a core while the database was down")
