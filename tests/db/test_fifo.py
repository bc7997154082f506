"""FIFO queues: places given at intake, claims that hand out only each queue's head, replay
and resend to the back, against real SQLite and PostgreSQL (the `store` fixture)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from worker.core.models import Delivery, Endpoint, HttpResult, Ordering
from worker.core.outcome import decide
from worker.core.signing import generate_secret
from worker.core.validation import ValidEvent
from worker.db.fifo import assign_places, fifo_queues
from worker.db.intake_rows import WHOLE_ENDPOINT, delivery_row
from worker.db.schema import deliveries
from worker.db.store import Store

WINDOW = timedelta(hours=1)


def _now() -> datetime:
    return datetime.now(UTC)


# -- pure: places ------------------------------------------------------------------------------


def test_fifo_queues_are_sorted_and_skip_unordered_rows() -> None:
    rows = [{"endpoint_id": "b", "ordering_key": "k"}, {"endpoint_id": "a", "ordering_key": ""},
            {"endpoint_id": "b", "ordering_key": "k"}, {"endpoint_id": "a", "ordering_key": None},
            {"endpoint_id": "a"}]
    assert fifo_queues(rows) == [("a", ""), ("b", "k")]


def test_assign_places_numbers_each_queue_after_its_last_place_in_row_order() -> None:
    rows: list[dict[str, Any]] = [
        {"endpoint_id": "a", "ordering_key": "x"}, {"endpoint_id": "a", "ordering_key": "y"},
        {"endpoint_id": "a", "ordering_key": "x"}, {"endpoint_id": "a", "ordering_key": None},
        {"endpoint_id": "b", "ordering_key": "x"}]
    assign_places(rows, {("a", "x"): 7})
    assert [row.get("fifo_seq") for row in rows] == [8, 1, 9, None, 1]


def test_assign_places_leaves_the_given_last_places_alone() -> None:
    last = {("a", ""): 3}
    assign_places([{"endpoint_id": "a", "ordering_key": ""}], last)
    assert last == {("a", ""): 3}


def _event(key: str | None = None) -> ValidEvent:
    return ValidEvent("ep", b"{}", "order.created", None, key)


def _endpoint(**kw: Any) -> Endpoint:
    return Endpoint(id="ep", url="https://example.com/", secrets=("whsec_x",), **kw)


def test_delivery_row_of_an_unordered_endpoint_is_sent_now() -> None:
    now = _now()
    new = delivery_row("d1", _event("k"), _endpoint(), now)
    assert new.send_now
    assert new.row["ordering_key"] is None and new.row["fifo_seq"] is None
    assert (new.row["status"], new.row["next_attempt_at"], new.row["locked_until"]) == (
        "pending", now, None)


def test_delivery_row_of_a_fifo_endpoint_waits_for_the_claim_loop() -> None:
    now = _now()
    whole = delivery_row("d1", _event(), _endpoint(ordering=Ordering.FIFO), now)
    keyed = delivery_row("d2", _event("partner-7"), _endpoint(ordering=Ordering.FIFO), now)
    assert not whole.send_now and not keyed.send_now
    assert whole.row["ordering_key"] == WHOLE_ENDPOINT
    assert keyed.row["ordering_key"] == "partner-7"
    assert whole.row["status"] == "pending" and whole.row["next_attempt_at"] == now


def test_delivery_row_of_a_disabled_fifo_endpoint_is_held_in_its_queue() -> None:
    new = delivery_row("d1", _event("k"), _endpoint(ordering=Ordering.FIFO, enabled=False,
                                                    disabled_reason="410"), _now())
    assert not new.send_now
    assert (new.row["status"], new.row["ordering_key"]) == ("held", "k")
    assert "disabled: 410" in new.row["last_error"]


def test_delivery_row_behind_an_open_circuit_waits_until_it_may_be_probed() -> None:
    now = _now()
    until = now + timedelta(seconds=30)
    new = delivery_row("d1", _event(), _endpoint(circuit_open_until=until), now)
    assert not new.send_now
    assert new.row["next_attempt_at"] == until


# -- against the databases ---------------------------------------------------------------------


async def _fifo_endpoint(store: Store, endpoint_id: str = "ep-f") -> None:
    await store.add_endpoint(Endpoint(id=endpoint_id, url=f"https://example.com/{endpoint_id}",
                                      secrets=(generate_secret(),), ordering=Ordering.FIFO))


def _queued(row_id: str, key: str = "", endpoint_id: str = "ep-f") -> dict[str, Any]:
    return {"id": row_id, "endpoint_id": endpoint_id, "event_type": "e", "idempotency_key": None,
            "payload": b"{}", "ordering_key": key}


async def _enqueue(store: Store, *rows: dict[str, Any]) -> set[str]:
    now = _now()
    return await store.insert_intake(list(rows), [], lease=(), lease_until=now,
                                     idempotency_cutoff=now - WINDOW)


async def _places(store: Store) -> dict[str, tuple[str | None, int | None]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(deliveries.c.id, deliveries.c.ordering_key,
                                         deliveries.c.fifo_seq))
        return {r.id: (r.ordering_key, r.fifo_seq) for r in rows}


async def _claim(store: Store) -> dict[str, Delivery]:
    ready, dead = await store.claim_due(100, 60)
    assert dead == 0
    return {d.id: d for d in ready}


async def _answer(store: Store, delivery: Delivery, status: int) -> None:
    """Record one attempt; schedule (1 s,): a first 500 retries, a second one ends failed."""
    await store.record_attempts([decide(
        delivery, HttpResult(status_code=status, duration_ms=1.0), attempted_at=_now(),
        schedule=(1.0,), jitter=0.0, rand=0.5, max_retry_after=60.0)])


async def _make_due(store: Store, *ids: str) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(update(deliveries).where(deliveries.c.id.in_(ids))
                           .values(next_attempt_at=_now() - timedelta(seconds=1)))


async def test_intake_numbers_each_queue_in_order(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("a1", "a"), _queued("b1", "b"), _queued("a2", "a"))
    await _enqueue(store, _queued("a3", "a"), _queued("w1"))
    assert await _places(store) == {"a1": ("a", 1), "a2": ("a", 2), "a3": ("a", 3),
                                    "b1": ("b", 1), "w1": ("", 1)}


async def test_claims_hand_out_one_head_per_queue(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, *[_queued(f"a{i}", "a") for i in range(1, 4)],
                   *[_queued(f"b{i}", "b") for i in range(1, 3)])
    claimed = await _claim(store)
    assert set(claimed) == {"a1", "b1"}
    assert claimed["a1"].ordering_key == "a"
    # Leased heads block their queues: a second claim finds nothing.
    assert await _claim(store) == {}


async def test_the_next_goes_once_the_head_succeeded(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("d1"), _queued("d2"), _queued("d3"))
    order = []
    for _ in range(3):
        [(delivery_id, d)] = (await _claim(store)).items()
        order.append(delivery_id)
        await _answer(store, d, 204)
    assert order == ["d1", "d2", "d3"]
    assert await _claim(store) == {}


async def test_a_retrying_head_blocks_its_queue_until_it_ends_failed(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("d1"), _queued("d2"))
    await _answer(store, (await _claim(store))["d1"], 500)  # retry in 1 s
    await _make_due(store, "d2")
    assert await _claim(store) == {}, "d2 went while d1 was still retrying"
    await _make_due(store, "d1")
    await _answer(store, (await _claim(store))["d1"], 500)  # retries exhausted: failed
    assert set(await _claim(store)) == {"d2"}


async def test_other_queues_and_unordered_endpoints_are_not_held_up(store: Store) -> None:
    await _fifo_endpoint(store)
    await store.add_endpoint(Endpoint(id="ep-n", url="https://example.com/n",
                                      secrets=(generate_secret(),)))
    await _enqueue(store, _queued("a1", "a"), _queued("a2", "a"), _queued("b1", "b"),
                   {**_queued("n1", endpoint_id="ep-n"), "ordering_key": None},
                   {**_queued("n2", endpoint_id="ep-n"), "ordering_key": None})
    await _answer(store, (await _claim(store))["a1"], 500)
    await _make_due(store, "a2")
    # a1 retries; b1 and the unordered endpoint's were handed out with it.
    async with store.engine.connect() as conn:
        leased = set((await conn.execute(select(deliveries.c.id).where(
            deliveries.c.locked_until.is_not(None)))).scalars())
    assert leased == {"b1", "n1", "n2"}


async def test_a_held_delivery_blocks_its_queue(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("d1"), _queued("d2"))
    await store.set_endpoint_enabled("ep-f", False, reason="maintenance")
    assert await _claim(store) == {}
    await store.set_endpoint_enabled("ep-f", True)
    assert set(await _claim(store)) == {"d1"}


async def test_replay_puts_a_failed_delivery_at_the_back_of_its_queue(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("d1"), _queued("d2"))
    d1 = (await _claim(store))["d1"]
    await _answer(store, d1, 500)
    await _make_due(store, "d1")
    await _answer(store, (await _claim(store))["d1"], 500)  # failed
    assert await store.replay_ids(["d1"]) == ["d1"]
    places = await _places(store)
    assert places["d1"][1] > places["d2"][1]  # type: ignore[operator]
    order = []
    for _ in range(2):
        [(delivery_id, d)] = (await _claim(store)).items()
        order.append(delivery_id)
        await _answer(store, d, 204)
    assert order == ["d2", "d1"]


async def test_resend_keeps_the_queue_and_goes_to_its_back(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("d1", "k"))
    await _answer(store, (await _claim(store))["d1"], 204)
    await _enqueue(store, _queued("d2", "k"))
    made = await store.resend("d1")
    assert made is not None
    places = await _places(store)
    assert places[made[0]][0] == "k"
    assert places[made[0]][1] > places["d2"][1]  # type: ignore[operator]


async def test_switching_ordering_off_lets_the_queue_go_at_once(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("d1"), _queued("d2"), _queued("d3"))
    ep = await store.update_endpoint("ep-f", ordering="none")
    assert ep.ordering is Ordering.NONE
    assert set(await _claim(store)) == {"d1", "d2", "d3"}


async def test_a_drained_queue_starts_again_and_keeps_its_order(store: Store) -> None:
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("d1"))
    await _answer(store, (await _claim(store))["d1"], 204)
    await _enqueue(store, _queued("d2"), _queued("d3"))
    [(first, d)] = (await _claim(store)).items()
    assert first == "d2"
    await _answer(store, d, 204)
    assert set(await _claim(store)) == {"d3"}


async def test_concurrent_producers_of_one_queue_get_distinct_ordered_places(
        store: Store) -> None:
    """Twenty batches committed at once into one queue: every place distinct, and each
    batch's rows in the order given (PostgreSQL: the advisory lock; SQLite: one writer)."""
    await _fifo_endpoint(store)

    async def batch(n: int) -> None:
        rows = [_queued(f"b{n:02d}-{i}") for i in range(5)]
        for attempt in range(20):
            try:
                await _enqueue(store, *rows)
                return
            except Exception:  # SQLite: database is locked; try again
                if store.engine.dialect.name != "sqlite" or attempt == 19:
                    raise
                await asyncio.sleep(0.05)

    await asyncio.gather(*(batch(n) for n in range(20)))
    places = await _places(store)
    seqs = [seq for _, seq in places.values()]
    assert len(seqs) == 100 and len(set(seqs)) == 100
    for n in range(20):
        mine = [places[f"b{n:02d}-{i}"][1] for i in range(5)]
        assert mine == sorted(mine)  # type: ignore[type-var]


async def test_waiting_behind_a_retrying_head_is_not_due_backlog(store: Store) -> None:
    """The backlog alert reads `oldest_due`: a queue held by its retrying head is waiting by
    contract, not left behind."""
    await _fifo_endpoint(store)
    await _enqueue(store, _queued("d1"), _queued("d2"))
    await _answer(store, (await _claim(store))["d1"], 500)  # retries in 1 s
    assert await store.oldest_due(_now()) is None
    await _make_due(store, "d1")
    assert await store.oldest_due(_now()) is not None  # the head itself, due and unclaimed
