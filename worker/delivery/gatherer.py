"""Gathers single events from the consumer and commits them in groups.

The consumer thread adds each message's events with a `settle` callback (its ack). Events
are committed when `gather_size` are waiting or `gather_interval` after the first; each
message is settled only once its commit has landed, and is given its own part of the
acceptance (its delivery ids, rejections, duplicates). While the database is away the events
stay here (and their messages unacknowledged in the broker); the next try comes after a
doubling delay, one log line per try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from worker.core.errors import MAX_UNEXPECTED_FAILURES, NOT_COMMITTED, InvalidEvent
from worker.core.messages import task_id_of, unreadable
from worker.core.models import AcceptReport, Incoming
from worker.settings import Settings

log = logging.getLogger("webhooks.gatherer")

Settle = Callable[[AcceptReport], object]
Accept = Callable[[Sequence[Incoming]], Awaitable[AcceptReport]]


@dataclass(frozen=True, slots=True)
class GatherConfig:
    gather_size: int
    gather_interval: float
    accept_timeout: float
    retry_delay: float
    max_retry_delay: float

    @classmethod
    def from_settings(cls, s: Settings) -> GatherConfig:
        return cls(s.gather_size, s.gather_interval, s.accept_timeout, s.requeue_delay,
                   s.max_requeue_delay)


@dataclass(slots=True)
class _Message:
    items: Sequence[Incoming]
    settle: Settle


class Gatherer:
    """Lives on the engine loop; `add` is called there (the runtime crosses threads)."""

    def __init__(self, config: GatherConfig, accept: Accept) -> None:
        self.config = config
        self._accept = accept
        self._waiting: list[_Message] = []
        self._count = 0  # events in _waiting
        self._some = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = {"gathered": 0, "committed": 0, "commit_failures": 0}

    @property
    def waiting(self) -> int:
        return self._count

    def add(self, items: Sequence[Incoming], settle: Settle) -> None:
        self._waiting.append(_Message(items, settle))
        self._count += len(items)
        self.stats["gathered"] += len(items)
        self._some.set()
        if self._count >= self.config.gather_size:
            self._full.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhooks-gather")

    async def close(self) -> None:
        """Stop; what is not committed stays unacknowledged, and the broker keeps it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._waiting:
            log.info("%d gathered events not committed at shutdown; the broker keeps them",
                     self._count)

    async def _run(self) -> None:
        delay = self.config.retry_delay
        unexpected = 0
        while True:
            await self._some.wait()
            if self._count < self.config.gather_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.config.gather_interval)
            group = self._take_group()
            items = [item for message in group for item in message.items]
            try:
                report = await asyncio.wait_for(self._accept(items), self.config.accept_timeout)
            except Exception as exc:
                self.stats["commit_failures"] += 1
                expected = isinstance(exc, NOT_COMMITTED)
                unexpected = 0 if expected else unexpected + 1
                if unexpected >= MAX_UNEXPECTED_FAILURES:
                    group = await self._reject_group(group, exc)
                    unexpected = 0
                if group:
                    self._put_back(group)
                    log.warning("could not commit %d events (%s: %s); next try in %.0fs",
                                len(items), type(exc).__name__, str(exc)[:300], delay,
                                exc_info=not expected)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.config.max_retry_delay)
                    continue
            else:
                self.stats["committed"] += len(items)
                _settle_all(group, report)
            delay, unexpected = self.config.retry_delay, 0

    def _take_group(self) -> list[_Message]:
        group: list[_Message] = []
        taken = 0
        while self._waiting and (not group or taken < self.config.gather_size):
            message = self._waiting.pop(0)
            group.append(message)
            taken += len(message.items)
        self._count -= taken
        if not self._waiting:
            self._some.clear()
        if self._count < self.config.gather_size:
            self._full.clear()
        return group

    def _put_back(self, group: list[_Message]) -> None:
        self._waiting[:0] = group
        self._count += sum(len(m.items) for m in group)
        self._some.set()

    async def _reject_group(self, group: list[_Message], exc: BaseException) -> list[_Message]:
        """Record a group that keeps failing as rejected; returns it unless that landed."""
        problem = InvalidEvent("internal_error",
                               f"could not be committed: {type(exc).__name__}: {exc}"[:500])
        items = [unreadable(item.message_id, problem, item.excerpt)
                 for message in group for item in message.items]
        try:
            report = await asyncio.wait_for(self._accept(items), self.config.accept_timeout)
        except Exception:
            log.exception("could not record %d events as rejected either", len(items))
            return group
        log.error("recorded %d events as rejected after %d failed commits", len(items),
                  MAX_UNEXPECTED_FAILURES, exc_info=exc)
        _settle_all(group, report)
        return []


def _settle_all(group: Sequence[_Message], report: AcceptReport) -> None:
    """Settle each message with its own part of the group's report."""
    parts = report.by_task()
    for message in group:
        task_id = task_id_of(message.items[0].message_id) if message.items else None
        try:
            message.settle(parts.get(task_id) or AcceptReport())
        except Exception:  # an ack that failed leaves its message to the broker: harmless
            log.exception("could not acknowledge a committed message")
