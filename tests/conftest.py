"""Shared fixtures: real PostgreSQL and SQLite databases, a real Redis for the broker.

What the tests touch: a redis-server of their own (started here, on a free port), PostgreSQL
databases named `webhooks_test_*` / `webhooks_migr_*` that they create and drop, and temporary
SQLite files. The fault tests (tests/reliability) start their own Redis and PostgreSQL too.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest


def _own_redis() -> str:
    """A redis-server of this test session's own, on a free port, stopped when it ends.

    The tests empty its databases freely; nobody else's Redis (the shared one on 6379 included)
    is ever flushed. Imported twice (as `conftest` and as `tests.conftest`), it starts once.
    """
    known = os.environ.get("WEBHOOKS_TEST_REDIS_URL")
    if known:
        return known
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="webhooks-test-redis-")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(stop)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"the tests' own redis-server did not start on port {port}")
        time.sleep(0.05)
    url = f"redis://127.0.0.1:{port}"
    os.environ["WEBHOOKS_TEST_REDIS_URL"] = url
    return url


# The producer side of the tests imports the Celery app, which reads its settings once:
# point it at the tests' own Redis before anything imports it.
TEST_REDIS_URL = _own_redis()
TEST_REDIS_DB = 0
TEST_BROKER_URL = f"{TEST_REDIS_URL}/{TEST_REDIS_DB}"
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
