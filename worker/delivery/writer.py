"""Writes attempt outcomes back in bulk, and gives spilled deliveries back to the database.

Outcomes gather for at most `flush_interval` (or until `flush_size` are waiting) and are
written in bounded transactions. While the database refuses writes they are kept, with a
doubling backoff, up to `MAX_UNWRITTEN`; past that the leases take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from worker.core.clock import SYSTEM_CLOCK, Clock
from worker.core.health import HealthChange
from worker.core.models import AttemptRecord
from worker.settings import Settings

log = logging.getLogger("webhooks.writer")

# Outcomes kept while the database refuses writes; past it, leases take over.
MAX_UNWRITTEN = 200_000
# Tries of the last write at shutdown before the outcomes are left to the leases.
FINAL_WRITE_TRIES = 3
# The longest wait between two tries of a failing write.
MAX_WRITE_BACKOFF = 5.0

Written = Callable[[Sequence[AttemptRecord]], None]
HealthChanged = Callable[[Sequence[HealthChange]], None]


class Recorder(Protocol):
    async def record_attempts(
        self, records: Sequence[AttemptRecord]) -> Sequence[HealthChange] | None: ...

    async def release(self, ids: Sequence[str], due_at: datetime) -> None: ...


@dataclass(frozen=True, slots=True)
class WriterConfig:
    flush_interval: float
    flush_size: int
    spill_delay: float

    @classmethod
    def from_settings(cls, s: Settings) -> WriterConfig:
        return cls(s.flush_interval, s.flush_size, s.spill_delay)


class OutcomeWriter:
    """Owns the outcomes not yet written; one background task writes them."""

    def __init__(self, config: WriterConfig, recorder: Recorder, *,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self._recorder = recorder
        self._clock = clock
        self._unwritten: list[AttemptRecord] = []
        self._spilled: list[tuple[str, datetime | None]] = []
        self._flush_now = asyncio.Event()
        self._listeners: list[Written] = []
        self._health_listeners: list[HealthChanged] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False  # while writes fail, only the backoff wakes the writer
        self.stats = {"recorded": 0, "write_failures": 0, "spilled": 0}

    @property
    def unwritten(self) -> int:
        return len(self._unwritten)

    def on_written(self, listener: Written) -> None:
        """Call `listener` with every batch once it is committed."""
        self._listeners.append(listener)

    def add(self, record: AttemptRecord) -> None:
        self._unwritten.append(record)
        # A FIFO queue's next delivery waits for this one's outcome: no gathering for it.
        if (len(self._unwritten) >= self.config.flush_size or record.ends_queue_head) and (
                not self._failing):
            self._flush_now.set()

    def on_health(self, listener: HealthChanged) -> None:
        """Call `listener` with the endpoint health changes each written batch caused."""
        self._health_listeners.append(listener)

    def give_back(self, ids: Sequence[str], due_at: datetime | None = None) -> None:
        """Hand leased deliveries back to the database, due again at `due_at` (default: after
        `spill_delay`)."""
        self._spilled.extend((i, due_at) for i in ids)
        self._flush_now.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhooks-outcomes")

    async def close(self) -> None:
        """Write what is known (a few tries), then stop."""
        self._closing = True
        self._flush_now.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        backoff = self.config.flush_interval
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
            try:
                await self._write_one_batch()
            except Exception as exc:
                self._failing = True
                self._flush_now.clear()
                if self._closing:
                    failures_while_closing += 1
                    if failures_while_closing >= FINAL_WRITE_TRIES:
                        log.error("%d outcomes not written at shutdown (leases will replay "
                                  "them): %s", len(self._unwritten), exc)
                        return
                backoff = min(backoff * 2, MAX_WRITE_BACKOFF)
                log.warning("outcome write failed, retrying in %.2fs: %s", backoff, exc)
                if self._closing:
                    await asyncio.sleep(min(backoff, 1.0))
                continue
            backoff = self.config.flush_interval
            self._failing = False
            if self._unwritten:
                self._flush_now.set()

    async def _write_one_batch(self) -> None:
        # Bounded transactions: a backlog is written as several, never as one huge one.
        batch = self._unwritten[: self.config.flush_size]
        del self._unwritten[: len(batch)]
        try:
            changes = await self._recorder.record_attempts(batch)
        except Exception:
            self.stats["write_failures"] += 1
            self._unwritten[:0] = batch
            self._trim_unwritten()
            raise
        self.stats["recorded"] += len(batch)
        for listener in self._listeners:
            listener(batch)
        if changes:
            for health_listener in self._health_listeners:
                health_listener(changes)

    async def _release_spilled(self) -> None:
        spilled, self._spilled = self._spilled, []
        default = self._clock.now() + timedelta(seconds=self.config.spill_delay)
        by_due: dict[datetime, list[str]] = {}
        for delivery_id, due_at in spilled:
            by_due.setdefault(due_at or default, []).append(delivery_id)
        for due_at, ids in by_due.items():
            try:
                await self._recorder.release(ids, due_at)
            except Exception as exc:  # their leases expire and the sweep resumes them anyway
                log.warning("could not release %d parked deliveries (leases will): %s",
                            len(ids), exc)
                continue
            self.stats["spilled"] += len(ids)

    def _trim_unwritten(self) -> None:
        if len(self._unwritten) > MAX_UNWRITTEN:
            dropped = len(self._unwritten) - MAX_UNWRITTEN
            del self._unwritten[:dropped]
            log.error("dropped %d unwritten outcomes; their leases will replay them", dropped)
