"""The delivery engine alone: pre-built deliveries, no broker, no database.

For the bench's `engine` mode and for embedding: the same scheduler, outcome writer, sender
and in-flight bound as the worker, with outcomes kept in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

from worker.core.models import AttemptRecord, Delivery
from worker.delivery.scheduler import Scheduler, SchedulerConfig
from worker.delivery.sender import Sender, SenderConfig
from worker.delivery.writer import OutcomeWriter, WriterConfig
from worker.settings import Settings


class MemoryRecorder:
    def __init__(self) -> None:
        self.records: list[AttemptRecord] = []

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        self.records.extend(records)

    async def release(self, ids: Sequence[str], due_at: datetime) -> None:
        raise RuntimeError("no database to give deliveries back to")


async def deliver_all(
    deliveries: Sequence[Delivery], settings: Settings, *, timeout: float | None = None  # noqa: ASYNC109
) -> list[AttemptRecord]:
    """Attempt each delivery once; returns one record per delivery, in completion order."""
    recorder = MemoryRecorder()
    done = asyncio.Event()
    expected = len(deliveries)

    def on_written(_: Sequence[AttemptRecord]) -> None:
        if len(recorder.records) >= expected:
            done.set()

    # Nothing can go back to a database here: park everything that waits.
    settings = settings.model_copy(update={"park_limit": max(expected, 1)})
    async with Sender(SenderConfig.from_settings(settings)) as sender:
        writer = OutcomeWriter(WriterConfig.from_settings(settings), recorder)
        writer.on_written(on_written)
        scheduler = Scheduler(SchedulerConfig.from_settings(settings), sender, writer)
        writer.start()
        scheduler.start()
        try:
            scheduler.submit(deliveries)
            if expected:
                await asyncio.wait_for(done.wait(), timeout)
        finally:
            await scheduler.stop(grace=0)
            await writer.close()
    return recorder.records
