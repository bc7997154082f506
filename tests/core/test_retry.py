"""The retry schedule: next_delay and parse_retry_after."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.core.retry import next_delay, parse_retry_after
from worker.settings import DEFAULT_RETRY_SCHEDULE, STANDARD_RETRY_SCHEDULE

SCHEDULES = {"default": DEFAULT_RETRY_SCHEDULE, "standard": STANDARD_RETRY_SCHEDULE}


def _every_index() -> list[tuple[str, int, float]]:
    return [
        (name, index, delay)
        for name, schedule in SCHEDULES.items()
        for index, delay in enumerate(schedule)
    ]


# --- the presets themselves --------------------------------------------------------------


def test_default_schedule_is_30s_2min_10min() -> None:
    assert DEFAULT_RETRY_SCHEDULE == (30.0, 120.0, 600.0)


def test_standard_schedule_is_the_standard_webhooks_example() -> None:
    # 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h
    assert STANDARD_RETRY_SCHEDULE == (
        5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0
    )


# --- next_delay without jitter -----------------------------------------------------------


@pytest.mark.parametrize(("name", "index", "delay"), _every_index())
def test_next_delay_without_jitter_is_the_schedule_entry_for_each_attempt(
    name: str, index: int, delay: float
) -> None:
    assert next_delay(SCHEDULES[name], index + 1) == delay


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("extra", [1, 2, 100])
def test_next_delay_is_none_once_the_schedule_is_exhausted(name: str, extra: int) -> None:
    schedule = SCHEDULES[name]
    assert next_delay(schedule, len(schedule) + extra) is None


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_next_delay_last_retry_exists_and_the_one_after_does_not(name: str) -> None:
    schedule = SCHEDULES[name]
    assert next_delay(schedule, len(schedule)) == schedule[-1]
    assert next_delay(schedule, len(schedule) + 1) is None


def test_next_delay_with_an_empty_schedule_is_exhausted_after_the_first_attempt() -> None:
    assert next_delay((), 1) is None


def test_next_delay_exhausted_ignores_retry_after() -> None:
    assert next_delay((1.0,), 2, retry_after=10.0) is None


@pytest.mark.parametrize("attempts_made", [0, -1, -100])
def test_next_delay_raises_when_attempts_made_is_below_one(attempts_made: int) -> None:
    with pytest.raises(ValueError, match="attempts_made"):
        next_delay(DEFAULT_RETRY_SCHEDULE, attempts_made)


def test_next_delay_of_a_zero_entry_is_zero() -> None:
    assert next_delay((0.0, 5.0), 1, jitter=0.5, rand=0.0) == 0.0


def test_next_delay_accepts_a_list_schedule() -> None:
    assert next_delay([1.5, 2.5], 2) == 2.5


# --- jitter ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "index", "delay"), _every_index())
@pytest.mark.parametrize("jitter", [0.1, 0.2, 0.5])
def test_next_delay_jitter_at_rand_zero_is_the_lower_bound(
    name: str, index: int, delay: float, jitter: float
) -> None:
    got = next_delay(SCHEDULES[name], index + 1, jitter=jitter, rand=0.0)
    assert got == pytest.approx(delay * (1 - jitter))


@pytest.mark.parametrize(("name", "index", "delay"), _every_index())
@pytest.mark.parametrize("jitter", [0.1, 0.2, 0.5])
def test_next_delay_jitter_at_rand_half_is_the_schedule_entry(
    name: str, index: int, delay: float, jitter: float
) -> None:
    assert next_delay(SCHEDULES[name], index + 1, jitter=jitter, rand=0.5) == pytest.approx(delay)


@pytest.mark.parametrize(("name", "index", "delay"), _every_index())
@pytest.mark.parametrize("jitter", [0.1, 0.2, 0.5])
def test_next_delay_jitter_near_rand_one_stays_below_the_upper_bound(
    name: str, index: int, delay: float, jitter: float
) -> None:
    got = next_delay(SCHEDULES[name], index + 1, jitter=jitter, rand=0.999)
    assert got is not None
    assert got < delay * (1 + jitter)
    assert got == pytest.approx(delay * (1 + jitter * 0.998))


@pytest.mark.parametrize("rand", [0.0, 0.001, 0.25, 0.5, 0.75, 0.999])
@pytest.mark.parametrize("jitter", [0.0, 0.2, 0.99])
def test_next_delay_jitter_stays_within_plus_minus_jitter(rand: float, jitter: float) -> None:
    got = next_delay((100.0,), 1, jitter=jitter, rand=rand)
    assert got is not None
    assert 100.0 * (1 - jitter) <= got <= 100.0 * (1 + jitter)


def test_next_delay_jitter_grows_with_rand() -> None:
    values = [next_delay((100.0,), 1, jitter=0.2, rand=r) for r in (0.0, 0.25, 0.5, 0.75, 0.999)]
    assert values == sorted(values)
    assert len(set(values)) == 5


def test_next_delay_zero_jitter_ignores_rand() -> None:
    assert {next_delay((42.0,), 1, jitter=0.0, rand=r) for r in (0.0, 0.3, 0.999)} == {42.0}


def test_next_delay_is_never_negative_even_with_jitter_above_one() -> None:
    assert next_delay((10.0,), 1, jitter=2.0, rand=0.0) == 0.0


# --- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [31.0, 60.0, 599.5, 3600.0])
def test_next_delay_retry_after_longer_than_the_schedule_lengthens_it(retry_after: float) -> None:
    assert next_delay((30.0,), 1, retry_after=retry_after) == retry_after


@pytest.mark.parametrize("retry_after", [0.0, 1.0, 29.9, 30.0])
def test_next_delay_retry_after_shorter_than_the_schedule_never_shortens_it(
    retry_after: float,
) -> None:
    assert next_delay((30.0,), 1, retry_after=retry_after) == 30.0


def test_next_delay_retry_after_is_compared_with_the_jittered_delay() -> None:
    # jittered low end is 24; a Retry-After of 27 wins over it, but not over the high end
    assert next_delay((30.0,), 1, jitter=0.2, rand=0.0, retry_after=27.0) == 27.0
    high = next_delay((30.0,), 1, jitter=0.2, rand=0.999, retry_after=27.0)
    assert high == pytest.approx(30.0 * (1 + 0.2 * 0.998))


@pytest.mark.parametrize(
    ("retry_after", "cap", "expected"),
    [
        (10_000.0, 3600.0, 3600.0),
        (3600.0, 3600.0, 3600.0),
        (3599.0, 3600.0, 3599.0),
        (10**9, 86400.0, 86400.0),
    ],
)
def test_next_delay_retry_after_is_capped_at_max_retry_after(
    retry_after: float, cap: float, expected: float
) -> None:
    assert next_delay((30.0,), 1, retry_after=retry_after, max_retry_after=cap) == expected


def test_next_delay_default_retry_after_cap_is_one_day() -> None:
    assert next_delay((30.0,), 1, retry_after=10**7) == 86400.0


def test_next_delay_cap_never_shortens_the_scheduled_delay() -> None:
    # the schedule's own 24 h delay is kept even when the Retry-After cap is 1 h
    assert next_delay((86400.0,), 1, retry_after=100_000.0, max_retry_after=3600.0) == 86400.0


# --- parse_retry_after -------------------------------------------------------------------

NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("120", 120.0),
        ("  120  ", 120.0),
        ("\t5\r\n", 5.0),
        ("007", 7.0),
        ("86400", 86400.0),
        ("99999999999", 99999999999.0),
    ],
)
def test_parse_retry_after_reads_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:29:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 08:28:00 GMT", 3600.0),
        ("Thu, 22 Oct 2015 07:28:00 GMT", 86400.0),
        ("Wed, 21 Oct 2015 07:28:30 +0000", 30.0),
        ("Wed, 21 Oct 2015 09:28:30 +0200", 30.0),  # explicit offset is honoured
        ("Wed, 21 Oct 2015 07:28:30 -0000", 30.0),  # naive "-0000" is taken as UTC
        ("Wednesday, 21-Oct-15 07:28:10 GMT", 10.0),  # obsolete RFC 850 form
        ("Wed Oct 21 07:28:10 2015", 10.0),  # obsolete asctime form
    ],
)
def test_parse_retry_after_reads_http_dates_relative_to_now(
    value: str, expected: float | None
) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    "value",
    [
        "Tue, 20 Oct 2015 07:28:00 GMT",
        "Wed, 21 Oct 2015 07:27:59 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
    ],
)
def test_parse_retry_after_date_in_the_past_is_zero_not_negative(value: str) -> None:
    assert parse_retry_after(value, now=NOW) == 0.0


def test_parse_retry_after_date_uses_the_current_time_when_now_is_not_given() -> None:
    in_an_hour = email.utils.format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    got = parse_retry_after(in_an_hour)
    assert got is not None
    assert 3590.0 <= got <= 3600.0


def test_parse_retry_after_date_with_a_non_utc_now() -> None:
    now = datetime(2015, 10, 21, 9, 28, 0, tzinfo=timezone(timedelta(hours=2)))
    assert parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now=now) == 60.0


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "-5",
        "+5",
        "1.5",
        "1e3",
        "0x10",
        "5 seconds",
        "NaN",
        "inf",
        "Wed, 32 Oct 2015 07:28:00 GMT",
        "Wed, 21 Oct 99999 07:28:00 GMT",
        "Wed, 21 Foo 2015 07:28:00 GMT",
        "2015-10-21T07:28:00Z",
    ],
)
def test_parse_retry_after_returns_none_for_unusable_values(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize(
    "value", ["\u00b2", "\u00b9\u00b2", "3\u00b2"], ids=["sup2", "sup12", "3sup2"]
)
def test_parse_retry_after_returns_none_for_non_ascii_digit_garbage(value: str) -> None:
    # str.isdigit() is True for superscripts, but float() cannot read them; a receiver's
    # garbage header must yield None, not an exception out of classify().
    assert parse_retry_after(value, now=NOW) is None
