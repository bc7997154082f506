"""Engine mode: the delivery engine alone (``worker.delivery.standalone.deliver_all``) under uvloop.

No broker, no database. Run as ``python -m bench.engine_runner '<json config>'``; prints
one JSON line. The parent may run several, one per core, each with its own ``seq_start``.
After a warm-up call and a go line on stdin, ``deliver_all`` is called on successive chunks until
``duration`` or ``events`` is reached (memory stays bounded by the chunk). Each event's
``bench.t`` is the moment its chunk was handed to the engine, so latency includes queueing
inside the chunk.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import orjson

from bench.producer import event


def is_success(result: Any) -> bool:
    """Whether one result of ``deliver_all`` is a success (tolerates a few result shapes)."""
    status = getattr(result, "next_status", None)
    if status is not None:
        return str(status.value if hasattr(status, "value") else status) == "succeeded"
    outcome = getattr(result, "outcome", None)
    if outcome is not None:
        kind = getattr(outcome, "kind", outcome)
        return str(kind.value if hasattr(kind, "value") else kind) == "success"
    for name in ("ok", "succeeded", "success"):
        if hasattr(result, name):
            return bool(getattr(result, name))
    code = getattr(getattr(result, "result", result), "status_code", None)
    return isinstance(code, int) and 200 <= code < 300


async def _run(cfg: dict[str, Any]) -> dict[str, Any]:
    from worker.core.models import Delivery
    from worker.delivery.standalone import deliver_all
    from worker.settings import Settings

    settings = Settings(allowed_networks="127.0.0.0/8", **cfg.get("settings", {}))
    urls: list[str] = cfg["endpoint_urls"]
    ids: list[str] = cfg["endpoint_ids"]
    secrets = (cfg["secret"],)
    pad = "x" * int(cfg.get("pad", 0))
    total = int(cfg["events"])
    duration = float(cfg["duration"])
    chunk = int(cfg["chunk"])

    def build(start: int, end: int, now: float) -> list[Any]:
        return [
            Delivery(
                id=f"msg_bench{seq:012d}",
                endpoint_id=ids[seq % len(ids)],
                url=urls[seq % len(urls)],
                secrets=secrets,
                payload=orjson.dumps(event(seq, now, pad)),
            )
            for seq in range(start, end)
        ]

    # Warm-up on the warm-up endpoint: code paths loaded, first connections made.
    warm = max(int(cfg.get("warmup", 0)), 500)
    now = time.time()
    await deliver_all(
        [
            Delivery(id=f"msg_warm{i:012d}", endpoint_id=cfg["warmup_id"],
                     url=cfg["warmup_url"], secrets=secrets,
                     payload=orjson.dumps(event(-1 - i, now, pad)))
            for i in range(warm)
        ],
        settings,
    )
    print("warm", file=sys.stderr, flush=True)
    # The parent starts the clock for every engine process at once, then writes a line.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    deadline = time.time() + duration
    succeeded = records = published = 0
    first = int(cfg.get("seq_start", 0))
    t_first = time.time()
    while published < total and time.time() < deadline:
        end = min(total, published + chunk)
        batch = build(first + published, first + end, time.time())
        results = await deliver_all(batch, settings)
        records += len(results)
        succeeded += sum(1 for res in results if is_success(res))
        published = end
    return {
        "published": published,
        "ranges": [[first, first + published]] if published else [],
        "succeeded": succeeded,
        "failed": records - succeeded,
        "records": records,
        "t_first": t_first,
        "t_last": time.time(),
    }


def main() -> None:
    """Entry point: config as JSON in argv[1]; result as one JSON line on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = orjson.loads(sys.argv[1])
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    from worker.delivery.loop import tune_gc
    from worker.settings import get_settings

    tune_gc(get_settings().gc_threshold)  # as the worker's engine runs
    out = asyncio.run(_run(cfg))
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
