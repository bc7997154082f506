"""The plain way, for comparison only: one Celery task per event, a blocking POST each.

Prefork pool, a ``requests.Session`` per process, a Standard Webhooks HMAC signature, a
15 s timeout, no database. Outcomes are counted in Redis (``bench:ok`` / ``bench:fail``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from typing import Any

import redis
import requests
from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14")

app = Celery("plain_celery", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_session: requests.Session | None = None
_redis: redis.Redis | None = None


def _clients() -> tuple[requests.Session, redis.Redis]:
    global _session, _redis
    if _session is None or _redis is None:
        _session = requests.Session()
        _redis = redis.Redis.from_url(BROKER)
    return _session, _redis


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks v1 signature of ``{id}.{timestamp}.{body}``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@app.task(name="bench.plain.deliver")
def deliver(url: str, secret: str, event_data: dict[str, Any]) -> None:
    """POST one event; count the outcome."""
    session, r = _clients()
    body = json.dumps(event_data, separators=(",", ":")).encode()
    msg_id = "msg_" + uuid.uuid4().hex
    ts = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }
    try:
        resp = session.post(url, data=body, headers=headers, timeout=15)
        ok = 200 <= resp.status_code < 300
    except requests.RequestException:
        ok = False
    if int(event_data.get("bench", {}).get("seq", -1)) >= 0:
        r.incr("bench:ok" if ok else "bench:fail")
