"""Every database read and write the worker makes, each one statement or one batch.

This module holds the delivery path (intake, claims, outcomes); endpoint records and the
history (listing, replay, cleanup) live beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, insert, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.core.errors import StoreUnavailable
from worker.core.models import (
    ENDPOINT_ID_MAX,
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    OutcomeKind,
    Refusal,
    Rejection,
    usable_endpoint,
)
from worker.db.endpoint_records import EndpointRecords
from worker.db.history import DeliveryHistory
from worker.db.rows import UNAVAILABLE, utcnow
from worker.db.schema import attempts, deliveries, endpoints


class Store(EndpointRecords, DeliveryHistory):
    """The records of one process, over one AsyncEngine: endpoints, intake, claims, outcomes,
    history."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name

    # -- intake ----------------------------------------------------------------------------

    def _insert_ignoring_duplicates(self) -> Any:
        if self._dialect == "postgresql":
            return postgresql.insert(deliveries).on_conflict_do_nothing()
        if self._dialect == "sqlite":
            return sqlite.insert(deliveries).on_conflict_do_nothing()
        raise StoreUnavailable(f"idempotency keys need PostgreSQL or SQLite, not {self._dialect}")

    async def insert_intake(
        self,
        rows: Sequence[dict[str, Any]],
        rejections: Sequence[tuple[str, Rejection]],
        *,
        lease_until: datetime,
        idempotency_cutoff: datetime,
    ) -> set[str]:
        """Commit new pending deliveries (leased to the caller) and rejections, in one transaction.

        Returns the ids actually inserted. A row is left out when its id exists already (the
        broker redelivered its message) or its (endpoint, idempotency key) was used inside the
        idempotency window.
        """
        now = utcnow()
        base = {"status": DeliveryStatus.PENDING.value, "attempts": 0, "next_attempt_at": now,
                "locked_until": lease_until, "created_at": now, "updated_at": now,
                "last_status_code": None, "last_error": None}
        fresh = [{**base, **row} for row in rows]
        fresh += [
            {**base, "id": row_id, "endpoint_id": r.webhook_id[:ENDPOINT_ID_MAX],
             "event_type": r.event_type, "idempotency_key": None, "payload": r.payload,
             "status": DeliveryStatus.REJECTED.value, "next_attempt_at": None,
             "locked_until": None, "last_error": f"{r.code}: {r.message}"}
            for row_id, r in rejections
        ]
        if not fresh:
            return set()
        keys = sorted({row["idempotency_key"] for row in rows if row["idempotency_key"]})
        try:
            async with self.engine.begin() as conn:
                if keys:
                    # A key older than the window no longer blocks: release it first.
                    await conn.execute(
                        update(deliveries)
                        .where(deliveries.c.idempotency_key.in_(keys),
                               deliveries.c.created_at < idempotency_cutoff)
                        .values(idempotency_key=None)
                    )
                stmt = self._insert_ignoring_duplicates().returning(deliveries.c.id)
                result = await conn.execute(stmt, fresh)
                return {row_id for (row_id,) in result}
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not commit {len(fresh)} deliveries: {exc}") from exc

    # -- claiming due work -----------------------------------------------------------------

    async def claim_due(self, limit: int, lease_seconds: float) -> tuple[list[Delivery], int]:
        """Lease up to `limit` due pending deliveries; returns them and how many were failed
        on the spot because their endpoint is gone or disabled."""
        now = utcnow()
        lease_until = now + timedelta(seconds=lease_seconds)
        due = (
            select(deliveries.c.id)
            .where(
                deliveries.c.status == DeliveryStatus.PENDING.value,
                deliveries.c.next_attempt_at <= now,
                or_(deliveries.c.locked_until.is_(None), deliveries.c.locked_until < now),
            )
            .order_by(deliveries.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(deliveries)
            .where(deliveries.c.id.in_(due.scalar_subquery()))
            .values(locked_until=lease_until)
            .returning(
                deliveries.c.id, deliveries.c.endpoint_id, deliveries.c.payload,
                deliveries.c.attempts, deliveries.c.event_type,
            )
        )
        async with self.engine.begin() as conn:
            claimed = list(await conn.execute(claim))
        if not claimed:
            return [], 0
        eps = await self.endpoints_by_id(row.endpoint_id for row in claimed)
        ready: list[Delivery] = []
        dead: list[tuple[str, str]] = []
        for row in claimed:
            ep = usable_endpoint(row.endpoint_id, eps.get(row.endpoint_id))
            if isinstance(ep, Refusal):
                dead.append((row.id, ep.message))
            else:
                ready.append(
                    Delivery(
                        id=row.id, endpoint_id=ep.id, url=ep.url, secrets=ep.secrets,
                        payload=row.payload, attempts=row.attempts, event_type=row.event_type,
                        lease_until=lease_until.timestamp(),
                    )
                )
        if dead:
            await self._fail_unattemptable(dead)
        return ready, len(dead)

    async def _fail_unattemptable(self, dead: list[tuple[str, str]]) -> None:
        stmt = (
            update(deliveries)
            .where(deliveries.c.id == bindparam("b_id"))
            .values(status=DeliveryStatus.FAILED.value, locked_until=None, next_attempt_at=None,
                    last_error=bindparam("b_error"), updated_at=utcnow())
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt, [{"b_id": i, "b_error": e} for i, e in dead])

    # -- outcomes --------------------------------------------------------------------------

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """Write attempts and the deliveries' new state in one transaction."""
        if not records:
            return
        now = utcnow()
        attempt_rows = [_attempt_row(r) for r in records]
        delivery_rows = [_delivery_move(r) for r in records]
        # Only a pending row with no newer attempt moves: a late writer whose lease expired
        # cannot undo another worker's record. The status test is written so no index can
        # serve it: with stale statistics the planner otherwise picked the status index over
        # the primary key and every row's UPDATE walked all pending rows (quadratic).
        move = (
            update(deliveries)
            .where(and_(deliveries.c.id == bindparam("b_id"),
                        deliveries.c.attempts == bindparam("b_prev"),
                        (deliveries.c.status == DeliveryStatus.PENDING.value).is_(true())))
            .values(
                status=bindparam("b_status"), attempts=bindparam("b_attempts"),
                next_attempt_at=bindparam("b_next"), locked_until=None,
                last_status_code=bindparam("b_code"), last_error=bindparam("b_error"),
                updated_at=now,
            )
        )
        gone = sorted({r.delivery.endpoint_id for r in records
                       if r.outcome.kind is OutcomeKind.DISABLE})
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(attempts), attempt_rows)
                await conn.execute(move, delivery_rows)
                if gone:
                    await conn.execute(
                        update(endpoints)
                        .where(endpoints.c.id.in_(gone))
                        .values(enabled=False, updated_at=now,
                                disabled_reason="receiver answered 410 Gone at "
                                + now.isoformat(timespec="seconds"))
                    )
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not record {len(records)} attempts: {exc}") from exc

    async def release(self, ids: Sequence[str], due_at: datetime) -> None:
        """Give leased pending deliveries back to the database, due again at `due_at`."""
        if not ids:
            return
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id.in_(list(ids)),
                           deliveries.c.status == DeliveryStatus.PENDING.value)
                    .values(locked_until=None, next_attempt_at=due_at, updated_at=utcnow())
                )
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not release {len(ids)} deliveries: {exc}") from exc


def _attempt_row(r: AttemptRecord) -> dict[str, Any]:
    return {
        "delivery_id": r.delivery.id,
        "attempt_number": r.attempt_number,
        "attempted_at": r.attempted_at,
        "duration_ms": r.result.duration_ms,
        "status_code": r.result.status_code,
        "outcome": r.outcome.kind.value,
        "error_kind": r.outcome.error_kind.value if r.outcome.error_kind else None,
        "error": r.outcome.error,
        "response_excerpt": r.result.response_excerpt,
    }


def _delivery_move(r: AttemptRecord) -> dict[str, Any]:
    """Bind parameters of the guarded UPDATE that moves a delivery to its next state."""
    return {
        "b_id": r.delivery.id,
        "b_status": r.next_status.value,
        "b_attempts": r.attempt_number,
        "b_prev": r.attempt_number - 1,
        "b_next": r.next_attempt_at,
        "b_code": r.result.status_code,
        "b_error": r.outcome.error,
    }
