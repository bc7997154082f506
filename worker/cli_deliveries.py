"""`webhooks deliveries ...`: list, show, replay, resend, recover, stats.

Every command takes `--json`; every bad input ends in one line on stderr and exit code 2
(worker.cli.main turns a WebhookError into that line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from worker.cli_support import print_json, with_store
from worker.core.errors import WebhookError
from worker.core.models import DeliveryStatus, OutcomeKind
from worker.db.store import Store
from worker.settings import Settings

STATUSES = tuple(s.value for s in DeliveryStatus)
BLOCKED = "blocked"  # `--status blocked`: failed, the last attempt refused by the network policy
MAX_LIMIT = 10_000
MAX_IDS = 1000  # --id given this many times at most
PAYLOAD_SHOWN = 4096  # characters of the (pretty-printed) payload `show` prints
PAYLOAD_READ = 65_536  # bytes read to pretty-print; a bigger payload is shown raw, cut
ATTEMPTS_SHOWN = 1000  # the newest attempts `show` lists
TASK_DELIVERIES_SHOWN = 5000  # deliveries of one task `show <task id>` lists (a batch: ≤ 1000)
ERROR_WIDTH = 60  # of the last error in `list`
EXCERPT_WIDTH = 200  # of a response excerpt in plain `show`
CELL_WIDTH = 40  # of an endpoint id or event type in `list`

_AGE = re.compile(r"([0-9]{1,9})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other refusal of the CLI."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("webhooks ").strip()
        self.exit(2, f"webhooks: error: {command}: {message} (see --help)\n")


# -- small helpers ---------------------------------------------------------------------------





def _refuse(line: str) -> None:
    print(f"webhooks: error: {line}", file=sys.stderr)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value else "-"


def _clip(text: str | None, width: int) -> str:
    """One line of at most `width` characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()
            for cells in (headers, *rows)]


def parse_when(text: str, option: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when it names no zone) or an age before `now` (30m, 2h, 7d, 1w)."""
    spelled = text.strip()
    age = _AGE.fullmatch(spelled)
    try:
        if age:
            return now - timedelta(seconds=int(age[1]) * _UNIT_SECONDS[age[2]])
        when = datetime.fromisoformat(spelled)
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except OverflowError:
        raise WebhookError(f"{option} {text!r} is too far back") from None
    except ValueError:
        raise WebhookError(f"{option} {text!r} is neither a time (2024-05-01T12:00:00Z) nor "
                           "an age (30m, 2h, 7d)") from None


def _window(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    now = datetime.now(UTC)
    since = parse_when(args.since, "--since", now) if args.since is not None else None
    until = parse_when(args.until, "--until", now) if args.until is not None else None
    if since is not None and until is not None and since >= until:
        raise WebhookError(f"--since ({since.isoformat(timespec='seconds')}) must be before "
                           f"--until ({until.isoformat(timespec='seconds')})")
    return since, until


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise WebhookError(f"--limit must be a whole number from 1 to {MAX_LIMIT}, not {text!r}")
    return value


def _delivery_json(row: dict[str, Any]) -> dict[str, Any]:
    """A delivery for output. `attempts` counts every attempt made, across replays;
    `retry_attempts` those counted against the current retry budget (since the last replay)."""
    return {
        "id": row["id"], "task_id": row.get("task_id"), "status": row["status"],
        "endpoint_id": row["endpoint_id"],
        "event_type": row["event_type"], "idempotency_key": row["idempotency_key"],
        "attempts": row["attempts_total"],
        "retry_attempts": row["attempts"] - row.get("retry_base", 0),
        "next_attempt_at": _iso(row["next_attempt_at"]),
        "last_status_code": row["last_status_code"], "last_error": row["last_error"],
        "last_outcome": row["last_outcome"],
        "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
    }


def _attempt_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "number": row["number"],
        "attempted_at": _iso(row["attempted_at"]), "status_code": row["status_code"],
        "outcome": row["outcome"], "error_kind": row["error_kind"],
        "duration_ms": row["duration_ms"], "error": row["error"],
        "response_excerpt": row["response_excerpt"],
    }


def render_payload(head: bytes | None, size: int | None) -> tuple[str, bool]:
    """The payload as text, JSON pretty-printed when it is whole and parses, at most
    PAYLOAD_SHOWN characters; and whether anything was left out."""
    if head is None or size is None:
        return "", False
    whole = size <= len(head)
    text = bytes(head).decode("utf-8", errors="replace")
    if whole:
        # Not JSON (a rejected event's excerpt), or nested too deep to print: shown as it is.
        with contextlib.suppress(ValueError, RecursionError):
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    cut = len(text) > PAYLOAD_SHOWN
    return text[:PAYLOAD_SHOWN], cut or not whole


# -- commands --------------------------------------------------------------------------------


def cmd_deliveries_stats(args: argparse.Namespace, settings: Settings) -> int:
    counts = with_store(settings, lambda store: store.status_counts())
    if args.json:
        print_json(counts)
    else:
        for status in STATUSES:
            print(f"{status:<10} {counts.get(status, 0)}")
    return 0


def _print_deliveries(found: Sequence[dict[str, Any]]) -> None:
    """One table row per delivery: id, status, endpoint, type, attempts, created, last error."""
    rows = [[row["id"], row["status"], _clip(row["endpoint_id"], CELL_WIDTH),
             _clip(row["event_type"], CELL_WIDTH) or "-", str(row["attempts_total"]),
             _when(row["created_at"]), _clip(row["last_error"], ERROR_WIDTH)]
            for row in found]
    for line in _table(["ID", "STATUS", "ENDPOINT", "EVENT TYPE", "ATTEMPTS", "CREATED (UTC)",
                        "LAST ERROR"], rows):
        print(line)


def cmd_deliveries_list(args: argparse.Namespace, settings: Settings) -> int:
    status, blocked = args.status, args.blocked
    if status is not None and status not in (*STATUSES, BLOCKED):
        raise WebhookError(f"--status must be one of {', '.join((*STATUSES, BLOCKED))}, "
                           f"not {status!r}")
    if status == BLOCKED:
        status, blocked = DeliveryStatus.FAILED.value, True
    limit = _limit(args.limit)
    since, until = _window(args)
    found = with_store(settings, lambda store: store.list_deliveries(
        status=status, endpoint_id=args.endpoint, event_type=args.event_type, since=since,
        until=until, blocked=blocked, limit=limit))
    if args.json:
        print_json([_delivery_json(row) for row in found])
        return 0
    if not found:
        print("no deliveries")
        return 0
    _print_deliveries(found)
    return 0


def _next_step(row: dict[str, Any]) -> str | None:
    status, delivery_id = row["status"], row["id"]
    if status == DeliveryStatus.FAILED.value:
        return f"webhooks deliveries replay --id {delivery_id}"
    if status == DeliveryStatus.SUCCEEDED.value:
        return f"webhooks deliveries resend {delivery_id}   (sends a copy with a new id)"
    if status == DeliveryStatus.HELD.value:
        return f"webhooks endpoints enable {row['endpoint_id']}   (resumes it)"
    return None


def cmd_deliveries_show(args: argparse.Namespace, settings: Settings) -> int:
    """One delivery by its id; or, given a Celery task id, what that task's message became:
    its one delivery in full, or a table of them (batch, fan-out)."""
    async def work(store: Store) -> tuple[dict[str, Any], list[dict[str, Any]], int] | list[
            dict[str, Any]]:
        row = await store.get_delivery(args.id, PAYLOAD_READ)
        if row is None:
            of_task = await store.task_deliveries(args.id, TASK_DELIVERIES_SHOWN)
            if len(of_task) != 1:
                return of_task
            row = await store.get_delivery(of_task[0]["id"], PAYLOAD_READ)
            if row is None:  # deleted in between
                return []
        tried, total = await store.delivery_attempts(row["id"], ATTEMPTS_SHOWN)
        return row, tried, total

    found = with_store(settings, work)
    if isinstance(found, list):
        return _show_task(args, found)
    row, tried, total = found
    payload, cut = render_payload(row["payload_head"], row["payload_size"])
    if args.json:
        print_json({
            "delivery": {**_delivery_json(row), "payload": payload,
                         "payload_bytes": row["payload_size"], "payload_truncated": cut},
            "attempts": [_attempt_json(a) for a in tried],
            "attempts_left_out": total - len(tried),
        })
        return 0
    # The last outcome adds to the status only when it says why (blocked, 410 Gone).
    outcome = (f" (last attempt: {row['last_outcome']})"
               if row["last_outcome"] in (OutcomeKind.BLOCKED.value, OutcomeKind.DISABLE.value)
               else "")
    since = row["attempts"] - row.get("retry_base", 0)
    budget = f"; {since} since the last replay" if row.get("retry_base") else ""
    code, error = row["last_status_code"], _clip(row["last_error"], 500)
    last = "; ".join(part for part in (
        f"HTTP {code}" if code and not error.startswith(f"HTTP {code}") else "", error) if part)
    print(f"delivery     {row['id']}")
    for label, value in (
        ("status", f"{row['status']}{outcome}"),
        ("endpoint", row["endpoint_id"]),
        ("task", row.get("task_id") or "-"),
        ("event type", row["event_type"] or "-"),
        ("attempts", f"{row['attempts_total']}{budget}"),
        ("next attempt", _when(row["next_attempt_at"])
         if row["status"] == DeliveryStatus.PENDING.value else "-"),
        ("created", _when(row["created_at"])),
        ("updated", _when(row["updated_at"])),
        ("last result", last or "-"),
        ("next step", _next_step(row) or "-"),
    ):
        print(f"{label:<12} {value}")
    size = row["payload_size"]
    print(f"payload      {'none' if size is None else f'{size} bytes'}"
          + (f" (the first {PAYLOAD_SHOWN} characters)" if cut else ""))
    for line in payload.splitlines():
        print(f"  {line}")
    if not tried:
        print("attempts     none yet")
        return 0
    print("attempts" + (f" (the newest {len(tried)} of {total})" if total > len(tried) else ""))
    table = _table(["#", "TIME (UTC)", "CODE", "OUTCOME", "KIND", "MS", "ERROR"], [
        [str(a["number"]), _when(a["attempted_at"]),
         str(a["status_code"] or "-"), a["outcome"], a["error_kind"] or "-",
         f"{a['duration_ms']:.0f}", _clip(a["error"], ERROR_WIDTH)] for a in tried])
    print(f"  {table[0]}")
    for attempt, line in zip(tried, table[1:], strict=True):
        print(f"  {line}")
        if attempt["response_excerpt"]:
            print(f"      response: {_clip(attempt['response_excerpt'], EXCERPT_WIDTH)}")
    return 0


def _show_task(args: argparse.Namespace, found: list[dict[str, Any]]) -> int:
    """The deliveries of Celery task `args.id` (none: neither a delivery nor a task id)."""
    if not found:
        raise WebhookError(f"no delivery with id {args.id!r}, and no task with that id")
    if args.json:
        print_json({"task_id": args.id, "deliveries": [_delivery_json(row) for row in found]})
        return 0
    print(f"task {args.id}: {len(found)} deliveries"
          + (f" (the first {TASK_DELIVERIES_SHOWN})" if len(found) >= TASK_DELIVERIES_SHOWN
             else ""))
    _print_deliveries(found)
    print(f"one of them: webhooks deliveries show {found[0]['id']}")
    return 0


def _why_not(delivery_id: str, found: tuple[str, str] | None, action: str) -> str:
    """Why `delivery_id` (its status and endpoint, if it exists) was not replayed/resent."""
    if found is None:
        return f"no delivery with id {delivery_id!r}"
    status, endpoint_id = found
    if status == DeliveryStatus.REJECTED.value:
        return (f"delivery {delivery_id!r} cannot be {action}: rejected events were never "
                "accepted")
    if status == DeliveryStatus.HELD.value:
        return (f"delivery {delivery_id!r} is held because endpoint {endpoint_id!r} is "
                f"disabled: 'webhooks endpoints enable {endpoint_id}' resumes it")
    if status == DeliveryStatus.PENDING.value:
        return f"delivery {delivery_id!r} is pending already: its next attempt is scheduled"
    if status == DeliveryStatus.SUCCEEDED.value:
        return (f"delivery {delivery_id!r} succeeded: 'webhooks deliveries resend "
                f"{delivery_id}' sends a copy as a new delivery")
    return f"delivery {delivery_id!r} changed while being {action} ({status}): try again"


def cmd_deliveries_replay(args: argparse.Namespace, settings: Settings) -> int:
    ids = list(dict.fromkeys(args.id))
    if ids and args.failed:
        raise WebhookError("give --id or --failed, not both")
    if not ids and not args.failed:
        raise WebhookError("name deliveries with --id, or pass --failed for every failed one")
    if ids and (args.endpoint is not None or args.since is not None or args.until is not None):
        raise WebhookError("--endpoint, --since and --until choose among failed deliveries: "
                           "use them with --failed, not --id")
    if len(ids) > MAX_IDS:
        raise WebhookError(f"at most {MAX_IDS} --id at once, not {len(ids)}")
    since, until = _window(args)
    refused: list[dict[str, Any]] = []
    done: list[str] = []
    if ids:
        async def work(store: Store) -> tuple[list[str], dict[str, tuple[str, str]]]:
            replayed_ids = await store.replay_ids(ids)
            taken = set(replayed_ids)
            return replayed_ids, await store.delivery_statuses(
                [i for i in ids if i not in taken])

        done, others = with_store(settings, work)
        replayed = len(done)
        for delivery_id in ids:
            if delivery_id not in done:
                found = others.get(delivery_id)
                refused.append({"id": delivery_id, "status": found[0] if found else None,
                                "reason": _why_not(delivery_id, found, "replayed")})
    else:
        replayed = with_store(settings, lambda store: store.replay_failed(
            endpoint_id=args.endpoint, since=since, until=until))
    if args.json:
        print_json({"replayed": replayed, **({"ids": done} if ids else {}),
                     "refused": refused})
    else:
        print(f"{replayed} deliveries queued for replay (due now; attempt numbers go on, the "
              "retry schedule starts again)")
    for item in refused:
        _refuse(item["reason"])
    return 2 if refused else 0


def cmd_deliveries_resend(args: argparse.Namespace, settings: Settings) -> int:
    async def work(store: Store) -> tuple[tuple[str, str] | None, dict[str, tuple[str, str]]]:
        made = await store.resend(args.id)
        return made, ({} if made else await store.delivery_statuses([args.id]))

    made, found = with_store(settings, work)
    if made is None:
        raise WebhookError(_why_not(args.id, found.get(args.id), "resent"))
    new_id, endpoint_id = made
    if args.json:
        print_json({"id": new_id, "resent_from": args.id, "endpoint_id": endpoint_id,
                     "status": DeliveryStatus.PENDING.value})
    else:
        print(f"{new_id} queued: a copy of {args.id} for endpoint {endpoint_id}, due now "
              "(the receiver sees a new webhook-id)")
    return 0


def cmd_deliveries_recover(args: argparse.Namespace, settings: Settings) -> int:
    since, until = _window(args)
    assert since is not None  # --since is required

    async def work(store: Store) -> tuple[bool, int]:
        endpoint = await store.get_endpoint(args.endpoint)
        count = await store.replay_failed(endpoint_id=endpoint.id, since=since, until=until)
        return endpoint.enabled, count

    enabled, replayed = with_store(settings, work)
    if args.json:
        print_json({"endpoint_id": args.endpoint, "since": _iso(since), "until": _iso(until),
                     "replayed": replayed, "endpoint_enabled": enabled})
        return 0
    window = f"created since {since.isoformat(timespec='seconds')}" + (
        f" and before {until.isoformat(timespec='seconds')}" if until else "")
    print(f"{replayed} failed deliveries of endpoint {args.endpoint} {window} queued for replay")
    if not enabled:
        print(f"  endpoint {args.endpoint} is disabled: they are held until "
              f"'webhooks endpoints enable {args.endpoint}'")
    return 0


# -- the parser ------------------------------------------------------------------------------


def _window_options(parser: argparse.ArgumentParser, since_required: bool = False) -> None:
    parser.add_argument("--since", required=since_required, metavar="TIME|AGE",
                        help="created at or after: ISO 8601 (UTC unless it says) or an age: "
                             "30m, 2h, 7d, 1w")
    parser.add_argument("--until", metavar="TIME|AGE", help="created before (same forms)")


def add_deliveries_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`webhooks deliveries ...` on the CLI's subcommands."""
    dl = sub.add_parser("deliveries", help="inspect, replay and resend deliveries"
                        ).add_subparsers(dest="deliveries", required=True,
                                         parser_class=OneLineParser)
    st = dl.add_parser("stats", help="deliveries by status")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_deliveries_stats)

    li = dl.add_parser("list", help="deliveries, newest first")
    li.add_argument("--status", metavar="STATUS",
                    help=f"one of {', '.join(STATUSES)}, or blocked (failed: refused by the "
                         "network policy)")
    li.add_argument("--blocked", action="store_true",
                    help="only deliveries whose last attempt was refused by the network policy")
    li.add_argument("--endpoint", help="only this endpoint's")
    li.add_argument("--event-type", help="only this event type")
    _window_options(li)
    li.add_argument("--limit", default="50", help=f"at most this many, 1..{MAX_LIMIT} (50)")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_deliveries_list)

    sh = dl.add_parser("show", help="one delivery: its payload and every attempt; or, by a "
                       "Celery task id, the deliveries of that task")
    sh.add_argument("id", help="a delivery id (msg_…) or a Celery task id (task.id)")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_deliveries_show)

    rp = dl.add_parser("replay", help="make failed deliveries pending again, due now")
    rp.add_argument("--id", action="append", default=[], help="this delivery (repeat)")
    rp.add_argument("--failed", action="store_true", help="every failed delivery")
    rp.add_argument("--endpoint", help="with --failed: only this endpoint's")
    _window_options(rp)
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_deliveries_replay)

    rs = dl.add_parser("resend", help="send a succeeded or failed delivery again, as a new one")
    rs.add_argument("id")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=cmd_deliveries_resend)

    rc = dl.add_parser("recover", help="replay an endpoint's failed deliveries since a time")
    rc.add_argument("endpoint")
    _window_options(rc, since_required=True)
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=cmd_deliveries_recover)
