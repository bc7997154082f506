"""Keeps up to `max_in_flight` attempts running and writes their outcomes back in bulk."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from worker.delivery.models import AttemptRecord, Delivery, HttpResult
from worker.delivery.outcome import decide
from worker.errors import StoreUnavailable
from worker.settings import Settings

log = logging.getLogger("webhooks.dispatcher")

# Outcomes kept while the database refuses writes; past it, leases take over.
MAX_UNWRITTEN = 200_000


class Recorder(Protocol):
    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None: ...


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
        self._loops: list[asyncio.Task[None]] = []
        self._accepting = True
        self.stats = {"attempted": 0, "recorded": 0, "lease_lost": 0, "write_failures": 0}

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._dispatch(), name="webhooks-dispatch"),
            asyncio.create_task(self._write_outcomes(), name="webhooks-outcomes"),
        ]

    async def drain(self, grace: float) -> None:
        """Stop taking work, let running attempts finish within `grace`, write what is known."""
        self._accepting = False
        self._loops[0].cancel()
        if self._attempts:
            _, late = await asyncio.wait(set(self._attempts), timeout=grace)
            for task in late:
                task.cancel()  # their leases expire and another worker resumes them
        self._loops[1].cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._unwritten:
            try:
                await self._recorder.record_attempts(self._take_unwritten())
            except StoreUnavailable as exc:
                log.error("outcomes not written at shutdown (leases will replay them): %s", exc)

    # -- intake side -----------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def in_flight(self) -> int:
        return len(self._attempts)

    @property
    def free_capacity(self) -> int:
        return max(self.settings.max_queued - self._queue.qsize(), 0)

    async def wait_for_room(self, count: int, timeout: float) -> bool:
        """Wait until `count` more deliveries fit the queue bound (an empty queue takes any)."""
        deadline = time.monotonic() + timeout
        while self._queue.qsize() and self._queue.qsize() + count > self.settings.max_queued:
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

    # -- the two loops ---------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            delivery = await self._queue.get()
            if self._queue.qsize() < self.settings.max_queued:
                self._room.set()
            task = asyncio.create_task(self._attempt(delivery))
            self._attempts.add(task)
            task.add_done_callback(self._attempt_done)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("attempt crashed", exc_info=task.exception())

    async def _attempt(self, delivery: Delivery) -> None:
        if delivery.lease_until is not None and time.time() > delivery.lease_until:
            self.stats["lease_lost"] += 1  # another worker may own it now; the sweep decides
            return
        result = await self._sender.send(delivery)
        s = self.settings
        record = decide(
            delivery, result, attempted_at=datetime.now(UTC), schedule=s.retry_schedule,
            jitter=s.retry_jitter, rand=self._rand(), max_retry_after=s.max_retry_after,
        )
        self.stats["attempted"] += 1
        self._unwritten.append(record)
        if len(self._unwritten) >= s.flush_size:
            self._flush_now.set()

    def _take_unwritten(self) -> list[AttemptRecord]:
        batch, self._unwritten = self._unwritten, []
        return batch

    async def _write_outcomes(self) -> None:
        backoff = self.settings.flush_interval
        while True:
            try:
                await asyncio.wait_for(self._flush_now.wait(), backoff)
            except TimeoutError:
                pass
            self._flush_now.clear()
            if not self._unwritten:
                continue
            batch = self._take_unwritten()
            try:
                await self._recorder.record_attempts(batch)
            except StoreUnavailable as exc:
                self.stats["write_failures"] += 1
                self._unwritten[:0] = batch
                if len(self._unwritten) > MAX_UNWRITTEN:
                    dropped = len(self._unwritten) - MAX_UNWRITTEN
                    del self._unwritten[:dropped]
                    log.error("dropped %d unwritten outcomes; their leases will replay them",
                              dropped)
                backoff = min(backoff * 2, 5.0)
                log.warning("outcome write failed, retrying in %.2fs: %s", backoff, exc)
                continue
            backoff = self.settings.flush_interval
            self.stats["recorded"] += len(batch)
            if self._on_record is not None:
                for record in batch:
                    self._on_record(record)
