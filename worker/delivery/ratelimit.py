"""Per-endpoint rate limits: one GCRA bucket per key, in this process or shared through Redis.

`take` never refuses: it answers how long the caller must wait before it may deliver (0.0 is
"go now"), and the caller waits and asks again. A denied take consumes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Protocol

from redis import asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from worker.core.clock import SYSTEM_CLOCK, Clock
from worker.core.gcra import check_limit, gcra_take

log = logging.getLogger("webhooks.ratelimit")

KEY_PREFIX = "webhooks:rate:"
# Connect and read timeout for a take; past it the take falls back to the local bucket.
REDIS_TIMEOUT = 1.0
# During an outage, how often a take tries Redis again (the others go local meanwhile, so a
# Redis that hangs costs one take per interval a timeout, not every take).
PROBE_INTERVAL = 1.0
# How long close() waits for the connections to go.
CLOSE_SECONDS = 2.0
# How often the local bucket table is swept of buckets that are full again.
SWEEP_SECONDS = 60.0
# The script counts microseconds since this Unix second: numbers near 5e13 rather than 1.75e15
# resolve 0.008 us instead of 0.25 us, so even millions per second stay exact.
EPOCH = 1_700_000_000

# GCRA as in worker.core.gcra.gcra_take, in microseconds on the Redis server's own clock, so
# hosts whose clocks disagree still share one time line. The key holds the TAT and expires
# when the TAT passes: from then on the bucket is full, the same as no key.
GCRA_LUA = f"""
-- KEYS[1]: the bucket. ARGV[1]: microseconds per token. ARGV[2]: burst.
-- Returns "0" when the take is allowed (and recorded), else the microseconds to wait.
if redis.replicate_commands then redis.replicate_commands() end  -- TIME then SET, Redis < 5
local clock = redis.call('TIME')
local now = (tonumber(clock[1]) - {EPOCH}) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if tat == nil or tat < now then
  tat = now
end
local new_tat
if tat > now + (burst + 1) * interval then
  new_tat = now + burst * interval  -- the server clock went back: one token, not a long wait
else
  local allowed_at = tat - (burst - 1) * interval
  if allowed_at > now then
    return string.format('%.17g', allowed_at - now)
  end
  new_tat = tat + interval
end
local ttl = math.min(math.ceil((new_tat - now) / 1000), 1e15)
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', string.format('%d', ttl))
return '0'
"""


@dataclass(frozen=True)
class RateLimit:
    """At most `rate` events per second on average, up to `burst` at once after a pause."""

    rate: float
    burst: int = 1

    def __post_init__(self) -> None:
        check_limit(self.rate, self.burst)


class Limiter(Protocol):
    async def take(self, key: str, limit: RateLimit) -> float:
        """Take one token from `key`'s bucket: 0.0, or the seconds to wait before asking again."""
        ...

    async def close(self) -> None:
        """Let go of connections, if any."""
        ...


class LocalLimiter:
    """GCRA buckets in this process's memory, on the monotonic clock.

    Buckets that are full again are the same as no bucket: they are swept out every
    `sweep_seconds`, so memory holds only the keys used within about that time.
    """

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK,
                 sweep_seconds: float = SWEEP_SECONDS) -> None:
        self._clock = clock
        self._sweep_seconds = sweep_seconds
        self._tats: dict[str, float] = {}
        self._next_sweep = clock.monotonic() + sweep_seconds

    def __len__(self) -> int:
        return len(self._tats)

    async def take(self, key: str, limit: RateLimit) -> float:
        """Take one token from `key`'s bucket: 0.0, or the seconds to wait before asking again."""
        now = self._clock.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        tat, wait = gcra_take(self._tats.get(key), now, limit.rate, limit.burst)
        if tat is not None:
            self._tats[key] = tat
        return wait

    def _sweep(self, now: float) -> None:
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        self._next_sweep = now + self._sweep_seconds

    async def close(self) -> None:
        """Nothing to let go of."""


class RedisLimiter:
    """GCRA buckets in Redis, shared by every process and host that uses the same Redis.

    Each take is one EVALSHA of a Lua script that reads the bucket, decides on the Redis
    server's clock and writes the bucket back, atomically; bucket keys are
    `webhooks:rate:<key>` and expire once full again. The client is made on first use, inside
    the running event loop, and stays bound to that loop.

    When Redis cannot answer (down, timeout, any Redis error) the take falls back to a
    LocalLimiter of this object: the limit is then enforced per process, not across processes
    and hosts, until Redis returns. One warning is logged per outage on "webhooks.ratelimit",
    one info line when Redis is back; meanwhile Redis is tried again every `probe_interval`.
    """

    def __init__(self, url: str, *, timeout: float = REDIS_TIMEOUT,
                 probe_interval: float = PROBE_INTERVAL, key_prefix: str = KEY_PREFIX,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        parse_url(url)  # a malformed URL is a configuration error: say so now, not per take
        self.url = url
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.key_prefix = key_prefix
        self._clock = clock
        self._fallback = LocalLimiter(clock=clock)
        self._redis: aioredis.Redis | None = None
        self._script: AsyncScript | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down = False
        self._probing = False
        self._retry_at = 0.0

    @property
    def shared(self) -> bool:
        """False while Redis is away and limits hold per process only."""
        return not self._down

    def start(self) -> None:
        """Make the client, without I/O (it connects on the first take); needs a running loop."""
        if self._redis is not None:
            return
        self._loop = asyncio.get_running_loop()
        # No retries inside redis-py: a failed take goes local at once, the next one retries.
        self._redis = aioredis.Redis.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0))
        self._script = self._redis.register_script(GCRA_LUA)

    async def take(self, key: str, limit: RateLimit) -> float:
        """Take one token from `key`'s bucket: 0.0, or the seconds to wait before asking again."""
        self.start()
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("a RedisLimiter is bound to the event loop it started in")
        if self._down and (self._probing or self._clock.monotonic() < self._retry_at):
            return await self._fallback.take(key, limit)
        assert self._script is not None
        self._probing = self._down
        try:
            answer = await self._script(keys=[self.key_prefix + key],
                                        args=[1e6 / limit.rate, limit.burst])
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            self._failed(exc)
            return await self._fallback.take(key, limit)
        finally:
            self._probing = False
        if self._down:
            self._down = False
            log.info("rate limits are shared through Redis again")
        return float(answer) / 1e6

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = self._clock.monotonic() + self.probe_interval
        if not self._down:  # one line per outage, not one per take
            self._down = True
            log.warning("rate limit store unavailable (%s: %s): limits are enforced per "
                        "process until Redis returns", type(exc).__name__, exc)

    async def close(self) -> None:
        """Close the connections, bounded; a later take opens them again."""
        redis, self._redis, self._script, self._loop = self._redis, None, None, None
        if redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(redis.aclose(), CLOSE_SECONDS)


def limiter_for(broker_url: str | None, *,
                clock: Clock = SYSTEM_CLOCK) -> RedisLimiter | LocalLimiter:
    """A RedisLimiter for a redis:// or rediss:// broker; a LocalLimiter for none or another."""
    if broker_url is not None and broker_url.lower().startswith(("redis://", "rediss://")):
        return RedisLimiter(broker_url, clock=clock)
    return LocalLimiter(clock=clock)
