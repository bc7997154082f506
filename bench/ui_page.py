"""How long the UI's deliveries page takes at 1,000,000 rows on PostgreSQL.

    python bench/ui_page.py [--rows 1000000] [--requests 100] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

Makes a fresh database `webhooks_bench_ui_<random>` (dropped at the end), migrates it, adds
100 endpoints and fills `deliveries` with INSERT … SELECT generate_series (85% succeeded, 10%
failed with 1-3 attempts each, 4% pending, 1% held; 20 event types; created over 30 days),
then serves the real UI application on a loopback port and times authenticated HTTP GETs of
pages of 50: the first page, a keyset page half-way down (500,000 rows deep), and filtered
pages. Prints p50/p99 per page, and the plan of the deep page.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import asyncpg
from aiohttp import web

from worker.core.models import Endpoint
from worker.core.sealing import KeyRing, generate_key
from worker.core.signing import generate_secret
from worker.db.connection import create_engine
from worker.db.migrate import upgrade
from worker.db.store import Store
from worker.settings import Settings
from worker.ui.app import CONTEXT, make_app
from worker.ui.paging import Cursor, encode_cursor
from worker.ui.portal import portal_keys
from worker.ui.stats import percentile

TOKEN = "bench-ui-token-" + "z" * 20
ENDPOINTS = 100
EVENT_TYPES = 20
SPAN_SECONDS = 30 * 86400

FILL = f"""
INSERT INTO deliveries (id, endpoint_id, event_type, idempotency_key, payload, status,
                        attempts, retry_base, next_attempt_at, locked_until, last_status_code,
                        last_error, created_at, updated_at)
SELECT 'msg_' || lpad(i::text, 10, '0'),
       'ep-' || lpad((i % {ENDPOINTS - 3})::text, 3, '0'),  -- 97: not in step with status
       'event.type_' || (i % {EVENT_TYPES}),
       NULL,
       convert_to('{{"order": ' || i || ', "total": "19.90", "note": "bench row"}}', 'UTF8'),
       CASE WHEN i % 100 < 85 THEN 'succeeded' WHEN i % 100 < 95 THEN 'failed'
            WHEN i % 100 < 99 THEN 'pending' ELSE 'held' END,
       CASE WHEN i % 100 < 85 THEN 1 WHEN i % 100 < 95 THEN 1 + i % 3 ELSE 0 END,
       0,
       CASE WHEN i % 100 BETWEEN 95 AND 98 THEN $1::timestamptz + (i % 600) * interval '1 s'
       END,
       NULL,
       CASE WHEN i % 100 < 85 THEN 200 WHEN i % 100 < 95 THEN 500 END,
       CASE WHEN i % 100 BETWEEN 85 AND 94 THEN 'HTTP 500' END,
       $1::timestamptz - ($2::bigint - i) * ({SPAN_SECONDS}.0 / $2::bigint) * interval '1 s',
       $1::timestamptz
FROM generate_series(1, $2::bigint) AS i
"""
ATTEMPTS = """
INSERT INTO attempts (delivery_id, attempt_number, attempted_at, duration_ms, status_code,
                      outcome, error_kind, error, response_excerpt, request_headers)
SELECT d.id, n, d.created_at + n * interval '30 s', 20 + (n * 37) % 200,
       CASE WHEN d.status = 'failed' THEN 500 ELSE 200 END,
       CASE WHEN d.status = 'succeeded' THEN 'success'
            WHEN n = d.attempts THEN 'failed' ELSE 'retry' END,
       CASE WHEN d.status = 'failed' THEN 'http_status' END,
       CASE WHEN d.status = 'failed' THEN 'HTTP 500' END,
       NULL, NULL
FROM deliveries d, generate_series(1, d.attempts) AS n
WHERE d.status = 'failed' OR (d.status = 'succeeded' AND d.id LIKE '%0')
"""


async def fill(url: str, rows: int, keys: KeyRing) -> None:
    settings = Settings(database_url=url)
    engine = create_engine(settings)
    try:
        store = Store(engine, keys)
        for n in range(ENDPOINTS):
            await store.add_endpoint(Endpoint(id=f"ep-{n:03d}", url="https://partner.example/h",
                                              secrets=(generate_secret(),)))
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        started = time.monotonic()
        await conn.execute(FILL, datetime.now(UTC), rows)
        await conn.execute(ATTEMPTS)
        await conn.execute("VACUUM ANALYZE deliveries")
        await conn.execute("VACUUM ANALYZE attempts")
        counts = await conn.fetchrow("SELECT (SELECT count(*) FROM deliveries) d, "
                                     "(SELECT count(*) FROM attempts) a")
        print(f"filled {counts['d']:,} deliveries and {counts['a']:,} attempts in "
              f"{time.monotonic() - started:.0f} s", flush=True)
    finally:
        await conn.close()


async def deep_cursor(url: str, offset: int) -> Cursor:
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        row = await conn.fetchrow("SELECT created_at, id FROM deliveries "
                                  "ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1", offset)
        plan = await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) SELECT id, endpoint_id, status, created_at "
            "FROM deliveries WHERE (created_at, id) < ($1, $2) "
            "ORDER BY created_at DESC, id DESC LIMIT 51", row["created_at"], row["id"])
        print("plan of the deep page's query:")
        for line in plan:
            print("   ", line[0])
        return Cursor(row["created_at"], row["id"])
    finally:
        await conn.close()


async def measure(url: str, keys: KeyRing, key_text: str, requests: int,
                  deep: Cursor) -> None:
    settings = Settings(database_url=url, secret_keys=key_text)
    app = make_app(settings, TOKEN, portal_keys(None, keys))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pages = {
        "first page": {},
        "keyset page half-way down": {"after": encode_cursor(deep)},
        "status=failed": {"status": "failed"},
        "status=failed, deep": {"status": "failed", "after": encode_cursor(deep)},
        "endpoint=ep-042": {"endpoint": "ep-042"},
        "endpoint=ep-042 & status=failed": {"endpoint": "ep-042", "status": "failed"},
        "event_type=event.type_7": {"event_type": "event.type_7"},
        "since=7d & until=6d": {"since": "7d", "until": "6d"},
        "GET /endpoints (25, health each)": {"path": "/endpoints"},
        "GET / (overview, 3 h, uncached)": {"path": "/"},
    }
    headers = {"Authorization": f"Bearer {TOKEN}"}
    print(f"\n{'GET /deliveries (50 rows)':<36} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  rows",
          "(p99: nearest rank)")
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            for name, query in pages.items():
                path = query.pop("path", "/deliveries")
                target = f"http://127.0.0.1:{port}{path}?{urlencode(query)}"
                for _ in range(3):  # warm: pool, plan cache, pages in shared buffers
                    async with http.get(target) as resp:
                        await resp.read()
                took: list[float] = []
                for _ in range(requests):
                    app[CONTEXT].cache.clear()  # the overview's aggregates read every time
                    started = time.perf_counter()
                    async with http.get(target) as resp:
                        body = await resp.text()
                    took.append((time.perf_counter() - started) * 1000)
                    assert resp.status == 200, (resp.status, body[:300])
                shown = body.count('class="delivery-link"') or body.count('class="endpoint')
                p99 = percentile(took, 99) or 0.0
                print(f"{name:<36} {statistics.median(took):8.1f} {p99:8.1f} "
                      f"{max(took):8.1f}  {shown}", flush=True)
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="an admin connection; the bench database is made beside it")
    args = parser.parse_args()
    name = f"webhooks_bench_ui_{uuid.uuid4().hex[:8]}"
    admin = args.pg
    url = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + name
    key_text = generate_key("bench")
    keys = KeyRing.parse(key_text)

    async def admin_sql(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        upgrade(url)
        asyncio.run(fill(url, args.rows, keys))
        deep = asyncio.run(deep_cursor(url, args.rows // 2))
        asyncio.run(measure(url, keys, key_text, args.requests, deep))
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
