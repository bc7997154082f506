"""Reading the producer calls a task message carries (no broker involved): the calls
themselves, then whole broker messages read defensively (`read_call`, `events_of`,
`message_events`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kombu.exceptions import ContentDisallowed

from worker.core import messages
from worker.core.errors import InvalidEvent
from worker.core.messages import (
    DELIVER_EVENT,
    DELIVER_EVENTS,
    MALFORMED,
    TaskCall,
    event_from_mapping,
    events_of,
    incoming,
    message_events,
    raw_message_id,
    read_call,
    single_event,
    task_id_of,
)
from worker.core.models import REJECTED_EXCERPT_BYTES, EventIn, Incoming

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((), {"webhook_id": "ep", "event_data": {"a": 1}}, ("ep", {"a": 1}, None)),
        (("ep", {"a": 1}), {}, ("ep", {"a": 1}, None)),
        (("ep",), {"event_data": {"a": 1}, "idempotency_key": "k"}, ("ep", {"a": 1}, "k")),
        (("ep", {"a": 1}, "k"), None, ("ep", {"a": 1}, "k")),
    ],
)
def test_single_event_accepts_positional_and_keyword_forms(
    args: tuple[Any, ...], kwargs: dict[str, Any] | None, expected: tuple[Any, ...]
) -> None:
    event = single_event(args, kwargs)
    assert (event.webhook_id, event.event_data, event.idempotency_key) == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("ep", {}, "k", "q", "extra"), {}, "at most 4"),
        ((), {"webhook_id": "ep", "event_data": {}, "colour": "red"}, "unknown argument"),
        (("ep",), {"webhook_id": "ep", "event_data": {}}, "given twice"),
        ((), {"webhook_id": "ep"}, "needs webhook_id and event_data"),
        ((), {}, "needs webhook_id and event_data"),
    ],
)
def test_single_event_refuses_malformed_calls(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidEvent, match=message) as info:
        single_event(args, kwargs)
    assert info.value.code == "bad_arguments"


@pytest.mark.parametrize("item", ["text", 7, None, ["ep", {}]])
def test_batch_items_must_be_objects(item: Any) -> None:
    with pytest.raises(InvalidEvent, match="must be an object"):
        event_from_mapping(item)


def test_unparseable_message_becomes_a_recorded_problem_not_an_exception() -> None:
    item = incoming("task-1:0", event_from_mapping, {"webhook_id": "ep-9", "oops": 1})
    assert item.problem is not None and item.problem.code == "bad_arguments"
    assert item.event.webhook_id == "ep-9"
    assert item.message_id == "task-1:0"
    fine = incoming("task-2:0", event_from_mapping, {"webhook_id": "ep", "event_data": {}})
    assert fine.problem is None


# -- broker messages: read_call, events_of, message_events --------------------------------------

TASK_ID = "5a0c3f5e-0000-4000-8000-000000000001"
EVENT = {"event": "application.submitted", "data": {"n": 1}}
GOOD_KWARGS = {"webhook_id": "ep", "event_data": EVENT}


def p2_headers(task: str = DELIVER_EVENT, task_id: Any = TASK_ID) -> dict[str, Any]:
    return {"task": task, "id": task_id, "lang": "py"}


def body_bytes(decoded: Any) -> bytes:
    return json.dumps(decoded).encode()


def read(headers: Any, decoded: Any, max_events: int = 1000) -> list[Incoming]:
    """`message_events` over the JSON of `decoded`, whose decoder returns `decoded`."""
    raw = json.dumps(decoded, default=repr).encode()
    return message_events(headers, raw, lambda: decoded, max_events)


def assert_placeholder(item: Incoming, message_id: str, code: str, message: str) -> None:
    assert item.message_id == message_id
    assert item.problem is not None, item
    assert item.problem.code == code
    assert message in str(item.problem), str(item.problem)
    assert item.event == EventIn("?", None)


# read_call --------------------------------------------------------------------------------------


def test_read_call_protocol_2_message() -> None:
    call = read_call(p2_headers(), [["ep"], {"event_data": EVENT}, {"callbacks": None}])
    assert call == TaskCall(DELIVER_EVENT, TASK_ID, ("ep",), {"event_data": EVENT})


def test_read_call_accepts_a_tuple_body_and_a_null_embed() -> None:
    call = read_call(p2_headers(), ((), GOOD_KWARGS, None))
    assert call == TaskCall(DELIVER_EVENT, TASK_ID, (), GOOD_KWARGS)


def test_read_call_protocol_1_message_carries_everything_in_its_body() -> None:
    body = {"task": DELIVER_EVENT, "id": TASK_ID, "args": ["ep"], "kwargs": {"event_data": EVENT}}
    assert read_call({}, body) == TaskCall(DELIVER_EVENT, TASK_ID, ("ep",),
                                           {"event_data": EVENT})
    assert read_call(None, {"task": DELIVER_EVENT, "id": TASK_ID}) == TaskCall(
        DELIVER_EVENT, TASK_ID, (), {})


@pytest.mark.parametrize(
    ("headers", "decoded", "message"),
    [
        (p2_headers(), {"args": [], "kwargs": GOOD_KWARGS}, "must be [args, kwargs, embed], "
                                                             "not dict"),
        (p2_headers(), [[], GOOD_KWARGS], "must be [args, kwargs, embed], not list"),
        (p2_headers(), [[], GOOD_KWARGS, {}, {}], "must be [args, kwargs, embed], not list"),
        (p2_headers(), None, "must be [args, kwargs, embed], not null"),
        (p2_headers(), "text", "must be [args, kwargs, embed], not str"),
        (p2_headers(), [{"webhook_id": "ep"}, {}, {}], "args must be a list, not dict"),
        (p2_headers(), ["ep", {}, {}], "args must be a list, not str"),
        (p2_headers(), [None, {}, {}], "args must be a list, not null"),
        (p2_headers(), [[], ["ep", EVENT], {}], "kwargs must be an object, not list"),
        (p2_headers(), [[], None, {}], "kwargs must be an object, not null"),
        (p2_headers(), [[], {1: "ep", "event_data": EVENT}, {}], "kwargs must have string keys"),
        (p2_headers(), [[], GOOD_KWARGS, "embed"], "embed must be an object, not str"),
        (p2_headers(), [[], GOOD_KWARGS, []], "embed must be an object, not list"),
        (p2_headers(task_id=None), [[], GOOD_KWARGS, {}], "lacks a task name or a task id"),
        (p2_headers(task_id=""), [[], GOOD_KWARGS, {}], "lacks a task name or a task id"),
        (p2_headers(task_id=7), [[], GOOD_KWARGS, {}], "lacks a task name or a task id"),
        ({"task": None, "id": TASK_ID}, [[], GOOD_KWARGS, {}], "lacks a task name or a task id"),
        ({"task": ["x"], "id": TASK_ID}, [[], GOOD_KWARGS, {}], "lacks a task name or a task id"),
        ({"id": TASK_ID}, [[], GOOD_KWARGS, {}], "names no task"),
        ({}, [[], GOOD_KWARGS, {}], "names no task"),
        (None, [[], GOOD_KWARGS, {}], "names no task"),
        ("headers", [[], GOOD_KWARGS, {}], "names no task"),
        ({}, {"id": TASK_ID, "kwargs": GOOD_KWARGS}, "lacks a task name or a task id"),
        ({}, {"task": DELIVER_EVENT, "kwargs": GOOD_KWARGS}, "lacks a task name or a task id"),
        ({}, {"task": DELIVER_EVENT, "id": TASK_ID, "args": "ep"}, "args must be a list"),
        ({}, {"task": DELIVER_EVENT, "id": TASK_ID, "kwargs": []}, "kwargs must be an object"),
    ],
)
def test_read_call_refuses_what_is_not_a_task_message(headers: Any, decoded: Any,
                                                      message: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        read_call(headers, decoded)
    assert info.value.code == MALFORMED
    assert message in str(info.value)


# message_events: good messages -----------------------------------------------------------------


def test_message_events_protocol_2_single_event() -> None:
    items = read(p2_headers(), [[], {**GOOD_KWARGS, "idempotency_key": "k-1"}, {}])
    assert items == [Incoming(f"{TASK_ID}:0", EventIn("ep", EVENT, "k-1"))]
    assert items[0].problem is None and items[0].excerpt is None


def test_message_events_protocol_2_positional_arguments() -> None:
    items = read(p2_headers(), [["ep", EVENT], {}, {}])
    assert items == [Incoming(f"{TASK_ID}:0", EventIn("ep", EVENT, None))]


def test_message_events_protocol_1_dict_body() -> None:
    body = {"task": DELIVER_EVENT, "id": TASK_ID, "args": [], "kwargs": GOOD_KWARGS}
    assert read({}, body) == [Incoming(f"{TASK_ID}:0", EventIn("ep", EVENT, None))]


def test_message_events_protocol_1_without_arguments_is_a_bad_call() -> None:
    [item] = read({}, {"task": DELIVER_EVENT, "id": TASK_ID})
    assert item.message_id == f"{TASK_ID}:0"
    assert item.problem is not None and item.problem.code == "bad_arguments"
    assert "needs webhook_id and event_data" in str(item.problem)


def test_a_bad_single_call_keeps_its_webhook_id() -> None:
    [item] = read(p2_headers(), [[], {"webhook_id": "ep-7", "colour": "red"}, {}])
    assert item.message_id == f"{TASK_ID}:0"
    assert item.problem is not None and item.problem.code == "bad_arguments"
    assert "unknown argument(s): colour" in str(item.problem)
    assert item.event.webhook_id == "ep-7"


def test_a_single_call_with_too_many_arguments_is_a_bad_call() -> None:
    [item] = read(p2_headers(), [["ep", EVENT, "k", "q", "extra"], {}, {}])
    assert_placeholder(item, f"{TASK_ID}:0", "bad_arguments", "at most 4")


# message_events: unreadable messages -------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoded", "message"),
    [
        ({"args": [], "kwargs": GOOD_KWARGS, "embed": {}}, "must be [args, kwargs, embed], "
                                                            "not dict"),
        ([[], GOOD_KWARGS], "must be [args, kwargs, embed], not list"),
        ([[], GOOD_KWARGS, {}, None], "must be [args, kwargs, embed], not list"),
        ([GOOD_KWARGS, {}, {}], "args must be a list, not dict"),
        ([[], ["ep", EVENT], {}], "kwargs must be an object, not list"),
        ([[], {("webhook", "id"): "ep"}, {}], "kwargs must have string keys"),
        ([[], GOOD_KWARGS, "callbacks"], "embed must be an object, not str"),
    ],
)
def test_malformed_body_becomes_one_placeholder_under_the_task_id(decoded: Any,
                                                                 message: str) -> None:
    raw = b'{"some": "bytes"}'
    items = message_events(p2_headers(), raw, lambda: decoded, 1000)
    assert len(items) == 1
    assert_placeholder(items[0], f"{TASK_ID}:0", MALFORMED, message)
    assert items[0].excerpt == raw


@pytest.mark.parametrize("task_id", [None, "", 42])
def test_message_without_a_usable_id_gets_a_stable_id_from_its_bytes(task_id: Any) -> None:
    headers = {"task": DELIVER_EVENT} if task_id is None else p2_headers(task_id=task_id)
    raw = b'[[], {"webhook_id": "ep", "event_data": {}}, {}]'
    decoded = json.loads(raw)
    first = message_events(headers, raw, lambda: decoded, 1000)
    again = message_events(dict(headers), bytes(raw), lambda: json.loads(raw), 1000)
    other = message_events(headers, raw + b" ", lambda: decoded, 1000)
    assert len(first) == len(again) == len(other) == 1
    assert_placeholder(first[0], raw_message_id(raw), MALFORMED, "lacks a task name or a task id")
    assert first[0].message_id.startswith("raw-")
    assert again[0].message_id == first[0].message_id
    assert other[0].message_id != first[0].message_id
    assert first[0].excerpt == raw


def test_message_without_a_task_is_unreadable() -> None:
    raw = b'[[], {"webhook_id": "ep", "event_data": {}}, {}]'
    [with_id] = message_events({"id": TASK_ID}, raw, lambda: json.loads(raw), 1000)
    assert_placeholder(with_id, f"{TASK_ID}:0", MALFORMED, "names no task")
    [no_headers] = message_events(None, raw, lambda: json.loads(raw), 1000)
    assert_placeholder(no_headers, raw_message_id(raw), MALFORMED, "names no task")


def test_a_task_that_carries_no_events_is_unreadable() -> None:
    headers = p2_headers(task="webhooks.publish_event")
    [item] = read(headers, [[], {"event_type": "x", "data": {}}, {}])
    assert_placeholder(item, f"{TASK_ID}:0", MALFORMED, "webhooks.publish_event carries no events")
    with pytest.raises(InvalidEvent, match="carries no events") as info:
        events_of(TaskCall("webhooks.cleanup_old_deliveries", TASK_ID, (), {}), 10)
    assert info.value.code == MALFORMED


def _raise(exc: BaseException) -> Any:
    raise exc


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ValueError("Expecting value: line 1 column 1"), "undecodable body: ValueError: Expecting"),
        (json.JSONDecodeError("Expecting value", "x", 0), "undecodable body: JSONDecodeError"),
        (RecursionError("maximum recursion depth exceeded"), "undecodable body: RecursionError"),
        (ContentDisallowed("Refusing to deserialize untrusted content of type pickle"),
         "undecodable body: ContentDisallowed: Refusing"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
         "undecodable body: UnicodeDecodeError"),
    ],
)
def test_decoder_errors_become_a_malformed_placeholder_with_an_excerpt(
    error: BaseException, message: str
) -> None:
    raw = bytes(range(256)) * 20  # 5120 bytes, not JSON
    items = message_events(p2_headers(), raw, lambda: _raise(error), 1000)
    assert len(items) == 1
    assert_placeholder(items[0], f"{TASK_ID}:0", MALFORMED, message)
    assert items[0].excerpt is not None
    assert len(items[0].excerpt) == REJECTED_EXCERPT_BYTES <= 2048
    assert items[0].excerpt == raw[:REJECTED_EXCERPT_BYTES]


def test_a_long_decoder_error_is_cut_in_the_recorded_reason() -> None:
    [item] = message_events(p2_headers(), b"x", lambda: _raise(ValueError("e" * 5000)), 1000)
    assert item.problem is not None and item.problem.code == MALFORMED
    assert len(str(item.problem)) < 300


def test_a_short_unreadable_message_is_kept_whole() -> None:
    [item] = message_events(p2_headers(), b"{oops", lambda: _raise(ValueError("bad")), 1000)
    assert item.excerpt == b"{oops"


def test_oversize_message_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "MAX_MESSAGE_BYTES", 100)
    decoded = [[], GOOD_KWARGS, {}]
    calls: list[int] = []

    def decode() -> Any:
        calls.append(1)
        return decoded

    raw = b"[" + b" " * 99 + b"]"  # 101 bytes
    [item] = message_events(p2_headers(), raw, decode, 1000)
    assert calls == []
    assert_placeholder(item, f"{TASK_ID}:0", MALFORMED, "message of 101 bytes; the limit is 100")
    assert item.excerpt == raw
    # At the limit it is read.
    [fine] = message_events(p2_headers(), raw[:100], decode, 1000)
    assert calls == [1]
    assert fine == Incoming(f"{TASK_ID}:0", EventIn("ep", EVENT, None))


def test_oversize_excerpt_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "MAX_MESSAGE_BYTES", 4096)
    raw = b"a" * 5000
    [item] = message_events({}, raw, lambda: _raise(AssertionError("decoded")), 1000)
    assert_placeholder(item, raw_message_id(raw), MALFORMED, "message of 5000 bytes")
    assert item.excerpt == raw[:REJECTED_EXCERPT_BYTES]


# deliver_events -------------------------------------------------------------------------


def batch_headers() -> dict[str, Any]:
    return p2_headers(task=DELIVER_EVENTS)


def one(n: int) -> dict[str, Any]:
    return {"webhook_id": f"ep-{n}", "event_data": {"n": n}}


def test_deliver_events_one_incoming_per_event_with_positional_ids() -> None:
    events = [one(0), {**one(1), "idempotency_key": "k"}, one(2)]
    items = read(batch_headers(), [[], {"events": events}, {}])
    assert items == [
        Incoming(f"{TASK_ID}:0", EventIn("ep-0", {"n": 0}, None)),
        Incoming(f"{TASK_ID}:1", EventIn("ep-1", {"n": 1}, "k")),
        Incoming(f"{TASK_ID}:2", EventIn("ep-2", {"n": 2}, None)),
    ]


def test_deliver_events_positional_events() -> None:
    items = read(batch_headers(), [[[one(0), one(1)]], {}, {}])
    assert [i.message_id for i in items] == [f"{TASK_ID}:0", f"{TASK_ID}:1"]
    assert [i.event.webhook_id for i in items] == ["ep-0", "ep-1"]
    assert all(i.problem is None for i in items)


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"events": {"webhook_id": "ep", "event_data": {}}}, "dict"),
        ({"events": "ep"}, "str"),
        ({"events": None}, "null"),
        ({"events": 3}, "int"),
        ({}, "null"),
    ],
)
def test_deliver_events_whose_events_are_not_a_list(kwargs: dict[str, Any], shape: str) -> None:
    items = read(batch_headers(), [[], kwargs, {}])
    assert len(items) == 1
    assert_placeholder(items[0], f"{TASK_ID}:0", "bad_arguments",
                       f"deliver_events takes events=[...], not {shape}")


def test_deliver_events_items_that_are_not_objects_are_rejected_one_by_one() -> None:
    events = [one(0), "ep-1", None, ["ep", {}], one(4), {"webhook_id": "ep-5"}]
    items = read(batch_headers(), [[], {"events": events}, {}])
    assert [i.message_id for i in items] == [f"{TASK_ID}:{n}" for n in range(6)]
    assert items[0] == Incoming(f"{TASK_ID}:0", EventIn("ep-0", {"n": 0}, None))
    assert items[4] == Incoming(f"{TASK_ID}:4", EventIn("ep-4", {"n": 4}, None))
    for n, kind in ((1, "str"), (2, "NoneType"), (3, "list")):
        assert_placeholder(items[n], f"{TASK_ID}:{n}", "bad_arguments",
                           f"each event must be an object with webhook_id and event_data, "
                           f"not {kind}")
    assert items[5].problem is not None and items[5].problem.code == "bad_arguments"
    assert "needs webhook_id and event_data" in str(items[5].problem)
    assert items[5].event.webhook_id == "ep-5"


def test_deliver_events_beyond_max_events_are_cut() -> None:
    events = [one(n) for n in range(7)]
    items = read(batch_headers(), [[], {"events": events}, {}], max_events=5)
    assert [i.message_id for i in items] == [f"{TASK_ID}:{n}" for n in range(5)]
    assert [i.event.event_data for i in items] == [{"n": n} for n in range(5)]
    assert all(i.problem is None for i in items)
    exactly = read(batch_headers(), [[], {"events": events[:5]}, {}], max_events=5)
    assert len(exactly) == 5


def test_events_of_directly() -> None:
    call = TaskCall(DELIVER_EVENTS, "t-1", ([one(0), one(1), one(2)],), {})
    assert [i.message_id for i in events_of(call, 2)] == ["t-1:0", "t-1:1"]
    single = TaskCall(DELIVER_EVENT, "t-2", ("ep",), {"event_data": {}})
    assert events_of(single, 1) == [Incoming("t-2:0", EventIn("ep", {}, None))]


def test_a_batch_item_with_a_non_string_key_is_that_items_problem() -> None:
    call = TaskCall(DELIVER_EVENTS, "t-3", (), {"events": [one(0), {**one(1), 5: "x"}]})
    items = events_of(call, 10)
    assert items[0] == Incoming("t-3:0", EventIn("ep-0", {"n": 0}, None))
    assert items[1].problem is not None and items[1].problem.code == "bad_arguments"


# never raises ------------------------------------------------------------------------------------


GARBAGE: list[Any] = [None, 0, 1.5, "", "x", b"bytes", [], {}, [[]], [None, None, None],
                      [[], {}, {}], {"task": DELIVER_EVENT}, {"task": 1, "id": 2},
                      [[1, 2, 3], {"events": [[], {}]}, None], [(), {"events": ()}, {}]]
HEADERS: list[Any] = [None, {}, "h", [], p2_headers(), batch_headers(),
                      {"task": DELIVER_EVENTS, "id": ""}, {"task": None, "id": None}]


@pytest.mark.parametrize("headers", HEADERS)
def test_message_events_never_raises(headers: Any) -> None:
    for decoded in GARBAGE:
        for max_events in (1, 1000):
            items = message_events(headers, b"raw", lambda d=decoded: d, max_events)
            assert isinstance(items, list)
            for item in items:
                assert isinstance(item, Incoming)
                assert item.problem is None or isinstance(item.problem, InvalidEvent)


def test_message_problem_is_none_for_a_readable_call_and_names_what_is_wrong_otherwise() -> None:
    from worker.core.messages import message_problem

    headers = {"task": "webhooks.deliver_events", "id": "t-1"}
    assert message_problem(headers, b"x", lambda: [[], {"events": []}, {}]) is None
    problem = message_problem(headers, b"x", lambda: [[], ["events"], {}])
    assert problem is not None and problem.code == "malformed_message"
    assert "kwargs must be an object" in str(problem)

    def broken() -> object:
        raise ValueError("NaN is not JSON")

    undecodable = message_problem(headers, b"x", broken)
    assert undecodable is not None and "undecodable body" in str(undecodable)


@pytest.mark.parametrize(("message_id", "task_id"), [
    ("5d2c1e0a-7f1b-4c1e-9a57-0c7f0e3b9d11:0", "5d2c1e0a-7f1b-4c1e-9a57-0c7f0e3b9d11"),
    ("batch:999", "batch"),
    ("a:b:3", "a:b"),  # a task id may itself hold a colon
    ("raw-0123abcd", None),  # made from a message's bytes: no task
    (":0", None),
    ("task:", None),
    ("task:x", None),
    ("task:²", None),  # a digit, but not an index
    ("t" * 80 + ":0", "t" * 64),  # cut to the column
])
def test_task_id_of(message_id: str, task_id: str | None) -> None:
    assert task_id_of(message_id) == task_id


def test_task_id_of_round_trips_what_the_reader_makes() -> None:
    call = TaskCall(DELIVER_EVENTS, "tid-1", (), {"events": [
        {"webhook_id": "ep", "event_data": {}}, {"webhook_id": "ep", "event_data": {}}]})
    assert {task_id_of(item.message_id) for item in events_of(call, 10)} == {"tid-1"}
