"""Claims due deliveries (retries, expired leases, spilled ones) from the database."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from worker.db.store import Store
from worker.delivery.scheduler import Scheduler
from worker.settings import Settings

log = logging.getLogger("webhooks.sweeper")

# A claim smaller than this is not worth a round trip while the scheduler is full.
MIN_CLAIM = 100
# How often a full scheduler is looked at again for room.
ROOM_POLL_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class SweepConfig:
    sweep_limit: int
    lease_seconds: float

    @classmethod
    def from_settings(cls, s: Settings) -> SweepConfig:
        return cls(s.sweep_limit, s.lease_seconds)


class Sweeper:
    def __init__(self, config: SweepConfig, store: Store, scheduler: Scheduler) -> None:
        self.config = config
        self.store = store
        self.scheduler = scheduler

    async def sweep(self) -> tuple[int, int]:
        """Claim due deliveries up to the scheduler's room, once.

        Returns (claimed, failed on the spot because their endpoint is gone or disabled).
        """
        room = min(self.scheduler.room, self.config.sweep_limit)
        if room <= 0:
            return 0, 0
        ready, dead = await self.store.claim_due(room, self.config.lease_seconds)
        self.scheduler.submit(ready)
        return len(ready), dead

    async def sweep_for(self, seconds: float) -> tuple[int, int]:
        """Keep claiming due deliveries as room frees up, for at most `seconds`.

        A backlog (after an outage, say) then drains at delivery speed rather than one
        sweep's worth per beat tick. Stops early once nothing more is due.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        claimed = failed = 0
        while loop.time() < deadline:
            room = min(self.scheduler.room, self.config.sweep_limit)
            if room < min(MIN_CLAIM, self.config.sweep_limit, self.scheduler.config.max_queued):
                await asyncio.sleep(ROOM_POLL_SECONDS)
                continue
            got, dead = await self.sweep()
            claimed, failed = claimed + got, failed + dead
            if got + dead < room:
                break
        return claimed, failed
