"""`webhooks deliveries ...` (worker/cli_deliveries.py) and the history it reads and writes
(worker/db/history.py), on SQLite and PostgreSQL.

Attempts are made the way the worker makes them: claimed with `Store.claim_due`, judged by
`worker.core.outcome.decide`, written by `Store.record_attempts`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from worker.cli import main
from worker.cli_support import with_store
from worker.core.models import Endpoint, ErrorKind, HttpResult
from worker.core.outcome import decide
from worker.core.signing import generate_secret
from worker.db.schema import attempts, deliveries
from worker.db.store import Store
from worker.settings import Settings, get_settings

Run = tuple[int, str, str]
HTTP_500 = HttpResult(status_code=500, duration_ms=41.0, response_excerpt='{"error": "boom"}')
HTTP_200 = HttpResult(status_code=200, duration_ms=12.0, response_excerpt="ok")
BLOCKED = HttpResult(error_kind=ErrorKind.BLOCKED,
                     error="destination blocked by network policy: 10.0.0.7")


# -- helpers (as in tests/test_cli.py) -------------------------------------------------------


@pytest.fixture
def cli_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """DATABASE_URL set to a migrated, empty database: SQLite, then PostgreSQL."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_error(result: Run) -> str:
    code, out, err = result
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("webhooks: error: ")
    return lines[0]


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _with_store(url: str, work: Any) -> Any:
    # A breaker that never opens: these tests fail deliveries on purpose.
    return with_store(Settings(database_url=url, breaker_failures=100_000), work)


def _endpoint(url: str, endpoint_id: str = "ep-1", enabled: bool = True) -> None:
    async def add(store: Store) -> None:
        await store.add_endpoint(Endpoint(id=endpoint_id, url="https://a.example/hook",
                                          secrets=(generate_secret(),)))
        if not enabled:
            await store.set_endpoint_enabled(endpoint_id, False, "by a test")

    _with_store(url, add)


def _seed(url: str, *rows: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    base = {"endpoint_id": "ep-1", "event_type": "order.created", "idempotency_key": None,
            "payload": b'{"order": 1}', "status": "pending", "attempts": 0,
            "next_attempt_at": now, "locked_until": None, "last_status_code": None,
            "last_error": None, "created_at": now, "updated_at": now}

    async def put(store: Store) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(insert(deliveries), [{**base, **r} for r in rows])

    _with_store(url, put)


def _attempt(url: str, results: dict[str, HttpResult],
             schedule: tuple[float, ...] = (0.0,)) -> dict[str, tuple[int, str]]:
    """One round of the worker: claim what is due, answer each of `results` as given, write
    the outcomes; returns (attempt number, next status) by delivery id."""
    async def work(store: Store) -> dict[str, tuple[int, str]]:
        ready, _ = await store.claim_due(100, 60)
        records = [decide(d, results[d.id], attempted_at=datetime.now(UTC), schedule=schedule,
                          jitter=0.0, rand=0.5, max_retry_after=60.0)
                   for d in ready if d.id in results]
        await store.record_attempts(records)
        await store.release([d.id for d in ready if d.id not in results], datetime.now(UTC))
        return {r.delivery.id: (r.attempt_number, r.next_status.value) for r in records}

    return _with_store(url, work)


def _rows(url: str) -> dict[str, dict[str, Any]]:
    async def read(store: Store) -> dict[str, dict[str, Any]]:
        async with store.engine.connect() as conn:
            rows = await conn.execute(select(deliveries))
            return {row.id: dict(row._mapping) for row in rows}

    return _with_store(url, read)


def _attempt_numbers(url: str, delivery_id: str) -> list[int]:
    async def read(store: Store) -> list[int]:
        async with store.engine.connect() as conn:
            rows = await conn.execute(select(attempts.c.attempt_number)
                                      .where(attempts.c.delivery_id == delivery_id)
                                      .order_by(attempts.c.id))
            return list(rows.scalars())

    return _with_store(url, read)


def _columns(header: str) -> list[int]:
    """Where each column of a table's header starts."""
    return [m.start() for m in re.finditer(r"(?:(?<=  )|^)\S", header)]


# -- list ------------------------------------------------------------------------------------


def test_list_is_an_aligned_table_newest_first(cli_db: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    _seed(cli_db,
          {"id": "msg_old", "status": "failed", "created_at": now - timedelta(hours=3),
           "last_error": "HTTP 500 " + "x" * 200, "attempts": 4},
          {"id": "msg_a_much_longer_id", "status": "succeeded", "event_type": None,
           "endpoint_id": "endpoint-with-a-long-name", "created_at": now - timedelta(hours=1)},
          {"id": "msg_new", "status": "pending", "created_at": now})
    code, out, err = _run(capsys, "deliveries", "list")
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "STATUS", "ENDPOINT", "EVENT", "TYPE", "ATTEMPTS",
                              "CREATED", "(UTC)", "LAST", "ERROR"]
    assert [line.split()[0] for line in lines] == ["msg_new", "msg_a_much_longer_id", "msg_old"]
    starts = _columns(header)
    assert len(starts) == 7
    for line in lines:
        # Every cell starts under its heading.
        assert all(line[i - 2:i] == "  " and line[i] != " " for i in starts[1:6]), line
    assert lines[1].split()[3] == "-"  # no event type
    old = lines[2]
    assert old.endswith("...") and len(old) - starts[6] == 60  # the last error, cut
    assert f"{(now - timedelta(hours=3)):%Y-%m-%d %H:%M}" in old


def test_list_filters(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    _seed(cli_db,
          {"id": "d1", "status": "failed", "created_at": now - timedelta(days=3)},
          {"id": "d2", "status": "failed", "endpoint_id": "ep-2",
           "created_at": now - timedelta(hours=5)},
          {"id": "d3", "status": "succeeded", "event_type": "user.deleted",
           "created_at": now - timedelta(hours=1)},
          {"id": "d4", "status": "held", "created_at": now - timedelta(minutes=10)},
          {"id": "d5", "status": "rejected", "created_at": now})

    def ids(*flags: str) -> list[str]:
        return [row["id"] for row in _json(capsys, "deliveries", "list", *flags)]

    assert ids() == ["d5", "d4", "d3", "d2", "d1"]
    assert ids("--status", "failed") == ["d2", "d1"]
    assert ids("--status", "held") == ["d4"]
    assert ids("--endpoint", "ep-2") == ["d2"]
    assert ids("--event-type", "user.deleted") == ["d3"]
    assert ids("--since", "2h") == ["d5", "d4", "d3"]
    assert ids("--until", "2h") == ["d2", "d1"]
    assert ids("--since", "1d", "--until", "30m") == ["d3", "d2"]
    assert ids("--since", (now - timedelta(hours=6)).isoformat()) == ["d5", "d4", "d3", "d2"]
    # A time without a zone is UTC.
    naive = (now - timedelta(hours=6)).replace(tzinfo=None).isoformat()
    assert ids("--since", naive) == ["d5", "d4", "d3", "d2"]
    assert ids("--since", "1w", "--status", "failed", "--endpoint", "ep-1") == ["d1"]
    assert ids("--limit", "2") == ["d5", "d4"]
    assert ids("--endpoint", "nobody") == []
    code, out, _ = _run(capsys, "deliveries", "list", "--endpoint", "nobody")
    assert (code, out) == (0, "no deliveries\n")


def test_list_json_fields(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _endpoint(cli_db)
    _seed(cli_db, {"id": "d1", "idempotency_key": "k-1"})
    _attempt(cli_db, {"d1": HTTP_500}, schedule=(0.0, 0.0))
    [row] = _json(capsys, "deliveries", "list")
    assert set(row) == {"id", "task_id", "status", "endpoint_id", "event_type", "idempotency_key",
                        "attempts", "retry_attempts", "next_attempt_at", "last_status_code",
                        "last_error", "last_outcome", "created_at", "updated_at"}
    assert (row["status"], row["attempts"], row["retry_attempts"]) == ("pending", 1, 1)
    assert (row["last_status_code"], row["last_error"], row["last_outcome"]) == (
        500, "HTTP 500", "retry")
    assert row["idempotency_key"] == "k-1"
    assert datetime.fromisoformat(row["created_at"]).tzinfo is not None


def test_list_blocked(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _endpoint(cli_db)
    _seed(cli_db, {"id": "blocked"}, {"id": "plain-fail"}, {"id": "ok"})
    assert _attempt(cli_db, {"blocked": BLOCKED, "plain-fail": HTTP_500, "ok": HTTP_200},
                    schedule=()) == {"blocked": (1, "failed"), "plain-fail": (1, "failed"),
                                     "ok": (1, "succeeded")}

    def ids(*flags: str) -> list[str]:
        return sorted(row["id"] for row in _json(capsys, "deliveries", "list", *flags))

    assert ids("--status", "failed") == ["blocked", "plain-fail"]
    assert ids("--blocked") == ["blocked"]
    assert ids("--status", "blocked") == ["blocked"]
    assert ids("--blocked", "--status", "succeeded") == []
    [row] = _json(capsys, "deliveries", "list", "--blocked")
    assert (row["last_outcome"], row["last_error"]) == ("blocked", BLOCKED.error)
    code, out, _ = _run(capsys, "deliveries", "list", "--status", "blocked")
    assert code == 0 and "destination blocked by network policy" in out


@pytest.mark.parametrize("flags", [
    ["--limit", "0"], ["--limit", "-5"], ["--limit", "10001"], ["--limit", "ten"],
    ["--limit", "1.5"], ["--status", "done"], ["--status", "FAILED"],
    ["--since", "yesterday"], ["--since", "5 minutes"], ["--since=-5m"], ["--since", ""],
    ["--until", "2024-13-01"], ["--since", "999999999w"],
    ["--since", "1h", "--until", "2h"], ["--since", "1h", "--until", "1h"],
])
def test_list_bad_input_is_one_line(cli_db: str, capsys: pytest.CaptureFixture[str],
                                    flags: list[str]) -> None:
    line = _assert_error(_run(capsys, "deliveries", "list", *flags))
    assert flags[0].split("=")[0] in line


def test_usage_errors_are_one_line(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["deliveries", "show"], ["deliveries", "recover", "ep-1"],
                 ["deliveries", "resend"], ["deliveries", "list", "--limit"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        out, err = capsys.readouterr()
        assert (exit_.value.code, out) == (2, "")
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("webhooks: error: deliveries "), err


# -- show ------------------------------------------------------------------------------------


def test_show_every_attempt(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _endpoint(cli_db)
    _seed(cli_db, {"id": "d1", "payload": b'{"order": 7, "items": [1, 2]}'})
    _attempt(cli_db, {"d1": HttpResult(error_kind=ErrorKind.TIMEOUT, error="read timed out",
                                       duration_ms=10_000.0)})
    _attempt(cli_db, {"d1": HTTP_500})
    code, out, err = _run(capsys, "deliveries", "show", "d1")
    assert code == 0, err
    assert re.search(r"^status\s+failed$", out, re.MULTILINE)
    assert re.search(r"^endpoint\s+ep-1$", out, re.MULTILINE)
    assert re.search(r"^event type\s+order\.created$", out, re.MULTILINE)
    assert re.search(r"^attempts\s+2$", out, re.MULTILINE)
    assert re.search(r"^last result\s+HTTP 500$", out, re.MULTILINE)
    assert "webhooks deliveries replay --id d1" in out
    assert '  {\n    "order": 7,\n    "items": [\n      1,\n      2\n    ]\n  }\n' in out
    table = out[out.index("\nattempts\n") + len("\nattempts\n"):].splitlines()
    assert table[0].split() == ["#", "TIME", "(UTC)", "CODE", "OUTCOME", "KIND", "MS",
                                "ERROR"]
    first, second, excerpt = table[1].split(), table[2].split(), table[3].strip()
    assert first[0] == "1" and first[3:] == ["-", "retry", "timeout", "10000", "read",
                                             "timed", "out"]
    assert second[0] == "2" and second[3:] == ["500", "failed", "http_status", "41",
                                               "HTTP", "500"]
    assert excerpt == 'response: {"error": "boom"}'


def test_show_json(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _endpoint(cli_db)
    payload = '{"b": 1, "a": "é"}'.encode()
    _seed(cli_db, {"id": "d1", "payload": payload})
    _attempt(cli_db, {"d1": HTTP_200})
    shown = _json(capsys, "deliveries", "show", "d1")
    delivery = shown["delivery"]
    assert (delivery["status"], delivery["attempts"]) == ("succeeded", 1)
    assert json.loads(delivery["payload"]) == {"b": 1, "a": "é"}
    assert list(json.loads(delivery["payload"])) == ["b", "a"]  # as sent, not re-sorted
    assert (delivery["payload_bytes"], delivery["payload_truncated"]) == (len(payload), False)
    [attempt] = shown["attempts"]
    assert attempt == {"number": 1, "attempted_at": attempt["attempted_at"],
                       "status_code": 200, "outcome": "success", "error_kind": None,
                       "duration_ms": 12.0, "error": None, "response_excerpt": "ok"}
    assert shown["attempts_left_out"] == 0
    code, out, _ = _run(capsys, "deliveries", "show", "d1")
    assert code == 0 and "webhooks deliveries resend d1" in out


def test_show_bounds_the_payload(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    big = json.dumps({"items": list(range(5000))}).encode()
    huge = b'{"blob": "' + b"y" * 100_000 + b'"}'
    _seed(cli_db, {"id": "big", "payload": big}, {"id": "huge", "payload": huge},
          {"id": "raw", "status": "rejected", "payload": b"not json \xff at all"},
          {"id": "none", "status": "rejected", "payload": None})
    for delivery_id, size in (("big", len(big)), ("huge", len(huge))):
        delivery = _json(capsys, "deliveries", "show", delivery_id)["delivery"]
        assert len(delivery["payload"]) == 4096
        assert (delivery["payload_bytes"], delivery["payload_truncated"]) == (size, True)
        code, out, _ = _run(capsys, "deliveries", "show", delivery_id)
        assert code == 0 and f"payload      {size} bytes (the first 4096 characters)" in out
        assert len(out) < 6000
    # `big` was pretty-printed before it was cut; `huge` is too big to parse: shown raw.
    assert _json(capsys, "deliveries", "show", "big")["delivery"]["payload"].startswith(
        '{\n  "items": [\n    0,\n')
    assert _json(capsys, "deliveries", "show", "huge")["delivery"]["payload"].startswith(
        '{"blob": "yyy')
    raw = _json(capsys, "deliveries", "show", "raw")["delivery"]
    assert (raw["payload"], raw["payload_truncated"]) == ("not json \ufffd at all", False)
    none = _json(capsys, "deliveries", "show", "none")["delivery"]
    assert (none["payload"], none["payload_bytes"]) == ("", None)
    code, out, _ = _run(capsys, "deliveries", "show", "none")
    assert code == 0 and "payload      none" in out and "attempts     none yet" in out


def test_show_unknown_id(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no delivery with id 'msg_nope'" in _assert_error(
        _run(capsys, "deliveries", "show", "msg_nope"))
    _assert_error(_run(capsys, "deliveries", "show", "msg_nope", "--json"))


def test_show_by_the_task_id_of_a_single_event(cli_db: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`.delay()` returned a task id: `show <task id>` shows the one delivery it became."""
    _endpoint(cli_db)
    _seed(cli_db, {"id": "msg_one", "task_id": "5d2c1e0a-task", "payload": b'{"n": 1}'})
    code, out, err = _run(capsys, "deliveries", "show", "5d2c1e0a-task")
    assert code == 0, err
    assert out.startswith("delivery     msg_one\n")
    assert re.search(r"^task\s+5d2c1e0a-task$", out, re.MULTILINE)
    shown = _json(capsys, "deliveries", "show", "5d2c1e0a-task")["delivery"]
    assert (shown["id"], shown["task_id"]) == ("msg_one", "5d2c1e0a-task")
    # By its delivery id, the same, naming its task.
    code, out, _ = _run(capsys, "deliveries", "show", "msg_one")
    assert code == 0 and re.search(r"^task\s+5d2c1e0a-task$", out, re.MULTILINE)


def test_show_by_the_task_id_of_a_batch_lists_its_deliveries(
        cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A batch or fan-out task became many deliveries, rejected ones included."""
    _endpoint(cli_db)
    _endpoint(cli_db, "ep-2")
    _seed(cli_db, {"id": "msg_a", "task_id": "batch-1"},
          {"id": "msg_b", "task_id": "batch-1", "endpoint_id": "ep-2"},
          {"id": "msg_c!rejected", "task_id": "batch-1", "endpoint_id": "nope",
           "status": "rejected", "last_error": "unknown_endpoint: no endpoint with id 'nope'"},
          {"id": "msg_other", "task_id": "batch-2"})
    code, out, err = _run(capsys, "deliveries", "show", "batch-1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "task batch-1: 3 deliveries"
    assert lines[1].split()[:2] == ["ID", "STATUS"]
    assert sorted(line.split()[0] for line in lines[2:5]) == ["msg_a", "msg_b", "msg_c!rejected"]
    assert "unknown_endpoint" in out and "msg_other" not in out
    assert lines[5].startswith("one of them: webhooks deliveries show msg_")
    shown = _json(capsys, "deliveries", "show", "batch-1")
    assert shown["task_id"] == "batch-1"
    assert sorted((d["id"], d["status"]) for d in shown["deliveries"]) == [
        ("msg_a", "pending"), ("msg_b", "pending"), ("msg_c!rejected", "rejected")]
    assert {d["task_id"] for d in shown["deliveries"]} == {"batch-1"}


def test_show_names_neither_a_delivery_nor_a_task(cli_db: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    line = _assert_error(_run(capsys, "deliveries", "show", "no-such-task"))
    assert line == ("webhooks: error: no delivery with id 'no-such-task', and no task with "
                    "that id")


# -- replay ----------------------------------------------------------------------------------


def test_replay_continues_numbering_and_restarts_the_budget(
    cli_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _endpoint(cli_db)
    _seed(cli_db, {"id": "d1"})
    # A schedule of one retry: two attempts, then failed.
    assert _attempt(cli_db, {"d1": HTTP_500}) == {"d1": (1, "pending")}
    assert _attempt(cli_db, {"d1": HTTP_500}) == {"d1": (2, "failed")}
    assert _attempt(cli_db, {"d1": HTTP_500}) == {}  # nothing due

    code, out, err = _run(capsys, "deliveries", "replay", "--id", "d1")
    assert (code, err) == (0, "")
    assert out.startswith("1 deliveries queued for replay")
    row = _rows(cli_db)["d1"]
    assert (row["status"], row["locked_until"]) == ("pending", None)
    assert row["next_attempt_at"] <= datetime.now(UTC)
    # The retry budget starts again: the first attempt after the replay is retried, not
    # failed on the spot; the whole schedule is there once more.
    assert _attempt(cli_db, {"d1": HTTP_500}) == {"d1": (3, "pending")}
    assert _attempt(cli_db, {"d1": HTTP_500}) == {"d1": (4, "failed")}

    # Shown and stored, the attempts are numbered on across the replay.
    shown = _json(capsys, "deliveries", "show", "d1")
    assert [a["number"] for a in shown["attempts"]] == [1, 2, 3, 4]
    assert (shown["delivery"]["attempts"], shown["delivery"]["retry_attempts"]) == (4, 2)
    assert _attempt_numbers(cli_db, "d1") == [1, 2, 3, 4]
    [listed] = _json(capsys, "deliveries", "list")
    assert listed["attempts"] == 4
    code, out, _ = _run(capsys, "deliveries", "show", "d1")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert [line.split()[:2] for line in out.splitlines()
            if re.match(r"  \d", line)] == [[str(n), today] for n in (1, 2, 3, 4)]


def test_replay_reports_every_id_it_could_not_replay(
    cli_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(cli_db,
          {"id": "f1", "status": "failed", "attempts": 4, "next_attempt_at": None},
          {"id": "f2", "status": "failed", "attempts": 4, "next_attempt_at": None},
          {"id": "s1", "status": "succeeded", "next_attempt_at": None},
          {"id": "r1", "status": "rejected", "next_attempt_at": None},
          {"id": "h1", "status": "held", "endpoint_id": "ep-off", "next_attempt_at": None},
          {"id": "p1", "status": "pending"})
    code, out, err = _run(capsys, "deliveries", "replay", "--id", "f1", "--id", "s1", "--id",
                          "r1", "--id", "h1", "--id", "p1", "--id", "nope", "--id", "f1")
    assert code == 2
    assert out.startswith("1 deliveries queued for replay")
    lines = err.splitlines()
    assert len(lines) == 5 and all(line.startswith("webhooks: error: ") for line in lines)
    assert "'s1' succeeded" in lines[0] and "webhooks deliveries resend s1" in lines[0]
    assert "'r1' cannot be replayed: rejected events were never accepted" in lines[1]
    assert "'h1' is held" in lines[2] and "webhooks endpoints enable ep-off" in lines[2]
    assert "'p1' is pending already" in lines[3]
    assert "no delivery with id 'nope'" in lines[4]
    rows = _rows(cli_db)
    assert {i: r["status"] for i, r in rows.items()} == {
        "f1": "pending", "f2": "failed", "s1": "succeeded", "r1": "rejected", "h1": "held",
        "p1": "pending"}
    assert (rows["f1"]["attempts"], rows["f1"]["retry_base"]) == (4, 4)  # a fresh budget

    code, out, err = _run(capsys, "deliveries", "replay", "--id", "f2", "--id", "r1", "--json")
    assert code == 2
    assert json.loads(out) == {"replayed": 1, "ids": ["f2"], "refused": [
        {"id": "r1", "status": "rejected",
         "reason": "delivery 'r1' cannot be replayed: rejected events were never accepted"}]}
    assert len(err.splitlines()) == 1
    # Replayed already: pending now, so refused.
    code, out, err = _run(capsys, "deliveries", "replay", "--id", "f1", "--json")
    assert (code, json.loads(out)["replayed"]) == (2, 0)
    assert "'f1' is pending already" in err


def test_replay_of_only_bad_ids_exits_2(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _seed(cli_db, {"id": "s1", "status": "succeeded"})
    code, out, err = _run(capsys, "deliveries", "replay", "--id", "s1", "--json")
    assert code == 2
    assert json.loads(out) == {"replayed": 0, "ids": [], "refused": [
        {"id": "s1", "status": "succeeded",
         "reason": "delivery 's1' succeeded: 'webhooks deliveries resend s1' sends a copy as "
                   "a new delivery"}]}
    assert len(err.splitlines()) == 1


def test_replay_failed_by_endpoint_and_time(cli_db: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    _seed(cli_db,
          *({"id": f"a{i}", "status": "failed", "created_at": now - timedelta(minutes=i)}
            for i in range(5)),
          {"id": "old", "status": "failed", "created_at": now - timedelta(days=2)},
          {"id": "b0", "status": "failed", "endpoint_id": "ep-2"},
          {"id": "s0", "status": "succeeded"})
    assert _json(capsys, "deliveries", "replay", "--failed", "--endpoint", "ep-1",
                 "--since", "1h") == {"replayed": 5, "refused": []}
    assert _json(capsys, "deliveries", "replay", "--failed", "--endpoint", "ep-1") == {
        "replayed": 1, "refused": []}
    code, out, _ = _run(capsys, "deliveries", "replay", "--failed", "--until", "1h")
    assert (code, out.split()[0]) == (0, "0")
    code, out, _ = _run(capsys, "deliveries", "replay", "--failed")
    assert (code, out.split()[0]) == (0, "1")
    assert {i: r["status"] for i, r in _rows(cli_db).items()} == {
        **{f"a{i}": "pending" for i in range(5)}, "old": "pending", "b0": "pending",
        "s0": "succeeded"}


@pytest.mark.parametrize("flags", [
    [], ["--endpoint", "ep-1"], ["--since", "1h"], ["--id", "f1", "--failed"],
    ["--id", "f1", "--endpoint", "ep-1"], ["--id", "f1", "--since", "1h"],
    ["--failed", "--since", "soon"], ["--failed", "--since", "1h", "--until", "2h"],
])
def test_replay_bad_input_is_one_line(cli_db: str, capsys: pytest.CaptureFixture[str],
                                      flags: list[str]) -> None:
    _seed(cli_db, {"id": "f1", "status": "failed"})
    _assert_error(_run(capsys, "deliveries", "replay", *flags))
    assert _rows(cli_db)["f1"]["status"] == "failed"


async def test_replay_failed_in_chunks(store: Any) -> None:
    now = datetime.now(UTC)
    base = {"endpoint_id": "ep-1", "payload": b"{}", "status": "failed", "attempts": 3,
            "updated_at": now}
    # Ties on created_at (intake writes a batch with one timestamp) across chunk edges.
    rows = [{**base, "id": f"d{i:02d}", "created_at": now - timedelta(seconds=i // 3)}
            for i in range(11)]
    async with store.engine.begin() as conn:
        await conn.execute(insert(deliveries), rows)
    assert await store.replay_failed(chunk=2) == 11
    assert await store.replay_failed(chunk=2) == 0
    assert await store.status_counts() == {"pending": 11}


class _FailingAgain:
    """An engine whose every transaction after the first starts by failing every delivery
    again, as a worker might while a long replay goes on."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.transactions = 0

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        if self.transactions:
            async with self.engine.begin() as conn:
                await conn.execute(update(deliveries).values(status="failed"))
        self.transactions += 1
        async with self.engine.begin() as conn:
            yield conn


async def test_replay_failed_replays_each_delivery_once_per_call(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    base = {"endpoint_id": "ep-1", "payload": b"{}", "status": "failed", "attempts": 3,
            "updated_at": now, "created_at": now}
    async with store.engine.begin() as conn:
        await conn.execute(insert(deliveries), [{**base, "id": f"d{i}"} for i in range(4)])
    engine = _FailingAgain(store.engine)
    monkeypatch.setattr(store, "engine", engine)
    assert await store.replay_failed(chunk=2) == 4
    assert engine.transactions == 3  # two full chunks, then one that found nothing


# -- resend ----------------------------------------------------------------------------------


def test_resend_makes_a_new_delivery(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _endpoint(cli_db)
    _seed(cli_db, {"id": "d1", "idempotency_key": "key-1", "payload": b'{"x": 1}'})
    _attempt(cli_db, {"d1": HTTP_200})
    code, out, err = _run(capsys, "deliveries", "resend", "d1")
    assert (code, err) == (0, "")
    new_id = out.split()[0]
    assert re.fullmatch(r"msg_[0-9A-Z]{26}", new_id)
    assert "a copy of d1 for endpoint ep-1" in out
    copy = _json(capsys, "deliveries", "resend", "d1")
    assert copy["resent_from"] == "d1" and copy["id"] not in ("d1", new_id)
    assert (copy["endpoint_id"], copy["status"]) == ("ep-1", "pending")

    rows = _rows(cli_db)
    assert rows["d1"]["status"] == "succeeded"
    for made in (new_id, copy["id"]):
        row = rows[made]
        assert (row["endpoint_id"], row["event_type"], row["payload"]) == (
            "ep-1", "order.created", b'{"x": 1}')
        assert (row["status"], row["attempts"], row["idempotency_key"]) == ("pending", 0, None)
        assert row["next_attempt_at"] <= datetime.now(UTC)
    # The copy is delivered like any other, numbered from 1.
    assert _attempt(cli_db, {new_id: HTTP_200}) == {new_id: (1, "succeeded")}


def test_resend_refusals(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _seed(cli_db, {"id": "f1", "status": "failed"}, {"id": "r1", "status": "rejected"},
          {"id": "p1", "status": "pending"}, {"id": "h1", "status": "held"})
    assert _json(capsys, "deliveries", "resend", "f1")["resent_from"] == "f1"
    assert "no delivery with id 'nope'" in _assert_error(
        _run(capsys, "deliveries", "resend", "nope"))
    assert "rejected events were never accepted" in _assert_error(
        _run(capsys, "deliveries", "resend", "r1", "--json"))
    assert "pending already" in _assert_error(_run(capsys, "deliveries", "resend", "p1"))
    assert "webhooks endpoints enable ep-1" in _assert_error(
        _run(capsys, "deliveries", "resend", "h1"))
    assert len(_rows(cli_db)) == 5


# -- recover ---------------------------------------------------------------------------------


def test_recover_an_endpoint_since_a_time(cli_db: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    _endpoint(cli_db)
    _endpoint(cli_db, "ep-2")
    _seed(cli_db,
          {"id": "recent", "status": "failed", "created_at": now - timedelta(minutes=30)},
          {"id": "older", "status": "failed", "created_at": now - timedelta(hours=5)},
          {"id": "other", "status": "failed", "endpoint_id": "ep-2"},
          {"id": "fine", "status": "succeeded"})
    code, out, err = _run(capsys, "deliveries", "recover", "ep-1", "--since", "2h")
    assert (code, err) == (0, "")
    assert out.startswith("1 failed deliveries of endpoint ep-1 created since ")
    since = (now - timedelta(days=1)).isoformat()
    result = _json(capsys, "deliveries", "recover", "ep-1", "--since", since)
    assert (result["endpoint_id"], result["replayed"], result["endpoint_enabled"]) == (
        "ep-1", 1, True)
    assert datetime.fromisoformat(result["since"]) == datetime.fromisoformat(since)
    assert {i: r["status"] for i, r in _rows(cli_db).items()} == {
        "recent": "pending", "older": "pending", "other": "failed", "fine": "succeeded"}


def test_recover_refusals(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _endpoint(cli_db, "ep-off", enabled=False)
    _seed(cli_db, {"id": "f1", "status": "failed", "endpoint_id": "ep-off"})
    assert "'ep-9'" in _assert_error(_run(capsys, "deliveries", "recover", "ep-9",
                                          "--since", "1h"))
    _assert_error(_run(capsys, "deliveries", "recover", "ep-off", "--since", "later"))
    # A disabled endpoint's deliveries are replayed; the worker holds them until it is enabled.
    code, out, _ = _run(capsys, "deliveries", "recover", "ep-off", "--since", "1h")
    assert code == 0 and "webhooks endpoints enable ep-off" in out
    assert _rows(cli_db)["f1"]["status"] == "pending"


# -- stats -----------------------------------------------------------------------------------


def test_stats_keeps_its_shape(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _json(capsys, "deliveries", "stats") == {}
    _seed(cli_db, {"id": "a", "status": "failed"}, {"id": "b", "status": "failed"},
          {"id": "c", "status": "held"})
    assert _json(capsys, "deliveries", "stats") == {"failed": 2, "held": 1}
    code, out, _ = _run(capsys, "deliveries", "stats")
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["pending", "0"], ["held", "1"], ["succeeded", "0"], ["failed", "2"], ["rejected", "0"]]


def test_a_reader_that_stopped_reading_is_not_a_database_error(
        cli_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`webhooks deliveries show … | head -5`: the pipe closed early, nothing to report."""
    import worker.cli_deliveries as module

    def closed_pipe(*_: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(module, "cmd_deliveries_stats", closed_pipe)
    code, _, err = _run(capsys, "deliveries", "stats")
    assert (code, err) == (0, "")
