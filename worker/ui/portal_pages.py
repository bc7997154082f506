"""The partner portal: one endpoint's deliveries and attempts, behind a signed, expiring link.

Read-only but for one action, "replay my failed deliveries". Everything shown is scoped to
the link's endpoint: a delivery of another endpoint is "not found", as if it did not exist.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from worker.cli_deliveries import render_payload
from worker.core.models import DeliveryStatus
from worker.ui.app import context_of, error_page, render
from worker.ui.auth import CSRF_FIELD
from worker.ui.pages import ATTEMPTS_SHOWN, PAYLOAD_READ, attempt_view
from worker.ui.paging import BadQuery, DeliveryFilter, decode_cursor, encode_cursor
from worker.ui.portal import PortalLinkError, csrf_for_link, csrf_ok_for_link, verify_link

PORTAL_PAGE = 50
PORTAL_STATUSES = (DeliveryStatus.SUCCEEDED.value, DeliveryStatus.FAILED.value,
                   DeliveryStatus.PENDING.value, DeliveryStatus.HELD.value)


class _Link:
    def __init__(self, token: str, endpoint_id: str, expires: int) -> None:
        self.token, self.endpoint_id, self.expires = token, endpoint_id, expires
        self.base = f"/portal/{token}"


def _link(request: web.Request) -> _Link:
    ctx = context_of(request)
    token = request.match_info["token"]
    try:
        endpoint_id, expires = verify_link(ctx.portal_keys, token, ctx.clock())
    except PortalLinkError as exc:
        raise web.HTTPForbidden(text=f"{exc}: ask for a new link\n") from None
    return _Link(token, endpoint_id, expires)


def _page(request: web.Request, link: _Link, name: str, **values: Any) -> web.Response:
    ctx = context_of(request)
    return render(request, name, link=link, portal_csrf=csrf_for_link(ctx.portal_keys, link.token),
                  portal_csrf_field=CSRF_FIELD, **values)


async def portal_home(request: web.Request) -> web.StreamResponse:
    link = _link(request)
    _, queries = context_of(request).db()
    status = request.query.get("status") or None
    try:
        if status is not None and status not in PORTAL_STATUSES:
            raise BadQuery(f"status must be one of {', '.join(PORTAL_STATUSES)}")
        after = decode_cursor(request.query["after"]) if request.query.get("after") else None
    except BadQuery as exc:
        return error_page(request, 400, str(exc))
    where = DeliveryFilter(status=status, endpoint_id=link.endpoint_id)
    rows, cursor = await queries.deliveries_page(where, after, PORTAL_PAGE)
    params = {"status": status} if status else {}
    older = (f"{link.base}?" + urlencode({**params, "after": encode_cursor(cursor)})
             if cursor else None)
    return _page(request, link, "portal.html", rows=rows, older=older, chosen=status,
                 statuses=PORTAL_STATUSES, replayed=_count(request.query.get("replayed")))


async def portal_delivery(request: web.Request) -> web.StreamResponse:
    link = _link(request)
    store, _ = context_of(request).db()
    delivery_id = request.match_info["delivery_id"]
    row = await store.get_delivery(delivery_id, PAYLOAD_READ)
    if row is None or row["endpoint_id"] != link.endpoint_id:
        return error_page(request, 404, "No delivery with that id.")
    tried, total = await store.delivery_attempts(delivery_id, ATTEMPTS_SHOWN)
    payload, cut = render_payload(row["payload_head"], row["payload_size"])
    return _page(request, link, "portal_delivery.html", d=row, payload=payload, cut=cut,
                 attempts=[attempt_view(a) for a in reversed(tried)], total=total,
                 pending=row["status"] == DeliveryStatus.PENDING.value)


async def portal_replay_failed(request: web.Request) -> web.StreamResponse:
    link = _link(request)
    ctx = context_of(request)
    form = await request.post()
    offered = form.get(CSRF_FIELD)
    if not csrf_ok_for_link(ctx.portal_keys, link.token,
                            offered if isinstance(offered, str) else None):
        return error_page(request, 403, "This form did not come from this page (CSRF check "
                          "failed). Reload the page and try again.")
    store, _ = ctx.db()
    count = await store.replay_failed(endpoint_id=link.endpoint_id)
    raise web.HTTPSeeOther(f"{link.base}?replayed={count}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/portal/{token}", portal_home)
    app.router.add_get("/portal/{token}/deliveries/{delivery_id}", portal_delivery)
    app.router.add_post("/portal/{token}/replay-failed", portal_replay_failed)


def _count(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() and len(text) < 10 else None
