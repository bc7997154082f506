"""One logfmt line per attempt, and the level it deserves: pure, no I/O.

Success is INFO, a failure that will be retried WARNING, and a delivery that is over
(retries exhausted, destination blocked, endpoint gone) ERROR, so `journalctl -p warning`
lists exactly the deliveries that did not go through.
"""

from __future__ import annotations

import logging
from datetime import datetime

from worker.core.models import AttemptRecord, OutcomeKind

LEVELS = {
    OutcomeKind.SUCCESS: logging.INFO,
    OutcomeKind.RETRY: logging.WARNING,
    OutcomeKind.FAILED: logging.ERROR,
    OutcomeKind.BLOCKED: logging.ERROR,
    OutcomeKind.DISABLE: logging.ERROR,
}
# Error texts are cut to this in the line (the attempts table keeps more).
ERROR_TEXT_LIMIT = 200


def level_of(record: AttemptRecord) -> int:
    return LEVELS[record.outcome.kind]


def logfmt_value(value: object) -> str:
    """A logfmt value: bare when it can be, else double-quoted with escapes."""
    text = value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value)
    if text and not any(ch in text for ch in ' ="\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in escaped)
    return f'"{escaped}"'


def attempt_line(record: AttemptRecord, max_attempts: int) -> str:
    """`attempt delivery=… endpoint=… attempt=n/of outcome=… …` for one finished attempt."""
    return "attempt " + " ".join(f"{key}={logfmt_value(value)}"
                                 for key, value in attempt_fields(record, max_attempts))


def attempt_fields(record: AttemptRecord, max_attempts: int) -> list[tuple[str, object]]:
    """What one attempt's log line says, in order (for logfmt or JSON)."""
    fields: list[tuple[str, object]] = [
        ("delivery", record.delivery.id),
        ("endpoint", record.delivery.endpoint_id),
    ]
    if record.delivery.event_type:
        fields.append(("event", record.delivery.event_type))
    fields += [
        ("attempt", f"{record.attempt_number}/{max_attempts}"),
        ("outcome", record.outcome.kind.value),
    ]
    if record.result.status_code is not None:
        fields.append(("status", record.result.status_code))
    fields.append(("duration_ms", f"{record.result.duration_ms:.1f}"))
    if record.next_attempt_at is not None:
        fields.append(("next_attempt", record.next_attempt_at))
    if record.outcome.error_kind is not None:
        fields.append(("error_kind", record.outcome.error_kind.value))
    if record.outcome.error:
        fields.append(("error", record.outcome.error[:ERROR_TEXT_LIMIT]))
    return fields
