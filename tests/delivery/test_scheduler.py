"""Scheduler with a fake sender, a fake recorder and a fake clock: bounds, parking, spill,
back-pressure, leases, retry decisions, stop.

The slow-endpoint rule and the leases read the injected clock, which moves only when a test
(or a fake attempt) advances it: no assertion here depends on how fast the machine is,
except those about asyncio's own timing (stop's grace, wait_for_room's timeout), whose
bounds are generous.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from tests.delivery.fakes import FakeRecorder
from worker.core.models import (
    Delivery,
    DeliveryStatus,
    ErrorKind,
    HttpResult,
    OutcomeKind,
)
from worker.delivery.scheduler import Scheduler, SchedulerConfig
from worker.delivery.writer import OutcomeWriter, WriterConfig

pytestmark = pytest.mark.timeout(20)

OK = HttpResult(status_code=200, duration_ms=1.0)
Behaviour = Callable[[Delivery], Awaitable[HttpResult]]


async def instant(delivery: Delivery) -> HttpResult:
    await asyncio.sleep(0)
    return OK


def sleeping(seconds: float, result: HttpResult = OK) -> Behaviour:
    async def behave(delivery: Delivery) -> HttpResult:
        await asyncio.sleep(seconds)
        return result

    return behave


def held_until(gate: asyncio.Event, result: HttpResult = OK) -> Behaviour:
    """An attempt that lasts until the test opens `gate` (bounded, so no test hangs)."""

    async def behave(delivery: Delivery) -> HttpResult:
        await asyncio.wait_for(gate.wait(), 15)
        return result

    return behave


def ticking(clock: Any, seconds: float) -> Behaviour:
    """An attempt taking `seconds` of fake time (and reporting it as its duration)."""

    async def behave(delivery: Delivery) -> HttpResult:
        clock.advance(seconds)
        await asyncio.sleep(0)
        return HttpResult(status_code=200, duration_ms=seconds * 1000)

    return behave


class FakeSender:
    """Records calls and the concurrency it sees; behaviour per delivery id or a default.

    `hooks[n]` is called as the n-th attempt starts (1-based): more work can arrive while an
    endpoint is busy, at a point the test chooses.
    """

    def __init__(self, default: Behaviour = instant) -> None:
        self.default = default
        self.by_id: dict[str, Behaviour] = {}
        self.hooks: dict[int, Callable[[], None]] = {}
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.current = 0
        self.peak = 0

    async def send(self, delivery: Delivery) -> HttpResult:
        self.started.append(delivery.id)
        hook = self.hooks.get(len(self.started))
        if hook is not None:
            hook()
        self.current += 1
        self.peak = max(self.peak, self.current)
        try:
            result = await self.by_id.get(delivery.id, self.default)(delivery)
        except asyncio.CancelledError:
            self.cancelled.append(delivery.id)
            raise
        finally:
            self.current -= 1
        self.finished.append(delivery.id)
        return result


@pytest.fixture
def engine_settings(make_settings):
    def build(**overrides):
        values = {
            "max_in_flight": 5,
            "max_queued": 1000,
            "flush_interval": 0.02,
            "flush_size": 500,
            "retry_schedule": (30.0, 120.0, 600.0),
            "retry_jitter": 0.2,
        }
        values.update(overrides)
        return make_settings(**values)

    return build


async def drain(scheduler: Scheduler, writer: OutcomeWriter, grace: float) -> None:
    """What the old Dispatcher.drain did: stop the attempts, then write what is known."""
    await scheduler.stop(grace)
    await writer.close()


@pytest.fixture
async def start_scheduler(fake_clock):
    """Build and start a scheduler and its writer, on the fake clock unless told otherwise;
    any still running are stopped and closed at teardown."""
    started: list[tuple[Scheduler, OutcomeWriter]] = []

    def start(settings, sender, recorder, **kwargs) -> tuple[Scheduler, OutcomeWriter]:
        kwargs.setdefault("rand", lambda: 0.5)
        kwargs.setdefault("clock", fake_clock)
        writer = OutcomeWriter(WriterConfig.from_settings(settings), recorder,
                               clock=kwargs["clock"])
        scheduler = Scheduler(SchedulerConfig.from_settings(settings), sender, writer, **kwargs)
        writer.start()
        scheduler.start()
        started.append((scheduler, writer))
        return scheduler, writer

    yield start
    for scheduler, writer in started:
        await asyncio.wait_for(drain(scheduler, writer, grace=0), 5)


# -- the in-flight bound -----------------------------------------------------------------------


async def test_in_flight_bound_is_respected_and_reached(
    engine_settings, start_scheduler, make_delivery, until
):
    sender = FakeSender(sleeping(0.05))
    recorder = FakeRecorder()
    scheduler, _ = start_scheduler(engine_settings(max_in_flight=5), sender, recorder)
    observed: list[int] = []

    async def sample() -> None:
        while True:
            observed.append(scheduler.in_flight)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    deliveries = [make_delivery() for _ in range(50)]
    scheduler.submit(deliveries)
    try:
        await until(lambda: len(recorder.records) == 50, 10)
    finally:
        sampler.cancel()

    assert sender.peak == 5
    assert max(observed) <= 5
    assert 5 in observed
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert scheduler.in_flight == 0
    assert scheduler.stats["attempted"] == 50


async def test_slow_delivery_does_not_hold_back_the_others(
    engine_settings, start_scheduler, make_delivery, until
):
    sender = FakeSender(sleeping(0.001))
    recorder = FakeRecorder()
    scheduler, _ = start_scheduler(engine_settings(max_in_flight=10), sender, recorder)
    slow = make_delivery()
    gate = asyncio.Event()
    sender.by_id[slow.id] = held_until(gate)  # lasts until the others are all done
    fast = [make_delivery() for _ in range(100)]

    scheduler.submit([slow, *fast])
    await until(lambda: {d.id for d in fast} <= set(recorder.ids()), 10)

    assert slow.id in sender.started
    assert slow.id not in sender.finished
    assert slow.id not in recorder.ids()
    gate.set()
    await until(lambda: slow.id in recorder.ids(), 5)
    assert len(recorder.records) == 101


async def test_a_stuck_endpoint_spills_to_the_database_and_others_flow(
    engine_settings, start_scheduler, make_delivery, until, fake_clock
):
    sender = FakeSender(sleeping(0.001))
    recorder = FakeRecorder()
    settings = engine_settings(max_in_flight=10, per_endpoint_limit=2, park_limit=3,
                               max_queued=30, slow_endpoint_seconds=0.2, spill_delay=7.0)
    scheduler, writer = start_scheduler(settings, sender, recorder)
    stuck = [make_delivery(endpoint_id="ep-stuck") for _ in range(40)]
    gate = asyncio.Event()
    for d in stuck:
        sender.by_id[d.id] = held_until(gate)
    others = [make_delivery(endpoint_id=f"ep-fine-{n % 50}") for n in range(100)]

    scheduler.submit(stuck[:5])  # 2 in flight, 3 parked: not slow yet
    await until(lambda: scheduler.in_flight == 2 and scheduler.waiting == 3, 2)
    fake_clock.advance(0.25)  # no progress for longer than slow_endpoint_seconds
    scheduler.submit(stuck[5:])
    await until(lambda: len(recorder.released) == 35, 5)
    assert scheduler.waiting == 3 and scheduler.in_flight == 2
    assert writer.stats["spilled"] == 35
    assert set(recorder.released) == {d.id for d in stuck[5:]}
    # Given back due again after spill_delay, on the writer's clock.
    assert set(recorder.released_due) == {fake_clock.now() + timedelta(seconds=7.0)}
    # The backlog bound still has room: intake is not held up by the stuck endpoint.
    assert await scheduler.wait_for_room(20, timeout=0.1)
    scheduler.submit(others)
    await until(lambda: {d.id for d in others} <= set(recorder.ids()), 10)
    assert writer.stats["spilled"] == 35  # the healthy endpoints spilled nothing
    gate.set()


async def test_an_endpoint_turning_slow_gives_back_its_excess_when_intake_waits(
    engine_settings, start_scheduler, make_delivery, until, fake_clock
):
    gate = asyncio.Event()
    sender = FakeSender(held_until(gate))
    recorder = FakeRecorder()
    settings = engine_settings(max_in_flight=10, per_endpoint_limit=2, park_limit=3,
                               max_queued=30, slow_endpoint_seconds=0.2)
    scheduler, writer = start_scheduler(settings, sender, recorder)
    scheduler.submit([make_delivery(endpoint_id="ep-stuck") for _ in range(30)])
    await until(lambda: scheduler.waiting == 28, 2)  # all parked while it looked healthy
    assert not await scheduler.wait_for_room(10, timeout=0.05)  # still looks healthy
    fake_clock.advance(0.15)
    assert not await scheduler.wait_for_room(10, timeout=0.05)  # idle, but not for long enough
    assert scheduler.waiting == 28 and recorder.released == []
    fake_clock.advance(0.1)  # 0.25 s without progress: slow now
    assert await scheduler.wait_for_room(10, timeout=2)  # the excess went back
    assert scheduler.waiting == 3
    await until(lambda: len(recorder.released) == 25, 2)
    assert writer.stats["spilled"] == 25
    gate.set()


async def test_a_busy_healthy_endpoint_is_never_spilled(
    engine_settings, start_scheduler, make_delivery, until, fake_clock
):
    """Each attempt takes 0.01 s of fake time, two at a time; deliveries keep arriving while
    the endpoint works, 1 s of fake time in all, five times slow_endpoint_seconds."""
    sender = FakeSender(ticking(fake_clock, 0.01))
    recorder = FakeRecorder()
    settings = engine_settings(max_in_flight=10, per_endpoint_limit=2, park_limit=3,
                               max_queued=500, slow_endpoint_seconds=0.2)
    scheduler, writer = start_scheduler(settings, sender, recorder)
    busy = [make_delivery(endpoint_id="ep-busy") for _ in range(100)]
    submitted: list[Delivery] = []

    def submit(chunk: list[Delivery]) -> None:
        submitted.extend(chunk)
        scheduler.submit(chunk)

    for n, start in enumerate(range(20, 100, 10), start=1):  # 10 more as attempt 10n starts
        sender.hooks[10 * n] = lambda chunk=busy[start:start + 10]: submit(chunk)
    began = fake_clock.monotonic()

    submit(busy[:20])
    await until(lambda: len(recorder.records) + len(recorder.released) == len(submitted), 10)

    assert recorder.released == [] and writer.stats["spilled"] == 0
    assert len(recorder.records) == 100
    assert fake_clock.monotonic() - began > 4 * 0.2


async def test_an_endpoint_working_one_at_a_time_is_not_taken_for_slow(
    engine_settings, start_scheduler, make_delivery, until, fake_clock
):
    """Progress counts every completion, also the ones that leave the endpoint idle for a
    moment before its next parked delivery starts.

    Each attempt takes 0.05 s of fake time, one at a time; ten more deliveries arrive as the
    13th starts (0.65 s after the first, over twice slow_endpoint_seconds).
    """
    sender = FakeSender(ticking(fake_clock, 0.05))
    recorder = FakeRecorder()
    settings = engine_settings(max_in_flight=10, per_endpoint_limit=1, park_limit=2,
                               max_queued=500, slow_endpoint_seconds=0.3)
    scheduler, writer = start_scheduler(settings, sender, recorder)
    later = [make_delivery(endpoint_id="ep-serial") for _ in range(10)]
    sender.hooks[13] = lambda: scheduler.submit(later)
    began = fake_clock.monotonic()

    scheduler.submit([make_delivery(endpoint_id="ep-serial") for _ in range(20)])
    await until(lambda: len(recorder.records) + len(recorder.released) == 30, 10)

    assert recorder.released == [] and writer.stats["spilled"] == 0
    assert len(recorder.records) == 30
    assert sender.peak == 1
    assert fake_clock.monotonic() - began > 4 * 0.3


# -- leases ------------------------------------------------------------------------------------


async def test_expired_lease_is_not_sent(engine_settings, start_scheduler, make_delivery, until,
                                         fake_clock):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    scheduler, _ = start_scheduler(engine_settings(), sender, recorder)
    expired = make_delivery(lease_until=fake_clock.time() - 1)
    leased = make_delivery(lease_until=fake_clock.time() + 60)
    unleased = make_delivery()

    scheduler.submit([expired, leased, unleased])
    await until(lambda: len(recorder.records) == 2 and scheduler.stats["lease_lost"] == 1, 5)
    await asyncio.sleep(0.05)

    assert expired.id not in sender.started
    assert sorted(sender.started) == sorted([leased.id, unleased.id])
    assert expired.id not in recorder.ids()
    assert scheduler.stats["lease_lost"] == 1
    assert scheduler.stats["attempted"] == 2


async def test_lease_expiring_while_queued_is_not_sent(
    engine_settings, start_scheduler, make_delivery, until, fake_clock
):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    scheduler, _ = start_scheduler(engine_settings(max_in_flight=1), sender, recorder)
    blocker = make_delivery()
    sender.by_id[blocker.id] = ticking(fake_clock, 0.4)  # takes 0.4 s of the lease's clock
    short = make_delivery(lease_until=fake_clock.time() + 0.1)  # valid when queued

    scheduler.submit([blocker, short])
    await until(lambda: scheduler.stats["lease_lost"] == 1, 5)
    await until(lambda: blocker.id in recorder.ids(), 5)

    assert short.id not in sender.started
    assert recorder.ids() == [blocker.id]


# -- stop (drain) ------------------------------------------------------------------------------


async def test_drain_waits_for_running_attempts_and_writes_them(
    engine_settings, start_scheduler, make_delivery, until
):
    sender = FakeSender(sleeping(0.3))
    recorder = FakeRecorder()
    scheduler, writer = start_scheduler(engine_settings(flush_interval=5.0), sender, recorder)
    deliveries = [make_delivery() for _ in range(3)]
    scheduler.submit(deliveries)
    await until(lambda: scheduler.in_flight == 3, 2)

    started = time.monotonic()
    await asyncio.wait_for(drain(scheduler, writer, grace=10.0), 15)
    took = time.monotonic() - started

    assert took < 5.0  # waited for the attempts, not for the whole grace
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert sender.cancelled == []
    assert scheduler.in_flight == 0


async def test_drain_gives_up_after_grace(engine_settings, start_scheduler, make_delivery, until):
    sender = FakeSender(sleeping(0.05))
    recorder = FakeRecorder()
    scheduler, writer = start_scheduler(engine_settings(flush_interval=5.0), sender, recorder)
    stuck = make_delivery()
    sender.by_id[stuck.id] = sleeping(30)
    quick = make_delivery()
    scheduler.submit([stuck, quick])
    await until(lambda: scheduler.in_flight == 2, 2)

    started = time.monotonic()
    await asyncio.wait_for(drain(scheduler, writer, grace=0.4), 10)
    took = time.monotonic() - started
    await asyncio.sleep(0.05)

    assert 0.3 <= took < 4.0
    assert recorder.ids() == [quick.id]  # the finished one is written, the stuck one is not
    assert stuck.id in sender.cancelled


async def test_drain_stops_taking_work(engine_settings, start_scheduler, make_delivery, until):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    scheduler, writer = start_scheduler(engine_settings(max_in_flight=1), sender, recorder)
    blocker = make_delivery()
    sender.by_id[blocker.id] = sleeping(0.2)
    queued = [make_delivery() for _ in range(5)]
    scheduler.submit([blocker, *queued])
    await until(lambda: scheduler.in_flight == 1, 2)

    await asyncio.wait_for(drain(scheduler, writer, grace=10.0), 15)
    scheduler.submit([make_delivery()])
    await asyncio.sleep(0.1)

    assert sender.started == [blocker.id]  # queued ones are left to their leases
    assert recorder.ids() == [blocker.id]


# -- intake side: queue bound ------------------------------------------------------------------


async def test_wait_for_room_blocks_over_max_queued_and_times_out(
    engine_settings, start_scheduler, make_delivery, until
):
    release = asyncio.Event()
    sender = FakeSender(held_until(release))
    recorder = FakeRecorder()
    scheduler, _ = start_scheduler(
        engine_settings(max_in_flight=1, max_queued=5), sender, recorder
    )
    assert scheduler.room == 5
    assert await asyncio.wait_for(scheduler.wait_for_room(100, timeout=0.1), 2)  # empty queue

    scheduler.submit([make_delivery() for _ in range(7)])
    await until(lambda: scheduler.in_flight == 1, 2)
    assert scheduler.waiting == 6
    assert scheduler.room == 0

    started = time.monotonic()
    assert await asyncio.wait_for(scheduler.wait_for_room(1, timeout=0.2), 5) is False
    assert 0.15 <= time.monotonic() - started < 3.0

    waiter = asyncio.create_task(scheduler.wait_for_room(1, timeout=10.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    release.set()  # the queue drains
    assert await asyncio.wait_for(waiter, 5) is True
    await until(lambda: len(recorder.records) == 7, 5)
    assert scheduler.room == 5


async def test_wait_for_room_returns_at_once_when_it_fits(
    engine_settings, start_scheduler, make_delivery, until
):
    release = asyncio.Event()
    scheduler, _ = start_scheduler(
        engine_settings(max_in_flight=1, max_queued=10), FakeSender(held_until(release)),
        FakeRecorder(),
    )
    scheduler.submit([make_delivery() for _ in range(4)])
    await until(lambda: scheduler.in_flight == 1, 2)

    started = time.monotonic()
    assert await asyncio.wait_for(scheduler.wait_for_room(7, timeout=5.0), 6) is True
    assert time.monotonic() - started < 1.0  # far below the timeout: it did not wait
    assert scheduler.room == 7
    release.set()


# -- retry decisions in the records ------------------------------------------------------------


async def record_for(start_scheduler, settings, delivery, result, until, rand=0.5):
    recorder = FakeRecorder()

    async def behave(d: Delivery) -> HttpResult:
        return result

    scheduler, _ = start_scheduler(settings, FakeSender(behave), recorder, rand=lambda: rand)
    scheduler.submit([delivery])
    await until(lambda: len(recorder.records) == 1, 5)
    return recorder.records[0]


async def test_server_error_schedules_a_retry(engine_settings, start_scheduler, make_delivery,
                                              until, fake_clock):
    delivery = make_delivery()
    record = await record_for(start_scheduler, engine_settings(), delivery,
                              HttpResult(status_code=500, response_excerpt="boom"), until)

    assert record.delivery is delivery
    assert record.attempt_number == 1
    assert record.attempted_at == fake_clock.now()  # the scheduler's clock
    assert record.next_status is DeliveryStatus.PENDING
    assert record.outcome.kind is OutcomeKind.RETRY
    assert record.outcome.error_kind is ErrorKind.HTTP_STATUS
    assert record.next_attempt_at == record.attempted_at + timedelta(seconds=30)
    assert record.result.status_code == 500


async def test_jitter_comes_from_rand(engine_settings, start_scheduler, make_delivery, until):
    record = await record_for(start_scheduler, engine_settings(retry_jitter=0.2),
                              make_delivery(attempts=1), HttpResult(status_code=502), until,
                              rand=0.0)
    assert record.attempt_number == 2
    assert record.next_attempt_at == record.attempted_at + timedelta(seconds=120 * 0.8)


async def test_retry_after_lengthens_the_delay(engine_settings, start_scheduler, make_delivery,
                                               until):
    record = await record_for(start_scheduler, engine_settings(), make_delivery(),
                              HttpResult(status_code=503, retry_after="600"), until)
    assert record.next_status is DeliveryStatus.PENDING
    assert record.next_attempt_at == record.attempted_at + timedelta(seconds=600)


async def test_success_is_succeeded(engine_settings, start_scheduler, make_delivery, until):
    record = await record_for(start_scheduler, engine_settings(), make_delivery(attempts=2),
                              HttpResult(status_code=204), until)
    assert record.next_status is DeliveryStatus.SUCCEEDED
    assert record.outcome.kind is OutcomeKind.SUCCESS
    assert record.next_attempt_at is None
    assert record.attempt_number == 3


async def test_last_attempt_failing_is_failed(engine_settings, start_scheduler, make_delivery,
                                              until):
    record = await record_for(start_scheduler, engine_settings(), make_delivery(attempts=3),
                              HttpResult(status_code=500), until)
    assert record.attempt_number == 4
    assert record.next_status is DeliveryStatus.FAILED
    assert record.outcome.kind is OutcomeKind.FAILED
    assert record.next_attempt_at is None


@pytest.mark.parametrize("result, status, kind", [
    (HttpResult(error_kind=ErrorKind.CONNECT, error="refused"), DeliveryStatus.PENDING,
     OutcomeKind.RETRY),
    (HttpResult(error_kind=ErrorKind.TIMEOUT, error="timed out"), DeliveryStatus.PENDING,
     OutcomeKind.RETRY),
    (HttpResult(status_code=302), DeliveryStatus.PENDING, OutcomeKind.RETRY),
    (HttpResult(status_code=410), DeliveryStatus.FAILED, OutcomeKind.DISABLE),
    (HttpResult(error_kind=ErrorKind.BLOCKED, error="blocked"), DeliveryStatus.FAILED,
     OutcomeKind.BLOCKED),
    (HttpResult(error_kind=ErrorKind.INVALID_URL, error="bad"), DeliveryStatus.FAILED,
     OutcomeKind.FAILED),
], ids=["connect", "timeout", "redirect", "gone", "blocked", "invalid-url"])
async def test_error_outcomes_land_in_the_records(
    engine_settings, start_scheduler, make_delivery, until, result, status, kind
):
    record = await record_for(start_scheduler, engine_settings(), make_delivery(), result, until)
    assert record.next_status is status
    assert record.outcome.kind is kind
    assert (record.next_attempt_at is not None) == (status is DeliveryStatus.PENDING)


# -- robustness --------------------------------------------------------------------------------


async def test_a_crashing_send_frees_its_slot(engine_settings, start_scheduler, make_delivery,
                                              until):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    scheduler, _ = start_scheduler(engine_settings(max_in_flight=1), sender, recorder)
    bad = make_delivery()

    async def crash(delivery: Delivery) -> HttpResult:
        raise RuntimeError("bug in sender")

    sender.by_id[bad.id] = crash
    good = [make_delivery() for _ in range(3)]
    scheduler.submit([bad, *good])

    await until(lambda: len(recorder.records) == 3, 5)
    assert sorted(recorder.ids()) == sorted(d.id for d in good)
    assert scheduler.in_flight == 0
