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
