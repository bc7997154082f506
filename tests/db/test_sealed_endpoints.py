"""Sealed endpoint credentials on real SQLite and PostgreSQL databases: nothing secret in the
table in any encoding, rows bound to their id, a ring missing a key, re-sealing in chunks."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

import worker.db.endpoint_records as endpoint_records
from tests.conftest import TEST_SECRET_KEYS
from worker.core.errors import SealError
from worker.core.models import Endpoint, EndpointPolicy
from worker.core.sealing import KeyRing, generate_key, sealed_key_id
from worker.core.signing import generate_secret, generate_signing_key, secret_key
from worker.db.connection import create_engine
from worker.db.schema import deliveries, endpoints
from worker.db.store import Store
from worker.settings import Settings

# The id of the key the tests seal with (from WEBHOOKS_SECRET_KEYS: CI sets its own).
KID = KeyRing.parse(TEST_SECRET_KEYS).sealing_key_id

HEADER_VALUE = "Bearer sk_live_51HxQ2eKq9ZyT7wVb3mN8pR"


def _ep(endpoint_id: str, **kw: Any) -> Endpoint:
    kw.setdefault("url", f"https://example.com/{endpoint_id}")
    kw.setdefault("secrets", (generate_secret(),))
    return Endpoint(id=endpoint_id, **kw)


async def _raw_rows(store: Store) -> list[dict[str, Any]]:
    """Every endpoints row as the database returns it, read with plain SQL."""
    async with store.engine.connect() as conn:
        result = await conn.execute(text("SELECT * FROM endpoints"))
        return [dict(row._mapping) for row in result]


def _row_text(row: dict[str, Any]) -> str:
    parts = []
    for value in row.values():
        if isinstance(value, bytes | bytearray | memoryview):
            parts.append(bytes(value).decode("latin-1"))
        parts.append(str(value))
        parts.append(repr(value))
    return "\n".join(parts)


def _encodings(raw: bytes) -> list[str]:
    """The spellings a leaked key would likely take."""
    return [
        raw.hex(), raw.hex().upper(),
        base64.b64encode(raw).decode(), base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="),
        base64.b32encode(raw).decode(), base64.b32encode(raw).decode().rstrip("="),
        base64.b32encode(raw).decode().lower().rstrip("="),
        base64.b85encode(raw).decode(),
    ]


def _needles(whsec: str, whsk: str, header_value: str) -> list[str]:
    raw_hmac = secret_key(whsec)
    raw_ed = base64.b64decode(whsk.removeprefix("whsk_"))
    needles = [whsec, whsec.removeprefix("whsec_"), whsk, whsk.removeprefix("whsk_"),
               header_value, header_value.removeprefix("Bearer ")]
    for raw in (raw_hmac, raw_ed, header_value.encode(),
                header_value.removeprefix("Bearer ").encode()):
        needles += _encodings(raw)
    # A middle slice of each encoding too: a leak need not be whole.
    needles += [n[4:20] for n in needles if len(n) >= 24]
    return needles


def _assert_nowhere(haystack: str, needles: list[str]) -> None:
    for needle in needles:
        assert needle not in haystack, f"found {needle!r}"


def _ring_without(store: Store) -> KeyRing:
    return KeyRing.parse(generate_key("other"), "a ring without the test key")


async def _token(store: Store, endpoint_id: str) -> str:
    async with store.engine.connect() as conn:
        value = (await conn.execute(select(endpoints.c.credentials)
                                    .where(endpoints.c.id == endpoint_id))).scalar_one()
    assert isinstance(value, str)
    return value


async def _set_token(store: Store, endpoint_id: str, token: str) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                           .values(credentials=token))


def _in_another_thread(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine to completion on its own loop in its own thread (another "process")."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = asyncio.run(make())
        except BaseException as exc:  # handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the other thread did not finish"
    if "error" in out:
        raise out["error"]
    return out.get("value")


# -- nothing secret in the table ------------------------------------------------------------


async def test_the_endpoints_table_holds_no_secret_in_any_encoding(store: Store) -> None:
    whsec = generate_secret()
    whsk, _ = generate_signing_key()
    needles = _needles(whsec, whsk, HEADER_VALUE)
    saved = await store.add_endpoint(_ep("ep-a", secrets=(whsec, whsk),
                                         policy=EndpointPolicy(headers=(("Authorization",
                                                                         HEADER_VALUE),))))
    # The secrets are there, sealed: the store gives them back.
    assert saved.secrets == (whsec, whsk)
    assert saved.policy.headers == (("Authorization", HEADER_VALUE),)
    rows = await _raw_rows(store)
    assert len(rows) == 1
    assert rows[0]["credentials"].startswith(f"sealed1.{KID}.")
    _assert_nowhere(_row_text(rows[0]), needles)


async def test_no_secret_in_the_table_after_rotation_header_change_and_update(
        store: Store) -> None:
    first, second = generate_secret(), generate_secret()
    whsk, _ = generate_signing_key()
    other_header = "Token tok_9c1f0e2d3b4a59687766"
    await store.add_endpoint(_ep("ep-a", secrets=(first,),
                                 policy=EndpointPolicy(headers=(("X-Api-Key", HEADER_VALUE),))))
    await store.rotate_secret("ep-a", second, overlap_seconds=3600)
    await store.rotate_secret("ep-a", whsk, overlap_seconds=3600)
    await store.set_headers("ep-a", [("X-Api-Key", other_header)])
    await store.update_endpoint("ep-a", description="orders", verify_tls=False)
    ep = await store.get_endpoint("ep-a")
    assert ep.secrets == (whsk, second, first)
    assert ep.policy.headers == (("X-Api-Key", other_header),)
    assert ep.description == "orders" and ep.policy.verify_tls is False
    haystack = "\n".join(_row_text(r) for r in await _raw_rows(store))
    _assert_nowhere(haystack, _needles(first, whsk, HEADER_VALUE))
    _assert_nowhere(haystack, _needles(second, whsk, other_header))


async def test_the_sqlite_file_holds_no_secret_either(store: Store) -> None:
    if store.engine.dialect.name != "sqlite":
        pytest.skip("the file check reads a SQLite database file")
    whsec = generate_secret()
    whsk, _ = generate_signing_key()
    await store.add_endpoint(_ep("ep-a", secrets=(whsec, whsk),
                                 policy=EndpointPolicy(headers=(("Authorization",
                                                                 HEADER_VALUE),))))
    await store.rotate_secret("ep-a", generate_secret(), overlap_seconds=60)
    database = make_url(str(store.engine.url)).database
    assert database
    files = [Path(database + suffix) for suffix in ("", "-wal", "-journal", "-shm")]
    blob = b"".join(f.read_bytes() for f in files if f.exists())
    assert f"sealed1.{KID}.".encode() in blob  # the file was read, and holds the sealed token
    _assert_nowhere(blob.decode("latin-1"), _needles(whsec, whsk, HEADER_VALUE))


# -- a row opens only with its own id -------------------------------------------------------


async def test_credentials_copied_to_another_row_do_not_open_there(store: Store) -> None:
    a_secret = generate_secret()
    await store.add_endpoint(_ep("ep-a", secrets=(a_secret,),
                                 policy=EndpointPolicy(headers=(("H", "a-only"),))))
    await store.add_endpoint(_ep("ep-b"))
    await _set_token(store, "ep-b", await _token(store, "ep-a"))

    b = await store.get_endpoint("ep-b")  # no exception
    assert b.secrets == () and b.secrets_until == ()
    assert b.policy.headers == ()
    assert b.policy.credential_error is not None
    assert "does not open" in b.policy.credential_error
    assert a_secret not in b.policy.credential_error
    # The other fields are read as usual, and the row it was copied from still opens.
    assert (b.url, b.enabled) == ("https://example.com/ep-b", True)
    a = await store.get_endpoint("ep-a")
    assert a.secrets == (a_secret,) and a.policy.credential_error is None
    assert a.policy.headers == (("H", "a-only"),)
    # Every way of reading endpoints keeps going.
    assert {e.id for e in await store.list_endpoints()} == {"ep-a", "ep-b"}
    assert {e.id for e in await store.subscribed_endpoints("x")} == {"ep-a", "ep-b"}
    found = await store.endpoints_by_id(["ep-a", "ep-b"])
    assert found["ep-b"].policy.credential_error == b.policy.credential_error


async def test_a_delivery_of_a_row_that_does_not_open_is_claimed_without_secrets(
        store: Store) -> None:
    """Its sender then fails it visibly (credentials); the claim itself does not crash."""
    await store.add_endpoint(_ep("ep-a"))
    await store.add_endpoint(_ep("ep-b"))
    await _set_token(store, "ep-b", await _token(store, "ep-a"))
    now = datetime.now(UTC)
    base = {"event_type": None, "idempotency_key": None, "payload": b"{}", "status": "pending",
            "attempts": 0, "next_attempt_at": now - timedelta(seconds=1), "locked_until": None,
            "created_at": now, "updated_at": now}
    async with store.engine.begin() as conn:
        await conn.execute(deliveries.insert(), [{**base, "id": "da", "endpoint_id": "ep-a"},
                                                 {**base, "id": "db", "endpoint_id": "ep-b"}])
    ready, dead = await store.claim_due(10, 60)
    assert dead == 0
    by_id = {d.id: d for d in ready}
    assert set(by_id) == {"da", "db"}
    assert by_id["db"].secrets == ()
    assert by_id["db"].policy.credential_error
    assert by_id["da"].secrets and by_id["da"].policy.credential_error is None


async def test_changing_credentials_that_do_not_open_is_refused_and_changes_nothing(
        store: Store) -> None:
    await store.add_endpoint(_ep("ep-a"))
    await store.add_endpoint(_ep("ep-b"))
    copied = await _token(store, "ep-a")
    await _set_token(store, "ep-b", copied)
    with pytest.raises(SealError):
        await store.rotate_secret("ep-b", generate_secret(), overlap_seconds=60)
    with pytest.raises(SealError):
        await store.set_headers("ep-b", [("H", "v")])
    assert await _token(store, "ep-b") == copied


async def test_a_token_from_a_deleted_endpoint_does_not_open_on_a_new_row_of_another_id(
        store: Store) -> None:
    secret = generate_secret()
    await store.add_endpoint(_ep("ep-old", secrets=(secret,)))
    token = await _token(store, "ep-old")
    await store.delete_endpoint("ep-old")
    await store.add_endpoint(_ep("ep-new"))
    await _set_token(store, "ep-new", token)
    new = await store.get_endpoint("ep-new")
    assert new.secrets == () and new.policy.credential_error


# -- a ring without the row's key -----------------------------------------------------------


async def test_a_ring_without_the_rows_key_names_the_key(store: Store) -> None:
    secret = generate_secret()
    await store.add_endpoint(_ep("ep-a", secrets=(secret,),
                                 policy=EndpointPolicy(headers=(("H", HEADER_VALUE),))))
    blind = Store(store.engine, _ring_without(store))
    ep = await blind.get_endpoint("ep-a")  # no exception
    assert ep.secrets == () and ep.policy.headers == ()
    error = ep.policy.credential_error
    assert error is not None
    assert f"'{KID}'" in error  # the key it needs
    assert "a ring without the test key" in error and "other" in error  # where it looked
    assert secret not in error and HEADER_VALUE not in error
    # Reading with it changed nothing: the right ring still opens the row.
    assert (await store.get_endpoint("ep-a")).secrets == (secret,)
    assert await blind.key_usage() == {KID: 1}


async def test_a_ring_without_the_key_still_reads_rows_it_can_open(store: Store) -> None:
    other_item = generate_key("other")
    both = Store(store.engine, store.keys.with_key(other_item))
    await store.add_endpoint(_ep("ep-test"))  # sealed under the tests' key
    mine = await both.add_endpoint(_ep("ep-other"))  # sealed under "other"
    only_other = Store(store.engine, KeyRing.parse(other_item))
    found = await only_other.endpoints_by_id(["ep-test", "ep-other"])
    assert found["ep-other"].secrets == mine.secrets
    assert found["ep-other"].policy.credential_error is None
    assert found["ep-test"].secrets == ()
    assert f"'{KID}'" in (found["ep-test"].policy.credential_error or "")
    assert await store.key_usage() == {KID: 1, "other": 1}


# -- re-sealing under a new key -------------------------------------------------------------


class _CountingEngine:
    """The store's engine, counting the transactions begun through it."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.begun = 0
        self.connected = 0

    def begin(self) -> Any:
        self.begun += 1
        return self._engine.begin()

    def connect(self) -> Any:
        self.connected += 1
        return self._engine.connect()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


async def _five_endpoints(store: Store) -> dict[str, Endpoint]:
    t0 = datetime.now(UTC)
    for n in range(1, 6):
        await store.add_endpoint(_ep(f"ep-{n}", policy=EndpointPolicy(
            headers=((f"X-Key-{n}", f"value-{n}"),))))
    await store.rotate_secret("ep-3", generate_secret(), overlap_seconds=600, now=t0)
    whsk, _ = generate_signing_key()
    await store.rotate_secret("ep-5", whsk, overlap_seconds=0, now=t0)
    return {ep.id: ep for ep in await store.list_endpoints()}


def _credentials_of(ep: Endpoint) -> tuple[Any, ...]:
    return ep.secrets, ep.secrets_until, ep.policy.headers, ep.policy.credential_error


async def test_reseal_moves_every_row_to_the_new_first_key_in_chunks(store: Store) -> None:
    before = await _five_endpoints(store)
    assert before["ep-3"].secrets_until[1] is not None  # an overlap to carry over
    tokens_before = {i: await _token(store, i) for i in before}
    new_item = generate_key("new")
    counting = _CountingEngine(store.engine)
    resealer = Store(counting, store.keys.with_key(new_item))  # type: ignore[arg-type]

    assert await resealer.key_usage() == {KID: 5}
    assert await resealer.reseal(chunk=2) == 5
    assert counting.connected >= 3 and counting.begun == 5  # 3 chunk reads, a write per row
    assert await resealer.key_usage() == {"new": 5}
    for endpoint_id, ep in before.items():
        token = await _token(store, endpoint_id)
        assert token != tokens_before[endpoint_id]
        assert sealed_key_id(token) == "new"
        assert _credentials_of(await resealer.get_endpoint(endpoint_id)) == _credentials_of(ep)

    # The old key can go now: a ring of the new key alone opens every row.
    only_new = Store(store.engine, KeyRing.parse(new_item))
    after = {ep.id: ep for ep in await only_new.list_endpoints()}
    assert {i: _credentials_of(ep) for i, ep in after.items()} == {
        i: _credentials_of(ep) for i, ep in before.items()}
    # ...and a ring of the old key alone no longer does.
    old = await store.get_endpoint("ep-1")
    assert old.secrets == () and "'new'" in (old.policy.credential_error or "")


async def test_reseal_again_does_nothing(store: Store) -> None:
    await _five_endpoints(store)
    resealer = Store(store.engine, store.keys.with_key(generate_key("new")))
    assert await resealer.reseal(chunk=2) == 5
    tokens = {i: await _token(store, i) for i in (f"ep-{n}" for n in range(1, 6))}
    assert await resealer.reseal(chunk=2) == 0
    assert await resealer.reseal() == 0
    assert {i: await _token(store, i) for i in tokens} == tokens


async def test_reseal_skips_rows_already_under_the_new_key(store: Store) -> None:
    resealer = Store(store.engine, store.keys.with_key(generate_key("new")))
    for n in (1, 3, 5):
        await store.add_endpoint(_ep(f"ep-{n}"))
    for n in (2, 4):
        await resealer.add_endpoint(_ep(f"ep-{n}"))
    untouched = {i: await _token(store, i) for i in ("ep-2", "ep-4")}
    assert await resealer.key_usage() == {KID: 3, "new": 2}
    assert await resealer.reseal(chunk=2) == 3
    assert await resealer.key_usage() == {"new": 5}
    assert {i: await _token(store, i) for i in untouched} == untouched


@pytest.mark.parametrize(("rows", "chunk", "reads"), [
    (0, 2, 1), (1, 2, 1), (2, 2, 2), (4, 2, 3), (5, 1, 6), (5, 500, 1)])
async def test_reseal_chunking(store: Store, rows: int, chunk: int, reads: int) -> None:
    """Rows are read `chunk` at a time (keyset), each re-sealed in a short transaction."""
    for n in range(rows):
        await store.add_endpoint(_ep(f"ep-{n}"))
    counting = _CountingEngine(store.engine)
    resealer = Store(counting, store.keys.with_key(generate_key("new")))  # type: ignore[arg-type]
    assert await resealer.reseal(chunk=chunk) == rows
    assert counting.connected >= reads
    assert counting.begun == rows  # one compare-and-set write per row
    assert await resealer.key_usage() == ({"new": rows} if rows else {})


async def test_reseal_leaves_a_row_that_does_not_open_and_does_all_the_others(
        store: Store) -> None:
    await _five_endpoints(store)
    await _set_token(store, "ep-4", await _token(store, "ep-1"))  # ep-4 cannot open
    resealer = Store(store.engine, store.keys.with_key(generate_key("new")))
    with pytest.raises(SealError, match="4 endpoints re-sealed; 1 could not be opened"):
        await resealer.reseal(chunk=2)
    assert await resealer.key_usage() == {"new": 4, KID: 1}
    assert sealed_key_id(await _token(store, "ep-4")) == KID
    for n in (1, 2, 3, 5):
        assert (await resealer.get_endpoint(f"ep-{n}")).policy.credential_error is None


async def test_reseal_names_the_row_that_does_not_open(store: Store) -> None:
    await _five_endpoints(store)
    await _set_token(store, "ep-4", await _token(store, "ep-1"))
    resealer = Store(store.engine, store.keys.with_key(generate_key("new")))
    with pytest.raises(SealError, match="ep-4"):
        await resealer.reseal(chunk=2)


async def test_a_rotation_committed_during_set_headers_is_kept(
        store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = generate_secret(), generate_secret()
    await store.add_endpoint(_ep("ep-a", secrets=(first,)))

    async def rotate_elsewhere() -> None:
        engine = create_engine(Settings(database_url=database_url))
        try:
            await Store(engine, store.keys).rotate_secret("ep-a", second, overlap_seconds=0)
        finally:
            await engine.dispose()

    real_seal = endpoint_records.seal_credentials
    raced = []

    def seal_after_a_rotation(*args: Any) -> str:
        if not raced:  # another process rotates between the read and the write
            raced.append(True)
            _in_another_thread(rotate_elsewhere)
        return real_seal(*args)

    monkeypatch.setattr(endpoint_records, "seal_credentials", seal_after_a_rotation)
    await store.set_headers("ep-a", [("H", "v")])
    assert raced
    ep = await store.get_endpoint("ep-a")
    assert ep.policy.headers == (("H", "v"),)
    assert ep.secrets == (second,)  # the rotation survives


async def test_a_rotation_committed_during_reseal_is_kept(
        store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = generate_secret(), generate_secret()
    await store.add_endpoint(_ep("ep-a", secrets=(first,)))

    async def rotate_elsewhere() -> None:
        engine = create_engine(Settings(database_url=database_url))
        try:
            await Store(engine, store.keys).rotate_secret("ep-a", second, overlap_seconds=0)
        finally:
            await engine.dispose()

    real_open = endpoint_records.open_credentials
    raced = []

    def open_after_a_rotation(*args: Any) -> Any:
        opened = real_open(*args)
        if not raced:  # another process rotates after reseal read the row
            raced.append(True)
            _in_another_thread(rotate_elsewhere)
        return opened

    monkeypatch.setattr(endpoint_records, "open_credentials", open_after_a_rotation)
    resealer = Store(store.engine, store.keys.with_key(generate_key("new")))
    assert await resealer.reseal() == 1
    assert raced
    assert (await resealer.get_endpoint("ep-a")).secrets == (second,)
