"""Rate limits: LocalLimiter on a fake clock, RedisLimiter against real Redis servers.

The tests' own Redis (tests/conftest.py) is used in DB 14 only, under a random key prefix per test,
and only those keys are deleted. Outages are played on a redis-server of the test's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from worker.core import clock as core_clock
from worker.core.errors import InvalidRateLimit
from worker.delivery.ratelimit import (
    KEY_PREFIX,
    LocalLimiter,
    RateLimit,
    RedisLimiter,
    limiter_for,
)

SHARED_URL = f"{TEST_REDIS_URL}/14"
REPO = Path(__file__).resolve().parents[2]


class Clock(core_clock.Clock, Protocol):
    """The FakeClock of conftest, as far as these tests use it (they do not import conftest)."""

    def advance(self, seconds: float) -> None: ...


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def limiter_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "webhooks.ratelimit" and r.levelno == level]


# --- RateLimit and limiter_for -------------------------------------------------------------


def test_rate_limit_is_checked_and_frozen() -> None:
    limit = RateLimit(2.5)
    assert limit.burst == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.rate = 3.0  # type: ignore[misc]
    with pytest.raises(InvalidRateLimit, match="rate must be a finite number > 0"):
        RateLimit(0.0, 1)
    with pytest.raises(ValueError, match="burst must be an integer >= 1"):
        RateLimit(10.0, 0)


@pytest.mark.parametrize(("url", "kind"), [
    (None, LocalLimiter),
    ("redis://127.0.0.1:6379/0", RedisLimiter),
    ("rediss://:secret@broker.example:6380/2", RedisLimiter),
    ("REDIS://broker/0", RedisLimiter),
    ("amqp://guest@localhost//", LocalLimiter),
    ("memory://", LocalLimiter),
    ("sentinel://broker:26379", LocalLimiter),
    ("", LocalLimiter),
])
def test_limiter_for(url: str | None, kind: type) -> None:
    # Made outside any event loop: construction does no I/O and needs no loop.
    assert type(limiter_for(url)) is kind


def test_redis_limiter_rejects_a_malformed_url_at_once() -> None:
    with pytest.raises(ValueError):
        RedisLimiter("http://127.0.0.1:6379/0")


def test_redis_limiter_start_needs_a_running_loop() -> None:
    limiter = RedisLimiter(SHARED_URL)
    with pytest.raises(RuntimeError):
        limiter.start()


# --- LocalLimiter --------------------------------------------------------------------------


async def test_local_burst_then_steady_rate(fake_clock: Clock) -> None:
    limiter = LocalLimiter(clock=fake_clock)
    limit = RateLimit(4.0, 3)
    assert [await limiter.take("ep", limit) for _ in range(4)] == [0.0, 0.0, 0.0, 0.25]
    for _ in range(10):
        fake_clock.advance(0.25)
        assert await limiter.take("ep", limit) == 0.0
        assert await limiter.take("ep", limit) == 0.25


async def test_local_wait_shrinks_and_denials_consume_nothing(fake_clock: Clock) -> None:
    limiter = LocalLimiter(clock=fake_clock)
    limit = RateLimit(4.0, 2)
    await limiter.take("ep", limit)
    await limiter.take("ep", limit)
    for _ in range(50):
        assert await limiter.take("ep", limit) == 0.25
    fake_clock.advance(0.125)
    assert await limiter.take("ep", limit) == 0.125
    fake_clock.advance(0.125)
    assert await limiter.take("ep", limit) == 0.0
    assert await limiter.take("ep", limit) == 0.25


async def test_local_idle_refills_up_to_burst_only(fake_clock: Clock) -> None:
    limiter = LocalLimiter(clock=fake_clock)
    limit = RateLimit(4.0, 3)
    for _ in range(3):
        await limiter.take("ep", limit)
    fake_clock.advance(3600.0)
    assert [await limiter.take("ep", limit) for _ in range(4)] == [0.0, 0.0, 0.0, 0.25]


async def test_local_keys_and_limits_are_independent(fake_clock: Clock) -> None:
    limiter = LocalLimiter(clock=fake_clock)
    assert await limiter.take("a", RateLimit(1.0)) == 0.0
    assert await limiter.take("a", RateLimit(1.0)) == 1.0
    assert await limiter.take("b", RateLimit(1.0)) == 0.0
    assert await limiter.take("c", RateLimit(0.5)) == 0.0
    assert await limiter.take("c", RateLimit(0.5)) == 2.0


async def test_local_memory_holds_only_recent_keys(fake_clock: Clock) -> None:
    limiter = LocalLimiter(clock=fake_clock, sweep_seconds=60.0)
    for i in range(1000):
        await limiter.take(f"ep-{i}", RateLimit(10.0))
    await limiter.take("slow", RateLimit(1 / 3600, 1))  # its bucket is full again in an hour
    assert len(limiter) == 1001
    fake_clock.advance(59.0)
    await limiter.take("ep-0", RateLimit(10.0))
    assert len(limiter) == 1001  # not swept before its time
    fake_clock.advance(1.0)
    await limiter.take("new", RateLimit(10.0))
    assert len(limiter) == 2  # "slow" (still owed) and "new"
    # The one kept still limits; the ones dropped were full buckets, so nothing changed there.
    assert await limiter.take("slow", RateLimit(1 / 3600, 1)) == pytest.approx(3540.0)
    assert await limiter.take("ep-5", RateLimit(10.0)) == 0.0


async def test_local_close_is_a_no_op(fake_clock: Clock) -> None:
    limiter = LocalLimiter(clock=fake_clock)
    await limiter.close()
    assert await limiter.take("ep", RateLimit(1.0)) == 0.0


# --- RedisLimiter against the shared Redis -------------------------------------------------


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys (and only they) are deleted afterwards."""
    value = f"test-{uuid.uuid4().hex}:{KEY_PREFIX}"
    yield value
    client = redis.Redis.from_url(SHARED_URL)
    try:
        keys = list(client.scan_iter(match=f"{value}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def shared(prefix: str) -> AsyncIterator[Callable[..., RedisLimiter]]:
    """`shared(**kwargs)`: a RedisLimiter on DB 14 with this test's prefix; closed at the end."""
    made: list[RedisLimiter] = []

    def make(**kwargs: Any) -> RedisLimiter:
        limiter = RedisLimiter(SHARED_URL, key_prefix=prefix, **kwargs)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


@pytest.fixture
async def peek(prefix: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on DB 14, to look at the buckets."""
    client = redis.asyncio.Redis.from_url(SHARED_URL)
    yield client
    await client.aclose()


async def test_redis_burst_then_waits(shared: Callable[..., RedisLimiter],
                                      peek: redis.asyncio.Redis, prefix: str) -> None:
    limiter = shared()
    limit = RateLimit(1.0, 3)
    assert [await limiter.take("ep", limit) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = await limiter.take("ep", limit)
    # One token back a second after the first take, which was only moments ago.
    assert 0.9 < wait <= 1.0
    assert 2000 < await peek.pttl(f"{prefix}ep") <= 3000
    assert limiter.shared


async def test_redis_denials_consume_nothing(shared: Callable[..., RedisLimiter],
                                             peek: redis.asyncio.Redis, prefix: str) -> None:
    limiter = shared()
    limit = RateLimit(2.0, 1)
    assert await limiter.take("ep", limit) == 0.0
    tat = await peek.get(f"{prefix}ep")
    waits = [await limiter.take("ep", limit) for _ in range(20)]
    assert all(0.0 < w <= 0.5 for w in waits)
    assert waits == sorted(waits, reverse=True)  # the same token, coming closer
    assert await peek.get(f"{prefix}ep") == tat


async def test_two_limiters_share_one_bucket(shared: Callable[..., RedisLimiter],
                                             fake_clock: Clock) -> None:
    class Skewed:
        """A host clock an hour ahead: it must not matter, Redis keeps the time."""

        def monotonic(self) -> float:
            return fake_clock.monotonic() + 3600.0

        def time(self) -> float:
            return fake_clock.time() + 3600.0

        def now(self) -> datetime:
            return datetime.fromtimestamp(self.time(), UTC)

    one = shared(clock=fake_clock)
    two = shared(clock=Skewed())
    limit = RateLimit(1.0, 2)
    assert await one.take("ep", limit) == 0.0
    assert await two.take("ep", limit) == 0.0
    assert 0.9 < await one.take("ep", limit) <= 1.0
    assert 0.9 < await two.take("ep", limit) <= 1.0
    # Two connections, really.
    assert one._redis is not two._redis
    # Other keys have buckets of their own.
    assert await two.take("other", limit) == 0.0


async def test_redis_keys_expire_once_full_again(shared: Callable[..., RedisLimiter],
                                                 peek: redis.asyncio.Redis,
                                                 prefix: str) -> None:
    limiter = shared()
    limit = RateLimit(100.0, 2)
    assert [await limiter.take("ep", limit) for _ in range(2)] == [0.0, 0.0]
    assert await limiter.take("ep", limit) > 0.0
    # Full again 2 intervals (20 ms) after the first take: the key lives no longer than that.
    assert 0 < await peek.pttl(f"{prefix}ep") <= 20

    deadline = time.monotonic() + 5.0
    while await peek.exists(f"{prefix}ep"):
        assert time.monotonic() < deadline, "the bucket key did not expire"
        await asyncio.sleep(0.005)
    assert [await limiter.take("ep", limit) for _ in range(2)] == [0.0, 0.0]


async def test_redis_limiter_reopens_after_close(shared: Callable[..., RedisLimiter]) -> None:
    limiter = shared()
    assert await limiter.take("ep", RateLimit(1.0)) == 0.0
    await limiter.close()
    await limiter.close()
    assert await limiter.take("ep", RateLimit(1.0)) > 0.0


def test_redis_limiter_moves_to_a_new_loop_after_close(prefix: str) -> None:
    limiter = RedisLimiter(SHARED_URL, key_prefix=prefix)

    async def take_and_close() -> float:
        try:
            return await limiter.take("ep", RateLimit(1.0))
        finally:
            await limiter.close()

    assert asyncio.run(take_and_close()) == 0.0
    assert asyncio.run(take_and_close()) > 0.0  # a second loop, the same shared bucket


async def test_script_survives_a_script_flush_elsewhere(shared: Callable[..., RedisLimiter],
                                                        prefix: str) -> None:
    # A restarted Redis has forgotten the script: EVALSHA fails once, redis-py loads it again.
    limiter = shared()
    assert await limiter.take("ep", RateLimit(1.0)) == 0.0
    assert limiter._script is not None
    limiter._script.sha = "0" * 40  # the same as a server without the script, without a FLUSH
    assert await limiter.take("ep", RateLimit(1.0)) > 0.0
    assert limiter.shared


# --- outages: a redis-server of the test's own ---------------------------------------------


class OwnRedis:
    """A redis-server on a free port of its own, without persistence; stop and start at will."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10.0
        client = redis.Redis(port=self.port, socket_timeout=1.0)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10.0)
            self.proc = None

    def keys(self) -> list[Any]:
        client = redis.Redis(port=self.port, socket_timeout=1.0)
        try:
            return list(client.keys("*"))
        finally:
            client.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_outage_falls_back_warns_once_and_recovers(
        own_redis: OwnRedis, fake_clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "webhooks.ratelimit")
    limiter = RedisLimiter(own_redis.url, clock=fake_clock, probe_interval=1.0)
    limit = RateLimit(4.0, 2)
    try:
        assert await limiter.take("ep", limit) == 0.0
        assert own_redis.keys() == [b"webhooks:rate:ep"]

        own_redis.stop()
        # Per process now, on this process's clock: a fresh local bucket, still a limit.
        assert [await limiter.take("ep", limit) for _ in range(3)] == [0.0, 0.0, 0.25]
        for _ in range(20):
            fake_clock.advance(1.0)  # every take is a probe of Redis, and fails
            await limiter.take("ep", limit)
        assert not limiter.shared
        warnings = limiter_records(caplog, logging.WARNING)
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert "enforced per process until Redis returns" in message
        assert "ConnectionError" in message

        own_redis.start()  # empty: a restart without persistence
        # Until the probe interval has passed, takes stay local and Redis is not asked.
        await limiter.take("ep", limit)
        assert own_redis.keys() == []
        fake_clock.advance(1.0)
        assert await limiter.take("ep", limit) == 0.0
        assert own_redis.keys() == [b"webhooks:rate:ep"]
        assert limiter.shared
        assert [r.getMessage() for r in limiter_records(caplog, logging.INFO)] == [
            "rate limits are shared through Redis again"]

        # A second outage is a second warning.
        own_redis.stop()
        for _ in range(5):
            fake_clock.advance(1.0)
            await limiter.take("ep", limit)
        assert len(limiter_records(caplog, logging.WARNING)) == 2
    finally:
        await limiter.close()


async def test_closed_port_falls_back_at_once(fake_clock: Clock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "webhooks.ratelimit")
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", clock=fake_clock,
                           probe_interval=0.0)
    try:
        limit = RateLimit(1.0, 1)
        assert [await limiter.take("ep", limit) for _ in range(3)] == [0.0, 1.0, 1.0]
        assert len(limiter_records(caplog, logging.WARNING)) == 1
    finally:
        await limiter.close()


async def test_a_redis_that_never_answers_times_out(fake_clock: Clock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "webhooks.ratelimit")
    # A socket that listens but never accepts: connects succeed, nothing is ever answered.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        limiter = RedisLimiter(url, timeout=0.2, clock=fake_clock)
        try:
            started = time.monotonic()
            assert await limiter.take("ep", RateLimit(1.0)) == 0.0
            assert time.monotonic() - started < 2.0  # bounded by the timeout, not hanging
            # Within the probe interval the next takes do not wait on Redis at all.
            started = time.monotonic()
            assert await limiter.take("ep", RateLimit(1.0)) == 1.0
            assert time.monotonic() - started < 0.1
            assert "TimeoutError" in limiter_records(caplog, logging.WARNING)[0].getMessage()
        finally:
            await limiter.close()


# --- the measurement: two OS processes, one shared bucket ----------------------------------

# Each process: its own RedisLimiter (own connection); it connects before the window opens,
# then loops "take; if told to wait, sleep that long" and counts its grants inside the window.
WORKER = """
import asyncio, json, sys, time
from worker.delivery.ratelimit import RateLimit, RedisLimiter

async def main(url, prefix, rate, burst, start_at, seconds):
    limiter = RedisLimiter(url, key_prefix=prefix)
    limit = RateLimit(rate, burst)
    await limiter.take("warm-up:" + str(time.time()), RateLimit(1e6, 1))
    late = time.time() > start_at
    await asyncio.sleep(max(0.0, start_at - time.time()))
    end = start_at + seconds
    granted = waited = 0
    while True:
        wait = await limiter.take("ep", limit)
        if time.time() >= end:
            break
        if wait > 0:
            waited += 1
            await asyncio.sleep(wait)
        else:
            granted += 1
    print(json.dumps({"granted": granted, "waited": waited, "late": late,
                      "shared": limiter.shared}))
    await limiter.close()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]),
                 float(sys.argv[5]), float(sys.argv[6])))
"""


def test_two_processes_together_keep_to_the_limit(prefix: str) -> None:
    rate, burst, seconds, processes = 200.0, 5, 3.0, 2
    start_at = time.time() + 2.0  # time for both interpreters to start and connect
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, SHARED_URL, prefix, str(rate),
                          str(burst), str(start_at), str(seconds)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(processes)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out))
    assert not any(r["late"] for r in results), results
    assert all(r["shared"] for r in results), results
    total = sum(r["granted"] for r in results)
    expected = rate * seconds + burst
    measured = total / seconds
    print(f"\nmeasured {measured:.1f}/s for limit {rate:.0f}/s across {processes} processes "
          f"({total} grants in {seconds:.0f} s, expected {expected:.0f} = {rate:.0f}/s x "
          f"{seconds:.0f} s + burst {burst}; per process {[r['granted'] for r in results]}, "
          f"waits {[r['waited'] for r in results]})")
    assert abs(total - expected) <= 0.1 * expected
    # Both really took part: the limit held for the two together, not for each.
    assert all(r["granted"] >= 0.1 * total for r in results)
