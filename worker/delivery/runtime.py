"""One long-lived event loop per worker process, in a thread, holding the engine.

Celery tasks are synchronous; they hand work to this loop and wait only for the commit.
Everything async (loop, aiohttp session, database engine) is made here, lazily, after fork.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from worker.db.engine import create_engine
from worker.db.store import Store
from worker.delivery.dispatcher import Dispatcher
from worker.delivery.intake import Intake
from worker.delivery.sender import Sender
from worker.errors import EngineUnavailable
from worker.settings import Settings, get_settings

log = logging.getLogger("webhooks.runtime")
T = TypeVar("T")


def tune_gc(threshold: int) -> None:
    """Fewer collections in a process that allocates per request but keeps little.

    Start-up objects are frozen out of every collection, and the youngest generation is
    collected after `threshold` allocations instead of 700: measured with the bench, the
    default settings cost about a third of the engine's CPU. 0 leaves Python's defaults.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency outside Windows
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class EngineRuntime:
    """The engine of one process: start once, call coroutines on it, stop at exit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: Store | None = None
        self.dispatcher: Dispatcher | None = None
        self.intake: Intake | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._sweep: concurrent.futures.Future[tuple[int, int]] | None = None

    def start(self, timeout: float = 30.0) -> None:
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
        self.loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            log.exception("engine loop ended with an error")
        finally:
            loop.close()

    async def _main(self) -> None:
        s = self.settings
        self._stop = asyncio.Event()
        db = create_engine(s)
        sender = Sender(s)
        sender.open()
        self.store = Store(db)
        self.dispatcher = Dispatcher(s, sender, self.store)
        self.intake = Intake(s, self.store, self.dispatcher)
        self.dispatcher.start()
        self._ready.set()
        log.info("engine started in pid %d (in-flight bound %d, database %s)",
                 self.pid, s.max_in_flight, db.url.render_as_string(hide_password=True))
        stats = asyncio.create_task(self._log_stats(), name="webhooks-stats")
        try:
            await self._stop.wait()
        finally:
            stats.cancel()
            await self.dispatcher.drain(s.shutdown_grace)
            await sender.close()
            await db.dispose()
            log.info("engine stopped in pid %d: %s", self.pid, self.dispatcher.stats)

    def submit(
        self, make: Callable[[], Awaitable[T]], timeout: float
    ) -> concurrent.futures.Future[T]:
        """Start a coroutine on the engine loop, bounded by `timeout`; returns its future."""
        if self.loop is None or self._startup_error is not None or not self._ready.is_set():
            raise EngineUnavailable("engine is not running")

        async def run() -> T:
            try:
                return await asyncio.wait_for(make(), timeout)
            except TimeoutError as exc:
                raise EngineUnavailable(f"engine did not finish within {timeout:.0f}s") from exc

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def running_intake(self) -> Intake:
        """The engine's intake; EngineUnavailable when the engine is not running."""
        if self.loop is None or self.intake is None:
            raise EngineUnavailable("engine is not running")
        return self.intake

    def sweep_in_background(self) -> bool:
        """Start a sweep on the engine loop unless one is running; returns whether it started."""
        intake = self.running_intake()
        if self._sweep is not None and not self._sweep.done():
            return False
        seconds = max(self.settings.sweep_interval * 0.8, 0.1)
        self._sweep = self.submit(lambda: intake.sweep_for(seconds), seconds + 30.0)
        self._sweep.add_done_callback(_log_sweep)
        return True

    async def _log_stats(self) -> None:
        """One line a minute while there is work, for the journal."""
        assert self.dispatcher is not None
        dispatcher, last = self.dispatcher, dict(self.dispatcher.stats)
        while True:
            await asyncio.sleep(self.settings.stats_interval)
            now = dict(dispatcher.stats)
            if now != last or dispatcher.in_flight or dispatcher.queued:
                log.info("engine: %d attempted, %d recorded (+%d), %d in flight, %d queued, "
                         "%d lease lost, %d write failures", now["attempted"], now["recorded"],
                         now["recorded"] - last["recorded"], dispatcher.in_flight,
                         dispatcher.queued, now["lease_lost"], now["write_failures"])
            last = now

    def call(self, make: Callable[[], Awaitable[T]], timeout: float) -> T:
        """Run a coroutine on the engine loop and wait for its result."""
        future = self.submit(make, timeout)
        try:
            return future.result(timeout + 1.0)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise EngineUnavailable(f"engine did not answer within {timeout:.0f}s") from exc

    def stop(self, timeout: float | None = None) -> None:
        """Drain and stop; waits up to the shutdown grace plus a margin."""
        if self.loop is None or self._stop is None or self._thread is None:
            return
        stop = self._stop
        try:
            self.loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            return  # loop already closed
        self._thread.join(timeout if timeout is not None else self.settings.shutdown_grace + 5)


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


def get_runtime(settings: Settings | None = None) -> EngineRuntime:
    """This process's runtime, started on first use (and anew in a forked child)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
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
        runtime.stop()
