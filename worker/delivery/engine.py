"""The delivery engine of one process: its parts, wired together inside the running loop."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence

from worker.core.attempt_log import attempt_fields, attempt_line, level_of
from worker.core.clock import SYSTEM_CLOCK, Clock
from worker.core.health import HealthChange, HealthEvent
from worker.core.models import AttemptRecord
from worker.db.connection import create_engine
from worker.db.store import open_store
from worker.delivery.gatherer import GatherConfig, Gatherer
from worker.delivery.intake import Intake, IntakeConfig
from worker.delivery.metrics_hooks import EngineMetrics
from worker.delivery.operator import OperatorConfig, OperatorEvents
from worker.delivery.ratelimit import limiter_for
from worker.delivery.rescuer import RescueConfig, Rescuer
from worker.delivery.scheduler import Scheduler, SchedulerConfig
from worker.delivery.sender import Sender, SenderConfig
from worker.delivery.sweeper import SweepConfig, Sweeper
from worker.delivery.waker import claim_poll, waker_for
from worker.delivery.writer import OutcomeWriter, WriterConfig
from worker.settings import Settings

log = logging.getLogger("webhooks.engine")
attempts_log = logging.getLogger("webhooks.attempts")
health_log = logging.getLogger("webhooks.health")


class Engine:
    """Store, sender, scheduler, outcome writer, intake, gatherer and sweeper of one process.

    Build it inside the loop that will run it: the database engine and the HTTP session
    belong to that loop.
    """

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM_CLOCK,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.db = create_engine(settings)
        # Reads the key ring: a missing key stops the start here, never a delivery later.
        self.store = open_store(self.db, settings)
        self.sender = Sender(SenderConfig.from_settings(settings))
        self.limiter = limiter_for(settings.broker_url)
        self.writer = OutcomeWriter(WriterConfig.from_settings(settings), self.store, clock=clock)
        self.scheduler = Scheduler(SchedulerConfig.from_settings(settings), self.sender,
                                   self.writer, rand=rand, clock=clock, limiter=self.limiter)
        self.intake = Intake(IntakeConfig.from_settings(settings), self.store, self.scheduler,
                             clock=clock, on_queued=lambda when: self.sweeper.due_at(when))
        self.sweeper = Sweeper(SweepConfig.from_settings(settings), self.store, self.scheduler,
                               clock=clock)
        self.gatherer = Gatherer(GatherConfig.from_settings(settings), self.intake.accept)
        # Outbox rows committed by producers wake the claim loop (PostgreSQL NOTIFY).
        self.waker = waker_for(settings, self.db.url, lambda: self.sweeper.due_at(clock.now()))
        self.writer.on_written(self._log_attempts)
        self.writer.on_written(self._wake_for_retries)
        operator = OperatorConfig.from_settings(settings)
        self.operator = (None if operator is None else
                         OperatorEvents(operator, self.intake.accept, self.store, clock=clock))
        if self.operator is not None:
            self.writer.on_health(self.operator.on_health)
            self.writer.on_written(self.operator.on_written)
        self.writer.on_health(_log_health)
        self.metrics = EngineMetrics(settings, self.writer, self.scheduler)
        self.rescuer: Rescuer | None = None  # only where the broker is consumed
        self._clock = clock
        self._stats_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sender.open()
        self.writer.start()
        self.scheduler.start()
        self.gatherer.start()
        self.metrics.start()
        if self.settings.claim_interval > 0:
            self.sweeper.start_claiming(claim_poll(self.settings, self.db.dialect.name))
        if self.waker is not None:
            self.waker.start()
        if self.operator is not None:
            self.operator.start()
        self._stats_task = asyncio.create_task(self._log_stats(), name="webhooks-stats")
        log.info("engine started (in-flight bound %d, database %s)", self.settings.max_in_flight,
                 self.db.url.render_as_string(hide_password=True))

    async def stop(self) -> None:
        """Let running attempts finish (within the shutdown grace), write their outcomes."""
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self.rescuer is not None:
            await self.rescuer.close()
        await self.gatherer.close()
        if self.waker is not None:
            await self.waker.close()
        await self.sweeper.close()
        if self.operator is not None:
            await self.operator.close()
        await self.scheduler.stop(self.settings.shutdown_grace)
        await self.writer.close()
        await self.metrics.stop()
        await self.sender.close()
        await self.limiter.close()
        await self.db.dispose()
        log.info("engine stopped: %s", self.stats())

    def _log_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """One line per attempt once it is recorded; the level says how it went."""
        max_attempts = 1 + len(self.settings.retry_schedule)
        structured = self.settings.log_format == "json"
        success_level = logging.getLevelName(self.settings.success_log_level)
        for record in records:
            level = level_of(record)
            if level == logging.INFO:
                level = success_level
            if not attempts_log.isEnabledFor(level):
                continue
            of = max_attempts + record.delivery.retry_base  # numbers run on across replays
            if structured:
                fields = dict(attempt_fields(record, of))
                attempts_log.log(level, "attempt", extra={"fields": fields})
            else:
                attempts_log.log(level, attempt_line(record, of))

    def _wake_for_retries(self, records: Sequence[AttemptRecord]) -> None:
        """Retries just scheduled here are claimed at their time, not at the next poll; so is
        the next delivery of a FIFO queue whose head just ended."""
        due = [r.next_attempt_at for r in records if r.next_attempt_at is not None]
        if any(r.ends_queue_head for r in records):
            due.append(self._clock.now())
        if due:
            self.sweeper.due_at(min(due))

    def start_rescuer(self) -> None:
        """Rescue messages dead workers left unacknowledged (once per process)."""
        if self.rescuer is None:
            self.rescuer = Rescuer(RescueConfig.from_settings(self.settings), self.intake.accept,
                                   clock=self._clock)
            self.rescuer.start()

    def stats(self) -> dict[str, int]:
        rescued = self.rescuer.stats if self.rescuer is not None else {}
        return {**self.scheduler.stats, **self.writer.stats, **self.gatherer.stats, **rescued}

    async def _log_stats(self) -> None:
        """One line per `stats_interval` while there is work, for the journal."""
        scheduler, last = self.scheduler, self.stats()
        while True:
            await asyncio.sleep(self.settings.stats_interval)
            now = self.stats()
            if now != last or scheduler.in_flight or scheduler.waiting:
                log.info("engine: %d attempted, %d recorded (+%d), %d in flight, %d queued, "
                         "%d lease lost, %d write failures", now["attempted"], now["recorded"],
                         now["recorded"] - last["recorded"], scheduler.in_flight,
                         scheduler.waiting, now["lease_lost"], now["write_failures"])
            last = now


def _log_health(changes: Sequence[HealthChange]) -> None:
    """Circuit and endpoint state changes, for the journal: trouble at ERROR."""
    for change in changes:
        if change.event is HealthEvent.CLOSED:
            health_log.info("circuit closed endpoint=%s: a probe succeeded", change.endpoint_id)
        elif change.event is HealthEvent.OPENED:
            until = change.until.isoformat(timespec="seconds") if change.until else "?"
            health_log.error("circuit open endpoint=%s until=%s: no attempts until then "
                             "(last error: %s)", change.endpoint_id, until, change.reason)
        else:
            health_log.error("endpoint disabled endpoint=%s: %s", change.endpoint_id,
                             change.reason)
