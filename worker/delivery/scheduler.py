"""Keeps attempts running within bounds, while earlier ones still wait on their endpoints.

Two bounds: `max_in_flight` attempts in all, `per_endpoint_limit` per endpoint. A delivery
whose endpoint is at its limit is parked without holding a global slot, so a slow endpoint
never starves the others. Past `park_limit` parked for a *slow* endpoint (its attempts take,
or it has made no progress for, over `slow_endpoint_seconds`), deliveries go back to the
database, so it cannot fill memory and hold up intake for everyone. A busy but healthy
endpoint keeps its deliveries; intake waits for it instead (back-pressure).

Back-pressure counts what this process holds: deliveries waiting for a slot (parked ones
included) plus outcomes not yet written. `room` is what `max_queued` leaves of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from worker.core.clock import SYSTEM_CLOCK, Clock
from worker.core.health import HealthChange, HealthEvent
from worker.core.models import AttemptRecord, Delivery, HttpResult
from worker.core.outcome import decide
from worker.delivery.ratelimit import RateLimit
from worker.delivery.writer import OutcomeWriter
from worker.settings import Settings

log = logging.getLogger("webhooks.scheduler")

# Weight of the newest attempt in an endpoint's smoothed attempt duration.
LATENCY_SMOOTHING = 0.2
# How long a process stops attempting an endpoint it saw disabled, before the database's
# word (held, or enabled again) takes over.
DISABLED_GATE_SECONDS = 5.0
# A throttled delivery must reach its turn this long before its lease ends, or it goes back.
LEASE_MARGIN = 5.0


class Sends(Protocol):
    async def send(self, delivery: Delivery) -> HttpResult: ...


class Limits(Protocol):
    async def take(self, key: str, limit: RateLimit) -> float:
        """0.0: go now; else seconds until the endpoint's shared bucket has a token."""
        ...


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_in_flight: int
    per_endpoint_limit: int
    max_queued: int
    park_limit: int
    slow_endpoint_seconds: float
    retry_schedule: tuple[float, ...]
    retry_jitter: float
    max_retry_after: float
    default_rate: float | None = None  # per endpoint, when it sets none of its own
    default_burst: int = 1

    @classmethod
    def from_settings(cls, s: Settings) -> SchedulerConfig:
        return cls(s.max_in_flight, s.per_endpoint_limit, s.max_queued, s.park_limit,
                   s.slow_endpoint_seconds, s.retry_schedule, s.retry_jitter, s.max_retry_after,
                   s.rate_limit, s.rate_burst)

    def rate_of(self, delivery: Delivery) -> RateLimit | None:
        policy = delivery.policy
        if policy.rate_limit is not None:
            return RateLimit(policy.rate_limit, policy.rate_burst)
        if self.default_rate is not None:
            return RateLimit(self.default_rate, self.default_burst)
        return None


class Scheduler:
    """Takes deliveries from a queue and runs each as one attempt, within the bounds."""

    def __init__(
        self,
        config: SchedulerConfig,
        sender: Sends,
        writer: OutcomeWriter,
        *,
        rand: Callable[[], float] = random.random,
        clock: Clock = SYSTEM_CLOCK,
        limiter: Limits | None = None,
    ) -> None:
        self.config = config
        self._limiter = limiter
        self._sender = sender
        self._writer = writer
        self._rand = rand
        self._clock = clock
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._room = asyncio.Event()
        self._room.set()
        self._attempts: set[asyncio.Task[None]] = set()
        self._per_endpoint: dict[str, int] = {}
        self._parked: dict[str, deque[Delivery]] = {}
        self._parked_count = 0
        self._in_hand = 0  # 1 while the dispatcher holds a delivery waiting for a slot
        self._latency: dict[str, float] = {}  # per endpoint: smoothed attempt duration, s
        self._progress: dict[str, float] = {}  # per busy endpoint: last start/finish (monotonic)
        self._throttled: dict[str, deque[Delivery]] = {}  # waiting for a rate-limit token
        self._pacers: dict[str, asyncio.Task[None]] = {}
        self._gates: dict[str, float] = {}  # endpoint -> unix time its circuit may be probed
        self._dispatch_task: asyncio.Task[None] | None = None
        self._accepting = True
        self.stats = {"attempted": 0, "lease_lost": 0, "held_back": 0}
        writer.on_written(lambda _: self._signal_room())
        writer.on_health(self.apply_health)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._dispatch_task = asyncio.create_task(self._dispatch(), name="webhooks-dispatch")

    async def stop(self, grace: float) -> None:
        """Stop taking work; let running attempts finish within `grace`, then cancel them.

        Queued and parked deliveries are left alone: their leases expire and the sweep
        hands them to a worker again.
        """
        self._accepting = False
        for task in [self._dispatch_task, *self._pacers.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._attempts:
            _, late = await asyncio.wait(set(self._attempts), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    # -- intake side -----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._attempts)

    @property
    def waiting(self) -> int:
        """Deliveries waiting for a slot, parked ones included."""
        return self._queue.qsize() + self._in_hand + self._parked_count

    @property
    def held(self) -> int:
        """What back-pressure counts: waiting deliveries plus unwritten outcomes."""
        return self.waiting + self._writer.unwritten

    @property
    def room(self) -> int:
        return max(self.config.max_queued - self.held, 0)

    async def wait_for_room(self, count: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until `count` more deliveries fit under `max_queued` (nothing held: any fit).

        Returns False when `timeout` passed first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.held and self.held + count > self.config.max_queued:
            for endpoint in [e for e in self._parked if self._is_slow(e)]:
                self._spill_excess(endpoint)
            if self.held + count <= self.config.max_queued:
                break
            self._room.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._room.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def submit(self, deliveries: Sequence[Delivery]) -> None:
        """Queue deliveries already committed and leased to this process."""
        if not self._accepting:
            return  # shutting down: their leases expire and the sweep resumes them
        for delivery in deliveries:
            self._queue.put_nowait(delivery)

    def _signal_room(self) -> None:
        if self.held < self.config.max_queued:
            self._room.set()

    # -- dispatching -----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            # The delivery first, then a slot: an idle dispatcher holds no slot that a
            # rate-limited endpoint's pacer might be waiting for.
            delivery = await self._queue.get()
            if self._limiter is not None and self.config.rate_of(delivery) is not None:
                self._throttle(delivery)  # waiting for a token holds no global slot
            else:
                self._in_hand = 1  # still waiting, as far as back-pressure is concerned
                try:
                    await self._slots.acquire()
                finally:
                    self._in_hand = 0
                self._admit(delivery)
            self._signal_room()

    def _admit(self, delivery: Delivery) -> None:
        """Holding one global slot: start the delivery, park it, or give it back."""
        endpoint = delivery.endpoint_id
        limit = delivery.policy.max_in_flight or self.config.per_endpoint_limit
        if self._gated(endpoint):
            self._slots.release()
            self._hold_back([delivery.id], endpoint)
        elif self._per_endpoint.get(endpoint, 0) >= limit:
            self._park(delivery)
            self._slots.release()
        else:
            self._start(delivery)

    # -- endpoint health -------------------------------------------------------------------

    def apply_health(self, changes: Sequence[HealthChange]) -> None:
        """Stop attempting an endpoint whose circuit opened or that was disabled."""
        for change in changes:
            endpoint = change.endpoint_id
            if change.event is HealthEvent.CLOSED:
                self._gates.pop(endpoint, None)
                continue
            # A disabled endpoint is gated only briefly: the database holds its deliveries
            # from then on, and an operator may enable it again at any time.
            self._gates[endpoint] = (change.until.timestamp() if change.until is not None
                                     else self._clock.time() + DISABLED_GATE_SECONDS)
            held = [d.id for d in self._parked.pop(endpoint, ())]
            held += [d.id for d in self._throttled.pop(endpoint, ())]
            self._parked_count -= len(held)
            if held:
                self._hold_back(held, endpoint)
                self._signal_room()

    def _gated(self, endpoint: str) -> bool:
        until = self._gates.get(endpoint)
        if until is None:
            return False
        if until > self._clock.time():
            return True
        del self._gates[endpoint]  # past its cool-down: the database decides who probes
        return False

    def _hold_back(self, ids: list[str], endpoint: str) -> None:
        """Back to the database without an attempt, due when the gate lapses: when the
        circuit may be probed, or (disabled endpoint) when the sweep will hold them."""
        until = self._gates.get(endpoint)
        due = datetime.fromtimestamp(until, UTC) if until is not None else self._clock.now()
        self.stats["held_back"] += len(ids)
        self._writer.give_back(ids, due_at=due)

    # -- rate limits -----------------------------------------------------------------------

    def _throttle(self, delivery: Delivery) -> None:
        endpoint = delivery.endpoint_id
        if self._gated(endpoint):
            self._hold_back([delivery.id], endpoint)
            return
        queue = self._throttled.setdefault(endpoint, deque())
        limit = self.config.rate_of(delivery)
        wait = len(queue) / (limit.rate if limit is not None else 1.0)
        lease_left = (delivery.lease_until - self._clock.time()
                      if delivery.lease_until is not None else float("inf"))
        if len(queue) >= self.config.park_limit or wait >= lease_left - LEASE_MARGIN:
            # More than a while's worth, or more than its lease would last: the database
            # keeps it. Due back before its turn (half-way), so the queue never runs dry
            # while the sweep brings it.
            due = self._clock.now() + timedelta(seconds=wait / 2)
            self._writer.give_back([delivery.id], due_at=due)
            return
        queue.append(delivery)
        self._parked_count += 1
        if endpoint not in self._pacers:
            self._pacers[endpoint] = asyncio.create_task(self._pace(endpoint),
                                                         name=f"webhooks-pace-{endpoint}")

    async def _pace(self, endpoint: str) -> None:
        """Let an endpoint's throttled deliveries go as its shared bucket yields tokens."""
        assert self._limiter is not None
        try:
            while self._accepting:
                queue = self._throttled.get(endpoint)
                if not queue:
                    return
                head = queue[0]
                if head.lease_until is not None and self._clock.time() > head.lease_until:
                    # Another worker may own it now: no token for it (the sweep decides).
                    queue.popleft()
                    self._parked_count -= 1
                    self.stats["lease_lost"] += 1
                    continue
                limit = self.config.rate_of(head)
                if limit is None:  # the endpoint's limit was lifted: admit without a token
                    wait = 0.0
                else:
                    wait = await self._limiter.take(endpoint, limit)
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                await self._slots.acquire()
                queue = self._throttled.get(endpoint)
                if not queue:  # given back meanwhile (circuit opened)
                    self._slots.release()
                    return
                self._parked_count -= 1
                delivery = queue.popleft()
                if not queue:
                    del self._throttled[endpoint]
                self._admit(delivery)
                self._signal_room()
        finally:
            self._pacers.pop(endpoint, None)

    def _park(self, delivery: Delivery) -> None:
        endpoint = delivery.endpoint_id
        parked = self._parked.setdefault(endpoint, deque())
        if len(parked) < self.config.park_limit or not self._is_slow(endpoint):
            parked.append(delivery)
            self._parked_count += 1
        else:
            self._writer.give_back([delivery.id])
            self._spill_excess(endpoint)

    def _spill_excess(self, endpoint: str) -> None:
        """Give a slow endpoint's parked deliveries past `park_limit` back to the database."""
        parked = self._parked.get(endpoint)
        excess: list[str] = []
        while parked and len(parked) > self.config.park_limit:
            excess.append(parked.pop().id)
            self._parked_count -= 1
        if excess:
            self._writer.give_back(excess)

    def _is_slow(self, endpoint: str) -> bool:
        threshold = self.config.slow_endpoint_seconds
        now = self._clock.monotonic()
        idle = now - self._progress.get(endpoint, now)
        return idle > threshold or self._latency.get(endpoint, 0.0) > threshold

    def _start(self, delivery: Delivery) -> None:
        endpoint = delivery.endpoint_id
        self._progress.setdefault(endpoint, self._clock.monotonic())
        self._per_endpoint[endpoint] = self._per_endpoint.get(endpoint, 0) + 1
        task = asyncio.create_task(self._attempt(delivery))
        self._attempts.add(task)
        task.add_done_callback(lambda t: self._finished(t, endpoint))

    def _finished(self, task: asyncio.Task[None], endpoint: str) -> None:
        self._attempts.discard(task)
        self._progress[endpoint] = self._clock.monotonic()  # every completion is progress
        running = self._per_endpoint[endpoint] - 1
        if running:
            self._per_endpoint[endpoint] = running
        else:
            del self._per_endpoint[endpoint]
            if endpoint not in self._parked:
                self._progress.pop(endpoint, None)
                self._latency.pop(endpoint, None)
        parked = self._parked.get(endpoint)
        if parked and self._accepting:
            # The endpoint's freed place goes to its oldest parked delivery, slot and all.
            self._parked_count -= 1
            nxt = parked.popleft()
            if not parked:
                del self._parked[endpoint]
            self._start(nxt)
            self._signal_room()
        else:
            self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("attempt crashed", exc_info=task.exception())

    async def _attempt(self, delivery: Delivery) -> None:
        if delivery.lease_until is not None and self._clock.time() > delivery.lease_until:
            self.stats["lease_lost"] += 1  # another worker may own it now; the sweep decides
            return
        result = await self._sender.send(delivery)
        seconds = result.duration_ms / 1000.0
        previous = self._latency.get(delivery.endpoint_id)
        self._latency[delivery.endpoint_id] = (
            seconds if previous is None else previous + LATENCY_SMOOTHING * (seconds - previous))
        c = self.config
        record: AttemptRecord = decide(
            delivery, result, attempted_at=self._clock.now(), schedule=c.retry_schedule,
            jitter=c.retry_jitter, rand=self._rand(), max_retry_after=c.max_retry_after,
        )
        self.stats["attempted"] += 1
        self._writer.add(record)
