"""GCRA, the generic cell rate algorithm: a token bucket kept as one number per key.

A bucket of `burst` tokens refilled at `rate` tokens per second is fully described by its
theoretical arrival time (TAT): the instant at which the bucket would be full again. Each
take moves the TAT one emission interval (1 / rate) later; a take is allowed while that
leaves the TAT at most `burst` intervals ahead of now. A TAT in the past is a full bucket, so
a missing TAT (None) and a stale one mean the same thing.
"""

from __future__ import annotations

import math

from worker.core.errors import InvalidRateLimit


def check_limit(rate: float, burst: int) -> None:
    """Raise InvalidRateLimit unless rate is a finite number > 0 and burst an integer >= 1."""
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise InvalidRateLimit(f"rate must be a number of events per second, not {rate!r}")
    if not (math.isfinite(rate) and rate > 0):
        raise InvalidRateLimit(f"rate must be a finite number > 0 (events per second), "
                               f"not {rate!r}")
    if isinstance(burst, bool) or not isinstance(burst, int):
        raise InvalidRateLimit(f"burst must be an integer >= 1, not {burst!r}")
    if burst < 1:
        raise InvalidRateLimit(f"burst must be an integer >= 1 (events at once), not {burst!r}")


def gcra_take(tat: float | None, now: float, rate: float,
              burst: int) -> tuple[float | None, float]:
    """Try to take one token at `now` from the bucket whose TAT is `tat`.

    Returns (the new TAT, 0.0) when allowed, or (None, seconds until a token is available)
    when not; a denied take changes nothing, so the caller keeps the old TAT. Times are
    seconds on any one clock. A wait is never more than two intervals, even after the clock
    went back; a jump back of more than an interval lets one take through at once.

    1 / rate is added to `now` in floating point: near Unix time (1.75e9 s, resolution 2.4e-7 s)
    a million per second is already off by several percent, so keep `now` small (monotonic
    seconds, or seconds since a recent epoch) for such rates. A 1 / rate below the resolution
    of `now` is not limited at all.
    """
    check_limit(rate, burst)
    interval = 1.0 / rate
    if tat is None or tat < now:
        tat = now  # idle: the bucket refilled, but never beyond `burst` tokens
    elif tat > now + (burst + 1) * interval:
        # No take can leave the TAT more than `burst` intervals ahead, so the clock went back
        # (or the limit changed since). Waiting for the old TAT could block for as
        # long as the jump; count one token instead, so the TAT written is a sane one again.
        return now + burst * interval, 0.0
    # The take is allowed once the TAT is at most burst - 1 intervals ahead (written this way,
    # burst 1 compares the TAT itself, without rounding).
    allowed_at = tat - (burst - 1) * interval
    if allowed_at <= now:
        return tat + interval, 0.0
    return None, allowed_at - now
