"""Every database read and write the worker makes, each one statement or one batch.

This module holds the delivery path (intake, claims, outcomes); endpoint records and the
history (listing, replay, cleanup) live beside it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, insert, literal, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.core.errors import StoreUnavailable
from worker.core.health import (
    CIRCUIT_WAIT,
    BatchHealth,
    HealthChange,
    HealthEvent,
    HealthPolicy,
    batch_health,
    circuit_opens,
    disable_reason,
    should_disable,
)
from worker.core.models import (
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    Endpoint,
    OutcomeKind,
    Rejection,
)
from worker.core.sealing import KeyRing
from worker.db.endpoint_records import EndpointRecords
from worker.db.fifo import at_queue_head, number_fifo_rows
from worker.db.history import DeliveryHistory
from worker.db.intake_rows import (
    insert_ignoring_duplicates,
    rejection_row,
    release_expired_keys,
    row_defaults,
)
from worker.db.rows import UNAVAILABLE, utcnow
from worker.db.schema import UTCDateTime, attempts, deliveries, endpoints
from worker.settings import Settings


def open_store(engine: AsyncEngine, settings: Settings) -> Store:
    """A Store over `engine` with the key ring and health policy `settings` name."""
    from worker.keys import load_keyring

    health = HealthPolicy(settings.breaker_failures, settings.breaker_cooldown,
                          settings.disable_after,
                          probe_seconds=settings.connect_timeout + settings.request_timeout)
    return Store(engine, load_keyring(settings, database_url=str(engine.url)), health)


class Store(EndpointRecords, DeliveryHistory):
    """The records of one process, over one AsyncEngine: endpoints, intake, claims, outcomes,
    history."""

    def __init__(self, engine: AsyncEngine, keys: KeyRing,
                 health: HealthPolicy | None = None) -> None:
        self.engine = engine
        self.keys = keys
        self.health = health or HealthPolicy()
        self._dialect = engine.dialect.name

    # -- intake ----------------------------------------------------------------------------

    async def insert_intake(
        self,
        rows: Sequence[dict[str, Any]],
        rejections: Sequence[tuple[str, Rejection]],
        *,
        lease: Collection[str] | None = None,
        lease_until: datetime | None = None,
        idempotency_cutoff: datetime,
    ) -> set[str]:
        """Commit new deliveries and rejections, in one transaction.

        `rows` come from `intake_rows.delivery_row` (missing columns take its defaults). The
        ones whose id is in `lease` (every one when `lease` is None, unless the row says
        otherwise) are leased to the caller until `lease_until`. FIFO rows get their places
        in their queues here.
        Returns the ids actually inserted. A row is left out when its id exists already (the
        broker redelivered its message) or its (endpoint, idempotency key) was used inside the
        idempotency window.
        """
        now = utcnow()
        base = {**row_defaults(now), "locked_until": lease_until}
        if lease is None:
            fresh = [{**base, **row} for row in rows]
        else:
            fresh = [{**base, **row, "locked_until": lease_until if row["id"] in lease else None}
                     for row in rows]
        fresh += [rejection_row(row_id, r, now) for row_id, r in rejections]
        if not fresh:
            return set()
        release = release_expired_keys(fresh, idempotency_cutoff)
        try:
            async with self.engine.begin() as conn:
                if release is not None:
                    await conn.execute(release)
                await number_fifo_rows(conn, fresh)
                stmt = insert_ignoring_duplicates(self._dialect).returning(deliveries.c.id)
                result = await conn.execute(stmt, fresh)
                return {row_id for (row_id,) in result}
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not commit {len(fresh)} deliveries: {exc}") from exc

    # -- claiming due work -----------------------------------------------------------------

    async def claim_due(self, limit: int, lease_seconds: float) -> tuple[list[Delivery], int]:
        """Lease up to `limit` due pending deliveries; returns them and how many were failed
        on the spot because their endpoint is gone.

        Deliveries of an endpoint whose circuit is open are not claimed. A disabled endpoint's
        are held. Of a circuit past its cool-down, one worker wins the probe: it gets one
        delivery, and the rest wait for the probe's verdict.
        """
        now = utcnow()
        lease_until = now + timedelta(seconds=lease_seconds)
        open_circuits = select(endpoints.c.id).where(endpoints.c.circuit_open_until > now)
        due = (
            select(deliveries.c.id)
            .where(
                deliveries.c.status == DeliveryStatus.PENDING.value,
                deliveries.c.next_attempt_at <= now,
                or_(deliveries.c.locked_until.is_(None), deliveries.c.locked_until < now),
                deliveries.c.endpoint_id.not_in(open_circuits),
                at_queue_head(),  # FIFO: one at a time per queue, in order
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
                deliveries.c.attempts, deliveries.c.event_type, deliveries.c.next_attempt_at,
                deliveries.c.created_at, deliveries.c.retry_base, deliveries.c.ordering_key,
            )
        )
        async with self.engine.begin() as conn:
            claimed = sorted(await conn.execute(claim), key=lambda row: row.next_attempt_at)
        if not claimed:
            return [], 0
        eps = await self.endpoints_by_id(row.endpoint_id for row in claimed)
        ready: list[Delivery] = []
        dead: list[tuple[str, str]] = []
        held: list[tuple[str, str]] = []
        waiting: dict[str, list[str]] = {}  # endpoint -> deliveries behind its probe
        probed: set[str] = set()  # circuits whose probe was tried in this claim
        for row in claimed:
            ep = eps.get(row.endpoint_id)
            if ep is None:
                dead.append((row.id, f"no endpoint with id {row.endpoint_id!r}"))
                continue
            if not ep.enabled:
                held.append((row.id, f"endpoint disabled: {ep.disabled_reason or 'by operator'}"))
                continue
            if ep.circuit_open_until is not None:
                first = ep.id not in probed
                probed.add(ep.id)
                if not (first and await self._win_probe(ep, now)):
                    waiting.setdefault(ep.id, []).append(row.id)
                    continue
            ready.append(Delivery(
                id=row.id, endpoint_id=ep.id, url=ep.url, secrets=ep.signing_secrets(now),
                payload=row.payload, attempts=row.attempts, event_type=row.event_type,
                retry_base=row.retry_base, lease_until=lease_until.timestamp(),
                policy=ep.policy,
                enqueued_at=row.created_at.timestamp(), ordering_key=row.ordering_key,
            ))
        await self._set_aside(dead, held, waiting, now)
        return ready, len(dead)

    async def next_due(self, after: datetime) -> datetime | None:
        """When the next pending delivery falls due after `after` (one index lookup)."""
        try:
            async with self.engine.connect() as conn:
                return (await conn.execute(
                    select(deliveries.c.next_attempt_at)
                    .where(deliveries.c.status == DeliveryStatus.PENDING.value,
                           deliveries.c.next_attempt_at > after)
                    .order_by(deliveries.c.next_attempt_at).limit(1))).scalar()
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not read the next due time: {exc}") from exc

    async def oldest_due(self, now: datetime) -> datetime | None:
        """When the longest-waiting due, unleased pending delivery fell due (index lookup)."""
        try:
            async with self.engine.connect() as conn:
                return (await conn.execute(
                    select(deliveries.c.next_attempt_at)
                    .where(deliveries.c.status == DeliveryStatus.PENDING.value,
                           deliveries.c.next_attempt_at <= now,
                           or_(deliveries.c.locked_until.is_(None),
                               deliveries.c.locked_until < now),
                           at_queue_head())  # waiting behind a FIFO head is no backlog
                    .order_by(deliveries.c.next_attempt_at).limit(1))).scalar()
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not read the oldest due time: {exc}") from exc

    async def _win_probe(self, ep: Endpoint, now: datetime) -> bool:
        """Take the one probe of a circuit past its cool-down (compare-and-set on the row)."""
        assert ep.circuit_open_until is not None
        if ep.circuit_open_until > now:
            return False
        # Held at least as long as the probe itself may take, so no second probe goes out
        # while the first is still waiting for its answer.
        until = now + timedelta(seconds=max(self.health.breaker_cooldown,
                                            self.health.probe_seconds))
        async with self.engine.begin() as conn:
            won = await conn.execute(
                update(endpoints)
                .where(endpoints.c.id == ep.id,
                       endpoints.c.circuit_open_until == ep.circuit_open_until)
                .values(circuit_open_until=until))
        return bool(won.rowcount)

    async def _set_aside(self, dead: list[tuple[str, str]], held: list[tuple[str, str]],
                         waiting: dict[str, list[str]], now: datetime) -> None:
        """Fail deliveries of unknown endpoints, hold disabled ones', and let those behind an
        open circuit wait (unleased, no attempt) until it may be probed again."""
        move = (
            update(deliveries)
            .where(deliveries.c.id == bindparam("b_id"))
            .values(status=bindparam("b_status"), locked_until=None,
                    next_attempt_at=bindparam("b_next"), last_error=bindparam("b_error"),
                    updated_at=now)
        )
        rows = [{"b_id": i, "b_status": DeliveryStatus.FAILED.value, "b_next": None,
                 "b_error": e} for i, e in dead]
        rows += [{"b_id": i, "b_status": DeliveryStatus.HELD.value, "b_next": None,
                  "b_error": e} for i, e in held]
        if rows:
            async with self.engine.begin() as conn:
                await conn.execute(move, rows)
        if waiting:
            async with self.engine.begin() as conn:
                circuits = dict(list(await conn.execute(
                    select(endpoints.c.id, endpoints.c.circuit_open_until)
                    .where(endpoints.c.id.in_(list(waiting))))))
                for endpoint_id, ids in waiting.items():
                    until = circuits.get(endpoint_id) or now
                    await conn.execute(
                        update(deliveries).where(deliveries.c.id.in_(ids))
                        .values(locked_until=None, next_attempt_at=max(until, now),
                                last_error=CIRCUIT_WAIT, updated_at=now))

    # -- outcomes --------------------------------------------------------------------------

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> list[HealthChange]:
        """Write attempts, the deliveries' new state and their endpoints' health in one
        transaction. Returns the circuits that opened or closed and the endpoints disabled."""
        if not records:
            return []
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
                changes = await self._update_health(conn, batch_health(records), now)
                if gone:
                    reason = "receiver answered 410 Gone at " + now.isoformat(timespec="seconds")
                    disabled = await conn.execute(
                        update(endpoints)
                        .where(endpoints.c.id.in_(gone), endpoints.c.enabled.is_(True))
                        .values(enabled=False, updated_at=now, disabled_reason=reason)
                        .returning(endpoints.c.id)
                    )
                    changes += [HealthChange(e, HealthEvent.DISABLED, reason=reason)
                                for e in sorted(disabled.scalars())]
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not record {len(records)} attempts: {exc}") from exc
        return changes

    async def _update_health(self, conn: AsyncConnection, health: dict[str, BatchHealth],
                             now: datetime) -> list[HealthChange]:
        """Apply a batch's verdicts to the shared health rows (atomic per row, so workers
        recording at once add up)."""
        changes: list[HealthChange] = []
        if not health:
            return changes
        # Lock every endpoint row this batch touches in one sorted pass first: two workers
        # recording crossing batches then queue behind each other instead of deadlocking.
        # The rows' health as locked: a healthy endpoint's success then costs no write.
        locked = {row.id: row for row in await conn.execute(
            select(endpoints.c.id, endpoints.c.failure_streak, endpoints.c.circuit_open_until)
            .where(endpoints.c.id.in_(sorted(health)))
            .order_by(endpoints.c.id).with_for_update())}
        # A success closes the circuit and clears the streak, even if failures follow it in
        # the same batch (they are counted afresh below).
        unhealthy = [locked[e] for e, h in sorted(health.items())
                     if h.succeeded and e in locked
                     and (locked[e].failure_streak or locked[e].circuit_open_until is not None)]
        if unhealthy:
            await conn.execute(
                update(endpoints)
                .where(endpoints.c.id.in_([row.id for row in unhealthy]))
                .values(failure_streak=0, failing_since=None, circuit_open_until=None))
            closed_ids = [row.id for row in unhealthy if row.circuit_open_until is not None]
            if closed_ids:
                # What the circuit held back may go now; a retry due later of its own (a
                # schedule step, a Retry-After) keeps its time.
                await conn.execute(
                    update(deliveries)
                    .where(deliveries.c.endpoint_id.in_(closed_ids),
                           deliveries.c.status == DeliveryStatus.PENDING.value,
                           deliveries.c.locked_until.is_(None),
                           deliveries.c.last_error == CIRCUIT_WAIT,
                           deliveries.c.next_attempt_at > now)
                    .values(next_attempt_at=now))
            changes += [HealthChange(e, HealthEvent.CLOSED) for e in closed_ids]
        for endpoint_id, h in sorted(health.items()):
            if h.failures:
                changes += await self._add_failures(conn, endpoint_id, h, now)
        return changes

    async def _add_failures(self, conn: AsyncConnection, endpoint_id: str, h: BatchHealth,
                            now: datetime) -> list[HealthChange]:
        policy = self.health
        assert h.first_failure_at is not None
        streak = (literal(h.failures) if h.succeeded
                  else endpoints.c.failure_streak + h.failures)
        first = literal(h.first_failure_at, UTCDateTime())
        # The earliest failure wins, whichever worker's batch is written first.
        since = first if h.succeeded else case(
            (or_(endpoints.c.failing_since.is_(None), endpoints.c.failing_since > first), first),
            else_=endpoints.c.failing_since)
        open_until = now + timedelta(seconds=policy.breaker_cooldown)
        row = (await conn.execute(
            update(endpoints)
            .where(endpoints.c.id == endpoint_id)
            .values(failure_streak=streak, failing_since=since,
                    circuit_open_until=case(
                        (streak >= policy.breaker_failures, open_until),
                        else_=endpoints.c.circuit_open_until))
            .returning(endpoints.c.failure_streak, endpoints.c.failing_since,
                       endpoints.c.enabled))).first()
        if row is None:
            return []  # deleted meanwhile
        changes: list[HealthChange] = []
        before = 0 if h.succeeded else row.failure_streak - h.failures
        if circuit_opens(before, row.failure_streak, policy) or (
                before >= policy.breaker_failures and row.failure_streak > before):
            changes.append(HealthChange(endpoint_id, HealthEvent.OPENED, until=open_until,
                                        reason=h.last_error))
        if row.enabled and should_disable(row.failing_since, now, policy):
            reason = disable_reason(row.failing_since, row.failure_streak, h.last_error)
            await conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                               .values(enabled=False, disabled_reason=reason, updated_at=now))
            changes.append(HealthChange(endpoint_id, HealthEvent.DISABLED, reason=reason))
        return changes

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
        "request_headers": (None if r.result.request_headers is None
                            else dict(r.result.request_headers)),
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
