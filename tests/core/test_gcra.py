"""GCRA: gcra_take and check_limit, against exact values and a reference token bucket."""

from __future__ import annotations

import math
import random

import pytest

from worker.core.errors import InvalidRateLimit, WebhookError
from worker.core.gcra import check_limit, gcra_take

T0 = 1_000.0


def drain(now: float, rate: float, burst: int, tat: float | None = None) -> tuple[float, int]:
    """Take at `now` until denied; returns the TAT and how many takes were allowed."""
    taken = 0
    while True:
        new_tat, wait = gcra_take(tat, now, rate, burst)
        if new_tat is None:
            assert wait > 0
            assert tat is not None
            return tat, taken
        assert wait == 0.0
        tat = new_tat
        taken += 1


def greedy(now: float, rate: float, burst: int, grants: int) -> list[float]:
    """A taker that sleeps exactly the wait it is told: the instants of its `grants` takes."""
    tat: float | None = None
    times: list[float] = []
    while len(times) < grants:
        new_tat, wait = gcra_take(tat, now, rate, burst)
        if new_tat is None:
            now += wait
            continue
        tat = new_tat
        times.append(now)
    return times


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0, 0.0, -1.0, -1e-9, math.nan, math.inf, -math.inf])
def test_rate_must_be_finite_and_positive(rate: float) -> None:
    with pytest.raises(InvalidRateLimit, match="rate must be a finite number > 0"):
        gcra_take(None, T0, rate, 1)


@pytest.mark.parametrize("rate", ["10", None, True])
def test_rate_must_be_a_number(rate: object) -> None:
    with pytest.raises(InvalidRateLimit, match="rate must be a number"):
        check_limit(rate, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("burst", [0, -1, -100])
def test_burst_must_be_at_least_one(burst: int) -> None:
    with pytest.raises(InvalidRateLimit, match="burst must be an integer >= 1"):
        gcra_take(None, T0, 10.0, burst)


@pytest.mark.parametrize("burst", [1.5, 2.0, "3", None, True])
def test_burst_must_be_an_integer(burst: object) -> None:
    with pytest.raises(InvalidRateLimit, match="burst must be an integer >= 1"):
        check_limit(10.0, burst)  # type: ignore[arg-type]


def test_invalid_limit_is_a_value_error_of_the_taxonomy() -> None:
    with pytest.raises(ValueError):
        check_limit(0.0, 1)
    assert issubclass(InvalidRateLimit, WebhookError)


def test_integer_rate_and_the_smallest_limits_are_valid() -> None:
    check_limit(1, 1)
    check_limit(5e-324, 1)
    check_limit(1e308, 10**9)


# --- exact behaviour (rate 4/s: intervals of 0.25 s, exact in binary) ----------------------


def test_first_take_is_allowed_and_sets_tat_one_interval_ahead() -> None:
    assert gcra_take(None, T0, 4.0, 3) == (T0 + 0.25, 0.0)


def test_burst_then_one_interval_wait() -> None:
    tat: float | None = None
    for i in range(3):
        tat, wait = gcra_take(tat, T0, 4.0, 3)
        assert (tat, wait) == (T0 + 0.25 * (i + 1), 0.0)
    assert gcra_take(tat, T0, 4.0, 3) == (None, 0.25)


def test_burst_then_steady_rate() -> None:
    tat, taken = drain(T0, 4.0, 3)
    assert (tat, taken) == (T0 + 0.75, 3)
    now = T0
    for _ in range(20):
        new_tat, wait = gcra_take(tat, now, 4.0, 3)
        assert (new_tat, wait) == (None, 0.25)
        now += wait
        new_tat, wait = gcra_take(tat, now, 4.0, 3)
        assert new_tat == tat + 0.25
        assert wait == 0.0
        tat = new_tat
        # One token per interval: the next take at the same instant waits a whole interval.
        assert gcra_take(tat, now, 4.0, 3) == (None, 0.25)


def test_exact_wait_shrinks_as_time_passes() -> None:
    tat, _ = drain(T0, 4.0, 3)
    assert gcra_take(tat, T0 + 0.125, 4.0, 3) == (None, 0.125)
    assert gcra_take(tat, T0 + 0.1875, 4.0, 3) == (None, 0.0625)
    assert gcra_take(tat, T0 + 0.25, 4.0, 3) == (T0 + 1.0, 0.0)


def test_wait_values_for_an_inexact_interval() -> None:
    tat, taken = drain(T0, 3.0, 1)
    assert taken == 1
    new_tat, wait = gcra_take(tat, T0, 3.0, 1)
    assert new_tat is None
    assert wait == pytest.approx(1 / 3, abs=1e-12)
    new_tat, wait = gcra_take(tat, T0 + 0.2, 3.0, 1)
    assert new_tat is None
    assert wait == pytest.approx(1 / 3 - 0.2, abs=1e-12)


def test_denied_takes_consume_nothing() -> None:
    tat, _ = drain(T0, 4.0, 2)
    for _ in range(1000):
        assert gcra_take(tat, T0, 4.0, 2) == (None, 0.25)
    # The caller kept the TAT, so after one interval exactly one take goes through.
    new_tat, wait = gcra_take(tat, T0 + 0.25, 4.0, 2)
    assert (new_tat, wait) == (tat + 0.25, 0.0)


def test_idle_refills_up_to_burst_only() -> None:
    tat, _ = drain(T0, 4.0, 3)
    for idle in (0.75, 1.0, 60.0, 1e6):
        _, taken = drain(T0 + idle, 4.0, 3, tat)
        assert taken == 3, idle


def test_partial_refill() -> None:
    tat, _ = drain(T0, 4.0, 3)
    new_tat, taken = drain(T0 + 0.5, 4.0, 3, tat)  # two intervals: two tokens back
    assert taken == 2
    assert gcra_take(new_tat, T0 + 0.5, 4.0, 3) == (None, 0.25)


def test_stale_tat_is_the_same_as_none() -> None:
    for burst in (1, 2, 7):
        assert gcra_take(T0 - 5.0, T0, 4.0, burst) == gcra_take(None, T0, 4.0, burst)
        assert gcra_take(T0, T0, 4.0, burst) == gcra_take(None, T0, 4.0, burst)


def test_burst_one_is_strict_spacing() -> None:
    times = greedy(T0, 4.0, 1, 9)
    assert times == [T0 + 0.25 * i for i in range(9)]


def test_greedy_taker_gets_exactly_burst_plus_rate_times_seconds() -> None:
    times = greedy(T0, 4.0, 5, 5 + 4 * 10)
    assert times[:5] == [T0] * 5
    assert times[-1] == T0 + 10.0
    assert sum(1 for t in times if t <= T0 + 10.0) == 5 + 4 * 10


# --- tiny and huge rates -------------------------------------------------------------------


def test_tiny_rate_one_per_hour() -> None:
    rate = 1 / 3600
    tat, taken = drain(T0, rate, 2)
    assert taken == 2
    new_tat, wait = gcra_take(tat, T0, rate, 2)
    assert new_tat is None
    assert wait == pytest.approx(3600.0)
    assert gcra_take(tat, T0 + 3599.0, rate, 2)[0] is None
    assert gcra_take(tat, T0 + 3600.0, rate, 2)[0] is not None


def test_very_tiny_rate() -> None:
    tat, taken = drain(T0, 1e-9, 1)
    assert taken == 1
    new_tat, wait = gcra_take(tat, T0 + 1e6, 1e-9, 1)
    assert new_tat is None
    assert wait == pytest.approx(1e9 - 1e6)


def test_huge_rate_is_still_exact_near_zero() -> None:
    rate = 1e9
    times = greedy(0.0, rate, 3, 3 + 1000)
    assert times[:3] == [0.0] * 3
    assert times[-1] == pytest.approx(1000 / rate, rel=1e-9)
    _, wait = gcra_take(3 / rate, 0.0, rate, 3)
    assert wait == pytest.approx(1 / rate, rel=1e-9)


def test_million_per_second_on_a_monotonic_scale() -> None:
    now = 1e6  # eleven days of uptime: a resolution of 1.2e-10 s
    times = greedy(now, 1e6, 10, 10 + 10_000)
    assert times[-1] - now == pytest.approx(10_000 / 1e6, rel=1e-4)


def test_million_per_second_near_unix_time_is_only_approximate() -> None:
    # The documented limit: 1e-6 s is about four float steps near 1.75e9 s.
    now = 1_750_000_000.0
    times = greedy(now, 1e6, 10, 10 + 10_000)
    assert times[-1] - now == pytest.approx(10_000 / 1e6, rel=0.1)


def test_rate_below_float_resolution_is_unlimited() -> None:
    tat: float | None = None
    for _ in range(100):
        tat, wait = gcra_take(tat, 1e9, 1e300, 1)
        assert wait == 0.0


# --- a clock that goes backwards -----------------------------------------------------------


def test_clock_far_back_lets_one_take_through_then_steady() -> None:
    tat, _ = drain(T0, 4.0, 3)
    for back in (0.5, 1.0, 3600.0, 1e9):
        now = T0 - back
        new_tat, wait = gcra_take(tat, now, 4.0, 3)
        assert (new_tat, wait) == (now + 0.75, 0.0), back
        # The TAT written is sane again: the bucket is empty, one token per interval.
        assert new_tat is not None
        assert gcra_take(new_tat, now, 4.0, 3) == (None, 0.25)
        assert gcra_take(new_tat, now + 0.25, 4.0, 3) == (now + 1.0, 0.0)


def test_clock_slightly_back_is_as_if_less_time_passed() -> None:
    tat, _ = drain(T0, 4.0, 3)
    assert gcra_take(tat, T0 - 0.125, 4.0, 3) == (None, 0.375)
    assert gcra_take(tat, T0 - 0.25, 4.0, 3) == (None, 0.5)
    new_tat, taken = drain(T0 - 0.25, 4.0, 3, tat)
    assert (new_tat, taken) == (tat, 0)


def test_a_changed_limit_applies_at_once() -> None:
    tat, _ = drain(T0, 1.0, 1)  # one per second: TAT one second ahead
    new_tat, wait = gcra_take(tat, T0, 100.0, 1)  # now a hundred per second
    assert (new_tat, wait) == (T0 + 0.01, 0.0)
    tat, _ = drain(T0, 4.0, 8)  # burst lowered from 8 to 2: TAT two seconds ahead
    assert gcra_take(tat, T0, 4.0, 2) == (T0 + 0.5, 0.0)


def test_random_clock_never_breaks_the_invariants() -> None:
    rng = random.Random(1234)
    for rate, burst in ((4.0, 1), (4.0, 3), (1000.0, 50), (0.01, 2)):
        interval = 1 / rate
        tat: float | None = None
        now = T0
        for _ in range(3000):
            now += rng.choice((-1.0, 1.0)) * rng.expovariate(rate / 2)
            new_tat, wait = gcra_take(tat, now, rate, burst)
            if new_tat is None:
                # Never negative, never more than two intervals, whatever the clock did.
                assert 0 < wait <= 2 * interval * (1 + 1e-9)
            else:
                assert wait == 0.0
                assert now < new_tat <= now + burst * interval * (1 + 1e-9)
                tat = new_tat


# --- against a reference token bucket ------------------------------------------------------


class TokenBucket:
    """The textbook bucket: `burst` tokens, refilled continuously at `rate`."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, float(burst), now

    def take(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@pytest.mark.parametrize("burst", [1, 2, 3, 8])
def test_same_decisions_and_waits_as_a_token_bucket(burst: int) -> None:
    # Rate 4/s and instants on a 1/64 s grid keep every value exact in binary.
    rng = random.Random(burst)
    bucket = TokenBucket(4.0, burst, T0)
    tat: float | None = None
    now = T0
    allowed = 0
    for _ in range(5000):
        now += rng.choice((0, 0, 1, 2, 4, 8, 16, 64, 200)) / 64
        expected = bucket.take(now)
        new_tat, wait = gcra_take(tat, now, 4.0, burst)
        assert wait == expected
        assert (new_tat is not None) == (expected == 0.0)
        if new_tat is not None:
            tat = new_tat
            allowed += 1
    assert 0 < allowed < 5000


@pytest.mark.parametrize(("start", "slack"), [(T0, 1e-9), (1_750_000_000.0, 1e-4)],
                         ids=["monotonic", "unix"])
@pytest.mark.parametrize(("rate", "burst"), [(10.0, 4), (3.0, 1), (7.0, 2), (1000.0, 1),
                                             (1000.0, 30)])
def test_no_window_ever_holds_more_than_burst_plus_rate_times_its_length(
        rate: float, burst: int, start: float, slack: float) -> None:
    # `slack`: near Unix time each interval added is rounded (by up to 1.2e-7 s), which adds up
    # to a rate a few 1e-5 off; on a small clock there is no such error.
    rng = random.Random(99)
    tat: float | None = None
    now = start
    grants: list[float] = []
    while len(grants) < 400:
        # Bursts of takes at one instant, then gaps: the float rounding of the TAT must never
        # look like a clock that went back (which would let an extra take through).
        if rng.random() < 0.5:
            now += rng.expovariate(rate * 2.5)
        new_tat, _ = gcra_take(tat, now, rate, burst)
        if new_tat is not None:
            tat = new_tat
            grants.append(now)
    for i in range(len(grants)):
        for j in range(i, len(grants)):
            assert j - i + 1 <= (burst + rate * (grants[j] - grants[i])) * (1 + slack)
