"""Celery's own ceiling: one message per event, a task that does nothing but count.

The task is registered on the real worker's Celery app when it can be imported, so the
broker settings (serializer, prefetch, acks) are the ones ``single`` uses; otherwise on a
plain app. Completions are counted with one Redis INCR; 1% of tasks also push their
end-to-end latency.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14")

try:
    from worker.celery_app import app as _app

    app: Celery = _app
except ImportError:  # the worker package is not there yet: same broker, defaults
    app = Celery("noop_celery", broker=BROKER)
    app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)

_redis: redis.Redis | None = None


@app.task(name="bench.noop", ignore_result=True)
def noop(event_data: dict[str, Any]) -> None:
    """Count the event (and sample its latency); nothing else."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(BROKER)
    meta = event_data.get("bench", {})
    seq = int(meta.get("seq", -1))
    if seq < 0:
        _redis.incr("bench:warm")
        return
    if seq % 100 == 0:
        pipe = _redis.pipeline(transaction=False)
        pipe.incr("bench:done")
        pipe.rpush("bench:lat", f"{time.time() - float(meta.get('t', 0.0)):.6f}")
        pipe.execute()
    else:
        _redis.incr("bench:done")
