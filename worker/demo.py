"""`webhooks demo`: a real end-to-end run on the embedded defaults, narrated.

A local receiver, a real Celery worker (with beat) on Redis, the SQLite default database;
events go in through `.delay()` and come out signed at the receiver, one endpoint failing
its first answer so a retry shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from worker.core.errors import InvalidSignature
from worker.settings import Settings, get_settings

DEMO_ENV = {
    "WEBHOOKS_ALLOWED_NETWORKS": "127.0.0.0/8",  # the demo receiver is on loopback
    "WEBHOOKS_RETRY_SCHEDULE": "1,2",
    "WEBHOOKS_SWEEP_INTERVAL": "0.5",
    "WEBHOOKS_LOG_LEVEL": "WARNING",
    # The flaky endpoint's 503s open its circuit; a short cool-down keeps the demo short.
    "WEBHOOKS_BREAKER_COOLDOWN": "2",
}


@dataclass
class DemoReceiver:
    secrets: dict[str, str] = field(default_factory=dict)  # path -> secret
    tries: Counter[tuple[str, str]] = field(default_factory=Counter)
    verified: int = 0
    bad: list[str] = field(default_factory=list)
    first_at: float | None = None
    last_at: float = 0.0
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        from worker.core.signing import verify

        body = await request.read()
        try:
            verify(self.secrets[request.path], request.headers, body)
            self.verified += 1
        except (InvalidSignature, KeyError) as exc:
            self.bad.append(f"{request.path}: {exc}")
        key = (request.path, request.headers.get("webhook-id", "?"))
        self.tries[key] += 1
        now = time.time()
        self.first_at = self.first_at or now
        self.last_at = now
        if request.path == "/flaky" and self.tries[key] == 1:
            return web.Response(status=503, text="not yet")
        return web.Response(status=204)

    def delivered(self, path: str) -> int:
        return sum(1 for (p, _), n in self.tries.items() if p == path)


def _serve(receiver: DemoReceiver) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/{name}", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        receiver.port = runner.addresses[0][1]
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, name="demo-receiver", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("demo receiver did not start")
    return loop, thread


def _check_redis(settings: Settings) -> str | None:
    import redis

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return f"Redis at {settings.broker_url} is not reachable ({exc}); start it, e.g. " \
               "'redis-server --daemonize yes', or set REDIS_HOST / CELERY_BROKER_URL"
    return None


def _wait(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _add_endpoints(settings: Settings, receiver: DemoReceiver,
                   endpoints: dict[str, str]) -> None:
    """One endpoint per receiver path, each with a fresh secret the receiver checks."""
    from worker.core.models import Endpoint
    from worker.core.signing import generate_secret
    from worker.db.connection import create_engine
    from worker.db.store import open_store

    async def add() -> None:
        engine = create_engine(settings)
        try:
            for path, endpoint_id in endpoints.items():
                secret = generate_secret()
                receiver.secrets[path] = secret
                await open_store(engine, settings).add_endpoint(Endpoint(
                    id=endpoint_id, url=f"http://127.0.0.1:{receiver.port}{path}",
                    secrets=(secret,)))
        finally:
            await engine.dispose()

    asyncio.run(add())


def _status_counts(settings: Settings) -> dict[str, int]:
    from worker.db.connection import create_engine
    from worker.db.store import open_store

    async def counts() -> dict[str, int]:
        engine = create_engine(settings)
        try:
            return await open_store(engine, settings).status_counts()
        finally:
            await engine.dispose()

    return asyncio.run(counts())


def _start_worker(workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = {**os.environ, **DEMO_ENV}
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-B",
           "--schedule", str(workdir / "beat"), "--pool", "solo", "--without-gossip",
           "--without-mingle", "--loglevel", "WARNING"]
    log_path = workdir / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"3. worker    pid {worker.pid}: {' '.join(cmd[2:6])} (log {log_path})")
    return worker, log_path


def _produce(endpoints: dict[str, str], events: int) -> float:
    """Enqueue the demo's events; returns when it started."""
    from worker.tasks.webhook_delivery import deliver_webhook_event, deliver_webhook_events

    started = time.time()
    ok_id, flaky_id = endpoints["/ok"], endpoints["/flaky"]
    for n in range(events):
        deliver_webhook_event.delay(webhook_id=ok_id, event_data={
            "event": "application.submitted", "partner_id": "partner-123", "n": n})
    deliver_webhook_events.delay(events=[
        {"webhook_id": flaky_id, "event_data": {"event": "application.updated", "n": n}}
        for n in range(10)])
    print(f"4. producer  {events} x deliver_webhook_event.delay() + 1 batch of 10 "
          f"in {time.time() - started:.2f}s")
    return started


def _report(settings: Settings, receiver: DemoReceiver, events: int, started: float,
            done: bool) -> bool:
    """Print what arrived and what the database holds; returns whether the demo passed."""
    _wait(lambda: _status_counts(settings).get("pending", 0) == 0, 10)
    status = _status_counts(settings)
    flaky_retried = sum(1 for (p, _), n in receiver.tries.items() if p == "/flaky" and n >= 2)
    print(f"5. received  {receiver.delivered('/ok')}/{events} events at /ok, "
          f"{receiver.delivered('/flaky')}/10 at /flaky "
          f"({flaky_retried} retried after a 503, same webhook-id) in "
          f"{receiver.last_at - started:.2f}s")
    print(f"   signatures verified: {receiver.verified}, bad: {len(receiver.bad)}")
    print("6. database  " + ", ".join(f"{k} {v}" for k, v in sorted(status.items())))
    return done and not receiver.bad and flaky_retried == 10


def run_demo(events: int = 200, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="webhooks-demo-"))
    if "DATABASE_URL" not in os.environ:
        # A database of the demo's own (with its key file beside it), unless told otherwise:
        # nothing is left in ./webhooks.db.
        os.environ["DATABASE_URL"] = f"sqlite+aiosqlite:///{workdir / 'demo.db'}"
        get_settings.cache_clear()
    settings = get_settings()
    problem = _check_redis(settings)
    if problem:
        print(f"webhooks demo: {problem}", file=sys.stderr)
        return 2
    from worker.db.migrate import upgrade

    print(f"1. database  {settings.database_url}  (migrating)")
    upgrade(settings.database_url)
    receiver = DemoReceiver()
    loop, _ = _serve(receiver)
    stamp = time.strftime("%H%M%S")
    endpoints = {"/ok": f"demo-ok-{stamp}", "/flaky": f"demo-flaky-{stamp}"}
    _add_endpoints(settings, receiver, endpoints)
    print(f"2. receiver  http://127.0.0.1:{receiver.port}  endpoints "
          f"{', '.join(endpoints.values())} (the flaky one answers 503 first)")
    worker, log_path = _start_worker(workdir)
    try:
        started = _produce(endpoints, events)
        done = _wait(lambda: receiver.delivered("/ok") >= events
                     and receiver.delivered("/flaky") >= 10
                     and sum(n for (p, _), n in receiver.tries.items() if p == "/flaky") >= 20,
                     60)
        if worker.poll() is not None:
            print(f"webhooks demo: the worker exited ({worker.returncode}); see {log_path}",
                  file=sys.stderr)
            return 1
        success = _report(settings, receiver, events, started, done)
        print("demo " + ("passed: every event delivered, signed, recorded"
                         if success else "FAILED: see above and " + str(log_path)))
        keep = keep or not success
        return 0 if success else 1
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        loop.call_soon_threadsafe(loop.stop)
        if keep:
            print(f"kept: {workdir} (database, its key, the worker's log)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
