"""Looking back over deliveries: listing, showing, counting, replaying, resending, and deleting
old ones. Every method is one statement (or one statement per bounded chunk)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    LargeBinary,
    and_,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.core.ids import new_id
from worker.core.models import DeliveryStatus, OutcomeKind
from worker.db.fifo import requeue
from worker.db.rows import row_dict, utcnow
from worker.db.schema import UTCDateTime, attempts, deliveries

# What `resend` copies: a delivery that was settled one way or the other.
RESENDABLE = (DeliveryStatus.SUCCEEDED.value, DeliveryStatus.FAILED.value)
REPLAY_CHUNK = 1000
# What `fifo.requeue` needs of a replayed or resent row.
QUEUE_PLACE = (deliveries.c.id, deliveries.c.endpoint_id, deliveries.c.ordering_key,
               deliveries.c.fifo_seq)

_a = attempts.alias("a")
# Correlated with the outer `deliveries` row: every attempt recorded for it, across replays.
_attempt_total = (select(func.count()).where(_a.c.delivery_id == deliveries.c.id)
                  .scalar_subquery())
_last_outcome = (select(_a.c.outcome).where(_a.c.delivery_id == deliveries.c.id)
                 .order_by(_a.c.attempted_at.desc(), _a.c.id.desc()).limit(1)
                 .scalar_subquery())
_summary = [
    *(c for c in deliveries.c if c.name not in ("payload", "locked_until")),
    _attempt_total.label("attempts_total"),
    _last_outcome.label("last_outcome"),
]


def delivery_filters(*, status: str | None = None, endpoint_id: str | None = None,
                     event_type: str | None = None, since: datetime | None = None,
                     until: datetime | None = None) -> list[ColumnElement[bool]]:
    """The WHERE terms of a deliveries listing (created in [since, until)); None: any."""
    d = deliveries.c
    terms: list[ColumnElement[bool]] = []
    if status is not None:
        terms.append(d.status == status)
    if endpoint_id is not None:
        terms.append(d.endpoint_id == endpoint_id)
    if event_type is not None:
        terms.append(d.event_type == event_type)
    if since is not None:
        terms.append(d.created_at >= since)
    if until is not None:
        terms.append(d.created_at < until)
    return terms


class DeliveryHistory:
    engine: AsyncEngine

    async def cleanup(self, older_than: datetime, chunk: int, max_chunks: int = 10_000) -> int:
        """Delete finished deliveries (and their attempts) created before `older_than`.

        Chunked, one short transaction per chunk, so no lock is held for long.
        """
        removed = 0
        for _ in range(max_chunks):
            async with self.engine.begin() as conn:
                ids = list(
                    (await conn.execute(
                        select(deliveries.c.id)
                        .where(deliveries.c.created_at < older_than,
                               deliveries.c.status != DeliveryStatus.PENDING.value)
                        .limit(chunk)
                    )).scalars()
                )
                if not ids:
                    break
                await conn.execute(delete(attempts).where(attempts.c.delivery_id.in_(ids)))
                await conn.execute(delete(deliveries).where(deliveries.c.id.in_(ids)))
            removed += len(ids)
            if len(ids) < chunk:
                break
        return removed

    # -- replay and resend -----------------------------------------------------------------

    @staticmethod
    def _replay_values(now: datetime) -> dict[str, Any]:
        # A fresh retry budget, counted from `retry_base` (worker.core.outcome.decide); attempt
        # numbers run on from `attempts`.
        return {"status": DeliveryStatus.PENDING.value, "retry_base": deliveries.c.attempts,
                "next_attempt_at": now, "locked_until": None, "updated_at": now}

    async def replay_ids(self, ids: Sequence[str]) -> list[str]:
        """Make the failed ones of `ids` pending again, due now, with a fresh retry budget.

        Returns the ids replayed; the others were not failed (see `delivery_statuses`).
        """
        if not ids:
            return []
        now = utcnow()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(list(ids)),
                       deliveries.c.status == DeliveryStatus.FAILED.value)
                .values(**self._replay_values(now))
                .returning(*QUEUE_PLACE))
            replayed = list(result)
            await requeue(conn, replayed)
            return [row.id for row in replayed]

    async def replay_failed(
        self, *, endpoint_id: str | None = None, since: datetime | None = None,
        until: datetime | None = None, chunk: int = REPLAY_CHUNK, max_chunks: int = 10_000,
    ) -> int:
        """Replay every failed delivery (of one endpoint, created in [since, until)).

        Oldest first, one UPDATE per chunk of `chunk` rows, each its own short transaction;
        a keyset cursor on (created_at, id) makes sure no delivery is replayed twice by one
        call even when it fails again meanwhile.
        """
        conditions: list[Any] = [deliveries.c.status == DeliveryStatus.FAILED.value]
        if endpoint_id is not None:
            conditions.append(deliveries.c.endpoint_id == endpoint_id)
        if since is not None:
            conditions.append(deliveries.c.created_at >= since)
        if until is not None:
            conditions.append(deliveries.c.created_at < until)
        replayed = 0
        cursor: tuple[datetime, str] | None = None
        for _ in range(max_chunks):
            after = [] if cursor is None else [or_(
                deliveries.c.created_at > cursor[0],
                and_(deliveries.c.created_at == cursor[0], deliveries.c.id > cursor[1]))]
            batch = (select(deliveries.c.id).where(*conditions, *after)
                     .order_by(deliveries.c.created_at, deliveries.c.id).limit(chunk))
            async with self.engine.begin() as conn:
                rows = list(await conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id.in_(batch.scalar_subquery()),
                           deliveries.c.status == DeliveryStatus.FAILED.value)
                    .values(**self._replay_values(utcnow()))
                    .returning(deliveries.c.created_at, *QUEUE_PLACE)))
                await requeue(conn, rows)
            if not rows:
                break
            replayed += len(rows)
            cursor = max((row.created_at, row.id) for row in rows)
            if len(rows) < chunk:
                break
        return replayed

    async def resend(self, delivery_id: str) -> tuple[str, str] | None:
        """Copy a succeeded or failed delivery into a new pending one, due now: same endpoint,
        event type and payload, a new id (so a new `webhook-id`), no idempotency key.

        Returns the new id and its endpoint, or None when `delivery_id` is not succeeded or
        failed.
        """
        copy_id = new_id("msg")
        now = literal(utcnow(), UTCDateTime())
        source = select(
            literal(copy_id), deliveries.c.endpoint_id, deliveries.c.event_type,
            null(), deliveries.c.payload, literal(DeliveryStatus.PENDING.value), literal(0),
            now, now, now, deliveries.c.ordering_key,
        ).where(deliveries.c.id == delivery_id, deliveries.c.status.in_(RESENDABLE))
        columns = ["id", "endpoint_id", "event_type", "idempotency_key", "payload", "status",
                   "attempts", "next_attempt_at", "created_at", "updated_at", "ordering_key"]
        async with self.engine.begin() as conn:
            result = await conn.execute(
                insert(deliveries).from_select(columns, source, include_defaults=False)
                .returning(*QUEUE_PLACE))
            made = result.first()
            if made is not None:
                await requeue(conn, [made])
        return None if made is None else (str(made.id), str(made.endpoint_id))

    async def delivery_statuses(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """(status, endpoint id) of each of `ids` that exists."""
        if not ids:
            return {}
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(deliveries.c.id, deliveries.c.status, deliveries.c.endpoint_id)
                .where(deliveries.c.id.in_(list(ids))))
            return {row.id: (row.status, row.endpoint_id) for row in rows}

    # -- reading ---------------------------------------------------------------------------

    async def list_deliveries(
        self, *, status: str | None = None, endpoint_id: str | None = None,
        event_type: str | None = None, since: datetime | None = None,
        until: datetime | None = None, blocked: bool = False, limit: int = 50,
    ) -> list[dict[str, Any]]:
        """The newest deliveries (created in [since, until)), filtered; payload left out.

        Newest first on (created_at, id), which ix_deliveries_created_at and
        ix_deliveries_endpoint serve. `attempts_total` counts every recorded attempt (across
        replays; `attempts` is the current retry budget's); `last_outcome` is the newest
        attempt's outcome, and `blocked` keeps the deliveries whose newest attempt was refused
        by the network policy.
        """
        query = (select(*_summary)
                 .where(*delivery_filters(status=status, endpoint_id=endpoint_id,
                                          event_type=event_type, since=since, until=until))
                 .order_by(deliveries.c.created_at.desc(), deliveries.c.id.desc())
                 .limit(limit))
        if blocked:
            query = query.where(_last_outcome == OutcomeKind.BLOCKED.value)
        async with self.engine.connect() as conn:
            return [row_dict(row) for row in await conn.execute(query)]

    async def get_delivery(self, delivery_id: str, payload_bytes: int) -> dict[str, Any] | None:
        """One delivery, as `list_deliveries` has it, plus `payload_size` and `payload_head`
        (the payload's first `payload_bytes` bytes); None when there is no such id."""
        query = select(
            *_summary,
            func.length(deliveries.c.payload).label("payload_size"),
            func.substr(deliveries.c.payload, 1, payload_bytes, type_=LargeBinary)
            .label("payload_head"),
        ).where(deliveries.c.id == delivery_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
            return None if row is None else row_dict(row)

    async def task_deliveries(self, task_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The deliveries a Celery task's message became (one for a single event, one per
        event and endpoint for a batch or fan-out, rejected ones too), as `list_deliveries`
        has them, oldest first; served by ix_deliveries_task."""
        query = (select(*_summary).where(deliveries.c.task_id == task_id)
                 .order_by(deliveries.c.created_at, deliveries.c.id).limit(limit))
        async with self.engine.connect() as conn:
            return [row_dict(row) for row in await conn.execute(query)]

    async def delivery_attempts(self, delivery_id: str,
                                limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        """The newest `limit` attempts of a delivery, oldest first, and how many it has.

        Each carries `number`: its place among all the delivery's attempts, which goes on
        across replays (as the stored `attempt_number` does; counted here so two rows of one
        attempt, written by a worker whose lease ran out, still read in order).
        """
        query = (select(*(c for c in attempts.c if c.name != "delivery_id"),
                        func.count().over().label("total"))
                 .where(attempts.c.delivery_id == delivery_id)
                 .order_by(attempts.c.attempted_at.desc(), attempts.c.id.desc())
                 .limit(limit))
        async with self.engine.connect() as conn:
            rows = [row_dict(row) for row in await conn.execute(query)]
        total = int(rows[0]["total"]) if rows else 0
        for place, row in enumerate(rows):
            row["number"] = total - place
            del row["total"]
        return rows[::-1], total

    async def status_counts(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
            )
            return {status: int(count) for status, count in rows}
