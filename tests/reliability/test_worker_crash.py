"""Worker processes die hard (SIGKILL): every event is still delivered.

The solo-pool test runs on DEFAULT visibility timeout and rescue settings: what a
production worker killed by the OOM killer leaves behind must come back within minutes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import psutil
import pytest

from tests.reliability.conftest import StartWorker
from tests.reliability.harness import (
    FAST,
    Database,
    Producer,
    RedisServer,
    WorkerProcess,
    run_sql,
    wait_until,
)
from tests.reliability.ledger import Ledger
from tests.reliability.messages import event_ns
from tests.reliability.servers import LoopThread, Receiver

RESCUE_LIMIT = 180.0  # seconds from the new worker running to every event delivered

pytestmark = pytest.mark.timeout(RESCUE_LIMIT + 60)  # each test narrows its own below


class TableLock:
    """Holds `LOCK TABLE deliveries IN EXCLUSIVE MODE` (reads pass, writes wait) from a
    connection of its own, so a worker receives messages it cannot commit yet."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = LoopThread("rel-table-lock")
        self.conn: Any = None
        self.tx: Any = None

    def acquire(self) -> None:
        async def go() -> None:
            self.conn = await asyncpg.connect(self.url, timeout=10)
            self.tx = self.conn.transaction()
            await self.tx.start()
            await self.conn.execute("LOCK TABLE deliveries IN EXCLUSIVE MODE")

        self.loop.call(go())

    def release(self) -> None:
        async def go() -> None:
            if self.conn is not None:
                await self.tx.rollback()
                await self.conn.close()
                self.conn = None

        try:
            self.loop.call(go())
        finally:
            self.loop.close()


def test_sigkill_solo_worker_with_committed_and_uncommitted_events_in_flight(
    start_worker: StartWorker, producer: Producer, receiver: Receiver, database: Database,
    redis_server: RedisServer, endpoints: Callable[[dict[str, str]], None],
    make_ledger: Callable[[str, str], Ledger],
) -> None:
    ledger = make_ledger(
        "sigkill-solo-worker",
        "SIGKILL of a solo worker holding committed deliveries in flight and prefetched "
        "uncommitted messages; a new worker on default visibility timeout and rescue settings")
    receiver.slow_seconds = 3.0
    endpoints({"ep-kill": "slow"})
    worker = start_worker()  # defaults: the rescue path under test is the production one

    producer.send("single", [ledger.single("ep-kill") for _ in range(100)])
    wait_until(lambda: len(receiver.snapshot()) >= 10, 30, "deliveries in flight")
    lock = TableLock(database.plain_url)
    try:
        lock.acquire()
        producer.send("single", [ledger.single("ep-kill") for _ in range(300)])
        wait_until(lambda: len(event_ns(redis_server.unacked_items())) >= 50, 30,
                   "the worker to hold uncommitted messages")
        worker.kill()
    finally:
        lock.release()

    rows = database.rows()
    committed = {e["n"] for r in rows if (e := r.event())}
    in_flight_committed = {e["n"] for r in rows if r.status == "pending" and (e := r.event())}
    held_uncommitted = event_ns(redis_server.unacked_items()) - committed
    print(f"at the kill: {len(rows)} committed ({len(in_flight_committed)} pending), "
          f"{len(held_uncommitted)} uncommitted held in kombu's unacked hash, "
          f"{len(event_ns(redis_server.queue_items()))} still queued")
    assert in_flight_committed and held_uncommitted, "scenario precondition not met"

    start_worker()
    started = time.monotonic()
    ledger.wait_settled(receiver, database, RESCUE_LIMIT)
    ledger.recovery_seconds = time.monotonic() - started
    settled = ledger.finish(receiver, database)
    delivered = receiver.delivered_ns()
    late_uncommitted = held_uncommitted - delivered
    late_committed = in_flight_committed - delivered
    assert not late_uncommitted, (
        f"{len(late_uncommitted)} of the {len(held_uncommitted)} uncommitted messages the "
        f"killed worker held were not delivered within {RESCUE_LIMIT:.0f}s of a new worker "
        f"running (kombu's unacked hash still holds {len(redis_server.unacked_items())} "
        "messages: they wait for the visibility timeout)")
    assert not late_committed, (
        f"{len(late_committed)} committed deliveries the killed worker had in flight were not "
        f"resumed within {RESCUE_LIMIT:.0f}s")
    Ledger.assert_promise(settled, context=f"broker holds {redis_server.event_messages_held()}; ")
    assert ledger.recovery_seconds <= RESCUE_LIMIT


@pytest.mark.timeout(150)
def test_sigkill_one_prefork_child_mid_flow(
    start_worker: StartWorker, producer: Producer, receiver: Receiver, database: Database,
    redis_server: RedisServer,
    endpoints: Callable[[dict[str, str]], None], make_ledger: Callable[[str, str], Ledger],
) -> None:
    ledger = make_ledger("sigkill-prefork-child",
                         "SIGKILL of the prefork child (concurrency 2) caught committing a "
                         "gathered batch, while 600 single events arrive at 100/s")
    receiver.slow_seconds = 0.3
    endpoints({"ep-child": "slow"})
    worker = start_worker(pool="prefork", concurrency=2, **FAST)
    producer.submit("single", [ledger.single("ep-child") for _ in range(600)], rate=100)
    wait_until(lambda: len(receiver.delivered_ns()) >= 100, 30, "the flow to start")

    # Hold writes for a moment so a child is caught with a gathered batch it has not
    # committed yet (its INSERT waits on the lock), then kill exactly that child.
    lock = TableLock(database.plain_url)
    try:
        lock.acquire()
        try:
            victim = wait_until(lambda: _child_waiting_to_insert(worker, database), 5,
                                "a pool child blocked committing a batch")
        except AssertionError:  # commits happen elsewhere: kill a child busy with the DB
            victim = wait_until(lambda: _child_with_database(worker, database), 10,
                                "a pool child with database connections")
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        lock.release()
    killed = time.monotonic()
    producer.result(30)
    ledger.wait_settled(receiver, database, 30)
    ledger.recovery_seconds = time.monotonic() - killed
    settled = ledger.finish(receiver, database)
    assert worker.alive(), f"the worker exited ({worker.returncode}) after losing one child"
    assert victim.pid not in _living(worker.children())
    Ledger.assert_promise(settled, context=f"broker holds {redis_server.event_messages_held()}; ")


def _child_waiting_to_insert(worker: WorkerProcess, database: Database) -> Any:
    """The pool child whose database connection is waiting on a lock in an INSERT."""
    ports = {r["client_port"] for r in run_sql(database.plain_url, lambda conn: conn.fetch(
        "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query ILIKE 'INSERT%'"))}
    for child in worker.children():
        try:
            if any(c.laddr and c.laddr.port in ports for c in child.net_connections("tcp")):
                return child
        except Exception:
            continue
    return None


def _child_with_database(worker: WorkerProcess, database: Database) -> Any:
    for child in worker.children():
        try:
            conns = child.net_connections("tcp")
        except Exception:
            continue
        if any(c.raddr and c.raddr.port == database.server.port for c in conns):
            return child
    return None


def _living(processes: list[psutil.Process]) -> set[int]:
    """Pids of the processes still running: a zombie the pool has not reaped yet is dead."""
    living = set()
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                living.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return living
