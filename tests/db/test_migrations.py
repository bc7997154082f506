"""The Alembic migrations on fresh SQLite and PostgreSQL databases, and their fit to schema.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import PG_ADMIN_URL, _pg_admin
from worker.db.migrate import alembic_config, head_revision, upgrade
from worker.db.schema import metadata

TABLES = {"endpoints", "deliveries", "attempts"}


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database that has never been migrated."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    name = f"webhooks_migr_{uuid.uuid4().hex[:10]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _snapshot(conn: Connection) -> dict[str, Any]:
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    snap: dict[str, Any] = {"tables": tables, "columns": {}, "indexes": {}, "pk": {}}
    for table in sorted(tables & TABLES):
        snap["columns"][table] = {c["name"]: bool(c["nullable"]) for c in insp.get_columns(table)}
        snap["indexes"][table] = {
            ix["name"]: (tuple(ix["column_names"]), bool(ix["unique"]))
            for ix in insp.get_indexes(table)
        }
        snap["pk"][table] = tuple(insp.get_pk_constraint(table)["constrained_columns"])
    snap["version"] = (
        conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
        if "alembic_version" in tables else None
    )
    return snap


def _inspect(url: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(_snapshot)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _sql(url: str, statement: str, **params: Any) -> list[Any]:
    async def run() -> list[Any]:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _expected() -> dict[str, Any]:
    """What schema.metadata says the migrated tables look like."""
    exp: dict[str, Any] = {"columns": {}, "indexes": {}, "pk": {}}
    for table in metadata.sorted_tables:
        exp["columns"][table.name] = {c.name: bool(c.nullable) for c in table.columns}
        exp["indexes"][table.name] = {
            ix.name: (tuple(c.name for c in ix.columns), bool(ix.unique)) for ix in table.indexes
        }
        exp["pk"][table.name] = tuple(c.name for c in table.primary_key.columns)
    return exp


def test_metadata_names_the_expected_tables_and_indexes() -> None:
    exp = _expected()
    assert set(exp["columns"]) == TABLES
    assert set(exp["indexes"]["deliveries"]) == {
        "ix_deliveries_due", "ix_deliveries_created_at", "ix_deliveries_endpoint",
        "uq_deliveries_idempotency", "ix_deliveries_task", "ix_deliveries_fifo",
        "ix_deliveries_status_created", "ix_deliveries_event_type",
    }
    assert exp["indexes"]["deliveries"]["ix_deliveries_created_at"] == (
        ("created_at", "id"), False)
    assert exp["indexes"]["deliveries"]["uq_deliveries_idempotency"] == (
        ("endpoint_id", "idempotency_key"), True)
    assert set(exp["indexes"]["attempts"]) == {"ix_attempts_delivery_id",
                                               "ix_attempts_attempted_at"}


def test_upgrade_head_creates_the_schema(fresh_url: str) -> None:
    assert not _inspect(fresh_url)["tables"] & TABLES
    upgrade(fresh_url)
    snap = _inspect(fresh_url)
    exp = _expected()
    assert snap["tables"] >= TABLES
    assert snap["version"] == head_revision()
    for table in sorted(TABLES):
        # Columns and nullability: schema.py and the migration cannot drift apart.
        assert snap["columns"][table] == exp["columns"][table], table
        assert snap["pk"][table] == exp["pk"][table], table
        # Every index schema.py names exists, on the same columns, as unique or not.
        assert snap["indexes"][table] == exp["indexes"][table], table


def test_upgrade_twice_is_a_no_op(fresh_url: str) -> None:
    upgrade(fresh_url)
    first = _inspect(fresh_url)
    _sql(fresh_url, "INSERT INTO endpoints (id, url, credentials, event_types, enabled, "
                    "created_at, updated_at) VALUES ('ep-1', 'https://x.example/', 'x', '[]', :t,"
                    " :ts, :ts)", t=True, ts=datetime.now(UTC))
    upgrade(fresh_url)
    assert _inspect(fresh_url) == first
    assert [tuple(r) for r in _sql(fresh_url, "SELECT id FROM endpoints")] == [("ep-1",)]


def test_downgrade_base_drops_the_tables(fresh_url: str) -> None:
    upgrade(fresh_url)
    command.downgrade(alembic_config(fresh_url), "base")
    snap = _inspect(fresh_url)
    assert not snap["tables"] & TABLES
    assert snap["version"] is None
    # And back up again from base.
    upgrade(fresh_url)
    snap = _inspect(fresh_url)
    assert snap["tables"] >= TABLES
    assert snap["version"] == head_revision()


def test_alembic_finds_no_difference_to_metadata(fresh_url: str) -> None:
    """Autogenerate's own comparison (tables, columns, nullability, indexes) is empty."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade(fresh_url)

    def diff(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": False})
        return list(compare_metadata(context, metadata))

    async def run() -> list[Any]:
        engine = create_async_engine(fresh_url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(diff)
        finally:
            await engine.dispose()

    assert asyncio.run(run()) == []


def _forms(secret: str) -> list[str]:
    """A secret in every encoding a careless column might hold it in."""
    import base64

    key = base64.b64decode(secret.removeprefix("whsec_"))
    return [secret, secret.removeprefix("whsec_"), key.hex(), base64.urlsafe_b64encode(key)
            .decode().rstrip("="), base64.b32encode(key).decode().rstrip("=")]


def _table_text(url: str) -> str:
    return " ".join(str(v) for row in _sql(url, "SELECT * FROM endpoints") for v in row)


def test_0002_seals_existing_secrets_and_0001_gets_them_back(fresh_url: str) -> None:
    """Plaintext secrets of a 0001 database are sealed by the upgrade, open with the key, and
    leave no trace in the table; a downgrade restores them."""
    from worker.core.credentials import open_credentials
    from worker.core.signing import generate_secret
    from worker.keys import load_keyring
    from worker.settings import Settings

    upgrade(fresh_url, "0001")
    old, new = generate_secret(), generate_secret()
    _sql(fresh_url, "INSERT INTO endpoints (id, url, secrets, event_types, enabled, created_at,"
                    " updated_at) VALUES ('ep-1', 'https://x.example/', :s, '[]', :t, :ts, :ts)",
         s=f'["{new}", "{old}"]', t=True, ts=datetime.now(UTC))
    upgrade(fresh_url)
    text_now = _table_text(fresh_url)
    for secret in (old, new):
        for form in _forms(secret):
            assert form not in text_now
    (token,) = [r[0] for r in _sql(fresh_url, "SELECT credentials FROM endpoints")]
    keys = load_keyring(Settings(database_url=fresh_url))
    assert open_credentials(keys, "ep-1", token).secrets == (new, old)

    command.downgrade(alembic_config(fresh_url), "0001")
    (secrets,) = [r[0] for r in _sql(fresh_url, "SELECT secrets FROM endpoints")]
    assert new in str(secrets) and old in str(secrets)
