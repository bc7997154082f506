"""Wakes the claim loop when a producer commits outbox deliveries.

PostgreSQL: a dedicated asyncpg connection LISTENs on the channel `worker.outbox` NOTIFYs in
the producer's transaction; PostgreSQL delivers it only on commit, so a rolled-back
transaction wakes nobody. Each notification calls `on_due` (the sweeper's `due_at(now)`:
an asyncio.Event, so a burst of notifications costs one claim). The connection is opened
again with backoff when it drops, with one log line per outage; on reconnect `on_due` runs
once, for anything committed while nobody listened. The claim loop's own poll stays as the
safety net. SQLite has no NOTIFY: there the claim loop polls every `WEBHOOKS_OUTBOX_POLL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL

from worker.db.outbox_store import CHANNEL
from worker.settings import Settings

log = logging.getLogger("webhooks.waker")

# Backoff between connection attempts while PostgreSQL is away.
MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# How often a quiet listening connection is checked (a half-open TCP connection never says
# it is gone), and how long the check may take.
KEEPALIVE_SECONDS = 30.0
KEEPALIVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0


def claim_poll(settings: Settings, dialect: str) -> float:
    """The claim loop's longest sleep: `claim_interval`, shortened on SQLite (no NOTIFY) to
    `outbox_poll` so outbox rows from another process go out within it. 0: no claim loop."""
    interval = settings.claim_interval
    if interval > 0 and dialect == "sqlite" and settings.outbox_poll > 0:
        return min(interval, settings.outbox_poll)
    return interval


# Query options of SQLAlchemy's asyncpg dialect that asyncpg.connect itself does not take.
SQLALCHEMY_ONLY_OPTIONS = ("prepared_statement_cache_size", "prepared_statement_name_func",
                           "async_fallback")


def listen_dsn(url: URL) -> str:
    """A libpq-style DSN for asyncpg from the worker's SQLAlchemy URL."""
    plain = url.set(drivername="postgresql").difference_update_query(SQLALCHEMY_ONLY_OPTIONS)
    return plain.render_as_string(hide_password=False)


class Waker:
    """LISTEN on `CHANNEL` over its own connection; call `on_due` on each notification."""

    def __init__(self, dsn: str, on_due: Callable[[], None], *, where: str = "",
                 min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 keepalive: float = KEEPALIVE_SECONDS) -> None:
        self._dsn = dsn
        self._on_due = on_due
        self._where = where or "the database"
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._keepalive = keepalive
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while a connection is listening
        self.stats = {"notifications": 0, "connects": 0}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhooks-waker")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _notified(self, *_args: Any) -> None:
        self.stats["notifications"] += 1
        self._on_due()

    async def _run(self) -> None:
        backoff = self._min_backoff
        outage: str | None = None  # what went wrong, while it lasts
        while True:
            try:
                await self._listen(restored=outage is not None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listening.is_set():  # it was up: this is a new outage
                    self.listening.clear()
                    outage, backoff = None, self._min_backoff
                if outage is None:
                    outage = f"{type(exc).__name__}: {exc}"
                    log.warning("not listening for new deliveries on %s (%s); retrying with "
                                "backoff, claiming every poll interval meanwhile",
                                self._where, outage)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    async def _listen(self, *, restored: bool) -> None:
        """One listening connection, until it is gone (raises then)."""
        import asyncpg

        conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(CHANNEL, self._notified)
            self.stats["connects"] += 1
            self.listening.set()
            if restored:
                log.info("listening for new deliveries again on %s", self._where)
            self._on_due()  # whatever was committed while nobody listened
            await self._hold(conn, lost)
            raise ConnectionError("the listening connection was closed")
        finally:
            if not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)

    async def _hold(self, conn: Any, lost: asyncio.Event) -> None:
        """Return once the connection is gone (closed, or not answering a check)."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self._keepalive)
                return
            await asyncio.wait_for(conn.execute("SELECT 1"), KEEPALIVE_TIMEOUT)


def waker_for(settings: Settings, url: URL, on_due: Callable[[], None]) -> Waker | None:
    """A Waker for a PostgreSQL database with a claim loop; None otherwise."""
    if url.get_backend_name() != "postgresql" or settings.claim_interval <= 0:
        return None
    return Waker(listen_dsn(url), on_due, where=url.render_as_string(hide_password=True))
