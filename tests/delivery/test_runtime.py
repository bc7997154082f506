"""EngineRuntime: the door from Celery's synchronous threads into the engine loop.

Plain `def` tests: the test thread plays Celery's task thread and calls the runtime the way
the task shells do, against real databases and a real loopback receiver that runs on a
thread of its own (the async `server` fixture would sit on pytest-asyncio's loop, which does
not run during a synchronous test).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from sqlalchemy import func, update
from sqlalchemy import select as sql_select

from worker.core.errors import EngineUnavailable, StoreUnavailable
from worker.core.models import AcceptReport, Endpoint, EventIn, Incoming
from worker.core.signing import generate_secret, verify
from worker.db.schema import attempts, deliveries
from worker.delivery import runtime as runtime_module
from worker.delivery.engine import Engine
from worker.delivery.runtime import EngineRuntime, get_runtime, stop_runtime
from worker.settings import Settings

pytestmark = pytest.mark.timeout(60)

ENGINE_THREAD = "webhooks-engine"


# -- helpers ---------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], within: float = 10.0, step: float = 0.02) -> None:
    """Poll `predicate` from the test thread; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        time.sleep(step)


def engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == ENGINE_THREAD and t.is_alive()}


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "allowed_networks": "127.0.0.0/8",
        "request_timeout": 5.0,
        "connect_timeout": 2.0,
        "lease_seconds": 30.0,
        "shutdown_grace": 2.0,
        "retry_jitter": 0.0,
        # tune_gc freezes every object of the process: not in the test process.
        "gc_threshold": 0,
        # These tests drive claims through the door (start_sweep_threadsafe); the engine's
        # own claim loop would race them for the rows (tests/delivery/test_sweeper.py has it).
        "claim_interval": 0,
    }
    values.update(overrides)
    return Settings(**values)


def add_endpoint(runtime: EngineRuntime, endpoint_id: str, url: str) -> str:
    """Add an endpoint through the runtime's own store; returns its secret."""
    secret = generate_secret()
    endpoint = Endpoint(id=endpoint_id, url=url, secrets=(secret,))
    runtime.call_blocking(lambda e: e.store.add_endpoint(endpoint), 10)
    return secret


def status_counts(runtime: EngineRuntime) -> dict[str, int]:
    return runtime.call_blocking(lambda e: e.store.status_counts(), 10)


def events(endpoint_id: str, prefix: str, count: int) -> list[Incoming]:
    return [Incoming(f"{prefix}:{n}", EventIn(endpoint_id, {"n": n, "from": prefix}))
            for n in range(count)]


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a receiver on its own thread ------------------------------------------------------------


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers 204 to every POST once `gate` is open (it is open unless a test closes it)."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    gate: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def ids(self) -> list[str]:
        return [s.headers["webhook-id"] for s in self.requests()]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.lock:
            self.seen.append(Seen(request.path, {k.lower(): v for k, v in request.headers.items()},
                                  body))
        deadline = time.monotonic() + 20
        # The gate is a threading.Event, opened from the test thread: poll it.
        while not self.gate.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return web.Response(status=204)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    state.gate.set()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, web.AppRunner] = {}

    async def start() -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", state.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state.port = runner.addresses[0][1]
        box["runner"] = runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        finally:
            ready.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name="test-receiver", daemon=True)
    thread.start()
    assert ready.wait(10) and state.port, "receiver did not start"
    try:
        yield state
    finally:
        state.gate.set()
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        assert not thread.is_alive(), "receiver thread did not end"


# -- life-cycle bookkeeping ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_process() -> Iterator[None]:
    """No process runtime before the test; after it, whatever it made is stopped and every
    thread it started (engine, aiosqlite, receiver) has ended."""
    assert runtime_module._runtime is None, "a previous test left the process runtime behind"
    before = set(threading.enumerate())
    yield
    stop_runtime()
    assert runtime_module._runtime is None
    runtime_module._inherited.clear()  # what a simulated fork left behind
    try:
        wait_until(lambda: not (set(threading.enumerate()) - before), within=10)
    except AssertionError:
        left = sorted(t.name for t in set(threading.enumerate()) - before)
        raise AssertionError(f"threads left running after the test: {left}") from None


@pytest.fixture
def make_runtime() -> Iterator[Callable[..., EngineRuntime]]:
    """`make_runtime(settings, make_engine=...)`: a started runtime, stopped at teardown."""
    made: list[EngineRuntime] = []

    def make(settings: Settings, make_engine: Callable[[Settings], Engine] = Engine,
             ) -> EngineRuntime:
        runtime = EngineRuntime(settings, make_engine=make_engine)
        made.append(runtime)
        runtime.start(timeout=15)
        return runtime

    yield make
    for runtime in made:
        runtime.pid = os.getpid()  # a test may have faked a fork
        runtime.stop_blocking(timeout=10)


# -- 1. start, accept, deliver, stop ---------------------------------------------------------


def test_start_accept_deliver_and_stop(database_url: str, receiver: Receiver) -> None:
    threads_before = engine_threads()
    runtime = EngineRuntime(make_settings(database_url))
    try:
        runtime.start(timeout=15)
        # start() returned: the engine is up, and the very first call is answered on its loop.
        (thread,) = engine_threads() - threads_before
        assert runtime.call_blocking(lambda e: _where(e), 5) == (ENGINE_THREAD, True)

        secret = add_endpoint(runtime, "ep-rt", receiver.url("/hook"))
        items = events("ep-rt", "task-1", 2)
        report = runtime.accept_blocking(items)

        assert isinstance(report, AcceptReport)
        assert len(report.accepted) == len(set(report.accepted)) == 2
        assert report.duplicates == 0 and report.rejected == []
        # Durable when accept_blocking returns: both rows are in the database.
        rows = runtime.call_blocking(lambda e: e.store.list_deliveries(), 10)
        assert {r["id"] for r in rows} == set(report.accepted)

        wait_until(lambda: len(receiver.ids()) >= 2)
        assert sorted(receiver.ids()) == sorted(report.accepted)
        bodies = {orjson.loads(s.body)["n"] for s in receiver.requests()}
        assert bodies == {0, 1}
        for seen in receiver.requests():
            verify(secret, seen.headers, seen.body)
        wait_until(lambda: status_counts(runtime) == {"succeeded": 2})

        # The same messages again (a broker redelivery): nothing new, nothing sent again.
        again = runtime.accept_blocking(items)
        assert again.accepted == [] and again.duplicates == 2

        started = time.monotonic()
        runtime.stop_blocking()
        assert time.monotonic() - started < runtime.settings.shutdown_grace + 5
        assert not thread.is_alive()
        runtime.stop_blocking()  # a second stop is a no-op
        assert len(receiver.requests()) == 2
    finally:
        runtime.stop_blocking(timeout=10)


async def _where(engine: Engine) -> tuple[str, bool]:
    """Which thread a call runs on, and whether its loop is running."""
    return threading.current_thread().name, asyncio.get_running_loop().is_running()


def test_a_call_after_stop_raises_engine_unavailable(
    database_url: str, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url))
    assert status_counts(runtime) == {}
    runtime.stop_blocking()
    assert not engine_threads()

    with pytest.raises(EngineUnavailable):
        runtime.accept_blocking(events("ep-rt", "after-stop", 1))


def test_stop_and_calls_before_start() -> None:
    never_started = EngineRuntime(make_settings("sqlite+aiosqlite:///:memory:"))
    never_started.stop_blocking()  # nothing to stop: returns at once

    with pytest.raises(EngineUnavailable):
        never_started.call_blocking(lambda e: asyncio.sleep(0), 1)


def test_stop_lets_a_running_attempt_finish_and_record_it(
    database_url: str, receiver: Receiver, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url, shutdown_grace=5.0))
    add_endpoint(runtime, "ep-rt", receiver.url("/hook"))
    receiver.gate.clear()
    report = runtime.accept_blocking(events("ep-rt", "task-drain", 1))
    wait_until(lambda: len(receiver.requests()) == 1)

    # Stop while the attempt is in flight; the receiver answers half a second later.
    threading.Timer(0.5, receiver.gate.set).start()
    started = time.monotonic()
    runtime.stop_blocking()
    assert 0.4 < time.monotonic() - started < 5.0
    assert not engine_threads()

    # The outcome was written before the engine stopped: read it with a fresh runtime.
    check = make_runtime(make_settings(database_url))
    rows = check.call_blocking(lambda e: e.store.list_deliveries(), 10)
    assert [(r["id"], r["status"], r["attempts"]) for r in rows] == [
        (report.accepted[0], "succeeded", 1)]


# -- 2. start failures -----------------------------------------------------------------------


def test_a_failing_engine_factory_makes_start_raise_with_the_cause() -> None:
    def broken(settings: Settings) -> Engine:
        raise RuntimeError("no database driver: boom-7731")

    runtime = EngineRuntime(make_settings("sqlite+aiosqlite:///:memory:"), make_engine=broken)
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="boom-7731"):
        runtime.start(timeout=10)
    assert time.monotonic() - started < 5
    wait_until(lambda: not engine_threads(), within=5)

    # A runtime that never came up refuses work instead of hanging, and stops quietly.
    with pytest.raises(EngineUnavailable):
        runtime.accept_blocking(events("ep-rt", "task-x", 1))
    with pytest.raises(EngineUnavailable):
        runtime.submit_threadsafe(lambda e: asyncio.sleep(0), 1)
    runtime.stop_blocking()


def test_an_engine_that_never_comes_up_makes_start_raise_in_time() -> None:
    release = threading.Event()

    def stuck(settings: Settings) -> Engine:
        release.wait(10)
        raise RuntimeError("gave up")

    runtime = EngineRuntime(make_settings("sqlite+aiosqlite:///:memory:"), make_engine=stuck)
    started = time.monotonic()
    try:
        with pytest.raises(EngineUnavailable, match="did not start"):
            runtime.start(timeout=0.5)
        assert time.monotonic() - started < 3
    finally:
        release.set()
    wait_until(lambda: not engine_threads(), within=5)


@pytest.mark.parametrize("database", ["refused", "silent"])
def test_unreachable_postgresql_starts_then_accept_fails_in_bounded_time(
    database: str, make_runtime: Callable[..., EngineRuntime]
) -> None:
    """Connections are lazy: the engine starts; the first commit fails within accept_timeout.

    "refused": nothing listens on the port. "silent": a socket accepts the TCP connection
    and never says a word, so only the runtime's own bound can end the call.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        if database == "silent":
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            port = silent.getsockname()[1]
        else:
            port = free_port()
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/webhooks"
        runtime = make_runtime(make_settings(url, accept_timeout=1.0))
        assert engine_threads()

        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            runtime.accept_blocking(events("ep-rt", "task-down", 2))
        elapsed = time.monotonic() - started

        assert elapsed < 1.0 + 1.0 + 1.0  # accept_timeout + the answer margin + slack
        if database == "silent":
            assert caught.type is EngineUnavailable
            assert elapsed > 0.8
        # Still answering afterwards, and it stops cleanly.
        assert runtime.call_blocking(lambda e: asyncio.sleep(0, "pong"), 2) == "pong"
        runtime.stop_blocking(timeout=10)
    assert not engine_threads()


def test_refused_postgresql_raises_store_unavailable(
    make_runtime: Callable[..., EngineRuntime]
) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/webhooks"
    runtime = make_runtime(make_settings(url, accept_timeout=1.0))
    with pytest.raises((StoreUnavailable, EngineUnavailable)):
        runtime.accept_blocking(events("ep-rt", "task-down", 2))


# -- 3. bounded calls ------------------------------------------------------------------------


def test_a_call_that_overruns_its_timeout_raises_and_is_cancelled(
    database_url: str, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url))
    cancelled = threading.Event()

    async def sleepy() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="did not finish"):
        runtime.call_blocking(lambda e: sleepy(), timeout=0.2)
    assert 0.15 < time.monotonic() - started < 1.0
    assert cancelled.wait(2), "the overrunning coroutine was left running"

    # The runtime answers the next call at once.
    started = time.monotonic()
    assert runtime.call_blocking(lambda e: asyncio.sleep(0, "pong"), 2) == "pong"
    assert time.monotonic() - started < 0.5
    assert status_counts(runtime) == {}


def test_a_blocked_loop_does_not_hold_the_caller_past_the_answer_margin(
    database_url: str, make_runtime: Callable[..., EngineRuntime]
) -> None:
    """A coroutine that blocks the loop defeats wait_for; the caller still gets its answer."""
    runtime = make_runtime(make_settings(database_url))

    async def hog() -> None:
        time.sleep(2.5)  # noqa: ASYNC251 - blocks the engine loop itself, on purpose

    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="did not answer"):
        runtime.call_blocking(lambda e: hog(), timeout=0.2)
    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 2.4  # timeout + ANSWER_MARGIN, well before the hog lets go

    # Once the loop is free again, calls are answered.
    assert runtime.call_blocking(lambda e: asyncio.sleep(0, "pong"), 5) == "pong"


def test_an_error_inside_the_engine_reaches_the_caller(
    database_url: str, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url))

    async def fails() -> None:
        raise LookupError("no such thing: 4417")

    with pytest.raises(LookupError, match="4417"):
        runtime.call_blocking(lambda e: fails(), 2)
    assert runtime.call_blocking(lambda e: asyncio.sleep(0, "still here"), 2) == "still here"


# -- 4. submit_threadsafe --------------------------------------------------------------------


def test_submit_threadsafe_returns_a_future_at_once(
    database_url: str, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url))
    entered, release = threading.Event(), threading.Event()

    async def slow(engine: Engine) -> str:
        entered.set()
        deadline = time.monotonic() + 10
        while not release.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return threading.current_thread().name

    started = time.monotonic()
    future = runtime.submit_threadsafe(slow, timeout=10)
    assert time.monotonic() - started < 0.2
    assert isinstance(future, concurrent.futures.Future)
    assert entered.wait(5), "the coroutine never started on the engine loop"
    assert not future.done()

    release.set()
    assert future.result(5) == ENGINE_THREAD


def test_accept_threadsafe_resolves_once_committed(
    database_url: str, receiver: Receiver, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url))
    add_endpoint(runtime, "ep-rt", receiver.url("/hook"))

    future = runtime.accept_threadsafe(events("ep-rt", "task-ts", 3))
    assert isinstance(future, concurrent.futures.Future)
    report = future.result(10)
    assert len(report.accepted) == 3
    rows = runtime.call_blocking(lambda e: e.store.list_deliveries(), 10)
    assert {r["id"] for r in rows} == set(report.accepted)
    wait_until(lambda: sorted(receiver.ids()) == sorted(report.accepted))


def test_gather_threadsafe_settles_each_message_once_committed(
    database_url: str, receiver: Receiver, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url, gather_size=100, gather_interval=0.05))
    add_endpoint(runtime, "ep-rt", receiver.url("/hook"))
    settled: list[tuple[int, str]] = []
    parts: dict[int, AcceptReport] = {}

    def settle(m: int) -> Callable[[AcceptReport], None]:
        def done(part: AcceptReport) -> None:
            settled.append((m, threading.current_thread().name))
            parts[m] = part

        return done

    started = time.monotonic()
    for m in range(3):
        runtime.gather_threadsafe(events("ep-rt", f"gathered-{m}", 2), settle(m))
    assert time.monotonic() - started < 0.2  # hands over, never waits for the commit

    wait_until(lambda: len(settled) == 3)
    assert sorted(settled) == [(m, ENGINE_THREAD) for m in range(3)]
    rows = runtime.call_blocking(lambda e: e.store.list_deliveries(), 10)
    assert len(rows) == 6
    # Each message was told its own deliveries, and each row names the task that carried it.
    task_of_row = {r["id"]: r["task_id"] for r in rows}
    for m, part in parts.items():
        assert len(part.accepted) == 2
        assert {task_of_row[i] for i in part.accepted} == {f"gathered-{m}"}
    wait_until(lambda: sorted(receiver.ids()) == sorted(r["id"] for r in rows))
    time.sleep(0.2)
    assert len(settled) == 3  # each message settled once


def test_gather_threadsafe_never_settles_what_did_not_commit(
    make_runtime: Callable[..., EngineRuntime]
) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/webhooks"
    runtime = make_runtime(make_settings(url, gather_interval=0.05, requeue_delay=0.2,
                                         accept_timeout=1.0))
    settled = threading.Event()
    runtime.gather_threadsafe(events("ep-rt", "gathered-down", 2), settled.set)

    wait_until(lambda: runtime.call_blocking(
        lambda e: asyncio.sleep(0, e.gatherer.stats["commit_failures"]), 2) >= 2, within=5)
    assert not settled.is_set()
    runtime.stop_blocking(timeout=10)
    assert not engine_threads()
    assert not settled.is_set()  # unacknowledged: the broker keeps the message


# -- 5. the process singleton and fork detection ---------------------------------------------


def test_get_runtime_is_one_per_process_and_new_after_a_fork(database_url: str) -> None:
    settings = make_settings(database_url)
    first = get_runtime(settings)
    assert get_runtime(settings) is first
    assert get_runtime() is first  # settings only matter for the first call
    assert len(engine_threads()) == 1

    # A forked child inherits the object but not its thread: the pid tells them apart.
    first.pid = os.getpid() + 100_000
    try:
        second = get_runtime(settings)
        assert second is not first
        assert first in runtime_module._inherited  # kept: never finalized in the child
        assert second.pid == os.getpid()
        assert get_runtime(settings) is second
        assert second.call_blocking(lambda e: e.store.status_counts(), 10) == {}
        assert len(engine_threads()) == 2
    finally:
        first.pid = os.getpid()
        first.stop_blocking(timeout=10)

    (thread,) = engine_threads()
    stop_runtime()
    assert not thread.is_alive()
    assert runtime_module._runtime is None
    stop_runtime()  # a second call is a no-op

    third = get_runtime(settings)  # after a stop, the next use starts a fresh one
    assert third is not second
    assert third.call_blocking(lambda e: asyncio.sleep(0, "pong"), 5) == "pong"
    stop_runtime()
    assert not engine_threads()


def test_stop_runtime_leaves_an_inherited_runtime_alone(database_url: str) -> None:
    """In a forked child the parent's runtime has no thread: stop_runtime must not touch it."""
    inherited = get_runtime(make_settings(database_url))
    (thread,) = engine_threads()
    inherited.pid = os.getpid() + 100_000
    try:
        stop_runtime()
        assert runtime_module._runtime is None
        assert thread.is_alive()
        assert inherited.call_blocking(lambda e: asyncio.sleep(0, "pong"), 5) == "pong"
    finally:
        inherited.pid = os.getpid()
        inherited.stop_blocking(timeout=10)
    assert not thread.is_alive()


def _child(settings: Settings, parent: EngineRuntime, write_fd: int) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        answer: dict[str, Any] = {"inherited_threads": sorted(t.name for t in engine_threads())}
        child = get_runtime(settings)
        answer["new"] = child is not parent
        answer["pid"] = child.pid == os.getpid()
        answer["counts"] = child.call_blocking(lambda e: e.store.status_counts(), 10)
        answer["thread"] = child.call_blocking(lambda e: _where(e), 5)[0]
        stop_runtime()
        stop_runtime()
        answer["left"] = sorted(t.name for t in engine_threads())
        os.write(write_fd, json.dumps(answer).encode())
        code = 0
    except BaseException as exc:
        os.write(write_fd, json.dumps({"error": repr(exc)}).encode())
    finally:
        os._exit(code)


def test_a_real_forked_child_builds_and_stops_its_own_runtime(database_url: str) -> None:
    settings = make_settings(database_url)
    parent = get_runtime(settings)
    assert status_counts(parent) == {}
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        _child(settings, parent, write_fd)
    os.close(write_fd)
    chunks: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.1)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        deadline = time.monotonic() + 10
        status = None
        while status is None and time.monotonic() < deadline:
            done, status_word = os.waitpid(pid, os.WNOHANG)
            status = status_word if done else None
            time.sleep(0.02)
    finally:
        os.close(read_fd)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status is not None, "the child did not finish within its time"
    answer = json.loads(b"".join(chunks) or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, answer
    assert answer == {"inherited_threads": [], "new": True, "pid": True, "counts": {},
                      "thread": ENGINE_THREAD, "left": []}

    # The parent's runtime is untouched by the child.
    assert get_runtime(settings) is parent
    assert status_counts(parent) == {}


# -- 6. the background sweep -----------------------------------------------------------------


def _insert_due(engine: Engine, endpoint_id: str, count: int, prefix: str) -> Any:
    """Committed deliveries whose worker died: pending, leases already expired."""
    now = datetime.now(UTC)
    rows = [{"id": f"{prefix}{n:04d}", "endpoint_id": endpoint_id, "event_type": None,
             "idempotency_key": None, "payload": orjson.dumps({"n": n})}
            for n in range(count)]
    return engine.store.insert_intake(rows, [], lease_until=now - timedelta(seconds=1),
                                      idempotency_cutoff=now - timedelta(days=1))


def test_start_sweep_claims_due_rows_and_runs_one_at_a_time(
    database_url: str, receiver: Receiver, make_runtime: Callable[..., EngineRuntime]
) -> None:
    # One attempt at a time, room for two waiting, one claimed per round: while the receiver
    # holds the first attempt the sweep cannot finish, so it is still running for sure.
    runtime = make_runtime(make_settings(
        database_url, max_in_flight=1, max_queued=2, sweep_limit=1, sweep_interval=20.0))
    secret = add_endpoint(runtime, "ep-rt", receiver.url("/hook"))
    runtime.call_blocking(lambda e: _insert_due(e, "ep-rt", 5, "msg_due"), 10)
    runtime.call_blocking(lambda e: _insert_due(e, "ep-gone", 1, "msg_gone"), 10)
    assert status_counts(runtime) == {"pending": 6}
    receiver.gate.clear()

    assert runtime.start_sweep_threadsafe() is True
    wait_until(lambda: len(receiver.requests()) == 1)
    assert runtime.start_sweep_threadsafe() is False
    time.sleep(0.3)
    assert runtime.start_sweep_threadsafe() is False
    assert len(receiver.requests()) == 1  # max_in_flight holds

    receiver.gate.set()
    wait_until(lambda: len(receiver.ids()) == 5)
    assert sorted(receiver.ids()) == [f"msg_due{n:04d}" for n in range(5)]
    for seen in receiver.requests():
        verify(secret, seen.headers, seen.body)
    wait_until(lambda: status_counts(runtime) == {"succeeded": 5, "failed": 1})
    # The sweep ends once nothing more is due; then another may start (and finds nothing).
    wait_until(runtime.start_sweep_threadsafe, within=5)
    time.sleep(0.3)
    assert len(receiver.requests()) == 5


# -- 7. cleanup ------------------------------------------------------------------------------


async def _age(engine: Engine, ids: list[str], days: float) -> None:
    old = datetime.now(UTC) - timedelta(days=days)
    async with engine.db.begin() as conn:
        await conn.execute(update(deliveries).where(deliveries.c.id.in_(ids))
                           .values(created_at=old))


async def _attempt_count(engine: Engine) -> int:
    async with engine.db.connect() as conn:
        return int((await conn.execute(sql_select(func.count()).select_from(attempts))).scalar())


def test_cleanup_removes_old_finished_rows_only(
    database_url: str, receiver: Receiver, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url, cleanup_chunk=2))
    add_endpoint(runtime, "ep-rt", receiver.url("/hook"))
    old_sent = runtime.accept_blocking(events("ep-rt", "old", 3)).accepted
    new_sent = runtime.accept_blocking(events("ep-rt", "new", 2)).accepted
    rejected = runtime.accept_blocking(events("ep-unknown", "old-rejected", 1))
    assert len(rejected.rejected) == 1
    wait_until(lambda: status_counts(runtime) == {"succeeded": 5, "rejected": 1})
    # An old delivery still pending (its worker holds the lease): never cleaned up.
    now = datetime.now(UTC)
    runtime.call_blocking(lambda e: e.store.insert_intake(
        [{"id": "msg_old_pending", "endpoint_id": "ep-rt", "event_type": None,
          "idempotency_key": None, "payload": b"{}"}], [],
        lease_until=now + timedelta(hours=1), idempotency_cutoff=now - timedelta(days=1)), 10)
    all_ids = {r["id"] for r in runtime.call_blocking(lambda e: e.store.list_deliveries(), 10)}
    rejected_id = (all_ids - set(old_sent) - set(new_sent) - {"msg_old_pending"}).pop()
    old_ids = [*old_sent, rejected_id, "msg_old_pending"]
    runtime.call_blocking(lambda e: _age(e, old_ids, days=100), 10)
    assert runtime.call_blocking(_attempt_count, 10) == 5

    removed = runtime.cleanup_blocking(datetime.now(UTC) - timedelta(days=90), timeout=10)

    assert removed == 4  # three old successes and the old rejection, in chunks of two
    left = {r["id"]: r["status"]
            for r in runtime.call_blocking(lambda e: e.store.list_deliveries(), 10)}
    assert left == {**dict.fromkeys(new_sent, "succeeded"), "msg_old_pending": "pending"}
    assert runtime.call_blocking(_attempt_count, 10) == 2  # the removed ones' attempts too
    assert runtime.cleanup_blocking(datetime.now(UTC) - timedelta(days=90), timeout=10) == 0


def test_cleanup_overrunning_its_timeout_raises_engine_unavailable(
    database_url: str, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url))
    started = time.monotonic()
    with pytest.raises(EngineUnavailable):
        runtime.cleanup_blocking(datetime.now(UTC), timeout=0.0)
    assert time.monotonic() - started < 2
    assert runtime.cleanup_blocking(datetime.now(UTC), timeout=10) == 0


# -- gaps found by these tests, now closed ----------------------------------------------------


def test_stop_resolves_calls_still_running(
    tmp_path: Path, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"))
    entered = threading.Event()

    async def long_call() -> None:
        entered.set()
        await asyncio.sleep(30)

    future = runtime.submit_threadsafe(lambda e: long_call(), timeout=60)
    assert entered.wait(5)
    runtime.stop_blocking()
    assert not engine_threads()
    wait_until(future.done, within=2)
    assert future.cancelled() or isinstance(future.exception(), EngineUnavailable)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sweep_claims_due_rows_with_a_small_max_queued(
    database_url: str, receiver: Receiver, make_runtime: Callable[..., EngineRuntime]
) -> None:
    runtime = make_runtime(make_settings(database_url, max_queued=50, sweep_interval=0.5))
    add_endpoint(runtime, "ep-rt", receiver.url("/hook"))
    runtime.call_blocking(lambda e: _insert_due(e, "ep-rt", 3, "msg_due"), 10)

    assert runtime.start_sweep_threadsafe() is True
    wait_until(lambda: len(receiver.ids()) == 3, within=2)
