"""Malformed broker messages mixed with good ones: the worker survives every one, each
webhooks message ends as a `rejected` row naming its reason (or, for what is not
identifiable as ours, is dropped without harm), every good event is delivered once, and
nothing is left stranded in Redis.

The bad messages go in one kind at a time, each followed by good events and a sentinel, so
a rejected row that appears can be attributed to its kind without assuming how a rejection
records the message. Should the worker die on a kind, the test notes it, takes the poison
message out of Redis, starts a new worker and goes on, so one run reports every kind.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability.conftest import StartWorker
from tests.reliability.harness import FAST, Database, RedisServer, WorkerProcess
from tests.reliability.ledger import Ledger
from tests.reliability.messages import Malformed, good_single, malformed_kinds
from tests.reliability.servers import Receiver

pytestmark = pytest.mark.timeout(300)

ENDPOINT = "ep-mal"
WARM_UP = 20  # good events before the first bad one
GOOD_AFTER_EACH = 2  # plus one sentinel after each bad kind
SENTINEL_WAIT = 8.0  # seconds for the sentinel behind a bad message
REJECTION_WAIT = 3.0  # further seconds for its rejected row (retries of a failing commit)
MAX_EXCERPT = 16 * 1024  # a rejected row keeps a bounded excerpt, never the whole message
MAX_RESTARTS = 8
CONSUMER_RESTART = "Connection to broker lost"


def test_malformed_messages_are_rejected_visibly_and_never_stop_the_worker(
    start_worker: StartWorker, receiver: Receiver, database: Database,
    redis_server: RedisServer, endpoints: Callable[[dict[str, str]], None],
    make_ledger: Callable[[str, str], Ledger],
) -> None:
    ledger = make_ledger("malformed-messages", "")
    endpoints({ENDPOINT: "ok"})
    workers = [start_worker(**FAST)]
    queue = redis_server.client()

    def push_good(count: int) -> list[int]:
        ns = []
        for _ in range(count):
            event = ledger.event_data(ENDPOINT)
            queue.lpush("celery", good_single(ENDPOINT, event))
            ns.append(event["n"])
        return ns

    def good(endpoint_id: str) -> tuple[dict[str, Any], int]:
        event = ledger.event_data(endpoint_id)
        return event, event["n"]

    kinds = malformed_kinds(ENDPOINT, good)
    ledger.faults = (f"{len(kinds)} kinds of malformed message pushed raw onto the `celery` "
                     "list between good single events")
    assert len(kinds) >= 15
    push_good(WARM_UP)

    outcomes: dict[str, str] = {}
    problems: dict[str, str] = {}
    deaths: list[str] = []
    seen_rejected: set[str] = set()

    def new_rejected() -> list[Any]:
        return [r for r in database.rows() if r.status == "rejected" and r.id not in seen_rejected]

    for kind in kinds:
        worker = workers[-1]
        restarts_before = worker.log().count(CONSUMER_RESTART)
        for item in kind.items:
            queue.lpush("celery", item)
        push_good(GOOD_AFTER_EACH)
        sentinel = push_good(1)[0]
        deadline = time.monotonic() + SENTINEL_WAIT
        while (sentinel not in receiver.delivered_ns() and worker.alive()
               and time.monotonic() < deadline):
            time.sleep(0.1)
        if not worker.alive():
            deaths.append(f"{kind.name}: worker exited with {worker.returncode}; "
                          f"{_last_error_line(worker)}")
            problems[kind.name] = "worker died"
            outcomes[kind.name] = "WORKER DIED"
            if len(deaths) > MAX_RESTARTS:
                break
            _purge(redis_server, kind)
            workers.append(start_worker(**FAST))
            continue
        outcome, problem_list = _judge(kind, receiver, new_rejected)
        seen_rejected.update(r.id for r in database.rows() if r.status == "rejected")
        restarts = worker.log().count(CONSUMER_RESTART) - restarts_before
        if restarts:
            problem_list.append(f"consumer lost its broker connection {restarts}x (crash loop: "
                                f"{_last_error_line(worker)[-120:]})")
        if sentinel not in receiver.delivered_ns():
            problem_list.append(f"good events behind it not delivered in {SENTINEL_WAIT:.0f}s")
        outcomes[kind.name] = outcome
        if problem_list:
            problems[kind.name] = "; ".join(problem_list)
        if restarts or sentinel not in receiver.delivered_ns():
            # Wedged or dropping work: clear the poison and carry on with a fresh worker.
            worker.stop(timeout=10)
            _purge(redis_server, kind)
            if len(workers) > MAX_RESTARTS:
                break
            workers.append(start_worker(**FAST))

    ledger.wait_settled(receiver, database, 20)
    settled = ledger.finish(receiver, database)
    held = redis_server.wait_drained(15)
    unrecoverable = [f"worker{i}" for i, w in enumerate(workers)
                     if "Unrecoverable error" in w.log()]
    report = "\n".join(f"  {name:24} {outcomes.get(name, 'not reached'):58} "
                       f"{problems.get(name, 'ok')}" for name in (k.name for k in kinds))
    print(f"malformed messages, per kind:\n{report}")

    assert not deaths, f"the worker died on {len(deaths)} kind(s):\n" + "\n".join(deaths) + (
        f"\nper kind:\n{report}")
    assert not unrecoverable, f"'Unrecoverable error' in the log of {unrecoverable}"
    assert workers[-1].alive(), f"worker exited ({workers[-1].returncode})"
    assert not problems, f"{len(problems)} of {len(kinds)} kinds mishandled:\n{report}"
    Ledger.assert_promise(settled, duplicates_allowed=False)
    assert not any(held.values()), f"messages stranded in Redis at the end: {held}"


def _judge(kind: Malformed, receiver: Receiver,
           new_rejected: Callable[[], list[Any]]) -> tuple[str, list[str]]:
    """(what happened, what is wrong with it)."""
    deadline = time.monotonic() + REJECTION_WAIT
    while time.monotonic() < deadline:
        if kind.expect == "rejected" and len(new_rejected()) >= kind.rejected_rows:
            break
        if kind.expect != "rejected" and _probe_delivered(kind, receiver) >= 1:
            break
        time.sleep(0.2)
    rows = new_rejected()
    delivered = _probe_delivered(kind, receiver)
    errors = [r.last_error or "" for r in rows]
    what = (f"rejected x{len(rows)}: {errors[0][:45]!r}" if rows
            else f"delivered x{delivered}" if delivered else "no row, not delivered")
    if kind.expect == "rejected":
        if len(rows) != kind.rejected_rows:
            gone = "" if rows or delivered else ": the message vanished without a trace"
            return what, [f"expected {kind.rejected_rows} rejected row(s), found {len(rows)}"
                          + gone]
        if not all(re.search(kind.reason, e, re.IGNORECASE) for e in errors):
            return what, [f"last_error does not name the reason (/{kind.reason}/): {errors}"]
        big = [len(r.payload or b"") for r in rows if len(r.payload or b"") > MAX_EXCERPT]
        if big:
            return what, [f"rejected row keeps {big[0]} bytes of the message (> {MAX_EXCERPT})"]
        return what, []
    if kind.expect == "rejected_or_delivered" and len(rows) + delivered != 1:
        return what, [f"expected one outcome, got {len(rows)} rejected + {delivered} delivered"]
    if kind.expect == "delivered_once" and (rows or delivered != 1):
        return what, [f"expected delivered once, got {delivered} deliveries, {len(rows)} rows"]
    return what, []  # survive: judged by the worker staying up and the sentinel arriving


def _probe_delivered(kind: Malformed, receiver: Receiver) -> int:
    """Deliveries the receiver accepted for this kind: by its good events, or its `kind`."""
    hits = [h for h in receiver.snapshot() if h.delivered]
    if kind.delivered_ns:
        return sum(1 for h in hits if h.n in kind.delivered_ns)
    return sum(1 for h in hits if h.kind == kind.name)


def _purge(redis_server: RedisServer, kind: Malformed) -> None:
    """Take the poison out of the `celery` list and kombu's unacked hash."""
    client = redis_server.client()
    marker = kind.marker.encode()
    for raw in client.lrange("celery", 0, -1):
        if marker in raw:
            client.lrem("celery", 0, raw)
    for tag, raw in client.hgetall("unacked").items():
        if marker in raw:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)


def _last_error_line(worker: WorkerProcess) -> str:
    lines = [line for line in worker.log().splitlines()
             if "Error" in line or "CRITICAL" in line or "Unrecoverable" in line]
    return lines[-1][:300] if lines else "(no error in its log)"
