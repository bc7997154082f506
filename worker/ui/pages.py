"""The operator's pages and actions: overview, endpoints, deliveries, one delivery, login."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from worker.cli_deliveries import parse_when, render_payload
from worker.core.errors import EndpointNotFound, WebhookError
from worker.core.ids import new_id
from worker.core.models import Delivery, DeliveryStatus, Endpoint
from worker.core.outcome import classify
from worker.core.signing import SIGNING_KEY_PREFIX, generate_secret, generate_signing_key
from worker.ui.app import context_of, error_page, render
from worker.ui.auth import SESSION_COOKIE, SESSION_SECONDS
from worker.ui.paging import BadQuery, DeliveryFilter, decode_cursor, encode_cursor, page_size
from worker.ui.queries import window_start
from worker.ui.stats import FAILING, minute_series, ratio, stacked_bars

PAYLOAD_READ = 65_536  # bytes of a payload read to show it (the page shows at most 4096 chars)
ATTEMPTS_SHOWN = 100  # the newest attempts on a delivery's page
ENDPOINTS_PER_PAGE = 25
ATTENTION = 20  # endpoints listed as needing attention on the overview
CHART_HOURS = (1, 3, 6, 12, 24)
OVERVIEW_CACHE_SECONDS = 10.0  # the overview's aggregates are read at most this often
LOGIN_FAILURE_DELAY = 0.5
# What a redirect's `note` says; fixed texts, so a link cannot put words on the page.
NOTES = {
    "replayed": "Queued for replay: due now, with a fresh retry budget.",
    "resent": "This is a copy of the delivery, queued under a new webhook-id.",
    "enabled": "Endpoint enabled; its held deliveries are pending again.",
    "disabled": "Endpoint disabled; its deliveries are held until it is enabled.",
    "not-replayable": "Only failed deliveries can be replayed; use resend for a succeeded one.",
    "not-resendable": "Only succeeded or failed deliveries can be resent.",
    "logged-out": "Logged out.",
}


def _note(request: web.Request) -> str | None:
    return NOTES.get(request.query.get("note", ""))


def _safe_next(target: str | None) -> str:
    """Only a path on this site (never //host or a scheme) is followed after login."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


# -- login ---------------------------------------------------------------------------------


def _logged_in(request: web.Request, target: str) -> web.StreamResponse:
    ctx = context_of(request)
    response = web.Response(status=303, headers={"Location": _safe_next(target)})
    secure = (ctx.settings.ui_public_url or "").startswith("https://") or request.secure
    response.set_cookie(SESSION_COOKIE, ctx.auth.new_session(ctx.clock()), max_age=SESSION_SECONDS,
                        path="/", httponly=True, samesite="Strict", secure=secure)
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    target = request.query.get("next")
    token = request.query.get("token")
    if token is not None:  # the login URL printed at start (as Jupyter does)
        if ctx.auth.token_ok(token):
            return _logged_in(request, target or "/")
        await asyncio.sleep(LOGIN_FAILURE_DELAY)
        return render(request, "login.html", status=403, next=_safe_next(target),
                      failed=True, note=None)
    return render(request, "login.html", next=_safe_next(target), failed=False,
                  note=_note(request))


async def login(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    form = await request.post()
    token, target = form.get("token"), form.get("next")
    if isinstance(token, str) and ctx.auth.token_ok(token.strip()):
        return _logged_in(request, target if isinstance(target, str) else "/")
    await asyncio.sleep(LOGIN_FAILURE_DELAY)  # slows guessing; the token is long anyway
    return render(request, "login.html", status=403, failed=True, note=None,
                  next=_safe_next(target if isinstance(target, str) else None))


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.Response(status=303, headers={"Location": "/login?note=logged-out"})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


# -- overview ------------------------------------------------------------------------------


async def _overview_data(request: web.Request, hours: int) -> dict[str, Any]:
    from worker.metrics import read_database

    ctx = context_of(request)
    cached = ctx.cache.get(("overview", hours))
    if cached is not None and ctx.clock() - cached[0] < OVERVIEW_CACHE_SECONDS:
        data: dict[str, Any] = cached[1]
        return data
    _, queries = ctx.db()
    now = datetime.now(UTC)
    start = window_start(now, hours)
    counts = await queries.attempts_per_minute(start)
    series = minute_series(counts, start, hours * 60)
    reading = await read_database(ctx.settings, now)
    attention = await queries.needing_attention(now, ATTENTION)
    total = sum(sum(v) for v in series.values())
    failing = sum(sum(v) for k, v in series.items() if k in FAILING)
    recent = {k: sum(v[-15:]) for k, v in series.items()}
    data = {
        "series": series, "start": start, "hours": hours, "total": total,
        "failure_ratio": ratio(failing, total),
        "recent_failure_ratio": ratio(sum(recent[k] for k in FAILING), sum(recent.values())),
        "reading": reading, "attention": attention, "read_at": now,
        "count_limit": ctx.settings.metrics_count_limit,
    }
    ctx.cache[("overview", hours)] = (ctx.clock(), data)
    return data


async def overview(request: web.Request) -> web.StreamResponse:
    text = request.query.get("hours", "3")
    hours = int(text) if text.isdigit() and int(text) in CHART_HOURS else 3
    data = await _overview_data(request, hours)
    segments, top = stacked_bars(data["series"], 960.0, 200.0)
    return render(request, "overview.html", data=data, segments=segments, top=top,
                  chart_hours=CHART_HOURS, circuit=_circuit, now=datetime.now(UTC),
                  minute=timedelta(minutes=1),
                  note=_note(request))


# -- endpoints -----------------------------------------------------------------------------


def _circuit(ep: Endpoint, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if ep.circuit_open_until is None:
        return "closed"
    if ep.circuit_open_until > now:
        return f"open until {ep.circuit_open_until:%Y-%m-%d %H:%M:%S}"
    return "half-open"


async def endpoints_page(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    _, queries = ctx.db()
    after = request.query.get("after") or None
    found, more = await queries.endpoints_page(after, ENDPOINTS_PER_PAGE)
    health = await queries.health_of_endpoints([ep.id for ep in found])
    return render(request, "endpoints.html", endpoints=[(ep, health[ep.id]) for ep in found],
                  more=more, circuit=_circuit, note=_note(request),
                  focus=request.query.get("endpoint"))


async def _endpoint_or_404(request: web.Request) -> Endpoint:
    store, _ = context_of(request).db()
    try:
        return await store.get_endpoint(request.match_info["endpoint_id"])
    except EndpointNotFound:
        raise web.HTTPNotFound(text="no such endpoint") from None


def _back_to_endpoint(endpoint_id: str, note: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther("/endpoints?" + urlencode({"note": note, "endpoint": endpoint_id})
                            + f"#ep-{endpoint_id}")


async def endpoint_enable(request: web.Request) -> web.StreamResponse:
    ep = await _endpoint_or_404(request)
    store, _ = context_of(request).db()
    await store.set_endpoint_enabled(ep.id, True)
    raise _back_to_endpoint(ep.id, "enabled")


async def endpoint_disable(request: web.Request) -> web.StreamResponse:
    ep = await _endpoint_or_404(request)
    store, _ = context_of(request).db()
    form = await request.post()
    reason = form.get("reason")
    text = reason.strip()[:500] if isinstance(reason, str) and reason.strip() else ""
    await store.set_endpoint_enabled(ep.id, False, text or "disabled from the web UI")
    raise _back_to_endpoint(ep.id, "disabled")


async def endpoint_rotate(request: web.Request) -> web.StreamResponse:
    """A new secret of the scheme the endpoint signs with now; shown once, on this answer."""
    ctx = context_of(request)
    ep = await _endpoint_or_404(request)
    store, _ = ctx.db()
    if ep.secrets and ep.secrets[0].startswith(SIGNING_KEY_PREFIX):
        secret, public = generate_signing_key()
    else:
        secret, public = generate_secret(), None
    overlap = ctx.settings.secret_overlap
    await store.rotate_secret(ep.id, secret, overlap_seconds=overlap)
    return render(request, "rotated.html", endpoint=ep, secret=secret, public=public,
                  overlap=overlap)


async def endpoint_test(request: web.Request) -> web.StreamResponse:
    """One signed `webhook.test` event, sent from here now (as `webhooks endpoints test`)."""
    from worker.delivery.sender import Sender, SenderConfig

    ctx = context_of(request)
    ep = await _endpoint_or_404(request)
    now = datetime.now(UTC)
    body = orjson.dumps({"type": "webhook.test", "timestamp": now.isoformat(),
                         "data": {"endpoint": ep.id, "message": "a test event from the web UI"}})
    delivery = Delivery(id=new_id("msg"), endpoint_id=ep.id, url=ep.url,
                        secrets=ep.signing_secrets(now), payload=body,
                        event_type="webhook.test", policy=ep.policy)
    async with Sender(SenderConfig.from_settings(ctx.settings)) as sender:
        result = await sender.send(delivery)
    return render(request, "tested.html", endpoint=ep, delivery=delivery, result=result,
                  outcome=classify(result))


# -- deliveries ----------------------------------------------------------------------------


def _filter(request: web.Request) -> DeliveryFilter:
    q = request.query
    now = datetime.now(UTC)

    def when(name: str) -> datetime | None:
        text = q.get(name, "").strip()
        if not text:
            return None
        try:
            return parse_when(text, name, now)
        except WebhookError as exc:
            raise BadQuery(str(exc)) from None

    return DeliveryFilter(status=q.get("status") or None, endpoint_id=q.get("endpoint") or None,
                          event_type=q.get("event_type") or None, since=when("since"),
                          until=when("until"))


async def deliveries_page(request: web.Request) -> web.StreamResponse:
    _, queries = context_of(request).db()
    try:
        where = _filter(request)
        after = decode_cursor(request.query["after"]) if request.query.get("after") else None
        limit = page_size(request.query.get("limit"))
    except BadQuery as exc:
        return error_page(request, 400, str(exc))
    rows, cursor = await queries.deliveries_page(where, after, limit)
    params = {**where.query(), **({"limit": str(limit)} if limit != 50 else {})}
    older = ("/deliveries?" + urlencode({**params, "after": encode_cursor(cursor)})
             if cursor else None)
    return render(request, "deliveries.html", rows=rows, where=where, q=request.query,
                  older=older, first=("/deliveries?" + urlencode(params)) if after else None,
                  statuses=[s.value for s in DeliveryStatus])


def attempt_view(row: dict[str, Any]) -> dict[str, Any]:
    """An attempt for a template: headers in a stable order, the signature's parts apart."""
    headers = row.get("request_headers") or {}
    return {**row, "headers": sorted(headers.items()) if isinstance(headers, dict) else []}


async def delivery_page(request: web.Request) -> web.StreamResponse:
    store, _ = context_of(request).db()
    delivery_id = request.match_info["delivery_id"]
    row = await store.get_delivery(delivery_id, PAYLOAD_READ)
    if row is None:
        return error_page(request, 404, "No delivery with that id.")
    tried, total = await store.delivery_attempts(delivery_id, ATTEMPTS_SHOWN)
    payload, cut = render_payload(row["payload_head"], row["payload_size"])
    return render(request, "delivery.html", d=row, payload=payload, cut=cut,
                  attempts=[attempt_view(a) for a in reversed(tried)], total=total,
                  note=_note(request), pending=row["status"] == DeliveryStatus.PENDING.value)


async def delivery_replay(request: web.Request) -> web.StreamResponse:
    store, _ = context_of(request).db()
    delivery_id = request.match_info["delivery_id"]
    done = await store.replay_ids([delivery_id])
    note = "replayed" if done else "not-replayable"
    raise web.HTTPSeeOther(f"/deliveries/{delivery_id}?note={note}")


async def delivery_resend(request: web.Request) -> web.StreamResponse:
    store, _ = context_of(request).db()
    delivery_id = request.match_info["delivery_id"]
    made = await store.resend(delivery_id)
    if made is None:
        raise web.HTTPSeeOther(f"/deliveries/{delivery_id}?note=not-resendable")
    raise web.HTTPSeeOther(f"/deliveries/{made[0]}?note=resent")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", overview)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/healthz", healthz)
    r.add_get("/endpoints", endpoints_page)
    r.add_post("/endpoints/{endpoint_id}/enable", endpoint_enable)
    r.add_post("/endpoints/{endpoint_id}/disable", endpoint_disable)
    r.add_post("/endpoints/{endpoint_id}/rotate", endpoint_rotate)
    r.add_post("/endpoints/{endpoint_id}/test", endpoint_test)
    r.add_get("/deliveries", deliveries_page)
    r.add_get("/deliveries/{delivery_id}", delivery_page)
    r.add_post("/deliveries/{delivery_id}/replay", delivery_replay)
    r.add_post("/deliveries/{delivery_id}/resend", delivery_resend)

