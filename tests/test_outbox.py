"""The outbox API on real databases: PostgreSQL (psycopg and asyncpg) and SQLite."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tests.conftest import PG_ADMIN_URL, _pg_admin
from worker import outbox
from worker.core.errors import InvalidEvent, OutboxError
from worker.core.health import CIRCUIT_WAIT
from worker.core.models import Endpoint, Ordering
from worker.core.signing import generate_secret
from worker.db import outbox_store
from worker.db.schema import deliveries, endpoints
from worker.db.store import Store


def sync_url(url: str) -> str:
    """The producer's side: a synchronous driver on the same database."""
    u = make_url(url)
    driver = "postgresql+psycopg" if u.get_backend_name() == "postgresql" else "sqlite"
    return u.set(drivername=driver).render_as_string(hide_password=False)


@pytest.fixture
def producer(database_url: str) -> Iterator[Engine]:
    engine = create_engine(sync_url(database_url))
    yield engine
    engine.dispose()


@pytest.fixture
async def aproducer(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()


async def add(store: Store, endpoint_id: str, **kw: Any) -> Endpoint:
    return await store.add_endpoint(Endpoint(id=endpoint_id, url="http://127.0.0.1:9/x",
                                             secrets=(generate_secret(),), **kw))


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(deliveries).order_by(deliveries.c.created_at,
                                                             deliveries.c.id)))


async def test_committed_event_is_a_due_unleased_pending_row(store: Store,
                                                             producer: Engine) -> None:
    await add(store, "ep-a")
    with Session(producer) as session, session.begin():
        delivery_id = outbox.enqueue(session, webhook_id="ep-a",
                                     event_data={"type": "app.saved", "id": 7},
                                     idempotency_key="app-7")
    [row] = rows(producer)
    assert delivery_id is not None and delivery_id.startswith("msg_")
    assert row.id == delivery_id
    assert (row.status, row.attempts, row.locked_until) == ("pending", 0, None)
    assert row.next_attempt_at <= datetime.now(UTC)
    assert row.payload == orjson.dumps({"type": "app.saved", "id": 7})
    assert (row.event_type, row.idempotency_key, row.endpoint_id) == ("app.saved", "app-7",
                                                                      "ep-a")


async def test_rolled_back_event_leaves_nothing(store: Store, producer: Engine) -> None:
    await add(store, "ep-a")
    with Session(producer) as session:
        outbox.enqueue(session, webhook_id="ep-a", event_data={"n": 1})
        session.rollback()
    with producer.connect() as conn:
        outbox.enqueue(conn, webhook_id="ep-a", event_data={"n": 2})
        conn.rollback()
    assert rows(producer) == []


async def test_enqueue_does_not_commit(store: Store, producer: Engine,
                                       database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("another connection's view needs PostgreSQL's isolation")
    await add(store, "ep-a")
    with producer.connect() as conn:
        outbox.enqueue(conn, webhook_id="ep-a", event_data={"n": 1})
        assert rows(producer) == []  # not visible outside the producer's transaction
        conn.commit()
    assert len(rows(producer)) == 1


async def test_idempotency_key_twice_gives_none_and_the_transaction_goes_on(
        store: Store, producer: Engine) -> None:
    await add(store, "ep-a")
    with Session(producer) as session, session.begin():
        first = outbox.enqueue(session, webhook_id="ep-a", event_data={"n": 1},
                               idempotency_key="k1")
    with Session(producer) as session, session.begin():
        again = outbox.enqueue(session, webhook_id="ep-a", event_data={"n": 1},
                               idempotency_key="k1")
        # Same transaction, twice, and the transaction still works afterwards.
        same = outbox.enqueue_many(session, [
            {"webhook_id": "ep-a", "event_data": {"n": 2}, "idempotency_key": "k2"},
            {"webhook_id": "ep-a", "event_data": {"n": 2}, "idempotency_key": "k2"}])
        session.execute(text("SELECT 1"))
    assert first is not None and again is None
    assert same[0] is not None and same[1] is None
    assert sorted(r.idempotency_key for r in rows(producer)) == ["k1", "k2"]


async def test_idempotency_key_past_its_window_is_free_again(store: Store,
                                                             producer: Engine) -> None:
    await add(store, "ep-a")
    with Session(producer) as session, session.begin():
        old = outbox.enqueue(session, webhook_id="ep-a", event_data={}, idempotency_key="k")
    with producer.begin() as conn:
        conn.execute(update(deliveries).values(
            created_at=datetime.now(UTC) - timedelta(days=2)))
    with Session(producer) as session, session.begin():
        new = outbox.enqueue(session, webhook_id="ep-a", event_data={}, idempotency_key="k")
    assert old and new and old != new
    keys = {r.id: r.idempotency_key for r in rows(producer)}
    assert keys == {old: None, new: "k"}


async def test_refusals_raise_before_writing_and_leave_the_transaction_usable(
        store: Store, producer: Engine) -> None:
    await add(store, "ep-a")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"webhook_id": "nope", "event_data": {}}, "unknown_endpoint"),
        ({"webhook_id": "ep-a", "event_data": ["not", "an", "object"]}, "payload_not_object"),
        ({"webhook_id": "ep-a", "event_data": {"x": "y" * 300_000}}, "payload_too_large"),
        ({"webhook_id": "ep-a", "event_data": {"t": datetime.now}}, "payload_not_json"),
        ({"webhook_id": "bad id!", "event_data": {}}, "invalid_webhook_id"),
        ({"webhook_id": "ep-a", "event_data": {}, "idempotency_key": ""},
         "invalid_idempotency_key"),
    ]
    with Session(producer) as session, session.begin():
        for kwargs, code in cases:
            with pytest.raises(InvalidEvent) as caught:
                outbox.enqueue(session, **kwargs)
            assert caught.value.code == code, kwargs
        with pytest.raises(InvalidEvent) as caught:  # one bad event refuses the batch
            outbox.enqueue_many(session, [{"webhook_id": "ep-a", "event_data": {}},
                                          {"webhook_id": "ghost", "event_data": {}}])
        assert caught.value.code == "unknown_endpoint" and "ghost" in str(caught.value)
        with pytest.raises(InvalidEvent, match="unknown field"):
            outbox.enqueue_many(session, [{"webhook_id": "ep-a", "event_data": {}, "x": 1}])
        kept = outbox.enqueue(session, webhook_id="ep-a", event_data={"ok": True})
    assert [r.id for r in rows(producer)] == [kept]


async def test_disabled_endpoint_is_held_and_open_circuit_waits(store: Store,
                                                                producer: Engine) -> None:
    await add(store, "ep-off")
    await store.set_endpoint_enabled("ep-off", False, "partner asked")
    await add(store, "ep-open")
    until = datetime.now(UTC) + timedelta(minutes=5)
    async with store.engine.begin() as conn:
        await conn.execute(update(endpoints).where(endpoints.c.id == "ep-open")
                           .values(circuit_open_until=until))
    with Session(producer) as session, session.begin():
        held = outbox.enqueue(session, webhook_id="ep-off", event_data={})
        waiting = outbox.enqueue(session, webhook_id="ep-open", event_data={})
    by_id = {r.id: r for r in rows(producer)}
    assert by_id[held].status == "held" and "partner asked" in by_id[held].last_error
    assert by_id[held].next_attempt_at is None
    assert by_id[waiting].status == "pending" and by_id[waiting].last_error == CIRCUIT_WAIT
    assert abs((by_id[waiting].next_attempt_at - until).total_seconds()) < 0.01


async def test_enqueue_many_is_in_order_and_publish_fans_out(store: Store,
                                                             producer: Engine) -> None:
    await add(store, "ep-a", event_types=("app.saved",))
    await add(store, "ep-b")  # every type
    await add(store, "ep-c", event_types=("other",))
    await add(store, "ep-off")
    await store.set_endpoint_enabled("ep-off", False)
    with Session(producer) as session, session.begin():
        ids = outbox.enqueue_many(session, [
            {"webhook_id": ("ep-a", "ep-b")[i % 2], "event_data": {"i": i}} for i in range(50)])
        fanned = outbox.publish(session, event_type="app.saved", data={"id": 1},
                                idempotency_key="app-1")
        again = outbox.publish(session, event_type="app.saved", data={"id": 1},
                               idempotency_key="app-1")
        only_b = outbox.publish(session, event_type="other.type", data={})
    assert len(ids) == 50 and len(set(ids)) == 50 and None not in ids
    by_id = {r.id: r for r in rows(producer)}
    assert [orjson.loads(by_id[i].payload)["i"] for i in ids if i] == list(range(50))
    assert sorted(by_id[i].endpoint_id for i in fanned) == ["ep-a", "ep-b"]
    assert again == []
    assert [by_id[i].endpoint_id for i in only_b] == ["ep-b"]  # ep-c takes "other" only
    body = orjson.loads(by_id[fanned[0]].payload)
    assert body["type"] == "app.saved" and body["data"] == {"id": 1} and "timestamp" in body
    assert all(by_id[i].event_type == "app.saved" for i in fanned)


async def test_async_session_and_connection(store: Store, aproducer: AsyncEngine,
                                            producer: Engine) -> None:
    await add(store, "ep-a")
    async with AsyncSession(aproducer) as session, session.begin():
        one = await outbox.enqueue_async(session, webhook_id="ep-a", event_data={"n": 1})
        many = await outbox.enqueue_many_async(session, [
            {"webhook_id": "ep-a", "event_data": {"n": 2}, "idempotency_key": "k"},
            {"webhook_id": "ep-a", "event_data": {"n": 3}, "idempotency_key": "k"}])
    async with aproducer.connect() as conn:
        fanned = await outbox.publish_async(conn, event_type="t", data={})
        await conn.rollback()
    async with aproducer.begin() as conn:
        with pytest.raises(InvalidEvent):
            await outbox.enqueue_async(conn, webhook_id="ghost", event_data={})
        last = await outbox.enqueue_async(conn, webhook_id="ep-a", event_data={"n": 4})
    assert len(fanned) == 1
    assert [r.id for r in rows(producer)] == [one, many[0], last] and many[1] is None


async def test_wrong_connection_type_is_refused(producer: Engine) -> None:
    with pytest.raises(OutboxError, match="Session or Connection"):
        outbox.enqueue(producer, webhook_id="ep-a", event_data={})  # type: ignore[arg-type]


@pytest.fixture
def empty_pg() -> Iterator[str]:
    """A PostgreSQL database with none of the worker's tables (dropped at the end)."""
    name = f"webhooks_test_empty_{uuid.uuid4().hex[:8]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_a_database_that_is_not_the_workers_is_named_with_the_fix(empty_pg: str) -> None:
    engine = create_engine(empty_pg)
    try:
        with Session(engine) as session, session.begin():
            session.execute(text("CREATE TABLE app (id int)"))
            with pytest.raises(OutboxError) as caught:
                outbox.enqueue(session, webhook_id="ep-a", event_data={})
            # Refused without aborting the producer's transaction.
            session.execute(text("INSERT INTO app VALUES (1)"))
        message = str(caught.value)
        assert "not the webhook worker's" in message and "webhooks db upgrade" in message
        assert "DATABASE_URL=postgresql+psycopg://postgres@" in message
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM app")).scalar() == 1
    finally:
        engine.dispose()


def test_an_old_schema_revision_is_refused(tmp_path: Any) -> None:
    from worker.db.migrate import head_revision, upgrade

    upgrade(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}", "0002")
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        with engine.begin() as conn, pytest.raises(OutboxError) as caught:
            outbox.enqueue(conn, webhook_id="ep-a", event_data={})
        assert f"at schema revision 0002; this code needs {head_revision()}" in str(caught.value)
        # Upgraded meanwhile: the next call checks again (a failed check is not cached).
        upgrade(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
        with engine.begin() as conn, pytest.raises(InvalidEvent, match="no endpoint"):
            outbox.enqueue(conn, webhook_id="ep-a", event_data={})
    finally:
        engine.dispose()


def test_schema_problem_is_pure_and_names_each_case() -> None:
    where = "postgresql://u@h/db"
    assert outbox_store.schema_problem("postgresql", ["endpoints", "deliveries"], "0003",
                                       "0003", where) is None
    assert "is mysql" in (outbox_store.schema_problem("mysql", [], None, "0003", where) or "")
    assert "no deliveries table" in (outbox_store.schema_problem(
        "sqlite", ["endpoints"], "0003", "0003", where) or "")
    assert "no alembic_version table" in (outbox_store.schema_problem(
        "sqlite", ["endpoints", "deliveries"], None, "0003", where) or "")


async def test_notify_is_sent_on_commit_only(store: Store, producer: Engine,
                                             database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    await add(store, "ep-a")
    payloads: list[str] = []
    listener = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        await listener.add_listener(outbox_store.CHANNEL,
                                    lambda *args: payloads.append(args[3]))
        with Session(producer) as session:
            outbox.enqueue(session, webhook_id="ep-a", event_data={})
            session.rollback()
        with Session(producer) as session, session.begin():
            outbox.enqueue(session, webhook_id="ep-a", event_data={})
            outbox.enqueue(session, webhook_id="ep-a", event_data={})
        with Session(producer) as session, session.begin():  # a marker after the others
            session.execute(text(f"NOTIFY {outbox_store.CHANNEL}, 'marker'"))
        for _ in range(250):
            if "marker" in payloads:
                break
            await asyncio.sleep(0.02)
        # One notification for the committed transaction (PostgreSQL folds the two), none
        # for the rolled-back one.
        assert payloads == ["", "marker"]
    finally:
        await listener.close()


async def test_fifo_endpoint_rows_get_their_places_in_the_producers_transaction(
        store: Store, producer: Engine, aproducer: AsyncEngine) -> None:
    await add(store, "ep-fifo", ordering=Ordering.FIFO)
    await add(store, "ep-any")
    with Session(producer) as session, session.begin():
        a = outbox.enqueue_many(session, [
            {"webhook_id": "ep-fifo", "event_data": {"n": i}, "ordering_key": "partner-1"}
            for i in range(3)])
        whole = outbox.enqueue(session, webhook_id="ep-fifo", event_data={})
        loose = outbox.enqueue(session, webhook_id="ep-any", event_data={}, ordering_key="k")
    async with AsyncSession(aproducer) as session, session.begin():
        more = await outbox.enqueue_async(session, webhook_id="ep-fifo", event_data={"n": 3},
                                          ordering_key="partner-1")
    with producer.connect() as conn, pytest.raises(InvalidEvent) as caught:
        outbox.enqueue(conn, webhook_id="ep-fifo", event_data={}, ordering_key="")
    assert caught.value.code == "invalid_ordering_key"
    by_id = {r.id: (r.ordering_key, r.fifo_seq) for r in rows(producer)}
    assert [by_id[i] for i in [*a, more]] == [("partner-1", n) for n in (1, 2, 3, 4)]
    assert by_id[whole] == ("", 1)  # no key: the endpoint's one queue
    assert by_id[loose] == (None, None)  # not a FIFO endpoint: any order


async def test_concurrent_producers_number_one_queue_in_commit_order(
        store: Store, producer: Engine, database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("two writers at once need PostgreSQL")
    await add(store, "ep-fifo", ordering=Ordering.FIFO)
    first, second = Session(producer), Session(producer)
    try:
        outbox.enqueue(first, webhook_id="ep-fifo", event_data={"who": 1}, ordering_key="k")
        # The second producer waits for the first one's queue lock, then numbers after it.
        done = asyncio.get_running_loop().run_in_executor(
            None, lambda: (outbox.enqueue(second, webhook_id="ep-fifo",
                                          event_data={"who": 2}, ordering_key="k"),
                           second.commit()))
        await asyncio.sleep(0.3)
        assert not done.done()
        first.commit()
        await asyncio.wait_for(done, 10)
    finally:
        first.close()
        second.close()
    places = {orjson.loads(r.payload)["who"]: r.fifo_seq for r in rows(producer)}
    assert places == {1: 1, 2: 2}
