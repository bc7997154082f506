"""Engine mode: the delivery engine alone (``worker.delivery.standalone.deliver_all``) under uvloop.

No broker, no database. Run as ``python -m bench.engine_runner '<json config>'``; prints
one JSON line. Deliveries are built in chunks; two chunks are kept in flight so the
engine never idles between them. Each event's ``bench.t`` is the moment its chunk was
handed to the engine.
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
    from worker.delivery.models import Delivery
    from worker.delivery.standalone import deliver_all
    from worker.settings import Settings

    settings = Settings(allowed_networks="127.0.0.0/8", **cfg.get("settings", {}))
    urls: list[str] = cfg["endpoint_urls"]
    ids: list[str] = cfg["endpoint_ids"]
    secrets = (cfg["secret"],)
    pad = "x" * int(cfg.get("pad", 0))
    total = int(cfg["events"])
    chunk = int(cfg["chunk"])
    deadline = time.time() + float(cfg["duration"])

    def build(start: int, end: int) -> list[Any]:
        now = time.time()
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

    warm = int(cfg.get("warmup", 0))
    if warm:
        now = time.time()
        await deliver_all(
            [
                Delivery(
                    id=f"msg_warm{i:012d}",
                    endpoint_id=cfg["warmup_id"],
                    url=cfg["warmup_url"],
                    secrets=secrets,
                    payload=orjson.dumps(event(-1 - i, now, pad)),
                )
                for i in range(warm)
            ],
            settings,
        )
    print("warm", file=sys.stderr, flush=True)
    succeeded = failed = published = 0
    t_first = time.time()
    running: set[asyncio.Task[Any]] = set()
    next_seq = 0
    while True:
        while len(running) < 2 and next_seq < total and time.time() < deadline:
            end = min(total, next_seq + chunk)
            batch = build(next_seq, end)
            published += len(batch)
            next_seq = end
            running.add(asyncio.ensure_future(deliver_all(batch, settings)))
        if not running:
            break
        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            for res in task.result():
                if is_success(res):
                    succeeded += 1
                else:
                    failed += 1
    return {
        "published": published,
        "ranges": [[0, published]] if published else [],
        "succeeded": succeeded,
        "failed": failed,
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
    out = asyncio.run(_run(cfg))
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
