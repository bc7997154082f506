"""Running one mode: workers, warm-up, producers with a bounded backlog, drain, analysis."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import redis

from bench import db
from bench.ledger import (
    build_ledger,
    histogram,
    percentile,
    rate_from_samples,
    steady_rate,
    steady_window,
)
from bench.procs import (
    Children,
    Sampler,
    child_env,
    cpu_seconds,
    foreign_cores,
    foreign_cpu,
    tool,
)
from bench.receiver import ReceiverPool, Snapshot
from bench.report import BUCKET_SECONDS, ModeResult

ALL_MODES = ("engine", "celery-noop", "single", "batch", "baseline", "outbox", "outbox1")
# Modes whose workers are the real worker with its database.
DB_MODES = ("single", "batch", "outbox", "outbox1")
# Outbox modes: producers write rows in their own transactions, no broker message; events
# per transaction.
OUTBOX_EVENTS = {"outbox": 100, "outbox1": 1}
RSS_FLAT_FROM = 100_000  # events delivered when the RSS-flatness target starts counting
WARMUP_EP_INDEX = 65000  # path /ep/65000: never a slow endpoint


@dataclass
class Context:
    """What every mode of a run shares."""

    args: Any
    children: Children
    receiver: ReceiverPool
    redis_url: str
    db_url: str
    secret: str
    endpoint_ids: list[str]
    endpoint_urls: list[str]
    warmup_url: str
    logdir: Path
    db_ready: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def redis(self) -> redis.Redis:
        """A Redis client on the bench's database."""
        return redis.Redis.from_url(self.redis_url)


class Progress:
    """tqdm on stderr when available, else a line per second."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.last = 0
        self.last_print = 0.0
        self.bar: Any = None
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

            self.bar = tqdm(total=total, desc=label, unit="ev", file=sys.stderr, leave=False,
                            dynamic_ncols=True, mininterval=0.5)
        except ImportError:
            pass

    def update(self, done: int, info: str = "") -> None:
        """Show ``done`` completions."""
        if self.bar is not None:
            self.bar.update(max(0, done - self.last))
            if info:
                self.bar.set_postfix_str(info, refresh=False)
        elif time.monotonic() - self.last_print >= 1.0:
            print(f"  {self.label}: {done:,} {info}", file=sys.stderr, flush=True)
            self.last_print = time.monotonic()
        self.last = done

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()


def worker_env(ctx: Context) -> dict[str, str]:
    """Environment of worker and producer processes."""
    a = ctx.args
    env = {
        "CELERY_BROKER_URL": ctx.redis_url,
        "DATABASE_URL": ctx.db_url,
        "WEBHOOKS_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
        "WEBHOOKS_LOG_LEVEL": a.log_level,
        "PYTHONUNBUFFERED": "1",
    }
    if not a.retries:
        env["WEBHOOKS_RETRY_SCHEDULE"] = "none"
    if a.max_in_flight:
        env["WEBHOOKS_MAX_IN_FLIGHT"] = str(a.max_in_flight)
    return child_env(env)


def worker_commands(ctx: Context, mode: str) -> tuple[list[list[str]], str]:
    """The worker command lines for ``mode`` and a one-line description."""
    a = ctx.args
    base = ["worker", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", a.log_level.lower()]
    if mode == "baseline":
        app = "bench.baselines.plain_celery"
        cmds = [[*tool("celery"), "-A", app, *base, "--pool", "prefork", "-c",
                 str(a.baseline_concurrency), "-n", "plain@%h"]]
        return cmds, f"1 process, prefork {a.baseline_concurrency}, requests.Session, no db"
    app = "worker.celery_app" if mode in DB_MODES else "bench.baselines.noop_celery"
    pool = ["--pool", a.pool] + (["-c", str(a.concurrency)] if a.pool != "solo" else [])
    cmds = [[*tool("celery"), "-A", app, *base, *pool, "-n", f"bench{i}@%h"]
            for i in range(a.workers)]
    pool_desc = "solo" if a.pool == "solo" else f"{a.pool} {a.concurrency}"
    extra = f", {a.batch_size} events/message" if mode == "batch" else ""
    if mode in OUTBOX_EVENTS:
        extra = (f", outbox: {OUTBOX_EVENTS[mode]} event(s)/transaction, no broker message, "
                 "claimed on NOTIFY (PostgreSQL) or poll (SQLite)")
    dbd = f", db {db.describe(ctx.db_url)}" if mode in DB_MODES else ", no db"
    return cmds, f"{a.workers} worker process(es), {pool_desc}{extra}{dbd}, {a.producers} producers"


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _check_alive(procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[Path]) -> None:
    for p, log in zip(procs, logs, strict=True):
        if p.poll() is not None:
            raise RuntimeError(f"worker exited with {p.returncode}:\n{_tail(log)}")


def analyse(
    snap: Snapshot, ranges: Sequence[Sequence[int]], t0: float, slow_endpoints: int = 0,
    commits: Sequence[Sequence[float]] = (),
) -> dict[str, Any]:
    """Turn receiver records into per-event facts for the published ``ranges``.

    ``fast_rate`` is the steady rate of events bound for endpoints not made slow.
    ``commits`` ([first seq, end seq, seconds after ``bench.t``], outbox modes) move each
    event's latency start from ``bench.t`` to its transaction's commit.
    """
    top = max((r[1] for r in ranges), default=0)
    published = bytearray(top)
    for a, b in ranges:
        published[a:b] = b"\x01" * (b - a)
    first: dict[int, float] = {}
    enq: dict[int, float] = {}
    ep_of: dict[int, int] = {}
    ok_count: dict[int, int] = {}
    ok_ids: set[bytes] = set()
    phantom: set[int] = set()
    for i, seq in enumerate(snap.seq):
        if seq < 0:
            continue  # warm-up or capacity check
        if seq >= top or not published[seq]:
            phantom.add(seq)
            continue
        t = snap.t_recv[i]
        if seq not in first or t < first[seq]:
            first[seq] = t
            enq[seq] = snap.t_enq[i]
            ep_of[seq] = snap.endpoint[i]
        if 200 <= snap.status[i] < 300:
            ok_count[seq] = ok_count.get(seq, 0) + 1
            if i < len(snap.ids):
                ok_ids.add(snap.ids[i])
    times = sorted(first.values())
    fast = sorted(first[s] for s in first if ep_of[s] >= slow_endpoints)
    t_start, t_end, inside = steady_window(times)
    rate = inside / (t_end - t_start) if t_end > t_start else 0.0
    committed_after = {}
    for a, b, delay in commits:
        for seq in range(int(a), int(b)):
            committed_after[seq] = delay
    lat = sorted((first[s] - enq[s] - committed_after.get(s, 0.0)) * 1000.0
                 for s in first if t_start <= first[s] <= t_end)
    return {
        "ok": len(ok_count),
        "failed": len(first) - len(ok_count),
        "duplicates": sum(c - 1 for c in ok_count.values()),
        "phantom": len(phantom),
        "rate": rate,
        "lat": lat,
        "series": histogram(times, t0, BUCKET_SECONDS),
        "ok_ids": ok_ids,
        "seen": len(first),
        "fast_rate": steady_rate(fast) if slow_endpoints else None,
    }


def _latency_fields(lat: Sequence[float]) -> dict[str, Any]:
    sample = list(lat) if len(lat) <= 5000 else random.Random(1).sample(list(lat), 5000)
    return {
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "latency_count": len(lat),
        "latencies_ms": sample,
    }


def run_celery_mode(ctx: Context, mode: str, rate: float | None = None,
                    label: str | None = None) -> ModeResult:
    """One Celery mode end to end; always stops its workers and producers."""
    a = ctx.args
    label = label or mode
    r = ctx.redis
    r.flushdb()
    uses_db = mode in DB_MODES
    if uses_db:
        if not ctx.db_ready:
            db.recreate(ctx.db_url)
            eps = list(zip(ctx.endpoint_ids, ctx.endpoint_urls, strict=True))
            db.setup(ctx.db_url, [*eps, (db.WARMUP_ENDPOINT, ctx.warmup_url)], ctx.secret)
            ctx.db_ready = True
        else:
            db.clear(ctx.db_url)
    ctx.receiver.reset()
    env = worker_env(ctx)
    cmds, setup = worker_commands(ctx, mode)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    producers: list[subprocess.Popen[bytes]] = []
    sampler: Sampler | None = None
    bar: Progress | None = None
    try:
        for i, cmd in enumerate(cmds):
            log = ctx.logdir / f"{label}-worker{i}.log"
            logs.append(log)
            with log.open("wb") as fh:
                procs.append(ctx.children.start(cmd, env, stdout=fh, stderr=subprocess.STDOUT))
        sampler = Sampler([p.pid for p in procs]).start()
        count_done = _completion_counter(ctx, mode)
        pcfg = _producer_config(ctx, mode, rate)
        _warm_up(ctx, mode, pcfg, env, procs, logs)
        ctx.receiver.reset()
        r.delete("bench:next", "bench:stop", "bench:done", "bench:ok", "bench:fail", "bench:lat",
                 "bench:ready", "bench:go")
        window_min = max(a.window, pcfg["chunk"] * (2 * len(procs) + 2))
        r.set("bench:credit", 0)
        for _ in range(a.producers):
            producers.append(ctx.children.start(
                [sys.executable, "-m", "bench.producer", orjson.dumps(pcfg).decode()],
                env, stdout=subprocess.PIPE, stderr=None,
            ))
        ready_by = time.time() + 60
        while int(r.get("bench:ready") or 0) < a.producers:
            if time.time() > ready_by or any(p.poll() is not None for p in producers):
                raise RuntimeError("producers did not start")
            time.sleep(0.02)
        sampler.mark()
        rcv_cpu0 = cpu_seconds(ctx.receiver.pids)
        foreign0 = foreign_cpu()
        t0 = time.time()
        r.set("bench:credit", window_min)
        r.set("bench:go", 1)
        bar = Progress(label, None)
        samples: list[tuple[float, int]] = [(t0, 0)]
        recent: deque[tuple[float, int]] = deque(samples)
        stop_set = False
        rss_at_flat_start = 0  # the RSS target is "flat from 100k events on"
        while any(p.poll() is None for p in producers):
            time.sleep(0.1)
            now = time.time()
            done = count_done()
            if not rss_at_flat_start and done >= RSS_FLAT_FROM:
                rss_at_flat_start = sampler.current_rss()
            samples.append((now, done))
            recent.append((now, done))
            while len(recent) > 2 and recent[0][0] < now - 2.0:
                recent.popleft()
            est = (done - recent[0][1]) / max(1e-3, now - recent[0][0])
            r.set("bench:credit", done + max(window_min, int(est * a.backlog_seconds)))
            bar.update(done, f"{est:,.0f}/s")
            if not stop_set and now - t0 >= a.duration:
                r.set("bench:stop", 1)
                stop_set = True
            if now - t0 >= a.duration + 120:
                raise RuntimeError("producers did not stop within 120 s of the deadline")
            if not stop_set:
                _check_alive(procs, logs)
        outs = [_read_json(p) for p in producers]
        published = sum(o["published"] for o in outs)
        ranges = [rg for o in outs for rg in o["ranges"]]
        t_first = min((o["t_first"] for o in outs if o["t_first"]), default=t0)
        t_last = max((o["t_last"] for o in outs), default=t0)
        enqueue_rate = published / (t_last - t_first) if t_last > t_first else 0.0
        deadline = time.time() + a.drain_timeout
        while time.time() < deadline and count_done() < published:
            time.sleep(0.1)
            samples.append((time.time(), count_done()))
            bar.update(samples[-1][1], "drain")
        commits = [c for o in outs if o.get("commits_file")
                   for c in orjson.loads(Path(o["commits_file"]).read_bytes())]
        result = _finish(ctx, mode, label, setup, published, ranges, t0, deadline, samples,
                         enqueue_rate, r, commits)
        usage = sampler.stop()
        sampler = None
        wall = time.time() - t0
        result.rate_limit = rate
        result.wall_seconds = wall
        result.foreign_cores = foreign_cores(foreign0, wall)
        result.peak_rss_mb = usage.peak_rss_mb
        result.rss_start_mb = usage.rss_at_mark / 2**20
        result.rss_end_mb = usage.rss_at_end / 2**20
        result.rss_flat_start_mb = rss_at_flat_start / 2**20
        result.cpu_per_1k = (usage.cpu_seconds / result.ledger.delivered * 1000.0
                             if result.ledger.delivered else math.nan)
        result.receiver_busy = ((cpu_seconds(ctx.receiver.pids) - rcv_cpu0)
                                / (wall * len(ctx.receiver.pids)))
        return result
    finally:
        if bar is not None:
            bar.close()
        if sampler is not None:
            sampler.stop()
        ctx.children.stop(producers, grace=2)
        ctx.children.stop(procs)


def _completion_counter(ctx: Context, mode: str) -> Callable[[], int]:
    if mode == "celery-noop":
        r = ctx.redis

        def from_redis() -> int:
            return int(r.get("bench:done") or 0)

        return from_redis
    return lambda: ctx.receiver.counts()[0]


def _producer_config(ctx: Context, mode: str, rate: float | None) -> dict[str, Any]:
    a = ctx.args
    per = (rate or 0.0) / a.producers
    if mode == "batch":
        chunk = a.batch_size if not per else max(1, min(a.batch_size, int(per * 0.02)))
    elif mode == "outbox":  # paced: a transaction per 20 ms of events, at most 100
        chunk = 100 if not per else max(1, min(100, int(per * 0.02)))
    else:
        chunk = 100 if not per else max(1, min(100, int(per * 0.05)))
    return {
        "mode": mode,
        "redis_url": ctx.redis_url,
        "events": a.events,
        "chunk": chunk,
        "rate": per,
        "pad": a.payload_pad,
        "secret": ctx.secret,
        "endpoint_ids": ctx.endpoint_ids,
        "endpoint_urls": ctx.endpoint_urls,
        "warmup_id": db.WARMUP_ENDPOINT,
        "warmup_url": ctx.warmup_url,
        "db_url": db.sync_url(ctx.db_url),
        "commits_dir": str(ctx.logdir),
    }


def _warm_up(ctx: Context, mode: str, pcfg: dict[str, Any], env: dict[str, str],
             procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[Path]) -> None:
    """Publish warm-up events and wait until all are through (workers up and hot)."""
    n = ctx.args.warmup
    cfg = {**pcfg, "warmup": n,
           "chunk": min(pcfg["chunk"], 100) if mode in ("batch", "outbox") else 100}
    p = ctx.children.start([sys.executable, "-m", "bench.producer", orjson.dumps(cfg).decode()],
                           env, stdout=subprocess.PIPE)
    _read_json(p)
    r = ctx.redis
    deadline = time.time() + 90
    while True:
        got = int(r.get("bench:warm") or 0) if mode == "celery-noop" else ctx.receiver.counts()[0]
        if got >= n:
            return
        _check_alive(procs, logs)
        if time.time() > deadline:
            raise RuntimeError(f"warm-up: {got}/{n} events through after 90 s:\n"
                               + "\n".join(_tail(log, 1500) for log in logs))
        time.sleep(0.05)


def _read_json(p: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = p.communicate(timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"child {p.args!r} exited with {p.returncode}")
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"child {p.args!r} printed no result")
    result: dict[str, Any] = orjson.loads(lines[-1])
    return result


def _finish(ctx: Context, mode: str, label: str, setup: str, published: int,
            ranges: list[list[int]], t0: float, deadline: float,
            samples: list[tuple[float, int]], enqueue_rate: float,
            r: redis.Redis, commits: Sequence[Sequence[float]] = ()) -> ModeResult:
    """Build the ledger and the figures once the drain is over."""
    if mode == "celery-noop":
        done = int(r.get("bench:done") or 0)
        lat = sorted(float(x) * 1000.0 for x in r.lrange("bench:lat", 0, -1))
        ledger = build_ledger(published, min(done, published), 0,
                              phantom=max(0, done - published))
        return ModeResult(
            mode=mode, label=label, setup=setup + " (completions counted in Redis)",
            ledger=ledger, rate=rate_from_samples(samples, done), enqueue_rate=enqueue_rate,
            series=_series_from_samples(samples, t0), **_latency_fields(lat),
        )
    # Receiver modes: wait until every published event was seen once, then analyse.
    while True:
        snap = ctx.receiver.snapshot()
        facts = analyse(snap, ranges, t0, ctx.args.slow_endpoints, commits)
        if facts["seen"] >= published or time.time() >= deadline:
            break
        time.sleep(0.5)
    sender_ok: int | None = None
    sender_total: int | None = None
    db_status: dict[str, int] | None = None
    problems_extra: list[str] = []
    if mode == "baseline":
        settle = time.time() + 10
        while True:  # the task counts its outcome after the answer
            sender_ok = int(r.get("bench:ok") or 0)
            sender_total = sender_ok + int(r.get("bench:fail") or 0)
            if sender_total >= facts["seen"] or time.time() > settle:
                break
            time.sleep(0.1)
    elif mode in DB_MODES:
        settle = time.time() + 15
        while True:  # outcomes are written after the answer: let them land
            db_status = db.status_counts(ctx.db_url)
            if db_status.get("succeeded", 0) >= facts["ok"] or time.time() > settle:
                break
            time.sleep(0.25)
        sender_ok = db_status.get("succeeded", 0)
        sender_total = sum(db_status.values())
        unseen = db.succeeded_ids(ctx.db_url) - {i.decode() for i in facts["ok_ids"]}
        if unseen:
            problems_extra.append(f"{len(unseen)} succeeded rows whose webhook-id the "
                                  "receiver never acknowledged")
    ledger = build_ledger(published, facts["ok"], facts["failed"], facts["duplicates"],
                          facts["phantom"], sender_ok, sender_total, snap.sig_bad)
    if problems_extra:
        ledger = replace(ledger, problems=ledger.problems + tuple(problems_extra))
    return ModeResult(
        mode=mode, label=label, setup=setup, ledger=ledger, rate=facts["rate"],
        fast_endpoint_rate=facts["fast_rate"],
        enqueue_rate=enqueue_rate, series=facts["series"], db_status=db_status,
        distinct_ids=len(facts["ok_ids"]), sig_checked=snap.sig_ok + snap.sig_bad,
        **_latency_fields(facts["lat"]),
    )


def _series_from_samples(samples: Sequence[tuple[float, int]], t0: float) -> list[int]:
    out: list[int] = []
    k = 1
    prev = 0
    for t, c in samples:
        while t - t0 >= k * BUCKET_SECONDS:
            out.append(c - prev)
            prev = c
            k += 1
    return out


def run_engine_mode(ctx: Context) -> ModeResult:
    """``deliver_all`` on pre-built deliveries in ``--workers`` processes; no broker, no db."""
    a = ctx.args
    ctx.receiver.reset()
    n_procs = max(1, a.workers)
    per_proc = -(-a.events // n_procs)
    base_cfg = {
        "events": per_proc,
        "duration": a.duration,
        "chunk": a.engine_chunk,
        "pad": a.payload_pad,
        "secret": ctx.secret,
        "endpoint_ids": ctx.endpoint_ids,
        "endpoint_urls": ctx.endpoint_urls,
        "warmup": a.warmup,
        "warmup_id": db.WARMUP_ENDPOINT,
        "warmup_url": ctx.warmup_url,
        "settings": {"max_in_flight": a.max_in_flight} if a.max_in_flight else {},
    }
    env = worker_env(ctx)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    bar: Progress | None = None
    sampler: Sampler | None = None
    try:
        for i in range(n_procs):
            cfg = {**base_cfg, "seq_start": i * per_proc}
            logs.append(ctx.logdir / f"engine{i}.log")
            with logs[-1].open("wb") as fh:
                procs.append(ctx.children.start(
                    [sys.executable, "-m", "bench.engine_runner", orjson.dumps(cfg).decode()],
                    env, stdout=subprocess.PIPE, stderr=fh, stdin=subprocess.PIPE))
        sampler = Sampler([p.pid for p in procs]).start()
        deadline = time.time() + 90
        while not all("warm" in _tail(log) for log in logs):
            for p, log in zip(procs, logs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"engine runner failed:\n{_tail(log)}")
            if time.time() > deadline:
                raise RuntimeError("engine warm-up did not finish in 90 s")
            time.sleep(0.05)
        sampler.mark()
        rcv_cpu0 = cpu_seconds(ctx.receiver.pids)
        foreign0 = foreign_cpu()
        warm_seen = ctx.receiver.counts()[0]
        t0 = time.time()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        bar = Progress("engine", None)
        while any(p.poll() is None for p in procs):
            time.sleep(0.1)
            bar.update(ctx.receiver.counts()[0] - warm_seen)
            if time.time() - t0 > a.duration + a.drain_timeout + 60:
                raise RuntimeError("engine run exceeded its time bound")
        outs = [_read_json(p) for p in procs]
        published = sum(int(o["published"]) for o in outs)
        ranges = [rg for o in outs for rg in o["ranges"]]
        succeeded = sum(int(o["succeeded"]) for o in outs)
        records = sum(int(o["succeeded"]) + int(o["failed"]) for o in outs)
        facts: dict[str, Any] = {}
        drain = time.time() + 10
        while True:
            snap = ctx.receiver.snapshot()
            facts = analyse(snap, ranges, t0, a.slow_endpoints)
            if facts["seen"] >= published or time.time() > drain:
                break
            time.sleep(0.2)
        usage = sampler.stop()
        sampler = None
        wall = time.time() - t0
        ledger = build_ledger(published, facts["ok"], facts["failed"], facts["duplicates"],
                              facts["phantom"], succeeded, records, snap.sig_bad)
        span = max(o["t_last"] for o in outs) - min(o["t_first"] for o in outs)
        return ModeResult(
            mode="engine", label="engine",
            setup=f"{n_procs} process(es), deliver_all on chunks of {a.engine_chunk:,} under "
                  "uvloop, no broker, no db",
            ledger=ledger, rate=facts["rate"], fast_endpoint_rate=facts["fast_rate"],
            enqueue_rate=published / span if span > 0 else 0.0,
            series=facts["series"], distinct_ids=len(facts["ok_ids"]),
            sig_checked=snap.sig_ok + snap.sig_bad, wall_seconds=wall,
            foreign_cores=foreign_cores(foreign0, wall),
            peak_rss_mb=usage.peak_rss_mb, rss_start_mb=usage.rss_at_mark / 2**20,
            rss_end_mb=usage.rss_at_end / 2**20,
            cpu_per_1k=(usage.cpu_seconds / ledger.delivered * 1000.0
                        if ledger.delivered else math.nan),
            receiver_busy=(cpu_seconds(ctx.receiver.pids) - rcv_cpu0)
            / (wall * len(ctx.receiver.pids)),
            **_latency_fields(facts["lat"]),
        )
    finally:
        if bar is not None:
            bar.close()
        if sampler is not None:
            sampler.stop()
        ctx.children.stop(procs, grace=2)


def make_logdir() -> Path:
    """A fresh directory for worker logs."""
    return Path(tempfile.mkdtemp(prefix="webhooks-bench-"))
