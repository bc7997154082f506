"""classify() and decide(): the verdict on one attempt and what follows from it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.core.models import (
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    ErrorKind,
    HttpResult,
    Outcome,
    OutcomeKind,
)
from worker.core.outcome import SLOW_DOWN_STATUSES, classify, decide
from worker.settings import DEFAULT_RETRY_SCHEDULE, STANDARD_RETRY_SCHEDULE

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
IN_90_S = "Wed, 01 May 2024 12:01:30 GMT"  # 90 s after NOW

SUCCESS_STATUSES = list(range(200, 300))
REDIRECT_STATUSES = list(range(300, 400))
OTHER_STATUSES = [s for s in range(100, 600) if not 200 <= s < 400 and s != 410]
RETRYABLE_ERRORS = [ErrorKind.TIMEOUT, ErrorKind.CONNECT, ErrorKind.DNS, ErrorKind.TLS,
                    ErrorKind.PROTOCOL]
FAILED_ERRORS = [ErrorKind.INVALID_URL, ErrorKind.INVALID_SECRET]


def _delivery(attempts: int = 0) -> Delivery:
    return Delivery(
        id="msg_1", endpoint_id="ep_1", url="https://example.com/hook",
        secrets=("whsec_x",), payload=b"{}", attempts=attempts,
    )


def _decide(
    result: HttpResult,
    *,
    attempts: int = 0,
    schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE,
    jitter: float = 0.0,
    rand: float = 0.5,
    max_retry_after: float = 86400.0,
) -> AttemptRecord:
    return decide(
        _delivery(attempts), result, attempted_at=NOW, schedule=schedule,
        jitter=jitter, rand=rand, max_retry_after=max_retry_after,
    )


# --- classify: status codes --------------------------------------------------------------


@pytest.mark.parametrize("status", SUCCESS_STATUSES)
def test_classify_every_2xx_is_success(status: int) -> None:
    assert classify(HttpResult(status_code=status)) == Outcome(OutcomeKind.SUCCESS)


@pytest.mark.parametrize("status", REDIRECT_STATUSES)
def test_classify_every_3xx_is_retry_with_redirect_error(status: int) -> None:
    outcome = classify(HttpResult(status_code=status, retry_after="120"))
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.error_kind is ErrorKind.REDIRECT
    assert outcome.error == f"HTTP {status}: redirects are not followed"
    assert outcome.retry_after_seconds is None


def test_classify_410_disables_the_endpoint() -> None:
    assert classify(HttpResult(status_code=410)) == Outcome(
        OutcomeKind.DISABLE, ErrorKind.HTTP_STATUS, "HTTP 410 Gone"
    )


@pytest.mark.parametrize("status", OTHER_STATUSES)
def test_classify_every_1xx_4xx_5xx_except_410_is_retry_with_http_status(status: int) -> None:
    outcome = classify(HttpResult(status_code=status))
    assert outcome == Outcome(OutcomeKind.RETRY, ErrorKind.HTTP_STATUS, f"HTTP {status}", None)


@pytest.mark.parametrize("status", sorted(SLOW_DOWN_STATUSES))
def test_classify_slow_down_statuses_are_429_502_503_504(status: int) -> None:
    assert {429, 502, 503, 504} == SLOW_DOWN_STATUSES
    assert classify(HttpResult(status_code=status)).kind is OutcomeKind.RETRY


@pytest.mark.parametrize("status", sorted(SLOW_DOWN_STATUSES))
def test_classify_slow_down_status_honours_retry_after_delta_seconds(status: int) -> None:
    outcome = classify(HttpResult(status_code=status, retry_after="120"), now=NOW)
    assert outcome == Outcome(OutcomeKind.RETRY, ErrorKind.HTTP_STATUS, f"HTTP {status}", 120.0)


@pytest.mark.parametrize("status", sorted(SLOW_DOWN_STATUSES))
def test_classify_slow_down_status_honours_retry_after_http_date(status: int) -> None:
    outcome = classify(HttpResult(status_code=status, retry_after=IN_90_S), now=NOW)
    assert outcome.retry_after_seconds == 90.0


@pytest.mark.parametrize("status", sorted(SLOW_DOWN_STATUSES))
@pytest.mark.parametrize("header", [None, "", "soon", "-1"])
def test_classify_slow_down_status_with_unusable_retry_after_has_none(
    status: int, header: str | None
) -> None:
    outcome = classify(HttpResult(status_code=status, retry_after=header), now=NOW)
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.retry_after_seconds is None


@pytest.mark.parametrize(
    "status", [s for s in range(100, 600) if s not in SLOW_DOWN_STATUSES and not 200 <= s < 300]
)
def test_classify_ignores_retry_after_on_other_statuses(status: int) -> None:
    outcome = classify(HttpResult(status_code=status, retry_after="120"), now=NOW)
    assert outcome.retry_after_seconds is None


def test_classify_503_with_superscript_digit_retry_after_does_not_raise() -> None:
    # a receiver controls this header; "²" passes str.isdigit() in parse_retry_after
    outcome = classify(HttpResult(status_code=503, retry_after="\u00b2"), now=NOW)
    assert outcome == Outcome(OutcomeKind.RETRY, ErrorKind.HTTP_STATUS, "HTTP 503", None)


# --- classify: transport errors ----------------------------------------------------------


@pytest.mark.parametrize("kind", RETRYABLE_ERRORS)
def test_classify_transport_errors_without_status_are_retried_with_their_kind(
    kind: ErrorKind,
) -> None:
    outcome = classify(HttpResult(error_kind=kind, error="boom"))
    assert outcome == Outcome(OutcomeKind.RETRY, kind, "boom")


def test_classify_no_status_and_no_error_kind_is_a_connect_retry() -> None:
    assert classify(HttpResult(error="?")) == Outcome(OutcomeKind.RETRY, ErrorKind.CONNECT, "?")


def test_classify_blocked_is_blocked() -> None:
    outcome = classify(HttpResult(error_kind=ErrorKind.BLOCKED, error="blocked 10.0.0.1"))
    assert outcome == Outcome(OutcomeKind.BLOCKED, ErrorKind.BLOCKED, "blocked 10.0.0.1")


@pytest.mark.parametrize("kind", FAILED_ERRORS)
def test_classify_invalid_url_and_endpoint_disabled_fail_at_once(kind: ErrorKind) -> None:
    assert classify(HttpResult(error_kind=kind, error="no")) == Outcome(
        OutcomeKind.FAILED, kind, "no"
    )


@pytest.mark.parametrize("status", [200, 410, 503])
@pytest.mark.parametrize(
    ("kind", "verdict"),
    [(ErrorKind.BLOCKED, OutcomeKind.BLOCKED), (ErrorKind.INVALID_URL, OutcomeKind.FAILED),
     (ErrorKind.INVALID_SECRET, OutcomeKind.FAILED)],
)
def test_classify_terminal_error_kind_wins_over_any_status(
    status: int, kind: ErrorKind, verdict: OutcomeKind
) -> None:
    assert classify(HttpResult(status_code=status, error_kind=kind)).kind is verdict


# --- decide ------------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, 1, 2, 3, 10])
@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_decide_success_is_succeeded_without_next_attempt(attempts: int, status: int) -> None:
    result = HttpResult(status_code=status)
    record = _decide(result, attempts=attempts)
    assert record == AttemptRecord(
        _delivery(attempts), result, Outcome(OutcomeKind.SUCCESS), NOW, attempts + 1,
        DeliveryStatus.SUCCEEDED, None,
    )


@pytest.mark.parametrize("attempts", range(len(DEFAULT_RETRY_SCHEDULE)))
def test_decide_retry_within_budget_is_pending_at_attempted_at_plus_schedule_delay(
    attempts: int,
) -> None:
    record = _decide(HttpResult(status_code=500), attempts=attempts)
    assert record.outcome.kind is OutcomeKind.RETRY
    assert record.next_status is DeliveryStatus.PENDING
    assert record.attempt_number == attempts + 1
    assert record.next_attempt_at == NOW + timedelta(seconds=DEFAULT_RETRY_SCHEDULE[attempts])


@pytest.mark.parametrize("attempts", range(len(STANDARD_RETRY_SCHEDULE)))
def test_decide_walks_every_step_of_the_standard_schedule(attempts: int) -> None:
    record = _decide(HttpResult(error_kind=ErrorKind.TIMEOUT), attempts=attempts,
                     schedule=STANDARD_RETRY_SCHEDULE)
    assert record.next_status is DeliveryStatus.PENDING
    assert record.next_attempt_at == NOW + timedelta(seconds=STANDARD_RETRY_SCHEDULE[attempts])


@pytest.mark.parametrize(
    ("schedule", "attempts"),
    [(DEFAULT_RETRY_SCHEDULE, 3), (DEFAULT_RETRY_SCHEDULE, 7), (STANDARD_RETRY_SCHEDULE, 9),
     ((), 0)],
)
@pytest.mark.parametrize(
    "result",
    [HttpResult(status_code=500), HttpResult(status_code=301), HttpResult(status_code=429),
     HttpResult(error_kind=ErrorKind.DNS, error="nx")],
    ids=["500", "301", "429", "dns"],
)
def test_decide_retry_with_budget_exhausted_is_failed_with_outcome_failed(
    schedule: tuple[float, ...], attempts: int, result: HttpResult
) -> None:
    record = _decide(result, attempts=attempts, schedule=schedule)
    classified = classify(result, now=NOW)
    assert record.outcome == Outcome(
        OutcomeKind.FAILED, classified.error_kind, classified.error,
        classified.retry_after_seconds,
    )
    assert record.next_status is DeliveryStatus.FAILED
    assert record.next_attempt_at is None
    assert record.attempt_number == attempts + 1


def test_decide_max_attempts_is_one_plus_schedule_length() -> None:
    schedule = (1.0, 2.0)
    statuses = [_decide(HttpResult(status_code=500), attempts=a, schedule=schedule).next_status
                for a in range(3)]
    assert statuses == [DeliveryStatus.PENDING, DeliveryStatus.PENDING, DeliveryStatus.FAILED]


def test_decide_applies_jitter_from_rand() -> None:
    low = _decide(HttpResult(status_code=500), jitter=0.2, rand=0.0)
    high = _decide(HttpResult(status_code=500), jitter=0.2, rand=0.999)
    assert low.next_attempt_at == NOW + timedelta(seconds=30.0 * 0.8)
    assert high.next_attempt_at is not None
    assert NOW + timedelta(seconds=30.0) < high.next_attempt_at < NOW + timedelta(seconds=36.0)


@pytest.mark.parametrize("status", sorted(SLOW_DOWN_STATUSES))
def test_decide_retry_after_lengthens_the_delay(status: int) -> None:
    record = _decide(HttpResult(status_code=status, retry_after="300"))
    assert record.outcome.retry_after_seconds == 300.0
    assert record.next_attempt_at == NOW + timedelta(seconds=300)


@pytest.mark.parametrize("status", sorted(SLOW_DOWN_STATUSES))
def test_decide_retry_after_http_date_is_measured_from_attempted_at(status: int) -> None:
    record = _decide(HttpResult(status_code=status, retry_after=IN_90_S))
    assert record.next_attempt_at == NOW + timedelta(seconds=90)


def test_decide_short_retry_after_does_not_shorten_the_delay() -> None:
    record = _decide(HttpResult(status_code=503, retry_after="5"))
    assert record.next_attempt_at == NOW + timedelta(seconds=30)


def test_decide_retry_after_is_capped_by_max_retry_after() -> None:
    record = _decide(HttpResult(status_code=429, retry_after="999999"), max_retry_after=3600.0)
    assert record.next_attempt_at == NOW + timedelta(seconds=3600)


def test_decide_retry_after_on_a_500_is_ignored() -> None:
    record = _decide(HttpResult(status_code=500, retry_after="300"))
    assert record.next_attempt_at == NOW + timedelta(seconds=30)


@pytest.mark.parametrize("attempts", [0, 2, 5])
def test_decide_410_fails_with_disable_outcome_even_with_budget_left(attempts: int) -> None:
    record = _decide(HttpResult(status_code=410), attempts=attempts)
    assert record.outcome.kind is OutcomeKind.DISABLE
    assert record.next_status is DeliveryStatus.FAILED
    assert record.next_attempt_at is None
    assert record.attempt_number == attempts + 1


def test_decide_blocked_fails_with_blocked_outcome() -> None:
    record = _decide(HttpResult(error_kind=ErrorKind.BLOCKED, error="10.0.0.1"))
    assert record.outcome == Outcome(OutcomeKind.BLOCKED, ErrorKind.BLOCKED, "10.0.0.1")
    assert record.next_status is DeliveryStatus.FAILED
    assert record.next_attempt_at is None


@pytest.mark.parametrize("kind", FAILED_ERRORS)
def test_decide_invalid_url_and_endpoint_disabled_fail_at_once(kind: ErrorKind) -> None:
    record = _decide(HttpResult(error_kind=kind))
    assert record.outcome.kind is OutcomeKind.FAILED
    assert record.next_status is DeliveryStatus.FAILED
    assert record.next_attempt_at is None


@pytest.mark.parametrize("kind", RETRYABLE_ERRORS)
def test_decide_transport_errors_are_pending_when_budget_remains(kind: ErrorKind) -> None:
    record = _decide(HttpResult(error_kind=kind), attempts=1)
    assert record.outcome == Outcome(OutcomeKind.RETRY, kind)
    assert record.next_status is DeliveryStatus.PENDING
    assert record.next_attempt_at == NOW + timedelta(seconds=120)


def test_decide_keeps_the_delivery_result_and_attempted_at() -> None:
    result = HttpResult(status_code=502, response_excerpt="bad gateway", duration_ms=12.5)
    record = _decide(result, attempts=1)
    assert record.delivery == _delivery(1)
    assert record.result is result
    assert record.attempted_at == NOW


def test_after_a_replay_the_budget_counts_from_retry_base_and_numbers_run_on() -> None:
    """Attempt 5 of a delivery replayed after 4 is the first of a fresh budget: retried, and
    numbered 5; the budget runs out at the same point as for a new delivery."""
    from dataclasses import replace as _replace
    from datetime import UTC, datetime

    from worker.core.models import Delivery, HttpResult

    delivery = Delivery(id="msg_r", endpoint_id="ep", url="https://x.example/", secrets=(),
                        payload=b"{}", attempts=4, retry_base=4)
    now = datetime(2026, 11, 25, tzinfo=UTC)
    kw = {"attempted_at": now, "schedule": (1.0,), "jitter": 0.0, "rand": 0.5,
          "max_retry_after": 60.0}
    first = decide(delivery, HttpResult(status_code=500), **kw)  # type: ignore[arg-type]
    assert (first.attempt_number, first.next_status.value) == (5, "pending")
    second = decide(_replace(delivery, attempts=5), HttpResult(status_code=500),
                    **kw)  # type: ignore[arg-type]
    assert (second.attempt_number, second.next_status.value) == (6, "failed")
