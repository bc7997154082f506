"""Numbers for the pages: percentiles, per-minute series, a stacked bar chart. Pure: no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.core.models import OutcomeKind

# Chart order, bottom up; every recorded outcome has a place.
OUTCOMES = (OutcomeKind.SUCCESS.value, OutcomeKind.RETRY.value, OutcomeKind.FAILED.value,
            OutcomeKind.BLOCKED.value, OutcomeKind.DISABLE.value)
FAILING = frozenset(OUTCOMES) - {OutcomeKind.SUCCESS.value}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of `values`; None when empty."""
    if not 0 < q <= 100:
        raise ValueError("q must be in (0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


def minute_series(counts: Iterable[tuple[datetime, str, int]], start: datetime,
                  minutes: int) -> dict[str, list[int]]:
    """Counts per outcome for each minute from `start` (a whole minute), zeros filled in.

    Rows outside the window, and outcomes the chart does not know, are left out.
    """
    series = {outcome: [0] * minutes for outcome in OUTCOMES}
    for minute, outcome, count in counts:
        slot = int((minute - start) / timedelta(minutes=1))
        if 0 <= slot < minutes and outcome in series:
            series[outcome][slot] += count
    return series


@dataclass(frozen=True, slots=True)
class Segment:
    x: float
    y: float
    width: float
    height: float
    outcome: str
    count: int
    minute: int  # index into the series


def stacked_bars(series: dict[str, list[int]], width: float,
                 height: float) -> tuple[list[Segment], int]:
    """Rectangles of a stacked bar chart of `series` in a `width` x `height` box (y grows
    down), and the tallest bar's total (the scale)."""
    minutes = max((len(v) for v in series.values()), default=0)
    totals = [sum(series[o][i] for o in series if i < len(series[o])) for i in range(minutes)]
    top = max(totals, default=0)
    if minutes == 0 or top == 0:
        return [], top
    bar = width / minutes
    segments: list[Segment] = []
    for i in range(minutes):
        base = height
        for outcome in OUTCOMES:
            count = series.get(outcome, [0] * minutes)[i]
            if not count:
                continue
            h = count / top * height
            base -= h
            segments.append(Segment(round(i * bar, 2), round(base, 2),
                                    round(max(bar - 0.5, 0.5), 2), round(h, 2), outcome,
                                    count, i))
    return segments, top
