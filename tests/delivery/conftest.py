"""Fixtures for the engine tests: real loopback HTTP servers, the engine's parts."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from worker.core.models import Delivery, Endpoint, HttpResult
from worker.core.signing import generate_secret
from worker.db.store import Store
from worker.delivery.intake import Intake, IntakeConfig
from worker.delivery.scheduler import Scheduler, SchedulerConfig
from worker.delivery.sweeper import SweepConfig, Sweeper
from worker.delivery.writer import OutcomeWriter, WriterConfig
from worker.settings import Settings

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[Any, ...] | None
    received_at: float


async def _ok(request: web.Request, body: bytes) -> web.StreamResponse:
    return web.Response(status=200, text="ok")


class LocalServer:
    """An aiohttp server on a loopback address and an ephemeral port.

    Every request is recorded (with its exact body and the peer of its TCP connection) before
    the handler for its path runs; handlers are programmable per path, with a default.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.requests: list[SeenRequest] = []
        self.handlers: dict[str, Handler] = {}
        self.default: Handler = _ok
        self.connections = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def on(self, path: str, handler: Handler) -> None:
        self.handlers[path] = handler

    def hits(self, path: str) -> list[SeenRequest]:
        return [r for r in self.requests if r.path == path]

    @property
    def peers(self) -> set[tuple[Any, ...]]:
        return {r.peer for r in self.requests if r.peer is not None}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.requests.append(
            SeenRequest(request.method, request.path, dict(request.headers), body,
                        tuple(peer) if peer else None, time.monotonic())
        )
        handler = self.handlers.get(request.path, self.default)
        return await handler(request, body)

    async def start(self) -> None:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a slow handler stops when the client gives up on it, so
        # cleanup is quick; shutdown_timeout bounds cleanup in any case.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5,
                                     access_log=None)
        await self._runner.setup()
        # A deep backlog: hundreds of simultaneous connects must not see dropped SYNs
        # (a 1 s retransmit would look like a connect timeout).
        site = web.TCPSite(self._runner, self.host, 0, backlog=2048)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await asyncio.wait_for(self._runner.cleanup(), 5.0)
            self._runner = None


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    srv = LocalServer("127.0.0.1")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
async def server6() -> AsyncIterator[LocalServer]:
    if not ipv6_loopback_works():
        pytest.skip("IPv6 loopback (::1) is not available on this host")
    srv = LocalServer("::1")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LOOPBACK = "127.0.0.0/8,::1/128"


def _make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "allowed_networks": LOOPBACK,
        "request_timeout": 1.0,
        "connect_timeout": 1.0,
        "lease_seconds": 10.0,
    }
    values.update(overrides)
    return Settings(**values)


_counter = 0


def _make_delivery(url: str = "http://127.0.0.1:9/hook", **overrides: Any) -> Delivery:
    global _counter
    _counter += 1
    values: dict[str, Any] = {
        "id": f"msg_{_counter:06d}",
        "endpoint_id": "ep_test",
        "url": url,
        "secrets": (generate_secret(),),
        "payload": b'{"a":1}',
    }
    values.update(overrides)
    return Delivery(**values)


async def _until(predicate: Callable[[], bool], within: float = 5.0, step: float = 0.005) -> None:
    """Poll `predicate` until true; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(step)


# Helpers handed out as fixtures, so that test modules never import this conftest.


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    """Settings with loopback allowed and short timeouts; keyword overrides."""
    return _make_settings


@pytest.fixture
def make_delivery() -> Callable[..., Delivery]:
    """A Delivery with a unique id and a fresh secret; keyword overrides."""
    return _make_delivery


@pytest.fixture
def until() -> Callable[..., Awaitable[None]]:
    """`await until(predicate, within)`: poll, fail after the timeout."""
    return _until


@pytest.fixture
async def server_factory() -> AsyncIterator[Callable[[str], Awaitable[LocalServer]]]:
    """Start extra servers (`await server_factory("127.0.0.1")`); all stopped at teardown."""
    started: list[LocalServer] = []

    async def start(host: str = "127.0.0.1") -> LocalServer:
        srv = LocalServer(host)
        await srv.start()
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in started:
            await srv.stop()


class InstantSender:
    """Answers 204 at once and remembers what it sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, delivery: Delivery) -> HttpResult:
        self.sent.append(delivery.id)
        return HttpResult(status_code=204)


@dataclass
class EngineParts:
    """Scheduler, outcome writer, intake and sweeper over a real store, an instant sender."""

    sender: InstantSender
    writer: OutcomeWriter
    scheduler: Scheduler
    intake: Intake
    sweeper: Sweeper

    async def wait_recorded(self, count: int, within: float = 10.0) -> None:
        await _until(lambda: self.writer.stats["recorded"] >= count, within, 0.01)

    async def stop(self) -> None:
        await self.scheduler.stop(1.0)
        await self.writer.close()


@pytest.fixture
def engine_parts() -> Callable[..., Awaitable[EngineParts]]:
    """`await engine_parts(store, **settings)`: the engine's parts, started, endpoint ep-a added."""

    async def build(store: Store, **overrides: Any) -> EngineParts:
        settings = Settings(database_url="sqlite://", **overrides)
        sender = InstantSender()
        writer = OutcomeWriter(WriterConfig.from_settings(settings), store)
        scheduler = Scheduler(SchedulerConfig.from_settings(settings), sender, writer)
        writer.start()
        scheduler.start()
        await store.add_endpoint(Endpoint(id="ep-a", url="http://127.0.0.1:9/",
                                          secrets=(generate_secret(),)))
        return EngineParts(sender, writer, scheduler,
                           Intake(IntakeConfig.from_settings(settings), store, scheduler),
                           Sweeper(SweepConfig.from_settings(settings), store, scheduler))

    return build


# A clock the tests move by hand (the engine's parts take `clock=`).

from datetime import UTC, datetime  # noqa: E402


class FakeClock:
    """A `Clock` that stands still until `advance`: monotonic(), time() and now() move together.

    It starts at a fixed instant, so nothing computed from it depends on when, or how fast,
    the test runs.
    """

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self._monotonic = 1_000.0
        self._time = start

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._time

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._time, UTC)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._monotonic += seconds
        self._time += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    """A FakeClock, standing still until the test calls `fake_clock.advance(seconds)`."""
    return FakeClock()
