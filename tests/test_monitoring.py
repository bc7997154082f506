"""What Celery's tools see of single events (worker/monitoring.py): the events Flower reads,
the counts `inspect stats` reports, results in the backend, and the error without one."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery.result import AsyncResult
from celery.worker import state as worker_state

from worker.celery_app import app
from worker.core.models import AcceptReport, Rejection
from worker.monitoring import (
    FLUSH_EVENTS,
    FLUSH_INTERVAL,
    NO_BACKEND,
    REPR_MAX,
    NoResultBackend,
    ResultRecorder,
    TaskEvents,
    acceptance,
    outcome_event,
    received_fields,
)

NAME = "webhooks.deliver_event"


def test_acceptance_is_what_get_returns() -> None:
    report = AcceptReport(accepted=["msg_1"], duplicates=2, rejected=[
        Rejection("nope", "unknown_endpoint", "no endpoint with id 'nope'", payload=b"{}")])
    assert acceptance(report) == {
        "accepted": ["msg_1"], "duplicates": 2,
        "rejected": [{"webhook_id": "nope", "code": "unknown_endpoint",
                      "message": "no endpoint with id 'nope'"}]}


def test_an_accepted_event_succeeds_with_its_acceptance_as_result() -> None:
    kind, fields = outcome_event("t1", {"accepted": ["msg_1"], "duplicates": 0,
                                        "rejected": []}, 0.25)
    assert kind == "task-succeeded"
    assert fields == {"uuid": "t1", "runtime": 0.25,
                      "result": "{'accepted': ['msg_1'], 'duplicates': 0, 'rejected': []}"}


def test_a_redelivered_event_succeeds_as_a_duplicate() -> None:
    kind, _ = outcome_event("t1", {"accepted": [], "duplicates": 1, "rejected": []}, 0.1)
    assert kind == "task-succeeded"


def test_a_rejected_event_fails_with_its_reason() -> None:
    kind, fields = outcome_event("t2", {"accepted": [], "duplicates": 0, "rejected": [
        {"webhook_id": "nope", "code": "unknown_endpoint",
         "message": "no endpoint with id 'nope'"}]}, 0.5)
    assert kind == "task-failed"
    assert fields == {"uuid": "t2", "runtime": 0.5, "traceback": "",
                      "exception": "rejected: unknown_endpoint: no endpoint with id 'nope'"}


def test_received_fields_from_the_headers_only_strings_and_cut() -> None:
    headers = {"id": "t1", "task": NAME, "argsrepr": "()", "root_id": "t1",
               "kwargsrepr": "{'webhook_id': 'ep', 'event_data': {...}}" + "x" * 5000,
               "parent_id": 7}
    fields = received_fields(NAME, headers)
    assert fields is not None
    assert (fields["uuid"], fields["name"], fields["args"], fields["root_id"]) == (
        "t1", NAME, "()", "t1")
    assert len(fields["kwargs"]) == REPR_MAX and fields["parent_id"] is None
    assert received_fields(NAME, {"task": NAME}) is None  # no id: nothing to report under
    assert received_fields(NAME, None) is None


class FakeDispatcher:
    def __init__(self, enabled: bool = True, groups: set[str] | None = None) -> None:
        self.enabled = enabled
        self.groups = groups
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, kind: str, **fields: Any) -> None:
        self.sent.append((kind, fields))


class FakeHub:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any) -> None:
        self.later.append((delay, callback))


class FakeConsumer:
    def __init__(self, dispatcher: FakeDispatcher | None) -> None:
        self.event_dispatcher = dispatcher
        self.hub = FakeHub()


def test_task_events_send_and_count() -> None:
    dispatcher = FakeDispatcher()
    consumer = FakeConsumer(dispatcher)
    events = TaskEvents(consumer, NAME, send_events=True)
    total, per_name = worker_state.all_total_count[0], worker_state.total_count[NAME]
    before = time.time()
    events.received({"id": "t1", "argsrepr": "()", "kwargsrepr": "{}"})
    events.settled("t1", {"accepted": ["msg_1"], "duplicates": 0, "rejected": []},
                   time.monotonic() - 0.1)
    # Sent together, once, a little later, on the consumer's loop, stamped when they happened.
    assert dispatcher.sent == []
    [(delay, flush)] = consumer.hub.later
    assert delay == FLUSH_INTERVAL
    time.sleep(0.01)
    flush()
    assert [kind for kind, _ in dispatcher.sent] == ["task-received", "task-succeeded"]
    assert dispatcher.sent[1][1]["runtime"] >= 0.1
    assert all(before <= fields["timestamp"] < time.time() - 0.005
               for _, fields in dispatcher.sent)
    # `inspect stats` reports these counters as "total".
    assert worker_state.all_total_count[0] == total + 1
    assert worker_state.total_count[NAME] == per_name + 1
    # The consumer's dispatcher is looked up each time: a reconnect replaces it.
    consumer.event_dispatcher = replacement = FakeDispatcher()
    events.received({"id": "t2"})
    events.flush()
    assert [kind for kind, _ in replacement.sent] == ["task-received"]


def test_many_events_are_sent_without_waiting() -> None:
    dispatcher = FakeDispatcher()
    consumer = FakeConsumer(dispatcher)
    events = TaskEvents(consumer, NAME, send_events=True)
    for n in range(FLUSH_EVENTS):
        events.received({"id": f"t{n}"})
    assert len(dispatcher.sent) == FLUSH_EVENTS
    assert len(consumer.hub.later) == 1  # one flush was scheduled, and finds nothing left


@pytest.mark.parametrize("dispatcher", [None, FakeDispatcher(enabled=False)])
def test_no_events_without_an_enabled_dispatcher_but_still_counted(
        dispatcher: FakeDispatcher | None) -> None:
    events = TaskEvents(FakeConsumer(dispatcher), NAME, send_events=True)
    total = worker_state.all_total_count[0]
    events.received({"id": "t1"})
    events.settled("t1", {"accepted": ["x"]}, time.monotonic())
    events.flush()
    assert worker_state.all_total_count[0] == total + 1
    assert dispatcher is None or dispatcher.sent == []


def test_task_events_off_until_enabled_by_remote_control() -> None:
    """A worker started with task events off sends none, and costs nothing, until
    `celery control enable_events` (Flower sends it) adds the task group."""
    dispatcher = FakeDispatcher(groups={"worker"})
    consumer = FakeConsumer(dispatcher)
    events = TaskEvents(consumer, NAME, send_events=True)
    events.received({"id": "t1"})
    assert consumer.hub.later == []
    dispatcher.groups.add("task")  # what celery.worker.control.enable_events does
    events.received({"id": "t2"})
    events.flush()
    assert [fields["uuid"] for _, fields in dispatcher.sent] == ["t2"]


def test_a_task_that_sends_no_events_sends_none() -> None:
    dispatcher = FakeDispatcher()
    events = TaskEvents(FakeConsumer(dispatcher), NAME, send_events=False)
    events.received({"id": "t1"})
    events.flush()
    assert dispatcher.sent == []


class FakeBackend:
    def __init__(self, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.stored: dict[str, tuple[Any, str]] = {}
        self.threads: set[str] = set()
        self.fail = fail
        self.gate = gate

    def store_result(self, task_id: str, result: Any, state: str) -> None:
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail:
            raise ConnectionError("backend down")
        self.stored[task_id] = (result, state)


def test_results_are_stored_off_the_callers_thread() -> None:
    backend = FakeBackend()
    recorder = ResultRecorder(lambda: backend)
    recorder.put("t1", {"accepted": ["msg_1"], "duplicates": 0, "rejected": []})
    assert recorder.wait_idle(5)
    assert backend.stored == {"t1": ({"accepted": ["msg_1"], "duplicates": 0, "rejected": []},
                                     "SUCCESS")}
    assert backend.threads == {"webhooks-results"}
    assert recorder.stats["stored"] == 1


def test_a_slow_backend_never_blocks_the_caller_it_drops_past_the_limit(
        caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    recorder = ResultRecorder(lambda: backend, limit=3)
    started = time.monotonic()
    for n in range(10):
        recorder.put(f"t{n}", {"n": n})
    assert time.monotonic() - started < 0.5
    gate.set()
    assert recorder.wait_idle(5)
    assert recorder.stats["dropped"] >= 6
    assert recorder.stats["stored"] + recorder.stats["dropped"] == 10
    assert "result backend too slow" in caplog.text


def test_a_failing_backend_costs_results_only(caplog: pytest.LogCaptureFixture) -> None:
    recorder = ResultRecorder(lambda: FakeBackend(fail=True))
    recorder.put("t1", {})
    recorder.put("t2", {})
    assert recorder.wait_idle(5)
    assert recorder.stats["failed"] == 2
    assert caplog.text.count("could not store the result") == 1  # one warning a minute


def test_without_a_result_backend_get_names_the_setting() -> None:
    assert isinstance(app.backend, NoResultBackend)
    with pytest.raises(NotImplementedError) as raised:
        AsyncResult("some-task-id", app=app).get(timeout=1)
    assert str(raised.value) == NO_BACKEND
    assert "WEBHOOKS_RESULT_BACKEND=redis://" in NO_BACKEND
    assert app.conf.worker_send_task_events is True
    assert app.conf.task_send_sent_event is True
