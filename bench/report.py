"""Results of a run: the table, the targets, JSON and the plot."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.ledger import Ledger, ratio

BUCKET_SECONDS = 0.5
# Modes whose workers are the real worker (RSS targets).
WORKER_MODES = ("single", "batch", "outbox", "outbox1")


@dataclass
class ModeResult:
    """Everything measured for one mode."""

    mode: str
    label: str
    setup: str
    ledger: Ledger
    rate: float  # deliveries/s in the steady window
    enqueue_rate: float
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    latency_count: int = 0
    peak_rss_mb: float = 0.0
    rss_start_mb: float = 0.0  # largest worker RSS when measuring began, and when it ended
    rss_end_mb: float = 0.0
    rss_flat_start_mb: float = 0.0  # RSS when 100k events had been delivered
    cpu_per_1k: float = math.nan
    receiver_busy: float = math.nan  # receiver CPU / (wall x processes)
    wall_seconds: float = 0.0
    foreign_cores: float = 0.0  # cores used meanwhile by processes outside the bench
    rate_limit: float | None = None
    fast_endpoint_rate: float | None = None  # with --slow-endpoints: the others' deliveries/s
    db_status: dict[str, int] | None = None
    distinct_ids: int | None = None
    sig_checked: int = 0
    series: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # sample, for the plot only

    @property
    def void(self) -> bool:
        """The ledger does not balance: figures must not be quoted."""
        return not self.ledger.balanced


@dataclass
class RunInfo:
    """Conditions shared by every mode of a run."""

    database: str
    receiver_capacity: float
    receiver_procs: int
    endpoints: int
    latency_ms: float
    faults: str
    cpus: int
    started: str
    command: str


@dataclass
class Target:
    """One target of issue 4, evaluated on this run."""

    name: str
    measured: str
    status: str  # met / missed / n/a / void


def _fmt(v: float | None, digits: int = 0, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}{suffix}"


def _by_label(results: Sequence[ModeResult]) -> dict[str, ModeResult]:
    return {r.label: r for r in results}


def targets(results: Sequence[ModeResult], info: RunInfo) -> list[Target]:
    """Evaluate the issue's targets against the modes of this run."""
    by = _by_label(results)
    out: list[Target] = []
    pg = info.database == "postgresql"

    def rel(name: str, a: str, b: str, goal: float, pct: bool, note: str = "") -> None:
        ra, rb = by.get(a), by.get(b)
        if ra is None or rb is None:
            out.append(Target(name, f"needs {a} and {b}", "n/a"))
            return
        r = ratio(ra.rate, rb.rate)
        measured = "-" if r is None else (f"{r * 100:.0f}%" if pct else f"{r:.2f}x")
        if ra.void or rb.void:
            status = "void"
        elif r is None:
            status = "missed"
        else:
            status = "met" if r >= goal else "missed"
        out.append(Target(name + note, measured, status))

    slow = info.latency_ms >= 100
    if not slow:
        db_note = "" if pg else " [measured on sqlite; target is for PostgreSQL]"
        rel("batch >= 12x baseline", "batch", "baseline", 12.0, False, db_note)
        rel("batch >= 70% of engine", "batch", "engine", 0.7, True, db_note)
        rel("single >= 90% of celery-noop", "single", "celery-noop", 0.9, True)
        rel("single >= 1.5x baseline", "single", "baseline", 1.5, False)
    else:
        rel("single >= 25x baseline (endpoints answer after 100 ms)", "single", "baseline",
            25.0, False)
        rel("batch >= 40x baseline (endpoints answer after 100 ms)", "batch", "baseline",
            40.0, False)
    def at_half(base: str, limit_ms: float, what: str = "p99") -> None:
        half = by.get(f"{base}@half")
        name = f"{base} {what} <= {limit_ms:g} ms at half max rate"
        if half is None:
            out.append(Target(name, f"needs {base}@half", "n/a"))
            return
        status = "void" if half.void else ("met" if half.p99_ms <= limit_ms else "missed")
        out.append(Target(name.replace("rate", f"rate ({_fmt(half.rate_limit)}/s)"),
                          _fmt(half.p99_ms, 1, " ms"), status))

    at_half("single", 100.0)
    if "outbox" in by or "outbox@half" in by:
        rel("outbox >= 5x single", "outbox", "single", 5.0, False,
            "" if pg else " [measured on sqlite; target is for PostgreSQL]")
        at_half("outbox", 200.0, "p99 commit->first byte")
    # Flat from 100k events on: warm-up growth before that is not what the target asks about.
    big = [r for r in results if r.mode in WORKER_MODES and r.rss_flat_start_mb]
    if big:
        growth = max((r.rss_end_mb - r.rss_flat_start_mb) / r.rss_flat_start_mb for r in big)
        longest = max(r.ledger.published for r in big)
        status = ("met" if abs(growth) <= 0.10 else "missed") if longest >= 1_000_000 else "n/a"
        out.append(Target(
            f"worker RSS flat (+-10%) from 100k to 1M events (run: 100k -> {longest:,})",
            f"{growth * 100:+.1f}%" + ("" if longest >= 1_000_000 else "; needs >= 1M events"),
            status))
    else:
        out.append(Target("worker RSS flat (+-10%) from 100k to 1M events",
                          "needs single/batch past 100k events", "n/a"))
    workers = [r for r in results if r.mode in WORKER_MODES]
    if workers:
        peak = max(r.peak_rss_mb for r in workers)
        out.append(Target("peak RSS per worker process <= 150 MB", _fmt(peak, 0, " MB"),
                          "met" if peak <= 150 else "missed"))
    else:
        out.append(Target("peak RSS per worker process <= 150 MB", "needs single/batch", "n/a"))
    return out


COLUMNS: list[tuple[str, Callable[[ModeResult, dict[str, ModeResult]], str]]] = [
    ("mode", lambda r, b: r.label),
    ("deliv/s", lambda r, b: _fmt(r.rate)),
    ("enqueue/s", lambda r, b: _fmt(r.enqueue_rate)),
    ("p50 ms", lambda r, b: _fmt(r.p50_ms, 1)),
    ("p95 ms", lambda r, b: _fmt(r.p95_ms, 1)),
    ("p99 ms", lambda r, b: _fmt(r.p99_ms, 1)),
    ("RSS MB", lambda r, b: _fmt(r.peak_rss_mb, 0)),
    ("CPU s/1k", lambda r, b: _fmt(r.cpu_per_1k, 2)),
    ("x base", lambda r, b: _ratio_cell(r, b.get("baseline"), False)),
    ("x single", lambda r, b: _ratio_cell(r, b.get("single"), False)),
    ("% noop", lambda r, b: _ratio_cell(r, b.get("celery-noop"), True)),
    ("% engine", lambda r, b: _ratio_cell(r, b.get("engine"), True)),
    ("rcv busy", lambda r, b: _fmt(r.receiver_busy * 100, 0, "%")),
    ("other", lambda r, b: _fmt(r.foreign_cores, 2)),
    ("published", lambda r, b: _fmt(r.ledger.published)),
    ("deliv", lambda r, b: _fmt(r.ledger.delivered)),
    ("failed", lambda r, b: _fmt(r.ledger.failed)),
    ("missing", lambda r, b: _fmt(r.ledger.missing)),
    ("dup", lambda r, b: _fmt(r.ledger.duplicates)),
    ("ledger", lambda r, b: r.ledger.verdict),
]


def _ratio_cell(r: ModeResult, ref: ModeResult | None, pct: bool) -> str:
    if ref is None or ref is r or r.rate_limit:
        return "-"  # a paced run's rate is the pace, not a capacity
    v = ratio(r.rate, ref.rate)
    if v is None:
        return "-"
    return f"{v * 100:.0f}%" if pct else f"{v:.1f}x"


def table(results: Sequence[ModeResult], info: RunInfo) -> str:
    """The final table, the setup of each mode, problems and the targets, as text."""
    by = _by_label(results)
    rows = [[name for name, _ in COLUMNS]]
    rows += [[fn(r, by) for _, fn in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        f"webhook-worker bench  {info.started}  ({info.cpus} CPUs, database {info.database}, "
        f"{info.endpoints} endpoints, endpoint latency {info.latency_ms:g} ms{info.faults})",
        f"receiver: {info.receiver_procs} processes, capacity >= {info.receiver_capacity:,.0f} "
        "req/s (self-load on the same cores)",
        f"command: {info.command}",
        "",
    ]
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    for r in results:
        extra = f"; rate limit {r.rate_limit:,.0f}/s" if r.rate_limit else ""
        db = f"; db {r.db_status}" if r.db_status is not None else ""
        if r.fast_endpoint_rate is not None:
            db += f"; non-slow endpoints {r.fast_endpoint_rate:,.0f} deliv/s"
        if r.rss_start_mb:
            db += f"; worker RSS {r.rss_start_mb:.0f} -> {r.rss_end_mb:.0f} MB"
            if r.rss_flat_start_mb:
                db += f" ({r.rss_flat_start_mb:.0f} MB at 100k events)"
        lines.append(f"{r.label}: {r.setup}{extra}{db}; {r.latency_count:,} latencies, "
                     f"{r.sig_checked} signatures checked, {r.wall_seconds:.1f} s")
        for p in r.ledger.problems:
            lines.append(f"  VOID: {p}")
        if r.foreign_cores >= 0.2:
            lines.append(f"  WARNING: other processes used {r.foreign_cores:.2f} cores meanwhile; "
                         "these figures are not clean")
    lines.append("")
    lines.append("targets (issue 4), measured in this run:")
    for t in targets(results, info):
        lines.append(f"  [{t.status:>6}] {t.name}: {t.measured}")
    return "\n".join(lines)


def to_json(results: Sequence[ModeResult], info: RunInfo) -> dict[str, Any]:
    """Same figures as the table, as a JSON-ready dict."""
    modes = []
    by = _by_label(results)
    for r in results:
        d = asdict(r)
        d.pop("latencies_ms")
        d["ledger"] = {**asdict(r.ledger), "balanced": r.ledger.balanced,
                       "verdict": r.ledger.verdict}
        d["deliveries_per_s"] = r.rate
        d["bucket_seconds"] = BUCKET_SECONDS
        for ref in ("baseline", "celery-noop", "engine"):
            other = by.get(ref)
            d[f"ratio_{ref.replace('-', '_')}"] = (
                None if other is None or other is r or r.rate_limit
                else ratio(r.rate, other.rate)
            )
        for k, v in list(d.items()):
            if isinstance(v, float) and math.isnan(v):
                d[k] = None
        modes.append(d)
    return {
        "run": asdict(info),
        "modes": modes,
        "targets": [asdict(t) for t in targets(results, info)],
    }


def write_json(path: str, results: Sequence[ModeResult], info: RunInfo) -> None:
    """Write ``to_json`` to ``path``."""
    Path(path).write_bytes(orjson.dumps(to_json(results, info), option=orjson.OPT_INDENT_2))


def plot(path: str, results: Sequence[ModeResult]) -> None:
    """PNG: deliveries/s over time per mode, and the end-to-end latency distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        xs = [i * BUCKET_SECONDS for i in range(len(r.series))]
        ax1.plot(xs, [c / BUCKET_SECONDS for c in r.series], label=r.label)
        if r.latencies_ms:
            lat = sorted(r.latencies_ms)
            ys = [(i + 1) / len(lat) for i in range(len(lat))]
            ax2.plot([max(v, 0.01) for v in lat], ys, label=r.label)
    ax1.set_xlabel("seconds since producers started")
    ax1.set_ylabel("deliveries/s (first seen at the receiver)")
    ax1.set_title("throughput over time")
    ax1.legend()
    ax2.set_xscale("log")
    ax2.set_xlabel("end-to-end latency, ms (enqueue -> receiver)")
    ax2.set_ylabel("fraction of events")
    ax2.set_title("latency distribution (CDF)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
