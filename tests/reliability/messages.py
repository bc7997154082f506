"""Raw broker messages in kombu's Redis format, good (as `.delay()` makes them) and malformed.

A real `deliver_webhook_event.delay(...)` puts this on the `celery` list (LPUSH; consumed
with BRPOP, so first in, first out):

    {"body": base64('[args, kwargs, embed]'), "content-encoding": "utf-8",
     "content-type": "application/json",
     "headers": {"lang": "py", "task": "webhooks.deliver_event", "id": <task id>, ...},
     "properties": {"correlation_id": <task id>, "delivery_mode": 2, "priority": 0,
                    "delivery_info": {"exchange": "", "routing_key": "celery"},
                    "body_encoding": "base64", "delivery_tag": <uuid>, ...}}
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from dataclasses import dataclass, field
from typing import Any

SINGLE = "webhooks.deliver_event"
BATCH = "webhooks.deliver_events"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def envelope(task: str | None, body: bytes | str, *, task_id: str | None,
             content_type: str = "application/json", content_encoding: str = "utf-8",
             body_encoding: str = "base64", drop_headers: tuple[str, ...] = (),
             note: str = "") -> bytes:
    """One raw queue item. `body` is encoded per `body_encoding` unless already a str."""
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode() if body_encoding == "base64" else body.decode()
    ident = task_id or str(uuid.uuid4())
    headers: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": ident, "parent_id": None, "argsrepr": note,
        "kwargsrepr": note, "origin": "reliability-tests", "ignore_result": True,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    for name in drop_headers:
        headers.pop(name, None)
    message = {
        "body": body, "content-encoding": content_encoding, "content-type": content_type,
        "headers": headers,
        "properties": {"correlation_id": ident, "reply_to": str(uuid.uuid4()),
                       "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key":
                                                             "celery"},
                       "priority": 0, "body_encoding": body_encoding,
                       "delivery_tag": str(uuid.uuid4())},
    }
    return json.dumps(message).encode()


def call_body(args: Any, kwargs: Any, embed: Any = None) -> bytes:
    """Celery protocol 2 body: `[args, kwargs, embed]` as JSON."""
    return json.dumps([args, kwargs, EMBED if embed is None else embed]).encode()


def good_single(webhook_id: str, event_data: dict[str, Any], task_id: str | None = None) -> bytes:
    return envelope(SINGLE, call_body([], {"webhook_id": webhook_id, "event_data": event_data}),
                    task_id=task_id or str(uuid.uuid4()))


@dataclass
class Malformed:
    """One kind of bad message and what must become of it.

    expect:
      "rejected"  a webhooks task, identifiable: must end as `rejected` row(s) whose
                  last_error matches `reason` (case-insensitive regex)
      "survive"   not identifiable as ours: the worker must survive it and go on
      "rejected_or_delivered"  envelope oddity around a valid event: either outcome keeps the
                  promise, as long as it happens once
      "delivered_once"  a duplicate of a good message: delivered exactly once
    """

    name: str
    items: list[bytes]
    expect: str
    reason: str = ""
    rejected_rows: int = 1
    delivered_ns: list[int] = field(default_factory=list)  # good events inside it

    @property
    def marker(self) -> str:
        return f"bad-{self.name}-"


def malformed_kinds(endpoint_id: str, good: Any) -> list[Malformed]:
    """`good(endpoint_id)` returns (event_data, n) of a fresh ledger event."""
    kinds: list[Malformed] = []

    def tid(name: str) -> str:
        return f"bad-{name}-{uuid.uuid4().hex[:8]}"

    def data(name: str, **extra: Any) -> dict[str, Any]:
        return {"type": "reliability.malformed", "kind": name, **extra}

    def add(name: str, expect: str, reason: str, item: bytes, **more: Any) -> None:
        kinds.append(Malformed(name, [item], expect, reason, **more))

    ok_kwargs = {"webhook_id": endpoint_id}
    add("body-object", "rejected", r"args|kwargs|shape|protocol|malformed|body|list|array",
        envelope(SINGLE, json.dumps({**ok_kwargs, "event_data": data("body-object")}).encode(),
                 task_id=tid("body-object")))
    add("kwargs-list", "rejected", r"kwargs|argument|mapping|object|dict|shape|list",
        envelope(SINGLE, call_body([], [endpoint_id, data("kwargs-list")]),
                 task_id=tid("kwargs-list")))
    add("args-dict", "rejected", r"args|argument|list|shape|dict",
        envelope(SINGLE, call_body({"webhook_id": endpoint_id, "event_data": data("args-dict")},
                                   {}), task_id=tid("args-dict")))
    # Delivered or rejected; a delivery is seen by the receiver as `kind` in the body.
    add("embed-not-dict", "rejected_or_delivered", r"embed|shape|malformed|callback|protocol",
        envelope(SINGLE, call_body([], {**ok_kwargs, "event_data": data("embed-not-dict")},
                                   embed=[1, 2]), task_id=tid("embed-not-dict")))
    add("raw-not-json", "survive", "",
        b"this is not JSON at all: bad-raw-not-json-" + uuid.uuid4().hex.encode())
    add("invalid-base64", "rejected", r"base64|decod|encoding|body|padding",
        envelope(SINGLE, "not-base64!", task_id=tid("invalid-base64")))
    add("base64-not-json", "rejected", r"json|decod|body|pars|expect",
        envelope(SINGLE, b"this is not json {", task_id=tid("base64-not-json")))
    add("missing-id", "rejected", r"\bid\b|task.?id|missing|header",
        envelope(SINGLE, call_body([], {**ok_kwargs, "event_data": data("missing-id")}),
                 task_id=None, drop_headers=("id",), note="bad-missing-id-"))
    # No task name: nothing says this is a webhooks message.
    add("missing-task", "survive", "",
        envelope(None, call_body([], {**ok_kwargs, "event_data": data("missing-task")}),
                 task_id=tid("missing-task"), drop_headers=("task",)))
    add("pickle", "rejected", r"pickle|content.?type|serial|x-python|untrusted|accept|allow",
        envelope(SINGLE, pickle.dumps(((), {**ok_kwargs, "event_data": data("pickle")}, EMBED)),
                 task_id=tid("pickle"), content_type="application/x-python-serialize",
                 content_encoding="binary"))
    # The body is intact UTF-8 JSON under an unknown charset label: delivering the event as
    # sent keeps the promise as well as rejecting it does.
    add("unknown-encoding", "rejected_or_delivered", r"encoding|charset|codec|decod",
        envelope(SINGLE, call_body([], {**ok_kwargs, "event_data": data("unknown-encoding")}),
                 task_id=tid("unknown-encoding"), content_encoding="x-klingon-8"))
    deep = '{"a":' * 10_000 + "1" + "}" * 10_000
    add("nested-10000", "rejected", r"deep|depth|nest|recursion|json|decod|too",
        envelope(SINGLE, f'[[], {{"webhook_id": "{endpoint_id}", "event_data": {deep}}}, '
                         f"{json.dumps(EMBED)}]".encode(), task_id=tid("nested-10000")))
    for name, value in (("event-data-string", "a string"), ("event-data-list", [1, 2]),
                        ("event-data-null", None)):
        add(name, "rejected", r"event_data|object|dict|payload",
            envelope(SINGLE, call_body([], {**ok_kwargs, "event_data": value}), task_id=tid(name)))
    add("payload-300k", "rejected", r"262144|256|large|size|limit|bytes",
        envelope(SINGLE, call_body([], {**ok_kwargs, "event_data": data(
            "payload-300k", blob="x" * 300_000)}), task_id=tid("payload-300k")))
    add("webhook-id-int", "rejected", r"webhook_id|endpoint",
        envelope(SINGLE, call_body([], {"webhook_id": 12345, "event_data": data("wid-int")}),
                 task_id=tid("webhook-id-int")))
    add("webhook-id-1000", "rejected", r"webhook_id|endpoint",
        envelope(SINGLE, call_body([], {"webhook_id": "w" * 1000, "event_data": data("w1000")}),
                 task_id=tid("webhook-id-1000")))
    add("idempotency-key-int", "rejected", r"idempotency",
        envelope(SINGLE, call_body([], {**ok_kwargs, "event_data": data("idem"),
                                        "idempotency_key": 42}),
                 task_id=tid("idempotency-key-int")))
    add("unknown-kwarg", "rejected", r"unknown|argument|bogus",
        envelope(SINGLE, call_body([], {**ok_kwargs, "event_data": data("kw"), "bogus": 1}),
                 task_id=tid("unknown-kwarg")))
    embed = json.dumps(EMBED)
    add("nan", "rejected", r"nan|json|finite|number|invalid",
        envelope(SINGLE, f'[[], {{"webhook_id": "{endpoint_id}", "event_data": '
                         f'{{"kind": "nan", "x": NaN}}}}, {embed}]'.encode(), task_id=tid("nan")))
    add("lone-surrogate", "rejected", r"surrogate|utf|unicode|encod|json",
        envelope(SINGLE, f'[[], {{"webhook_id": "{endpoint_id}", "event_data": '
                         f'{{"kind": "lone-surrogate", "s": "\\ud800"}}}}, {embed}]'.encode(),
                 task_id=tid("lone-surrogate")))
    add("events-not-a-list", "rejected", r"events?\b|list|array",
        envelope(BATCH, call_body([], {"events": "not a list"}), task_id=tid("events-not-a-list")))
    add("events-kwargs-list", "rejected", r"kwargs|argument|mapping|object|dict|shape|list",
        envelope(BATCH, call_body([], [[{**ok_kwargs, "event_data": data("ekl")}]]),
                 task_id=tid("events-kwargs-list")))
    event, n = good(endpoint_id)
    add("events-item-not-object", "rejected", r"object|mapping|dict|events\[|item",
        envelope(BATCH, call_body([], {"events": [{**ok_kwargs, "event_data": event}, 42]}),
                 task_id=tid("events-item-not-object")), delivered_ns=[n])
    event, n = good(endpoint_id)
    twice = good_single(endpoint_id, event, task_id=tid("same-twice"))
    kinds.append(Malformed("same-twice", [twice, twice], "delivered_once", delivered_ns=[n]))
    return kinds


def event_ns(raw_items: list[bytes]) -> set[int]:
    """The `n` of each single-event message among raw queue items or unacked hash values."""
    found = set()
    for raw in raw_items:
        try:
            item = json.loads(raw)
            if isinstance(item, list):  # unacked values: [message, exchange, routing_key]
                item = item[0]
            body = item["body"]
            if item["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            n = json.loads(body)[1]["event_data"]["n"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if isinstance(n, int):
            found.add(n)
    return found
