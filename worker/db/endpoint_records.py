"""Endpoint records: add, look up, change, enable or disable, rotate secrets, re-seal."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.core.credentials import (
    Credentials,
    fresh,
    open_credentials,
    rotated,
    seal_credentials,
)
from worker.core.errors import EndpointNotFound, InvalidEndpoint, SealError, StoreUnavailable
from worker.core.models import DeliveryStatus, Endpoint, Ordering
from worker.core.sealing import KeyRing, sealed_key_id
from worker.core.signing import parse_signing_keys
from worker.db.fifo import UNFINISHED
from worker.db.rows import UNAVAILABLE, endpoint_from_row, utcnow
from worker.db.schema import deliveries, endpoints

# Columns `update_endpoint` may change directly (credentials go through their own methods).
UPDATABLE = frozenset({"url", "event_types", "description", "verify_tls", "max_in_flight",
                       "rate_limit", "rate_burst", "ordering"})
# Rows re-sealed per transaction by `reseal`.
RESEAL_CHUNK = 500
# Tries of a credentials change that finds the row changed under it.
CHANGE_TRIES = 5


def _not_found(endpoint_id: str) -> EndpointNotFound:
    return EndpointNotFound(f"no endpoint with id {endpoint_id!r}")


class EndpointRecords:
    engine: AsyncEngine
    keys: KeyRing

    # -- reading ---------------------------------------------------------------------------

    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        found = await self.endpoints_by_id([endpoint_id])
        if endpoint_id not in found:
            raise _not_found(endpoint_id)
        return found[endpoint_id]

    async def endpoints_by_id(self, ids: Iterable[str]) -> dict[str, Endpoint]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        try:
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(endpoints).where(endpoints.c.id.in_(wanted)))
                return {row.id: endpoint_from_row(row, self.keys) for row in rows}
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not read endpoints: {exc}") from exc

    async def list_endpoints(self) -> list[Endpoint]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(endpoints).order_by(endpoints.c.created_at))
            return [endpoint_from_row(row, self.keys) for row in rows]

    async def subscribed_endpoints(self, event_type: str) -> list[Endpoint]:
        """Enabled endpoints that take `event_type`.

        Filtered here rather than in SQL: JSON list operators differ by dialect.
        """
        try:
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(endpoints).where(endpoints.c.enabled.is_(True)))
                found = [endpoint_from_row(row, self.keys) for row in rows]
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"could not read endpoints: {exc}") from exc
        return [ep for ep in found if ep.subscribes_to(event_type)]

    # -- writing ---------------------------------------------------------------------------

    async def add_endpoint(self, endpoint: Endpoint) -> Endpoint:
        if not endpoint.secrets:
            raise InvalidEndpoint("an endpoint needs at least one signing secret")
        parse_signing_keys(endpoint.secrets)
        now = utcnow()
        p = endpoint.policy
        row = {
            "id": endpoint.id,
            "url": endpoint.url,
            "credentials": seal_credentials(self.keys, endpoint.id,
                                            fresh(endpoint.secrets, p.headers)),
            "event_types": list(endpoint.event_types),
            "enabled": endpoint.enabled,
            "disabled_reason": endpoint.disabled_reason,
            "description": endpoint.description,
            "created_at": now,
            "updated_at": now,
            "verify_tls": p.verify_tls,
            "max_in_flight": p.max_in_flight,
            "rate_limit": p.rate_limit,
            "rate_burst": p.rate_burst if p.rate_limit is not None else None,
            "failure_streak": 0,
            "ordering": endpoint.ordering.value,
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(endpoints), [row])
        except IntegrityError as exc:
            raise InvalidEndpoint(f"an endpoint with id {endpoint.id!r} exists already") from exc
        return await self.get_endpoint(endpoint.id)

    async def update_endpoint(self, endpoint_id: str, **changes: Any) -> Endpoint:
        """Change plain settings (see UPDATABLE); returns the endpoint as it now is."""
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise InvalidEndpoint(f"cannot change {', '.join(sorted(unknown))} this way")
        if "ordering" in changes:
            changes["ordering"] = Ordering(changes["ordering"]).value
        if changes:
            await self._update(endpoint_id, **changes)
        if changes.get("ordering") == Ordering.NONE.value:
            # Unordered from now on: what was queued goes as it is due, nothing waits.
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(deliveries)
                    .where(deliveries.c.endpoint_id == endpoint_id,
                           deliveries.c.ordering_key.is_not(None),
                           deliveries.c.status.in_(UNFINISHED))
                    .values(ordering_key=None, fifo_seq=None))
        return await self.get_endpoint(endpoint_id)

    async def set_headers(self, endpoint_id: str, headers: Iterable[tuple[str, str]]) -> None:
        """Replace the endpoint's static headers (sealed with its secrets)."""
        wanted = tuple(headers)
        await self._change_credentials(
            endpoint_id, lambda creds: Credentials(creds.secrets, creds.secrets_until, wanted))

    async def delete_endpoint(self, endpoint_id: str) -> None:
        """Remove the endpoint; its delivery history stays until retention removes it."""
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(endpoints).where(endpoints.c.id == endpoint_id))
        if result.rowcount == 0:
            raise _not_found(endpoint_id)

    async def set_endpoint_enabled(
        self, endpoint_id: str, enabled: bool, reason: str | None = None
    ) -> int:
        """Enable or disable. Enabling clears the endpoint's health record and makes its held
        deliveries pending again, due now; returns how many were resumed."""
        now = utcnow()
        values: dict[str, Any] = {"enabled": enabled, "updated_at": now,
                                  "disabled_reason": None if enabled else reason}
        if enabled:
            values.update(failure_streak=0, failing_since=None, circuit_open_until=None)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(endpoints).where(endpoints.c.id == endpoint_id).values(**values))
            if result.rowcount == 0:
                raise _not_found(endpoint_id)
            if not enabled:
                return 0
            resumed = await conn.execute(
                update(deliveries)
                .where(deliveries.c.endpoint_id == endpoint_id,
                       deliveries.c.status == DeliveryStatus.HELD.value)
                .values(status=DeliveryStatus.PENDING.value, next_attempt_at=now,
                        locked_until=None, updated_at=now))
            return int(resumed.rowcount)

    async def rotate_secret(self, endpoint_id: str, new_secret: str, *,
                            overlap_seconds: float, now: datetime | None = None) -> Endpoint:
        """Sign with `new_secret` from now on; the previous ones keep signing for
        `overlap_seconds` (0: stop at once), then stop by themselves."""
        parse_signing_keys([new_secret])
        at = now or utcnow()
        until = at + timedelta(seconds=overlap_seconds) if overlap_seconds > 0 else None
        await self._change_credentials(
            endpoint_id, lambda creds: rotated(creds, new_secret, now=at, overlap_until=until))
        return await self.get_endpoint(endpoint_id)

    # -- sealing keys ----------------------------------------------------------------------

    async def key_usage(self) -> dict[str, int]:
        """How many endpoints are sealed under each key id."""
        async with self.engine.connect() as conn:
            tokens = (await conn.execute(select(endpoints.c.credentials))).scalars()
            usage: dict[str, int] = {}
            for token in tokens:
                try:
                    kid = sealed_key_id(token)
                except SealError:
                    kid = "(malformed)"
                usage[kid] = usage.get(kid, 0) + 1
            return usage

    async def reseal(self, chunk: int = RESEAL_CHUNK) -> int:
        """Re-seal every endpoint not sealed under the newest key, reading `chunk` rows at a
        time; each row is swapped only if unchanged since read (else read again), so a
        rotation committed meanwhile is never undone.

        Returns how many rows were re-sealed. Rows that do not open with the ring are left as
        they are and named at the end, in a SealError, after every other row is done.
        """
        newest = self.keys.sealing_key_id
        done = 0
        unopened: list[str] = []
        after = ""
        while True:
            async with self.engine.connect() as conn:
                rows = list(await conn.execute(
                    select(endpoints.c.id, endpoints.c.credentials)
                    .where(endpoints.c.id > after).order_by(endpoints.c.id).limit(chunk)))
            for row in rows:
                try:
                    if sealed_key_id(row.credentials) == newest:
                        continue
                    await self._change_credentials(row.id, lambda creds: creds)
                except EndpointNotFound:
                    continue  # deleted meanwhile
                except SealError as exc:
                    unopened.append(f"{row.id!r} ({exc})")
                    continue
                done += 1
            if len(rows) < chunk:
                break
            after = rows[-1].id
        if unopened:
            raise SealError(f"{done} endpoints re-sealed; {len(unopened)} could not be opened "
                            f"and were left as they are: {'; '.join(unopened[:5])}"
                            + (" …" if len(unopened) > 5 else ""))
        return done

    # -- helpers ---------------------------------------------------------------------------

    async def _change_credentials(self, endpoint_id: str,
                                  change: Callable[[Credentials], Credentials]) -> None:
        """Read, change, re-seal and write back, only if nobody wrote in between (else again):
        two rotations, or a rotation and a re-seal, never undo each other."""
        for _ in range(CHANGE_TRIES):
            async with self.engine.connect() as conn:
                token = (await conn.execute(select(endpoints.c.credentials)
                                            .where(endpoints.c.id == endpoint_id))).scalar()
            if token is None:
                raise _not_found(endpoint_id)
            new = change(open_credentials(self.keys, endpoint_id, token))
            if await self._swap(endpoint_id, token, seal_credentials(self.keys, endpoint_id, new)):
                return
        raise StoreUnavailable(f"endpoint {endpoint_id!r} kept changing under "
                               f"{CHANGE_TRIES} tries; try again")

    async def _swap(self, endpoint_id: str, old: str, new: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(endpoints)
                .where(endpoints.c.id == endpoint_id, endpoints.c.credentials == old)
                .values(credentials=new, updated_at=utcnow()))
        return bool(result.rowcount)

    async def _update(self, endpoint_id: str, **values: Any) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(endpoints).where(endpoints.c.id == endpoint_id)
                .values(**values, updated_at=utcnow()))
        if result.rowcount == 0:
            raise _not_found(endpoint_id)
