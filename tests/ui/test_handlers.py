"""The UI's handlers over real SQLite and PostgreSQL databases: authentication, CSRF, the
pages and their actions, and the partner portal's scope."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import select

from tests.ui.conftest import T0, TOKEN, Ui
from worker.core.models import Endpoint
from worker.core.signing import generate_secret
from worker.db.schema import deliveries
from worker.ui.portal import sign_link

pytestmark = pytest.mark.timeout(60)

OPERATOR_GETS = ["/", "/endpoints", "/deliveries", "/deliveries/msg_x"]
OPERATOR_POSTS = ["/deliveries/msg_x/replay", "/deliveries/msg_x/resend",
                  "/endpoints/ep-a/enable", "/endpoints/ep-a/disable", "/endpoints/ep-a/rotate",
                  "/endpoints/ep-a/test", "/logout"]


async def _status(ui: Ui, delivery_id: str) -> str:
    async with ui.store.engine.connect() as conn:
        return str((await conn.execute(select(deliveries.c.status)
                                       .where(deliveries.c.id == delivery_id))).scalar())


# -- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize("path", OPERATOR_GETS)
async def test_pages_refuse_without_the_token(ui: Ui, path: str) -> None:
    resp = await ui.client.get(path, allow_redirects=False)
    assert resp.status == 401
    assert "Bearer" in resp.headers["WWW-Authenticate"]
    browser = await ui.client.get(path, headers={"Accept": "text/html"}, allow_redirects=False)
    assert browser.status == 303 and browser.headers["Location"].startswith("/login?next=")
    wrong = await ui.client.get(path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "y"})
    assert wrong.status == 401
    forged = await ui.client.get(path, cookies={"webhooks_ui": "1.abc.def"})
    assert forged.status == 401


@pytest.mark.parametrize("path", OPERATOR_POSTS)
async def test_actions_refuse_without_the_token(ui: Ui, path: str) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_delivery("msg_x", "ep-a")
    resp = await ui.client.post(path, data={"csrf": "anything"}, allow_redirects=False)
    assert resp.status == 401
    assert await _status(ui, "msg_x") == "failed"
    assert (await ui.store.get_endpoint("ep-a")).enabled


async def test_login_sets_a_strict_httponly_cookie_and_a_wrong_token_is_refused(ui: Ui) -> None:
    bad = await ui.client.post("/login", data={"token": "nope", "next": "/"},
                               allow_redirects=False)
    assert bad.status == 403 and "webhooks_ui" not in bad.cookies
    good = await ui.client.post("/login", data={"token": TOKEN, "next": "//evil.example/x"},
                                allow_redirects=False)
    assert good.status == 303 and good.headers["Location"] == "/"  # never off-site
    cookie = good.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert (await ui.client.get("/deliveries")).status == 200
    # The login URL printed at start works the same way.
    ui.client.session.cookie_jar.clear()
    by_link = await ui.client.get(f"/login?token={TOKEN}&next=/endpoints", allow_redirects=False)
    assert by_link.status == 303 and by_link.headers["Location"] == "/endpoints"


async def test_session_expires(ui: Ui) -> None:
    await ui.login()
    assert (await ui.client.get("/deliveries")).status == 200
    ui.clock.now += 13 * 3600
    assert (await ui.client.get("/deliveries", allow_redirects=False)).status == 401


async def test_bearer_token_reads_and_acts_without_csrf(ui: Ui) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_delivery("msg_x", "ep-a")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await ui.client.get("/deliveries", headers=auth)).status == 200
    resp = await ui.client.post("/deliveries/msg_x/replay", headers=auth, allow_redirects=False)
    assert resp.status == 303
    assert await _status(ui, "msg_x") == "pending"


# -- CSRF -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", OPERATOR_POSTS)
async def test_every_action_refuses_a_missing_or_wrong_csrf_token(ui: Ui, path: str) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_delivery("msg_x", "ep-a")
    token = await ui.login()
    other = await ui.client.post("/login", data={"token": TOKEN}, allow_redirects=False)
    assert other.status == 303  # a second session: its CSRF token must not work for the first
    for data in ({}, {"csrf": ""}, {"csrf": token[:-2] + "xx"}):
        resp = await ui.client.post(path, data=data, allow_redirects=False)
        assert resp.status == 403, (path, data)
        assert "CSRF" in await resp.text()
    assert await _status(ui, "msg_x") == "failed"
    endpoint = await ui.store.get_endpoint("ep-a")
    assert endpoint.enabled and len(endpoint.secrets) == 1


async def test_replay_with_the_csrf_token_replays(ui: Ui) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_delivery("msg_x", "ep-a")
    csrf = await ui.login()
    resp = await ui.client.post("/deliveries/msg_x/replay", data={"csrf": csrf},
                                allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/deliveries/msg_x?note=replayed"
    assert await _status(ui, "msg_x") == "pending"
    again = await ui.client.post("/deliveries/msg_x/replay", headers={"X-CSRF-Token": csrf},
                                 allow_redirects=False)
    assert again.headers["Location"].endswith("note=not-replayable")


# -- pages ------------------------------------------------------------------------------------


async def test_deliveries_pages_walk_every_row_once_by_keyset(ui: Ui) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_endpoint("ep-b")
    made = []
    for i in range(11):
        # Two rows share each timestamp: the page boundary must fall between them correctly.
        delivery_id = f"msg_{i:02d}"
        await ui.add_delivery(delivery_id, "ep-a" if i % 3 else "ep-b",
                              status="failed" if i % 2 else "succeeded",
                              created_at=T0 + timedelta(seconds=i // 2),
                              event_type="a.b" if i < 5 else "c.d")
        made.append((T0 + timedelta(seconds=i // 2), delivery_id))
    await ui.login()
    expected = [d for _, d in sorted(made, reverse=True)]
    seen: list[str] = []
    url: str | None = "/deliveries?limit=3"
    pages = 0
    while url:
        page = await (await ui.client.get(html.unescape(url))).text()
        seen += re.findall(r'class="delivery-link">(msg_\d+)<', page)
        found = re.search(r'<a href="([^"]+)" id="older">', page)
        url = found.group(1) if found else None
        pages += 1
    assert seen == expected and pages == 4

    async def ids(query: str) -> list[str]:
        page = await (await ui.client.get("/deliveries?" + query)).text()
        return re.findall(r'class="delivery-link">(msg_\d+)<', page)

    assert await ids("status=failed") == [d for d in expected if int(d[4:]) % 2]
    assert await ids("endpoint=ep-b") == [d for d in expected if int(d[4:]) % 3 == 0]
    assert await ids("event_type=a.b") == [d for d in expected if int(d[4:]) < 5]
    since = (T0 + timedelta(seconds=2)).isoformat()
    until = (T0 + timedelta(seconds=4)).isoformat()
    assert await ids(f"since={since}&until={until}".replace("+", "%2B")) == [
        "msg_07", "msg_06", "msg_05", "msg_04"]
    for bad in ("status=lost", "after=garbage", "limit=0", "limit=201", "since=yesterday",
                "since=2h&until=3h"):
        assert (await ui.client.get("/deliveries?" + bad)).status == 400, bad


async def test_a_delivery_page_escapes_the_payload_and_shows_headers_but_no_secret(
        ui: Ui) -> None:
    ep = await ui.add_endpoint("ep-a", headers=(("X-Api-Key", "very-secret-key"),))
    hostile = b'{"name": "<script>alert(1)</script>", "x": "</pre><img src=x onerror=alert(2)>"}'
    await ui.add_delivery("msg_x", "ep-a", payload=hostile, tried=[{
        "response_excerpt": "<b>oops</b>",
        "error": "HTTP 500 <i>",
        "request_headers": {"webhook-id": "msg_x", "webhook-timestamp": "1764072000",
                            "webhook-signature": "v1,c2lnbmF0dXJl", "X-Api-Key": "(sealed)",
                            "content-type": "application/json"}}])
    await ui.login()
    resp = await ui.client.get("/deliveries/msg_x")
    page = await resp.text()
    assert resp.status == 200
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>oops" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "v1,c2lnbmF0dXJl" in page and "(sealed)" in page
    assert ep.secrets[0] not in page and "very-secret-key" not in page
    assert 'id="replay"' in page and 'id="resend"' in page
    assert (await ui.client.get("/deliveries/msg_nope")).status == 404


async def test_resend_makes_a_copy_and_shows_it(ui: Ui) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_delivery("msg_x", "ep-a", status="succeeded")
    csrf = await ui.login()
    resp = await ui.client.post("/deliveries/msg_x/resend", data={"csrf": csrf},
                                allow_redirects=False)
    location = resp.headers["Location"]
    assert resp.status == 303 and location.endswith("?note=resent")
    copy_id = location.split("/")[2].split("?")[0]
    assert copy_id != "msg_x" and await _status(ui, copy_id) == "pending"
    page = await (await ui.client.get(location)).text()
    assert "a copy of the delivery" in page


async def test_endpoint_actions_disable_enable_rotate(ui: Ui) -> None:
    before = await ui.add_endpoint("ep-a")
    csrf = await ui.login()
    page = await (await ui.client.get("/endpoints")).text()
    assert 'id="ep-ep-a"' in page and before.secrets[0] not in page
    resp = await ui.client.post("/endpoints/ep-a/disable",
                                data={"csrf": csrf, "reason": "partner <asked>"})
    assert resp.status == 200
    ep = await ui.store.get_endpoint("ep-a")
    assert not ep.enabled and ep.disabled_reason == "partner <asked>"
    assert "partner &lt;asked&gt;" in await resp.text()
    await ui.client.post("/endpoints/ep-a/enable", data={"csrf": csrf})
    assert (await ui.store.get_endpoint("ep-a")).enabled
    rotated = await ui.client.post("/endpoints/ep-a/rotate", data={"csrf": csrf})
    shown = re.search(r'id="new-secret">(whsec_[^<]+)<', await rotated.text())
    after = await ui.store.get_endpoint("ep-a")
    assert shown and after.secrets[0] == shown.group(1) and before.secrets[0] in after.secrets
    assert rotated.headers["Cache-Control"] == "no-store"
    assert (await ui.client.post("/endpoints/ep-nope/enable", data={"csrf": csrf})).status == 404


async def test_send_a_test_event_from_the_endpoints_page(ui: Ui) -> None:
    seen: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    server = TestServer(receiver, host="127.0.0.1")
    await server.start_server()
    try:
        await ui.add_endpoint("ep-a", url=str(server.make_url("/hook")))
        csrf = await ui.login()
        resp = await ui.client.post("/endpoints/ep-a/test", data={"csrf": csrf})
        page = await resp.text()
    finally:
        await server.close()
    assert resp.status == 200 and 'id="test-outcome">success<' in page
    assert len(seen) == 1 and seen[0]["webhook-signature"].startswith("v1,")


async def test_overview_shows_the_chart_backlog_and_endpoints_needing_attention(ui: Ui) -> None:
    await ui.add_endpoint("ep-ok")
    await ui.add_endpoint("ep-bad")
    await ui.store.set_endpoint_enabled("ep-bad", False, "too many failures")
    from datetime import UTC, datetime

    now = datetime.now(UTC) - timedelta(minutes=5)
    await ui.add_delivery("msg_f", "ep-bad", created_at=now, tried=[{}, {}])
    await ui.add_delivery("msg_s", "ep-ok", status="succeeded", created_at=now,
                          tried=[{"outcome": "success", "status_code": 200, "error": None}])
    await ui.add_delivery("msg_p", "ep-ok", status="pending", created_at=now - timedelta(hours=1))
    async with ui.store.engine.begin() as conn:
        from sqlalchemy import update

        await conn.execute(update(deliveries).where(deliveries.c.id == "msg_p")
                           .values(next_attempt_at=now - timedelta(minutes=30)))
    await ui.login()
    page = await (await ui.client.get("/")).text()
    assert 'class="o-failed"' in page and 'class="o-success"' in page
    assert re.search(r'id="failure-ratio">66\.7%<', page)
    assert re.search(r'id="backlog">1<', page)
    assert "ep-bad" in page and "too many failures" in page
    assert "ep-ok</a>" not in page  # healthy: not listed as needing attention


# -- headers ----------------------------------------------------------------------------------


async def test_security_headers_on_operator_and_portal_pages(ui: Ui) -> None:
    await ui.add_endpoint("ep-a")
    await ui.login()
    token = sign_link(ui.keys, "ep-a", int(ui.clock.now) + 600)
    for path in ("/", "/login", f"/portal/{token}"):
        resp = await ui.client.get(path)
        assert resp.status == 200, path
        csp = resp.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"


# -- the partner portal -------------------------------------------------------------------------


async def test_portal_link_shows_its_endpoint_only(ui: Ui) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_endpoint("ep-b")
    await ui.add_delivery("msg_a1", "ep-a")
    await ui.add_delivery("msg_b1", "ep-b")
    token = sign_link(ui.keys, "ep-a", int(ui.clock.now) + 600)
    page = await (await ui.client.get(f"/portal/{token}")).text()
    assert "msg_a1" in page and "msg_b1" not in page and "ep-b" not in page
    assert (await ui.client.get(f"/portal/{token}/deliveries/msg_a1")).status == 200
    assert (await ui.client.get(f"/portal/{token}/deliveries/msg_b1")).status == 404
    assert (await ui.client.get(f"/portal/{token}?status=rejected")).status == 400
    # The portal link opens no operator page.
    assert (await ui.client.get("/deliveries", allow_redirects=False)).status == 401


async def test_portal_link_refused_after_expiry_or_tampering(ui: Ui) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_delivery("msg_a1", "ep-a")
    token = sign_link(ui.keys, "ep-a", int(ui.clock.now) + 600)
    encoded, expires, mac = token.split(".")
    other = sign_link(ui.keys, "ep-b", int(ui.clock.now) + 600).split(".")[0]
    for bad in (f"{other}.{expires}.{mac}", f"{encoded}.{int(expires) + 1}.{mac}",
                f"{encoded}.{expires}.{mac[::-1]}", "garbage"):
        resp = await ui.client.get(f"/portal/{bad}")
        assert resp.status == 403, bad
        assert "msg_a1" not in await resp.text()
    ui.clock.now += 601
    expired = await ui.client.get(f"/portal/{token}")
    assert expired.status == 403 and "expired" in await expired.text()
    assert (await ui.client.post(f"/portal/{token}/replay-failed")).status == 403


async def test_portal_replays_its_own_failed_deliveries_with_csrf_only(ui: Ui) -> None:
    await ui.add_endpoint("ep-a")
    await ui.add_endpoint("ep-b")
    await ui.add_delivery("msg_a1", "ep-a")
    await ui.add_delivery("msg_a2", "ep-a", status="succeeded")
    await ui.add_delivery("msg_b1", "ep-b")
    token = sign_link(ui.keys, "ep-a", int(ui.clock.now) + 600)
    other = sign_link(ui.keys, "ep-b", int(ui.clock.now) + 600)
    page = await (await ui.client.get(f"/portal/{token}")).text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    other_page = await (await ui.client.get(f"/portal/{other}")).text()
    other_csrf = re.search(r'name="csrf" value="([^"]+)"', other_page)
    assert other_csrf
    for data in ({}, {"csrf": other_csrf.group(1)}):
        resp = await ui.client.post(f"/portal/{token}/replay-failed", data=data)
        assert resp.status == 403
    assert await _status(ui, "msg_a1") == "failed"
    resp = await ui.client.post(f"/portal/{token}/replay-failed",
                                data={"csrf": csrf.group(1)}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].endswith("?replayed=1")
    assert await _status(ui, "msg_a1") == "pending"
    assert await _status(ui, "msg_a2") == "succeeded"
    assert await _status(ui, "msg_b1") == "failed"  # another endpoint's: untouched


async def test_portal_is_framable_only_by_the_configured_origins(
        store: object, database_url: str) -> None:
    from aiohttp.test_utils import TestClient

    from worker.settings import Settings
    from worker.ui.app import make_app
    from worker.ui.portal import portal_keys

    settings = Settings(database_url=database_url,
                        portal_frame_ancestors="https://app.example.com  'self'")
    keys = portal_keys(None, store.keys)  # type: ignore[attr-defined]
    client: TestClient = TestClient(TestServer(make_app(settings, TOKEN, keys)))  # type: ignore[type-arg]
    await client.start_server()
    try:
        await store.add_endpoint(Endpoint(  # type: ignore[attr-defined]
            id="ep-a", url="https://partner.example/h", secrets=(generate_secret(),)))
        token = sign_link(keys, "ep-a", 2_000_000_000)
        portal = await client.get(f"/portal/{token}")
        assert portal.status == 200
        assert "frame-ancestors https://app.example.com 'self'" in portal.headers[
            "Content-Security-Policy"]
        assert "X-Frame-Options" not in portal.headers
        login = await client.get("/login")
        assert "frame-ancestors 'none'" in login.headers["Content-Security-Policy"]
        assert login.headers["X-Frame-Options"] == "DENY"
    finally:
        await client.close()


@pytest.mark.parametrize("value", ["*", "https://a.example; script-src *", "javascript:x",
                                   "https://a.example\nX: y", "'unsafe-inline'"])
def test_frame_ancestors_setting_refuses_anything_but_origins(value: str) -> None:
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match="WEBHOOKS_PORTAL_FRAME_ANCESTORS"):
        Settings(portal_frame_ancestors=value)


async def test_logout_ends_the_session(ui: Ui) -> None:
    csrf = await ui.login()
    resp = await ui.client.post("/logout", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/login?note=logged-out"
    assert (await ui.client.get("/deliveries", allow_redirects=False)).status == 401
