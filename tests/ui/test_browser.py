"""In a real browser (headless Debian Chromium, driven by Playwright; no browser download):
an operator logs in, finds a failed delivery from the overview, opens it, presses replay and
sees the new attempt, made by a real delivery engine; a partner's portal link shows its
endpoint and not another.

The UI runs as `webhooks ui` in a process of its own, the engine (EngineRuntime) and a
receiver on threads of this one, all on the session's PostgreSQL database. Screenshots go to
WEBHOOKS_SCREENSHOT_DIR when it is set (`docs/` for the README's), else to a temporary
directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import _truncate_pg
from worker.core.models import Endpoint, EventIn, Incoming
from worker.core.signing import generate_secret
from worker.db.connection import create_engine
from worker.db.store import open_store
from worker.delivery.runtime import EngineRuntime
from worker.settings import Settings

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token-" + "b" * 16


def _need_browser() -> Any:
    """Playwright's sync API with Debian's Chromium; skipped without them, failed under CI."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[test]')"
    else:
        if Path(CHROMIUM).exists():
            return sync_playwright
        problem = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser test cannot run under CI: {problem}")
    pytest.skip(problem)


def wait_until(predicate: Callable[[], bool], within: float = 20.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        time.sleep(step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A partner's endpoint on its own thread: /hook answers 500 until `healthy` is set,
    /other always 204."""

    def __init__(self) -> None:
        self.port = free_port()
        self.healthy = threading.Event()
        self.hits: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _hook(self, request: web.Request) -> web.Response:
        self.hits.append(request.headers.get("webhook-id", ""))
        if self.healthy.is_set():
            return web.Response(status=204)
        return web.Response(status=500, text="partner database down <retry later>")

    async def _other(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/other", self._other)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def stack(pg_database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Receiver, engine and `webhooks ui` over an emptied PostgreSQL database."""
    _truncate_pg(pg_database)
    receiver = Receiver()
    receiver.start()
    settings = Settings(database_url=pg_database, allowed_networks="127.0.0.0/8",
                        retry_schedule="none", claim_interval=0.2, gc_threshold=0,
                        shutdown_grace=1.0, request_timeout=5.0, connect_timeout=2.0)

    async def add_endpoints() -> None:
        engine = create_engine(settings)
        try:
            store = open_store(engine, settings)
            for endpoint_id, path in (("ep-partner", "/hook"), ("ep-other", "/other")):
                await store.add_endpoint(Endpoint(id=endpoint_id, url=receiver.url(path),
                                                  secrets=(generate_secret(),),
                                                  event_types=("order.paid",)))
        finally:
            await engine.dispose()

    asyncio.run(add_endpoints())
    runtime = EngineRuntime(settings)
    runtime.start()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": pg_database, "WEBHOOKS_UI_TOKEN": TOKEN,
           "WEBHOOKS_UI_PORT": str(port), "WEBHOOKS_ALLOWED_NETWORKS": "127.0.0.0/8"}
    ui = subprocess.Popen([sys.executable, "-m", "worker.cli", "ui"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert ui.stdout is not None
        first = ui.stdout.readline()
        assert "serving" in first, first + (ui.stdout.read() if ui.poll() is not None else "")
        yield {"runtime": runtime, "receiver": receiver, "base": f"http://127.0.0.1:{port}",
               "env": env, "settings": settings}
    finally:
        ui.terminate()
        ui.wait(10)
        runtime.stop_blocking()
        receiver.stop()


def test_operator_replays_a_failed_delivery_and_partner_sees_only_its_endpoint(
        stack: dict[str, Any], tmp_path: Path) -> None:
    sync_playwright = _need_browser()
    runtime: EngineRuntime = stack["runtime"]
    receiver: Receiver = stack["receiver"]
    base: str = stack["base"]
    shots = Path(os.environ.get("WEBHOOKS_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    # Some traffic for the chart, and one delivery that fails (no retries: failed at once).
    runtime.accept_blocking([Incoming(f"other:{n}", EventIn(
        "ep-other", {"order": n, "total": "19.90"}, event_type="order.paid"))
        for n in range(12)])
    report = runtime.accept_blocking([Incoming("partner:1", EventIn(
        "ep-partner", {"order": 4711, "note": "<b>not bold</b>"}, event_type="order.paid"))])
    (failed_id,) = report.accepted

    def status_of(delivery_id: str) -> str:
        row = runtime.call_blocking(lambda e: e.store.get_delivery(delivery_id, 0), 10)
        return str(row["status"]) if row else "missing"

    wait_until(lambda: status_of(failed_id) == "failed")
    other_ids = [row["id"] for row in runtime.call_blocking(
        lambda e: e.store.list_deliveries(endpoint_id="ep-other", limit=50), 10)]
    assert len(other_ids) == 12

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base + "/")
            assert "/login" in page.url  # nothing without the token
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("text=Attempts per minute by outcome")
            assert page.locator("rect.o-failed").count() >= 1
            assert page.locator("rect.o-success").count() >= 1
            page.screenshot(path=str(shots / "ui-overview.png"), full_page=True)

            page.click("#failed-link")
            page.wait_for_selector(f"a.delivery-link:text('{failed_id}')")
            assert page.locator("a.delivery-link").count() == 1  # only the failed one
            page.click(f"a.delivery-link:text('{failed_id}')")
            page.wait_for_selector("#replay")
            assert page.locator("li.attempt").count() == 1
            assert "partner database down <retry later>" in page.inner_text("li.attempt")
            assert "<b>not bold</b>" in page.inner_text("pre.payload")  # text, not markup

            receiver.healthy.set()
            page.click("#replay")
            page.wait_for_selector("text=Queued for replay")
            # The engine claims it; the page refreshes itself while the delivery is pending.
            page.wait_for_selector("li.attempt.o-success#attempt-2", timeout=30_000)
            assert page.locator("li.attempt").count() == 2
            assert "succeeded" in page.inner_text("h1")
            page.click("li.attempt.o-success summary:text('Headers sent')")
            assert "webhook-signature" in page.inner_text("li.attempt.o-success")
            page.screenshot(path=str(shots / "ui-delivery.png"), full_page=True)
            assert receiver.hits.count(failed_id) == 2  # really delivered, same webhook-id

            link = subprocess.run(
                [sys.executable, "-m", "worker.cli", "portal-link", "ep-partner",
                 "--expires", "1h", "--base-url", base],
                env=stack["env"], capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()
            partner = browser.new_page(viewport={"width": 1100, "height": 600})  # no login
            partner.goto(link)
            assert partner.inner_text("#portal-endpoint") == "ep-partner"
            text = partner.inner_text("main")
            assert failed_id in text
            assert not any(other in text for other in other_ids)
            assert "ep-other" not in partner.content()
            partner.screenshot(path=str(shots / "ui-portal.png"), full_page=True)
            blocked = partner.goto(f"{link}/deliveries/{other_ids[0]}")
            assert blocked is not None and blocked.status == 404
            partner.goto(base + "/deliveries")  # the link opens no operator page
            assert "/login" in partner.url and partner.locator("a.delivery-link").count() == 0
        finally:
            browser.close()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/portal/[\w-]+\.\d+\.[\w-]+", link)


