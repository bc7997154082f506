"""The outbox's reads and writes, on the producer's own connection and inside its transaction.

Synchronous on purpose: the async API runs the same code through
`AsyncConnection.run_sync`, so one implementation serves `Session`, `Connection`,
`AsyncSession` and `AsyncConnection`. Nothing here commits or rolls back, and nothing here
can raise a database error that would abort the producer's transaction on PostgreSQL for a
foreseeable case (duplicates are `ON CONFLICT DO NOTHING`; the schema check reads the
catalogue before it touches a table).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, cast, func, inspect, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine

from worker.core.errors import OutboxError
from worker.core.models import Endpoint, Ordering
from worker.db.fifo import number_fifo_rows_sync
from worker.db.intake_rows import insert_ignoring_duplicates, release_expired_keys
from worker.db.schema import deliveries, endpoints

# Each engine's claim loop LISTENs on this channel (worker/delivery/waker.py). PostgreSQL
# delivers a NOTIFY only when its transaction commits, and folds identical ones sent in one
# transaction into one: exactly "wake up, something committed".
CHANNEL = "webhooks_due"
# Dialects the outbox writes to: the worker's own (ON CONFLICT DO NOTHING on both).
DIALECTS = ("postgresql", "sqlite")
# Tables the outbox reads and writes, besides alembic_version.
TABLES = ("endpoints", "deliveries")

# Engines whose database was found at the schema this code needs: checked once per engine.
_checked: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
_checked_lock = threading.Lock()


@lru_cache(maxsize=1)
def _head() -> str:
    from worker.db.migrate import head_revision

    return head_revision()


def schema_problem(dialect: str, tables: Iterable[str], revision: str | None,
                   head: str, where: str) -> str | None:
    """Why a database cannot take outbox deliveries, or None when it can. Pure."""
    fix = f"run `webhooks db upgrade` with DATABASE_URL={where}"
    if dialect not in DIALECTS:
        return (f"the outbox needs the worker's database (PostgreSQL or SQLite), and {where} "
                f"is {dialect}")
    missing = [t for t in TABLES if t not in set(tables)]
    if missing or revision is None:
        what = ", ".join(missing) if missing else "alembic_version"
        return (f"database {where} is not the webhook worker's (no {what} table): the outbox "
                f"writes into the worker's own tables, so the producer's database must be the "
                f"worker's DATABASE_URL, migrated: {fix}")
    if revision != head:
        return (f"database {where} is at schema revision {revision}; this code needs {head}: "
                f"{fix} (and run the same version of webhook-worker in producers and workers)")
    return None


def check_schema(conn: Connection) -> None:
    """Raise OutboxError unless `conn`'s database holds the worker's tables at the head
    revision. Checked once per engine; a failed check is tried again on the next call."""
    engine = conn.engine
    if engine in _checked:
        return
    where = engine.url.render_as_string(hide_password=True)
    dialect = conn.dialect.name
    tables: list[str] = []
    revision: str | None = None
    if dialect in DIALECTS:
        # The catalogue first: selecting from a missing table would abort the producer's
        # transaction on PostgreSQL.
        tables = inspect(conn).get_table_names()
        if "alembic_version" in tables:
            row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
            revision = None if row is None else str(row[0])
    problem = schema_problem(dialect, tables, revision, _head(), where)
    if problem is not None:
        raise OutboxError(problem)
    with _checked_lock:
        _checked[engine] = revision or ""


def forget_checks() -> None:
    """Check every database again on its next use (for tests and after an upgrade)."""
    with _checked_lock:
        _checked.clear()


# The columns the outbox needs: no credentials, so producers need no sealing key.
_ENDPOINT_COLUMNS = (endpoints.c.id, endpoints.c.url, endpoints.c.event_types,
                     endpoints.c.enabled, endpoints.c.disabled_reason,
                     endpoints.c.circuit_open_until, endpoints.c.ordering)


def endpoint_summary(row: Any) -> Endpoint:
    """An `Endpoint` with what intake decides on (enabled, circuit, event types, ordering)
    and no secrets: the row's credentials are never read, so producers need no key."""
    return Endpoint(id=row.id, url=row.url, secrets=(),
                    event_types=tuple(row.event_types or ()), enabled=bool(row.enabled),
                    disabled_reason=row.disabled_reason,
                    circuit_open_until=row.circuit_open_until,
                    ordering=Ordering(row.ordering or Ordering.NONE))


def read_endpoints(conn: Connection, ids: Iterable[str]) -> dict[str, Endpoint]:
    """The endpoints named, by id (one SELECT); unknown ids are absent."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = conn.execute(select(*_ENDPOINT_COLUMNS).where(endpoints.c.id.in_(wanted)))
    return {row.id: endpoint_summary(row) for row in rows}


def read_subscribed(conn: Connection, event_type: str) -> list[Endpoint]:
    """Enabled endpoints that take `event_type`, in id order (filtered here: JSON list
    operators differ by dialect)."""
    rows = conn.execute(select(*_ENDPOINT_COLUMNS).where(endpoints.c.enabled.is_(True))
                        .order_by(endpoints.c.id))
    return [ep for ep in map(endpoint_summary, rows) if ep.subscribes_to(event_type)]


def insert_rows(conn: Connection, rows: Sequence[dict[str, Any]],
                idempotency_cutoff: datetime) -> set[str]:
    """Insert delivery rows, skipping those whose (endpoint, idempotency key) was used inside
    the window; returns the ids inserted. FIFO rows get their places in their queues (under
    the queues' locks, held until the producer's transaction ends). On PostgreSQL, wakes the
    workers on commit."""
    if not rows:
        return set()
    release = release_expired_keys(rows, idempotency_cutoff)
    if release is not None:
        conn.execute(release)  # as .delay()'s intake does
    rows = list(rows)
    number_fifo_rows_sync(conn, rows)
    if conn.dialect.name == "postgresql":
        return {row_id for (row_id, _) in conn.execute(unnest_insert(rows))}
    # SQLite: one statement for the whole batch, sent as multi-row VALUES pages.
    stmt = insert_ignoring_duplicates(conn.dialect.name).returning(deliveries.c.id)
    return {row_id for (row_id,) in conn.execute(stmt, rows)}


def unnest_insert(rows: Sequence[dict[str, Any]]) -> Any:
    """INSERT … SELECT FROM unnest(one array per column) ON CONFLICT DO NOTHING RETURNING id,
    pg_notify(…), for PostgreSQL.

    One statement with a fixed set of parameters, whatever the batch size: a multi-row
    VALUES list has one parameter per cell, and the drivers parse such a statement afresh
    each time (psycopg spent more time on that than on everything else). The wake-up rides
    on the RETURNING: sent only for rows actually inserted, delivered on commit, folded into
    one per transaction, and no extra round trip.
    """
    names = [column.name for column in deliveries.columns]
    arrays = []
    for name in names:
        kind = ARRAY(deliveries.c[name].type)
        arrays.append(cast(bindparam(f"u_{name}", [row.get(name) for row in rows], type_=kind),
                           kind))
    source = func.unnest(*arrays).table_valued(*names).render_derived(name="new_rows")
    return (postgresql.insert(deliveries)
            .from_select(names, select(*(source.c[name] for name in names)))
            .on_conflict_do_nothing()
            .returning(deliveries.c.id, func.pg_notify(CHANNEL, "")))
