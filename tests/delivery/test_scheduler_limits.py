"""Scheduler: per-endpoint limits (attempts in flight, shared rate) and the circuit gate.

Deliveries over a limit wait without holding a global slot and are never dropped; an endpoint
whose circuit opened (or that was disabled) gets no attempt: its deliveries go back to the
database, due when the circuit may be probed.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.delivery.fakes import FakeRecorder
from tests.delivery.test_scheduler import FakeSender, held_until, sleeping
from worker.core.health import HealthChange, HealthEvent
from worker.core.models import EndpointPolicy
from worker.delivery.ratelimit import LocalLimiter, RateLimit
from worker.delivery.scheduler import Scheduler, SchedulerConfig
from worker.delivery.writer import OutcomeWriter, WriterConfig

pytestmark = pytest.mark.timeout(20)


class ScriptedLimiter:
    """Answers each take from a script of waits (then 0.0); records every take."""

    def __init__(self, waits: list[float] | None = None) -> None:
        self.waits = list(waits or [])
        self.takes: list[tuple[str, RateLimit]] = []

    async def take(self, key: str, limit: RateLimit) -> float:
        self.takes.append((key, limit))
        return self.waits.pop(0) if self.waits else 0.0


class BlockingLimiter:
    """No token until the test opens the gate: every take answers 'wait a little'."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.takes = 0

    async def take(self, key: str, limit: RateLimit) -> float:
        self.takes += 1
        return 0.0 if self.open.is_set() else 0.01


@pytest.fixture
def settings(make_settings):
    def build(**overrides: Any):
        values = {"max_in_flight": 4, "max_queued": 1000, "flush_interval": 0.01,
                  "per_endpoint_limit": 50, "park_limit": 100}
        values.update(overrides)
        return make_settings(**values)

    return build


@pytest.fixture
async def run(fake_clock):
    started: list[tuple[Scheduler, OutcomeWriter]] = []

    def start(settings, sender, recorder, limiter=None, clock=None):
        clock = clock or fake_clock
        writer = OutcomeWriter(WriterConfig.from_settings(settings), recorder, clock=clock)
        scheduler = Scheduler(SchedulerConfig.from_settings(settings), sender, writer,
                              rand=lambda: 0.5, clock=clock, limiter=limiter)
        writer.start()
        scheduler.start()
        started.append((scheduler, writer))
        return scheduler, writer

    yield start
    for scheduler, writer in started:
        await asyncio.wait_for(scheduler.stop(0), 5)
        await asyncio.wait_for(writer.close(), 5)


def limited(delivery, **policy: Any):
    return replace(delivery, policy=EndpointPolicy(**policy))


# -- attempts in flight per endpoint -----------------------------------------------------------


async def test_endpoint_max_in_flight_overrides_the_global_default(
        settings, run, make_delivery, until):
    sender = FakeSender(sleeping(0.02))
    recorder = FakeRecorder()
    peaks: dict[str, int] = {}
    running: dict[str, int] = {}

    async def counting(delivery):
        running[delivery.endpoint_id] = running.get(delivery.endpoint_id, 0) + 1
        peaks[delivery.endpoint_id] = max(peaks.get(delivery.endpoint_id, 0),
                                          running[delivery.endpoint_id])
        await asyncio.sleep(0.02)
        running[delivery.endpoint_id] -= 1
        return await sleeping(0)(delivery)

    sender.default = counting
    scheduler, _ = run(settings(max_in_flight=8), sender, recorder)
    narrow = [limited(make_delivery(endpoint_id="narrow"), max_in_flight=2) for _ in range(12)]
    wide = [make_delivery(endpoint_id="wide") for _ in range(12)]
    scheduler.submit(narrow + wide)
    await until(lambda: len(recorder.records) == 24, 10)
    assert peaks["narrow"] == 2
    assert peaks["wide"] > 2


# -- rate limits -------------------------------------------------------------------------------


async def test_rate_limited_deliveries_wait_for_tokens_without_holding_slots(
        settings, run, make_delivery, until):
    """While a limited endpoint has no token, a single global slot still serves the others."""
    sender = FakeSender()
    recorder = FakeRecorder()
    limiter = BlockingLimiter()
    scheduler, _ = run(settings(max_in_flight=1), sender, recorder, limiter=limiter)
    throttled = [limited(make_delivery(endpoint_id="slowpoke"), rate_limit=5.0, rate_burst=1)
                 for _ in range(5)]
    free = [make_delivery(endpoint_id="free") for _ in range(20)]
    scheduler.submit(throttled + free)

    await until(lambda: len(recorder.records) == 20, 10)
    assert set(recorder.ids()) == {d.id for d in free}
    assert limiter.takes >= 1
    assert scheduler.waiting == 5  # counted for back-pressure, but in no slot
    assert scheduler.in_flight == 0

    limiter.open.set()
    await until(lambda: len(recorder.records) == 25, 10)
    # Never dropped, and in the order they came.
    order = [i for i in recorder.ids() if i in {d.id for d in throttled}]
    assert order == [d.id for d in throttled]
    assert scheduler.waiting == 0


async def test_every_start_of_a_limited_endpoint_takes_one_token(
        settings, run, make_delivery, until):
    sender = FakeSender()
    recorder = FakeRecorder()
    limiter = ScriptedLimiter([0.0, 0.01, 0.0, 0.02, 0.0, 0.0])
    scheduler, _ = run(settings(), sender, recorder, limiter=limiter)
    batch = [limited(make_delivery(endpoint_id="ep"), rate_limit=7.5, rate_burst=3)
             for _ in range(4)]
    scheduler.submit(batch)
    await until(lambda: len(recorder.records) == 4, 10)
    # Four grants, two refusals (the waits): six takes, all for the endpoint's own limit.
    assert len(limiter.takes) == 6
    assert {t for t in limiter.takes} == {("ep", RateLimit(7.5, 3))}


async def test_the_global_default_rate_applies_to_endpoints_without_their_own(
        settings, run, make_delivery, until):
    sender = FakeSender()
    recorder = FakeRecorder()
    limiter = ScriptedLimiter()
    scheduler, _ = run(settings(rate_limit=50.0, rate_burst=4), sender, recorder,
                       limiter=limiter)
    scheduler.submit([make_delivery(endpoint_id="plain"),
                      limited(make_delivery(endpoint_id="own"), rate_limit=2.0)])
    await until(lambda: len(recorder.records) == 2, 10)
    assert sorted(limiter.takes) == [("own", RateLimit(2.0, 1)), ("plain", RateLimit(50.0, 4))]


async def test_no_limiter_or_no_limit_means_no_takes(settings, run, make_delivery, until):
    sender = FakeSender()
    recorder = FakeRecorder()
    limiter = ScriptedLimiter()
    scheduler, _ = run(settings(), sender, recorder, limiter=limiter)
    scheduler.submit([make_delivery() for _ in range(5)])
    await until(lambda: len(recorder.records) == 5, 10)
    assert limiter.takes == []


async def test_a_throttle_backlog_past_park_limit_goes_back_to_the_database(
        settings, run, make_delivery, until, fake_clock):
    sender = FakeSender()
    recorder = FakeRecorder()
    limiter = BlockingLimiter()
    scheduler, _ = run(settings(park_limit=3), sender, recorder, limiter=limiter)
    batch = [limited(make_delivery(endpoint_id="ep"), rate_limit=2.0) for _ in range(5)]
    scheduler.submit(batch)
    await until(lambda: len(recorder.released) == 2, 5)
    assert recorder.released == [batch[3].id, batch[4].id]
    # Due back half-way to their turn (3 ahead at 2/s: 1.5 s), so the queue never runs dry.
    assert recorder.released_due == [fake_clock.now() + timedelta(seconds=0.75)]  # one write
    assert scheduler.waiting == 3
    limiter.open.set()
    await until(lambda: len(recorder.records) == 3, 5)


async def test_real_local_bucket_paces_the_endpoint(settings, run, make_delivery, until):
    """With the in-process bucket on the real clock: 10 starts at 50/s, burst 1, take at least
    the 9 intervals between them."""
    from worker.core.clock import SYSTEM_CLOCK

    sender = FakeSender()
    recorder = FakeRecorder()
    starts: list[float] = []
    loop = asyncio.get_running_loop()

    async def stamp(delivery):
        starts.append(loop.time())
        return await sleeping(0)(delivery)

    sender.default = stamp
    scheduler, _ = run(settings(), sender, recorder, limiter=LocalLimiter(),
                       clock=SYSTEM_CLOCK)
    scheduler.submit([limited(make_delivery(endpoint_id="ep"), rate_limit=50.0)
                      for _ in range(10)])
    await until(lambda: len(recorder.records) == 10, 10)
    assert starts[-1] - starts[0] >= 9 / 50 * 0.95


# -- the circuit gate ----------------------------------------------------------------------------


def opened(endpoint: str, seconds_from: datetime, seconds: float) -> HealthChange:
    return HealthChange(endpoint, HealthEvent.OPENED,
                        until=seconds_from + timedelta(seconds=seconds))


async def test_an_open_circuit_sends_its_deliveries_back_without_attempts(
        settings, run, make_delivery, until, fake_clock):
    sender = FakeSender()
    recorder = FakeRecorder()
    scheduler, _ = run(settings(), sender, recorder)
    scheduler.apply_health([opened("broken", fake_clock.now(), 30)])
    broken = [make_delivery(endpoint_id="broken") for _ in range(3)]
    fine = [make_delivery(endpoint_id="fine") for _ in range(3)]
    scheduler.submit(broken + fine)
    await until(lambda: len(recorder.records) == 3 and len(recorder.released) == 3, 5)
    assert sorted(recorder.ids()) == sorted(d.id for d in fine)
    assert sorted(recorder.released) == sorted(d.id for d in broken)
    assert not set(sender.started) & {d.id for d in broken}
    expected_due = fake_clock.now() + timedelta(seconds=30)
    assert all(abs((due - expected_due).total_seconds()) < 0.001
               for due in recorder.released_due)
    assert scheduler.stats["held_back"] == 3


async def test_opening_gives_back_what_was_parked_and_closing_lets_work_flow(
        settings, run, make_delivery, until, fake_clock):
    gate = asyncio.Event()
    sender = FakeSender(held_until(gate))
    recorder = FakeRecorder()
    scheduler, _ = run(settings(per_endpoint_limit=1), sender, recorder)
    batch = [make_delivery(endpoint_id="ep") for _ in range(4)]
    scheduler.submit(batch)
    await until(lambda: len(sender.started) == 1 and scheduler.waiting == 3, 5)

    scheduler.apply_health([opened("ep", fake_clock.now(), 10)])
    await until(lambda: len(recorder.released) == 3, 5)
    assert sorted(recorder.released) == sorted(d.id for d in batch[1:])
    assert scheduler.waiting == 0
    gate.set()
    await until(lambda: len(recorder.records) == 1, 5)

    scheduler.apply_health([HealthChange("ep", HealthEvent.CLOSED)])
    later = make_delivery(endpoint_id="ep")
    scheduler.submit([later])
    await until(lambda: later.id in recorder.ids(), 5)


async def test_the_gate_lapses_after_the_cool_down(settings, run, make_delivery, until,
                                                   fake_clock):
    """Past its time the local gate steps aside: the database decides who probes."""
    sender = FakeSender()
    recorder = FakeRecorder()
    scheduler, _ = run(settings(), sender, recorder)
    scheduler.apply_health([opened("ep", fake_clock.now(), 5)])
    fake_clock.advance(6)
    d = make_delivery(endpoint_id="ep")
    scheduler.submit([d])
    await until(lambda: d.id in recorder.ids(), 5)
    assert recorder.released == []


async def test_a_disabled_endpoint_is_gated_briefly_then_the_database_decides(
        settings, run, make_delivery, until, fake_clock):
    """Disabled: what is in memory goes back without an attempt; after a few seconds the gate
    lapses (the sweep holds the deliveries, or sends them if an operator enabled it)."""
    from worker.delivery.scheduler import DISABLED_GATE_SECONDS

    sender = FakeSender()
    recorder = FakeRecorder()
    limiter = BlockingLimiter()
    scheduler, _ = run(settings(), sender, recorder, limiter=limiter)
    throttled = [limited(make_delivery(endpoint_id="gone"), rate_limit=1.0) for _ in range(2)]
    scheduler.submit(throttled)
    await until(lambda: scheduler.waiting == 2, 5)
    scheduler.apply_health([HealthChange("gone", HealthEvent.DISABLED, reason="410")])
    await until(lambda: len(recorder.released) == 2, 5)
    due = fake_clock.now() + timedelta(seconds=DISABLED_GATE_SECONDS)
    assert recorder.released_due == [due]
    assert scheduler.waiting == 0
    assert sender.started == []
    more = make_delivery(endpoint_id="gone")
    scheduler.submit([more])
    await until(lambda: more.id in recorder.released, 5)

    fake_clock.advance(DISABLED_GATE_SECONDS + 0.1)
    enabled_again = make_delivery(endpoint_id="gone")
    scheduler.submit([enabled_again])
    await until(lambda: enabled_again.id in recorder.ids(), 5)


async def test_a_throttled_delivery_never_outlives_its_lease(settings, run, make_delivery, until,
                                                             fake_clock):
    """What would wait for a token past its lease goes back to the database instead; one whose
    lease ran out while waiting is dropped without taking a token (the sweep owns it now)."""
    from worker.delivery.scheduler import LEASE_MARGIN

    sender = FakeSender()
    recorder = FakeRecorder()
    limiter = BlockingLimiter()
    scheduler, _ = run(settings(), sender, recorder, limiter=limiter)
    lease = fake_clock.time() + LEASE_MARGIN + 2.0  # room for 2 s of waiting at 1/s
    batch = [replace(limited(make_delivery(endpoint_id="ep"), rate_limit=1.0), lease_until=lease)
             for _ in range(5)]
    scheduler.submit(batch)
    await until(lambda: len(recorder.released) == 3, 5)
    assert recorder.released == [d.id for d in batch[2:]]
    assert scheduler.waiting == 2

    fake_clock.advance(LEASE_MARGIN + 3.0)  # both kept ones have lost their lease meanwhile
    limiter.open.set()
    await until(lambda: scheduler.waiting == 0, 5)
    assert scheduler.stats["lease_lost"] == 2
    assert sender.started == []
