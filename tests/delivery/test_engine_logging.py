"""The engine's per-attempt lines: logfmt or JSON fields, and the level of a success."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from tests.core.test_attempt_log import record
from worker.core.models import OutcomeKind
from worker.delivery.engine import Engine
from worker.settings import Settings


def _log(caplog: pytest.LogCaptureFixture, **settings: str) -> list[logging.LogRecord]:
    fake = SimpleNamespace(settings=Settings(database_url="sqlite://", **settings))
    with caplog.at_level(logging.DEBUG, logger="webhooks.attempts"):
        Engine._log_attempts(fake, [record(OutcomeKind.SUCCESS),  # type: ignore[arg-type]
                                    record(OutcomeKind.RETRY, status=500, error="HTTP 500")])
    return [r for r in caplog.records if r.name == "webhooks.attempts"]


def test_logfmt_lines_by_default(caplog: pytest.LogCaptureFixture) -> None:
    ok, retry = _log(caplog)
    assert ok.levelno == logging.INFO and retry.levelno == logging.WARNING
    assert ok.getMessage().startswith("attempt delivery=")
    assert "outcome=retry" in retry.getMessage() and "status=500" in retry.getMessage()
    assert not hasattr(ok, "fields")


def test_json_lines_carry_fields(caplog: pytest.LogCaptureFixture) -> None:
    ok, retry = _log(caplog, log_format="json")
    assert retry.getMessage() == "attempt"
    fields = retry.fields  # type: ignore[attr-defined]
    assert fields["outcome"] == "retry" and fields["status"] == 500
    assert fields["error"] == "HTTP 500" and fields["delivery"] == ok.fields["delivery"]  # type: ignore[attr-defined]


def test_successes_can_go_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    ok, retry = _log(caplog, success_log_level="DEBUG")
    assert ok.levelno == logging.DEBUG and retry.levelno == logging.WARNING
