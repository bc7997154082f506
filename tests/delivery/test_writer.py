"""OutcomeWriter with a fake recorder: batching by size and by interval, a store that is down
for a while, and what close() writes.

Most tests feed the writer attempt records directly; the store-outage test runs a scheduler
in front of it, to show that a failed write never causes a resend. Timing bounds here are
about asyncio's own timers (the flush interval) and are generous.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest

from tests.delivery.fakes import FakeRecorder
from worker.core.models import (
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    HttpResult,
    Outcome,
    OutcomeKind,
)
from worker.delivery.scheduler import Scheduler, SchedulerConfig
from worker.delivery.writer import OutcomeWriter, WriterConfig

pytestmark = pytest.mark.timeout(20)

OK = HttpResult(status_code=200, duration_ms=1.0)


def record_of(delivery: Delivery, at: datetime) -> AttemptRecord:
    """The record of one successful attempt, as the scheduler would hand it over."""
    return AttemptRecord(delivery, OK, Outcome(OutcomeKind.SUCCESS), at,
                         delivery.attempts + 1, DeliveryStatus.SUCCEEDED, None)


class CountingSender:
    """Answers 200 after a short real wait; remembers every send."""

    def __init__(self) -> None:
        self.started: list[str] = []

    async def send(self, delivery: Delivery) -> HttpResult:
        self.started.append(delivery.id)
        await asyncio.sleep(0.002)
        return OK


@pytest.fixture
def writer_settings(make_settings):
    def build(**overrides):
        values = {"max_in_flight": 5, "max_queued": 1000, "flush_interval": 0.02,
                  "flush_size": 500}
        values.update(overrides)
        return make_settings(**values)

    return build


@pytest.fixture
async def start_writer(fake_clock):
    """Build and start writers on the fake clock; any still open are closed at teardown."""
    started: list[OutcomeWriter] = []

    def start(settings, recorder) -> OutcomeWriter:
        writer = OutcomeWriter(WriterConfig.from_settings(settings), recorder, clock=fake_clock)
        writer.start()
        started.append(writer)
        return writer

    yield start
    for writer in started:
        await asyncio.wait_for(writer.close(), 5)


async def test_outcomes_flush_in_batches_when_flush_size_is_reached(
    writer_settings, start_writer, make_delivery, until, fake_clock
):
    recorder = FakeRecorder()
    writer = start_writer(writer_settings(flush_size=10, flush_interval=5.0), recorder)
    deliveries = [make_delivery() for _ in range(25)]

    started = time.monotonic()
    for d in deliveries:
        writer.add(record_of(d, fake_clock.now()))
    await until(lambda: recorder.batches != [], 3.0)

    first_at, first_size = recorder.batches[0]
    assert first_at - started < 3.0  # the size bound, not the 5 s interval, triggered it
    assert first_size == 10
    await asyncio.wait_for(writer.close(), 5)
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert len(recorder.batches) < 25  # batched, not one write per outcome
    assert all(size <= 10 for _, size in recorder.batches)  # bounded transactions


async def test_outcomes_flush_within_flush_interval(
    writer_settings, start_writer, make_delivery, until, fake_clock
):
    recorder = FakeRecorder()
    writer = start_writer(writer_settings(flush_size=1000, flush_interval=0.1), recorder)
    deliveries = [make_delivery() for _ in range(5)]

    started = time.monotonic()
    for d in deliveries:
        writer.add(record_of(d, fake_clock.now()))
    await until(lambda: len(recorder.records) == 5, 3.0)

    assert recorder.batches[-1][0] - started < 0.1 + 1.4  # nowhere near the size bound
    assert len(recorder.batches) == 1  # written together, not one by one
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert writer.stats["recorded"] == 5


async def test_the_end_of_a_fifo_queue_head_is_written_at_once(
    writer_settings, start_writer, make_delivery, until, fake_clock
):
    """Its queue's next delivery waits for this outcome: no gathering for the interval."""
    from dataclasses import replace

    recorder = FakeRecorder()
    writer = start_writer(writer_settings(flush_size=1000, flush_interval=30.0), recorder)
    writer.add(record_of(make_delivery(), fake_clock.now()))  # unordered: waits
    await asyncio.sleep(0.05)
    assert recorder.records == []
    head = replace(make_delivery(), ordering_key="partner-7")
    writer.add(record_of(head, fake_clock.now()))
    await until(lambda: len(recorder.records) == 2, 3.0)  # both, long before 30 s


async def test_store_unavailable_then_back_loses_and_duplicates_nothing(
    writer_settings, start_writer, make_delivery, until, fake_clock
):
    settings = writer_settings(max_in_flight=10, flush_interval=0.01, flush_size=7)
    recorder = FakeRecorder(fail_first=3)
    writer = start_writer(settings, recorder)
    seen: list[str] = []
    writer.on_written(lambda batch: seen.extend(r.delivery.id for r in batch))
    sender = CountingSender()
    scheduler = Scheduler(SchedulerConfig.from_settings(settings), sender, writer,
                          rand=lambda: 0.5, clock=fake_clock)
    scheduler.start()
    first = [make_delivery() for _ in range(15)]
    second = [make_delivery() for _ in range(15)]

    try:
        scheduler.submit(first)
        await until(lambda: recorder.calls >= 1, 5)
        scheduler.submit(second)  # more outcomes arrive while the store is down
        await until(lambda: len(recorder.records) >= 30, 10)
        await asyncio.sleep(0.1)
    finally:
        await asyncio.wait_for(scheduler.stop(0), 5)

    ids = recorder.ids()
    assert len(ids) == len(set(ids)) == 30  # none lost, none written twice
    assert set(ids) == {d.id for d in first + second}
    assert sorted(seen) == sorted(ids)
    assert writer.stats["write_failures"] == 3
    assert writer.stats["recorded"] == 30
    assert len(sender.started) == 30  # a write failure never causes a resend


async def test_close_writes_outcomes_not_yet_flushed(
    writer_settings, start_writer, make_delivery, fake_clock
):
    recorder = FakeRecorder()
    writer = start_writer(writer_settings(flush_size=1000, flush_interval=5.0), recorder)
    deliveries = [make_delivery() for _ in range(3)]
    for d in deliveries:
        writer.add(record_of(d, fake_clock.now()))
    await asyncio.sleep(0.05)
    assert recorder.records == []
    assert writer.unwritten == 3

    await asyncio.wait_for(writer.close(), 5)

    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert writer.unwritten == 0


async def test_outcomes_written_at_close_are_counted_and_reported(
    writer_settings, start_writer, make_delivery, fake_clock
):
    seen: list[str] = []
    recorder = FakeRecorder()
    writer = start_writer(writer_settings(flush_size=1000, flush_interval=5.0), recorder)
    writer.on_written(lambda batch: seen.extend(r.delivery.id for r in batch))
    for _ in range(3):
        writer.add(record_of(make_delivery(), fake_clock.now()))
    await asyncio.sleep(0.05)
    assert recorder.records == []

    await asyncio.wait_for(writer.close(), 5)

    assert len(recorder.records) == 3
    assert writer.stats["recorded"] == 3
    assert sorted(seen) == sorted(recorder.ids())


async def test_close_does_not_lose_a_batch_being_written(
    writer_settings, start_writer, make_delivery, fake_clock
):
    """Outcomes whose write is in progress when close starts must still be written."""
    recorder = FakeRecorder(delay=0.3)  # a slow but healthy database
    writer = start_writer(writer_settings(flush_interval=0.01), recorder)
    deliveries = [make_delivery() for _ in range(3)]
    for d in deliveries:
        writer.add(record_of(d, fake_clock.now()))
    await asyncio.wait_for(recorder.writing.wait(), 5)  # the writer has taken the batch
    assert recorder.records == []

    await asyncio.wait_for(writer.close(), 5)

    # Committed by the time close() returns: nothing is left to finish after it.
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
