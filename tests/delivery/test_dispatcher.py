"""Dispatcher with a fake sender and a fake recorder: bounds, batching, retries, drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import pytest
from worker.delivery.dispatcher import Dispatcher

from worker.core.errors import StoreUnavailable
from worker.core.models import (
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    ErrorKind,
    HttpResult,
    OutcomeKind,
)

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


class FakeSender:
    """Records calls and the concurrency it sees; behaviour per delivery id or a default."""

    def __init__(self, default: Behaviour = instant) -> None:
        self.default = default
        self.by_id: dict[str, Behaviour] = {}
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.current = 0
        self.peak = 0

    async def send(self, delivery: Delivery) -> HttpResult:
        self.started.append(delivery.id)
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


class FakeRecorder:
    """Commits a batch only when record_attempts returns, like a database transaction."""

    def __init__(self, *, fail_first: int = 0, delay: float = 0.0) -> None:
        self.fail_first = fail_first
        self.delay = delay
        self.calls = 0
        self.records: list[AttemptRecord] = []
        self.batches: list[tuple[float, int]] = []  # (monotonic time, size) of each commit
        self.writing = asyncio.Event()
        self.released: list[str] = []

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        self.calls += 1
        batch = list(records)
        if self.calls <= self.fail_first:
            raise StoreUnavailable("database is down")
        self.writing.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        self.records.extend(batch)
        self.batches.append((time.monotonic(), len(batch)))

    def ids(self) -> list[str]:
        return [r.delivery.id for r in self.records]

    async def release(self, ids: Sequence[str], due_at: object) -> None:
        self.released.extend(ids)


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


@pytest.fixture
async def start_dispatcher():
    """Build and start dispatchers; any still running are drained at teardown."""
    started: list[Dispatcher] = []

    def start(settings, sender, recorder, **kwargs) -> Dispatcher:
        kwargs.setdefault("rand", lambda: 0.5)
        dispatcher = Dispatcher(settings, sender, recorder, **kwargs)
        dispatcher.start()
        started.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in started:
        await asyncio.wait_for(dispatcher.drain(grace=0), 5)


# -- the in-flight bound -----------------------------------------------------------------------


async def test_in_flight_bound_is_respected_and_reached(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(sleeping(0.05))
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(engine_settings(max_in_flight=5), sender, recorder)
    observed: list[int] = []

    async def sample() -> None:
        while True:
            observed.append(dispatcher.in_flight)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    deliveries = [make_delivery() for _ in range(50)]
    dispatcher.submit(deliveries)
    try:
        await until(lambda: len(recorder.records) == 50, 5)
    finally:
        sampler.cancel()

    assert sender.peak == 5
    assert max(observed) <= 5
    assert 5 in observed
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert dispatcher.in_flight == 0
    assert dispatcher.stats["attempted"] == 50


async def test_slow_delivery_does_not_hold_back_the_others(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(sleeping(0.001))
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(engine_settings(max_in_flight=10), sender, recorder)
    slow = make_delivery()
    sender.by_id[slow.id] = sleeping(2.0)
    fast = [make_delivery() for _ in range(100)]

    started = time.monotonic()
    dispatcher.submit([slow, *fast])
    await until(lambda: {d.id for d in fast} <= set(recorder.ids()), 1.5)
    fast_done = time.monotonic() - started

    assert fast_done < 1.0
    assert slow.id not in sender.finished
    assert slow.id not in recorder.ids()
    await until(lambda: slow.id in recorder.ids(), 3)
    assert time.monotonic() - started >= 2.0
    assert len(recorder.records) == 101


async def test_a_stuck_endpoint_spills_to_the_database_and_others_flow(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(sleeping(0.001))
    recorder = FakeRecorder()
    settings = engine_settings(max_in_flight=10, per_endpoint_limit=2, park_limit=3,
                               max_queued=30, slow_endpoint_seconds=0.2)
    dispatcher = start_dispatcher(settings, sender, recorder)
    stuck = [make_delivery(endpoint_id="ep-stuck") for _ in range(40)]
    for d in stuck:
        sender.by_id[d.id] = sleeping(10.0)
    others = [make_delivery(endpoint_id=f"ep-fine-{n % 50}") for n in range(100)]

    dispatcher.submit(stuck[:5])  # 2 in flight, 3 parked: not slow yet
    await asyncio.sleep(0.3)  # no progress for longer than slow_endpoint_seconds
    dispatcher.submit(stuck[5:])
    await until(lambda: len(recorder.released) == 35, 2)
    assert dispatcher.queued == 3 and dispatcher.in_flight == 2
    assert dispatcher.stats["spilled"] == 35
    assert set(recorder.released) == {d.id for d in stuck[5:]}
    # The backlog bound still has room: intake is not held up by the stuck endpoint.
    assert await dispatcher.wait_for_room(20, timeout=0.1)
    dispatcher.submit(others)
    await until(lambda: {d.id for d in others} <= set(recorder.ids()), 2)
    assert dispatcher.stats["spilled"] == 35  # the healthy endpoints spilled nothing


async def test_an_endpoint_turning_slow_gives_back_its_excess_when_intake_waits(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(sleeping(10.0))
    recorder = FakeRecorder()
    settings = engine_settings(max_in_flight=10, per_endpoint_limit=2, park_limit=3,
                               max_queued=30, slow_endpoint_seconds=0.2)
    dispatcher = start_dispatcher(settings, sender, recorder)
    dispatcher.submit([make_delivery(endpoint_id="ep-stuck") for _ in range(30)])
    await until(lambda: dispatcher.queued == 28, 1)  # all parked while it looked healthy
    assert not await dispatcher.wait_for_room(10, timeout=0.05)  # still looks healthy
    await asyncio.sleep(0.3)
    assert await dispatcher.wait_for_room(10, timeout=1)  # slow now: the excess went back
    assert dispatcher.queued == 3
    await until(lambda: len(recorder.released) == 25, 1)


async def test_a_busy_healthy_endpoint_is_never_spilled(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(sleeping(0.01))
    recorder = FakeRecorder()
    settings = engine_settings(max_in_flight=10, per_endpoint_limit=2, park_limit=3,
                               max_queued=500, slow_endpoint_seconds=0.2)
    dispatcher = start_dispatcher(settings, sender, recorder)
    busy = [make_delivery(endpoint_id="ep-busy") for _ in range(100)]
    dispatcher.submit(busy)
    await until(lambda: len(recorder.records) == 100, 5)
    assert recorder.released == [] and dispatcher.stats["spilled"] == 0


# -- writing outcomes --------------------------------------------------------------------------


async def test_outcomes_flush_in_batches_when_flush_size_is_reached(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(
        engine_settings(max_in_flight=50, flush_size=10, flush_interval=5.0), sender, recorder
    )
    deliveries = [make_delivery() for _ in range(25)]

    started = time.monotonic()
    dispatcher.submit(deliveries)
    await until(lambda: recorder.batches != [], 1.0)

    first_at, first_size = recorder.batches[0]
    assert first_at - started < 1.0  # the size bound, not the 5 s interval, triggered it
    assert first_size >= 10
    await asyncio.wait_for(dispatcher.drain(grace=1.0), 5)
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert len(recorder.batches) < 25  # batched, not one write per outcome


async def test_outcomes_flush_within_flush_interval(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(
        engine_settings(flush_size=1000, flush_interval=0.1), sender, recorder
    )
    deliveries = [make_delivery() for _ in range(5)]

    started = time.monotonic()
    dispatcher.submit(deliveries)
    await until(lambda: len(recorder.records) == 5, 1.0)

    assert recorder.batches[-1][0] - started < 0.1 + 0.3
    assert len(recorder.batches) <= 2
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert dispatcher.stats["recorded"] == 5


async def test_store_unavailable_then_back_loses_and_duplicates_nothing(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(sleeping(0.002))
    recorder = FakeRecorder(fail_first=3)
    seen: list[str] = []
    dispatcher = start_dispatcher(
        engine_settings(max_in_flight=10, flush_interval=0.01, flush_size=7),
        sender, recorder, on_record=lambda r: seen.append(r.delivery.id),
    )
    first = [make_delivery() for _ in range(15)]
    second = [make_delivery() for _ in range(15)]

    dispatcher.submit(first)
    await until(lambda: recorder.calls >= 1, 2)
    dispatcher.submit(second)  # more outcomes arrive while the store is down
    await until(lambda: len(recorder.records) >= 30, 5)
    await asyncio.sleep(0.1)

    ids = recorder.ids()
    assert len(ids) == len(set(ids)) == 30  # none lost, none written twice
    assert set(ids) == {d.id for d in first + second}
    assert sorted(seen) == sorted(ids)
    assert dispatcher.stats["write_failures"] == 3
    assert dispatcher.stats["recorded"] == 30
    assert len(sender.started) == 30  # a write failure never causes a resend


# -- leases ------------------------------------------------------------------------------------


async def test_expired_lease_is_not_sent(engine_settings, start_dispatcher, make_delivery, until):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(engine_settings(), sender, recorder)
    expired = make_delivery(lease_until=time.time() - 1)
    leased = make_delivery(lease_until=time.time() + 60)
    unleased = make_delivery()

    dispatcher.submit([expired, leased, unleased])
    await until(lambda: len(recorder.records) == 2 and dispatcher.stats["lease_lost"] == 1, 2)
    await asyncio.sleep(0.05)

    assert expired.id not in sender.started
    assert sorted(sender.started) == sorted([leased.id, unleased.id])
    assert expired.id not in recorder.ids()
    assert dispatcher.stats["lease_lost"] == 1
    assert dispatcher.stats["attempted"] == 2


async def test_lease_expiring_while_queued_is_not_sent(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(engine_settings(max_in_flight=1), sender, recorder)
    blocker = make_delivery()
    sender.by_id[blocker.id] = sleeping(0.4)
    short = make_delivery(lease_until=time.time() + 0.1)

    dispatcher.submit([blocker, short])
    await until(lambda: dispatcher.stats["lease_lost"] == 1, 2)
    await until(lambda: blocker.id in recorder.ids(), 2)

    assert short.id not in sender.started
    assert recorder.ids() == [blocker.id]


# -- drain -------------------------------------------------------------------------------------


async def test_drain_waits_for_running_attempts_and_writes_them(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(sleeping(0.3))
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(engine_settings(flush_interval=5.0), sender, recorder)
    deliveries = [make_delivery() for _ in range(3)]
    dispatcher.submit(deliveries)
    await until(lambda: dispatcher.in_flight == 3, 1)

    started = time.monotonic()
    await asyncio.wait_for(dispatcher.drain(grace=3.0), 5)
    took = time.monotonic() - started

    assert took < 1.5  # waited for the attempts, not for the whole grace
    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)
    assert sender.cancelled == []
    assert dispatcher.in_flight == 0


async def test_drain_gives_up_after_grace(engine_settings, start_dispatcher, make_delivery, until):
    sender = FakeSender(sleeping(0.05))
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(engine_settings(flush_interval=5.0), sender, recorder)
    stuck = make_delivery()
    sender.by_id[stuck.id] = sleeping(30)
    quick = make_delivery()
    dispatcher.submit([stuck, quick])
    await until(lambda: dispatcher.in_flight == 2, 1)

    started = time.monotonic()
    await asyncio.wait_for(dispatcher.drain(grace=0.4), 5)
    took = time.monotonic() - started
    await asyncio.sleep(0.05)

    assert 0.3 <= took < 1.5
    assert recorder.ids() == [quick.id]  # the finished one is written, the stuck one is not
    assert stuck.id in sender.cancelled


async def test_drain_stops_taking_work(engine_settings, start_dispatcher, make_delivery, until):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(engine_settings(max_in_flight=1), sender, recorder)
    blocker = make_delivery()
    sender.by_id[blocker.id] = sleeping(0.2)
    queued = [make_delivery() for _ in range(5)]
    dispatcher.submit([blocker, *queued])
    await until(lambda: dispatcher.in_flight == 1, 1)

    await asyncio.wait_for(dispatcher.drain(grace=2.0), 5)
    dispatcher.submit([make_delivery()])
    await asyncio.sleep(0.1)

    assert sender.started == [blocker.id]  # queued ones are left to their leases
    assert recorder.ids() == [blocker.id]


async def test_drain_writes_outcomes_not_yet_flushed(
    engine_settings, start_dispatcher, make_delivery, until
):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(
        engine_settings(flush_size=1000, flush_interval=5.0), sender, recorder
    )
    deliveries = [make_delivery() for _ in range(3)]
    dispatcher.submit(deliveries)
    await until(lambda: dispatcher.stats["attempted"] == 3, 1)
    assert recorder.records == []

    await asyncio.wait_for(dispatcher.drain(grace=1.0), 5)

    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)


async def test_outcomes_written_at_drain_are_counted_and_reported(
    engine_settings, start_dispatcher, make_delivery, until
):
    seen: list[str] = []
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(
        engine_settings(flush_size=1000, flush_interval=5.0), sender, recorder,
        on_record=lambda r: seen.append(r.delivery.id),
    )
    dispatcher.submit([make_delivery() for _ in range(3)])
    await until(lambda: dispatcher.stats["attempted"] == 3, 1)

    await asyncio.wait_for(dispatcher.drain(grace=1.0), 5)

    assert len(recorder.records) == 3
    assert dispatcher.stats["recorded"] == 3
    assert sorted(seen) == sorted(recorder.ids())


async def test_drain_does_not_lose_a_batch_being_written(
    engine_settings, start_dispatcher, make_delivery, until
):
    """Outcomes whose write is in progress when drain starts must still be written."""
    sender = FakeSender(instant)
    recorder = FakeRecorder(delay=0.3)  # a slow but healthy database
    dispatcher = start_dispatcher(engine_settings(flush_interval=0.01), sender, recorder)
    deliveries = [make_delivery() for _ in range(3)]
    dispatcher.submit(deliveries)
    await asyncio.wait_for(recorder.writing.wait(), 2)  # the writer has taken the batch

    await asyncio.wait_for(dispatcher.drain(grace=2.0), 5)
    await asyncio.sleep(0.4)

    assert sorted(recorder.ids()) == sorted(d.id for d in deliveries)


# -- intake side: queue bound ------------------------------------------------------------------


async def test_wait_for_room_blocks_over_max_queued_and_times_out(
    engine_settings, start_dispatcher, make_delivery, until
):
    release = asyncio.Event()

    async def held(delivery: Delivery) -> HttpResult:
        await asyncio.wait_for(release.wait(), 10)
        return OK

    sender = FakeSender(held)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(
        engine_settings(max_in_flight=1, max_queued=5), sender, recorder
    )
    assert dispatcher.free_capacity == 5
    assert await asyncio.wait_for(dispatcher.wait_for_room(100, timeout=0.1), 1)  # empty queue

    dispatcher.submit([make_delivery() for _ in range(7)])
    await until(lambda: dispatcher.in_flight == 1, 1)
    assert dispatcher.queued == 6
    assert dispatcher.free_capacity == 0

    started = time.monotonic()
    assert await asyncio.wait_for(dispatcher.wait_for_room(1, timeout=0.2), 2) is False
    assert 0.15 <= time.monotonic() - started < 1.0

    waiter = asyncio.create_task(dispatcher.wait_for_room(1, timeout=5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    release.set()  # the queue drains
    assert await asyncio.wait_for(waiter, 3) is True
    await until(lambda: len(recorder.records) == 7, 2)
    assert dispatcher.free_capacity == 5


async def test_wait_for_room_returns_at_once_when_it_fits(
    engine_settings, start_dispatcher, make_delivery, until
):
    release = asyncio.Event()

    async def held(delivery: Delivery) -> HttpResult:
        await asyncio.wait_for(release.wait(), 10)
        return OK

    dispatcher = start_dispatcher(
        engine_settings(max_in_flight=1, max_queued=10), FakeSender(held), FakeRecorder()
    )
    dispatcher.submit([make_delivery() for _ in range(4)])
    await until(lambda: dispatcher.in_flight == 1, 1)

    started = time.monotonic()
    assert await asyncio.wait_for(dispatcher.wait_for_room(7, timeout=1.0), 2) is True
    assert time.monotonic() - started < 0.1
    assert dispatcher.free_capacity == 7
    release.set()


# -- retry decisions in the records ------------------------------------------------------------


async def record_for(start_dispatcher, settings, delivery, result, until, rand=0.5):
    recorder = FakeRecorder()

    async def behave(d: Delivery) -> HttpResult:
        return result

    dispatcher = start_dispatcher(settings, FakeSender(behave), recorder, rand=lambda: rand)
    dispatcher.submit([delivery])
    await until(lambda: len(recorder.records) == 1, 2)
    return recorder.records[0]


async def test_server_error_schedules_a_retry(engine_settings, start_dispatcher, make_delivery,
                                              until):
    delivery = make_delivery()
    record = await record_for(start_dispatcher, engine_settings(), delivery,
                              HttpResult(status_code=500, response_excerpt="boom"), until)

    assert record.delivery is delivery
    assert record.attempt_number == 1
    assert record.next_status is DeliveryStatus.PENDING
    assert record.outcome.kind is OutcomeKind.RETRY
    assert record.outcome.error_kind is ErrorKind.HTTP_STATUS
    assert record.next_attempt_at == record.attempted_at + timedelta(seconds=30)
    assert record.result.status_code == 500


async def test_jitter_comes_from_rand(engine_settings, start_dispatcher, make_delivery, until):
    record = await record_for(start_dispatcher, engine_settings(retry_jitter=0.2),
                              make_delivery(attempts=1), HttpResult(status_code=502), until,
                              rand=0.0)
    assert record.attempt_number == 2
    assert record.next_attempt_at == record.attempted_at + timedelta(seconds=120 * 0.8)


async def test_retry_after_lengthens_the_delay(engine_settings, start_dispatcher, make_delivery,
                                               until):
    record = await record_for(start_dispatcher, engine_settings(), make_delivery(),
                              HttpResult(status_code=503, retry_after="600"), until)
    assert record.next_status is DeliveryStatus.PENDING
    assert record.next_attempt_at == record.attempted_at + timedelta(seconds=600)


async def test_success_is_succeeded(engine_settings, start_dispatcher, make_delivery, until):
    record = await record_for(start_dispatcher, engine_settings(), make_delivery(attempts=2),
                              HttpResult(status_code=204), until)
    assert record.next_status is DeliveryStatus.SUCCEEDED
    assert record.outcome.kind is OutcomeKind.SUCCESS
    assert record.next_attempt_at is None
    assert record.attempt_number == 3


async def test_last_attempt_failing_is_failed(engine_settings, start_dispatcher, make_delivery,
                                              until):
    record = await record_for(start_dispatcher, engine_settings(), make_delivery(attempts=3),
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
    engine_settings, start_dispatcher, make_delivery, until, result, status, kind
):
    record = await record_for(start_dispatcher, engine_settings(), make_delivery(), result, until)
    assert record.next_status is status
    assert record.outcome.kind is kind
    assert (record.next_attempt_at is not None) == (status is DeliveryStatus.PENDING)


# -- robustness --------------------------------------------------------------------------------


async def test_a_crashing_send_frees_its_slot(engine_settings, start_dispatcher, make_delivery,
                                              until):
    sender = FakeSender(instant)
    recorder = FakeRecorder()
    dispatcher = start_dispatcher(engine_settings(max_in_flight=1), sender, recorder)
    bad = make_delivery()

    async def crash(delivery: Delivery) -> HttpResult:
        raise RuntimeError("bug in sender")

    sender.by_id[bad.id] = crash
    good = [make_delivery() for _ in range(3)]
    dispatcher.submit([bad, *good])

    await until(lambda: len(recorder.records) == 3, 2)
    assert sorted(recorder.ids()) == sorted(d.id for d in good)
    assert dispatcher.in_flight == 0


async def test_an_endpoint_working_one_at_a_time_is_not_taken_for_slow(
    engine_settings, start_dispatcher, make_delivery, until
):
    """Progress counts every completion, also the ones that leave the endpoint idle for a
    moment before its next parked delivery starts."""
    sender = FakeSender(sleeping(0.05))
    recorder = FakeRecorder()
    settings = engine_settings(max_in_flight=10, per_endpoint_limit=1, park_limit=2,
                               max_queued=500, slow_endpoint_seconds=0.3)
    dispatcher = start_dispatcher(settings, sender, recorder)
    dispatcher.submit([make_delivery(endpoint_id="ep-serial") for _ in range(20)])
    await asyncio.sleep(0.6)  # ~12 done, one at a time, each within 0.05 s
    dispatcher.submit([make_delivery(endpoint_id="ep-serial") for _ in range(10)])
    await until(lambda: len(recorder.records) == 30, 5)
    assert recorder.released == [] and dispatcher.stats["spilled"] == 0
