"""`webhooks`: migrate the database, manage endpoints, inspect and replay deliveries."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from sqlalchemy.exc import SQLAlchemyError

from worker.core.errors import WebhookError
from worker.core.ids import new_id
from worker.core.models import Endpoint
from worker.core.signing import generate_secret, secret_key
from worker.core.validation import validate_endpoint_id, validate_event_types, validate_url
from worker.db.connection import create_engine
from worker.db.store import Store
from worker.settings import Settings, get_settings

T = TypeVar("T")


def _with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = create_engine(settings)
        try:
            return await work(Store(engine))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _endpoint_json(ep: Endpoint) -> dict[str, Any]:
    return {"id": ep.id, "url": ep.url, "secrets": list(ep.secrets),
            "event_types": list(ep.event_types), "enabled": ep.enabled,
            "disabled_reason": ep.disabled_reason, "description": ep.description,
            "created_at": ep.created_at.isoformat() if ep.created_at else None}


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from worker.db.migrate import upgrade

    upgrade(settings.database_url, args.revision)
    print(f"database at revision {args.revision}: {_safe_url(settings)}")
    return 0


def _safe_url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.database_url).render_as_string(hide_password=True)


def cmd_endpoints_add(args: argparse.Namespace, settings: Settings) -> int:
    endpoint_id = validate_endpoint_id(args.id) if args.id else new_id("ep")
    url = validate_url(args.url)
    secret = args.secret or generate_secret()
    secret_key(secret)
    endpoint = Endpoint(id=endpoint_id, url=url, secrets=(secret,),
                        event_types=validate_event_types(args.event_type),
                        description=args.description)
    saved = _with_store(settings, lambda store: store.add_endpoint(endpoint))
    if args.json:
        _print_json(_endpoint_json(saved))
    else:
        print(f"endpoint {saved.id}\n  url     {saved.url}\n  secret  {saved.secrets[0]}")
        if saved.event_types:
            print(f"  events  {', '.join(saved.event_types)}")
    return 0


def cmd_endpoints_list(args: argparse.Namespace, settings: Settings) -> int:
    found = _with_store(settings, lambda store: store.list_endpoints())
    if args.json:
        _print_json([_endpoint_json(ep) for ep in found])
        return 0
    if not found:
        print("no endpoints")
    for ep in found:
        state = "enabled" if ep.enabled else f"disabled ({ep.disabled_reason})"
        types = ",".join(ep.event_types) or "*"
        print(f"{ep.id}\t{state}\t{types}\t{ep.url}")
    return 0


def cmd_endpoints_enable(args: argparse.Namespace, settings: Settings) -> int:
    enabled = args.action == "enable"
    _with_store(settings, lambda store: store.set_endpoint_enabled(
        args.id, enabled, None if enabled else (args.reason or "disabled by operator")))
    print(f"endpoint {args.id} {'enabled' if enabled else 'disabled'}")
    return 0


def cmd_endpoints_rotate(args: argparse.Namespace, settings: Settings) -> int:
    secret = args.secret or generate_secret()
    secret_key(secret)
    _with_store(settings, lambda store: store.rotate_secret(args.id, secret, not args.drop_old))
    print(f"endpoint {args.id} now signs with {secret}"
          + ("" if args.drop_old else " (and the previous secret, until rotated again)"))
    return 0


def cmd_deliveries_stats(args: argparse.Namespace, settings: Settings) -> int:
    counts = _with_store(settings, lambda store: store.status_counts())
    if args.json:
        _print_json(counts)
    else:
        for status in ("pending", "succeeded", "failed", "rejected"):
            print(f"{status:<10} {counts.get(status, 0)}")
    return 0


def cmd_deliveries_list(args: argparse.Namespace, settings: Settings) -> int:
    found = _with_store(settings, lambda store: store.list_deliveries(
        status=args.status, endpoint_id=args.endpoint, limit=args.limit))
    if args.json:
        _print_json([{k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}
                     for row in found])
        return 0
    for row in found:
        error = f"  {row['last_error']}" if row["last_error"] else ""
        print(f"{row['id']}  {row['status']:<9} {row['endpoint_id']}  attempts {row['attempts']}"
              f"  {row['created_at']:%Y-%m-%d %H:%M:%S}{error}")
    if not found:
        print("no deliveries")
    return 0


def cmd_deliveries_replay(args: argparse.Namespace, settings: Settings) -> int:
    if not args.id and not args.failed:
        raise WebhookError("name deliveries with --id, or pass --failed for every failed one")
    count = _with_store(settings, lambda store: store.replay(
        args.id or (), endpoint_id=args.endpoint, all_failed=args.failed))
    print(f"{count} deliveries queued for replay (the retry sweep picks them up)")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from worker.demo import run_demo

    return run_demo(events=args.events, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="webhooks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    up = db.add_parser("upgrade", help="apply migrations (DATABASE_URL)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)

    eps = sub.add_parser("endpoints", help="manage endpoints").add_subparsers(
        dest="endpoints", required=True)
    add = eps.add_parser("add", help="create an endpoint; prints its id and secret")
    add.add_argument("--url", required=True)
    add.add_argument("--id", help="endpoint id (default: generated ep_...)")
    add.add_argument("--secret", help="whsec_... (default: generated)")
    add.add_argument("--event-type", action="append", default=[],
                     help="subscribe to this event type (repeat; default: all)")
    add.add_argument("--description")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_endpoints_add)
    ls = eps.add_parser("list", help="list endpoints")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_endpoints_list)
    for action in ("enable", "disable"):
        p = eps.add_parser(action, help=f"{action} an endpoint")
        p.add_argument("id")
        if action == "disable":
            p.add_argument("--reason")
        p.set_defaults(func=cmd_endpoints_enable, action=action, reason=None)
    rot = eps.add_parser("rotate-secret", help="sign with a new secret (and the old one)")
    rot.add_argument("id")
    rot.add_argument("--secret")
    rot.add_argument("--drop-old", action="store_true", help="stop signing with the old one")
    rot.set_defaults(func=cmd_endpoints_rotate)

    dl = sub.add_parser("deliveries", help="inspect and replay deliveries").add_subparsers(
        dest="deliveries", required=True)
    st = dl.add_parser("stats", help="deliveries by status")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_deliveries_stats)
    li = dl.add_parser("list", help="the newest deliveries")
    li.add_argument("--status", choices=["pending", "succeeded", "failed", "rejected"])
    li.add_argument("--endpoint")
    li.add_argument("--limit", type=int, default=50)
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_deliveries_list)
    rp = dl.add_parser("replay", help="make failed deliveries pending again")
    rp.add_argument("--id", action="append", default=[])
    rp.add_argument("--failed", action="store_true", help="every failed delivery")
    rp.add_argument("--endpoint", help="only this endpoint's")
    rp.set_defaults(func=cmd_deliveries_replay)

    demo = sub.add_parser("demo", help="a real end-to-end run on the embedded defaults")
    demo.add_argument("--events", type=int, default=200)
    demo.add_argument("--keep", action="store_true", help="keep the demo database")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
        code: int = args.func(args, settings)
        return code
    except WebhookError as exc:
        print(f"webhooks: error: {exc}", file=sys.stderr)
        return 2
    except (SQLAlchemyError, OSError) as exc:
        print(f"webhooks: error: database {_safe_url(get_settings())}: "
              f"{type(exc).__name__}: {str(exc).splitlines()[0]} "
              "(is it reachable, and migrated with 'webhooks db upgrade'?)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
