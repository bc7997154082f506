"""The UI's reads: each one indexed and bounded (a page, a window, a sample), so a page costs
the database the same at a thousand rows as at millions."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import String, column, func, literal, or_, select, true, tuple_, values
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.core.models import Endpoint, OutcomeKind
from worker.core.sealing import KeyRing
from worker.db.history import delivery_filters
from worker.db.rows import endpoint_from_row, row_dict
from worker.db.schema import UTCDateTime, attempts, deliveries, endpoints
from worker.ui.paging import Cursor, DeliveryFilter
from worker.ui.stats import percentile, ratio

# Per endpoint, health is read from the attempts of its newest this-many deliveries.
HEALTH_DELIVERIES = 100
HEALTH_ATTEMPTS = 500

_LIST_COLUMNS = [deliveries.c[name] for name in (
    "id", "endpoint_id", "event_type", "status", "attempts", "retry_base", "next_attempt_at",
    "last_status_code", "last_error", "created_at", "updated_at")]


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    attempts: int  # in the sample
    success_ratio: float | None
    p50_ms: float | None
    p99_ms: float | None
    last_status: int | None
    last_outcome: str | None
    last_error: str | None
    last_attempt_at: datetime | None


def health_of(rows: list[dict[str, Any]]) -> EndpointHealth:
    """Health from sampled attempts (newest first). Pure."""
    durations = [float(r["duration_ms"]) for r in rows]
    ok = sum(1 for r in rows if r["outcome"] == OutcomeKind.SUCCESS.value)
    last = rows[0] if rows else None
    return EndpointHealth(
        attempts=len(rows), success_ratio=ratio(ok, len(rows)),
        p50_ms=percentile(durations, 50), p99_ms=percentile(durations, 99),
        last_status=last["status_code"] if last else None,
        last_outcome=last["outcome"] if last else None,
        last_error=last["error"] if last else None,
        last_attempt_at=last["attempted_at"] if last else None)


class UiQueries:
    """Read-only queries over the worker's tables."""

    def __init__(self, engine: AsyncEngine, keys: KeyRing) -> None:
        self.engine = engine
        self.keys = keys
        self._dialect = engine.dialect.name

    async def deliveries_page(self, where: DeliveryFilter, after: Cursor | None,
                              limit: int) -> tuple[list[dict[str, Any]], Cursor | None]:
        """Newest first; the rows older than `after`, and the cursor of the next page (None:
        this is the last). One index range scan: (created_at, id) compared as a row value."""
        d = deliveries.c
        query = (select(*_LIST_COLUMNS)
                 .where(*delivery_filters(status=where.status, endpoint_id=where.endpoint_id,
                                          event_type=where.event_type, since=where.since,
                                          until=where.until))
                 .order_by(d.created_at.desc(), d.id.desc()).limit(limit + 1))
        if after is not None:
            query = query.where(tuple_(d.created_at, d.id) < tuple_(
                literal(after.created_at, UTCDateTime()), literal(after.id)))
        async with self.engine.connect() as conn:
            rows = [row_dict(row) for row in await conn.execute(query)]
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = Cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
        return rows, cursor

    async def attempts_per_minute(self, since: datetime) -> list[tuple[datetime, str, int]]:
        """(minute, outcome, count) of attempts made since `since`: an index-only range scan
        of ix_attempts_attempted_at."""
        a = attempts.c
        if self._dialect == "postgresql":
            minute: Any = func.date_trunc("minute", a.attempted_at)
        else:  # SQLite keeps 'YYYY-MM-DD HH:MM:SS.ffffff' (naive UTC)
            minute = func.substr(a.attempted_at, 1, 16)
        query = (select(minute.label("minute"), a.outcome, func.count())
                 .where(a.attempted_at >= since).group_by(minute, a.outcome))
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        found: list[tuple[datetime, str, int]] = []
        for when, outcome, count in rows:
            if isinstance(when, str):
                when = datetime.fromisoformat(when).replace(tzinfo=UTC)
            found.append((when.astimezone(UTC), str(outcome), int(count)))
        return found

    async def endpoint_health(self, endpoint_id: str) -> EndpointHealth:
        """From the attempts of the endpoint's newest HEALTH_DELIVERIES deliveries."""
        d, a = deliveries.c, attempts.c
        recent = (select(d.id).where(d.endpoint_id == endpoint_id)
                  .order_by(d.created_at.desc(), d.id.desc()).limit(HEALTH_DELIVERIES))
        query = (select(a.attempted_at, a.duration_ms, a.status_code, a.outcome, a.error)
                 .where(a.delivery_id.in_(recent.scalar_subquery()))
                 .order_by(a.attempted_at.desc(), a.id.desc()).limit(HEALTH_ATTEMPTS))
        async with self.engine.connect() as conn:
            rows = [row_dict(row) for row in await conn.execute(query)]
        return health_of(rows)

    async def health_of_endpoints(self, ids: list[str]) -> dict[str, EndpointHealth]:
        """`endpoint_health` of each of `ids`: on PostgreSQL in one statement (a LATERAL join
        per endpoint, the same bounded probes), elsewhere one query each."""
        if self._dialect != "postgresql" or not ids:
            found = await asyncio.gather(*(self.endpoint_health(i) for i in ids))
            return dict(zip(ids, found, strict=True))
        d, a = deliveries.c, attempts.c
        wanted = values(column("eid", String), name="wanted").data([(i,) for i in ids])
        # Correlated to the outer row explicitly: left alone, SQLAlchemy would give the
        # innermost subquery its own copy of `wanted` (every endpoint's deliveries at once).
        recent = (select(d.id).where(d.endpoint_id == wanted.c.eid)
                  .order_by(d.created_at.desc(), d.id.desc()).limit(HEALTH_DELIVERIES)
                  .correlate(wanted))
        sample = (select(a.attempted_at, a.duration_ms, a.status_code, a.outcome, a.error,
                         a.id.label("attempt_id"))
                  .where(a.delivery_id.in_(recent.scalar_subquery()))
                  .order_by(a.attempted_at.desc(), a.id.desc()).limit(HEALTH_ATTEMPTS)
                  .lateral("sample"))
        query = select(wanted.c.eid, sample).select_from(wanted.join(sample, true()))
        rows: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        async with self.engine.connect() as conn:
            for row in await conn.execute(query):
                item = row_dict(row)
                rows[item.pop("eid")].append(item)
        for sampled in rows.values():  # newest first, as health_of takes them
            sampled.sort(key=lambda r: (r["attempted_at"], r["attempt_id"]), reverse=True)
        return {i: health_of(sampled) for i, sampled in rows.items()}

    async def endpoints_page(self, after: str | None,
                             limit: int) -> tuple[list[Endpoint], str | None]:
        """Endpoints in id order, from after `after`; and the id to continue from."""
        query = select(endpoints).order_by(endpoints.c.id).limit(limit + 1)
        if after:
            query = query.where(endpoints.c.id > after)
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        found = [endpoint_from_row(row, self.keys) for row in rows[:limit]]
        return found, (found[-1].id if len(rows) > limit else None)

    async def needing_attention(self, now: datetime, limit: int) -> list[Endpoint]:
        """Disabled endpoints, open circuits, failure streaks: worst first."""
        e = endpoints.c
        query = (select(endpoints)
                 .where(or_(e.enabled.is_(False), e.circuit_open_until.is_not(None),
                            e.failure_streak > 0))
                 .order_by(e.enabled, e.failure_streak.desc(), e.id).limit(limit))
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        return [endpoint_from_row(row, self.keys) for row in rows]


def window_start(now: datetime, hours: int) -> datetime:
    """The whole minute `hours` before `now`'s minute ends (the chart's first slot)."""
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return end - timedelta(hours=hours)
