"""Endpoint records: add, look up, enable or disable, rotate secrets."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.core.errors import EndpointNotFound, InvalidEndpoint, StoreUnavailable
from worker.core.models import Endpoint
from worker.core.signing import secret_key
from worker.db.rows import UNAVAILABLE, endpoint_from_row, utcnow
from worker.db.schema import endpoints


class EndpointRecords:
    engine: AsyncEngine

    # -- endpoints -------------------------------------------------------------------------

    async def add_endpoint(self, endpoint: Endpoint) -> Endpoint:
        if not endpoint.secrets:
            raise InvalidEndpoint("an endpoint needs at least one signing secret")
        for secret in endpoint.secrets:
            secret_key(secret)
        now = utcnow()
        row = {
            "id": endpoint.id,
            "url": endpoint.url,
            "secrets": list(endpoint.secrets),
            "event_types": list(endpoint.event_types),
            "enabled": endpoint.enabled,
            "disabled_reason": endpoint.disabled_reason,
            "description": endpoint.description,
            "created_at": now,
            "updated_at": now,
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(endpoints), [row])
        except IntegrityError as exc:
            raise InvalidEndpoint(f"an endpoint with id {endpoint.id!r} exists already") from exc
        return await self.get_endpoint(endpoint.id)

    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        found = await self.endpoints_by_id([endpoint_id])
        if endpoint_id not in found:
            raise EndpointNotFound(f"no endpoint with id {endpoint_id!r}")
        return found[endpoint_id]

    async def endpoints_by_id(self, ids: Iterable[str]) -> dict[str, Endpoint]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        try:
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(endpoints).where(endpoints.c.id.in_(wanted)))
                return {row.id: endpoint_from_row(row) for row in rows}
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not read endpoints: {exc}") from exc

    async def list_endpoints(self) -> list[Endpoint]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(endpoints).order_by(endpoints.c.created_at))
            return [endpoint_from_row(row) for row in rows]

    async def subscribed_endpoints(self, event_type: str) -> list[Endpoint]:
        """Enabled endpoints that take `event_type`.

        Filtered here rather than in SQL: JSON list operators differ by dialect.
        """
        try:
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(endpoints).where(endpoints.c.enabled.is_(True)))
                return [ep for ep in map(endpoint_from_row, rows) if ep.subscribes_to(event_type)]
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not read endpoints: {exc}") from exc

    async def set_endpoint_enabled(
        self, endpoint_id: str, enabled: bool, reason: str | None = None
    ) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(endpoints)
                .where(endpoints.c.id == endpoint_id)
                .values(enabled=enabled, disabled_reason=None if enabled else reason,
                        updated_at=utcnow())
            )
        if result.rowcount == 0:
            raise EndpointNotFound(f"no endpoint with id {endpoint_id!r}")

    async def rotate_secret(self, endpoint_id: str, new_secret: str, keep_previous: bool) -> None:
        secret_key(new_secret)
        current = await self.get_endpoint(endpoint_id)
        secrets = [new_secret, *current.secrets[:1]] if keep_previous else [new_secret]
        async with self.engine.begin() as conn:
            await conn.execute(
                update(endpoints)
                .where(endpoints.c.id == endpoint_id)
                .values(secrets=secrets, updated_at=utcnow())
            )

