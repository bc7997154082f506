"""worker.db.store.Store against real SQLite and PostgreSQL databases (the `store` fixture)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update

from worker.core.errors import EndpointNotFound, InvalidEndpoint, InvalidSecret
from worker.core.models import (
    AttemptRecord,
    Delivery,
    Endpoint,
    HttpResult,
    Rejection,
)
from worker.core.outcome import decide
from worker.core.signing import generate_secret
from worker.db.connection import create_engine
from worker.db.schema import attempts, deliveries, endpoints
from worker.db.store import Store
from worker.settings import Settings

WINDOW = timedelta(hours=1)


def _now() -> datetime:
    return datetime.now(UTC)


def _ep(endpoint_id: str, **kw: Any) -> Endpoint:
    kw.setdefault("url", f"https://example.com/{endpoint_id}")
    kw.setdefault("secrets", (generate_secret(),))
    return Endpoint(id=endpoint_id, **kw)


def _row(row_id: str, endpoint_id: str = "ep-a", key: str | None = None,
         payload: bytes = b'{"n":1}', event_type: str | None = "order.created") -> dict[str, Any]:
    return {"id": row_id, "endpoint_id": endpoint_id, "event_type": event_type,
            "idempotency_key": key, "payload": payload}


async def _intake(store: Store, rows: list[dict[str, Any]],
                  rejections: list[tuple[str, Rejection]] | None = None,
                  lease: float = 60.0) -> set[str]:
    now = _now()
    return await store.insert_intake(rows, rejections or [],
                                     lease_until=now + timedelta(seconds=lease),
                                     idempotency_cutoff=now - WINDOW)


async def _put(store: Store, *rows: dict[str, Any]) -> None:
    """Delivery rows written as given (explicit timestamps), bypassing intake."""
    now = _now()
    base = {"endpoint_id": "ep-a", "event_type": None, "idempotency_key": None,
            "payload": b"{}", "status": "pending", "attempts": 0, "next_attempt_at": now,
            "locked_until": None, "last_status_code": None, "last_error": None,
            "created_at": now, "updated_at": now}
    async with store.engine.begin() as conn:
        await conn.execute(insert(deliveries), [{**base, **r} for r in rows])


async def _delivery(store: Store, row_id: str) -> Any:
    async with store.engine.connect() as conn:
        return (await conn.execute(select(deliveries).where(deliveries.c.id == row_id))).one()


async def _all(store: Store) -> dict[str, Any]:
    async with store.engine.connect() as conn:
        return {r.id: r for r in await conn.execute(select(deliveries))}


async def _attempts(store: Store, delivery_id: str | None = None) -> list[Any]:
    q = select(attempts).order_by(attempts.c.id)
    if delivery_id is not None:
        q = q.where(attempts.c.delivery_id == delivery_id)
    async with store.engine.connect() as conn:
        return list(await conn.execute(q))


def _close(a: datetime | None, b: datetime, slack: float = 5.0) -> bool:
    assert a is not None
    return abs((a - b).total_seconds()) <= slack


# -- endpoints -------------------------------------------------------------------------------


async def test_add_and_get_endpoint_round_trip(store: Store) -> None:
    secret = generate_secret()
    before = _now()
    saved = await store.add_endpoint(_ep("ep-a", secrets=(secret,), event_types=("a", "b"),
                                         description="orders"))
    assert saved.id == "ep-a"
    assert saved.url == "https://example.com/ep-a"
    assert saved.secrets == (secret,)
    assert saved.event_types == ("a", "b")
    assert saved.enabled is True
    assert saved.disabled_reason is None
    assert saved.description == "orders"
    assert saved.created_at is not None and saved.created_at.tzinfo is not None
    assert _close(saved.created_at, before)
    assert await store.get_endpoint("ep-a") == saved


async def test_get_unknown_endpoint_raises(store: Store) -> None:
    with pytest.raises(EndpointNotFound):
        await store.get_endpoint("nope")


async def test_endpoints_by_id_and_list(store: Store) -> None:
    for name in ("ep-c", "ep-a", "ep-b"):
        await store.add_endpoint(_ep(name))
    assert await store.endpoints_by_id([]) == {}
    found = await store.endpoints_by_id(["ep-a", "ep-b", "ep-a", "missing"])
    assert set(found) == {"ep-a", "ep-b"}
    assert found["ep-b"].url == "https://example.com/ep-b"
    # Listed in creation order.
    assert [ep.id for ep in await store.list_endpoints()] == ["ep-c", "ep-a", "ep-b"]


async def test_subscribed_endpoints_filters_types_and_disabled(store: Store) -> None:
    await store.add_endpoint(_ep("all"))  # empty list: every type
    await store.add_endpoint(_ep("orders", event_types=("order.created", "order.paid")))
    await store.add_endpoint(_ep("users", event_types=("user.created",)))
    await store.add_endpoint(_ep("off", enabled=False, disabled_reason="x"))
    await store.add_endpoint(_ep("off-orders", event_types=("order.created",)))
    await store.set_endpoint_enabled("off-orders", False, "maintenance")

    ids = lambda eps: sorted(ep.id for ep in eps)  # noqa: E731
    assert ids(await store.subscribed_endpoints("order.created")) == ["all", "orders"]
    assert ids(await store.subscribed_endpoints("order.paid")) == ["all", "orders"]
    assert ids(await store.subscribed_endpoints("user.created")) == ["all", "users"]
    assert ids(await store.subscribed_endpoints("other")) == ["all"]


async def test_set_endpoint_enabled(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    await store.set_endpoint_enabled("ep-a", False, "too many errors")
    ep = await store.get_endpoint("ep-a")
    assert (ep.enabled, ep.disabled_reason) == (False, "too many errors")
    await store.set_endpoint_enabled("ep-a", True, "ignored when enabling")
    ep = await store.get_endpoint("ep-a")
    assert (ep.enabled, ep.disabled_reason) == (True, None)
    with pytest.raises(EndpointNotFound):
        await store.set_endpoint_enabled("nope", False, "x")


async def test_rotate_secret_overlap_then_old_ones_stop_signing(store: Store) -> None:
    """A rotated-out secret signs for its overlap, then stops by itself; a few old ones at most."""
    first, second, third, fourth, fifth = (generate_secret() for _ in range(5))
    await store.add_endpoint(_ep("ep-a", secrets=(first,)))
    t0 = _now()

    ep = await store.rotate_secret("ep-a", second, overlap_seconds=3600, now=t0)
    assert ep.secrets == (second, first)
    assert ep.signing_secrets(t0 + timedelta(minutes=59)) == (second, first)
    assert ep.signing_secrets(t0 + timedelta(minutes=61)) == (second,)
    # A later rotation never lengthens an old secret's overlap.
    ep = await store.rotate_secret("ep-a", third, overlap_seconds=7200,
                                   now=t0 + timedelta(minutes=10))
    assert ep.secrets == (third, second, first)
    assert ep.signing_secrets(t0 + timedelta(minutes=61)) == (third, second)
    assert ep.signing_secrets(t0 + timedelta(minutes=131)) == (third,)
    # Past their overlap, old secrets are dropped at the next rotation; at most 3 are kept.
    ep = await store.rotate_secret("ep-a", fourth, overlap_seconds=60,
                                   now=t0 + timedelta(minutes=70))
    assert ep.secrets == (fourth, third, second)
    ep = await store.rotate_secret("ep-a", fifth, overlap_seconds=0,
                                   now=t0 + timedelta(minutes=71))
    assert ep.secrets == (fifth,)

    with pytest.raises(EndpointNotFound):
        await store.rotate_secret("nope", generate_secret(), overlap_seconds=60)


async def test_rotate_keeps_at_most_three_old_secrets(store: Store) -> None:
    secrets = [generate_secret() for _ in range(6)]
    await store.add_endpoint(_ep("ep-a", secrets=(secrets[0],)))
    for secret in secrets[1:]:
        ep = await store.rotate_secret("ep-a", secret, overlap_seconds=3600)
    assert ep.secrets == (secrets[5], secrets[4], secrets[3], secrets[2])


async def test_rotate_secret_rejects_malformed_secret(store: Store) -> None:
    """add_endpoint refuses a malformed secret; rotate_secret must too, or every later
    delivery of the endpoint fails with invalid_secret."""
    secret = generate_secret()
    await store.add_endpoint(_ep("ep-a", secrets=(secret,)))
    with pytest.raises(InvalidSecret):
        await store.rotate_secret("ep-a", "whsec_dG9vc2hvcnQ=", overlap_seconds=60)
    assert (await store.get_endpoint("ep-a")).secrets == (secret,)


async def test_add_endpoint_duplicate_id(store: Store) -> None:
    original = await store.add_endpoint(_ep("ep-a"))
    with pytest.raises(InvalidEndpoint, match="exists already"):
        await store.add_endpoint(_ep("ep-a", url="https://other.example/"))
    assert await store.get_endpoint("ep-a") == original
    assert len(await store.list_endpoints()) == 1


@pytest.mark.parametrize(
    ("secrets", "error"),
    [
        ((), InvalidEndpoint),
        (("not-a-secret",), InvalidSecret),
        (("whsec_!!!notbase64",), InvalidSecret),
        (("whsec_dG9vc2hvcnQ=",), InvalidSecret),  # 8 bytes: too short
    ],
)
async def test_add_endpoint_bad_secrets(store: Store, secrets: tuple[str, ...],
                                        error: type[Exception]) -> None:
    with pytest.raises(error):
        await store.add_endpoint(_ep("ep-a", secrets=secrets))
    assert await store.list_endpoints() == []


async def test_add_endpoint_one_bad_secret_among_good(store: Store) -> None:
    with pytest.raises(InvalidSecret):
        await store.add_endpoint(_ep("ep-a", secrets=(generate_secret(), "whsec_")))
    assert await store.list_endpoints() == []


# -- intake ----------------------------------------------------------------------------------


async def test_insert_intake_rows_are_pending_and_leased(store: Store) -> None:
    before = _now()
    lease_until = before + timedelta(seconds=90)
    inserted = await store.insert_intake(
        [_row("d1", key="k1"), _row("d2", payload=b'{"n":2}', event_type=None)], [],
        lease_until=lease_until, idempotency_cutoff=before - WINDOW)
    assert inserted == {"d1", "d2"}
    rows = await _all(store)
    assert set(rows) == {"d1", "d2"}
    for row in rows.values():
        assert row.status == "pending"
        assert row.attempts == 0
        assert row.locked_until == lease_until
        assert _close(row.next_attempt_at, before)
        assert row.next_attempt_at <= row.locked_until
        assert _close(row.created_at, before)
        assert row.last_error is None and row.last_status_code is None
    assert rows["d1"].payload == b'{"n":1}'
    assert rows["d1"].idempotency_key == "k1"
    assert rows["d1"].event_type == "order.created"
    assert rows["d2"].payload == b'{"n":2}'
    assert rows["d2"].event_type is None


async def test_insert_intake_nothing(store: Store) -> None:
    assert await _intake(store, []) == set()
    assert await _all(store) == {}


async def test_insert_intake_redelivery_not_inserted_twice(store: Store) -> None:
    assert await _intake(store, [_row("d1", payload=b'{"v":1}')]) == {"d1"}
    # The broker redelivers the message: same id, possibly with the same key.
    again = await _intake(store, [_row("d1", payload=b'{"v":2}'), _row("d2")])
    assert again == {"d2"}
    rows = await _all(store)
    assert set(rows) == {"d1", "d2"}
    assert rows["d1"].payload == b'{"v":1}'


async def test_insert_intake_rejections(store: Store) -> None:
    rejection = Rejection(webhook_id="ghost", code="unknown_endpoint",
                          message="no endpoint with id 'ghost'", idempotency_key="k",
                          event_type="order.created", payload=b'{"x":1}')
    inserted = await _intake(store, [_row("d1")], [("r1", rejection)])
    assert "d1" in inserted
    row = await _delivery(store, "r1")
    assert row.status == "rejected"
    assert row.endpoint_id == "ghost"
    assert row.last_error == "unknown_endpoint: no endpoint with id 'ghost'"
    assert row.event_type == "order.created"
    assert row.payload == b'{"x":1}'
    assert row.idempotency_key is None  # a rejection never holds a key
    assert row.next_attempt_at is None and row.locked_until is None
    # A redelivered rejection is not recorded twice.
    again = await _intake(store, [], [("r1", rejection)])
    assert "r1" not in again
    assert (await store.status_counts()) == {"pending": 1, "rejected": 1}


async def test_insert_intake_idempotency_within_window(store: Store) -> None:
    assert await _intake(store, [_row("d1", "ep-a", key="k")]) == {"d1"}
    assert await _intake(store, [_row("d2", "ep-a", key="k")]) == set()
    # Same key, another endpoint: a different delivery.
    assert await _intake(store, [_row("d3", "ep-b", key="k")]) == {"d3"}
    assert set(await _all(store)) == {"d1", "d3"}


async def test_insert_intake_idempotency_inside_one_batch(store: Store) -> None:
    inserted = await _intake(store, [_row("d1", key="k"), _row("d2", key="k"),
                                     _row("d3", key=None), _row("d4", key=None)])
    assert len(inserted & {"d1", "d2"}) == 1
    assert {"d3", "d4"} <= inserted
    assert len(await _all(store)) == 3


async def test_insert_intake_expired_key_is_released(store: Store) -> None:
    assert await _intake(store, [_row("old", "ep-a", key="k"), _row("other", "ep-b", key="k")])
    async with store.engine.begin() as conn:
        await conn.execute(update(deliveries).where(deliveries.c.id == "old")
                           .values(created_at=_now() - WINDOW - timedelta(minutes=5)))
    assert await _intake(store, [_row("new", "ep-a", key="k")]) == {"new"}
    rows = await _all(store)
    assert rows["old"].idempotency_key is None
    assert rows["new"].idempotency_key == "k"
    # ep-b's use of the key is inside the window: kept, and still blocking.
    assert rows["other"].idempotency_key == "k"
    assert await _intake(store, [_row("other2", "ep-b", key="k")]) == set()


async def test_insert_intake_many_rows(store: Store) -> None:
    rows = [_row(f"d{i:05d}", f"ep-{i % 7}", key=f"k{i}") for i in range(2000)]
    rejections = [(f"r{i}", Rejection(f"ghost-{i}", "unknown_endpoint", "nope"))
                  for i in range(50)]
    inserted = await _intake(store, rows, rejections)
    assert {r["id"] for r in rows} <= inserted
    assert await store.status_counts() == {"pending": 2000, "rejected": 50}
    # The whole batch again (a redelivered message) inserts nothing new.
    assert not (await _intake(store, rows, rejections)) & {r["id"] for r in rows}
    assert await store.status_counts() == {"pending": 2000, "rejected": 50}


# -- claiming --------------------------------------------------------------------------------


async def test_claim_due_selects_only_due_unleased_pending(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    now = _now()
    past, future = now - timedelta(minutes=1), now + timedelta(minutes=10)
    await _put(
        store,
        {"id": "due"},
        {"id": "due-expired-lease", "locked_until": past, "next_attempt_at": past},
        {"id": "leased", "locked_until": future},
        {"id": "later", "next_attempt_at": future},
        {"id": "no-time", "next_attempt_at": None},
        {"id": "done", "status": "succeeded", "next_attempt_at": None},
        {"id": "dead", "status": "failed", "next_attempt_at": past},
        {"id": "rejected", "status": "rejected", "next_attempt_at": past},
    )
    ready, dead = await store.claim_due(100, 60)
    assert dead == 0
    assert sorted(d.id for d in ready) == ["due", "due-expired-lease"]
    # Leased now: an immediate second claim finds nothing.
    assert await store.claim_due(100, 60) == ([], 0)
    row = await _delivery(store, "due")
    assert row.status == "pending"
    assert _close(row.locked_until, now + timedelta(seconds=60))


async def test_claim_due_returns_full_deliveries(store: Store) -> None:
    first, second = generate_secret(), generate_secret()
    await store.add_endpoint(_ep("ep-a", url="https://hooks.example/in", secrets=(first,)))
    await store.rotate_secret("ep-a", second, overlap_seconds=3600)
    await _put(store, {"id": "d1", "payload": b'{"hello":"world"}', "attempts": 2,
                       "event_type": "order.paid"})
    before = _now()
    ready, dead = await store.claim_due(10, 30)
    assert dead == 0
    assert len(ready) == 1
    d = ready[0]
    assert isinstance(d, Delivery)
    assert (d.id, d.endpoint_id, d.url) == ("d1", "ep-a", "https://hooks.example/in")
    assert d.secrets == (second, first)
    assert d.payload == b'{"hello":"world"}'
    assert d.attempts == 2
    assert d.event_type == "order.paid"
    assert d.lease_until is not None
    assert abs(d.lease_until - (before.timestamp() + 30)) < 5
    assert (await _delivery(store, "d1")).locked_until.timestamp() == pytest.approx(d.lease_until)


async def test_claim_due_respects_limit_and_order(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    now = _now()
    await _put(store, *({"id": f"d{i:02d}", "next_attempt_at": now - timedelta(seconds=100 - i)}
                        for i in range(25)))
    ready, _ = await store.claim_due(10, 60)
    assert sorted(d.id for d in ready) == [f"d{i:02d}" for i in range(10)]  # oldest due first
    ready2, _ = await store.claim_due(10, 60)
    assert sorted(d.id for d in ready2) == [f"d{i:02d}" for i in range(10, 20)]
    ready3, _ = await store.claim_due(10, 60)
    assert len(ready3) == 5
    assert await store.claim_due(10, 60) == ([], 0)


async def test_claim_due_holds_disabled_and_fails_deleted_endpoints(store: Store) -> None:
    """A disabled endpoint's deliveries are held (sent once it is enabled again); a deleted
    endpoint's fail, replayable."""
    await store.add_endpoint(_ep("ep-ok"))
    await store.add_endpoint(_ep("ep-off"))
    await store.set_endpoint_enabled("ep-off", False, "receiver retired")
    await _put(store, {"id": "ok", "endpoint_id": "ep-ok"},
               {"id": "off1", "endpoint_id": "ep-off"},
               {"id": "off2", "endpoint_id": "ep-off"},
               {"id": "gone", "endpoint_id": "ep-deleted"})
    ready, dead = await store.claim_due(100, 60)
    assert [d.id for d in ready] == ["ok"]
    assert dead == 1
    rows = await _all(store)
    for row_id in ("off1", "off2", "gone"):
        assert rows[row_id].locked_until is None
        assert rows[row_id].next_attempt_at is None
    assert (rows["off1"].status, rows["off2"].status, rows["gone"].status) == (
        "held", "held", "failed")
    assert "receiver retired" in rows["off1"].last_error
    assert "ep-deleted" in rows["gone"].last_error
    assert await store.claim_due(100, 60) == ([], 0)
    assert await store.status_counts() == {"pending": 1, "held": 2, "failed": 1}
    # Enabling resumes the held ones, due now.
    assert await store.set_endpoint_enabled("ep-off", True) == 2
    ready, _ = await store.claim_due(100, 60)
    assert sorted(d.id for d in ready) == ["off1", "off2"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_concurrent_claims_never_share_a_delivery(store: Store, database_url: str) -> None:
    await store.add_endpoint(_ep("ep-a"))
    engines = [create_engine(Settings(database_url=database_url)) for _ in range(2)]
    try:
        claimers = [Store(engine, store.keys) for engine in engines]
        # Warm both pools so the claims really overlap.
        await asyncio.gather(*(s.status_counts() for s in claimers))
        for round_no in range(3):
            ids = {f"r{round_no}-{i:03d}" for i in range(200)}
            await _put(store, *({"id": i} for i in sorted(ids)))
            results = await asyncio.gather(*(s.claim_due(120, 60) for s in claimers))
            claimed = [d.id for ready, dead in results for d in ready]
            assert all(dead == 0 for _, dead in results)
            assert all(0 < len(ready) <= 120 for ready, _ in results)
            assert len(claimed) == len(set(claimed)), "a delivery was claimed twice"
            assert set(claimed) == ids
    finally:
        for engine in engines:
            await engine.dispose()


# -- outcomes --------------------------------------------------------------------------------


def _record(delivery: Delivery, status_code: int, *, attempted_at: datetime | None = None,
            duration_ms: float = 12.5, excerpt: str | None = "body") -> AttemptRecord:
    return decide(delivery,
                  HttpResult(status_code=status_code, duration_ms=duration_ms,
                             response_excerpt=excerpt),
                  attempted_at=attempted_at or _now(), schedule=(1.0,), jitter=0.0, rand=0.5,
                  max_retry_after=60.0)


async def _claimed(store: Store, *rows: dict[str, Any]) -> dict[str, Delivery]:
    await _put(store, *rows)
    ready, dead = await store.claim_due(100, 60)
    assert dead == 0
    return {d.id: d for d in ready}


async def test_record_success(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    d = (await _claimed(store, {"id": "d1"}))["d1"]
    at = _now()
    await store.record_attempts([_record(d, 204, attempted_at=at, duration_ms=42.0,
                                         excerpt="")])
    row = await _delivery(store, "d1")
    assert row.status == "succeeded"
    assert row.attempts == 1
    assert row.next_attempt_at is None and row.locked_until is None
    assert row.last_status_code == 204
    assert row.last_error is None
    (att,) = await _attempts(store, "d1")
    assert att.attempt_number == 1
    assert att.status_code == 204
    assert att.outcome == "success"
    assert att.error_kind is None and att.error is None
    assert att.duration_ms == pytest.approx(42.0)
    assert att.response_excerpt == ""
    assert att.attempted_at == at


async def test_record_retry_then_failure(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    d = (await _claimed(store, {"id": "d1"}))["d1"]
    at = _now()
    record = _record(d, 500, attempted_at=at, excerpt="oops")
    await store.record_attempts([record])
    row = await _delivery(store, "d1")
    assert row.status == "pending"
    assert row.attempts == 1
    assert row.next_attempt_at == at + timedelta(seconds=1.0)
    assert row.locked_until is None
    assert row.last_status_code == 500
    assert row.last_error == "HTTP 500"
    (att,) = await _attempts(store, "d1")
    assert (att.status_code, att.outcome, att.error_kind, att.error, att.response_excerpt) == (
        500, "retry", "http_status", "HTTP 500", "oops")
    assert att.attempt_number == 1

    # Due again once next_attempt_at passes: move it back instead of waiting.
    async with store.engine.begin() as conn:
        await conn.execute(update(deliveries).where(deliveries.c.id == "d1")
                           .values(next_attempt_at=_now() - timedelta(seconds=1)))
    ready, _ = await store.claim_due(10, 60)
    assert [(x.id, x.attempts) for x in ready] == [("d1", 1)]
    await store.record_attempts([_record(ready[0], 500)])  # schedule (1.0,): exhausted
    row = await _delivery(store, "d1")
    assert row.status == "failed"
    assert row.attempts == 2
    assert row.next_attempt_at is None and row.locked_until is None
    atts = await _attempts(store, "d1")
    assert [(a.attempt_number, a.outcome) for a in atts] == [(1, "retry"), (2, "failed")]


async def test_record_410_disables_endpoint(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    await store.add_endpoint(_ep("ep-b"))
    claimed = await _claimed(store, {"id": "d1", "endpoint_id": "ep-a"},
                             {"id": "d2", "endpoint_id": "ep-b"})
    await store.record_attempts([_record(claimed["d1"], 410), _record(claimed["d2"], 204)])
    row = await _delivery(store, "d1")
    assert row.status == "failed"
    assert row.last_status_code == 410
    (att,) = await _attempts(store, "d1")
    assert (att.outcome, att.error_kind) == ("disable", "http_status")
    ep = await store.get_endpoint("ep-a")
    assert ep.enabled is False
    assert ep.disabled_reason and "410" in ep.disabled_reason
    assert (await store.get_endpoint("ep-b")).enabled is True
    assert (await _delivery(store, "d2")).status == "succeeded"


async def test_record_for_finished_delivery_does_not_move_it(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    d = (await _claimed(store, {"id": "d1"}))["d1"]
    await store.record_attempts([_record(d, 204)])
    # A late writer (its lease expired meanwhile) reports a failure for the same attempt.
    await store.record_attempts([_record(d, 500)])
    row = await _delivery(store, "d1")
    assert row.status == "succeeded"
    assert row.last_status_code == 204
    assert row.next_attempt_at is None
    assert [a.status_code for a in await _attempts(store, "d1")] == [204, 500]


async def test_record_attempts_batch_and_empty(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    await store.record_attempts([])
    claimed = await _claimed(store, *({"id": f"d{i}"} for i in range(30)))
    codes = {f"d{i}": (204 if i % 3 else 500) for i in range(30)}
    await store.record_attempts([_record(claimed[i], code) for i, code in codes.items()])
    rows = await _all(store)
    for row_id, code in codes.items():
        assert rows[row_id].status == ("succeeded" if code == 204 else "pending")
        assert rows[row_id].last_status_code == code
    assert len(await _attempts(store)) == 30


# -- housekeeping ----------------------------------------------------------------------------


async def test_cleanup_removes_old_finished_in_chunks(store: Store) -> None:
    now = _now()
    old, new = now - timedelta(days=10), now - timedelta(hours=1)
    cutoff = now - timedelta(days=1)
    statuses = ["succeeded", "failed", "rejected"]
    old_finished = [{"id": f"old-{i:02d}", "status": statuses[i % 3], "created_at": old,
                     "next_attempt_at": None} for i in range(11)]
    await _put(store, *old_finished,
               {"id": "old-pending", "created_at": old, "next_attempt_at": old},
               {"id": "new-done", "status": "succeeded", "created_at": new},
               {"id": "new-pending", "created_at": new})
    attempt_rows = [{"delivery_id": d, "attempt_number": 1, "attempted_at": now,
                     "duration_ms": 1.0, "status_code": 200, "outcome": "success",
                     "error_kind": None, "error": None, "response_excerpt": None}
                    for d in [r["id"] for r in old_finished] + ["old-pending", "new-done"]]
    async with store.engine.begin() as conn:
        await conn.execute(insert(attempts), attempt_rows)

    assert await store.cleanup(cutoff, chunk=3) == 11
    assert set(await _all(store)) == {"old-pending", "new-done", "new-pending"}
    assert sorted(a.delivery_id for a in await _attempts(store)) == ["new-done", "old-pending"]
    assert await store.cleanup(cutoff, chunk=3) == 0


@pytest.mark.parametrize("count", [4, 6])  # exactly a multiple of the chunk, and not
async def test_cleanup_count_exact_at_chunk_boundaries(store: Store, count: int) -> None:
    old = _now() - timedelta(days=3)
    await _put(store, *({"id": f"d{i}", "status": "succeeded", "created_at": old}
                        for i in range(count)))
    assert await store.cleanup(_now() - timedelta(days=1), chunk=2) == count
    assert await _all(store) == {}


async def test_cleanup_max_chunks(store: Store) -> None:
    old = _now() - timedelta(days=3)
    await _put(store, *({"id": f"d{i}", "status": "failed", "created_at": old}
                        for i in range(10)))
    assert await store.cleanup(_now(), chunk=3, max_chunks=2) == 6
    assert len(await _all(store)) == 4


async def test_replay(store: Store) -> None:
    old = _now() - timedelta(hours=2)
    failed = {"status": "failed", "attempts": 4, "next_attempt_at": None,
              "last_status_code": 500, "last_error": "HTTP 500", "created_at": old}
    await _put(store,
               {"id": "f1", "endpoint_id": "ep-a", **failed},
               {"id": "f2", "endpoint_id": "ep-a", **failed},
               {"id": "f3", "endpoint_id": "ep-b", **failed},
               {"id": "f4", "endpoint_id": "ep-b", **failed},
               {"id": "ok", "endpoint_id": "ep-a", "status": "succeeded", "attempts": 1},
               {"id": "rej", "endpoint_id": "ep-a", "status": "rejected"},
               {"id": "pend", "endpoint_id": "ep-a", "attempts": 1,
                "next_attempt_at": _now() + timedelta(minutes=5)})

    assert await store.replay_ids([]) == []

    before = _now()
    assert await store.replay_ids(["f1", "ok", "rej", "pend", "missing"]) == ["f1"]
    rows = await _all(store)
    assert rows["f1"].status == "pending"
    assert (rows["f1"].attempts, rows["f1"].retry_base) == (4, 4)  # numbers run on
    assert rows["f1"].locked_until is None
    assert _close(rows["f1"].next_attempt_at, before)
    assert (rows["ok"].status, rows["rej"].status, rows["pend"].status) == (
        "succeeded", "rejected", "pending")
    assert rows["pend"].attempts == 1

    assert await store.replay_failed(endpoint_id="ep-b") == 2
    rows = await _all(store)
    assert rows["f2"].status == "failed"
    assert rows["f3"].status == rows["f4"].status == "pending"

    assert await store.replay_failed() == 1
    assert (await _delivery(store, "f2")).status == "pending"
    assert await store.replay_failed() == 0


async def test_replayed_delivery_is_claimable(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    await _put(store, {"id": "f1", "status": "failed", "attempts": 4, "next_attempt_at": None})
    assert await store.claim_due(10, 60) == ([], 0)
    assert await store.replay_ids(["f1"]) == ["f1"]
    ready, _ = await store.claim_due(10, 60)
    assert [(d.id, d.attempts, d.retry_base) for d in ready] == [("f1", 4, 4)]


async def test_status_counts(store: Store) -> None:
    assert await store.status_counts() == {}
    await _put(store, *({"id": f"p{i}"} for i in range(3)),
               *({"id": f"s{i}", "status": "succeeded"} for i in range(5)),
               {"id": "f0", "status": "failed"},
               *({"id": f"r{i}", "status": "rejected"} for i in range(2)))
    assert await store.status_counts() == {"pending": 3, "succeeded": 5, "failed": 1,
                                           "rejected": 2}
    async with store.engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(deliveries))).scalar()
        assert total == 11
        assert (await conn.execute(select(func.count()).select_from(endpoints))).scalar() == 0


async def test_release_makes_leased_deliveries_claimable_later(store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    await _intake(store, [_row("r1"), _row("r2"), _row("r3")])
    later = _now() + timedelta(seconds=30)
    await store.release(["r1", "r2"], later)
    rows = await _all(store)
    assert rows["r1"].locked_until is None and rows["r1"].next_attempt_at == later
    assert rows["r3"].locked_until is not None  # not named: still leased
    ready, _ = await store.claim_due(10, 60)
    assert ready == []  # released ones are due only at `later`
    await store.release([], later)  # nothing named: no statement, no error


async def test_outcome_update_uses_the_primary_key_even_with_stale_statistics(
    database_url: str, store: Store
) -> None:
    """Statistics taken when nothing was pending made the planner prefer the status index for
    the per-row outcome UPDATE, which then walked every pending row: quadratic. The status
    guard must not be indexable."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL planner question")
    from sqlalchemy import event, text

    await store.add_endpoint(_ep("ep-a"))
    await _put(store, *({"id": f"s{n}", "status": "succeeded"} for n in range(3000)))
    async with store.engine.begin() as conn:
        await conn.execute(text("ANALYZE deliveries"))
    await _put(store, *({"id": f"p{n}"} for n in range(3000)))

    captured: list[tuple[str, Any]] = []

    def spy(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.startswith("UPDATE deliveries"):
            captured.append((statement, params))

    record = decide(Delivery(id="p1", endpoint_id="ep-a", url="u", secrets=(), payload=b"{}"),
                    HttpResult(status_code=204), attempted_at=_now(), schedule=(), jitter=0,
                    rand=0.5, max_retry_after=1)
    event.listen(store.engine.sync_engine, "before_cursor_execute", spy)
    try:
        await store.record_attempts([record])
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", spy)
    assert captured, "record_attempts issued no UPDATE"
    statement, params = captured[0]
    async with store.engine.connect() as conn:
        one = params[0] if isinstance(params, list) else params
        rows = await conn.exec_driver_sql("EXPLAIN " + statement, one)
        plan = "\n".join(r[0] for r in rows)
    assert "deliveries_pkey" in plan, plan
