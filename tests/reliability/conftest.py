"""Fixtures: a private PostgreSQL (per session) and Redis (per test), the receiver, workers.

Nothing here touches the shared Redis (127.0.0.1:6379) or PostgreSQL (127.0.0.1:5432).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import (
    Database,
    PgServer,
    Producer,
    RedisServer,
    WorkerProcess,
    new_secret,
    worker_env,
)
from tests.reliability.ledger import Ledger
from tests.reliability.servers import (
    BadServers,
    Receiver,
    running_bad_servers,
    running_receiver,
)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def database(pg_server: PgServer) -> Iterator[Database]:
    pg_server.ensure_running()  # a failed outage test must not take the others down
    db = Database(pg_server)
    try:
        yield db
    finally:
        db.drop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state


@pytest.fixture
def bad_servers() -> Iterator[BadServers]:
    with running_bad_servers() as state:
        yield state


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(tmp_path: Path, redis_server: RedisServer,
                 database: Database) -> Iterator[StartWorker]:
    """start_worker(pool="solo", concurrency=1, **WEBHOOKS_settings) -> a ready worker."""
    started: list[WorkerProcess] = []

    def start(pool: str = "solo", concurrency: int = 1, **settings: str) -> WorkerProcess:
        worker = WorkerProcess(worker_env(redis_server.url, database.url, **settings),
                               tmp_path / f"worker{len(started)}.log", pool, concurrency)
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        with contextlib.suppress(Exception):
            worker.stop()
    for index, worker in enumerate(started):
        print(f"--- worker{index} log tail ({worker.log_path}) ---\n{worker.tail(25)}")


@pytest.fixture
def producer(tmp_path: Path, redis_server: RedisServer) -> Iterator[Producer]:
    proc = Producer(redis_server.url, tmp_path / "producer.log")
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def make_ledger(request: pytest.FixtureRequest) -> Callable[[str, str], Ledger]:
    def make(scenario: str, faults: str) -> Ledger:
        return Ledger(scenario, faults, f"pytest {request.node.nodeid}")

    return make


@pytest.fixture
def endpoints(database: Database, receiver: Receiver) -> Callable[[dict[str, str]], None]:
    """endpoints({endpoint_id: behaviour}): receiver paths with known secrets, added by CLI."""

    def add(spec: dict[str, str]) -> None:
        rows = []
        for endpoint_id, behaviour in spec.items():
            secret = new_secret()
            receiver.secrets[endpoint_id] = secret
            rows.append((endpoint_id, receiver.url(behaviour, endpoint_id), secret))
        database.add_endpoints(rows)

    return add
