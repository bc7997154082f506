"""Places in FIFO queues: each new row of a FIFO endpoint gets the next `fifo_seq` of its
(endpoint, ordering key) queue, in the transaction that inserts it.

On PostgreSQL the queues are locked first (transaction-level advisory locks, taken in one
sorted order), so two producers filling one queue number their rows in commit order and a
row never appears behind one that was already sent. SQLite has one writer at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    bindparam,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import TextClause

from worker.core.models import DeliveryStatus
from worker.db.schema import deliveries

Queue = tuple[str, str]  # (endpoint id, ordering key)
# Statuses of a delivery still to be sent: in a FIFO queue, each blocks those behind it.
UNFINISHED = (DeliveryStatus.PENDING.value, DeliveryStatus.HELD.value)

_LOCK_QUEUES = text(
    "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(q, 0) AS h "
    "FROM unnest(CAST(:queues AS text[])) AS q ORDER BY h) AS locks"
)


def at_queue_head() -> ColumnElement[bool]:
    """True for a delivery that may go now as far as ordering goes: unordered, or nothing
    before it in its FIFO queue is still to be sent (pending, retrying or held)."""
    ahead = deliveries.alias("ahead")
    return or_(deliveries.c.fifo_seq.is_(None), ~exists().where(
        ahead.c.endpoint_id == deliveries.c.endpoint_id,
        ahead.c.ordering_key == deliveries.c.ordering_key,
        ahead.c.fifo_seq < deliveries.c.fifo_seq,
        ahead.c.status.in_(UNFINISHED)))


def fifo_queues(rows: Sequence[Mapping[str, Any]]) -> list[Queue]:
    """The queues `rows` join, sorted; rows without an ordering key join none."""
    return sorted({(row["endpoint_id"], row["ordering_key"]) for row in rows
                   if row.get("ordering_key") is not None})


def lock_queues(queues: Sequence[Queue]) -> TextClause:
    """One statement locking every queue until the transaction ends (PostgreSQL)."""
    names = [f"{endpoint_id}\x1f{key}" for endpoint_id, key in queues]
    return _LOCK_QUEUES.bindparams(bindparam("queues", names))


def last_places(queues: Sequence[Queue]) -> Select[Any]:
    """(endpoint id, ordering key, highest fifo_seq still to be sent) of each queue.

    Only unsent rows count: order matters among them alone, and the index then answers
    without reading the queue's history. A drained queue starts again at 1.
    """
    return (select(deliveries.c.endpoint_id, deliveries.c.ordering_key,
                   func.max(deliveries.c.fifo_seq, type_=BigInteger))
            .where(tuple_(deliveries.c.endpoint_id, deliveries.c.ordering_key).in_(queues),
                   deliveries.c.status.in_(UNFINISHED))
            .group_by(deliveries.c.endpoint_id, deliveries.c.ordering_key))


def assign_places(rows: Sequence[dict[str, Any]], last: Mapping[Queue, int]) -> None:
    """Number each queued row after its queue's last place, in the order of `rows`."""
    taken = dict(last)
    for row in rows:
        key = row.get("ordering_key")
        if key is None:
            continue
        queue = (row["endpoint_id"], key)
        row["fifo_seq"] = taken[queue] = taken.get(queue, 0) + 1


async def number_fifo_rows(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Give the queued rows among `rows` their places; call just before inserting them."""
    queues = fifo_queues(rows)
    if not queues:
        return
    if conn.dialect.name == "postgresql":
        await conn.execute(lock_queues(queues))
    found = await conn.execute(last_places(queues))
    assign_places(rows, {(e, k): seq for e, k, seq in found if seq is not None})


def number_fifo_rows_sync(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """`number_fifo_rows` on a synchronous connection."""
    queues = fifo_queues(rows)
    if not queues:
        return
    if conn.dialect.name == "postgresql":
        conn.execute(lock_queues(queues))
    found = conn.execute(last_places(queues))
    assign_places(rows, {(e, k): seq for e, k, seq in found if seq is not None})


async def requeue(conn: AsyncConnection, rows: Sequence[Any]) -> None:
    """Move replayed or resent deliveries to the back of their FIFO queues, in their old
    order; `rows` carry id, endpoint_id, ordering_key and fifo_seq. Others are left alone."""
    queued = [{"id": r.id, "endpoint_id": r.endpoint_id, "ordering_key": r.ordering_key}
              for r in sorted((r for r in rows if r.ordering_key is not None),
                              key=lambda r: (r.fifo_seq or 0, r.id))]
    if not queued:
        return
    await number_fifo_rows(conn, queued)
    await conn.execute(
        update(deliveries).where(deliveries.c.id == bindparam("b_id"))
        .values(fifo_seq=bindparam("b_seq")),
        [{"b_id": row["id"], "b_seq": row["fifo_seq"]} for row in queued])
