"""A real receiver (aiohttp, in a thread) and a real Celery worker process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import TEST_BROKER_URL, TEST_SECRET_KEYS

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Answers by path: /ok/*, /flaky/* (500 on a webhook-id's first try), /gone/*, /slow/*."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    slow_seconds: float = 3.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_to(self, prefix: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path.startswith(prefix)]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        seen = Seen(path, dict(request.headers), body, time.time())
        with self.lock:
            self.seen.append(seen)
            tries = Counter(s.headers.get("webhook-id") for s in self.seen if s.path == path)
        if path.startswith("/flaky/") and tries[seen.headers.get("webhook-id")] == 1:
            return web.Response(status=500, text="try again")
        if path.startswith("/gone/"):
            return web.Response(status=410)
        if path.startswith("/slow/"):
            await asyncio.sleep(self.slow_seconds)
        return web.Response(status=204)


Handle = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.contextmanager
def serving(handle: Handle, name: str) -> Iterator[int]:
    """An aiohttp server on 127.0.0.1 in a thread of its own, answering every POST with
    `handle`; yields its port."""
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    port = 0

    async def start() -> web.AppRunner:
        nonlocal port
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        port = runner.addresses[0][1]
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    assert ready.wait(10), f"{name} did not start"
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    with serving(state.handle, "test-receiver") as state.port:
        yield state


def worker_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKS_")}
    env.update(
        CELERY_BROKER_URL=TEST_BROKER_URL,
        DATABASE_URL=database_url,
        WEBHOOKS_ALLOWED_NETWORKS="127.0.0.0/8",
        WEBHOOKS_SECRET_KEYS=TEST_SECRET_KEYS,
        # These tests count retries; the circuit breaker has tests of its own.
        WEBHOOKS_BREAKER_FAILURES="1000",
        WEBHOOKS_RETRY_SCHEDULE="1,1,1",
        WEBHOOKS_RETRY_JITTER="0",
        WEBHOOKS_SWEEP_INTERVAL="0.5",
        WEBHOOKS_REQUEST_TIMEOUT="5",
        WEBHOOKS_LEASE_SECONDS="6",
        WEBHOOKS_LOG_LEVEL="INFO",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


class WorkerProcess:
    """`celery -A worker.celery_app worker -B` as a subprocess, its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, pool: str = "solo") -> None:
        self.env, self.log_path, self.pool = env, log_path, pool
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        schedule = self.log_path.with_suffix(".beat")
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-B",
               "--schedule", str(schedule), "--pool", self.pool,
               "--concurrency", "1" if self.pool == "solo" else "2",
               "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: b"ready." in self.log_path.read_bytes(), 30, "worker ready")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown code runs."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture
def start_worker(tmp_path: Path, redis_clean: None) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(database_url: str, pool: str = "solo", **extra: str) -> WorkerProcess:
        worker = WorkerProcess(worker_env(database_url, **extra),
                               tmp_path / f"worker{len(started)}.log", pool)
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()
