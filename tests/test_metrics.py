"""Metrics: attempts and health changes into counters, the database's gauges on both backends,
several real processes counting into one directory, the CLI, and the deploy/ files."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import insert, update

from worker import metrics as metrics_module
from worker.cli import main
from worker.core.health import HealthChange, HealthEvent
from worker.core.models import (
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    Endpoint,
    ErrorKind,
    HttpResult,
    Outcome,
    OutcomeKind,
)
from worker.core.signing import generate_secret
from worker.db.schema import deliveries, endpoints
from worker.delivery.metrics_hooks import EndpointClasses, EngineMetrics, status_class
from worker.metrics import (
    DatabaseCollector,
    Metrics,
    compact,
    dead_pids,
    prepare_worker,
    process_exiting,
    render,
    updating,
)
from worker.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


# -- helpers ------------------------------------------------------------------------------------

def make_record(kind: OutcomeKind = OutcomeKind.SUCCESS, *, status: int | None = 204,
                error_kind: ErrorKind | None = None, duration_ms: float = 100.0,
                endpoint: str = "ep-1", url: str = "https://hooks.example.com/in",
                enqueued_ago: float | None = 2.5) -> AttemptRecord:
    delivery = Delivery(
        id=f"msg_{time.time_ns()}", endpoint_id=endpoint, url=url, secrets=("whsec_x",),
        payload=b"{}", enqueued_at=None if enqueued_ago is None
        else NOW.timestamp() - enqueued_ago)
    return AttemptRecord(
        delivery=delivery,
        result=HttpResult(status_code=status, error_kind=error_kind, duration_ms=duration_ms),
        outcome=Outcome(kind, error_kind, None if kind is OutcomeKind.SUCCESS else "boom"),
        attempted_at=NOW, attempt_number=1,
        next_status=DeliveryStatus.SUCCEEDED if kind is OutcomeKind.SUCCESS
        else DeliveryStatus.PENDING,
        next_attempt_at=None)


class FakeWriter:
    def __init__(self) -> None:
        self.written: list[Any] = []
        self.health: list[Any] = []
        self.unwritten = 0

    def on_written(self, listener: Any) -> None:
        self.written.append(listener)

    def on_health(self, listener: Any) -> None:
        self.health.append(listener)


class FakeScheduler:
    in_flight = 0
    waiting = 0


def hooks(**settings: Any) -> tuple[EngineMetrics, CollectorRegistry, FakeWriter]:
    registry = CollectorRegistry()
    writer = FakeWriter()
    made = EngineMetrics(Settings(**settings), writer, FakeScheduler(),
                         metrics=Metrics(registry))
    return made, registry, writer


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples(text).items()
               if n == name and set(labels.items()) <= ls)


# -- attempts and health into counters ------------------------------------------------------------

def test_attempts_count_by_outcome_error_kind_status_class_and_endpoint_class() -> None:
    made, registry, writer = hooks()
    assert writer.written == [made.attempts_written]  # the writer's listener, once committed
    made.attempts_written([
        make_record(),
        make_record(),
        make_record(OutcomeKind.RETRY, status=500, error_kind=ErrorKind.HTTP_STATUS),
        make_record(OutcomeKind.RETRY, status=None, error_kind=ErrorKind.TIMEOUT),
        make_record(OutcomeKind.FAILED, status=404, error_kind=ErrorKind.HTTP_STATUS),
        make_record(OutcomeKind.DISABLE, status=410, error_kind=ErrorKind.HTTP_STATUS),
        make_record(OutcomeKind.BLOCKED, status=None, error_kind=ErrorKind.BLOCKED),
    ])
    name = "webhooks_attempts_total"
    assert value(registry, name, outcome="success", error_kind="none", status_class="2xx",
                 endpoint_class="all") == 2
    assert value(registry, name, outcome="retry", error_kind="http_status", status_class="5xx",
                 endpoint_class="all") == 1
    assert value(registry, name, outcome="retry", error_kind="timeout", status_class="none",
                 endpoint_class="all") == 1
    assert value(registry, name, outcome="failed", error_kind="http_status",
                 status_class="4xx", endpoint_class="all") == 1
    assert value(registry, name, outcome="disable", error_kind="http_status",
                 status_class="4xx", endpoint_class="all") == 1
    assert value(registry, name, outcome="blocked", error_kind="blocked", status_class="none",
                 endpoint_class="all") == 1


def test_durations_of_every_attempt_and_latency_of_successes_from_enqueue() -> None:
    made, registry, _ = hooks()
    made.attempts_written([
        make_record(duration_ms=40.0, enqueued_ago=2.5),
        make_record(duration_ms=60.0, enqueued_ago=700.0),
        make_record(OutcomeKind.RETRY, status=503, error_kind=ErrorKind.HTTP_STATUS,
                    duration_ms=3000.0, enqueued_ago=1.0),
        make_record(duration_ms=10.0, enqueued_ago=None),  # committed before enqueued_at
    ])
    duration = "webhooks_attempt_duration_seconds"
    assert value(registry, f"{duration}_count", outcome="success", endpoint_class="all") == 3
    assert value(registry, f"{duration}_sum", outcome="success",
                 endpoint_class="all") == pytest.approx(0.11)
    assert value(registry, f"{duration}_sum", outcome="retry",
                 endpoint_class="all") == pytest.approx(3.0)
    latency = "webhooks_delivery_latency_seconds"
    assert value(registry, f"{latency}_count", endpoint_class="all") == 2  # successes only
    assert value(registry, f"{latency}_sum", endpoint_class="all") == pytest.approx(702.5)
    assert value(registry, f"{latency}_bucket", endpoint_class="all", le="5.0") == 1
    assert value(registry, f"{latency}_bucket", endpoint_class="all", le="900.0") == 2


def test_health_changes_count_by_event() -> None:
    made, registry, writer = hooks()
    assert writer.health == [made.health_changed]
    made.health_changed([HealthChange("ep-1", HealthEvent.OPENED, NOW, "500"),
                         HealthChange("ep-2", HealthEvent.OPENED, NOW, "timeout"),
                         HealthChange("ep-1", HealthEvent.CLOSED),
                         HealthChange("ep-3", HealthEvent.DISABLED, reason="gone")])
    name = "webhooks_circuit_changes_total"
    assert value(registry, name, event="circuit_opened") == 2
    assert value(registry, name, event="circuit_closed") == 1
    assert value(registry, name, event="endpoint_disabled") == 1


def test_the_endpoint_class_is_bounded_in_every_mode() -> None:
    def of(classes: EndpointClasses, endpoint: str, url: str = "https://a.example/x") -> str:
        return classes(Delivery(id="d", endpoint_id=endpoint, url=url, secrets=(), payload=b""))

    off = EndpointClasses("none", 2)
    assert {of(off, f"ep-{n}") for n in range(100)} == {"all"}
    ids = EndpointClasses("id", 2)
    assert [of(ids, e) for e in ("ep-a", "ep-b", "ep-c", "ep-a", "ep-d")] == [
        "ep-a", "ep-b", "other", "ep-a", "other"]
    hosts = EndpointClasses("host", 2)
    assert [of(hosts, f"ep-{n}", url) for n, url in enumerate(
        ["https://A.example/1", "https://a.example/2", "http://10.0.0.1:81/",
         "https://c.example/"])] == ["a.example", "a.example", "10.0.0.1", "other"]
    made, registry, _ = hooks(metrics_endpoint_label="id", metrics_endpoint_limit=1)
    made.attempts_written([make_record(endpoint="ep-a"), make_record(endpoint="ep-b")])
    assert value(registry, "webhooks_attempts_total", outcome="success", error_kind="none",
                 status_class="2xx", endpoint_class="ep-a") == 1
    assert value(registry, "webhooks_attempts_total", outcome="success", error_kind="none",
                 status_class="2xx", endpoint_class="other") == 1


def test_status_classes() -> None:
    assert [status_class(c) for c in (None, 99, 101, 204, 302, 429, 503, 600)] == [
        "none", "none", "1xx", "2xx", "3xx", "4xx", "5xx", "none"]


def test_a_failing_metric_never_stops_the_writer(caplog: pytest.LogCaptureFixture) -> None:
    made, _, _ = hooks()

    class Broken:
        def labels(self, *_: Any) -> Any:
            raise OSError("No space left on device")

    made.metrics.attempts = Broken()  # type: ignore[assignment]
    made.metrics.circuit_changes = Broken()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="webhooks.metrics"):
        made.attempts_written([make_record()])
        made.attempts_written([make_record()])
        made.health_changed([HealthChange("ep-1", HealthEvent.CLOSED)])
    warnings = [r for r in caplog.records if r.name == "webhooks.metrics"]
    assert len(warnings) == 1  # once, not per batch
    assert "No space left on device" in warnings[0].getMessage()


async def test_what_the_engine_holds_is_sampled_and_zero_once_stopped() -> None:
    registry = CollectorRegistry()
    writer, scheduler = FakeWriter(), FakeScheduler()
    made = EngineMetrics(Settings(), writer, scheduler, metrics=Metrics(registry),
                         sample_interval=0.01)
    scheduler.in_flight, scheduler.waiting, writer.unwritten = 7, 3, 2
    made.start()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if value(registry, "webhooks_in_flight") == 7:
            break
    assert value(registry, "webhooks_in_flight") == 7
    assert value(registry, "webhooks_waiting") == 3
    assert value(registry, "webhooks_unwritten_outcomes") == 2
    scheduler.in_flight = 4
    await asyncio.sleep(0.05)
    assert value(registry, "webhooks_in_flight") == 4
    await made.stop()
    assert value(registry, "webhooks_in_flight") == 0
    assert value(registry, "webhooks_waiting") == 0


def test_a_fork_never_inherits_a_held_metrics_lock() -> None:
    """The engine thread updates metrics while Celery's main thread forks pool children: the
    fork waits for the update, and the child starts with a free lock."""
    holding, release = threading.Event(), threading.Event()

    def update_slowly() -> None:
        with updating():
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=update_slowly)
    thread.start()
    assert holding.wait(5)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: the lock must be free at once
        code = 0 if updating().acquire(timeout=1) else 1
        os._exit(code)
    waited = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    thread.join(5)
    assert os.waitstatus_to_exitcode(status) == 0
    assert waited >= 0.2  # the fork waited for the update in progress


# -- the database's gauges ----------------------------------------------------------------------

async def add_endpoint(store: Any, endpoint_id: str, **state: Any) -> None:
    await store.add_endpoint(Endpoint(id=endpoint_id, url="https://hooks.example.com/in",
                                      secrets=(generate_secret(),)))
    if state:
        async with store.engine.begin() as conn:
            await conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                               .values(**state))


async def add_deliveries(store: Any, *rows: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    base = {"attempts": 0, "event_type": None, "idempotency_key": None, "payload": b"{}",
            "locked_until": None, "next_attempt_at": None, "created_at": now,
            "updated_at": now, "last_status_code": None, "last_error": None}
    async with store.engine.begin() as conn:
        await conn.execute(insert(deliveries), [
            {**base, "id": f"msg_{n}_{time.time_ns()}", **row} for n, row in enumerate(rows)])


async def scrape(collector: Any) -> str:
    """Collect from another thread, as the HTTP server does."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return (await asyncio.to_thread(generate_latest, registry)).decode()


async def test_database_gauges(database_url: str, store: Any) -> None:
    now = datetime.now(UTC)

    def ago(seconds: float) -> datetime:
        return now - timedelta(seconds=seconds)

    await add_endpoint(store, "ep-ok")
    await add_endpoint(store, "ep-off", enabled=False, disabled_reason="by operator")
    await add_endpoint(store, "ep-open", circuit_open_until=now + timedelta(minutes=5))
    await add_endpoint(store, "ep-probe", circuit_open_until=ago(10))  # may be probed: enabled
    pending = DeliveryStatus.PENDING.value
    await add_deliveries(
        store,
        {"endpoint_id": "ep-ok", "status": pending, "next_attempt_at": ago(120)},  # due, oldest
        {"endpoint_id": "ep-ok", "status": pending, "next_attempt_at": ago(10),
         "locked_until": ago(1)},  # its lease ran out: due
        {"endpoint_id": "ep-ok", "status": pending, "next_attempt_at": ago(300),
         "locked_until": now + timedelta(minutes=1)},  # a worker holds it
        {"endpoint_id": "ep-ok", "status": pending, "next_attempt_at": now + timedelta(hours=1)},
        {"endpoint_id": "ep-open", "status": pending, "next_attempt_at": ago(600)},  # circuit
        {"endpoint_id": "ep-probe", "status": pending, "next_attempt_at": ago(30)},  # due
        {"endpoint_id": "ep-off", "status": "held"},
        {"endpoint_id": "ep-ok", "status": "succeeded"},
        {"endpoint_id": "ep-ok", "status": "succeeded"},
        {"endpoint_id": "ep-ok", "status": "failed"},
        {"endpoint_id": "nope", "status": "rejected"},
    )
    text = await scrape(DatabaseCollector(Settings(database_url=database_url)))
    found = samples(text)

    def gauge(name: str, **labels: str) -> float:
        return found[(name, frozenset(labels.items()))]

    assert gauge("webhooks_metrics_database_up") == 1
    assert {s: gauge("webhooks_deliveries", status=s) for s in (
        "pending", "held", "succeeded", "failed", "rejected")} == {
        "pending": 6, "held": 1, "succeeded": 2, "failed": 1, "rejected": 1}
    assert gauge("webhooks_due_backlog") == 3
    assert 119 <= gauge("webhooks_oldest_due_seconds") < 180
    assert {s: gauge("webhooks_endpoints", state=s) for s in (
        "enabled", "disabled", "circuit_open")} == {"enabled": 2, "disabled": 1,
                                                    "circuit_open": 1}

    capped = samples(await scrape(DatabaseCollector(
        Settings(database_url=database_url, metrics_count_limit=2))))
    assert capped[("webhooks_deliveries", frozenset({("status", "pending")}))] == 2
    assert capped[("webhooks_deliveries", frozenset({("status", "failed")}))] == 1
    assert capped[("webhooks_due_backlog", frozenset())] == 2


async def test_database_gauges_of_an_empty_database(database_url: str, store: Any) -> None:
    found = samples(await scrape(DatabaseCollector(Settings(database_url=database_url))))
    assert found[("webhooks_due_backlog", frozenset())] == 0
    assert found[("webhooks_oldest_due_seconds", frozenset())] == 0
    assert found[("webhooks_endpoints", frozenset({("state", "enabled")}))] == 0


def test_an_unreachable_database_is_reported_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(database_url="postgresql+asyncpg://postgres@127.0.0.1:9/none",
                        metrics_db_timeout=2.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="webhooks.metrics"):
        text = asyncio.run(scrape(DatabaseCollector(settings)))
    assert time.monotonic() - started < 3
    assert total(text, "webhooks_metrics_database_up") == 0
    assert "webhooks_due_backlog" not in text
    assert any("could not read the database" in r.getMessage() for r in caplog.records)


def test_a_slow_database_is_bounded_by_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def slow(settings: Settings, now: datetime | None = None) -> Any:
        await asyncio.sleep(30)

    monkeypatch.setattr(metrics_module, "read_database", slow)
    collector = DatabaseCollector(Settings(metrics_db_timeout=0.2))
    started = time.monotonic()
    text = asyncio.run(scrape(collector))
    assert time.monotonic() - started < 2
    assert total(text, "webhooks_metrics_database_up") == 0


def test_scrapes_close_together_share_one_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    readings: list[int] = []

    async def counting(settings: Settings, now: datetime | None = None) -> Any:
        readings.append(1)
        return metrics_module.DatabaseReading(
            {s.value: 0 for s in DeliveryStatus}, 0, 0.0,
            {"enabled": 1, "disabled": 0, "circuit_open": 0})

    monkeypatch.setattr(metrics_module, "read_database", counting)
    collector = DatabaseCollector(Settings(), max_age=60)
    for _ in range(3):
        asyncio.run(scrape(collector))
    assert len(readings) == 1
    asyncio.run(scrape(DatabaseCollector(Settings(), max_age=0)))
    assert len(readings) == 2


# -- several processes, one directory ---------------------------------------------------------

def count_in_child(path: str, outcomes: Sequence[str], in_flight: int, hold: Any,
                   exit_cleanly: bool) -> None:
    """A worker process: counts attempts into `path`, holds `in_flight`, maybe waits."""
    settings = Settings(metrics_dir=path)
    made = EngineMetrics(settings, FakeWriter(), FakeScheduler())
    made.attempts_written([
        make_record(OutcomeKind(o), status=204 if o == "success" else 500,
                    error_kind=None if o == "success" else ErrorKind.HTTP_STATUS)
        for o in outcomes])
    made.held(in_flight, 1, 0)
    if hold is not None:
        hold.wait(60)
    if exit_cleanly:
        process_exiting(settings)


@pytest.fixture
def spawn() -> Iterator[Any]:
    ctx = multiprocessing.get_context("spawn")
    started: list[Any] = []

    def start(*args: Any) -> Any:
        proc = ctx.Process(target=count_in_child, args=args)
        proc.start()
        started.append(proc)
        return proc

    start.ctx = ctx  # type: ignore[attr-defined]
    yield start
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def wait_for(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_counts_of_several_processes_sum_in_one_scrape(tmp_path: Path, spawn: Any) -> None:
    path = str(tmp_path / "metrics")
    settings = Settings(metrics_dir=path)
    hold = spawn.ctx.Event()
    stays = spawn(path, ["success", "retry", "retry"], 3, hold, False)
    goes = spawn(path, ["success", "success", "retry"], 5, None, False)  # exits, no cleanup
    goes.join(60)
    assert goes.exitcode == 0

    def scraped() -> str:
        return render(settings, database=False)

    wait_for(lambda: total(scraped(), "webhooks_attempts_total") == 6)
    text = scraped()
    assert total(text, "webhooks_attempts_total", outcome="success") == 3
    assert total(text, "webhooks_attempts_total", outcome="retry", status_class="5xx") == 3
    assert total(text, "webhooks_attempt_duration_seconds_count") == 6
    assert total(text, "webhooks_delivery_latency_seconds_count") == 3
    # Live gauges: the exited process's are dropped at the scrape, the running one's stay.
    assert total(text, "webhooks_in_flight") == 3
    assert total(text, "webhooks_waiting") == 1

    # The exited process's files fold into the archive; the sums do not move.
    assert dead_pids(path) == {goes.pid}
    assert compact(path, dead_pids(path)) == 2  # its counter and histogram files
    assert not list(Path(path).glob(f"*_{goes.pid}.db"))
    assert samples(scraped()) == samples(text)

    # The running one exits the way a worker process does: its counts go to the archive too.
    stays_pid = stays.pid
    hold.set()
    stays.join(60)
    assert stays.exitcode == 0
    compact(path, [stays_pid])
    left = sorted(p.name for p in Path(path).glob("*.db"))
    assert left == ["counter_archive.db", "histogram_archive.db"]
    after = scraped()
    assert total(after, "webhooks_attempts_total") == 6
    assert total(after, "webhooks_attempts_total", outcome="success") == 3
    assert total(after, "webhooks_delivery_latency_seconds_count") == 3
    assert total(after, "webhooks_delivery_latency_seconds_bucket", le="5.0") == 3
    assert total(after, "webhooks_in_flight") == 0

    # A new process counts on top of the archive: the counters never go back.
    more = spawn(path, ["success"], 0, None, True)
    more.join(60)
    final = scraped()
    assert total(final, "webhooks_attempts_total", outcome="success") == 4
    assert sorted(p.name for p in Path(path).glob("*.db")) == [
        "counter_archive.db", "histogram_archive.db"]


def test_an_interrupted_compaction_neither_loses_nor_doubles_counts(
        tmp_path: Path, spawn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "metrics")
    settings = Settings(metrics_dir=path)

    def counted() -> float:
        return total(render(settings, database=False), "webhooks_attempts_total")

    first = spawn(path, ["success", "retry"], 0, None, False)
    first.join(60)
    compact(path, [first.pid])
    assert counted() == 2

    # Killed after the archive was replaced, before the folded files were removed.
    second = spawn(path, ["success"] * 3, 0, None, False)
    second.join(60)
    real_remove = os.remove

    def dies_removing(name: Any) -> None:
        if "/.fold-" in str(name):
            raise KeyboardInterrupt("killed")
        real_remove(name)

    monkeypatch.setattr(os, "remove", dies_removing)
    with pytest.raises(KeyboardInterrupt):
        compact(path, [second.pid])
    monkeypatch.setattr(os, "remove", real_remove)
    assert counted() == 5
    compact(path, [])  # finds the leftover already in the archive: dropped, not added again
    assert counted() == 5
    assert not list(Path(path).glob(".fold-*"))

    # Killed before the archive was replaced: the renamed files are folded next time.
    third = spawn(path, ["retry"] * 4, 0, None, False)
    third.join(60)
    real_replace = os.replace

    def dies_replacing(*args: Any) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", dies_replacing)
    with pytest.raises(KeyboardInterrupt):
        compact(path, [third.pid])
    monkeypatch.setattr(os, "replace", real_replace)
    # Their histogram files were not reached: still in sight, folded with the next dead.
    assert dead_pids(path) == {second.pid, third.pid}
    compact(path, dead_pids(path))
    assert counted() == 9
    assert sorted(p.name for p in Path(path).iterdir()) == [
        ".counter_archive-" + os.readlink(Path(path) / "counter_archive.db").split("-")[-1],
        ".histogram_archive-" + os.readlink(Path(path) / "histogram_archive.db").split("-")[-1],
        ".lock", "counter_archive.db", "histogram_archive.db"]


def test_a_starting_worker_folds_what_killed_processes_left(
        tmp_path: Path, spawn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import values

    path = str(tmp_path / "metrics")
    # prepare_worker puts the directory into this process's environment: undone afterwards.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", path)
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    killed = spawn(path, ["success", "retry"], 2, None, False)  # no exit hook: as if killed
    killed.join(60)
    assert sorted(p.name for p in Path(path).glob("*.db")) == [
        f"counter_{killed.pid}.db", f"gauge_livesum_{killed.pid}.db",
        f"histogram_{killed.pid}.db"]
    prepare_worker(Settings(metrics_dir=path))
    assert sorted(p.name for p in Path(path).glob("*.db")) == [
        "counter_archive.db", "histogram_archive.db"]
    text = render(Settings(metrics_dir=path), database=False)
    assert total(text, "webhooks_attempts_total") == 2
    assert total(text, "webhooks_in_flight") == 0


def test_without_a_directory_a_process_serves_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(metrics_module, "_process_metrics", Metrics())
    made = EngineMetrics(Settings(), FakeWriter(), FakeScheduler())
    made.attempts_written([make_record()])
    text = render(Settings(), database=False)
    assert total(text, "webhooks_attempts_total", outcome="success") == 1
    assert "webhooks_metrics_database_up" not in text


# -- the CLI --------------------------------------------------------------------------------------

@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from worker.db.migrate import upgrade

    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    upgrade(url)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.delenv("WEBHOOKS_METRICS_DIR", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_cli_metrics_once(cli_env: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["metrics", "--once", "--db-only"]) == 0
    out = capsys.readouterr().out
    assert total(out, "webhooks_metrics_database_up") == 1
    assert "webhooks_due_backlog 0.0" in out
    assert "webhooks_attempts_total" not in out

    assert main(["metrics", "--once"]) == 2  # no directory to read the processes from
    assert "WEBHOOKS_METRICS_DIR" in capsys.readouterr().err

    monkeypatch.setenv("WEBHOOKS_METRICS_DIR", str(cli_env / "m"))
    get_settings.cache_clear()
    assert main(["metrics", "--once", "--no-db"]) == 0
    out = capsys.readouterr().out
    assert "webhooks_metrics_database_up" not in out
    with pytest.raises(SystemExit):
        main(["metrics", "--db-only", "--no-db"])


def test_cli_metrics_serves_until_stopped(cli_env: Path) -> None:
    import signal
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "WEBHOOKS_METRICS_DIR": str(cli_env / "m"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "metrics", "--port", "0"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+)/metrics", line).group(1))  # type: ignore[union-attr]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            body = answer.read().decode()
        assert total(body, "webhooks_metrics_database_up") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_the_endpoint_label_setting_is_checked() -> None:
    with pytest.raises(ValidationError):
        Settings(metrics_endpoint_label="url")


# -- deploy/ --------------------------------------------------------------------------------------

def exported_names() -> set[str]:
    """Every series name /metrics can hold."""
    names = {"webhooks_metrics_database_up", "webhooks_metrics_database_seconds",
             "webhooks_deliveries", "webhooks_due_backlog", "webhooks_oldest_due_seconds",
             "webhooks_endpoints"}
    for family in Metrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\bwebhooks_[a-z_]+", expr))


def alert_rules() -> list[dict[str, Any]]:
    """The rules of deploy/prometheus/alerts.yml: read with PyYAML where it is installed, else
    picked out of the file's one layout (checked with `promtool check rules` too)."""
    text = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    try:
        import yaml
    except ImportError:
        rules = []
        for block in re.split(r"\n {6}- alert: ", text)[1:]:
            name, rest = block.split("\n", 1)
            body = "\n" + rest
            expr = re.search(r"\n {8}expr: (?:\|\n((?: {10}.*\n)+)|(.+)\n)", body)
            assert expr, name
            rules.append({
                "alert": name.strip(), "expr": expr.group(1) or expr.group(2),
                "for": re.search(r"\n {8}for: (\S+)", body).group(1),  # type: ignore[union-attr]
                "labels": dict(re.findall(r"\n {10}(severity): (\w+)", body)),
                "annotations": dict(re.findall(r"\n {10}(summary): (.+)", body))})
        return rules
    loaded = yaml.safe_load(text)
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def test_alert_rules() -> None:
    alerts = alert_rules()
    names = {rule["alert"] for rule in alerts}
    assert {"WebhooksFailureRatioHigh", "WebhooksBacklogOld", "WebhooksEndpointDisabled",
            "WebhooksCircuitOpen"} <= names
    known = exported_names()
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert rule["labels"]["severity"] in {"warning", "critical", "info"}
        assert rule["annotations"]["summary"]
        assert referenced(rule["expr"]), rule["alert"]
        assert referenced(rule["expr"]) <= known, rule["alert"]


def test_grafana_dashboard() -> None:
    board = json.loads((ROOT / "deploy/grafana/webhooks.json").read_text())
    assert board["title"] and board["uid"]
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    shown = set().union(*(referenced(e) for e in exprs))
    assert {"webhooks_attempts_total", "webhooks_delivery_latency_seconds_bucket",
            "webhooks_in_flight", "webhooks_due_backlog", "webhooks_oldest_due_seconds",
            "webhooks_endpoints"} <= shown
    assert shown <= exported_names()
