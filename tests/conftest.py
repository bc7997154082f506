"""Shared fixtures: real PostgreSQL and SQLite databases, a real Redis for the broker."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

# The producer side of the tests imports the Celery app, which reads its settings once:
# point it at a Redis database of its own before anything imports it.
TEST_REDIS_DB = int(os.environ.get("WEBHOOKS_TEST_REDIS_DB", "15"))
TEST_BROKER_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"
os.environ["CELERY_BROKER_URL"] = TEST_BROKER_URL
os.environ.setdefault("WEBHOOKS_LOG_LEVEL", "WARNING")
# Endpoint secrets are sealed; the tests (and the workers and CLIs they start) share one key.
TEST_SECRET_KEYS = os.environ.setdefault("WEBHOOKS_SECRET_KEYS", "test:" + "A" * 43 + "=")
PG_ADMIN_URL = os.environ.get("WEBHOOKS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

BACKENDS = ("sqlite", "postgresql")


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database for this test session, migrated; dropped at the end."""
    from worker.db.migrate import upgrade

    name = f"webhooks_test_{uuid.uuid4().hex[:10]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _truncate_pg(url: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url.replace("+asyncpg", ""), timeout=10)
        try:
            await conn.execute("TRUNCATE attempts, deliveries, endpoints RESTART IDENTITY")
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: a fresh SQLite file, or the session's PostgreSQL emptied."""
    if request.param == "sqlite":
        from worker.db.migrate import upgrade

        url = f"sqlite+aiosqlite:///{tmp_path / 'webhooks.db'}"
        upgrade(url)
        return url
    url: str = request.getfixturevalue("pg_database")
    _truncate_pg(url)
    return url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[object]:
    """A Store over `database_url`, on the test's own event loop."""
    from worker.db.connection import create_engine
    from worker.db.store import open_store
    from worker.settings import Settings

    settings = Settings(database_url=database_url)
    engine = create_engine(settings)
    try:
        yield open_store(engine, settings)
    finally:
        await engine.dispose()


@pytest.fixture
def redis_clean() -> Iterator[None]:
    """The test Redis database, empty before and after."""
    import redis

    client = redis.Redis.from_url(TEST_BROKER_URL)
    client.flushdb()
    yield
    client.flushdb()
    client.close()
