"""A producer process for the fault tests: the real `.delay()` against the test's own Redis.

Run as `python -m tests.reliability.producer` with CELERY_BROKER_URL set. Reads one JSON
command a line on stdin:

    {"op": "single", "events": [{webhook_id, event_data, idempotency_key?}, ...],
     "rate": per second or null, "retry_seconds": 0}
    {"op": "batch", "events": [[{webhook_id, event_data}, ...], ...], ...}

and answers each with one line `RESULT {"sent": [{"id", "at"}...], "errors": [...],
"retries": n}`. With retry_seconds > 0 a publish that raises (broker down) is tried again
for that long, as a careful producer would; such producers pass an idempotency_key so a
publish that did land before the error is delivered once.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main() -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event, deliver_webhook_events

    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        rate: float | None = command.get("rate")
        retry_seconds: float = command.get("retry_seconds") or 0.0
        sent: list[dict[str, Any]] = []
        errors: list[str] = []
        retries = 0
        started = time.monotonic()
        for index, event in enumerate(command["events"]):
            if rate:
                time.sleep(max(0.0, started + index / rate - time.monotonic()))
            deadline = time.monotonic() + retry_seconds
            while True:
                try:
                    if command["op"] == "single":
                        result = deliver_webhook_event.delay(**event)
                    else:
                        result = deliver_webhook_events.delay(events=event)
                    sent.append({"id": result.id, "at": time.time()})
                    break
                except Exception as exc:
                    if time.monotonic() >= deadline:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        break
                    retries += 1
                    time.sleep(0.2)
        answer = {"sent": sent, "errors": errors, "retries": retries}
        sys.stdout.write("RESULT " + json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
