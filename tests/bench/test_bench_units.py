"""Unit tests of the bench's pure parts: ledger arithmetic, percentiles, status mixes."""

from __future__ import annotations

import math

import pytest

from bench.ledger import (
    StatusPicker,
    build_ledger,
    histogram,
    parse_status_mix,
    percentile,
    rate_from_samples,
    steady_rate,
    steady_window,
)
from bench.modes import analyse
from bench.receiver import Snapshot


def test_ledger_balances_when_everything_arrives() -> None:
    led = build_ledger(100, 95, 5, sender_succeeded=95, sender_total=100)
    assert led.balanced and led.verdict == "OK"
    assert (led.delivered, led.failed, led.missing) == (95, 5, 0)
    assert led.published == led.delivered + led.failed + led.missing


def test_ledger_void_on_missing_phantom_and_disagreement() -> None:
    missing = build_ledger(100, 90, 5)
    assert missing.missing == 5 and missing.verdict == "VOID"
    assert any("missing" in p for p in missing.problems)
    assert not build_ledger(100, 100, 0, phantom=1).balanced
    assert not build_ledger(100, 100, 0, sender_succeeded=99).balanced
    assert not build_ledger(100, 100, 0, sender_total=101).balanced
    assert not build_ledger(100, 100, 0, sig_failures=1).balanced
    over = build_ledger(10, 11, 0)
    assert over.missing == 0 and not over.balanced


def test_duplicates_do_not_void_but_are_counted() -> None:
    led = build_ledger(10, 10, 0, duplicates=3)
    assert led.balanced and led.duplicates == 3


def test_percentile_interpolates() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_steady_window_excludes_ramp_and_tail() -> None:
    times = [float(i) for i in range(101)]  # one completion per second
    t0, t1, n = steady_window(times)
    assert (t0, t1) == (10.0, 90.0) and n == 80
    assert steady_rate(times) == pytest.approx(1.0)
    assert steady_rate([]) == 0.0
    assert steady_rate([1.0]) == 0.0


def test_rate_from_counter_samples() -> None:
    samples = [(float(t), 100 * t) for t in range(11)]  # 100/s
    assert rate_from_samples(samples, 1000) == pytest.approx(100.0)
    assert rate_from_samples([(0.0, 0)], 10) == 0.0


def test_histogram() -> None:
    assert histogram([0.1, 0.2, 0.6, 1.7, -1.0], 0.0, 0.5) == [2, 1, 0, 1]


def test_status_mix_parsing_and_picking() -> None:
    mix = parse_status_mix("200:0.9, 500:0.1")
    assert [c for c, _ in mix] == [200, 500]
    assert [w for _, w in mix] == pytest.approx([0.9, 0.1])
    assert parse_status_mix("204") == [(204, 1.0)]
    assert parse_status_mix("200:3,429:1") == [(200, 0.75), (429, 0.25)]
    picker = StatusPicker(mix)
    assert picker.pick(0.0) == 200 and picker.pick(0.89) == 200
    assert picker.pick(0.95) == 500 and picker.pick(0.999999) == 500
    for bad in ("", "abc", "99:1", "200:-1", "200:0"):
        with pytest.raises(ValueError):
            parse_status_mix(bad)


def test_analyse_counts_first_seen_duplicates_failures_and_phantoms() -> None:
    snap = Snapshot(
        seq=[0, 1, 1, 2, 3, 9, -1, 4, 4],
        t_recv=[1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 0.5, 6.0, 6.5],
        t_enq=[0.9, 1.9, 1.9, 2.9, 3.9, 4.9, 0.1, 5.0, 5.0],
        status=[200, 200, 200, 500, 204, 200, 200, 500, 200],
        endpoint=[0] * 9,
        ids=[b"a", b"b", b"b", b"c", b"d", b"z", b"w", b"e", b"e"],
        sig_ok=0, sig_bad=0, bad_requests=0,
    )
    facts = analyse(snap, [[0, 5]], 0.0)
    assert facts["ok"] == 4  # 0, 1, 3, 4 (4 failed first, then succeeded)
    assert facts["failed"] == 1  # 2
    assert facts["duplicates"] == 1  # 1 answered 2xx twice
    assert facts["phantom"] == 1  # 9 was never published; -1 is warm-up
    assert facts["seen"] == 5
    assert facts["ok_ids"] == {b"a", b"b", b"d", b"e"}
