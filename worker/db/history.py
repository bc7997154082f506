"""Looking back over deliveries: listing, counting, replaying, and deleting old ones."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.core.models import DeliveryStatus
from worker.db.rows import utcnow
from worker.db.schema import attempts, deliveries


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

    async def replay(
        self, ids: Sequence[str] = (), *, endpoint_id: str | None = None, all_failed: bool = False
    ) -> int:
        """Make failed deliveries pending again, due now, with a fresh retry budget."""
        if not ids and not all_failed:
            return 0
        conditions = [deliveries.c.status == DeliveryStatus.FAILED.value]
        if ids:
            conditions.append(deliveries.c.id.in_(list(ids)))
        if endpoint_id is not None:
            conditions.append(deliveries.c.endpoint_id == endpoint_id)
        now = utcnow()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(deliveries).where(*conditions).values(
                    status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=now,
                    locked_until=None, updated_at=now,
                )
            )
        return int(result.rowcount)

    async def list_deliveries(
        self, *, status: str | None = None, endpoint_id: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest deliveries, optionally of one status and endpoint (payload left out)."""
        columns = [c for c in deliveries.c if c.name not in ("payload", "locked_until")]
        query = select(*columns).order_by(deliveries.c.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(deliveries.c.status == status)
        if endpoint_id is not None:
            query = query.where(deliveries.c.endpoint_id == endpoint_id)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query)
            return [{str(k): v for k, v in row._mapping.items()} for row in rows]

    async def status_counts(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
            )
            return {status: int(count) for status, count in rows}
