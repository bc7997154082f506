"""The aiohttp application: context, security headers, authentication, CSRF, routes.

Operator pages need the token (a session cookie from /login, or `Authorization: Bearer`);
every POST needs a CSRF token unless it came with the bearer header (a header another site
cannot make a browser send). Portal pages need a valid link instead (worker.ui.portal).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from sqlalchemy import event

from worker.db.connection import create_engine
from worker.db.store import Store, open_store
from worker.settings import Settings
from worker.ui.auth import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, UiAuth
from worker.ui.queries import UiQueries

HERE = Path(__file__).parent
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_OPERATOR_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                 "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
# Paths that need no operator login.
_OPEN = ("/login", "/healthz", "/static/", "/portal/")


@dataclass
class UiContext:
    """What every handler shares: settings, auth, the store and its read queries."""

    settings: Settings
    auth: UiAuth
    portal_keys: tuple[bytes, ...]
    templates: jinja2.Environment
    clock: Callable[[], float] = time.time
    store: Store | None = None
    queries: UiQueries | None = None
    cache: dict[Any, tuple[float, Any]] = field(default_factory=dict)

    def db(self) -> tuple[Store, UiQueries]:
        assert self.store is not None and self.queries is not None, "app not started"
        return self.store, self.queries


CONTEXT = web.AppKey("webhooks_ui", UiContext)


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,  # payloads, errors and response excerpts are the receiver's text
        undefined=jinja2.StrictUndefined,
    )
    env.filters["datetime"] = lambda ts: datetime.fromtimestamp(ts, UTC).strftime(
        "%Y-%m-%d %H:%M")
    return env


def context_of(request: web.Request) -> UiContext:
    return request.app[CONTEXT]


def render(request: web.Request, name: str, status: int = 200, **values: Any) -> web.Response:
    ctx = context_of(request)
    session = _session(request)
    html = ctx.templates.get_template(name).render(
        csrf=ctx.auth.csrf_for(session) if session else "", csrf_field=CSRF_FIELD,
        path=request.path, **values)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _session(request: web.Request) -> str | None:
    """The request's valid session cookie, if any (its forms carry that session's CSRF)."""
    ctx = context_of(request)
    session = request.cookies.get(SESSION_COOKIE)
    return session if ctx.auth.session_ok(session, ctx.clock()) else None


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    return render(request, "error.html", status=status, status_code=status, message=message)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    ctx = context_of(request)
    h = response.headers
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "no-referrer")  # a portal link must not leak onward
    if request.path.startswith("/portal/") and ctx.settings.portal_frame_ancestors:
        h.setdefault("Content-Security-Policy", _OPERATOR_CSP.replace(
            "frame-ancestors 'none'", f"frame-ancestors {ctx.settings.portal_frame_ancestors}"))
    else:
        h.setdefault("Content-Security-Policy", _OPERATOR_CSP)
        h.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        h.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException) and response.status >= 300:
        raise response
    return response


@web.middleware
async def operator_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Operator pages: a valid session or bearer token; POSTs: a valid CSRF token too."""
    if request.path.startswith(_OPEN) or request.path == "/login":
        return await handler(request)
    ctx = context_of(request)
    session = request.cookies.get(SESSION_COOKIE)
    by_session = ctx.auth.session_ok(session, ctx.clock())
    by_bearer = ctx.auth.bearer_ok(request.headers.get("Authorization"))
    if not (by_session or by_bearer):
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPSeeOther(f"/login?next={_quote(request.path_qs)}")
        return web.Response(status=401, text="authentication required: log in at /login or "
                            "send Authorization: Bearer <WEBHOOKS_UI_TOKEN>\n",
                            headers={"WWW-Authenticate": 'Bearer realm="webhooks"'})
    if request.method not in ("GET", "HEAD") and not by_bearer:
        form = await request.post()
        offered = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not ctx.auth.csrf_ok(session, offered if isinstance(offered, str) else None):
            return error_page(request, 403, "This form has expired or did not come from this "
                              "page (CSRF check failed). Reload the page and try again.")
    return await handler(request)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _statement_timeout(seconds: float) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET statement_timeout = {int(seconds * 1000)}")
        cursor.execute("SET application_name = 'webhooks-ui'")
        cursor.close()

    return on_connect


async def _database(app: web.Application) -> AsyncIterator[None]:
    """The UI's own engine, made in the server's loop: a small pool, bounded statements."""
    ctx = app[CONTEXT]
    settings = ctx.settings.model_copy(update={"db_pool_size": 2})
    engine = create_engine(settings)
    if engine.dialect.name == "postgresql":
        # A page waits for the database at most this long; the worker's writes are not
        # blocked by the UI's reads in any case (MVCC).
        event.listen(engine.sync_engine, "connect", _statement_timeout(settings.ui_db_timeout))
    ctx.store = open_store(engine, settings)
    ctx.queries = UiQueries(engine, ctx.store.keys)
    try:
        yield
    finally:
        await engine.dispose()


def make_app(settings: Settings, token: str, portal_keys: tuple[bytes, ...], *,
             clock: Callable[[], float] = time.time) -> web.Application:
    """The UI application; its database engine is made when the server starts."""
    from worker.ui import pages, portal_pages

    app = web.Application(middlewares=[security_headers, operator_auth],
                          client_max_size=64 * 1024)
    app[CONTEXT] = UiContext(settings, UiAuth(token), portal_keys, templates(), clock)
    app.cleanup_ctx.append(_database)
    pages.add_routes(app)
    portal_pages.add_routes(app)
    app.router.add_static("/static/", HERE / "static")
    return app
