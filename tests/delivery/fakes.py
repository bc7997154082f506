"""A recorder that stands in for the database in the scheduler and writer tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime

from worker.core.errors import StoreUnavailable
from worker.core.models import AttemptRecord


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
        self.released_due: list[datetime] = []

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

    async def release(self, ids: Sequence[str], due_at: datetime) -> None:
        self.released.extend(ids)
        self.released_due.append(due_at)
