"""Processes the fault tests start and break: Redis, PostgreSQL, workers, a producer.

Only stable interfaces are used: the `webhooks` CLI, the `celery` command line with its
environment, the producer API (in a subprocess of its own, see `producer.py`), raw Redis, and
SQL on the `deliveries` and `attempts` tables.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import redis

from tests.conftest import TEST_SECRET_KEYS

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WEBHOOKS_CLI = str(VENV_BIN / "webhooks")
PG_BIN = Path(os.environ.get("WEBHOOKS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
# Task names of ours; anything else on the queue (beat's periodic tasks) is not an event.
EVENT_TASKS = ("webhooks.deliver_event", "webhooks.deliver_events")


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 60,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])}... exited {done.returncode}:\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def _clean_env() -> dict[str, str]:
    """This process's environment without the worker's settings (tests/conftest sets some)."""
    drop = ("WEBHOOKS_", "CELERY_", "REDIS_", "DATABASE_URL", "PYTEST_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# -- Redis -------------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server with an append-only file, restartable on the same port and dir."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="webhooks-rel-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.dir),
             "--save", "", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(self.ping, 10, f"redis-server on port {self.port}", every=0.05)

    def ping(self) -> bool:
        try:
            return bool(self.client(timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def shutdown(self) -> None:
        """`redis-cli shutdown`: the AOF is flushed, the data kept for the next start."""
        if self.proc is None:
            return
        _run(["redis-cli", "-p", str(self.port), "shutdown"], check=False, timeout=15)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.shutdown()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    # What the broker holds: the ready list and kombu's unacked hash.
    def queue_items(self) -> list[bytes]:
        return list(self.client().lrange("celery", 0, -1))

    def unacked_items(self) -> list[bytes]:
        return list(self.client().hvals("unacked"))

    def event_messages_held(self) -> dict[str, int]:
        """Event messages (ours or unidentifiable) still in the `celery` list / `unacked` hash."""

        def is_event(raw: bytes) -> bool:
            try:
                item = json.loads(raw)
                if isinstance(item, list):  # unacked values: [message, exchange, routing_key]
                    item = item[0]
                return item["headers"]["task"] not in ("webhooks.retry_failed_deliveries",
                                                       "webhooks.cleanup_old_deliveries")
            except Exception:
                return True  # not even ours to name: still stranded

        return {"celery list": sum(map(is_event, self.queue_items())),
                "unacked hash": sum(map(is_event, self.unacked_items()))}


    def wait_drained(self, timeout: float = 10.0) -> dict[str, int]:
        """Wait (bounded) for no event message to be held; returns what is still held."""
        deadline = time.monotonic() + timeout
        while True:
            held = self.event_messages_held()
            if not any(held.values()) or time.monotonic() > deadline:
                return held
            time.sleep(0.2)


# -- PostgreSQL --------------------------------------------------------------------------------


class PgServer:
    """A private PostgreSQL 15 cluster (initdb once), stoppable for the outage scenario."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="webhooks-rel-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        try:
            shutil.chown(self.base, "postgres", "postgres")
            self._as_pg([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust",
                         "-U", "postgres", "--no-sync", "-E", "UTF8"], timeout=120)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def _as_pg(self, cmd: list[str], timeout: float = 60,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["runuser", "-u", "postgres", "--", *cmd], timeout=timeout, check=check)

    def start(self) -> None:
        self._as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l",
                     str(self.base / "postgres.log"), "-o",
                     f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                     "-c fsync=off -c max_connections=200", "-w", "-t", "60", "start"])

    def stop(self) -> None:
        self._as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                     "-t", "60", "stop"])

    def running(self) -> bool:
        done = self._as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"],
                           check=False)
        return done.returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def close(self) -> None:
        if self.running():
            self._as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                         "-w", "stop"], check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def url(self, name: str, driver: str = "asyncpg") -> str:
        scheme = "postgresql+asyncpg" if driver == "asyncpg" else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{name}"

    def admin(self, sql: str) -> None:
        run_sql(self.url("postgres", driver="plain"), lambda conn: conn.execute(sql))


def run_sql(url: str, work: Callable[[Any], Any]) -> Any:
    """`await work(conn)` on a fresh asyncpg connection (plain `postgresql://` URL)."""
    import asyncpg

    async def go() -> Any:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


@dataclass
class Row:
    id: str
    endpoint_id: str
    status: str
    attempts: int
    last_error: str | None
    payload: bytes | None
    created_at: datetime

    def event(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.payload or b"")
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class Database:
    """One test's database on the private cluster, migrated with `webhooks db upgrade`."""

    def __init__(self, server: PgServer) -> None:
        self.server = server
        self.name = f"rel_{uuid.uuid4().hex[:12]}"
        server.admin(f'CREATE DATABASE "{self.name}"')
        self.url = server.url(self.name)  # for the worker and the CLI
        self.plain_url = server.url(self.name, driver="plain")  # for asyncpg here
        try:
            _run([WEBHOOKS_CLI, "db", "upgrade"], env=self.cli_env(), timeout=120)
        except BaseException:
            self.drop()
            raise

    def cli_env(self) -> dict[str, str]:
        env = _clean_env()
        env.update(DATABASE_URL=self.url, PYTHONPATH=str(ROOT), WEBHOOKS_LOG_LEVEL="WARNING",
                   WEBHOOKS_SECRET_KEYS=TEST_SECRET_KEYS, WEBHOOKS_ALLOWED_NETWORKS="127.0.0.0/8")
        return env

    def drop(self) -> None:
        self.server.ensure_running()
        self.server.admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def add_endpoints(self, specs: Iterable[tuple[str, str, str]]) -> None:
        """(id, url, secret) each, with `webhooks endpoints add ... --json`, in parallel."""
        procs = []
        for endpoint_id, url, secret in specs:
            cmd = [WEBHOOKS_CLI, "endpoints", "add", "--url", url, "--id", endpoint_id,
                   "--secret", secret, "--json"]
            procs.append((endpoint_id, subprocess.Popen(
                cmd, env=self.cli_env(), cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)))
        for endpoint_id, proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"endpoints add {endpoint_id}: {out}\n{err}"
            assert json.loads(out)["id"] == endpoint_id

    def rows(self, endpoint_ids: Iterable[str] | None = None) -> list[Row]:
        sql = ("SELECT id, endpoint_id, status, attempts, last_error, payload, created_at "
               "FROM deliveries")
        args: list[Any] = []
        if endpoint_ids is not None:
            sql += " WHERE endpoint_id = ANY($1::text[])"
            args.append(list(endpoint_ids))
        found = run_sql(self.plain_url, lambda conn: conn.fetch(sql + " ORDER BY created_at",
                                                                *args))
        return [Row(**dict(r)) for r in found]

    def status_counts(self) -> dict[str, int]:
        found = run_sql(self.plain_url, lambda conn: conn.fetch(
            "SELECT status, count(*) AS n FROM deliveries GROUP BY status"))
        return {r["status"]: r["n"] for r in found}

    def attempts(self, endpoint_ids: Iterable[str]) -> list[dict[str, Any]]:
        found = run_sql(self.plain_url, lambda conn: conn.fetch(
            "SELECT a.delivery_id, a.attempt_number, a.attempted_at, a.duration_ms, "
            "a.status_code, a.outcome, a.error_kind, a.error, d.endpoint_id "
            "FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
            "WHERE d.endpoint_id = ANY($1::text[]) ORDER BY a.attempted_at",
            list(endpoint_ids)))
        return [dict(r) for r in found]


# -- the worker --------------------------------------------------------------------------------


def worker_env(broker_url: str, database_url: str, **settings: str) -> dict[str, str]:
    env = _clean_env()
    env.update(CELERY_BROKER_URL=broker_url, DATABASE_URL=database_url,
               WEBHOOKS_ALLOWED_NETWORKS="127.0.0.0/8", WEBHOOKS_LOG_LEVEL="INFO",
               WEBHOOKS_SECRET_KEYS=TEST_SECRET_KEYS, PYTHONPATH=str(ROOT),
               # The breaker stays on through the faults, with a cool-down the tests can wait.
               WEBHOOKS_BREAKER_COOLDOWN="2",
               PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


# Fast rescue for the scenarios where defaults are not the point.
FAST = {
    "WEBHOOKS_RETRY_SCHEDULE": "1,1,2",
    "WEBHOOKS_RETRY_JITTER": "0",
    "WEBHOOKS_SWEEP_INTERVAL": "0.5",
    "WEBHOOKS_LEASE_SECONDS": "6",
    "WEBHOOKS_REQUEST_TIMEOUT": "3",
    "WEBHOOKS_REQUEUE_DELAY": "0.5",
}

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+)\s")


class WorkerProcess:
    """`celery -A worker.celery_app worker -B` in a session of its own, its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, pool: str = "solo",
                 concurrency: int = 1) -> None:
        self.env, self.log_path, self.pool, self.concurrency = env, log_path, pool, concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 60) -> None:
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-B",
               "--schedule", str(self.log_path.with_suffix(".beat")), "--pool", self.pool,
               "--concurrency", str(self.concurrency), "-n", f"rel-{uuid.uuid4().hex[:8]}@%h",
               "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.returncode = None
        wait_until(lambda: " ready." in self.log() or not self.alive(), timeout, "worker ready")
        assert self.alive(), f"worker exited at start:\n{self.tail()}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        if self.proc is None:
            return False
        code = self.proc.poll()
        if code is not None:
            self.returncode = code
        return code is None

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or the OOM killer would."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.returncode = self.proc.wait(10)
        self.proc = None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (warm shutdown), SIGKILL after `timeout` s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        self.returncode = self.proc.wait(10)
        self.proc = None

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in [psutil.Process(self.pid), *self.children()]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    total += times.user + times.system
        return total

    def rss_mb(self) -> float:
        total = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in [psutil.Process(self.pid), *self.children()]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += proc.memory_info().rss
        return total / 2**20

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def lines_at_level(self, levels: tuple[str, ...], since: float, until: float) -> list[str]:
        """Log records (first line of each) at `levels`, stamped within [since, until]."""
        found = []
        for line in self.log().splitlines():
            match = LOG_LINE.match(line)
            if not match or match.group(2) not in levels:
                continue
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if since <= stamp <= until:
                found.append(line)
        return found


# -- the producer ------------------------------------------------------------------------------


class Producer:
    """`python -m tests.reliability.producer` talking to the test's own Redis.

    The Celery app reads its broker URL once, at import, and this pytest process points at
    the shared Redis; so the real `.delay()` runs in a subprocess configured for ours.
    """

    def __init__(self, broker_url: str, log_path: Path) -> None:
        env = _clean_env()
        env.update(CELERY_BROKER_URL=broker_url, PYTHONPATH=str(ROOT),
                   WEBHOOKS_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.producer"], env=env, cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name="producer-out")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self._answers.put(json.loads(line[len("RESULT "):]))

    def submit(self, op: str, events: list[Any], *, rate: float | None = None,
               retry_seconds: float = 0.0) -> None:
        """Start publishing; `result()` waits for the answer. op: 'single' or 'batch'."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "events": events, "rate": rate,
                                          "retry_seconds": retry_seconds}) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"producer gave no answer within {timeout:.0f}s") from None
        assert not answer["errors"], f"producer could not publish: {answer['errors'][:3]}"
        return answer

    def send(self, op: str, events: list[Any], *, rate: float | None = None,
             retry_seconds: float = 0.0, timeout: float = 60) -> dict[str, Any]:
        self.submit(op, events, rate=rate, retry_seconds=retry_seconds)
        return self.result(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
