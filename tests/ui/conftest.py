"""The UI application on a real database (SQLite and PostgreSQL, from tests/conftest.py),
served by aiohttp's test server on the test's loop, and rows to look at."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import insert

from worker.core.models import Endpoint, EndpointPolicy
from worker.core.signing import generate_secret
from worker.db.schema import attempts, deliveries
from worker.db.store import Store
from worker.settings import Settings
from worker.ui.app import make_app
from worker.ui.portal import portal_keys

TOKEN = "test-ui-token-" + "x" * 20
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Ui:
    client: TestClient[Any, Any]
    store: Store
    settings: Settings
    keys: tuple[bytes, ...]
    clock: Clock

    async def login(self) -> str:
        """Log in with the token; returns a CSRF token of the session."""
        resp = await self.client.post("/login", data={"token": TOKEN, "next": "/"},
                                      allow_redirects=False)
        assert resp.status == 303, await resp.text()
        return await self.csrf()

    async def csrf(self, path: str = "/deliveries") -> str:
        page = await (await self.client.get(path)).text()
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, page[:500]
        return found.group(1)

    async def add_endpoint(self, endpoint_id: str, url: str = "http://127.0.0.1:9/hook",
                           **policy: Any) -> Endpoint:
        return await self.store.add_endpoint(Endpoint(
            id=endpoint_id, url=url, secrets=(generate_secret(),),
            policy=EndpointPolicy(**policy)))

    async def add_delivery(self, delivery_id: str, endpoint_id: str, *, status: str = "failed",
                           created_at: datetime = T0, event_type: str | None = "order.paid",
                           payload: bytes = b'{"n": 1}',
                           tried: list[dict[str, Any]] | None = None) -> None:
        row = {"id": delivery_id, "endpoint_id": endpoint_id, "event_type": event_type,
               "idempotency_key": None, "payload": payload, "status": status,
               "attempts": len(tried or []), "retry_base": 0, "next_attempt_at": None,
               "locked_until": None, "last_status_code": 500 if status == "failed" else None,
               "last_error": "HTTP 500" if status == "failed" else None,
               "created_at": created_at, "updated_at": created_at}
        async with self.store.engine.begin() as conn:
            await conn.execute(insert(deliveries), [row])
            for n, attempt in enumerate(tried or [], 1):
                await conn.execute(insert(attempts), [{
                    "delivery_id": delivery_id, "attempt_number": n,
                    "attempted_at": created_at + timedelta(seconds=n), "duration_ms": 12.5,
                    "status_code": 500, "outcome": "failed", "error_kind": "http_status",
                    "error": "HTTP 500", "response_excerpt": None, "request_headers": None,
                    **attempt}])


@pytest.fixture
async def ui(store: Store, database_url: str) -> AsyncIterator[Ui]:
    settings = Settings(database_url=database_url, allowed_networks="127.0.0.0/8")
    keys = portal_keys(None, store.keys)
    clock = Clock(T0.timestamp())
    app = make_app(settings, TOKEN, keys, clock=clock)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Ui(client, store, settings, keys, clock)
    finally:
        await client.close()
