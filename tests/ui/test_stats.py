"""worker.ui.stats and queries.health_of: percentiles, per-minute series, the chart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.ui.queries import health_of, window_start
from worker.ui.stats import minute_series, percentile, ratio, stacked_bars

START = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(list(reversed(values)), 1) == 1.0
    assert percentile([7.0], 50) == percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0], 50) == 1.0
    assert percentile([], 50) is None
    for bad in (0, -1, 101):
        with pytest.raises(ValueError):
            percentile(values, bad)


def test_ratio() -> None:
    assert ratio(1, 4) == 0.25 and ratio(0, 0) is None


def test_minute_series_fills_zeros_and_drops_what_is_outside() -> None:
    rows = [(START, "success", 3), (START + timedelta(minutes=2), "failed", 2),
            (START + timedelta(minutes=2), "success", 1),
            (START - timedelta(minutes=1), "success", 9),
            (START + timedelta(minutes=3), "success", 9), (START, "mystery", 4)]
    series = minute_series(rows, START, 3)
    assert series["success"] == [3, 0, 1]
    assert series["failed"] == [0, 0, 2]
    assert series["retry"] == [0, 0, 0]
    assert "mystery" not in series


def test_stacked_bars_scale_to_the_tallest_minute() -> None:
    series = minute_series([(START, "success", 2), (START, "failed", 2),
                            (START + timedelta(minutes=1), "success", 1)], START, 2)
    segments, top = stacked_bars(series, 100.0, 40.0)
    assert top == 4
    first = [s for s in segments if s.minute == 0]
    assert [(s.outcome, s.height) for s in first] == [("success", 20.0), ("failed", 20.0)]
    assert first[0].y == 20.0 and first[1].y == 0.0  # success at the bottom, failed on top
    (second,) = [s for s in segments if s.minute == 1]
    assert second.height == 10.0 and second.x == 50.0
    assert stacked_bars(minute_series([], START, 5), 100.0, 40.0) == ([], 0)


def test_window_start_is_a_whole_minute_hours_before_the_current_minute_ends() -> None:
    now = datetime(2026, 11, 25, 12, 34, 56, 789, tzinfo=UTC)
    assert window_start(now, 1) == datetime(2026, 11, 25, 11, 35, tzinfo=UTC)


def test_health_of_sampled_attempts() -> None:
    at = START
    rows = [{"attempted_at": at, "duration_ms": 10.0 * (i + 1),
             "status_code": 500 if i < 2 else 200,
             "outcome": "retry" if i < 2 else "success", "error": "HTTP 500" if i < 2 else None}
            for i in range(10)]
    h = health_of(rows)
    assert h.attempts == 10 and h.success_ratio == 0.8
    assert h.p50_ms == 50.0 and h.p99_ms == 100.0
    assert (h.last_status, h.last_outcome, h.last_error) == (500, "retry", "HTTP 500")
    empty = health_of([])
    assert empty.success_ratio is None and empty.p50_ms is None and empty.last_status is None
