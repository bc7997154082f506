"""Commits the events of messages a dead worker took from Redis and never acknowledged.

Kombu's Redis transport keeps a taken message in its `unacked` hash until it is acked and
hands it out again only after the visibility timeout (an hour by default). Intake is
idempotent (delivery ids derive from the task id), so any worker may commit such a message
early: once a message of ours has been unacknowledged for `rescue_after` seconds, this
commits its events and removes it from the hash. A message that was being rescued when its
rescuer died, `poison_tries` times over, is recorded as rejected instead of tried again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from worker.core.clock import SYSTEM_CLOCK, Clock
from worker.core.errors import InvalidEvent, StoreUnavailable
from worker.core.messages import (
    DELIVER_EVENT,
    DELIVER_EVENTS,
    first_message_id,
    message_events,
    unreadable,
)
from worker.core.models import AcceptReport, Incoming
from worker.settings import Settings
from worker.transport import decode_body

log = logging.getLogger("webhooks.rescuer")

Accept = Callable[[Sequence[Incoming]], Awaitable[AcceptReport]]
RESCUED_TASKS = frozenset({DELIVER_EVENT, DELIVER_EVENTS})
# Kombu's key names (its transport options `unacked_key`, `unacked_index_key`).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
# Per delivery tag: rescues begun and not finished. Ours alone.
TRIES_KEY = "webhooks.rescue-tries"
TRIES_TTL_SECONDS = 7 * 86400
# The longest a shutdown waits for the rescuer's task and its broker connection.
CLOSE_SECONDS = 5.0
# Index entries read per round trip, and at most per round.
BATCH = 200
MAX_PER_ROUND = 10_000
# Failures that say "the broker or the database is away", not "a bug".
EXPECTED = (RedisError, OSError, StoreUnavailable, TimeoutError)


@dataclass(frozen=True, slots=True)
class RescueConfig:
    broker_url: str
    rescue_after: float
    rescue_interval: float
    poison_tries: int
    max_events: int
    unacked_key: str = UNACKED_KEY
    unacked_index_key: str = UNACKED_INDEX_KEY

    @classmethod
    def from_settings(cls, s: Settings) -> RescueConfig:
        return cls(s.broker_url, s.rescue_after, s.rescue_interval, s.poison_tries,
                   s.max_events_per_message)


def rescuable(broker_url: str) -> bool:
    """Only Redis keeps taken messages away for a visibility timeout."""
    return broker_url.startswith(("redis://", "rediss://", "unix://"))


class Rescuer:
    def __init__(self, config: RescueConfig, accept: Accept, *,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self._accept = accept
        self._clock = clock
        self._redis: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self.stats = {"rescued_messages": 0, "poison_messages": 0}

    def start(self) -> None:
        self._redis = aioredis.Redis.from_url(self.config.broker_url)
        self._task = asyncio.create_task(self._run(), name="webhooks-rescue")

    async def close(self) -> None:
        """Stop; bounded, so a broker connection that hangs cannot hold up shutdown."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_SECONDS)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._redis.aclose(), CLOSE_SECONDS)

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.config.rescue_interval)
            try:
                await self.rescue_once()
                failing = False
            except Exception as exc:  # broker or database away: try again next round
                if not failing:  # one line per outage, not one per round
                    log.warning("rescue of unacknowledged messages paused: %s: %s",
                                type(exc).__name__, exc, exc_info=not isinstance(exc, EXPECTED))
                failing = True

    async def rescue_once(self) -> int:
        """One round; returns how many messages were taken care of."""
        redis = self._redis
        if redis is None:
            raise RuntimeError("Rescuer.start() was not called")
        cutoff = self._clock.time() - self.config.rescue_after
        done = offset = 0
        while offset < MAX_PER_ROUND:
            # Entries left alone (other tasks') keep their place, so page past them.
            tags = await redis.zrangebyscore(self.config.unacked_index_key, "-inf", cutoff,
                                             start=offset, num=BATCH)
            for tag in tags:
                if not isinstance(tag, bytes | str):
                    continue
                entry = await redis.hget(self.config.unacked_key, tag)
                if entry is not None and await self._rescue(redis, tag, entry):
                    done += 1
                    offset -= 1  # removed: the next page moves up by one
            offset += len(tags)
            if len(tags) < BATCH:
                break
        return done

    async def _rescue(self, redis: aioredis.Redis, tag: bytes | str, entry: bytes | str) -> bool:
        payload = _payload_of(entry)
        headers = payload.get("headers") if payload is not None else None
        task = headers.get("task") if isinstance(headers, dict) else None
        if payload is None or not isinstance(headers, dict) or not isinstance(task, str) \
                or task not in RESCUED_TASKS:
            return False  # not ours: the visibility timeout brings it back
        tries = int(await redis.hincrby(TRIES_KEY, tag, 1))
        await redis.expire(TRIES_KEY, TRIES_TTL_SECONDS)
        raw, decode = _body_of(payload)
        if tries > self.config.poison_tries:
            items = [unreadable(first_message_id(headers, raw), InvalidEvent(
                "poison_message", f"taken up {tries - 1} times without being committed "
                "(did it kill its worker?)"), raw)]
        else:
            items = message_events(headers, raw, decode, self.config.max_events)
        try:
            await self._accept(items)
        except Exception:
            await redis.hincrby(TRIES_KEY, tag, -1)  # a failure we saw is no crash
            raise
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.config.unacked_key, tag)
            pipe.zrem(self.config.unacked_index_key, tag)
            pipe.hdel(TRIES_KEY, tag)
            await pipe.execute()
        key = "poison_messages" if tries > self.config.poison_tries else "rescued_messages"
        self.stats[key] += 1
        log.warning("rescued message %s (%s, %d events): unacknowledged for over %.0fs, "
                    "its worker is presumably gone", headers.get("id"), headers.get("task"),
                    len(items), self.config.rescue_after)
        return True


def _payload_of(entry: bytes | str) -> dict[str, Any] | None:
    """Kombu stores `[message, exchange, routing_key]` as JSON."""
    try:
        value = json.loads(entry)
    except ValueError:
        return None
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]
    return None


def _body_of(payload: dict[str, Any]) -> tuple[bytes, Callable[[], Any]]:
    """The message body's bytes, and how to decode them as Celery would."""
    body = payload.get("body")
    raw = body.encode("utf-8", "replace") if isinstance(body, str) else b""
    properties = payload.get("properties")
    if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
        with contextlib.suppress(ValueError):  # if not base64, decoding fails and says so
            raw = base64.b64decode(raw, validate=True)

    def decode() -> Any:
        return decode_body(raw, payload.get("content-type"), payload.get("content-encoding"))

    return raw, decode
