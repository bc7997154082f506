"""Keeps attempts running within bounds and writes their outcomes back in bulk.

Two bounds: `max_in_flight` attempts in all, `per_endpoint_limit` per endpoint. A delivery
whose endpoint is at its limit is parked without holding a global slot, so a slow endpoint
never starves the others. Past `park_limit` parked for a *slow* endpoint (its attempts take,
or it has made no progress for, over `slow_endpoint_seconds`), deliveries go back to the
database (due again after `spill_delay`), so it cannot fill the backlog and hold up intake
for everyone. A busy but healthy endpoint keeps its deliveries; intake waits for it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from worker.delivery.models import AttemptRecord, Delivery, HttpResult
from worker.delivery.outcome import decide
from worker.settings import Settings

log = logging.getLogger("webhooks.dispatcher")

# Outcomes kept while the database refuses writes; past it, leases take over.
MAX_UNWRITTEN = 200_000
# Tries of the last write at shutdown before the outcomes are left to the leases.
FINAL_WRITE_TRIES = 3


class Recorder(Protocol):
    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None: ...

    async def release(self, ids: Sequence[str], due_at: datetime) -> None: ...


class Sends(Protocol):
    async def send(self, delivery: Delivery) -> HttpResult: ...


class Dispatcher:
    """Takes deliveries from a queue while earlier ones are still waiting on their endpoints."""

    def __init__(
        self,
        settings: Settings,
        sender: Sends,
        recorder: Recorder,
        *,
        rand: Callable[[], float] = random.random,
        on_record: Callable[[AttemptRecord], None] | None = None,
    ) -> None:
        self.settings = settings
        self._sender = sender
        self._recorder = recorder
        self._rand = rand
        self._on_record = on_record
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._room = asyncio.Event()
        self._room.set()
        self._flush_now = asyncio.Event()
        self._unwritten: list[AttemptRecord] = []
        self._attempts: set[asyncio.Task[None]] = set()
        self._per_endpoint: dict[str, int] = {}
        self._parked: dict[str, deque[Delivery]] = {}
        self._parked_count = 0
        self._spilled: list[str] = []
        self._latency: dict[str, float] = {}  # per endpoint: smoothed attempt duration, s
        self._progress: dict[str, float] = {}  # per busy endpoint: last start/finish (monotonic)
        self._dispatch_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._accepting = True
        self._closing = False
        self.stats = {"attempted": 0, "recorded": 0, "lease_lost": 0, "write_failures": 0,
                      "spilled": 0}

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._dispatch_task = asyncio.create_task(self._dispatch(), name="webhooks-dispatch")
        self._writer_task = asyncio.create_task(self._write_outcomes(), name="webhooks-outcomes")

    async def drain(self, grace: float) -> None:
        """Stop taking work, let running attempts finish within `grace`, write what is known.

        Queued and parked deliveries are left alone: their leases expire and the sweep
        hands them to a worker again.
        """
        self._accepting = False
        if self._dispatch_task is not None:
            self._dispatch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatch_task
        if self._attempts:
            _, late = await asyncio.wait(set(self._attempts), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._closing = True
        self._flush_now.set()
        if self._writer_task is not None:
            await self._writer_task

    # -- intake side -----------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Deliveries waiting for a slot, parked ones included."""
        return self._queue.qsize() + self._parked_count

    @property
    def in_flight(self) -> int:
        return len(self._attempts)

    @property
    def backlog(self) -> int:
        """Work held in memory: deliveries waiting to be sent, outcomes waiting to be written."""
        return self.queued + len(self._unwritten)

    @property
    def free_capacity(self) -> int:
        return max(self.settings.max_queued - self.backlog, 0)

    async def wait_for_room(self, count: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until `count` more deliveries fit the backlog bound (an empty one takes any).

        Unwritten outcomes count too: when the database falls behind, intake waits for it
        instead of memory growing.
        """
        deadline = time.monotonic() + timeout
        while self.backlog and self.backlog + count > self.settings.max_queued:
            for endpoint in [e for e in self._parked if self._is_slow(e)]:
                self._spill_excess(endpoint)
            if self.backlog + count <= self.settings.max_queued:
                break
            self._room.clear()
            remaining = deadline - time.monotonic()
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

    # -- dispatching -----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        limit = self.settings.per_endpoint_limit
        while True:
            await self._slots.acquire()
            delivery = await self._queue.get()
            endpoint = delivery.endpoint_id
            if self._per_endpoint.get(endpoint, 0) >= limit:
                parked = self._parked.setdefault(endpoint, deque())
                if len(parked) < self.settings.park_limit or not self._is_slow(endpoint):
                    parked.append(delivery)
                    self._parked_count += 1
                else:
                    self._spilled.append(delivery.id)
                    self._spill_excess(endpoint)
                self._slots.release()
            else:
                self._start(delivery)
            self._signal_room()

    def _signal_room(self) -> None:
        """Wake intake waiting in `wait_for_room` once the backlog is under its bound."""
        if self.backlog < self.settings.max_queued:
            self._room.set()

    def _spill_excess(self, endpoint: str) -> None:
        """Send a slow endpoint's parked deliveries past `park_limit` back to the database."""
        parked = self._parked.get(endpoint)
        while parked and len(parked) > self.settings.park_limit:
            self._spilled.append(parked.pop().id)
            self._parked_count -= 1
        if self._spilled:
            self._flush_now.set()

    def _is_slow(self, endpoint: str) -> bool:
        threshold = self.settings.slow_endpoint_seconds
        idle = time.monotonic() - self._progress.get(endpoint, time.monotonic())
        return idle > threshold or self._latency.get(endpoint, 0.0) > threshold

    def _start(self, delivery: Delivery) -> None:
        endpoint = delivery.endpoint_id
        self._progress.setdefault(endpoint, time.monotonic())
        self._per_endpoint[endpoint] = self._per_endpoint.get(endpoint, 0) + 1
        task = asyncio.create_task(self._attempt(delivery))
        self._attempts.add(task)
        task.add_done_callback(lambda t: self._finished(t, endpoint))

    def _finished(self, task: asyncio.Task[None], endpoint: str) -> None:
        self._attempts.discard(task)
        self._progress[endpoint] = time.monotonic()  # every completion is progress
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
        else:
            self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("attempt crashed", exc_info=task.exception())

    async def _attempt(self, delivery: Delivery) -> None:
        if delivery.lease_until is not None and time.time() > delivery.lease_until:
            self.stats["lease_lost"] += 1  # another worker may own it now; the sweep decides
            return
        result = await self._sender.send(delivery)
        seconds = result.duration_ms / 1000.0
        previous = self._latency.get(delivery.endpoint_id)
        self._latency[delivery.endpoint_id] = (
            seconds if previous is None else previous + 0.2 * (seconds - previous))
        s = self.settings
        record = decide(
            delivery, result, attempted_at=datetime.now(UTC), schedule=s.retry_schedule,
            jitter=s.retry_jitter, rand=self._rand(), max_retry_after=s.max_retry_after,
        )
        self.stats["attempted"] += 1
        self._unwritten.append(record)
        if len(self._unwritten) >= s.flush_size:
            self._flush_now.set()

    # -- writing outcomes ------------------------------------------------------------------

    async def _write_outcomes(self) -> None:
        backoff = self.settings.flush_interval
        failures_while_closing = 0
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush_now.wait(), backoff)
                self._flush_now.clear()
            if self._spilled:
                await self._release_spilled()
            if not self._unwritten:
                if self._closing:
                    return
                continue
            # Bounded transactions: a backlog is written as several, never as one huge one.
            batch = self._unwritten[: self.settings.flush_size]
            del self._unwritten[: len(batch)]
            if self._unwritten:
                self._flush_now.set()
            try:
                await self._recorder.record_attempts(batch)
            except Exception as exc:
                self.stats["write_failures"] += 1
                self._unwritten[:0] = batch
                self._trim_unwritten()
                if self._closing:
                    failures_while_closing += 1
                    if failures_while_closing >= FINAL_WRITE_TRIES:
                        log.error("%d outcomes not written at shutdown (leases will replay "
                                  "them): %s", len(self._unwritten), exc)
                        return
                backoff = min(backoff * 2, 5.0)
                log.warning("outcome write failed, retrying in %.2fs: %s", backoff, exc)
                if self._closing:
                    await asyncio.sleep(min(backoff, 1.0))
                continue
            backoff = self.settings.flush_interval
            self.stats["recorded"] += len(batch)
            self._signal_room()
            if self._on_record is not None:
                for record in batch:
                    self._on_record(record)

    async def _release_spilled(self) -> None:
        ids, self._spilled = self._spilled, []
        due_at = datetime.now(UTC) + timedelta(seconds=self.settings.spill_delay)
        try:
            await self._recorder.release(ids, due_at)
        except Exception as exc:  # their leases expire and the sweep resumes them anyway
            log.warning("could not release %d parked deliveries (leases will): %s", len(ids), exc)
            return
        self.stats["spilled"] += len(ids)

    def _trim_unwritten(self) -> None:
        if len(self._unwritten) > MAX_UNWRITTEN:
            dropped = len(self._unwritten) - MAX_UNWRITTEN
            del self._unwritten[:dropped]
            log.error("dropped %d unwritten outcomes; their leases will replay them", dropped)
