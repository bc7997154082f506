"""Reading the producer calls a task message carries (no broker involved)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.core.errors import InvalidEvent
from worker.core.messages import event_from_mapping, incoming, single_event


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
        (("ep", {}, "k", "extra"), {}, "at most 3"),
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
