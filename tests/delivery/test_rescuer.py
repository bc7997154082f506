"""Rescuer against the real test Redis (DB 15): kombu's `unacked` hash and `unacked_index`
zset, filled the way kombu fills them, rescued on a fake clock with a fake `accept`.

Most entries are built by hand in kombu's format; one is written by kombu itself (a real
message published by the producer API and taken without an ack), so that the format the
rescuer reads is the one kombu writes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from tests.conftest import TEST_BROKER_URL
from worker.core.errors import StoreUnavailable
from worker.core.messages import DELIVER_EVENT, DELIVER_EVENTS
from worker.core.models import AcceptReport, EventIn, Incoming
from worker.delivery.rescuer import (
    BATCH,
    TRIES_KEY,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    RescueConfig,
    Rescuer,
)

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("redis_clean")]

RESCUE_AFTER = 90.0
POISON_TRIES = 3
EVENT = {"event": "application.submitted", "partner_id": "p-1", "data": {"n": 1}}
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class FakeAccept:
    """Records every call; raises the queued failures in order, one per call."""

    def __init__(self, failures: Sequence[BaseException] = ()) -> None:
        self.failures = list(failures)
        self.calls: list[list[Incoming]] = []

    async def __call__(self, items: Sequence[Incoming]) -> AcceptReport:
        self.calls.append(list(items))
        if self.failures:
            raise self.failures.pop(0)
        return AcceptReport(accepted=[item.message_id for item in items])


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_BROKER_URL)
    yield client
    client.close()


@pytest.fixture
async def make_rescuer(fake_clock: Any) -> AsyncIterator[Callable[..., Awaitable[Rescuer]]]:
    """`await make_rescuer(accept, **config)`: a started Rescuer whose own rounds never come
    (a rescue_interval of an hour), on the fake clock; closed at teardown."""
    made: list[Rescuer] = []

    async def make(accept: FakeAccept, **overrides: Any) -> Rescuer:
        values: dict[str, Any] = {"broker_url": TEST_BROKER_URL, "rescue_after": RESCUE_AFTER,
                                  "rescue_interval": 3600.0, "poison_tries": POISON_TRIES,
                                  "max_events": 1000}
        values.update(overrides)
        rescuer = Rescuer(RescueConfig(**values), accept, clock=fake_clock)
        rescuer.start()
        made.append(rescuer)
        return rescuer

    yield make
    for rescuer in made:
        await rescuer.close()


def task_body(kwargs: dict[str, Any], args: Sequence[Any] = ()) -> bytes:
    return json.dumps([list(args), kwargs, EMBED]).encode()


def kombu_payload(task: str, task_id: str, tag: str, body: bytes, *,
                  content_type: str = "application/json") -> dict[str, Any]:
    """A message as kombu's Redis transport keeps it: Celery protocol 2, base64 body."""
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id,
                    "parent_id": None, "retries": 0, "eta": None, "expires": None},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0,
                       "delivery_tag": tag, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "celery"}},
    }


def put_unacked(r: redis.Redis, tag: str, entry: str | bytes, score: float) -> None:
    r.hset(UNACKED_KEY, tag, entry)
    r.zadd(UNACKED_INDEX_KEY, {tag: score})


def put_message(r: redis.Redis, score: float, *, task: str = DELIVER_EVENT,
                body: bytes | None = None, content_type: str = "application/json",
                ) -> tuple[str, str]:
    """An unacknowledged message taken at `score`; returns (delivery tag, task id)."""
    task_id, tag = str(uuid.uuid4()), str(uuid.uuid4())
    if body is None:
        body = task_body({"webhook_id": "ep", "event_data": EVENT})
    payload = kombu_payload(task, task_id, tag, body, content_type=content_type)
    put_unacked(r, tag, json.dumps([payload, "", "celery"]), score)
    return tag, task_id


def present(r: redis.Redis, tag: str) -> tuple[bool, bool]:
    """Whether `tag` is in the unacked hash, and in the index."""
    return bool(r.hexists(UNACKED_KEY, tag)), r.zscore(UNACKED_INDEX_KEY, tag) is not None


def tries(r: redis.Redis, tag: str) -> int:
    value = r.hget(TRIES_KEY, tag)
    return int(value) if value is not None else 0


def ids(items: Sequence[Incoming]) -> list[str]:
    return [item.message_id for item in items]


def old(fake_clock: Any) -> float:
    """A zset score older than rescue_after."""
    return fake_clock.time() - RESCUE_AFTER - 5


# rescued ----------------------------------------------------------------------------------------


async def test_an_old_unacked_message_is_committed_and_removed(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]],
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "webhooks.rescuer")
    tag, task_id = put_message(r, old(fake_clock))
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    assert accept.calls == [[Incoming(f"{task_id}:0", EventIn("ep", EVENT, None))]]
    assert present(r, tag) == (False, False)
    assert not r.hexists(TRIES_KEY, tag)
    assert rescuer.stats == {"rescued_messages": 1, "poison_messages": 0}
    assert any(task_id in rec.getMessage() for rec in caplog.records)
    # Nothing left for the next round.
    assert await rescuer.rescue_once() == 0
    assert len(accept.calls) == 1


async def test_a_younger_message_is_left_until_it_is_old_enough(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    tag, task_id = put_message(r, fake_clock.time() - RESCUE_AFTER + 10)
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 0
    assert accept.calls == []
    assert present(r, tag) == (True, True)
    assert not r.hexists(TRIES_KEY, tag)
    fake_clock.advance(9)
    assert await rescuer.rescue_once() == 0
    assert present(r, tag) == (True, True)
    fake_clock.advance(2)
    assert await rescuer.rescue_once() == 1
    assert [ids(call) for call in accept.calls] == [[f"{task_id}:0"]]
    assert present(r, tag) == (False, False)


async def test_only_the_old_ones_among_several(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    old_tag, old_id = put_message(r, old(fake_clock))
    young_tag, _ = put_message(r, fake_clock.time() - 1)
    older_tag, older_id = put_message(r, old(fake_clock) - 100)
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 2
    assert [ids(call) for call in accept.calls] == [[f"{older_id}:0"], [f"{old_id}:0"]]
    assert present(r, old_tag) == present(r, older_tag) == (False, False)
    assert present(r, young_tag) == (True, True)


@pytest.mark.parametrize("task", ["webhooks.cleanup_old_deliveries", "webhooks.publish_event",
                                  "webhooks.retry_failed_deliveries", "other.app.task"])
async def test_a_message_of_another_task_is_left(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]], task: str
) -> None:
    tag, _ = put_message(r, old(fake_clock), task=task, body=task_body({}))
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 0
    assert accept.calls == []
    assert present(r, tag) == (True, True)
    assert not r.exists(TRIES_KEY)


@pytest.mark.parametrize(
    "entry",
    ["not json", json.dumps({"body": "x"}), json.dumps([]), json.dumps(["payload", "", "celery"]),
     json.dumps([{"body": "eyJ9", "headers": None}, "", "celery"]),
     json.dumps([{"body": "eyJ9"}, "", "celery"])],
    ids=["not-json", "dict", "empty-list", "payload-not-object", "headers-null", "no-headers"],
)
async def test_an_entry_that_is_not_a_message_of_ours_is_left(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]], entry: str
) -> None:
    put_unacked(r, "garbage", entry, old(fake_clock))
    tag, task_id = put_message(r, old(fake_clock) + 1)
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    assert [ids(call) for call in accept.calls] == [[f"{task_id}:0"]]
    assert present(r, "garbage") == (True, True)
    assert present(r, tag) == (False, False)


async def test_an_index_entry_without_its_message_is_skipped(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    r.zadd(UNACKED_INDEX_KEY, {"acked-meanwhile": old(fake_clock)})
    tag, task_id = put_message(r, old(fake_clock) + 1)
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    assert [ids(call) for call in accept.calls] == [[f"{task_id}:0"]]
    assert present(r, tag) == (False, False)
    assert not r.hexists(TRIES_KEY, "acked-meanwhile")


async def test_deliver_events_yields_one_incoming_per_event(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    events = [{"webhook_id": f"ep-{n}", "event_data": {"n": n}, "idempotency_key": f"k{n}"}
              for n in range(3)]
    tag, task_id = put_message(r, old(fake_clock), task=DELIVER_EVENTS,
                               body=task_body({"events": events}))
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    assert accept.calls == [[Incoming(f"{task_id}:{n}", EventIn(f"ep-{n}", {"n": n}, f"k{n}"))
                             for n in range(3)]]
    assert present(r, tag) == (False, False)


async def test_deliver_events_is_cut_to_max_events(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    events = [{"webhook_id": "ep", "event_data": {"n": n}} for n in range(5)]
    _, task_id = put_message(r, old(fake_clock), task=DELIVER_EVENTS,
                             body=task_body({"events": events}))
    accept = FakeAccept()
    rescuer = await make_rescuer(accept, max_events=2)
    assert await rescuer.rescue_once() == 1
    assert [ids(call) for call in accept.calls] == [[f"{task_id}:0", f"{task_id}:1"]]


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"{not json", "application/json", "undecodable body"),
        (b"\xff\xfe\x00garbage", "application/json", "undecodable body"),
        (b"\x80\x04K\x01.", "application/x-python-serialize", "undecodable body: "
                                                               "ContentDisallowed"),
        (json.dumps({"args": [], "kwargs": {}}).encode(), "application/json",
         "must be [args, kwargs, embed], not dict"),
    ],
    ids=["not-json", "not-utf8", "pickle", "wrong-shape"],
)
async def test_an_undecodable_body_is_committed_as_a_malformed_message(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]],
    body: bytes, content_type: str, message: str
) -> None:
    tag, task_id = put_message(r, old(fake_clock), body=body, content_type=content_type)
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    [[item]] = accept.calls
    assert item.message_id == f"{task_id}:0"
    assert item.problem is not None and item.problem.code == "malformed_message"
    assert message in str(item.problem)
    assert item.excerpt == body
    assert present(r, tag) == (False, False)


async def test_a_bad_call_is_committed_as_that_events_problem(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    _, task_id = put_message(r, old(fake_clock), body=task_body({"webhook_id": "ep-3"}))
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    [[item]] = accept.calls
    assert item.message_id == f"{task_id}:0"
    assert item.problem is not None and item.problem.code == "bad_arguments"
    assert item.event.webhook_id == "ep-3"


# store away, poison ------------------------------------------------------------------------------


async def test_a_failed_commit_leaves_the_message_and_counts_no_try(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    tag, task_id = put_message(r, old(fake_clock))
    accept = FakeAccept([StoreUnavailable("database is down")] * (POISON_TRIES + 2))
    rescuer = await make_rescuer(accept)
    for _ in range(POISON_TRIES + 2):
        with pytest.raises(StoreUnavailable):
            await rescuer.rescue_once()
        assert present(r, tag) == (True, True)
        assert tries(r, tag) == 0
    # Once the store is back the message is rescued as itself, not as poison.
    assert await rescuer.rescue_once() == 1
    assert len(accept.calls) == POISON_TRIES + 3
    assert all(call == [Incoming(f"{task_id}:0", EventIn("ep", EVENT, None))]
               for call in accept.calls)
    assert present(r, tag) == (False, False)
    assert rescuer.stats == {"rescued_messages": 1, "poison_messages": 0}


async def test_a_message_taken_up_poison_tries_times_is_recorded_as_poison(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    body = task_body({"webhook_id": "ep", "event_data": EVENT})
    tag, task_id = put_message(r, old(fake_clock), body=body)
    r.hset(TRIES_KEY, tag, POISON_TRIES)  # rescuers died that often while rescuing it
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    [[item]] = accept.calls
    assert item.message_id == f"{task_id}:0"
    assert item.problem is not None and item.problem.code == "poison_message"
    assert f"taken up {POISON_TRIES} times without being committed" in str(item.problem)
    assert item.event == EventIn("?", None)
    assert item.excerpt == body
    assert present(r, tag) == (False, False)
    assert not r.hexists(TRIES_KEY, tag)
    assert rescuer.stats == {"rescued_messages": 0, "poison_messages": 1}


async def test_a_message_below_poison_tries_is_still_read(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    tag, task_id = put_message(r, old(fake_clock))
    r.hset(TRIES_KEY, tag, POISON_TRIES - 1)
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    assert accept.calls == [[Incoming(f"{task_id}:0", EventIn("ep", EVENT, None))]]
    assert rescuer.stats == {"rescued_messages": 1, "poison_messages": 0}
    assert not r.hexists(TRIES_KEY, tag)


async def test_a_failed_poison_record_leaves_the_message(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    tag, _ = put_message(r, old(fake_clock))
    r.hset(TRIES_KEY, tag, POISON_TRIES)
    accept = FakeAccept([StoreUnavailable("down")])
    rescuer = await make_rescuer(accept)
    with pytest.raises(StoreUnavailable):
        await rescuer.rescue_once()
    assert present(r, tag) == (True, True)
    assert tries(r, tag) == POISON_TRIES
    assert await rescuer.rescue_once() == 1
    assert [call[0].problem.code for call in accept.calls if call[0].problem] == [
        "poison_message", "poison_message"]
    assert present(r, tag) == (False, False)


async def test_a_rescue_cut_short_counts_as_a_try(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    """A rescuer that dies inside accept (here: cancelled) leaves its try counted."""
    tag, _ = put_message(r, old(fake_clock))
    started = asyncio.Event()

    class Hangs(FakeAccept):
        async def __call__(self, items: Sequence[Incoming]) -> AcceptReport:
            started.set()
            await asyncio.sleep(60)
            raise AssertionError("not reached")

    rescuer = await make_rescuer(Hangs())
    round_ = asyncio.create_task(rescuer.rescue_once())
    await asyncio.wait_for(started.wait(), 5)
    round_.cancel()
    with pytest.raises(asyncio.CancelledError):
        await round_
    assert tries(r, tag) == 1
    assert present(r, tag) == (True, True)
    assert 0 < r.ttl(TRIES_KEY) <= 7 * 86400


# kombu's own entry ------------------------------------------------------------------------------


async def test_an_entry_written_by_kombu_itself_is_rescued(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    from worker.celery_app import app
    from worker.tasks.webhook_delivery import deliver_webhook_event

    result = deliver_webhook_event.apply_async(
        kwargs={"webhook_id": "ep-k", "event_data": EVENT, "idempotency_key": "idem-1"})
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        deadline = time.monotonic() + 5
        message = None
        while message is None and time.monotonic() < deadline:
            message = channel.basic_get("celery", no_ack=False)
        assert message is not None, "the published message never reached the queue"
        # What kombu keeps for a taken, unacknowledged message: snapshot it, as a worker
        # killed now would leave it (closing the channel would put the message back).
        entries = r.hgetall(UNACKED_KEY)
        index = r.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
    r.flushdb()
    assert len(entries) == len(index) == 1
    for tag, entry in entries.items():
        r.hset(UNACKED_KEY, tag, entry)
    r.zadd(UNACKED_INDEX_KEY, dict(index))
    [(tag, score)] = index
    fake_clock.advance(score - fake_clock.time() + RESCUE_AFTER + 1)
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    assert accept.calls == [[Incoming(f"{result.id}:0", EventIn("ep-k", EVENT, "idem-1"))]]
    assert present(r, tag.decode()) == (False, False)


# bugs --------------------------------------------------------------------------------------------


async def test_the_background_rounds_survive_a_store_outage(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]],
    until: Callable[..., Awaitable[None]]
) -> None:
    tag, _ = put_message(r, old(fake_clock))
    accept = FakeAccept([StoreUnavailable("database is down")] * 2)
    await make_rescuer(accept, rescue_interval=0.01)
    await until(lambda: present(r, tag) == (False, False), 2.0, 0.01)
    assert len(accept.calls) == 3


async def test_messages_of_other_tasks_do_not_hide_ours(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    base = old(fake_clock) - 1000
    for n in range(BATCH):
        put_message(r, base + n * 0.001, task="webhooks.cleanup_old_deliveries",
                    body=task_body({}))
    tag, task_id = put_message(r, old(fake_clock))
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    for _ in range(3):
        await rescuer.rescue_once()
    assert [ids(call) for call in accept.calls] == [[f"{task_id}:0"]]
    assert present(r, tag) == (False, False)


async def test_an_entry_with_an_unhashable_task_header_is_left(
    r: redis.Redis, fake_clock: Any, make_rescuer: Callable[..., Awaitable[Rescuer]]
) -> None:
    payload = kombu_payload(DELIVER_EVENT, "t-1", "damaged", task_body({}))
    payload["headers"]["task"] = ["webhooks.deliver_event"]
    put_unacked(r, "damaged", json.dumps([payload, "", "celery"]), old(fake_clock) - 1)
    tag, task_id = put_message(r, old(fake_clock))
    accept = FakeAccept()
    rescuer = await make_rescuer(accept)
    assert await rescuer.rescue_once() == 1
    assert [ids(call) for call in accept.calls] == [[f"{task_id}:0"]]
    assert present(r, "damaged") == (True, True)
    assert present(r, tag) == (False, False)
