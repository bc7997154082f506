"""Log lines for journald (priority prefix, no timestamp) and for a terminal."""

from __future__ import annotations

import logging

import pytest

from worker import logs


@pytest.fixture(autouse=True)
def restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_journal_lines_carry_syslog_priority_and_no_timestamp(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("INFO", journal=True)
    logging.getLogger("webhooks.test").warning("endpoint %s slow", "ep-1")
    logging.getLogger("webhooks.test").error("two\nlines")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("<4>WARNING webhooks.test[") and out[0].endswith("endpoint ep-1 slow")
    assert out[1].startswith("<3>ERROR") and out[2] == "<3>lines"


def test_terminal_lines_have_a_timestamp_and_respect_the_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("WARNING", journal=False)
    logging.getLogger("webhooks.test").info("hidden")
    logging.getLogger("webhooks.test").warning("shown")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0][:2] == "20" and "WARNING webhooks.test" in out[0]


def test_json_lines_carry_the_attempt_fields_as_keys(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    logs.configure("INFO", fmt="json")
    logging.getLogger("webhooks.attempts").warning(
        "attempt", extra={"fields": {"delivery": "msg_1", "attempt": "1/4", "status": 500,
                                     "duration_ms": "12.5", "odd": object.__name__}})
    logging.getLogger("webhooks.test").info("plain %s", "message")
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["level"] == "WARNING" and first["logger"] == "webhooks.attempts"
    assert (first["delivery"], first["attempt"], first["status"]) == ("msg_1", "1/4", 500)
    assert first["msg"] == "attempt" and "ts" in first and isinstance(first["pid"], int)
    assert second["msg"] == "plain message" and "delivery" not in second


def test_json_under_journald_has_the_priority_prefix_and_no_timestamp(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    logs.configure("INFO", journal=True, fmt="json")
    logging.getLogger("webhooks.test").error("boom")
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("<3>{")
    parsed = json.loads(line[3:])
    assert parsed["level"] == "ERROR" and "ts" not in parsed


def test_json_keeps_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    logs.configure("INFO", fmt="json")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("webhooks.test").exception("failed")
    (line,) = capsys.readouterr().out.splitlines()
    assert "ValueError: bad" in json.loads(line)["traceback"]


def test_json_fields_spell_times_as_the_logfmt_lines_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json
    from datetime import UTC, datetime

    logs.configure("INFO", fmt="json")
    when = datetime(2026, 11, 25, 23, 27, 12, 174483, tzinfo=UTC)
    logging.getLogger("webhooks.attempts").warning(
        "attempt", extra={"fields": {"next_attempt": when, "status": 500, "error": None,
                                     "other": ("a", 1)}})
    (line,) = capsys.readouterr().out.splitlines()
    parsed = json.loads(line)
    assert parsed["next_attempt"] == "2026-11-25T23:27:12+00:00"
    assert (parsed["status"], parsed["error"], parsed["other"]) == (500, None, "('a', 1)")
