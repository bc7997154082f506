"""Alembic, driven from code: `webhooks db upgrade` and the tests call this."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from worker.db.rows import UNAVAILABLE

# How long the start-up check waits for the database to answer.
CHECK_TIMEOUT = 10.0

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema at `database_url` to `revision`. Synchronous; not inside a loop."""
    command.upgrade(alembic_config(database_url), revision)



def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


class SchemaProblem(Exception):
    """The database answers but is not at the schema this code needs."""


def _revision(conn: Connection) -> str | None:
    if "alembic_version" not in inspect(conn).get_table_names():
        return None
    row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
    return None if row is None else str(row[0])


def check_schema(database_url: str) -> None:
    """Raise SchemaProblem (one line, with the fix) unless the schema is at head; OSError-like
    errors (UNAVAILABLE) pass through when the database does not answer."""

    async def read() -> str | None:
        engine = create_async_engine(database_url)
        try:
            async with asyncio.timeout(CHECK_TIMEOUT), engine.connect() as conn:
                return await conn.run_sync(_revision)
        finally:
            await engine.dispose()

    safe = make_url(database_url).render_as_string(hide_password=True)
    found = asyncio.run(read())
    head = head_revision()
    if found != head:
        state = "not migrated" if found is None else f"at revision {found}"
        raise SchemaProblem(f"database {safe} is {state}; this worker needs revision {head}: "
                            "run `webhooks db upgrade` with the same DATABASE_URL")


__all__ = ["UNAVAILABLE", "SchemaProblem", "check_schema", "head_revision", "upgrade"]
