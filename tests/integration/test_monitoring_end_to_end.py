"""Celery's own tools see single `.delay()` events: a real worker, a real Flower, a real
result backend (the tests' own Redis, database 1), and `webhooks deliveries show <task id>`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import ROOT, Receiver, wait_until, worker_env
from tests.integration.test_pipeline import add_endpoint
from worker.cli import main
from worker.settings import get_settings

RESULTS_URL = f"{TEST_REDIS_URL}/1"
FLOWER_AUTH = ("admin", "flower-test")

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _produce(env: dict[str, str], code: str) -> Any:
    """Run producer code in a process of its own (its settings read from `env`); its JSON."""
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          timeout=60, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


PRODUCE_ALL = """
import json
from worker.tasks.webhook_delivery import (
    deliver_webhook_event, deliver_webhook_events, publish_webhook_event)
single = deliver_webhook_event.delay(webhook_id="ep-mon", event_data={"n": 1})
unknown = deliver_webhook_event.delay(webhook_id="ep-nope", event_data={"n": 2})
batch = deliver_webhook_events.delay(events=[
    {"webhook_id": "ep-mon", "event_data": {"n": 3}},
    {"webhook_id": "ep-nope", "event_data": {"n": 4}}])
fan = publish_webhook_event.delay(event_type="order.created", data={"n": 5})
print(json.dumps({name: [t.id, t.get(timeout=10)] for name, t in (
    ("single", single), ("unknown", unknown), ("batch", batch), ("fan", fan))}))
"""

PRODUCE_WITHOUT_BACKEND = """
import json
from worker.tasks.webhook_delivery import deliver_webhook_event
task = deliver_webhook_event.delay(webhook_id="ep-mon", event_data={"n": 6})
try:
    task.get(timeout=10)
except Exception as exc:
    print(json.dumps([task.id, type(exc).__name__, str(exc)]))
"""


def _show(database_url: str, task_id: str, monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        capsys.readouterr()
        assert main(["deliveries", "show", task_id, "--json"]) == 0
        return json.loads(capsys.readouterr().out)
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_get_returns_the_acceptance_of_single_batch_and_fan_out_tasks(
    database_url: str, receiver: Receiver, start_worker: Any,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    add_endpoint(database_url, "ep-mon", receiver.url(f"/ok/mon-{time.time_ns()}"))
    start_worker(database_url, WEBHOOKS_RESULT_BACKEND=RESULTS_URL)
    producer = worker_env(database_url, WEBHOOKS_RESULT_BACKEND=RESULTS_URL)
    got = _produce(producer, PRODUCE_ALL)

    single_id, single = got["single"]
    [delivery_id] = single["accepted"]
    assert single == {"accepted": [delivery_id], "duplicates": 0, "rejected": []}
    _, unknown = got["unknown"]
    assert unknown["accepted"] == []
    assert [(r["webhook_id"], r["code"]) for r in unknown["rejected"]] == [
        ("ep-nope", "unknown_endpoint")]
    batch_id, batch = got["batch"]
    assert len(batch["accepted"]) == 1
    assert [r["code"] for r in batch["rejected"]] == ["unknown_endpoint"]
    _, fan = got["fan"]
    assert len(fan["accepted"]) == 1 and fan["rejected"] == []  # ep-mon subscribes to all

    # The task id finds the delivery; a batch's finds all it became, rejected ones too.
    shown = _show(database_url, single_id, monkeypatch, capsys)["delivery"]
    assert (shown["id"], shown["task_id"]) == (delivery_id, single_id)
    of_batch = _show(database_url, batch_id, monkeypatch, capsys)["deliveries"]
    assert sorted(d["status"] for d in of_batch) == ["pending", "rejected"] or sorted(
        d["status"] for d in of_batch) == ["rejected", "succeeded"]
    assert batch["accepted"][0] in {d["id"] for d in of_batch}

    # A producer without a result backend is told which setting it lacks.
    task_id, kind, message = _produce(worker_env(database_url), PRODUCE_WITHOUT_BACKEND)
    assert kind == "NotImplementedError"
    assert "WEBHOOKS_RESULT_BACKEND" in message
    wait_until(lambda: _show(database_url, task_id, monkeypatch, capsys)["delivery"]["status"]
               == "succeeded", 20, "the event without a backend delivered")


@pytest.fixture
def flower(tmp_path: Path, redis_clean: None) -> Iterator[str]:
    """`celery -A worker.celery_app flower` on a free loopback port, behind basic auth."""
    if importlib.util.find_spec("flower") is None:
        if os.environ.get("CI"):
            raise AssertionError("flower is not installed: pip install -e '.[test]'")
        pytest.skip("flower is not installed (pip install -e '.[monitor]')")
    port = _free_port()
    log_path = tmp_path / "flower.log"
    env = worker_env("sqlite+aiosqlite:///" + str(tmp_path / "unused.db"))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
             "--address=127.0.0.1", f"--port={port}", f"--basic-auth={':'.join(FLOWER_AUTH)}",
             "--persistent=False"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited: {log_path.read_text(errors='replace')}")
        try:
            return requests.get(f"{url}/healthcheck", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(healthy, 20, "flower up")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_flower_lists_a_single_delay_task_as_succeeded_and_inspect_counts_it(
    database_url: str, receiver: Receiver, start_worker: Any, flower: str,
) -> None:
    from worker.celery_app import app
    from worker.tasks.webhook_delivery import deliver_webhook_event

    add_endpoint(database_url, "ep-flower", receiver.url(f"/ok/flower-{time.time_ns()}"))
    start_worker(database_url)

    def info(task_id: str) -> dict[str, Any] | None:
        answer = requests.get(f"{flower}/api/task/info/{task_id}", auth=FLOWER_AUTH, timeout=5)
        return answer.json() if answer.status_code == 200 else None  # 404: not seen (yet)

    def succeeded(task_id: str) -> dict[str, Any] | None:
        found = info(task_id)
        return found if found is not None and found["state"] == "SUCCESS" else None

    # Flower subscribes to events as it starts: a task sent before that is never seen, so
    # send until one is (the first, as a rule).
    seen: dict[str, Any] | None = None
    sent: list[str] = []
    deadline = time.monotonic() + 40
    while seen is None and time.monotonic() < deadline:
        task = deliver_webhook_event.delay(webhook_id="ep-flower", event_data={"n": len(sent)})
        sent.append(task.id)
        try:
            seen = wait_until(lambda t=task.id: succeeded(t), 8, "flower to see the task")
        except AssertionError:
            continue
    assert seen is not None, f"flower never listed any of {sent}"
    assert seen["name"] == "webhooks.deliver_event"
    assert "'accepted': ['msg_" in seen["result"]
    assert seen["worker"].startswith("celery@")
    listed = requests.get(f"{flower}/api/tasks", params={"taskname": "webhooks.deliver_event"},
                          auth=FLOWER_AUTH, timeout=5).json()
    assert seen["uuid"] in listed and listed[seen["uuid"]]["state"] == "SUCCESS"

    # A rejected single event is a failure, with the reason.
    bad = deliver_webhook_event.delay(webhook_id="ep-gone-away", event_data={})
    failed = wait_until(lambda: (found := info(bad.id)) and found["state"] == "FAILURE"
                        and found, 15, "flower to see the rejected task")
    assert "unknown_endpoint" in failed["exception"]

    # `inspect stats` counts them (Celery never ran them as tasks).
    def total() -> int:
        stats = app.control.inspect(timeout=2).stats() or {}
        return sum(s.get("total", {}).get("webhooks.deliver_event", 0) for s in stats.values())

    wait_until(lambda: total() >= len(sent) + 1, 15, "inspect stats to count the events")
