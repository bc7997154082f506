"""`webhooks` (worker.cli.main) in-process, on a fresh SQLite file named by DATABASE_URL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from worker.cli import main
from worker.core.signing import generate_secret, secret_key
from worker.db.connection import create_engine
from worker.db.schema import deliveries
from worker.db.store import Store, open_store
from worker.settings import Settings, get_settings


@pytest.fixture
def cli_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """DATABASE_URL set to a fresh SQLite file; the cached settings cleared around the test."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


Run = tuple[int, str, str]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(cli_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The fresh database, migrated through the CLI."""
    code, out, _ = _run(capsys, "db", "upgrade")
    assert code == 0, out
    return cli_url


def _list(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    code, out, _ = _run(capsys, "endpoints", "list", "--json")
    assert code == 0
    value = json.loads(out)
    assert isinstance(value, list)
    return value


def _assert_error(result: Run) -> str:
    code, out, err = result
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("webhooks: error: ")
    return lines[0]


def _with_store(url: str, work: Any) -> Any:
    async def run() -> Any:
        settings = Settings(database_url=url)
        engine = create_engine(settings)
        try:
            return await work(open_store(engine, settings))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_db_upgrade(cli_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "db", "upgrade")
    assert code == 0
    assert "database at revision head" in out
    assert "cli.db" in out
    # Twice is fine, and the tables are there.
    assert _run(capsys, "db", "upgrade")[0] == 0
    assert _list(capsys) == []


def test_endpoints_add_json_generates_secret(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "endpoints", "add", "--url", "https://hooks.example/in",
                          "--id", "ep-1", "--description", "orders", "--json")
    assert code == 0, err
    ep = json.loads(out)
    assert ep["id"] == "ep-1"
    assert ep["url"] == "https://hooks.example/in"
    assert ep["enabled"] is True
    assert ep["disabled_reason"] is None
    assert ep["description"] == "orders"
    assert ep["event_types"] == []
    assert ep["created_at"]
    (secret,) = ep["secrets"]
    assert secret.startswith("whsec_")
    assert len(secret_key(secret)) >= 24
    assert _list(capsys) == [ep]


def test_endpoints_add_plain_output_and_generated_id(db: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "endpoints", "add", "--url", "http://127.0.0.1:8080/h")
    assert code == 0
    (ep,) = _list(capsys)
    assert ep["id"].startswith("ep_")
    assert f"endpoint {ep['id']}" in out
    assert ep["secrets"][0] in out


def test_endpoints_add_keeps_given_secret_and_event_types(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = generate_secret()
    code, out, _ = _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1",
                        "--secret", secret, "--event-type", "order.created",
                        "--event-type", "order.paid", "--event-type", "order.created",
                        "--json")
    assert code == 0
    ep = json.loads(out)
    assert ep["secrets"] == [secret]
    assert ep["event_types"] == ["order.created", "order.paid"]
    subscribed = _with_store(db, lambda s: s.subscribed_endpoints("order.paid"))
    assert [e.id for e in subscribed] == ["ep-1"]
    assert _with_store(db, lambda s: s.subscribed_endpoints("user.created")) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "ftp://files.example/in"],
        ["--url", "https:///no-host"],
        ["--url", "http://"],
        ["--url", "https://user:pass@hooks.example/in"],
        ["--url", "https://hooks.example/in#frag"],
        ["--url", "https://hooks.example/in", "--id=-leading-dash"],
        ["--url", "https://hooks.example/in", "--id", "has space"],
        ["--url", "https://hooks.example/in", "--id", "x" * 129],
        ["--url", "https://hooks.example/in", "--secret", "not-a-secret"],
        ["--url", "https://hooks.example/in", "--secret", "whsec_dG9vc2hvcnQ="],
        ["--url", "https://hooks.example/in", "--secret", "whsec_***"],
        ["--url", "https://hooks.example/in", "--event-type", ""],
    ],
)
def test_endpoints_add_invalid_input(db: str, capsys: pytest.CaptureFixture[str],
                                     args: list[str]) -> None:
    _assert_error(_run(capsys, "endpoints", "add", *args))
    assert _list(capsys) == []


def test_endpoints_add_duplicate_id(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1")[0] == 0
    line = _assert_error(_run(capsys, "endpoints", "add", "--url", "https://b.example/",
                              "--id", "ep-1"))
    assert "ep-1" in line
    (ep,) = _list(capsys)
    assert ep["url"] == "https://a.example/"


def test_endpoints_list_plain(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "endpoints", "list")
    assert (code, out) == (0, "no endpoints\n")
    _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1")
    _run(capsys, "endpoints", "add", "--url", "https://b.example/", "--id", "ep-2",
         "--event-type", "a", "--event-type", "b")
    code, out, _ = _run(capsys, "endpoints", "list")
    assert code == 0
    assert out.splitlines() == [
        "ep-1\tenabled\t*\thttps://a.example/",
        "ep-2\tenabled\ta,b\thttps://b.example/",
    ]
    assert [ep["id"] for ep in _list(capsys)] == ["ep-1", "ep-2"]


def test_endpoints_disable_enable(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1")
    code, out, _ = _run(capsys, "endpoints", "disable", "ep-1", "--reason", "x")
    assert (code, out) == (0, "endpoint ep-1 disabled\n")
    (ep,) = _list(capsys)
    assert (ep["enabled"], ep["disabled_reason"]) == (False, "x")
    assert "ep-1\tdisabled (x)\t" in _run(capsys, "endpoints", "list")[1]

    code, out, _ = _run(capsys, "endpoints", "enable", "ep-1")
    assert (code, out) == (0, "endpoint ep-1 enabled\n")
    (ep,) = _list(capsys)
    assert (ep["enabled"], ep["disabled_reason"]) == (True, None)

    assert _run(capsys, "endpoints", "disable", "ep-1")[0] == 0
    (ep,) = _list(capsys)
    assert (ep["enabled"], ep["disabled_reason"]) == (False, "disabled by operator")

    _assert_error(_run(capsys, "endpoints", "disable", "nope"))
    _assert_error(_run(capsys, "endpoints", "enable", "nope"))


def test_endpoints_rotate_secret(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    first = generate_secret()
    _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1",
         "--secret", first)

    code, out, _ = _run(capsys, "endpoints", "rotate-secret", "ep-1")
    assert code == 0
    (ep,) = _list(capsys)
    second, kept = ep["secrets"]
    assert kept == first
    assert second != first and len(secret_key(second)) >= 24
    assert second in out

    third = generate_secret()
    assert _run(capsys, "endpoints", "rotate-secret", "ep-1", "--secret", third,
                "--drop-old")[0] == 0
    assert _list(capsys)[0]["secrets"] == [third]

    _assert_error(_run(capsys, "endpoints", "rotate-secret", "ep-1", "--secret", "whsec_x"))
    assert _list(capsys)[0]["secrets"] == [third]
    _assert_error(_run(capsys, "endpoints", "rotate-secret", "nope"))


def _seed_deliveries(url: str) -> None:
    now = datetime.now(UTC)
    base = {"endpoint_id": "ep-1", "event_type": None, "idempotency_key": None, "payload": b"{}",
            "attempts": 0, "next_attempt_at": None, "locked_until": None,
            "last_status_code": None, "last_error": None, "created_at": now, "updated_at": now}
    rows = [
        {"id": "p1", "status": "pending", "next_attempt_at": now + timedelta(hours=1)},
        {"id": "p2", "status": "pending", "next_attempt_at": now + timedelta(hours=1)},
        {"id": "s1", "status": "succeeded"},
        {"id": "f1", "status": "failed", "attempts": 4},
        {"id": "f2", "status": "failed", "attempts": 4},
        {"id": "r1", "status": "rejected"},
    ]

    async def put(store: Store) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(insert(deliveries), [{**base, **r} for r in rows])

    _with_store(url, put)


def test_deliveries_stats(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "deliveries", "stats", "--json")
    assert (code, json.loads(out)) == (0, {})
    _seed_deliveries(db)
    code, out, _ = _run(capsys, "deliveries", "stats", "--json")
    assert code == 0
    assert json.loads(out) == {"pending": 2, "succeeded": 1, "failed": 2, "rejected": 1}
    code, out, _ = _run(capsys, "deliveries", "stats")
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["pending", "2"], ["succeeded", "1"], ["failed", "2"], ["rejected", "1"]]


def test_deliveries_replay(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_deliveries(db)
    _assert_error(_run(capsys, "deliveries", "replay"))
    _assert_error(_run(capsys, "deliveries", "replay", "--endpoint", "ep-1"))

    code, out, _ = _run(capsys, "deliveries", "replay", "--id", "f1", "--id", "s1")
    assert code == 0
    assert out.startswith("1 deliveries queued for replay")
    code, out, _ = _run(capsys, "deliveries", "replay", "--failed", "--endpoint", "other")
    assert (code, out.split()[0]) == (0, "0")
    code, out, _ = _run(capsys, "deliveries", "replay", "--failed")
    assert (code, out.split()[0]) == (0, "1")
    counts = _with_store(db, lambda s: s.status_counts())
    assert counts == {"pending": 4, "succeeded": 1, "rejected": 1}


def test_deliveries_list_filters_by_status_and_endpoint(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed_deliveries(db)
    code, out, _ = _run(capsys, "deliveries", "list", "--status", "failed", "--json")
    assert code == 0
    rows = json.loads(out)
    assert sorted(r["id"] for r in rows) == ["f1", "f2"]
    assert all("payload" not in r for r in rows)
    code, out, _ = _run(capsys, "deliveries", "list", "--endpoint", "nobody")
    assert (code, out.strip()) == (0, "no deliveries")
    code, out, _ = _run(capsys, "deliveries", "list", "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 2
