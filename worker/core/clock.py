"""Time, injectable: the engine reads every clock through one of these."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps, for durations and idle times."""
        ...

    def time(self) -> float:
        """Unix seconds, for leases shared with other processes."""
        ...

    def now(self) -> datetime:
        """The aware UTC datetime, for what is written to the database."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def now(self) -> datetime:
        return datetime.now(UTC)


SYSTEM_CLOCK = SystemClock()
