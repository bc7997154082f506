"""Mock webhook receiver: a lean HTTP/1.1 keep-alive server on asyncio protocols under uvloop.

Several processes share each listening address with SO_REUSEPORT. Every request is recorded
(event seq, first-seen time, enqueue time, status answered, ``webhook-id``); a sample of
signatures is verified with ``standardwebhooks``. Faults are injected with timers, never by
blocking. The parent controls the processes through pipes (snapshot, reset, stop).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import multiprocessing as mp
import os
import random
import signal
import socket
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

import orjson

from bench.ledger import StatusPicker

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
REASONS = {200: "OK", 204: "No Content", 410: "Gone", 429: "Too Many Requests"}


@dataclass(frozen=True)
class ReceiverConfig:
    """Settings of the mock receiver (faults apply to every mode of a run)."""

    port: int
    endpoints: int = 4
    procs: int = 2
    secret: str = ""
    sample_ratio: float = 0.01
    latency_ms: float = 0.0
    fail_ratio: float = 0.0
    slow_ratio: float = 0.0
    slow_seconds: float = 10.0
    slow_endpoints: int = 0
    status_mix: tuple[tuple[int, float], ...] = field(default=())

    def host(self, index: int) -> str:
        """Loopback address of endpoint ``index`` (127.0.0.1, 127.0.0.2, ...)."""
        return f"127.0.0.{index % 250 + 1}"

    def url(self, index: int) -> str:
        """URL of endpoint ``index``."""
        return f"http://{self.host(index)}:{self.port}/ep/{index}"


def response_bytes(code: int) -> bytes:
    """A minimal HTTP/1.1 response with an empty body."""
    if code == 200:
        return OK_RESPONSE
    reason = REASONS.get(code, "Error" if code >= 400 else "Status")
    return f"HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\n\r\n".encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks v1 signature (used by the capacity load generator)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Records:
    """Per-process record of every request seen (compact arrays)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.seq = array("q")
        self.t_recv = array("d")
        self.t_enq = array("d")
        self.status = array("H")
        self.endpoint = array("H")
        self.ids: list[bytes] = []
        self.sig_ok = 0
        self.sig_bad = 0
        self.bad_requests = 0

    def dump(self) -> dict[str, Any]:
        """Serialisable snapshot."""
        return {
            "seq": self.seq.tobytes(),
            "t_recv": self.t_recv.tobytes(),
            "t_enq": self.t_enq.tobytes(),
            "status": self.status.tobytes(),
            "endpoint": self.endpoint.tobytes(),
            "ids": b"\n".join(self.ids),
            "sig_ok": self.sig_ok,
            "sig_bad": self.sig_bad,
            "bad_requests": self.bad_requests,
        }


class Handler:
    """Decides the answer to each request and records it."""

    def __init__(self, cfg: ReceiverConfig, counters: Any, slot: int) -> None:
        self.cfg = cfg
        self.rec = Records()
        self.counters = counters
        self.slot = slot
        self.picker = StatusPicker(cfg.status_mix) if cfg.status_mix else None
        self.rand = random.Random(os.getpid())
        self.verifier: Any = None
        if cfg.secret and cfg.sample_ratio > 0:
            from standardwebhooks import Webhook

            self.verifier = Webhook(cfg.secret)

    def handle(self, path: bytes, headers: dict[bytes, bytes], body: bytes) -> tuple[bytes, float]:
        """Return (response bytes, delay in seconds) and record the request."""
        now = time.time()
        rec = self.rec
        seq = -1
        t_enq = 0.0
        try:
            doc = orjson.loads(body)
            meta = doc.get("bench") if isinstance(doc, dict) else None
            if isinstance(meta, dict):
                seq = int(meta.get("seq", -1))
                t_enq = float(meta.get("t", 0.0))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            rec.bad_requests += 1
        ep = 0
        if path.startswith(b"/ep/"):
            with contextlib.suppress(ValueError):
                ep = int(path[4:].split(b"?", 1)[0])
        rand = self.rand.random
        cfg = self.cfg
        if cfg.fail_ratio and rand() < cfg.fail_ratio:
            code = 500
        elif self.picker is not None:
            code = self.picker.pick(rand())
        else:
            code = 200
        delay = cfg.latency_ms / 1000.0
        if cfg.slow_ratio and rand() < cfg.slow_ratio:
            delay += cfg.slow_seconds
        if ep < cfg.slow_endpoints:
            delay += cfg.slow_seconds
        if self.verifier is not None and rand() < cfg.sample_ratio:
            self._verify(headers, body)
        rec.seq.append(seq)
        rec.t_recv.append(now)
        rec.t_enq.append(t_enq)
        rec.status.append(code)
        rec.endpoint.append(ep)
        rec.ids.append(headers.get(b"webhook-id", b""))
        base = self.slot * 2
        self.counters[base] += 1
        if 200 <= code < 300:
            self.counters[base + 1] += 1
        return response_bytes(code), delay

    def _verify(self, headers: dict[bytes, bytes], body: bytes) -> None:
        hdrs = {
            "webhook-id": headers.get(b"webhook-id", b"").decode(),
            "webhook-timestamp": headers.get(b"webhook-timestamp", b"").decode(),
            "webhook-signature": headers.get(b"webhook-signature", b"").decode(),
        }
        try:
            self.verifier.verify(body, hdrs)
            self.rec.sig_ok += 1
        except Exception:
            self.rec.sig_bad += 1


class HttpProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order."""

    __slots__ = ("buf", "busy", "closed", "handler", "loop", "transport")

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop) -> None:
        self.handler = handler
        self.loop = loop
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        buf = self.buf
        transport = self.transport
        assert transport is not None
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            path = parts[1] if len(parts) > 1 else b"/"
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                transport.write(b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\n\r\n")
                transport.close()
                return
            length = int(headers.get(b"content-length", b"0") or 0)
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            close = headers.get(b"connection", b"").lower() == b"close"
            resp, delay = self.handler.handle(path, headers, body)
            if delay > 0:
                self.busy = True
                self.loop.call_later(delay, self._finish, resp, close)
                return
            transport.write(resp)
            if close:
                transport.close()
                return

    def _finish(self, resp: bytes, close: bool) -> None:
        self.busy = False
        if self.closed or self.transport is None:
            return
        self.transport.write(resp)
        if close:
            self.transport.close()
        elif self.buf:
            self._process()


def _serve(cfg: ReceiverConfig, counters: Any, slot: int, conn: Connection) -> None:
    """Entry point of one receiver process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    asyncio.run(_serve_async(cfg, counters, slot, conn))


async def _serve_async(cfg: ReceiverConfig, counters: Any, slot: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    handler = Handler(cfg, counters, slot)
    servers = []
    for i in range(cfg.endpoints):
        host = cfg.host(i)
        if any(cfg.host(j) == host for j in range(i)):
            continue
        server = await loop.create_server(
            lambda: HttpProtocol(handler, loop), host, cfg.port, reuse_port=True, backlog=4096
        )
        servers.append(server)
    stop = asyncio.Event()

    def on_command() -> None:
        try:
            cmd = conn.recv()
        except EOFError:
            stop.set()
            return
        os.set_blocking(conn.fileno(), True)  # the loop made it non-blocking; big replies
        try:
            if cmd == "snapshot":
                conn.send(handler.rec.dump())
            elif cmd == "reset":
                handler.rec.reset()
                conn.send("ok")
        finally:
            os.set_blocking(conn.fileno(), False)
        if cmd == "stop":
            stop.set()

    loop.add_reader(conn.fileno(), on_command)
    parent = os.getppid()

    def watchdog() -> None:  # the parent was killed without stopping us
        if os.getppid() != parent:
            stop.set()
        else:
            loop.call_later(1.0, watchdog)

    loop.call_later(1.0, watchdog)
    conn.send("ready")
    await stop.wait()
    loop.remove_reader(conn.fileno())
    for server in servers:
        server.close()


def free_port(hosts: Sequence[str]) -> int:
    """A TCP port free on every given loopback address."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        ok = True
        for host in hosts:
            with socket.socket() as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port")


@dataclass
class Snapshot:
    """Merged records of all receiver processes."""

    seq: list[int]
    t_recv: list[float]
    t_enq: list[float]
    status: list[int]
    endpoint: list[int]
    ids: list[bytes]
    sig_ok: int
    sig_bad: int
    bad_requests: int


class ReceiverPool:
    """Starts, controls and stops the receiver processes."""

    def __init__(self, cfg: ReceiverConfig) -> None:
        self.cfg = cfg
        ctx = mp.get_context("spawn")
        self.counters = ctx.Array("q", cfg.procs * 2, lock=False)
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for slot in range(cfg.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(cfg, self.counters, slot, child), daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        for c in self.conns:
            if not c.poll(30):
                raise RuntimeError("receiver process did not start")
            msg = c.recv()
            if msg != "ready":
                raise RuntimeError(f"receiver failed: {msg}")

    @property
    def pids(self) -> list[int]:
        """Process ids of the receiver processes."""
        return [p.pid for p in self.procs if p.pid is not None]

    def counts(self) -> tuple[int, int]:
        """(requests seen, requests answered 2xx) so far, all processes (cheap, live)."""
        c = self.counters
        return sum(c[0::2]), sum(c[1::2])

    def reset(self) -> None:
        """Clear every process's records and the live counters."""
        for c in self.conns:
            c.send("reset")
        for c in self.conns:
            c.recv()
        for i in range(len(self.counters)):
            self.counters[i] = 0

    def snapshot(self) -> Snapshot:
        """Merged copy of every process's records."""
        for c in self.conns:
            c.send("snapshot")
        snap = Snapshot([], [], [], [], [], [], 0, 0, 0)
        for c in self.conns:
            d = c.recv()
            snap.seq.extend(array("q", d["seq"]))
            snap.t_recv.extend(array("d", d["t_recv"]))
            snap.t_enq.extend(array("d", d["t_enq"]))
            snap.status.extend(array("H", d["status"]))
            snap.endpoint.extend(array("H", d["endpoint"]))
            if d["ids"]:
                snap.ids.extend(d["ids"].split(b"\n"))
            snap.sig_ok += d["sig_ok"]
            snap.sig_bad += d["sig_bad"]
            snap.bad_requests += d["bad_requests"]
        return snap

    def close(self) -> None:
        """Stop every process (terminate after a short grace)."""
        for c in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                c.send("stop")
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
        for c in self.conns:
            c.close()
        self.procs.clear()
        self.conns.clear()


# --- capacity check -------------------------------------------------------------------------


class _LoadClient(asyncio.Protocol):
    """Keep-alive client sending one request at a time (like aiohttp and requests do)."""

    def __init__(self, request: bytes, state: dict[str, float]) -> None:
        self.request = request
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            del self.buf[: end + 4]  # responses carry no body
            self.state["done"] += 1
            if time.monotonic() < self.state["until"] and self.transport is not None:
                self.transport.write(self.request)


def _load_main(cfg: ReceiverConfig, seconds: float, conns: int, out: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    out.put(asyncio.run(_load(cfg, seconds, conns)))


async def _load(cfg: ReceiverConfig, seconds: float, conns: int) -> float:
    loop = asyncio.get_running_loop()
    body = orjson.dumps({"type": "bench.capacity", "bench": {"t": time.time(), "seq": -1}})
    ts = int(time.time())
    msg_id = "msg_capacity"
    sig = sign(cfg.secret, msg_id, ts, body) if cfg.secret else "v1,x"
    transports = []
    state = {"done": 0.0, "until": time.monotonic() + seconds}
    start = time.monotonic()
    for i in range(conns):
        ep = i % cfg.endpoints
        request = (
            f"POST /ep/{ep} HTTP/1.1\r\nHost: {cfg.host(ep)}:{cfg.port}\r\n"
            f"Content-Type: application/json\r\nwebhook-id: {msg_id}\r\n"
            f"webhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        t, _ = await loop.create_connection(
            lambda r=request: _LoadClient(r, state), cfg.host(ep), cfg.port  # type: ignore[misc]
        )
        transports.append(t)
    await asyncio.sleep(max(0.0, state["until"] - time.monotonic()) + 0.05)
    elapsed = time.monotonic() - start
    for t in transports:
        t.close()
    return state["done"] / elapsed


def measure_capacity(
    pool: ReceiverPool, seconds: float = 2.0, conns: int = 64, clients: int = 2
) -> float:
    """Requests/s the receiver answered under a self-load (lower bound: clients share cores).

    Latency and slow-endpoint faults are not applied to the check (they are waits, not work).
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_load_main, args=(pool.cfg, seconds, conns // clients, out), daemon=True)
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    total = 0.0
    for _ in procs:
        total += float(out.get(timeout=seconds + 30))
    for p in procs:
        p.join(5)
    pool.reset()
    return total
