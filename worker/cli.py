"""`webhooks`: migrate the database, manage endpoints, inspect and replay deliveries."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from worker.cli_support import print_json, with_store
from worker.core.errors import InvalidEndpoint, WebhookError
from worker.core.ids import new_id
from worker.core.models import Endpoint, EndpointPolicy, HttpResult, Ordering, OutcomeKind
from worker.core.netpolicy import refusal_for_url
from worker.core.sealing import generate_key
from worker.core.signing import (
    SIGNING_KEY_PREFIX,
    generate_secret,
    generate_signing_key,
    parse_signing_keys,
    public_key_of,
)
from worker.core.validation import (
    validate_endpoint_id,
    validate_event_types,
    validate_headers,
    validate_max_in_flight,
    validate_rate,
    validate_url,
)
from worker.db.connection import create_engine
from worker.db.store import Store, open_store
from worker.keys import load_keyring
from worker.settings import MAX_SECRET_OVERLAP, Settings, get_settings


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _circuit(ep: Endpoint) -> str:
    if ep.circuit_open_until is None:
        return "closed"
    if ep.circuit_open_until > datetime.now(UTC):
        return f"open until {_iso(ep.circuit_open_until)}"
    return "half-open (next attempt is the probe)"


def _public_keys(ep: Endpoint) -> list[str]:
    return [public_key_of(s) for s in ep.secrets if s.startswith(SIGNING_KEY_PREFIX)]


def _endpoint_json(ep: Endpoint, show_secret: bool = False) -> dict[str, Any]:
    """An endpoint for output; secrets and header values only when asked for."""
    p = ep.policy
    secrets: list[dict[str, Any]] = [
        {"scheme": "v1a" if s.startswith(SIGNING_KEY_PREFIX) else "v1",
         "signs_until": _iso(u), **({"secret": s} if show_secret else {})}
        for s, u in zip(ep.secrets, ep.secrets_until + (None,) * len(ep.secrets), strict=False)]
    return {
        "id": ep.id, "url": ep.url, "event_types": list(ep.event_types), "enabled": ep.enabled,
        "disabled_reason": ep.disabled_reason, "description": ep.description,
        "created_at": _iso(ep.created_at), "secrets": secrets, "public_keys": _public_keys(ep),
        "headers": {k: (v if show_secret else "(hidden)") for k, v in p.headers},
        "verify_tls": p.verify_tls, "max_in_flight": p.max_in_flight,
        "rate_limit": p.rate_limit, "rate_burst": p.rate_burst if p.rate_limit else None,
        "failure_streak": ep.failure_streak, "failing_since": _iso(ep.failing_since),
        "circuit": _circuit(ep), "credential_error": p.credential_error,
        "ordering": ep.ordering.value,
    }



def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from worker.db.migrate import upgrade

    upgrade(settings.database_url, args.revision)
    print(f"database at revision {args.revision}: {_safe_url(settings)}")
    return 0


def _safe_url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.database_url).render_as_string(hide_password=True)


def _new_secrets(scheme: str, given: str | None) -> tuple[str, ...]:
    """The secrets a new endpoint (or a rotation) starts with, newest first."""
    if given:
        parse_signing_keys([given])
        return (given,)
    if scheme == "v1":
        return (generate_secret(),)
    signing_key, _ = generate_signing_key()
    return (signing_key,) if scheme == "v1a" else (generate_secret(), signing_key)


def _print_new_secrets(secrets: Sequence[str]) -> None:
    for secret in secrets:
        if secret.startswith(SIGNING_KEY_PREFIX):
            print(f"  public key  {public_key_of(secret)}   (give this to the receiver)")
            print(f"  signing key {secret}   (shown once)")
        else:
            print(f"  secret      {secret}   (shown once)")


def _checked_url(url: str, settings: Settings) -> str:
    checked = validate_url(url)
    refusal = refusal_for_url(checked, settings.allowed_networks)
    if refusal is not None:
        raise InvalidEndpoint(refusal)
    return checked


def cmd_endpoints_add(args: argparse.Namespace, settings: Settings) -> int:
    endpoint_id = validate_endpoint_id(args.id) if args.id else new_id("ep")
    url = _checked_url(args.url, settings)
    secrets = _new_secrets(args.scheme, args.secret)
    if args.burst is not None and args.rate_limit is None:
        raise WebhookError("--burst needs --rate-limit")
    rate, burst = validate_rate(args.rate_limit, args.burst)
    policy = EndpointPolicy(headers=validate_headers(args.header),
                            verify_tls=not args.insecure_skip_tls_verify,
                            max_in_flight=validate_max_in_flight(args.max_in_flight),
                            rate_limit=rate, rate_burst=burst)
    endpoint = Endpoint(id=endpoint_id, url=url, secrets=secrets,
                        event_types=validate_event_types(args.event_type),
                        description=args.description, policy=policy,
                        ordering=Ordering(args.ordering or Ordering.NONE))
    saved = with_store(settings, lambda store: store.add_endpoint(endpoint))
    if args.json:
        print_json(_endpoint_json(saved, show_secret=True))
        return 0
    print(f"endpoint {saved.id}\n  url         {saved.url}")
    _print_new_secrets(saved.secrets)
    if saved.event_types:
        print(f"  events      {', '.join(saved.event_types)}")
    if not policy.verify_tls:
        print("  WARNING     TLS certificates are not verified (--insecure-skip-tls-verify)")
    return 0


def _show_endpoint(ep: Endpoint, show_secret: bool) -> None:
    data = _endpoint_json(ep, show_secret)
    state = "enabled" if ep.enabled else f"disabled: {ep.disabled_reason}"
    print(f"{ep.id}  {state}\n  url          {ep.url}")
    print(f"  events       {', '.join(ep.event_types) or '*'}")
    for item in data["secrets"]:
        until = f" (signs until {item['signs_until']})" if item["signs_until"] else ""
        print(f"  signs with   {item['scheme']}{until}"
              + (f"  {item['secret']}" if show_secret else ""))
    for key in data["public_keys"]:
        print(f"  public key   {key}")
    for name, value in data["headers"].items():
        print(f"  header       {name}: {value}")
    limit = f"{ep.policy.rate_limit:g}/s, burst {ep.policy.rate_burst}" \
        if ep.policy.rate_limit else "none (global default)"
    print(f"  rate limit   {limit}")
    print(f"  in flight    {ep.policy.max_in_flight or 'global default'}")
    print(f"  TLS verify   {'yes' if ep.policy.verify_tls else 'NO (testing only)'}")
    print("  ordering     " + ("fifo: one at a time per ordering key, in enqueue order"
                              if ep.ordering is Ordering.FIFO else "none"))
    print(f"  circuit      {data['circuit']}; {ep.failure_streak} failures in a row"
          + (f" since {data['failing_since']}" if ep.failing_since else ""))
    if ep.policy.credential_error:
        print(f"  ERROR        {ep.policy.credential_error}")


def cmd_endpoints_list(args: argparse.Namespace, settings: Settings) -> int:
    found = with_store(settings, lambda store: store.list_endpoints())
    if args.json:
        print_json([_endpoint_json(ep, args.show_secret) for ep in found])
        return 0
    if not found:
        print("no endpoints")
    for ep in found:
        state = "enabled" if ep.enabled else f"disabled ({ep.disabled_reason})"
        types = ",".join(ep.event_types) or "*"
        print(f"{ep.id}\t{state}\tcircuit {_circuit(ep)}\t{types}\t{ep.url}")
        if args.show_secret:
            for secret in ep.secrets:
                print(f"\t{secret}")
            for name, value in ep.policy.headers:
                print(f"\t{name}: {value}")
    return 0


def cmd_endpoints_show(args: argparse.Namespace, settings: Settings) -> int:
    ep = with_store(settings, lambda store: store.get_endpoint(args.id))
    if args.json:
        print_json(_endpoint_json(ep, args.show_secret))
    else:
        _show_endpoint(ep, args.show_secret)
    return 0


def cmd_endpoints_update(args: argparse.Namespace, settings: Settings) -> int:
    changes: dict[str, Any] = {}
    if args.url is not None:
        changes["url"] = _checked_url(args.url, settings)
    if args.event_type:
        changes["event_types"] = list(validate_event_types(args.event_type))
    if args.all_events:
        changes["event_types"] = []
    if args.description is not None:
        changes["description"] = args.description
    _conflicts(args, ("verify_tls", "insecure_skip_tls_verify"), ("all_events", "event_type"),
               ("no_rate_limit", "rate_limit"), ("no_rate_limit", "burst"),
               ("clear_headers", "header"))
    if args.rate_limit is not None:
        rate, burst = validate_rate(args.rate_limit, args.burst)
        changes["rate_limit"] = rate
        if args.burst is not None:
            changes["rate_burst"] = burst
    elif args.burst is not None:
        validate_rate(None, args.burst)
        changes["rate_burst"] = args.burst  # the endpoint's own rate stays; checked below
    if args.no_rate_limit:
        changes.update(rate_limit=None, rate_burst=None)
    if args.max_in_flight is not None:
        changes["max_in_flight"] = validate_max_in_flight(args.max_in_flight) or None
    if args.insecure_skip_tls_verify or args.verify_tls:
        changes["verify_tls"] = bool(args.verify_tls)
    if args.ordering is not None:
        changes["ordering"] = args.ordering
    headers = validate_headers(args.header) if args.header or args.clear_headers else None
    if not changes and headers is None:
        raise WebhookError("nothing to change: pass at least one option (see --help)")

    async def work(store: Store) -> Endpoint:
        if "rate_burst" in changes and "rate_limit" not in changes:
            current = await store.get_endpoint(args.id)
            if current.policy.rate_limit is None:
                raise WebhookError(f"endpoint {args.id!r} has no rate limit: give --rate-limit "
                                   "with --burst")
        if headers is not None:
            await store.set_headers(args.id, headers)
        return await store.update_endpoint(args.id, **changes)

    ep = with_store(settings, work)
    if args.json:
        print_json(_endpoint_json(ep))
    else:
        _show_endpoint(ep, False)
    return 0


def cmd_endpoints_test(args: argparse.Namespace, settings: Settings) -> int:
    """Send one signed `webhook.test` event now, from here, and show how it went."""
    from worker.core.ids import new_id
    from worker.core.models import Delivery
    from worker.core.outcome import classify
    from worker.delivery.sender import Sender, SenderConfig

    async def run() -> tuple[Delivery, HttpResult]:
        engine = create_engine(settings)
        try:
            ep = await open_store(engine, settings).get_endpoint(args.id)
        finally:
            await engine.dispose()
        now = datetime.now(UTC)
        body = orjson.dumps({"type": "webhook.test", "timestamp": now.isoformat(),
                             "data": {"endpoint": ep.id, "message": args.message}})
        delivery = Delivery(id=new_id("msg"), endpoint_id=ep.id, url=ep.url,
                            secrets=ep.signing_secrets(now), payload=body,
                            event_type="webhook.test", policy=ep.policy)
        async with Sender(SenderConfig.from_settings(settings)) as sender:
            return delivery, await sender.send(delivery)

    delivery, result = asyncio.run(run())
    outcome = classify(result)
    report = {"endpoint": args.id, "webhook_id": delivery.id, "outcome": outcome.kind.value,
              "status": result.status_code, "duration_ms": round(result.duration_ms, 1),
              "error_kind": outcome.error_kind.value if outcome.error_kind else None,
              "error": outcome.error, "response_excerpt": result.response_excerpt}
    if args.json:
        print_json(report)
    else:
        status = result.status_code if result.status_code is not None else "-"
        print(f"test event {delivery.id} to {args.id}: {outcome.kind.value} (HTTP {status}, "
              f"{result.duration_ms:.0f} ms)")
        if outcome.error:
            print(f"  error     {outcome.error}")
        if result.response_excerpt:
            print(f"  response  {result.response_excerpt[:500]}")
    return 0 if outcome.kind is OutcomeKind.SUCCESS else 1


def cmd_endpoints_delete(args: argparse.Namespace, settings: Settings) -> int:
    with_store(settings, lambda store: store.delete_endpoint(args.id))
    if args.json:
        print_json({"id": args.id, "deleted": True})
    else:
        print(f"endpoint {args.id} deleted (its delivery history stays until retention)")
    return 0


def cmd_endpoints_enable(args: argparse.Namespace, settings: Settings) -> int:
    enabled = args.action == "enable"
    resumed = with_store(settings, lambda store: store.set_endpoint_enabled(
        args.id, enabled, None if enabled else (args.reason or "disabled by operator")))
    if args.json:
        print_json({"id": args.id, "enabled": enabled, "resumed": resumed})
    elif enabled:
        print(f"endpoint {args.id} enabled; {resumed} held deliveries resumed")
    else:
        print(f"endpoint {args.id} disabled; its new and due deliveries are held until enabled")
    return 0


def cmd_endpoints_rotate(args: argparse.Namespace, settings: Settings) -> int:
    secrets = _new_secrets("v1a" if args.scheme == "both" else args.scheme, args.secret)
    if args.drop_old and args.overlap is not None:
        raise WebhookError("give --overlap or --drop-old, not both")
    overlap = 0.0 if args.drop_old else (
        settings.secret_overlap if args.overlap is None else args.overlap)
    if not (math.isfinite(overlap) and 0 <= overlap <= MAX_SECRET_OVERLAP):
        raise WebhookError(f"--overlap must be 0..{MAX_SECRET_OVERLAP:.0f} seconds, "
                           f"not {overlap}")
    ep = with_store(settings, lambda store: store.rotate_secret(
        args.id, secrets[0], overlap_seconds=overlap))
    if args.json:
        print_json(_endpoint_json(ep, show_secret=True))
        return 0
    print(f"endpoint {args.id} now signs with:")
    _print_new_secrets(secrets)
    older = len(ep.secrets) - 1
    print(f"  and {older} previous secret(s) for their overlap ({overlap:g}s)" if older
          else "  and nothing else")
    return 0


def cmd_keys_generate(args: argparse.Namespace, settings: Settings) -> int:
    print(generate_key(args.key_id))
    return 0


def cmd_keys_status(args: argparse.Namespace, settings: Settings) -> int:
    keys = load_keyring(settings)
    usage = with_store(settings, lambda store: store.key_usage())
    if args.json:
        print_json({"sealing_key": keys.sealing_key_id, "keys": list(keys.key_ids),
                     "endpoints_by_key": usage})
        return 0
    print(f"sealing key {keys.sealing_key_id}; keys held: {', '.join(keys.key_ids)}")
    for kid, count in sorted(usage.items()):
        known = "" if kid in keys.key_ids else "   NOT IN THE RING: these cannot be opened"
        print(f"  {kid:<16} {count} endpoints{known}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace, settings: Settings) -> int:
    keys = load_keyring(settings)
    done = with_store(settings, lambda store: store.reseal(args.chunk))
    if args.json:
        print_json({"sealing_key": keys.sealing_key_id, "resealed": done})
    else:
        print(f"{done} endpoints re-sealed under key {keys.sealing_key_id}")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from worker.demo import run_demo

    return run_demo(events=args.events, keep=args.keep)


def cmd_metrics(args: argparse.Namespace, settings: Settings) -> int:
    from worker.metrics import run_exporter

    return run_exporter(settings, args.host or settings.metrics_host, args.port,
                        process=not args.db_only, database=not args.no_db, once=args.once)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="webhooks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    up = db.add_parser("upgrade", help="apply migrations (DATABASE_URL)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)

    eps = sub.add_parser("endpoints", help="manage endpoints").add_subparsers(
        dest="endpoints", required=True)
    add = eps.add_parser("add", help="create an endpoint; prints its id and secret once")
    add.add_argument("--url", required=True)
    add.add_argument("--id", help="endpoint id (default: generated ep_...)")
    add.add_argument("--secret", help="whsec_... or whsk_... (default: generated)")
    add.add_argument("--scheme", choices=["v1", "v1a", "both"], default="v1",
                     help="v1: HMAC (whsec_), v1a: Ed25519 (whsk_/whpk_), both: during a move")
    add.add_argument("--event-type", action="append", default=[],
                     help="subscribe to this event type (repeat; default: all)")
    add.add_argument("--description")
    _policy_options(add)
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_endpoints_add)
    ls = eps.add_parser("list", help="list endpoints (secrets hidden)")
    ls.add_argument("--show-secret", action="store_true", help="print secrets and header values")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_endpoints_list)
    show = eps.add_parser("show", help="one endpoint: limits, circuit, health")
    show.add_argument("id")
    show.add_argument("--show-secret", action="store_true", help="print secrets and header values")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_endpoints_show)
    upd = eps.add_parser("update", help="change an endpoint's URL, events, limits, headers")
    upd.add_argument("id")
    upd.add_argument("--url")
    upd.add_argument("--event-type", action="append", default=[], help="replace the event types")
    upd.add_argument("--all-events", action="store_true", help="subscribe to every type")
    upd.add_argument("--description")
    _policy_options(upd)
    upd.add_argument("--no-rate-limit", action="store_true", help="remove the rate limit")
    upd.add_argument("--clear-headers", action="store_true", help="remove the static headers")
    upd.add_argument("--verify-tls", action="store_true", help="verify certificates again")
    upd.add_argument("--json", action="store_true")
    upd.set_defaults(func=cmd_endpoints_update)
    tst = eps.add_parser("test", help="send one signed test event now and show the attempt")
    tst.add_argument("id")
    tst.add_argument("--message", default="a test event from `webhooks endpoints test`")
    tst.add_argument("--json", action="store_true")
    tst.set_defaults(func=cmd_endpoints_test)
    dele = eps.add_parser("delete", help="remove an endpoint (its history stays)")
    dele.add_argument("id")
    dele.add_argument("--json", action="store_true")
    dele.set_defaults(func=cmd_endpoints_delete)
    for action in ("enable", "disable"):
        p = eps.add_parser(action, help=f"{action} an endpoint" + (
            " and resume its held deliveries" if action == "enable" else ""))
        p.add_argument("id")
        if action == "disable":
            p.add_argument("--reason")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_endpoints_enable, action=action, reason=None)
    rot = eps.add_parser("rotate-secret",
                         help="sign with a new secret; the old ones keep signing for an overlap")
    rot.add_argument("id")
    rot.add_argument("--secret", help="whsec_... or whsk_... (default: generated)")
    rot.add_argument("--scheme", choices=["v1", "v1a"], default="v1",
                     help="what to generate: v1 (whsec_) or v1a (whsk_, Ed25519)")
    rot.add_argument("--overlap", type=float,
                     help="seconds the previous secrets keep signing (WEBHOOKS_SECRET_OVERLAP, "
                          "default 86400)")
    rot.add_argument("--drop-old", action="store_true", help="stop signing with the old ones now")
    rot.add_argument("--json", action="store_true")
    rot.set_defaults(func=cmd_endpoints_rotate)

    keys = sub.add_parser("keys", help="the keys that seal endpoint secrets").add_subparsers(
        dest="keys", required=True)
    gen = keys.add_parser("generate", help="print a new key for WEBHOOKS_SECRET_KEYS")
    gen.add_argument("--key-id", help="its id (default: generated)")
    gen.set_defaults(func=cmd_keys_generate)
    kst = keys.add_parser("status", help="which key seals how many endpoints")
    kst.add_argument("--json", action="store_true")
    kst.set_defaults(func=cmd_keys_status)
    krot = keys.add_parser("rotate", help="re-seal every endpoint under the first key")
    krot.add_argument("--chunk", type=_positive_int, default=500, help="rows per transaction")
    krot.add_argument("--json", action="store_true")
    krot.set_defaults(func=cmd_keys_rotate)

    met = sub.add_parser("metrics", help="serve Prometheus metrics: this host's worker processes "
                         "(WEBHOOKS_METRICS_DIR) and the database's gauges")
    met.add_argument("--port", type=int, default=9464, help="default 9464; 0: any free port")
    met.add_argument("--host", help="address to listen on (default WEBHOOKS_METRICS_HOST)")
    only = met.add_mutually_exclusive_group()
    only.add_argument("--db-only", action="store_true",
                      help="only the database gauges (the same from every host: serve them once)")
    only.add_argument("--no-db", action="store_true", help="only this host's worker processes")
    met.add_argument("--once", action="store_true", help="print the metrics once and exit")
    met.set_defaults(func=cmd_metrics)

    from worker.cli_deliveries import add_deliveries_commands

    add_deliveries_commands(sub)

    from worker.cli_ui import add_ui_commands

    add_ui_commands(sub)

    demo = sub.add_parser("demo", help="a real end-to-end run on the embedded defaults")
    demo.add_argument("--events", type=int, default=200)
    demo.add_argument("--keep", action="store_true", help="keep the demo database")
    demo.set_defaults(func=cmd_demo)
    return parser


def _conflicts(args: argparse.Namespace, *pairs: tuple[str, str]) -> None:
    """Refuse options that contradict each other, rather than letting one silently win."""
    for first, second in pairs:
        if getattr(args, first) and getattr(args, second) not in (None, False, []):
            raise WebhookError(f"--{first.replace('_', '-')} and --{second.replace('_', '-')} "
                               "contradict each other")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _policy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="a static header sent with every delivery (repeat; sealed)")
    parser.add_argument("--rate-limit", type=float, metavar="PER_SECOND",
                        help="deliveries per second, across all workers")
    parser.add_argument("--burst", type=int, help="rate-limit burst (default 1)")
    parser.add_argument("--max-in-flight", type=int,
                        help="attempts at once (default WEBHOOKS_PER_ENDPOINT_LIMIT)")
    parser.add_argument("--ordering", choices=[o.value for o in Ordering],
                        help="fifo: one delivery at a time per ordering key, in enqueue order "
                        "(see README 'Ordered delivery'); none: any order (default)")
    parser.add_argument("--insecure-skip-tls-verify", action="store_true",
                        help="do not verify TLS certificates: for testing only")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        print(f"webhooks: error: configuration: {where}: {first['msg']}", file=sys.stderr)
        return 2
    try:
        code: int = args.func(args, settings)
        return code
    except WebhookError as exc:
        print(f"webhooks: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader stopped reading (`| head`): not the database's fault. Output goes to
        # /dev/null from here, so the flush at exit does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (SQLAlchemyError, OSError) as exc:
        print(f"webhooks: error: database {_safe_url(get_settings())}: "
              f"{type(exc).__name__}: {str(exc).splitlines()[0]} "
              "(is it reachable, and migrated with 'webhooks db upgrade'?)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
