"""Pure arithmetic of a bench run: ledger, percentiles, steady-state window, status mixes."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ledger:
    """Where every published event ended up, and whether the sources agree.

    ``delivered`` and ``failed`` come from the receiver (unique events answered 2xx, and
    unique events seen but never answered 2xx); ``missing`` is what neither saw. The
    sender's own record (database rows, engine results, task counters) is cross-checked.
    """

    published: int
    delivered: int
    failed: int
    missing: int
    duplicates: int
    phantom: int
    sender_succeeded: int | None = None
    sender_total: int | None = None
    problems: tuple[str, ...] = field(default=())

    @property
    def balanced(self) -> bool:
        """True when the ledger adds up and every cross-check agrees."""
        return not self.problems

    @property
    def verdict(self) -> str:
        """``OK`` or ``VOID``."""
        return "OK" if self.balanced else "VOID"


def build_ledger(
    published: int,
    ok_seqs: int,
    failed_seqs: int,
    duplicates: int = 0,
    phantom: int = 0,
    sender_succeeded: int | None = None,
    sender_total: int | None = None,
    sig_failures: int = 0,
) -> Ledger:
    """Build a ledger from counts and list every reason it does not balance.

    ``ok_seqs``/``failed_seqs`` must already be restricted to published events; ``phantom``
    counts events seen that were never published.
    """
    problems: list[str] = []
    missing = published - ok_seqs - failed_seqs
    if published < 0 or ok_seqs < 0 or failed_seqs < 0:
        problems.append("negative count")
    if missing < 0:
        problems.append(f"receiver saw {-missing} more events than were published")
    elif missing > 0:
        problems.append(f"{missing} events missing after drain")
    if phantom:
        problems.append(f"{phantom} events received that were never published")
    if sender_succeeded is not None and sender_succeeded != ok_seqs:
        problems.append(
            f"sender recorded {sender_succeeded} succeeded, receiver acknowledged {ok_seqs}"
        )
    if sender_total is not None and sender_total != published:
        problems.append(f"sender holds {sender_total} records for {published} published")
    if sig_failures:
        problems.append(f"{sig_failures} sampled signatures failed verification")
    return Ledger(
        published=published,
        delivered=ok_seqs,
        failed=failed_seqs,
        missing=max(missing, 0),
        duplicates=duplicates,
        phantom=phantom,
        sender_succeeded=sender_succeeded,
        sender_total=sender_total,
        problems=tuple(problems),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already *sorted* values, linear interpolation.

    Returns NaN for an empty sequence.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile out of range: {q}")
    n = len(values)
    if n == 0:
        return math.nan
    if n == 1:
        return float(values[0])
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(values[lo]) + (float(values[hi]) - float(values[lo])) * frac


def steady_window(
    times: Sequence[float], lo_frac: float = 0.1, hi_frac: float = 0.9
) -> tuple[float, float, int]:
    """Steady-state window of sorted completion times: the span between the lo and hi quantile.

    Returns ``(t_start, t_end, count_inside)``; the rate is ``count / (t_end - t_start)``.
    Excludes the ramp-up (warm caches, producers starting) and the drain tail.
    """
    n = len(times)
    if n < 2:
        return (times[0], times[0], n) if n else (0.0, 0.0, 0)
    i = int(n * lo_frac)
    j = max(i + 1, min(n - 1, math.ceil(n * hi_frac) - 1))
    return times[i], times[j], j - i


def steady_rate(times: Sequence[float], lo_frac: float = 0.1, hi_frac: float = 0.9) -> float:
    """Completions per second in the steady window of sorted completion times (0 if undefined)."""
    t0, t1, count = steady_window(times, lo_frac, hi_frac)
    if t1 <= t0:
        return 0.0
    return count / (t1 - t0)


def rate_from_samples(
    samples: Sequence[tuple[float, int]], total: int, lo_frac: float = 0.1, hi_frac: float = 0.9
) -> float:
    """Steady rate from polled ``(time, cumulative count)`` samples (counter-based modes).

    The times at which the counter crossed ``lo_frac*total`` and ``hi_frac*total`` are
    interpolated linearly between samples.
    """
    if total <= 0 or len(samples) < 2:
        return 0.0

    def crossing(target: float) -> float | None:
        for (ta, ca), (tb, cb) in itertools.pairwise(samples):
            if ca <= target <= cb and cb > ca:
                return ta + (tb - ta) * (target - ca) / (cb - ca)
        return None

    lo_t = crossing(total * lo_frac)
    hi_t = crossing(total * hi_frac)
    if lo_t is None or hi_t is None or hi_t <= lo_t:
        return 0.0
    return total * (hi_frac - lo_frac) / (hi_t - lo_t)


def histogram(times: Iterable[float], start: float, bucket: float) -> list[int]:
    """Counts per ``bucket``-second interval from ``start`` (for throughput-over-time plots)."""
    counts: list[int] = []
    for t in times:
        k = int((t - start) // bucket)
        if k < 0:
            continue
        if k >= len(counts):
            counts.extend([0] * (k + 1 - len(counts)))
        counts[k] += 1
    return counts


def parse_status_mix(spec: str) -> list[tuple[int, float]]:
    """Parse ``"200:0.9,500:0.1"`` into ``[(200, 0.9), (500, 0.1)]``; weights are normalised.

    A bare code (``"204"``) means weight 1. Raises ``ValueError`` on bad input.
    """
    out: list[tuple[int, float]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        code_s, sep, weight_s = part.partition(":")
        code = int(code_s)
        weight = float(weight_s) if sep else 1.0
        if not 100 <= code <= 599:
            raise ValueError(f"bad HTTP status: {code}")
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"bad weight: {weight_s}")
        out.append((code, weight))
    total = sum(w for _, w in out)
    if not out or total <= 0:
        raise ValueError(f"empty status mix: {spec!r}")
    return [(c, w / total) for c, w in out]


class StatusPicker:
    """Picks a status code from a normalised mix given a uniform number in [0, 1)."""

    def __init__(self, mix: Sequence[tuple[int, float]]) -> None:
        self.codes = [c for c, _ in mix]
        acc = 0.0
        self.bounds: list[float] = []
        for _, w in mix:
            acc += w
            self.bounds.append(acc)

    def pick(self, u: float) -> int:
        """Status code for uniform draw ``u``."""
        i = bisect.bisect_right(self.bounds, u)
        return self.codes[min(i, len(self.codes) - 1)]


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b
