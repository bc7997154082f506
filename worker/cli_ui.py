"""`webhooks ui` (the web UI) and `webhooks portal-link` (a partner's signed, expiring link).

Every bad input ends in one line on stderr and exit code 2 (worker.cli.main turns a
WebhookError into that line).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from worker.cli_support import print_json, with_store
from worker.core.errors import WebhookError
from worker.core.validation import validate_endpoint_id
from worker.keys import load_keyring
from worker.settings import Settings
from worker.ui.auth import is_loopback, new_token
from worker.ui.portal import parse_duration, portal_keys, sign_link

MIN_TOKEN_LENGTH = 16


def _base_url(settings: Settings, host: str, port: int) -> str:
    if settings.ui_public_url:
        return settings.ui_public_url
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _keys_for_links(settings: Settings) -> tuple[bytes, ...]:
    secret = settings.ui_secret.get_secret_value() if settings.ui_secret else None
    return portal_keys(secret, None if secret else load_keyring(settings))


def _ready_database(settings: Settings) -> None:
    """Refuse a database not at the code's revision, except a brand-new embedded SQLite file,
    which is made (as the key file next to it is) so the UI runs on the defaults."""
    from worker.db.migrate import SchemaProblem, check_schema, upgrade

    url = make_url(settings.database_url)
    fresh = (url.get_backend_name() == "sqlite" and bool(url.database)
             and url.database != ":memory:" and not Path(str(url.database)).exists())
    if fresh:
        upgrade(settings.database_url)
        print(f"webhooks ui: created the database {url.database}", file=sys.stderr)
        return
    try:
        check_schema(settings.database_url)
    except SchemaProblem as exc:
        raise WebhookError(str(exc)) from None


def cmd_ui(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from worker.ui.app import make_app

    host = args.host or settings.ui_host
    port = settings.ui_port if args.port is None else args.port
    given = settings.ui_token.get_secret_value() if settings.ui_token else None
    if given is None and not is_loopback(host):
        raise WebhookError(f"refusing to serve the UI on {host}, which is not a loopback "
                           "address, without WEBHOOKS_UI_TOKEN: set it to a long random "
                           "string (e.g. `openssl rand -base64 24`)")
    if given is not None and len(given) < MIN_TOKEN_LENGTH:
        raise WebhookError(f"WEBHOOKS_UI_TOKEN must be at least {MIN_TOKEN_LENGTH} characters")
    token = given or new_token()
    links = _keys_for_links(settings)  # and the key ring opens, before anything is served
    _ready_database(settings)
    app = make_app(settings, token, links)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise WebhookError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        bound = runner.addresses[0][1] if runner.addresses else port
        base = _base_url(settings, host, bound)
        print(f"webhooks ui: serving {base} (database "
              f"{make_url(settings.database_url).render_as_string(hide_password=True)})",
              flush=True)
        if given is None:
            print(f"webhooks ui: log in at {base}/login?token={token}\n"
                  "  (a token made for this run; set WEBHOOKS_UI_TOKEN to keep one)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())
    return 0


def cmd_portal_link(args: argparse.Namespace, settings: Settings) -> int:
    endpoint_id = validate_endpoint_id(args.endpoint)
    seconds = parse_duration(args.expires)
    keys = _keys_for_links(settings)
    with_store(settings, lambda store: store.get_endpoint(endpoint_id))  # it must exist
    expires = int(time.time()) + seconds
    base = (args.base_url or _base_url(settings, settings.ui_host, settings.ui_port)).rstrip("/")
    url = f"{base}/portal/{sign_link(keys, endpoint_id, expires)}"
    if args.json:
        print_json({"endpoint": endpoint_id, "url": url, "expires_at": expires})
    else:
        print(url)
    return 0


def add_ui_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`webhooks ui` and `webhooks portal-link` on the CLI's subcommands."""
    ui = sub.add_parser("ui", help="serve the web UI (overview, endpoints, deliveries, portal)")
    ui.add_argument("--host", help="address to listen on (default WEBHOOKS_UI_HOST, 127.0.0.1)")
    ui.add_argument("--port", type=int, help="port (default WEBHOOKS_UI_PORT, 8400; 0: any)")
    ui.set_defaults(func=cmd_ui)

    pl = sub.add_parser("portal-link", help="print a signed, expiring URL showing one "
                        "endpoint's deliveries to its partner")
    pl.add_argument("endpoint")
    pl.add_argument("--expires", default="7d", help="how long it works: 30m, 12h, 7d, 2w (7d)")
    pl.add_argument("--base-url", help="where the UI is reached (default WEBHOOKS_UI_PUBLIC_URL)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_portal_link)
