"""Benchmark of webhook-worker: throughput and latency, side by side with the plain way.

Usage: ``python bench/run.py --compare [--quick]`` or ``python bench/run.py --mode batch``.
See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from sqlalchemy.engine import make_url

from bench import db, report
from bench.ledger import parse_status_mix
from bench.modes import (
    ALL_MODES,
    DB_MODES,
    Context,
    make_logdir,
    run_celery_mode,
    run_engine_mode,
)
from bench.procs import Children
from bench.receiver import ReceiverConfig, ReceiverPool, free_port, measure_capacity
from worker.core.sealing import generate_key

QUICK = {"events": 20_000, "duration": 2.5, "drain_timeout": 15.0, "warmup": 100,
         "capacity_seconds": 0.5, "engine_chunk": 5_000}
# Modes run again at half their measured rate under --compare, for latency.
HALF_RATE_MODES = ("single", "outbox")
FULL = {"events": 1_000_000, "duration": 25.0, "drain_timeout": 60.0, "warmup": 1000,
        "capacity_seconds": 2.0, "engine_chunk": 20_000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; unset sizing flags take the --quick or full defaults."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--mode", choices=ALL_MODES, help="run one mode")
    what.add_argument("--compare", action="store_true", help="run every mode in turn")
    what.add_argument("--modes", help="comma-separated subset for --compare")
    what.add_argument("--quick", action="store_true", help="short run (< 1 minute)")
    what.add_argument("--no-half-rate", action="store_true",
                      help="--compare: skip single and outbox at half their measured rates "
                           "(p99 targets)")
    what.add_argument("--receiver-capacity", action="store_true",
                      help="only measure the receiver's capacity and exit")
    size = p.add_argument_group("sizing (defaults depend on --quick)")
    size.add_argument("--events", type=int, help="cap on events per mode")
    size.add_argument("--duration", type=float, help="seconds of publishing per mode")
    size.add_argument("--drain-timeout", type=float, help="seconds to wait for stragglers")
    size.add_argument("--warmup", type=int, help="warm-up events before measuring")
    size.add_argument("--engine-chunk", type=int,
                      help="deliveries per deliver_all call in the engine mode")
    size.add_argument("--capacity-seconds", type=float, help="receiver self-load duration")
    load = p.add_argument_group("load")
    load.add_argument("--producers", type=int, default=2, help="producer processes")
    load.add_argument("--rate", type=float, default=0.0,
                      help="total events/s of the producers (0 = as fast as they can)")
    load.add_argument("--batch-size", type=int, default=500, help="events per batch message")
    load.add_argument("--payload-pad", type=int, default=100, help="filler bytes per event")
    load.add_argument("--window", type=int, default=500,
                      help="minimum backlog (published - completed) granted to producers")
    load.add_argument("--backlog-seconds", type=float, default=2.0,
                      help="backlog granted in seconds of the recent completion rate")
    wk = p.add_argument_group("workers")
    wk.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    wk.add_argument("--pool", default="solo", choices=("solo", "prefork", "threads"))
    wk.add_argument("--concurrency", type=int, default=2, help="pool size when not solo")
    wk.add_argument("--baseline-concurrency", type=int, default=4, help="baseline prefork size")
    wk.add_argument("--max-in-flight", type=int, default=0,
                    help="WEBHOOKS_MAX_IN_FLIGHT (0 = the worker's default)")
    wk.add_argument("--retries", action="store_true",
                    help="keep the worker's retry schedule (default: none, failures are final)")
    wk.add_argument("--log-level", default="WARNING")
    infra = p.add_argument_group("infrastructure")
    infra.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                       help="database of single/batch/outbox; its name must contain 'bench' "
                            "(default: $DATABASE_URL, else a temporary SQLite file)")
    infra.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                       help="broker for every Celery mode; FLUSHED at each mode")
    rcv = p.add_argument_group("receiver and faults")
    rcv.add_argument("--receiver-procs", type=int, default=2)
    rcv.add_argument("--endpoints", type=int, default=4,
                     help="distinct endpoints (127.0.0.1 .. 127.0.0.K)")
    rcv.add_argument("--latency-ms", type=float, default=0.0,
                     help="answer every request after L ms")
    rcv.add_argument("--fail-ratio", type=float, default=0.0, help="answer 500 to this fraction")
    rcv.add_argument("--slow-ratio", type=float, default=0.0,
                     help="fraction of requests answered after --slow-seconds")
    rcv.add_argument("--slow-seconds", type=float, default=10.0)
    rcv.add_argument("--slow-endpoints", type=int, default=0,
                     help="the first K endpoints always answer after --slow-seconds")
    rcv.add_argument("--status", default="", help="status mix, e.g. 200:0.9,500:0.1")
    rcv.add_argument("--sample-ratio", type=float, default=0.01,
                     help="fraction of signatures verified with standardwebhooks")
    out = p.add_argument_group("output")
    out.add_argument("--json", help="write the figures to this JSON file")
    out.add_argument("--plot", help="write a PNG of throughput over time and latencies")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not (args.mode or args.compare or args.receiver_capacity):
        p.error("give --mode M, --compare or --receiver-capacity")
    if args.status:
        try:
            args.status_mix = tuple(parse_status_mix(args.status))
        except ValueError as exc:
            p.error(f"--status: {exc}")
    else:
        args.status_mix = ()
    if args.slow_ratio or args.slow_endpoints:
        args.drain_timeout = max(args.drain_timeout, args.slow_seconds * 2 + 15)
    return args


def database_url(given: str | None, tmpdir: Path) -> str:
    """The database for single/batch, with an async driver."""
    if not given:
        return f"sqlite+aiosqlite:///{tmpdir / 'webhooks_bench.db'}"
    u = make_url(given)
    backend = u.get_backend_name()
    if backend == "postgresql" and u.drivername != "postgresql+asyncpg":
        u = u.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite" and u.drivername != "sqlite+aiosqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    return u.render_as_string(hide_password=False)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit status 0 = every ledger balanced, 2 = a VOID run, 1 = error."""
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _raise_interrupt)
    children = Children()
    tmpdir = Path(tempfile.mkdtemp(prefix="webhooks_bench-"))
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    # Endpoint secrets are sealed; the bench database is made anew each run, so is its key.
    os.environ.setdefault("WEBHOOKS_SECRET_KEYS", generate_key("bench"))
    hosts = [f"127.0.0.{i % 250 + 1}" for i in range(args.endpoints)]
    port = free_port(hosts)
    rcfg = ReceiverConfig(
        port=port, endpoints=args.endpoints, procs=args.receiver_procs, secret=secret,
        sample_ratio=args.sample_ratio, latency_ms=args.latency_ms, fail_ratio=args.fail_ratio,
        slow_ratio=args.slow_ratio, slow_seconds=args.slow_seconds,
        slow_endpoints=args.slow_endpoints, status_mix=args.status_mix,
    )
    pool: ReceiverPool | None = None
    wanted = (args.modes.split(",") if args.modes else list(ALL_MODES)) if args.compare else [
        args.mode]
    if not args.receiver_capacity and set(wanted) - {"engine"}:
        try:
            redis.Redis.from_url(args.redis_url, socket_connect_timeout=3).ping()
        except redis.RedisError as exc:
            print(f"Redis is not reachable at {args.redis_url}: {exc}", file=sys.stderr)
            return 1
    try:
        print(f"measuring the receiver ({args.receiver_procs} processes) ...", file=sys.stderr)
        clean = replace(rcfg, latency_ms=0.0, fail_ratio=0.0, slow_ratio=0.0, slow_endpoints=0,
                        status_mix=())
        pool = ReceiverPool(clean)
        capacity = measure_capacity(pool, args.capacity_seconds)
        pool.close()
        pool = None
        print(f"receiver capacity >= {capacity:,.0f} req/s", file=sys.stderr)
        if args.receiver_capacity:
            print(f"receiver capacity: {capacity:,.0f} requests/s "
                  f"({args.receiver_procs} processes, self-load on the same cores)")
            return 0
        pool = ReceiverPool(rcfg)
        ctx = Context(
            args=args, children=children, receiver=pool, redis_url=args.redis_url,
            db_url=database_url(args.database_url, tmpdir), secret=secret,
            endpoint_ids=[f"bench-ep-{i}" for i in range(args.endpoints)],
            endpoint_urls=[rcfg.url(i) for i in range(args.endpoints)],
            warmup_url=f"http://127.0.0.1:{port}/ep/65000", logdir=make_logdir(),
        )
        modes = wanted
        unknown = set(modes) - set(ALL_MODES)
        if unknown:
            raise SystemExit(f"unknown mode(s): {', '.join(sorted(unknown))}")
        if set(DB_MODES) & set(modes):
            db.check_disposable(ctx.db_url)
        results: list[report.ModeResult] = []
        failures: list[str] = []
        for mode in modes:
            print(f"--- {mode}", file=sys.stderr)
            try:
                if mode == "engine":
                    res = run_engine_mode(ctx)
                else:
                    res = run_celery_mode(ctx, mode, rate=args.rate or None)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                failures.append(f"{mode}: FAILED: {exc}")
                print(failures[-1], file=sys.stderr)
                continue
            results.append(res)
            print(f"    {res.rate:,.0f} deliveries/s, ledger {res.ledger.verdict}",
                  file=sys.stderr)
        quiet = not (args.latency_ms or args.fail_ratio or args.slow_ratio
                     or args.slow_endpoints or args.status_mix)
        for base in HALF_RATE_MODES:  # the latency targets: each at half the rate it reached
            measured = next((r for r in results if r.label == base), None)
            if (args.compare and not args.no_half_rate and measured is not None
                    and not measured.void and measured.rate > 0 and not args.rate and quiet):
                label = f"{base}@half"
                print(f"--- {label}", file=sys.stderr)
                try:
                    results.append(run_celery_mode(ctx, base, rate=measured.rate / 2,
                                                   label=label))
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    failures.append(f"{label}: FAILED: {exc}")
        faults = "".join([
            f", fail {args.fail_ratio:g}" if args.fail_ratio else "",
            f", slow {args.slow_ratio:g}x{args.slow_seconds:g}s" if args.slow_ratio else "",
            f", {args.slow_endpoints} slow endpoints" if args.slow_endpoints else "",
            f", status {args.status}" if args.status else "",
        ])
        info = report.RunInfo(
            database=db.describe(ctx.db_url), receiver_capacity=capacity,
            receiver_procs=args.receiver_procs, endpoints=args.endpoints,
            latency_ms=args.latency_ms, faults=faults, cpus=os.cpu_count() or 0,
            started=dt.datetime.now().isoformat(timespec="seconds"),
            command="python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        )
        print(report.table(results, info))
        for line in failures:
            print(line)
        if args.json:
            report.write_json(args.json, results, info)
        if args.plot:
            report.plot(args.plot, results)
        print(f"(worker logs: {ctx.logdir})", file=sys.stderr)
        if failures:
            return 1
        return 2 if any(r.void for r in results) else 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        children.stop_all()
        if pool is not None:
            pool.close()
        shutil.rmtree(tmpdir, ignore_errors=True)  # the default SQLite database
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
