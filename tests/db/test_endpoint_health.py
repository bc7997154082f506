"""Endpoint health on real SQLite and PostgreSQL databases: the circuit breaker (open, one
probe, close), the automatic disable, held deliveries, and what intake does with both.

Time is moved by hand: the store's clock (`utcnow` in worker.db.store and
worker.db.endpoint_records) is replaced by the `clock` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update

import worker.db.endpoint_records as endpoint_records_module
import worker.db.store as store_module
from worker.core.health import HealthChange, HealthEvent, HealthPolicy, disable_reason
from worker.core.models import (
    AttemptRecord,
    Delivery,
    Endpoint,
    ErrorKind,
    EventIn,
    HttpResult,
    Incoming,
    OutcomeKind,
)
from worker.core.outcome import decide
from worker.core.signing import generate_secret
from worker.db.connection import create_engine
from worker.db.schema import attempts, deliveries, endpoints
from worker.db.store import Store
from worker.delivery.intake import Intake, IntakeConfig
from worker.settings import Settings

COOLDOWN = 30.0
POLICY = HealthPolicy(breaker_failures=3, breaker_cooldown=COOLDOWN, disable_after=3600)
LEASE = 60.0
_ids = itertools.count(1)


class Clock:
    """The store's clock, standing still until advanced."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(datetime.now(UTC).replace(microsecond=123456))
    monkeypatch.setattr(store_module, "utcnow", c)
    monkeypatch.setattr(endpoint_records_module, "utcnow", c)
    return c


@pytest.fixture
async def second_store(store: Store, database_url: str) -> AsyncIterator[Callable[..., Store]]:
    """`second_store(policy)`: another Store over the same database, on an engine of its own
    (another worker process, as far as the database can tell)."""
    engines: list[Any] = []

    def make(policy: HealthPolicy = POLICY) -> Store:
        engine = create_engine(Settings(database_url=database_url))
        engines.append(engine)
        return Store(engine, store.keys, policy)

    try:
        yield make
    finally:
        for engine in engines:
            await engine.dispose()


def _hs(store: Store, policy: HealthPolicy = POLICY) -> Store:
    """The fixture's store with the health policy of these tests."""
    return Store(store.engine, store.keys, policy)


def _ep(endpoint_id: str, **kw: Any) -> Endpoint:
    kw.setdefault("url", f"https://example.com/{endpoint_id}")
    kw.setdefault("secrets", (generate_secret(),))
    return Endpoint(id=endpoint_id, **kw)


def _is_pg(store: Store) -> bool:
    return store.engine.dialect.name == "postgresql"


async def _put(store: Store, at: datetime, *rows: dict[str, Any]) -> None:
    """Delivery rows written as given; timestamps default to `at`, due at `at`."""
    base = {"endpoint_id": "ep-a", "event_type": None, "idempotency_key": None,
            "payload": b"{}", "status": "pending", "attempts": 0, "next_attempt_at": at,
            "locked_until": None, "last_status_code": None, "last_error": None,
            "created_at": at, "updated_at": at}
    async with store.engine.begin() as conn:
        await conn.execute(insert(deliveries), [{**base, **r} for r in rows])


async def _all(store: Store) -> dict[str, Any]:
    async with store.engine.connect() as conn:
        return {r.id: r for r in await conn.execute(select(deliveries))}


async def _endpoint_row(store: Store, endpoint_id: str) -> Any:
    async with store.engine.connect() as conn:
        return (await conn.execute(select(endpoints)
                                   .where(endpoints.c.id == endpoint_id))).one()


async def _health(store: Store, endpoint_id: str) -> tuple[Any, ...]:
    row = await _endpoint_row(store, endpoint_id)
    return row.failure_streak, row.failing_since, row.circuit_open_until


def _delivery(endpoint_id: str, attempts_made: int = 0, delivery_id: str | None = None
              ) -> Delivery:
    return Delivery(id=delivery_id or f"x{next(_ids)}", endpoint_id=endpoint_id,
                    url=f"https://example.com/{endpoint_id}", secrets=(), payload=b"{}",
                    attempts=attempts_made)


def _answer(delivery: Delivery, at: datetime, status: int | None = 500,
            error_kind: ErrorKind | None = None, error: str | None = None) -> AttemptRecord:
    return decide(delivery, HttpResult(status_code=status, error_kind=error_kind, error=error,
                                       duration_ms=1),
                  attempted_at=at, schedule=(1.0, 1.0, 1.0), jitter=0, rand=0.5,
                  max_retry_after=60)


def _fail(endpoint_id: str, at: datetime, status: int = 500) -> AttemptRecord:
    return _answer(_delivery(endpoint_id), at, status)


def _ok(endpoint_id: str, at: datetime) -> AttemptRecord:
    return _answer(_delivery(endpoint_id), at, 200)


def _ours(endpoint_id: str, at: datetime, kind: ErrorKind = ErrorKind.CREDENTIALS
          ) -> AttemptRecord:
    """A failure on our side: the secrets could not be opened or parsed."""
    return _answer(_delivery(endpoint_id), at, None, kind, f"{kind.value}: no usable secret")


async def _open_circuit(hs: Store, clock: Clock, endpoint_id: str = "ep-a") -> datetime:
    """Three failures, one second apart; returns when the circuit may be probed."""
    changes: list[HealthChange] = []
    for n in range(POLICY.breaker_failures):
        if n:
            clock.advance(1)
        changes += await hs.record_attempts([_fail(endpoint_id, clock.now)])
    until = clock.now + timedelta(seconds=COOLDOWN)
    assert changes == [HealthChange(endpoint_id, HealthEvent.OPENED, until=until,
                                    reason="HTTP 500")]
    return until


# -- opening the circuit --------------------------------------------------------------------


async def test_breaker_opens_after_n_consecutive_failures(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    await hs.add_endpoint(_ep("ep-b"))
    t0 = clock.now
    assert await hs.record_attempts([_fail("ep-a", t0)]) == []
    assert await _health(hs, "ep-a") == (1, t0, None)
    clock.advance(1)
    assert await hs.record_attempts([_fail("ep-a", clock.now, 503)]) == []
    assert await _health(hs, "ep-a") == (2, t0, None)  # failing since the first failure
    t2 = clock.advance(1)
    changes = await hs.record_attempts([_fail("ep-a", t2, 502)])
    until = t2 + timedelta(seconds=COOLDOWN)
    assert changes == [HealthChange("ep-a", HealthEvent.OPENED, until=until, reason="HTTP 502")]
    assert await _health(hs, "ep-a") == (3, t0, until)
    ep = await hs.get_endpoint("ep-a")
    assert (ep.failure_streak, ep.failing_since, ep.circuit_open_until) == (3, t0, until)
    assert ep.enabled is True
    assert await _health(hs, "ep-b") == (0, None, None)


async def test_one_batch_of_n_failures_opens_once(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    for name in ("ep-a", "ep-b", "ep-c"):
        await hs.add_endpoint(_ep(name))
    t0 = clock.now
    batch = [_fail("ep-a", t0 + timedelta(seconds=n), 500 + n) for n in range(3)]
    batch += [_fail("ep-b", t0), _fail("ep-b", t0), _ok("ep-c", t0)]
    changes = await hs.record_attempts(batch)
    until = t0 + timedelta(seconds=COOLDOWN)
    assert changes == [HealthChange("ep-a", HealthEvent.OPENED, until=until, reason="HTTP 502")]
    assert await _health(hs, "ep-a") == (3, t0, until)
    assert await _health(hs, "ep-b") == (2, t0, None)
    assert await _health(hs, "ep-c") == (0, None, None)


async def test_the_settings_policy_applies_to_the_fixture_store(store: Store, clock: Clock) -> None:
    await store.add_endpoint(_ep("ep-a"))
    n = store.health.breaker_failures  # the fixture's store: the settings' policy (5)
    assert n > 1
    assert await store.record_attempts([_fail("ep-a", clock.now) for _ in range(n - 1)]) == []
    changes = await store.record_attempts([_fail("ep-a", clock.now)])
    assert [c.event for c in changes] == [HealthEvent.OPENED]
    assert changes[0].until == clock.now + timedelta(seconds=store.health.breaker_cooldown)


async def test_an_open_circuits_deliveries_are_not_claimed_but_others_are(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    await hs.add_endpoint(_ep("ep-b"))
    until = await _open_circuit(hs, clock)
    now = clock.now
    await _put(hs, now, *({"id": f"a{n}", "next_attempt_at": now - timedelta(seconds=10 - n)}
                          for n in range(3)),
               {"id": "b1", "endpoint_id": "ep-b", "next_attempt_at": now - timedelta(seconds=5)})
    before = await _all(hs)

    ready, dead = await hs.claim_due(10, LEASE)
    assert ([d.id for d in ready], dead) == (["b1"], 0)
    # Cool-down not over yet (to the microsecond): still nothing of ep-a.
    clock.now = until - timedelta(microseconds=1)
    assert await hs.claim_due(10, LEASE) == ([], 0)
    rows = await _all(hs)
    for n in range(3):
        row, was = rows[f"a{n}"], before[f"a{n}"]
        assert (row.status, row.attempts, row.locked_until) == ("pending", 0, None)
        assert row.next_attempt_at == was.next_attempt_at
    assert await _health(hs, "ep-a") == (3, (await hs.get_endpoint("ep-a")).failing_since, until)


# -- the probe ------------------------------------------------------------------------------


async def test_after_the_cool_down_one_claim_gets_one_probe_the_rest_wait(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    await hs.add_endpoint(_ep("ep-b"))
    until = await _open_circuit(hs, clock)
    now = clock.now
    await _put(hs, now, *({"id": f"a{n}", "next_attempt_at": now - timedelta(seconds=10 - n)}
                          for n in range(4)),
               {"id": "b1", "endpoint_id": "ep-b"})
    t = clock.now = until  # the cool-down ends exactly now
    ready, dead = await hs.claim_due(10, LEASE)
    assert dead == 0
    assert sorted(d.id for d in ready) == ["a0", "b1"]  # the probe is the one due first
    probe = next(d for d in ready if d.id == "a0")
    assert probe.secrets and probe.lease_until == (t + timedelta(seconds=LEASE)).timestamp()
    reopened = t + timedelta(seconds=COOLDOWN)
    assert (await _health(hs, "ep-a"))[2] == reopened
    rows = await _all(hs)
    assert rows["a0"].locked_until == t + timedelta(seconds=LEASE)
    for n in (1, 2, 3):
        row = rows[f"a{n}"]
        assert (row.status, row.attempts, row.locked_until) == ("pending", 0, None)
        assert row.next_attempt_at == reopened
    # Nothing more of ep-a until the probe's verdict (or the next cool-down).
    assert await hs.claim_due(10, LEASE) == ([], 0)
    clock.now = reopened - timedelta(microseconds=1)
    assert await hs.claim_due(10, LEASE) == ([], 0)


async def test_each_circuit_past_its_cool_down_gets_its_own_probe(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    for name in ("ep-a", "ep-b"):
        await hs.add_endpoint(_ep(name))
    await _open_circuit(hs, clock, "ep-a")
    until = await _open_circuit(hs, clock, "ep-b")
    now = clock.now
    await _put(hs, now, *({"id": f"{e}{n}", "endpoint_id": f"ep-{e}"}
                          for e in "ab" for n in range(3)))
    clock.now = until
    ready, _ = await hs.claim_due(10, LEASE)
    assert sorted(d.endpoint_id for d in ready) == ["ep-a", "ep-b"]


async def test_two_claimers_after_the_cool_down_hand_out_exactly_one_probe(
        store: Store, clock: Clock, second_store: Callable[..., Store]) -> None:
    a, b = second_store(), second_store()
    await a.add_endpoint(_ep("ep-a"))
    await a.add_endpoint(_ep("ep-b"))
    until = await _open_circuit(a, clock)
    now = clock.now
    await _put(a, now, *({"id": f"a{n}", "next_attempt_at": now - timedelta(seconds=10 - n)}
                         for n in range(4)),
               *({"id": f"b{n}", "endpoint_id": "ep-b"} for n in range(3)))
    t = clock.now = until
    if _is_pg(a):
        results = await asyncio.gather(a.claim_due(10, LEASE), b.claim_due(10, LEASE))
    else:
        results = [await a.claim_due(10, LEASE), await b.claim_due(10, LEASE)]
    ready = [d for r, _ in results for d in r]
    assert all(dead == 0 for _, dead in results)
    probes = [d for d in ready if d.endpoint_id == "ep-a"]
    assert len(probes) == 1
    assert sorted(d.id for d in ready if d.endpoint_id == "ep-b") == ["b0", "b1", "b2"]
    reopened = t + timedelta(seconds=COOLDOWN)
    assert (await _health(a, "ep-a"))[2] == reopened
    rows = await _all(a)
    for n in range(4):
        row = rows[f"a{n}"]
        assert (row.status, row.attempts) == ("pending", 0)
        if row.id == probes[0].id:
            assert row.locked_until == t + timedelta(seconds=LEASE)
        else:
            assert (row.locked_until, row.next_attempt_at) == (None, reopened)
    assert await a.claim_due(10, LEASE) == ([], 0)
    assert await b.claim_due(10, LEASE) == ([], 0)


async def test_two_claimers_holding_the_same_stale_circuit_only_one_wins(
        store: Store, clock: Clock, second_store: Callable[..., Store]) -> None:
    """Both claimers have leased deliveries of the endpoint and read its circuit before either
    takes the probe: the compare-and-set lets exactly one of them through."""
    a, b = second_store(), second_store()
    await a.add_endpoint(_ep("ep-a"))
    until = await _open_circuit(a, clock)
    now = clock.now
    await _put(a, now, *({"id": f"a{n}", "next_attempt_at": now - timedelta(seconds=10 - n)}
                         for n in range(4)))
    t = clock.now = until
    barrier = asyncio.Barrier(2)
    tries: list[tuple[str, datetime | None, bool]] = []

    def gate(name: str, claimer: Store) -> None:
        real = claimer._win_probe

        async def win_probe(ep: Endpoint, at: datetime) -> bool:
            await asyncio.wait_for(barrier.wait(), 20)  # both have read the circuit
            won = await real(ep, at)
            tries.append((name, ep.circuit_open_until, won))
            return won

        claimer._win_probe = win_probe  # type: ignore[method-assign]

    gate("a", a)
    gate("b", b)
    (ready_a, _), (ready_b, _) = await asyncio.gather(a.claim_due(2, LEASE),
                                                      b.claim_due(2, LEASE))
    assert len(tries) == 2
    assert {until_seen for _, until_seen, _ in tries} == {until}  # the same snapshot
    assert sorted(won for _, _, won in tries) == [False, True]
    assert len(ready_a) + len(ready_b) == 1
    reopened = t + timedelta(seconds=COOLDOWN)
    rows = await _all(a)
    waiting = [r for r in rows.values() if r.locked_until is None]
    assert len(waiting) == 3
    assert {r.next_attempt_at for r in waiting} == {reopened}


async def test_probe_success_closes_and_the_waiting_deliveries_are_due_now(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    await hs.add_endpoint(_ep("ep-b"))
    until = await _open_circuit(hs, clock)
    now = clock.now
    await _put(hs, now, *({"id": f"a{n}", "next_attempt_at": now - timedelta(seconds=10 - n)}
                          for n in range(4)),
               {"id": "b-later", "endpoint_id": "ep-b",
                "next_attempt_at": now + timedelta(hours=1)})
    clock.now = until
    (probe,), _ = await hs.claim_due(10, LEASE)
    # An ep-a delivery some other worker holds in flight, due again later.
    in_flight_lease = until + timedelta(seconds=LEASE)
    await _put(hs, until, {"id": "a-in-flight", "locked_until": in_flight_lease,
                           "next_attempt_at": until + timedelta(hours=2)})
    t = clock.advance(5)

    changes = await hs.record_attempts([_answer(probe, t, 204)])
    assert changes == [HealthChange("ep-a", HealthEvent.CLOSED)]
    assert await _health(hs, "ep-a") == (0, None, None)
    rows = await _all(hs)
    assert rows[probe.id].status == "succeeded"
    for n in (1, 2, 3):
        assert (rows[f"a{n}"].next_attempt_at, rows[f"a{n}"].locked_until) == (t, None)
    # Neither a leased delivery nor another endpoint's is moved.
    assert rows["a-in-flight"].next_attempt_at == until + timedelta(hours=2)
    assert rows["a-in-flight"].locked_until == in_flight_lease
    assert rows["b-later"].next_attempt_at == now + timedelta(hours=1)
    ready, _ = await hs.claim_due(10, LEASE)
    assert sorted(d.id for d in ready) == ["a1", "a2", "a3"]
    # Closed means closed: a second success reports nothing more.
    assert await hs.record_attempts([_ok("ep-a", t)]) == []


async def test_closing_keeps_a_retry_that_is_due_later_of_its_own(
        store: Store, clock: Clock) -> None:
    """Only what the circuit held back (parked at its open_until) goes at once on close; a
    retry with its own later time (a schedule step, a receiver's Retry-After) keeps it."""
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    until = await _open_circuit(hs, clock)
    now = clock.now
    await _put(hs, now, {"id": "a-waits-1", "next_attempt_at": now - timedelta(seconds=2)},
               {"id": "a-waits-2", "next_attempt_at": now - timedelta(seconds=1)})
    clock.now = until
    (probe,), _ = await hs.claim_due(10, LEASE)  # one probe; the other waits behind it
    assert probe.id == "a-waits-1"
    await _put(hs, until, {"id": "a-retry-after", "next_attempt_at": until + timedelta(seconds=3)})
    t = clock.advance(1)
    await hs.record_attempts([_answer(probe, t, 204)])
    rows = await _all(hs)
    assert rows["a-retry-after"].next_attempt_at == until + timedelta(seconds=3)
    assert rows["a-waits-2"].next_attempt_at == t  # held back by the circuit: goes at once


async def test_probe_failure_reopens_the_circuit(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    t0 = clock.now
    until = await _open_circuit(hs, clock)
    await _put(hs, clock.now, *({"id": f"a{n}"} for n in range(3)))
    clock.now = until
    (probe,), _ = await hs.claim_due(10, LEASE)
    waiting_until = until + timedelta(seconds=COOLDOWN)
    t = clock.advance(5)

    changes = await hs.record_attempts([_answer(probe, t, 503)])
    reopened = t + timedelta(seconds=COOLDOWN)
    assert changes == [HealthChange("ep-a", HealthEvent.OPENED, until=reopened,
                                    reason="HTTP 503")]
    assert await _health(hs, "ep-a") == (4, t0, reopened)
    rows = await _all(hs)
    assert (rows[probe.id].status, rows[probe.id].attempts) == ("pending", 1)
    # The others stay behind the circuit, even once their own due time has passed.
    clock.now = waiting_until
    assert await hs.claim_due(10, LEASE) == ([], 0)
    clock.now = reopened
    ready, _ = await hs.claim_due(10, LEASE)
    assert len(ready) == 1


async def test_a_success_in_between_resets_the_streak(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    t = clock.now
    assert await hs.record_attempts([_fail("ep-a", t), _fail("ep-a", t)]) == []
    assert await hs.record_attempts([_ok("ep-a", clock.advance(1))]) == []  # nothing to close
    assert await _health(hs, "ep-a") == (0, None, None)
    t1 = clock.advance(1)
    assert await hs.record_attempts([_fail("ep-a", t1)]) == []
    assert await hs.record_attempts([_fail("ep-a", clock.advance(1))]) == []
    assert await _health(hs, "ep-a") == (2, t1, None)  # failing since after the success
    changes = await hs.record_attempts([_fail("ep-a", clock.advance(1))])
    assert [c.event for c in changes] == [HealthEvent.OPENED]


async def test_a_success_inside_a_batch_resets_the_streak_first(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    await hs.add_endpoint(_ep("ep-b"))
    t = clock.now
    await hs.record_attempts([_fail("ep-a", t), _fail("ep-a", t),
                              _fail("ep-b", t), _fail("ep-b", t)])
    s = timedelta(seconds=1)
    # ep-a: fail, success, fail -> one failure counted, failing since the last one.
    # ep-b: success, then three failures -> reset, then three: the circuit opens.
    changes = await hs.record_attempts([
        _fail("ep-a", t + s), _ok("ep-a", t + 2 * s), _fail("ep-a", t + 3 * s),
        _ok("ep-b", t + s), _fail("ep-b", t + 2 * s), _fail("ep-b", t + 3 * s),
        _fail("ep-b", t + 4 * s)])
    assert await _health(hs, "ep-a") == (1, t + 3 * s, None)
    until = clock.now + timedelta(seconds=COOLDOWN)
    assert changes == [HealthChange("ep-b", HealthEvent.OPENED, until=until, reason="HTTP 500")]
    assert await _health(hs, "ep-b") == (3, t + 2 * s, until)


async def test_concurrent_records_add_up(store: Store, clock: Clock,
                                         second_store: Callable[..., Store]) -> None:
    """Six workers each record one failure at once: the streak is six, and only the batches
    that took it to the threshold or past it report the circuit opening."""
    a, b = second_store(), second_store()
    await a.add_endpoint(_ep("ep-a"))
    t0 = clock.now
    calls: list[Awaitable[list[HealthChange]]] = [
        (a if n % 2 else b).record_attempts([_fail("ep-a", t0 + timedelta(seconds=n))])
        for n in range(6)]
    if _is_pg(a):
        results = await asyncio.gather(*calls)
    else:
        results = [await call for call in calls]
    streak, failing_since, open_until = await _health(a, "ep-a")
    assert (streak, open_until) == (6, clock.now + timedelta(seconds=COOLDOWN))
    # The earliest failure, whichever batch committed first.
    assert t0 <= failing_since <= t0 + timedelta(seconds=5)
    opened = [c for r in results for c in r]
    assert [c.event for c in opened] == [HealthEvent.OPENED] * (6 - (POLICY.breaker_failures - 1))
    async with a.engine.connect() as conn:
        assert len(list(await conn.execute(select(attempts)))) == 6


async def test_failing_since_is_the_earliest_failure_whatever_the_write_order(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    t0 = clock.now
    await hs.record_attempts([_fail("ep-a", t0 + timedelta(seconds=5))])  # written first
    await hs.record_attempts([_fail("ep-a", t0)])  # attempted first, written late
    assert (await _health(hs, "ep-a"))[:2] == (2, t0)


async def test_concurrent_batches_of_two_open_once(store: Store, clock: Clock,
                                                   second_store: Callable[..., Store]) -> None:
    a, b = second_store(), second_store()
    await a.add_endpoint(_ep("ep-a"))
    t0 = clock.now
    batches = [[_fail("ep-a", t0), _fail("ep-a", t0)] for _ in range(2)]
    if _is_pg(a):
        results = await asyncio.gather(a.record_attempts(batches[0]),
                                       b.record_attempts(batches[1]))
    else:
        results = [await a.record_attempts(batches[0]), await b.record_attempts(batches[1])]
    assert (await _health(a, "ep-a"))[0] == 4
    assert sorted(len(r) for r in results) == [0, 1]  # 0 -> 2 says nothing, 2 -> 4 opens


async def test_crossing_batches_do_not_deadlock(store: Store, clock: Clock,
                                                second_store: Callable[..., Store]) -> None:
    """Two workers recording crossing batches (success on A + failure on B, and the reverse)
    at the same moment: both land. Without one sorted lock pass over the endpoint rows,
    PostgreSQL detected a deadlock here and one write failed."""
    a, b = second_store(), second_store()
    if not _is_pg(a):
        pytest.skip("SQLite has one writer: the second batch waits for the whole first one")
    await a.add_endpoint(_ep("ep-a"))
    await a.add_endpoint(_ep("ep-b"))
    t = clock.now
    await a.record_attempts([_fail("ep-a", t), _fail("ep-b", t)])  # both streaks at 1
    arrived = {"a": asyncio.Event(), "b": asyncio.Event()}

    def gate(claimer: Store, me: str, other: str) -> None:
        real = claimer._add_failures

        async def add_failures(*args: Any) -> list[HealthChange]:
            # Here each transaction has updated its recovered endpoint. Wait (briefly) for the
            # other to get here too: without the sorted lock pass both do, each holding the
            # row the other needs next; with it, the other is still waiting for its locks,
            # so this one goes on alone after the pause and commits.
            arrived[me].set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived[other].wait(), 2)
            return await real(*args)

        claimer._add_failures = add_failures  # type: ignore[method-assign]

    gate(a, "a", "b")
    gate(b, "b", "a")
    later = t + timedelta(seconds=1)
    results = await asyncio.gather(
        a.record_attempts([_ok("ep-b", later), _fail("ep-a", later)]),
        b.record_attempts([_ok("ep-a", later), _fail("ep-b", later)]),
        return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []


# -- failures that are not the endpoint's -------------------------------------------------


@pytest.mark.parametrize("kind", [ErrorKind.CREDENTIALS, ErrorKind.INVALID_SECRET])
async def test_failures_on_our_side_do_not_count(store: Store, clock: Clock,
                                                 kind: ErrorKind) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    records = [_ours("ep-a", clock.now, kind) for _ in range(5)]
    expected = OutcomeKind.RETRY if kind is ErrorKind.CREDENTIALS else OutcomeKind.FAILED
    assert {r.outcome.kind for r in records} == {expected}
    assert {r.outcome.error_kind for r in records} == {kind}
    assert await hs.record_attempts(records) == []
    assert await _health(hs, "ep-a") == (0, None, None)
    async with hs.engine.connect() as conn:  # the attempts themselves are recorded
        assert len(list(await conn.execute(select(attempts)))) == 5
    # ...and they do not break a run of real failures either.
    t = clock.now
    await hs.record_attempts([_fail("ep-a", t), _fail("ep-a", t)])
    assert await hs.record_attempts([_ours("ep-a", t, kind)]) == []
    assert (await _health(hs, "ep-a"))[0] == 2
    changes = await hs.record_attempts([_ours("ep-a", t, kind), _fail("ep-a", t)])
    assert [c.event for c in changes] == [HealthEvent.OPENED]


async def test_failures_on_our_side_never_disable(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    long_ago = clock.now - timedelta(days=30)
    assert await hs.record_attempts([_ours("ep-a", long_ago) for _ in range(3)]) == []
    ep = await hs.get_endpoint("ep-a")
    assert (ep.enabled, ep.failure_streak, ep.failing_since) == (True, 0, None)


# -- disabling ------------------------------------------------------------------------------


async def test_disabled_automatically_after_disable_after(store: Store, clock: Clock) -> None:
    hs = _hs(store, HealthPolicy(breaker_failures=100, breaker_cooldown=COOLDOWN,
                                 disable_after=3600))
    await hs.add_endpoint(_ep("ep-a"))
    await hs.add_endpoint(_ep("ep-b"))
    t0 = clock.now
    assert await hs.record_attempts([_fail("ep-a", t0)]) == []
    assert await hs.record_attempts([_fail("ep-a", clock.advance(3599))]) == []
    assert await hs.record_attempts([_fail("ep-b", clock.now)]) == []
    assert (await hs.get_endpoint("ep-a")).enabled is True
    t = clock.advance(1)  # failing for exactly disable_after
    changes = await hs.record_attempts([_fail("ep-a", t, 503), _fail("ep-b", t)])
    reason = disable_reason(t0, 3, "HTTP 503")
    assert changes == [HealthChange("ep-a", HealthEvent.DISABLED, reason=reason)]
    assert "failures since " + t0.isoformat(timespec="seconds") in reason
    assert "3 in a row" in reason and "HTTP 503" in reason
    ep = await hs.get_endpoint("ep-a")
    assert (ep.enabled, ep.disabled_reason) == (False, reason)
    assert (ep.failure_streak, ep.failing_since) == (3, t0)
    assert (await hs.get_endpoint("ep-b")).enabled is True  # failing for only a second
    # Disabled once: later failures say nothing more.
    assert await hs.record_attempts([_fail("ep-a", clock.advance(10))]) == []
    assert (await hs.get_endpoint("ep-a")).disabled_reason == reason


async def test_failing_since_is_when_the_first_failure_was_attempted(
        store: Store, clock: Clock) -> None:
    """A batch written late still counts from its attempts: here they are over an hour old, so
    the one write both opens the circuit and disables."""
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    first = clock.now - timedelta(seconds=3700)
    records = [_fail("ep-a", first + timedelta(seconds=n)) for n in range(3)]
    changes = await hs.record_attempts(records)
    assert [c.event for c in changes] == [HealthEvent.OPENED, HealthEvent.DISABLED]
    assert changes[1].reason == disable_reason(first, 3, "HTTP 500")
    assert (await hs.get_endpoint("ep-a")).enabled is False


async def test_a_success_restarts_the_disable_clock(store: Store, clock: Clock) -> None:
    hs = _hs(store, HealthPolicy(breaker_failures=100, disable_after=3600))
    await hs.add_endpoint(_ep("ep-a"))
    t0 = clock.now
    await hs.record_attempts([_fail("ep-a", t0)])
    await hs.record_attempts([_ok("ep-a", clock.advance(1800))])
    t1 = clock.advance(1200)
    await hs.record_attempts([_fail("ep-a", t1)])
    assert await hs.record_attempts([_fail("ep-a", clock.advance(1000))]) == []  # 4000 s on
    ep = await hs.get_endpoint("ep-a")
    assert (ep.enabled, ep.failing_since, ep.failure_streak) == (True, t1, 2)


async def test_gone_disables_without_counting_as_a_failure(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    await _put(hs, clock.now, {"id": "a1"})
    (d,), _ = await hs.claim_due(10, LEASE)
    record = _answer(d, clock.now, 410)
    assert record.outcome.kind is OutcomeKind.DISABLE
    changes = await hs.record_attempts([record])
    assert len(changes) == 1
    assert (changes[0].endpoint_id, changes[0].event) == ("ep-a", HealthEvent.DISABLED)
    assert changes[0].reason and "410" in changes[0].reason
    ep = await hs.get_endpoint("ep-a")
    assert (ep.enabled, ep.disabled_reason) == (False, changes[0].reason)
    assert await _health(hs, "ep-a") == (0, None, None)
    assert (await _all(hs))["a1"].status == "failed"


async def test_gone_from_a_deleted_endpoint_reports_nothing(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    assert await hs.record_attempts([_answer(_delivery("ep-deleted"), clock.now, 410)]) == []


async def test_a_disabled_endpoints_deliveries_are_held_on_claim(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    await hs.add_endpoint(_ep("ep-b"))
    await hs.record_attempts([_fail("ep-a", clock.now - timedelta(hours=2))])
    assert (await hs.get_endpoint("ep-a")).enabled is False
    await _put(hs, clock.now, {"id": "a1"}, {"id": "a2"}, {"id": "b1", "endpoint_id": "ep-b"})
    ready, dead = await hs.claim_due(10, LEASE)
    assert ([d.id for d in ready], dead) == (["b1"], 0)
    rows = await _all(hs)
    for row_id in ("a1", "a2"):
        row = rows[row_id]
        assert (row.status, row.next_attempt_at, row.locked_until, row.attempts) == (
            "held", None, None, 0)
        assert "endpoint disabled: disabled automatically" in row.last_error
    assert await hs.claim_due(10, LEASE) == ([], 0)


async def test_a_disabled_endpoint_spends_no_probe(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    until = await _open_circuit(hs, clock)
    await hs.set_endpoint_enabled("ep-a", False, "by ops")
    await _put(hs, clock.now, {"id": "a1"}, {"id": "a2"})
    clock.now = until + timedelta(seconds=1)
    assert await hs.claim_due(10, LEASE) == ([], 0)
    assert (await _health(hs, "ep-a"))[2] == until  # no probe taken
    assert {r.status for r in (await _all(hs)).values()} == {"held"}


async def test_disabling_by_hand_keeps_the_health_record(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    until = await _open_circuit(hs, clock)
    health = await _health(hs, "ep-a")
    assert await hs.set_endpoint_enabled("ep-a", False, "maintenance") == 0
    assert await _health(hs, "ep-a") == health
    assert health[2] == until


async def test_enabling_resumes_held_deliveries_and_clears_health(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    for name in ("ep-a", "ep-c"):
        await hs.add_endpoint(_ep(name))
    first = clock.now - timedelta(hours=2)
    await hs.record_attempts([_fail("ep-a", first + timedelta(seconds=n)) for n in range(3)])
    await hs.set_endpoint_enabled("ep-c", False, "by ops")
    await _put(hs, clock.now, {"id": "a1"}, {"id": "a2"}, {"id": "c1", "endpoint_id": "ep-c"},
               {"id": "a-done", "status": "succeeded", "next_attempt_at": None},
               {"id": "a-dead", "status": "failed", "next_attempt_at": None})
    assert (await hs.get_endpoint("ep-a")).circuit_open_until is not None
    # Held while disabled: once the circuit's cool-down is over, the claim holds them.
    clock.advance(COOLDOWN)
    assert await hs.claim_due(10, LEASE) == ([], 0)
    assert {i: r.status for i, r in (await _all(hs)).items()} == {
        "a1": "held", "a2": "held", "c1": "held", "a-done": "succeeded", "a-dead": "failed"}

    t = clock.advance(60)
    assert await hs.set_endpoint_enabled("ep-a", True) == 2
    ep = await hs.get_endpoint("ep-a")
    assert (ep.enabled, ep.disabled_reason) == (True, None)
    assert (ep.failure_streak, ep.failing_since, ep.circuit_open_until) == (0, None, None)
    rows = await _all(hs)
    for row_id in ("a1", "a2"):
        assert (rows[row_id].status, rows[row_id].next_attempt_at,
                rows[row_id].locked_until) == ("pending", t, None)
    assert rows["c1"].status == "held"  # another endpoint's stay held
    assert (rows["a-done"].status, rows["a-dead"].status) == ("succeeded", "failed")
    ready, _ = await hs.claim_due(10, LEASE)
    assert sorted(d.id for d in ready) == ["a1", "a2"]  # no circuit left: no probe limit
    # Enabled again with a clean record: it takes three new failures to open again.
    assert await hs.record_attempts([_fail("ep-a", t), _fail("ep-a", t)]) == []


async def test_a_health_update_for_a_deleted_endpoint_is_ignored(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    await hs.delete_endpoint("ep-a")
    assert await hs.record_attempts([_fail("ep-gone", clock.now) for _ in range(5)]) == []
    assert await hs.record_attempts([_ok("ep-a", clock.now)]) == []
    async with hs.engine.connect() as conn:
        assert list(await conn.execute(select(endpoints))) == []


async def test_an_endpoint_row_sees_its_health_as_written(store: Store, clock: Clock) -> None:
    """The health columns come back exactly (aware, to the microsecond) on both backends."""
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    when = datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with hs.engine.begin() as conn:
        await conn.execute(update(endpoints).where(endpoints.c.id == "ep-a").values(
            failure_streak=7, failing_since=when, circuit_open_until=when))
    ep = await hs.get_endpoint("ep-a")
    assert (ep.failure_streak, ep.failing_since, ep.circuit_open_until) == (7, when, when)
    assert ep.failing_since is not None and ep.failing_since.tzinfo is not None


# -- intake ---------------------------------------------------------------------------------


class _Scheduler:
    """Takes whatever intake hands over, and remembers it."""

    def __init__(self) -> None:
        self.submitted: list[Delivery] = []

    async def wait_for_room(self, count: int, seconds: float) -> bool:
        return True

    def submit(self, batch: list[Delivery]) -> None:
        self.submitted.extend(batch)


class _IntakeClock:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def now(self) -> datetime:
        return self._clock.now

    def time(self) -> float:
        return self._clock.now.timestamp()

    def monotonic(self) -> float:
        return self._clock.now.timestamp()


def _intake(store: Store, clock: Clock) -> tuple[Intake, _Scheduler]:
    scheduler = _Scheduler()
    config = IntakeConfig(max_payload_bytes=65536, accept_timeout=10, lease_seconds=LEASE,
                          idempotency_window=3600)
    return Intake(config, store, scheduler, clock=_IntakeClock(clock)), scheduler  # type: ignore[arg-type]


async def test_intake_holds_events_for_a_disabled_endpoint(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-off"))
    await hs.add_endpoint(_ep("ep-on"))
    await hs.set_endpoint_enabled("ep-off", False, "receiver retired")
    intake, scheduler = _intake(hs, clock)
    report = await intake.accept([Incoming("t1:0", EventIn("ep-off", {"n": 1})),
                                  Incoming("t2:0", EventIn("ep-on", {"n": 2})),
                                  Incoming("t3:0", EventIn("nope", {"n": 3}))])
    assert len(report.accepted) == 2
    assert [r.code for r in report.rejected] == ["unknown_endpoint"]
    assert [d.endpoint_id for d in scheduler.submitted] == ["ep-on"]
    rows = {r.endpoint_id: r for r in (await _all(hs)).values()}
    held = rows["ep-off"]
    assert (held.status, held.next_attempt_at, held.locked_until) == ("held", None, None)
    assert "receiver retired" in held.last_error
    assert rows["ep-on"].status == "pending" and rows["ep-on"].locked_until is not None
    # Enabling sends it.
    assert await hs.set_endpoint_enabled("ep-off", True) == 1
    ready, _ = await hs.claim_due(10, LEASE)
    assert [d.endpoint_id for d in ready] == ["ep-off"]


async def test_intake_leaves_events_for_an_open_circuit_to_it(store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    until = await _open_circuit(hs, clock)
    intake, scheduler = _intake(hs, clock)
    report = await intake.accept([Incoming(f"t{n}:0", EventIn("ep-a", {"n": n}))
                                  for n in range(3)])
    assert len(report.accepted) == 3 and report.rejected == []
    assert scheduler.submitted == []
    for row in (await _all(hs)).values():
        assert (row.status, row.locked_until, row.next_attempt_at, row.attempts) == (
            "pending", None, until, 0)
    assert await hs.claim_due(10, LEASE) == ([], 0)
    clock.now = until
    ready, _ = await hs.claim_due(10, LEASE)
    assert len(ready) == 1  # one probe


async def test_intake_for_a_circuit_past_its_cool_down_is_due_now_not_sent(
        store: Store, clock: Clock) -> None:
    hs = _hs(store)
    await hs.add_endpoint(_ep("ep-a"))
    until = await _open_circuit(hs, clock)
    t = clock.now = until + timedelta(seconds=5)
    intake, scheduler = _intake(hs, clock)
    await intake.accept([Incoming(f"t{n}:0", EventIn("ep-a", {"n": n})) for n in range(2)])
    assert scheduler.submitted == []
    assert {(r.next_attempt_at, r.locked_until) for r in (await _all(hs)).values()} == {(t, None)}
