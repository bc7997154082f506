"""The retry schedule: when, if ever, the next attempt happens."""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from datetime import UTC, datetime


def next_delay(
    schedule: Sequence[float],
    attempts_made: int,
    *,
    jitter: float = 0.0,
    rand: float = 0.5,
    retry_after: float | None = None,
    max_retry_after: float = 86400.0,
) -> float | None:
    """Seconds until the next attempt after `attempts_made` attempts, or None when exhausted.

    `rand` in [0, 1) spreads the delay over ±`jitter` of itself; a receiver's Retry-After
    lengthens the delay (never shortens it), capped at `max_retry_after`.
    """
    if attempts_made < 1:
        raise ValueError("attempts_made counts attempts already made and starts at 1")
    index = attempts_made - 1
    if index >= len(schedule):
        return None
    delay = schedule[index] * (1.0 + jitter * (2.0 * rand - 1.0))
    if retry_after is not None:
        delay = max(delay, min(retry_after, max_retry_after))
    return max(delay, 0.0)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None when unusable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    return max((when - reference).total_seconds(), 0.0)
