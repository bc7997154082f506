"""The waker on a real PostgreSQL: NOTIFY on commit wakes the claim loop; outages heal."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from worker.db.outbox_store import CHANNEL
from worker.delivery.waker import Waker, claim_poll, listen_dsn, waker_for
from worker.settings import Settings


@pytest.fixture
def dsn(pg_database: str) -> str:
    return listen_dsn(make_url(pg_database))


@pytest.fixture
async def producer(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


async def wait_for(check: Callable[[], object]) -> None:
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 - polls state set by other tasks
            await asyncio.sleep(0.01)


async def notify_in(conn: asyncpg.Connection, *, commit: bool) -> None:
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"SELECT pg_notify('{CHANNEL}', '')")
    await (tr.commit() if commit else tr.rollback())


async def test_a_commit_wakes_and_a_rollback_does_not(dsn: str,
                                                      producer: asyncpg.Connection) -> None:
    calls: list[float] = []
    waker = Waker(dsn, lambda: calls.append(time.monotonic()))
    waker.start()
    try:
        await asyncio.wait_for(waker.listening.wait(), 10)
        await wait_for(lambda: len(calls) == 1)  # once on connect, for what came before
        await notify_in(producer, commit=False)
        await notify_in(producer, commit=True)
        t0 = time.monotonic()
        await wait_for(lambda: len(calls) == 2)
        print(f"\nNOTIFY on commit -> on_due: {(calls[1] - t0) * 1000:.1f} ms")
        await asyncio.sleep(0.2)
        assert len(calls) == 2 and waker.stats["notifications"] == 1
    finally:
        await waker.close()


async def test_listening_connection_killed_reconnects_with_one_warning(
        dsn: str, producer: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []
    waker = Waker(dsn, lambda: calls.append(time.monotonic()), min_backoff=0.05)
    caplog.set_level(logging.INFO, logger="webhooks.waker")
    waker.start()
    try:
        await asyncio.wait_for(waker.listening.wait(), 10)
        for _ in range(2):  # two outages, one warning each
            killed = await producer.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                "AND query LIKE 'LISTEN%'")
            assert killed >= 1
            await wait_for(lambda: not waker.listening.is_set())
            await asyncio.wait_for(waker.listening.wait(), 10)
        before = len(calls)
        await notify_in(producer, commit=True)
        await wait_for(lambda: len(calls) > before)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        again = [r for r in caplog.records if "again" in r.getMessage()]
        assert len(warnings) == 2 and len(again) == 2, caplog.text
        assert waker.stats["connects"] == 3
    finally:
        await waker.close()


async def test_unreachable_database_logs_once_and_closes_promptly(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="webhooks.waker")
    waker = Waker("postgresql://postgres@127.0.0.1:9/nothing", lambda: None,
                  min_backoff=0.01, max_backoff=0.05)
    waker.start()
    await asyncio.sleep(0.5)  # several attempts
    t0 = time.monotonic()
    await waker.close()
    assert time.monotonic() - t0 < 1.0
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert not waker.listening.is_set()


def test_waker_only_for_postgresql_with_a_claim_loop() -> None:
    pg = make_url("postgresql+asyncpg://u:pw@h:5433/db")
    assert waker_for(Settings(), pg, lambda: None) is not None
    assert waker_for(Settings(claim_interval=0), pg, lambda: None) is None
    assert waker_for(Settings(), make_url("sqlite+aiosqlite:///x.db"), lambda: None) is None
    assert listen_dsn(pg) == "postgresql://u:pw@h:5433/db"
    tuned = make_url("postgresql+asyncpg://u@h/db?prepared_statement_cache_size=0&sslmode=require")
    assert listen_dsn(tuned) == "postgresql://u@h/db?sslmode=require"


def test_claim_poll_is_short_on_sqlite_only() -> None:
    s = Settings(claim_interval=2.0, outbox_poll=0.25)
    assert claim_poll(s, "sqlite") == 0.25
    assert claim_poll(s, "postgresql") == 2.0
    assert claim_poll(Settings(claim_interval=0), "sqlite") == 0  # beat's sweep only
    assert claim_poll(Settings(outbox_poll=0), "sqlite") == 2.0
