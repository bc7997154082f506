"""What the worker delivers to: a signature-checking receiver, and raw TCP servers that lie.

The receiver verifies every request with `standardwebhooks` against its endpoint's secret
and answers by the first path segment:

    /ok/<endpoint>       204
    /slow/<endpoint>     204 after `slow_seconds`
    /flaky/<endpoint>    500 on the first 1-2 attempts of `flaky_percent`% of webhook-ids
    /hang/<endpoint>     first attempt of a webhook-id: 204 only after `hang_seconds`
                         (past the worker's request timeout), later attempts 204
    /limited1/<endpoint> first attempt: 429 with Retry-After: 1; then 204
    /limited3/<endpoint> first attempt: 429 with Retry-After: 3; then 204
    /fail/<endpoint>     500 always
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook


@dataclass
class Hit:
    behaviour: str
    endpoint_id: str
    webhook_id: str | None
    n: int | None
    verified: bool
    at: float
    status: int = 0
    hung: bool = False
    kind: str | None = None  # event_data["kind"] of the malformed-message probes

    @property
    def delivered(self) -> bool:
        """Signed correctly and answered 2xx in time: a delivery the receiver accepted."""
        return self.verified and 200 <= self.status < 300 and not self.hung


def bucket(webhook_id: str | None) -> int:
    """A stable 0..99 per webhook-id, so chaos is deterministic and every event can win."""
    return int(hashlib.sha256((webhook_id or "").encode()).hexdigest(), 16) % 100


@dataclass
class Receiver:
    slow_seconds: float = 1.0
    hang_seconds: float = 5.0
    flaky_percent: int = 30
    port: int = 0
    secrets: dict[str, str] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, behaviour: str, endpoint_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/{behaviour}/{endpoint_id}"

    def snapshot(self) -> list[Hit]:
        with self.lock:
            return list(self.hits)

    def delivered_ns(self) -> set[int]:
        return {h.n for h in self.snapshot() if h.delivered and h.n is not None}

    def bad_signatures(self) -> list[Hit]:
        return [h for h in self.snapshot() if not h.verified]

    def by_webhook_id(self) -> dict[str, list[Hit]]:
        found: dict[str, list[Hit]] = defaultdict(list)
        for hit in self.snapshot():
            found[hit.webhook_id or "?"].append(hit)
        return found

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        behaviour, _, endpoint_id = request.path.strip("/").partition("/")
        headers = {k.lower(): v for k, v in request.headers.items()}
        webhook_id = headers.get("webhook-id")
        verified = False
        secret = self.secrets.get(endpoint_id)
        if secret is not None:
            try:
                Webhook(secret).verify(body, headers)
                verified = True
            except Exception:
                verified = False
        n = kind = None
        with contextlib.suppress(ValueError, AttributeError):
            event = json.loads(body)
            n = event.get("n") if isinstance(event.get("n"), int) else None
            kind = event.get("kind") if isinstance(event.get("kind"), str) else None
        hit = Hit(behaviour, endpoint_id, webhook_id, n, verified, time.time(), kind=kind)
        with self.lock:
            prior = sum(1 for h in self.hits if h.webhook_id == webhook_id)
            self.hits.append(hit)
        if not verified:
            hit.status = 401
            return web.Response(status=401, text="bad signature")
        extra: dict[str, str] = {}
        if behaviour == "slow":
            await asyncio.sleep(self.slow_seconds)
            hit.status = 204
        elif behaviour == "flaky":
            b = bucket(webhook_id)
            failures = (1 + b % 2) if b < self.flaky_percent else 0
            hit.status = 500 if prior < failures else 204
        elif behaviour == "hang":
            hit.status = 204
            if prior == 0:
                hit.hung = True
                await asyncio.sleep(self.hang_seconds)
        elif behaviour in ("limited1", "limited3"):
            hit.status = 429 if prior == 0 else 204
            extra = {"Retry-After": behaviour[-1]} if prior == 0 else {}
        elif behaviour == "fail":
            hit.status = 500
        else:
            hit.status = 204
        return web.Response(status=hit.status, headers=extra)


class LoopThread:
    """An asyncio loop on a daemon thread; `call` runs a coroutine there and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable[Any], timeout: float = 15) -> Any:
        async def wrapped() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_rest(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@contextlib.contextmanager
def running_receiver(**options: Any) -> Iterator[Receiver]:
    state = Receiver(**options)
    runner_box: list[web.AppRunner] = []
    loop = LoopThread("rel-receiver")

    async def start() -> None:
        app = web.Application(client_max_size=4 * 2**20)
        app.router.add_route("POST", "/{tail:.*}", state.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        state.port = runner.addresses[0][1]
        runner_box.append(runner)

    try:
        loop.call(start())
        yield state
    finally:
        if runner_box:
            with contextlib.suppress(Exception):
                loop.call(runner_box[0].cleanup(), 15)
        loop.close()


# -- raw TCP servers that misbehave -------------------------------------------------------------

# No handler runs longer than this, whatever the client does.
HANDLER_LIMIT = 60.0


async def _read_request(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await asyncio.wait_for(reader.readexactly(length), 10)


async def endless_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """500 with a chunked body that never ends."""
    await _read_request(reader)
    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    while True:
        writer.write(chunk)
        await writer.drain()


async def huge_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """200 whose header block is 1 MiB."""
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2**20 + b"\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    await reader.read()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts, reads, never answers."""
    await _read_request(reader)
    await reader.read()


async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A valid 200, one byte a second."""
    await _read_request(reader)
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(1)


async def close_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """200 promising 1000 bytes, sending 10, closing."""
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
    await writer.drain()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Not HTTP at all."""
    await _read_request(reader)
    writer.write(b"\x00\xff\xfeSSH-2.0-not-http\r\n\x1b[31mgarbage\r\n\r\n")
    await writer.drain()


BAD_KINDS: dict[str, Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]] = {
    "endless-body": endless_body,
    "huge-headers": huge_headers,
    "silent": silent,
    "drip": drip,
    "close-mid-body": close_mid_body,
    "garbage": garbage,
}


@dataclass
class BadServers:
    ports: dict[str, int] = field(default_factory=dict)
    connections: Counter[str] = field(default_factory=Counter)

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.ports[kind]}/hook"


@contextlib.contextmanager
def running_bad_servers() -> Iterator[BadServers]:
    state = BadServers()
    servers: list[asyncio.Server] = []
    loop = LoopThread("rel-bad-servers")

    def wrap(kind: str, handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections[kind] += 1
            try:
                await asyncio.wait_for(handler(reader, writer), HANDLER_LIMIT)
            except (Exception, asyncio.CancelledError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)

        return serve

    async def start() -> None:
        for kind, handler in BAD_KINDS.items():
            server = await asyncio.start_server(wrap(kind, handler), "127.0.0.1", 0)
            servers.append(server)
            state.ports[kind] = server.sockets[0].getsockname()[1]

    async def stop() -> None:
        for server in servers:
            server.close()

    try:
        loop.call(start())
        yield state
    finally:
        with contextlib.suppress(Exception):
            loop.call(stop())
        loop.close()
