"""Endpoint health (worker.core.health): what one batch of attempts says about each endpoint,
when the circuit opens and when an endpoint is disabled. Pure: no database, no clock."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.core.health import (
    FAILURES,
    NOT_THE_ENDPOINTS_FAULT,
    BatchHealth,
    HealthChange,
    HealthEvent,
    HealthPolicy,
    batch_health,
    circuit_opens,
    disable_reason,
    is_failure,
    should_disable,
)
from worker.core.models import (
    AttemptRecord,
    Delivery,
    DeliveryStatus,
    ErrorKind,
    HttpResult,
    Outcome,
    OutcomeKind,
)

T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
_counter = 0


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _rec(endpoint_id: str, kind: OutcomeKind, at: datetime, *,
         error_kind: ErrorKind | None = None, error: str | None = None) -> AttemptRecord:
    global _counter
    _counter += 1
    delivery = Delivery(id=f"d{_counter}", endpoint_id=endpoint_id, url="https://x.test/",
                        secrets=(), payload=b"{}")
    if kind is not OutcomeKind.SUCCESS and error_kind is None:
        error_kind = ErrorKind.HTTP_STATUS
    status = {OutcomeKind.SUCCESS: DeliveryStatus.SUCCEEDED,
              OutcomeKind.RETRY: DeliveryStatus.PENDING}.get(kind, DeliveryStatus.FAILED)
    next_at = at + timedelta(seconds=1) if status is DeliveryStatus.PENDING else None
    return AttemptRecord(delivery, HttpResult(status_code=500), Outcome(kind, error_kind, error),
                         at, 1, status, next_at)


def ok(at: float, ep: str = "ep-a") -> AttemptRecord:
    return _rec(ep, OutcomeKind.SUCCESS, _at(at))


def fail(at: float, ep: str = "ep-a", error: str | None = "HTTP 500",
         kind: OutcomeKind = OutcomeKind.RETRY,
         error_kind: ErrorKind | None = ErrorKind.HTTP_STATUS) -> AttemptRecord:
    return _rec(ep, kind, _at(at), error_kind=error_kind, error=error)


# -- policy, vocabulary -----------------------------------------------------------------------


def test_policy_defaults() -> None:
    policy = HealthPolicy()
    assert policy.breaker_failures == 5
    assert policy.breaker_cooldown == 60.0
    assert policy.disable_after == 5 * 86400.0


def test_policy_and_results_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        HealthPolicy().breaker_failures = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        BatchHealth(True, 0, None, None).failures = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        HealthChange("ep", HealthEvent.OPENED).until = T0  # type: ignore[misc]


def test_health_events_have_stable_names() -> None:
    assert {e.value for e in HealthEvent} == {"circuit_opened", "circuit_closed",
                                              "endpoint_disabled"}
    assert str(HealthEvent.OPENED) == "circuit_opened"


def test_health_change_defaults() -> None:
    change = HealthChange("ep-a", HealthEvent.CLOSED)
    assert (change.until, change.reason) == (None, None)
    assert change == HealthChange("ep-a", HealthEvent.CLOSED, None, None)


def test_failure_vocabulary() -> None:
    assert frozenset({OutcomeKind.RETRY, OutcomeKind.FAILED, OutcomeKind.BLOCKED}) == FAILURES
    assert frozenset({ErrorKind.CREDENTIALS, ErrorKind.INVALID_SECRET}) == NOT_THE_ENDPOINTS_FAULT


# -- is_failure -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [OutcomeKind.RETRY, OutcomeKind.FAILED, OutcomeKind.BLOCKED])
@pytest.mark.parametrize("error_kind", [None, *(k for k in ErrorKind
                                                if k not in NOT_THE_ENDPOINTS_FAULT)])
def test_failures_of_the_endpoint_count(kind: OutcomeKind, error_kind: ErrorKind | None) -> None:
    assert is_failure(_rec("ep", kind, T0, error_kind=error_kind)) is True


@pytest.mark.parametrize("kind", [OutcomeKind.RETRY, OutcomeKind.FAILED, OutcomeKind.BLOCKED])
@pytest.mark.parametrize("error_kind", [ErrorKind.CREDENTIALS, ErrorKind.INVALID_SECRET])
def test_failures_on_our_side_do_not_count(kind: OutcomeKind, error_kind: ErrorKind) -> None:
    assert is_failure(_rec("ep", kind, T0, error_kind=error_kind)) is False


@pytest.mark.parametrize("kind", [OutcomeKind.SUCCESS, OutcomeKind.DISABLE])
def test_success_and_gone_are_not_failures(kind: OutcomeKind) -> None:
    assert is_failure(_rec("ep", kind, T0)) is False
    assert is_failure(_rec("ep", kind, T0, error_kind=ErrorKind.HTTP_STATUS)) is False


# -- batch_health -----------------------------------------------------------------------------


def test_empty_batch_says_nothing() -> None:
    assert batch_health([]) == {}


def test_one_success() -> None:
    assert batch_health([ok(0)]) == {"ep-a": BatchHealth(True, 0, None, None)}


def test_failures_only() -> None:
    health = batch_health([fail(0, error="first"), fail(1, error="second"),
                           fail(2, error="third")])
    assert health == {"ep-a": BatchHealth(False, 3, _at(0), "third")}


def test_records_are_taken_in_attempt_order_not_list_order() -> None:
    health = batch_health([fail(5, error="late"), fail(1, error="early"), fail(3, error="mid")])
    assert health == {"ep-a": BatchHealth(False, 3, _at(1), "late")}


def test_a_success_after_failures_clears_them() -> None:
    assert batch_health([fail(0), fail(1), ok(2)]) == {"ep-a": BatchHealth(True, 0, None, None)}


def test_only_failures_after_the_last_success_count() -> None:
    records = [fail(0, error="a"), ok(1), fail(2, error="b"), ok(3), fail(4, error="c"),
               fail(5, error="d")]
    assert batch_health(records) == {"ep-a": BatchHealth(True, 2, _at(4), "d")}


def test_a_success_listed_last_but_attempted_first_does_not_clear() -> None:
    health = batch_health([fail(2, error="x"), fail(3, error="y"), ok(1)])
    assert health == {"ep-a": BatchHealth(True, 2, _at(2), "y")}


def test_ties_keep_the_order_given() -> None:
    assert batch_health([fail(0), ok(0)]) == {"ep-a": BatchHealth(True, 0, None, None)}
    assert batch_health([ok(0), fail(0, error="e")]) == {"ep-a": BatchHealth(True, 1, _at(0),
                                                                             "e")}


def test_endpoints_are_judged_apart() -> None:
    records = [fail(0, "ep-a", "a1"), ok(1, "ep-b"), fail(2, "ep-a", "a2"), fail(3, "ep-b", "b1"),
               ok(4, "ep-c"), fail(5, "ep-d", "d1")]
    assert batch_health(records) == {
        "ep-a": BatchHealth(False, 2, _at(0), "a2"),
        "ep-b": BatchHealth(True, 1, _at(3), "b1"),
        "ep-c": BatchHealth(True, 0, None, None),
        "ep-d": BatchHealth(False, 1, _at(5), "d1"),
    }


@pytest.mark.parametrize("kind", [OutcomeKind.RETRY, OutcomeKind.FAILED, OutcomeKind.BLOCKED])
def test_every_failure_kind_counts_in_a_batch(kind: OutcomeKind) -> None:
    error_kind = ErrorKind.BLOCKED if kind is OutcomeKind.BLOCKED else ErrorKind.TIMEOUT
    health = batch_health([fail(0, kind=kind, error_kind=error_kind, error="boom")])
    assert health == {"ep-a": BatchHealth(False, 1, _at(0), "boom")}


@pytest.mark.parametrize("error_kind", [ErrorKind.CREDENTIALS, ErrorKind.INVALID_SECRET])
def test_an_endpoint_with_only_our_failures_is_left_out(error_kind: ErrorKind) -> None:
    records = [fail(0, error_kind=error_kind), fail(1, kind=OutcomeKind.FAILED,
                                                    error_kind=error_kind)]
    assert batch_health(records) == {}


def test_an_endpoint_with_only_gone_answers_is_left_out() -> None:
    assert batch_health([_rec("ep-a", OutcomeKind.DISABLE, T0)]) == {}


@pytest.mark.parametrize("error_kind", [ErrorKind.CREDENTIALS, ErrorKind.INVALID_SECRET])
def test_our_failures_neither_count_nor_break_a_streak(error_kind: ErrorKind) -> None:
    records = [fail(0, error="a"), fail(1, error="ours", error_kind=error_kind),
               fail(2, error="b")]
    assert batch_health(records) == {"ep-a": BatchHealth(False, 2, _at(0), "b")}
    # ...nor do they count as the last error, or clear the failures before them.
    records = [fail(0, error="a"), fail(1, error="ours", error_kind=error_kind)]
    assert batch_health(records) == {"ep-a": BatchHealth(False, 1, _at(0), "a")}


def test_gone_answers_neither_count_nor_clear() -> None:
    records = [fail(0, error="a"), _rec("ep-a", OutcomeKind.DISABLE, _at(1)), fail(2, error="b")]
    assert batch_health(records) == {"ep-a": BatchHealth(False, 2, _at(0), "b")}


def test_last_error_may_be_none() -> None:
    assert batch_health([fail(0, error="x"), fail(1, error=None)]) == {
        "ep-a": BatchHealth(False, 2, _at(0), None)}


def test_batch_health_does_not_reorder_its_input() -> None:
    records = [fail(3), ok(1), fail(2)]
    before = list(records)
    batch_health(records)
    assert records == before


# -- circuit_opens ----------------------------------------------------------------------------


@pytest.mark.parametrize(("before", "after", "opens"), [
    (0, 0, False),
    (0, 4, False),
    (3, 4, False),
    (4, 5, True),  # crosses the threshold
    (0, 5, True),  # one batch of five
    (0, 9, True),
    (2, 7, True),
    (5, 5, False),  # already at it
    (5, 6, False),  # already past it: opening again is the store's business
    (6, 9, False),
    (4, 4, False),
])
def test_circuit_opens_when_the_streak_crosses_the_threshold(before: int, after: int,
                                                            opens: bool) -> None:
    assert circuit_opens(before, after, HealthPolicy(breaker_failures=5)) is opens


def test_circuit_opens_on_the_first_failure_with_a_threshold_of_one() -> None:
    policy = HealthPolicy(breaker_failures=1)
    assert circuit_opens(0, 1, policy) is True
    assert circuit_opens(0, 0, policy) is False
    assert circuit_opens(1, 2, policy) is False


# -- should_disable ---------------------------------------------------------------------------


POLICY = HealthPolicy(disable_after=3600.0)


def test_no_failures_never_disables() -> None:
    assert should_disable(None, T0, POLICY) is False
    assert should_disable(None, T0 + timedelta(days=10_000), POLICY) is False


@pytest.mark.parametrize(("failing_for", "disables"), [
    (timedelta(0), False),
    (timedelta(seconds=3599), False),
    (timedelta(seconds=3600) - timedelta(microseconds=1), False),
    (timedelta(seconds=3600), True),  # exactly disable_after
    (timedelta(seconds=3600, microseconds=1), True),
    (timedelta(days=30), True),
])
def test_disables_once_failing_for_disable_after(failing_for: timedelta, disables: bool) -> None:
    assert should_disable(T0, T0 + failing_for, POLICY) is disables


def test_failing_since_in_the_future_does_not_disable() -> None:
    assert should_disable(T0 + timedelta(hours=5), T0, POLICY) is False


def test_should_disable_compares_instants_across_zones() -> None:
    plus2 = timezone(timedelta(hours=2))
    since = (T0 - timedelta(seconds=3600)).astimezone(plus2)
    assert should_disable(since, T0, POLICY) is True
    assert should_disable(since + timedelta(seconds=1), T0, POLICY) is False


def test_disable_after_is_a_float_of_seconds() -> None:
    policy = HealthPolicy(disable_after=0.5)
    assert should_disable(T0, T0 + timedelta(milliseconds=499), policy) is False
    assert should_disable(T0, T0 + timedelta(milliseconds=500), policy) is True


# -- disable_reason ---------------------------------------------------------------------------


def test_disable_reason_says_since_when_how_many_and_the_last_error() -> None:
    reason = disable_reason(T0, 17, "HTTP 503")
    assert reason == ("disabled automatically: nothing but failures since "
                      "2030-01-02T03:04:05+00:00 (17 in a row; last: HTTP 503)")


@pytest.mark.parametrize("last_error", [None, ""])
def test_disable_reason_without_an_error(last_error: str | None) -> None:
    reason = disable_reason(T0, 3, last_error)
    assert reason == ("disabled automatically: nothing but failures since "
                      "2030-01-02T03:04:05+00:00 (3 in a row)")
    assert "last:" not in reason


def test_disable_reason_keeps_the_zone_it_is_given() -> None:
    plus2 = timezone(timedelta(hours=2))
    reason = disable_reason(T0.astimezone(plus2), 1, None)
    assert "since 2030-01-02T05:04:05+02:00 " in reason
