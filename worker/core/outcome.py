"""Classify one HTTP attempt: success, retry, failure, endpoint disabled, blocked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from worker.core.models import (
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    ErrorKind,
    HttpResult,
    Outcome,
    OutcomeKind,
)
from worker.core.retry import next_delay, parse_retry_after

# Statuses whose Retry-After is honoured ("slow down").
SLOW_DOWN_STATUSES = frozenset({429, 502, 503, 504})
TERMINAL_ERRORS = frozenset({ErrorKind.BLOCKED, ErrorKind.INVALID_URL, ErrorKind.INVALID_SECRET})


def classify(result: HttpResult, *, now: datetime | None = None) -> Outcome:
    """The verdict on one attempt, before the retry budget is consulted.

    RETRY here means "retriable"; the engine turns it into FAILED once attempts run out.
    """
    if result.error_kind is ErrorKind.BLOCKED:
        return Outcome(OutcomeKind.BLOCKED, ErrorKind.BLOCKED, result.error)
    if result.error_kind in TERMINAL_ERRORS:
        return Outcome(OutcomeKind.FAILED, result.error_kind, result.error)
    status = result.status_code
    if status is None:
        return Outcome(OutcomeKind.RETRY, result.error_kind or ErrorKind.CONNECT, result.error)
    if 200 <= status < 300:
        return Outcome(OutcomeKind.SUCCESS)
    if status == 410:
        return Outcome(OutcomeKind.DISABLE, ErrorKind.HTTP_STATUS, "HTTP 410 Gone")
    if 300 <= status < 400:
        return Outcome(
            OutcomeKind.RETRY, ErrorKind.REDIRECT, f"HTTP {status}: redirects are not followed"
        )
    retry_after = None
    if status in SLOW_DOWN_STATUSES:
        retry_after = parse_retry_after(result.retry_after, now=now)
    return Outcome(OutcomeKind.RETRY, ErrorKind.HTTP_STATUS, f"HTTP {status}", retry_after)


def decide(
    delivery: Delivery,
    result: HttpResult,
    *,
    attempted_at: datetime,
    schedule: Sequence[float],
    jitter: float,
    rand: float,
    max_retry_after: float,
) -> AttemptRecord:
    """The attempt record and the delivery's next state, given the retry budget."""
    outcome = classify(result, now=attempted_at)
    number = delivery.attempts + 1
    next_at = None
    if outcome.kind is OutcomeKind.SUCCESS:
        status = DeliveryStatus.SUCCEEDED
    elif outcome.kind is OutcomeKind.RETRY:
        delay = next_delay(schedule, number - delivery.retry_base, jitter=jitter, rand=rand,
                           retry_after=outcome.retry_after_seconds,
                           max_retry_after=max_retry_after)
        if delay is None:
            outcome = replace(outcome, kind=OutcomeKind.FAILED)
            status = DeliveryStatus.FAILED
        else:
            status = DeliveryStatus.PENDING
            next_at = attempted_at + timedelta(seconds=delay)
    else:
        status = DeliveryStatus.FAILED
    return AttemptRecord(delivery, result, outcome, attempted_at, number, status, next_at)
