"""Endpoint health: what a batch of attempts says about each endpoint, for the circuit breaker
and the automatic disable. Pure; the store applies it to the shared rows."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.core.models import AttemptRecord, ErrorKind, OutcomeKind

# Failures on our side (a secret that does not open or parse) say nothing about the endpoint.
NOT_THE_ENDPOINTS_FAULT = frozenset({ErrorKind.CREDENTIALS, ErrorKind.INVALID_SECRET})
FAILURES = frozenset({OutcomeKind.RETRY, OutcomeKind.FAILED, OutcomeKind.BLOCKED})
# The last_error of a delivery held back by its endpoint's open circuit: what closing the
# circuit sends at once (a retry due later of its own keeps its time).
CIRCUIT_WAIT = "waiting for the endpoint's circuit breaker"


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    breaker_failures: int = 5  # consecutive failures that open the circuit
    breaker_cooldown: float = 60.0  # seconds open before one probe is let through
    disable_after: float = 5 * 86400.0  # nothing but failures this long: disabled
    probe_seconds: float = 0.0  # the longest one probe may take; the circuit stays shut that long


@dataclass(frozen=True, slots=True)
class BatchHealth:
    """One endpoint's attempts within one written batch."""

    succeeded: bool  # a success came after (or without) any failure in the batch
    failures: int  # failures after the last success in the batch
    first_failure_at: datetime | None
    last_error: str | None


class HealthEvent(enum.StrEnum):
    OPENED = "circuit_opened"
    CLOSED = "circuit_closed"
    DISABLED = "endpoint_disabled"


@dataclass(frozen=True, slots=True)
class HealthChange:
    endpoint_id: str
    event: HealthEvent
    until: datetime | None = None  # OPENED: when one probe may go
    reason: str | None = None


def is_failure(record: AttemptRecord) -> bool:
    return (record.outcome.kind in FAILURES
            and record.outcome.error_kind not in NOT_THE_ENDPOINTS_FAULT)


def batch_health(records: Sequence[AttemptRecord]) -> dict[str, BatchHealth]:
    """Per endpoint: did it recover, and how many failures followed its last success."""
    by_endpoint: dict[str, list[AttemptRecord]] = {}
    for record in sorted(records, key=lambda r: r.attempted_at):
        by_endpoint.setdefault(record.delivery.endpoint_id, []).append(record)
    health: dict[str, BatchHealth] = {}
    for endpoint, seen in by_endpoint.items():
        succeeded = False
        tail: list[AttemptRecord] = []
        for record in seen:
            if record.outcome.kind is OutcomeKind.SUCCESS:
                succeeded, tail = True, []
            elif is_failure(record):
                tail.append(record)
        if succeeded or tail:
            health[endpoint] = BatchHealth(
                succeeded=succeeded, failures=len(tail),
                first_failure_at=tail[0].attempted_at if tail else None,
                last_error=tail[-1].outcome.error if tail else None)
    return health


def circuit_opens(streak_before: int, streak_after: int, policy: HealthPolicy) -> bool:
    return streak_before < policy.breaker_failures <= streak_after


def should_disable(failing_since: datetime | None, now: datetime, policy: HealthPolicy) -> bool:
    return failing_since is not None and now - failing_since >= timedelta(
        seconds=policy.disable_after)


def disable_reason(failing_since: datetime, streak: int, last_error: str | None) -> str:
    error = f"; last: {last_error}" if last_error else ""
    return (f"disabled automatically: nothing but failures since "
            f"{failing_since.isoformat(timespec='seconds')} ({streak} in a row{error})")
