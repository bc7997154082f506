"""Producer process: claims event numbers from Redis and publishes them through Celery.

Run as ``python -m bench.producer '<json config>'``; prints one JSON line with what it
published. Event numbers (``seq``) are claimed in chunks with ``INCRBY bench:next`` so any
number of producers share one exact sequence; the parent grants ``bench:credit`` (publish
up to that seq) to bound the backlog, and sets ``bench:stop`` to end the run. Producers
report ``bench:ready`` once imported and start on ``bench:go``, so their start-up cost is
outside the measured interval.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis


def event(seq: int, t: float, pad: str) -> dict[str, Any]:
    """The event body; ``bench.t`` is the enqueue (or scheduled) time."""
    return {"type": "bench.event", "bench": {"t": t, "seq": seq}, "data": {"pad": pad}}


def _publisher(cfg: dict[str, Any]) -> Callable[[list[tuple[int, float]]], None]:
    """A function publishing a list of (seq, t) events for the configured mode."""
    mode = cfg["mode"]
    pad = "x" * int(cfg.get("pad", 0))
    ids: list[str] = cfg["endpoint_ids"]
    urls: list[str] = cfg["endpoint_urls"]
    n_ep = len(ids)
    if mode == "single":
        from worker.tasks.webhook_delivery import deliver_webhook_event

        def pub_single(items: list[tuple[int, float]]) -> None:
            for seq, t in items:
                deliver_webhook_event.delay(
                    webhook_id=ids[seq % n_ep], event_data=event(seq, t, pad)
                )

        return pub_single
    if mode == "batch":
        from worker.tasks.webhook_delivery import deliver_webhook_events

        def pub_batch(items: list[tuple[int, float]]) -> None:
            deliver_webhook_events.delay(
                events=[
                    {"webhook_id": ids[seq % n_ep], "event_data": event(seq, t, pad)}
                    for seq, t in items
                ]
            )

        return pub_batch
    if mode in ("outbox", "outbox1"):
        return _outbox_publisher(cfg, pad)
    if mode == "celery-noop":
        from bench.baselines.noop_celery import noop

        def pub_noop(items: list[tuple[int, float]]) -> None:
            for seq, t in items:
                noop.delay(event(seq, t, pad))

        return pub_noop
    if mode == "baseline":
        from bench.baselines.plain_celery import deliver

        secret = cfg["secret"]

        def pub_plain(items: list[tuple[int, float]]) -> None:
            for seq, t in items:
                deliver.delay(urls[seq % n_ep], secret, event(seq, t, pad))

        return pub_plain
    raise ValueError(f"unknown mode {mode}")


def _outbox_publisher(cfg: dict[str, Any], pad: str) -> Callable[[list[tuple[int, float]]], None]:
    """Transactions writing rows with `worker.outbox.enqueue_many`: the whole chunk in one
    (`outbox`), or one transaction per event (`outbox1`).

    `bench.t` is stamped just before the transaction starts; each commit's delay after it
    goes to COMMITS, and the report measures latency from the commit.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from worker import outbox

    ids: list[str] = cfg["endpoint_ids"]
    n_ep = len(ids)
    engine = create_engine(cfg["db_url"])

    def commit(items: list[tuple[int, float]]) -> None:
        t = time.time()
        with Session(engine) as session, session.begin():
            outbox.enqueue_many(session, [
                {"webhook_id": ids[seq % n_ep], "event_data": event(seq, t, pad)}
                for seq, _ in items])
        # How long after `bench.t` the transaction committed: the latency is then measured
        # from the commit (commit -> first byte), not from the transaction's start.
        COMMITS.append([items[0][0], items[-1][0] + 1, time.time() - t])

    def pub_outbox1(items: list[tuple[int, float]]) -> None:
        for item in items:
            commit([item])

    return commit if cfg["mode"] == "outbox" else pub_outbox1


# Outbox modes: [first seq, end seq, commit time - bench.t] of each transaction committed.
COMMITS: list[list[float]] = []


def _warm_ids(cfg: dict[str, Any]) -> dict[str, Any]:
    """Warm-up events go to the dedicated warm-up endpoint."""
    return {**cfg, "endpoint_ids": [cfg["warmup_id"]], "endpoint_urls": [cfg["warmup_url"]]}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Publish until the sequence, the credit or the clock says stop."""
    r = redis.Redis.from_url(cfg["redis_url"])
    if cfg.get("warmup"):
        publish = _publisher(_warm_ids(cfg))
        n = int(cfg["warmup"])
        chunk = int(cfg["chunk"])
        for start in range(0, n, chunk):
            now = time.time()
            publish([(-1 - i, now) for i in range(start, min(n, start + chunk))])
        return {"warmup": n}
    publish = _publisher(cfg)
    r.incr("bench:ready")  # imports done: the parent starts the clock when all are ready
    give_up = time.time() + 120
    while not r.exists("bench:go") and time.time() < give_up:
        time.sleep(0.005)
    total = int(cfg["events"])
    chunk = int(cfg["chunk"])
    rate = float(cfg.get("rate") or 0.0)  # events/s for this producer, 0 = as fast as possible
    ranges: list[list[int]] = []
    published = 0
    errors = 0
    t_first = 0.0
    t_last = 0.0
    sched0 = time.time()
    k = 0  # events this producer has scheduled
    while not r.exists("bench:stop"):
        end = int(r.incrby("bench:next", chunk))
        start = end - chunk
        if start >= total:
            break
        end = min(end, total)
        while int(r.get("bench:credit") or 0) < end:
            if r.exists("bench:stop"):
                break
            time.sleep(0.005)
        else:
            items: list[tuple[int, float]] = []
            for seq in range(start, end):
                if rate > 0:
                    due = sched0 + k / rate
                    delay = due - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    items.append((seq, due))
                else:
                    items.append((seq, time.time()))
                k += 1
                if rate > 0 and cfg["mode"] not in ("batch", "outbox"):
                    try:
                        publish(items)
                        _add(ranges, items[0][0], items[0][0] + 1)
                        published += 1
                    except Exception:
                        errors += 1
                    items = []
            if items:
                try:
                    publish(items)
                    _add(ranges, items[0][0], items[-1][0] + 1)
                    published += len(items)
                except Exception as exc:
                    errors += len(items)
                    print(f"producer: publish failed: {exc!r}", file=sys.stderr)
            if not t_first:
                t_first = time.time() if rate <= 0 else sched0
            t_last = time.time()
            continue
        break  # stopped while waiting for credit: the claimed chunk is not published
    return {
        "published": published,
        "ranges": ranges,
        "errors": errors,
        "t_first": t_first,
        "t_last": t_last,
        "commits_file": _save_commits(cfg),
    }


def _save_commits(cfg: dict[str, Any]) -> str | None:
    """COMMITS go to a file, not stdout: the parent reads stdout only once every producer
    has exited, so a result past the pipe's buffer would block the producer for ever."""
    if not COMMITS or not cfg.get("commits_dir"):
        return None
    path = Path(cfg["commits_dir"]) / f"commits-{os.getpid()}-{time.time_ns()}.json"
    path.write_bytes(orjson.dumps(COMMITS))
    return str(path)


def _add(ranges: list[list[int]], a: int, b: int) -> None:
    """Append [a, b) to a list of half-open ranges, merging with the last one."""
    if ranges and ranges[-1][1] == a:
        ranges[-1][1] = b
    else:
        ranges.append([a, b])


def main() -> None:
    """Entry point: config as JSON in argv[1]; result as one JSON line on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = orjson.loads(sys.argv[1])
    out = run(cfg)
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
