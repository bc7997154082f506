"""The one door into the engine from Celery's threads.

Celery tasks are synchronous. Each process gets one engine thread running one long-lived
event loop; the task shells hand work across with the methods below, whose names say whether
they block (`*_blocking`) or return a future at once (`*_threadsafe`). Everything async
(loop, aiohttp session, database engine) is made on that thread, lazily, after fork.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from worker.core.errors import EngineUnavailable
from worker.core.models import AcceptReport, Incoming
from worker.delivery.engine import Engine
from worker.delivery.loop import new_event_loop, tune_gc
from worker.settings import Settings, get_settings

log = logging.getLogger("webhooks.runtime")
T = TypeVar("T")

# How long a process waits for its engine thread to come up.
START_TIMEOUT = 30.0
# Beyond a call's own timeout, how long the caller waits for the loop to answer at all.
ANSWER_MARGIN = 1.0
# A background sweep may overrun its interval by this much before it counts as stuck.
SWEEP_MARGIN = 30.0
# The most time a background sweep is given (it ends early once nothing more is due).
MAX_SWEEP_SECONDS = 60.0
# The least time a background sweep is given.
MIN_SWEEP_SECONDS = 0.1
# Beyond the shutdown grace, how long stop waits for the engine thread.
STOP_MARGIN = 5.0


class EngineRuntime:
    """The engine of one process: start once, cross threads into it, stop at exit."""

    def __init__(self, settings: Settings,
                 make_engine: Callable[[Settings], Engine] = Engine) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self._make_engine = make_engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._sweep: concurrent.futures.Future[tuple[int, int]] | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        tune_gc(self.settings.gc_threshold)
        self._thread = threading.Thread(target=self._run, name="webhooks-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineUnavailable(f"engine did not start within {timeout:.0f}s")
        if self._startup_error is not None:
            raise EngineUnavailable(f"engine failed to start: {self._startup_error}")

    def _run(self) -> None:
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            log.exception("engine loop ended with an error")
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        engine = self._make_engine(self.settings)
        engine.start()
        self._engine = engine
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await engine.stop()
            # Calls still running get an answer (cancelled) instead of vanishing with the loop.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def stop_blocking(self, timeout: float | None = None) -> None:
        """Drain and stop; waits up to the shutdown grace plus a margin."""
        if self._loop is None or self._stop is None or self._thread is None:
            return
        stop = self._stop
        self._stopping = True
        try:
            self._loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            return  # loop already closed
        self._thread.join(timeout if timeout is not None
                          else self.settings.shutdown_grace + STOP_MARGIN)

    # -- crossing into the loop ------------------------------------------------------------

    def _running(self) -> tuple[Engine, asyncio.AbstractEventLoop]:
        engine, loop = self._engine, self._loop
        if (loop is None or engine is None or self._startup_error is not None
                or self._stopping or loop.is_closed()):
            raise EngineUnavailable("engine is not running")
        return engine, loop

    def submit_threadsafe(
        self, make: Callable[[Engine], Awaitable[T]], timeout: float
    ) -> concurrent.futures.Future[T]:
        """Start `make(engine)` on the engine loop, bounded by `timeout`; returns its future."""
        engine, loop = self._running()

        async def run() -> T:
            try:
                return await asyncio.wait_for(make(engine), timeout)
            except TimeoutError as exc:
                raise EngineUnavailable(f"engine did not finish within {timeout:.0f}s") from exc

        return asyncio.run_coroutine_threadsafe(run(), loop)

    def call_blocking(self, make: Callable[[Engine], Awaitable[T]], timeout: float) -> T:
        """Run `make(engine)` on the engine loop and wait for its result."""
        future = self.submit_threadsafe(make, timeout)
        try:
            return future.result(timeout + ANSWER_MARGIN)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise EngineUnavailable(f"engine did not answer within {timeout:.0f}s") from exc

    # -- what the task shells ask for ------------------------------------------------------

    def gather_threadsafe(self, items: Sequence[Incoming],
                          settle: Callable[[AcceptReport], object]) -> None:
        """Hand one message's events to the gatherer; `settle` runs (on the engine thread)
        once they are durable. Returns at once."""
        engine, loop = self._running()
        loop.call_soon_threadsafe(engine.gatherer.add, items, settle)

    def start_rescuer_threadsafe(self) -> None:
        """Start rescuing messages that dead workers left unacknowledged in the broker."""
        engine, loop = self._running()
        loop.call_soon_threadsafe(engine.start_rescuer)

    def accept_threadsafe(
        self, items: Sequence[Incoming]
    ) -> concurrent.futures.Future[AcceptReport]:
        """Commit events; the future resolves once they are durable."""
        return self.submit_threadsafe(lambda e: e.intake.accept(items),
                                      self.settings.accept_timeout)

    def accept_blocking(self, items: Sequence[Incoming]) -> AcceptReport:
        """Commit events and wait until they are durable."""
        return self.call_blocking(lambda e: e.intake.accept(items), self.settings.accept_timeout)

    def fan_out_blocking(self, message_id: str, event_type: str, data: Any,
                         idempotency_key: str | None) -> AcceptReport:
        """Commit one event for every subscribed endpoint and wait until it is durable."""
        return self.call_blocking(
            lambda e: e.intake.fan_out(message_id, event_type, data, idempotency_key),
            self.settings.accept_timeout)

    def cleanup_blocking(self, cutoff: datetime, timeout: float) -> int:
        """Delete finished deliveries created before `cutoff`; returns how many."""
        return self.call_blocking(
            lambda e: e.store.cleanup(cutoff, self.settings.cleanup_chunk), timeout)

    def start_sweep_threadsafe(self) -> bool:
        """Start a sweep on the engine loop unless one is running; returns whether it started."""
        if self._sweep is not None and not self._sweep.done():
            return False
        seconds = min(max(self.settings.sweep_interval * 0.8, MIN_SWEEP_SECONDS),
                      MAX_SWEEP_SECONDS)
        self._sweep = self.submit_threadsafe(lambda e: e.sweeper.sweep_for(seconds),
                                             seconds + SWEEP_MARGIN)
        self._sweep.add_done_callback(_log_sweep)
        return True


def _log_sweep(future: concurrent.futures.Future[tuple[int, int]]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.warning("retry sweep failed: %s: %s", type(exc).__name__, exc)
        return
    claimed, failed = future.result()
    if claimed or failed:
        log.info("retry sweep claimed %d due deliveries, failed %d for gone endpoints",
                 claimed, failed)


_runtime: EngineRuntime | None = None
_lock = threading.Lock()
# Runtimes inherited through fork: kept, never collected, so no finalizer of the parent's
# loop, sockets or database connections runs in the child.
_inherited: list[EngineRuntime] = []


def get_runtime(settings: Settings | None = None) -> EngineRuntime:
    """This process's runtime, started on first use (and anew in a forked child)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            if _runtime is not None:
                _inherited.append(_runtime)
            runtime = EngineRuntime(settings or get_settings())
            runtime.start()
            _runtime = runtime
        return _runtime


def stop_runtime() -> None:
    """Stop this process's runtime if it was started here; safe to call more than once."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
    if runtime is not None and runtime.pid == os.getpid():
        runtime.stop_blocking()
