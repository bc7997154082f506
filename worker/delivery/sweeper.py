"""Claims due deliveries (retries, expired leases, spilled ones) from the database: on the
engine's own loop at the time they fall due, and when beat's safety-net sweep asks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime

from worker.core.clock import SYSTEM_CLOCK, Clock
from worker.db.store import Store
from worker.delivery.scheduler import Scheduler
from worker.settings import Settings

log = logging.getLogger("webhooks.sweeper")

# A claim smaller than this is not worth a round trip while the scheduler is full.
MIN_CLAIM = 100
# How often a full scheduler is looked at again for room.
ROOM_POLL_SECONDS = 0.05
# The longest pause of the claim loop while the database is away.
MAX_CLAIM_BACKOFF = 30.0


@dataclass(frozen=True, slots=True)
class SweepConfig:
    sweep_limit: int
    lease_seconds: float

    @classmethod
    def from_settings(cls, s: Settings) -> SweepConfig:
        return cls(s.sweep_limit, s.lease_seconds)


class Sweeper:
    def __init__(self, config: SweepConfig, store: Store, scheduler: Scheduler, *,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self._clock = clock
        self._wake = asyncio.Event()
        self._planned: float | None = None  # unix time the claim loop will next look
        self._task: asyncio.Task[None] | None = None
        self.stats = {"claimed": 0}

    # -- the claim loop --------------------------------------------------------------------

    def start_claiming(self, interval: float) -> None:
        """Claim due deliveries at their time, looking at least every `interval` seconds."""
        self._task = asyncio.create_task(self._claim_loop(interval), name="webhooks-claims")

    def due_at(self, when: datetime) -> None:
        """A delivery falls due at `when`: look then, if that is sooner than planned."""
        if self._planned is None or when.timestamp() < self._planned:
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _claim_loop(self, interval: float) -> None:
        pause = interval
        failing = False
        while True:
            self._wake.clear()
            nxt: datetime | None = None
            try:
                claimed, dead = await self.sweep_for(interval)
                nxt = await self.store.next_due(self._clock.now())
            except Exception as exc:  # the database is away: look again later, quietly
                if not failing:
                    log.warning("claiming due deliveries failed (retrying with backoff "
                                "until it works): %s: %s", type(exc).__name__, exc)
                failing, pause = True, min(pause * 2, MAX_CLAIM_BACKOFF)
            else:
                if failing:
                    log.info("claiming due deliveries works again")
                failing, pause = False, interval
                self.stats["claimed"] += claimed
                if claimed or dead:
                    log.debug("claimed %d due deliveries, failed %d for gone endpoints",
                              claimed, dead)
            now = self._clock.time()
            wait = pause if nxt is None else min(max(nxt.timestamp() - now, 0.0), pause)
            self._planned = now + wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._planned = None

    # -- one sweep -------------------------------------------------------------------------

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
