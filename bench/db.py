"""The bench's database: create it fresh, register endpoints, read the ledger back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bench.procs import child_env

WARMUP_ENDPOINT = "bench-warmup"


def describe(url: str) -> str:
    """Short name of the backend for the table (``sqlite``/``postgresql``)."""
    return make_url(url).get_backend_name()


def sync_url(url: str) -> str:
    """The same database through a synchronous driver, as an outbox producer uses it."""
    u = make_url(url)
    driver = "postgresql+psycopg" if u.get_backend_name() == "postgresql" else "sqlite"
    return u.set(drivername=driver).render_as_string(hide_password=False)


def check_disposable(url: str) -> None:
    """Refuse to wipe a database that is not obviously the bench's own."""
    u = make_url(url)
    name = u.database or ""
    if "bench" not in Path(name).name:
        raise SystemExit(
            f"refusing to reset database {name!r}: the bench recreates its database, "
            "so its name must contain 'bench' (e.g. webhooks_bench or /tmp/webhooks_bench.db)"
        )


async def _recreate_pg(url: str) -> None:
    import asyncpg

    u = make_url(url)
    admin = await asyncpg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password,
        database="postgres",
    )
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{u.database}"')
    finally:
        await admin.close()


def recreate(url: str) -> None:
    """Drop and create the database (PostgreSQL) or delete the file (SQLite)."""
    check_disposable(url)
    backend = describe(url)
    if backend == "postgresql":
        asyncio.run(_recreate_pg(url))
    elif backend == "sqlite":
        db = make_url(url).database
        if db:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(db + suffix).unlink(missing_ok=True)
    else:
        raise SystemExit(f"unsupported database backend: {backend}")


SETUP_SCRIPT = """
import json, sys
from worker.cli import main
steps = json.loads(sys.argv[1])
for argv in steps:
    code = main(argv)
    if code:
        sys.exit(f"webhooks {' '.join(argv)} exited with {code}")
"""


def setup(url: str, endpoints: Sequence[tuple[str, str]], secret: str) -> None:
    """``webhooks db upgrade`` then ``webhooks endpoints add`` for each (id, url).

    The CLI's ``main`` is called in one child process (one import instead of one per step).
    """
    env = child_env({"DATABASE_URL": url, "WEBHOOKS_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128"})
    steps = [["db", "upgrade"]] + [
        ["endpoints", "add", "--url", ep_url, "--id", ep_id, "--secret", secret, "--json"]
        for ep_id, ep_url in endpoints
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SETUP_SCRIPT, json.dumps(steps)],
        env=env, capture_output=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"database setup failed: {proc.stderr.decode()[-2000:]}")


async def _execute(url: str, sql: str, params: dict[str, object] | None = None) -> list[tuple]:  # type: ignore[type-arg]
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(sql), params or {})
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        await engine.dispose()


def clear(url: str) -> None:
    """Delete every delivery and attempt (between modes; endpoints stay)."""

    async def go() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("DELETE FROM attempts"))
                await conn.execute(text("DELETE FROM deliveries"))
        finally:
            await engine.dispose()

    asyncio.run(go())


def status_counts(url: str) -> dict[str, int]:
    """Deliveries of measured events by status (warm-up endpoint excluded)."""
    rows = asyncio.run(
        _execute(
            url,
            "SELECT status, count(*) FROM deliveries WHERE endpoint_id != :w GROUP BY status",
            {"w": WARMUP_ENDPOINT},
        )
    )
    return {str(s): int(n) for s, n in rows}


def succeeded_ids(url: str) -> set[str]:
    """Ids of succeeded measured deliveries."""
    rows = asyncio.run(
        _execute(
            url,
            "SELECT id FROM deliveries WHERE status = 'succeeded' AND endpoint_id != :w",
            {"w": WARMUP_ENDPOINT},
        )
    )
    return {str(r[0]) for r in rows}
