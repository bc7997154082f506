"""The per-attempt log line and its level."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from worker.core.attempt_log import attempt_line, level_of, logfmt_value
from worker.core.models import (
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    ErrorKind,
    HttpResult,
    Outcome,
    OutcomeKind,
)

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def record(kind: OutcomeKind, *, status: int | None = 200, error: str | None = None,
           error_kind: ErrorKind | None = None, number: int = 1,
           next_at: datetime | None = None, event_type: str | None = "order.paid") -> AttemptRecord:
    delivery = Delivery(id="msg_1", endpoint_id="ep-1", url="https://x.example/", secrets=(),
                        payload=b"{}", event_type=event_type)
    next_status = {OutcomeKind.SUCCESS: DeliveryStatus.SUCCEEDED,
                   OutcomeKind.RETRY: DeliveryStatus.PENDING}.get(kind, DeliveryStatus.FAILED)
    return AttemptRecord(delivery, HttpResult(status_code=status, duration_ms=12.34),
                         Outcome(kind, error_kind, error), NOW, number, next_status, next_at)


@pytest.mark.parametrize(("kind", "level"), [
    (OutcomeKind.SUCCESS, logging.INFO), (OutcomeKind.RETRY, logging.WARNING),
    (OutcomeKind.FAILED, logging.ERROR), (OutcomeKind.BLOCKED, logging.ERROR),
    (OutcomeKind.DISABLE, logging.ERROR),
])
def test_the_level_says_how_it_went(kind: OutcomeKind, level: int) -> None:
    assert level_of(record(kind)) == level


def test_a_success_line() -> None:
    assert attempt_line(record(OutcomeKind.SUCCESS), 4) == (
        "attempt delivery=msg_1 endpoint=ep-1 event=order.paid attempt=1/4 outcome=success "
        "status=200 duration_ms=12.3")


def test_a_retry_line_names_the_next_attempt_and_the_error() -> None:
    line = attempt_line(record(OutcomeKind.RETRY, status=503, number=2,
                               error="HTTP 503", error_kind=ErrorKind.HTTP_STATUS,
                               next_at=NOW + timedelta(seconds=30)), 4)
    assert line == ("attempt delivery=msg_1 endpoint=ep-1 event=order.paid attempt=2/4 "
                    "outcome=retry status=503 duration_ms=12.3 "
                    "next_attempt=2026-11-25T12:00:30+00:00 error_kind=http_status "
                    'error="HTTP 503"')


def test_a_blocked_line_without_status_or_event_type() -> None:
    line = attempt_line(record(OutcomeKind.BLOCKED, status=None, event_type=None,
                               error="destination blocked by network policy: 10.0.0.1",
                               error_kind=ErrorKind.BLOCKED), 1)
    assert "status=" not in line and "event=" not in line
    assert 'error="destination blocked by network policy: 10.0.0.1"' in line


def test_a_long_error_is_cut() -> None:
    line = attempt_line(record(OutcomeKind.FAILED, error="x" * 1000), 1)
    assert line.endswith("error=" + "x" * 200)


@pytest.mark.parametrize(("value", "text"), [
    ("plain", "plain"), ("two words", '"two words"'), ('a"b', '"a\\"b"'), ("a=b", '"a=b"'),
    ("back\\slash", '"back\\\\slash"'), ("", '""'), ("line\nbreak", '"line\\nbreak"'), (7, "7"),
])
def test_logfmt_values_are_quoted_only_when_needed(value: object, text: str) -> None:
    assert logfmt_value(value) == text
