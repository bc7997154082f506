"""The vocabulary: values passed between the task shells, the engine and the store.

An event travels as `EventIn` (as sent) -> `ValidEvent` (checked, serialised) ->
`Incoming` (with the broker identity its delivery id derives from) -> `Delivery` (committed,
bound for one endpoint) -> `AttemptRecord` (one attempt and what follows from it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.core.errors import InvalidEvent

# Column sizes of the schema; values are cut to them before they are written.
ENDPOINT_ID_MAX = 128
EVENT_TYPE_MAX = 255
IDEMPOTENCY_KEY_MAX = 255
ORDERING_KEY_MAX = 255
TASK_ID_MAX = 64
# What is kept of a payload that could not be accepted.
REJECTED_EXCERPT_BYTES = 2048
# What is recorded instead of a static header's value (it may carry the receiver's API key).
SEALED_VALUE = "(sealed)"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt (owned by the database)
    HELD = "held"  # its endpoint is disabled; pending again once the endpoint is enabled
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # dead: retries exhausted or a terminal outcome; replayable
    REJECTED = "rejected"  # never attemptable: unknown endpoint, bad payload


class OutcomeKind(enum.StrEnum):
    SUCCESS = "success"
    RETRY = "retry"  # failed, another attempt is scheduled
    FAILED = "failed"  # failed, no attempt left or terminal
    DISABLE = "disable"  # 410 Gone: the endpoint is disabled
    BLOCKED = "blocked"  # refused by the network policy before any byte was sent


class ErrorKind(enum.StrEnum):
    HTTP_STATUS = "http_status"
    REDIRECT = "redirect"
    TIMEOUT = "timeout"
    CONNECT = "connect"
    DNS = "dns"
    TLS = "tls"
    PROTOCOL = "protocol"
    BLOCKED = "blocked"
    INVALID_URL = "invalid_url"
    INVALID_SECRET = "invalid_secret"
    CREDENTIALS = "credentials"  # the endpoint's secrets could not be unsealed (a key is missing)


@dataclass(frozen=True, slots=True)
class EventIn:
    """One event as a producer sent it, before validation."""

    webhook_id: Any
    event_data: Any
    idempotency_key: Any = None
    event_type: Any = None
    ordering_key: Any = None  # FIFO endpoints: the queue within the endpoint


class Ordering(enum.StrEnum):
    NONE = "none"  # any order, as much in parallel as the limits allow
    FIFO = "fifo"  # one at a time per ordering key, in enqueue order


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """How deliveries to one endpoint are sent and paced; shared by all its deliveries."""

    headers: tuple[tuple[str, str], ...] = ()  # static headers, e.g. the receiver's API key
    verify_tls: bool = True
    max_in_flight: int | None = None  # None: the global per-endpoint default
    rate_limit: float | None = None  # events per second across all workers; None: no limit
    rate_burst: int = 1
    credential_error: str | None = None  # why the endpoint's secrets could not be unsealed


DEFAULT_POLICY = EndpointPolicy()


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    url: str
    secrets: tuple[str, ...]  # every kept secret (whsec_ or whsk_), newest first
    event_types: tuple[str, ...] = ()
    enabled: bool = True
    disabled_reason: str | None = None
    description: str | None = None
    created_at: datetime | None = None
    secrets_until: tuple[datetime | None, ...] = ()  # per secret: when it stops signing
    policy: EndpointPolicy = DEFAULT_POLICY
    failure_streak: int = 0  # consecutive failed attempts, shared by all workers
    failing_since: datetime | None = None  # first failure after the last success
    circuit_open_until: datetime | None = None  # None: closed
    ordering: Ordering = Ordering.NONE

    def subscribes_to(self, event_type: str | None) -> bool:
        return not self.event_types or event_type in self.event_types

    def signing_secrets(self, now: datetime) -> tuple[str, ...]:
        """The secrets that sign at `now`: the current ones and those still in their overlap."""
        ends = self.secrets_until + (None,) * (len(self.secrets) - len(self.secrets_until))
        return tuple(secret for secret, end in zip(self.secrets, ends, strict=False)
                     if end is None or end > now)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an endpoint takes no delivery now."""

    code: str  # unknown_endpoint, endpoint_disabled
    message: str


def usable_endpoint(endpoint_id: str, endpoint: Endpoint | None) -> Endpoint | Refusal:
    """The endpoint when it can take a delivery now, else why not.

    The one rule for intake and for the retry sweep alike.
    """
    if endpoint is None:
        return Refusal("unknown_endpoint", f"no endpoint with id {endpoint_id!r}")
    if not endpoint.enabled:
        reason = endpoint.disabled_reason or "by operator"
        return Refusal("endpoint_disabled", f"endpoint {endpoint.id!r} is disabled: {reason}")
    return endpoint


@dataclass(frozen=True, slots=True)
class Incoming:
    """An event plus the broker identity that makes its delivery id deterministic."""

    message_id: str  # Celery task id of the carrying message, plus a position
    event: EventIn
    problem: InvalidEvent | None = None  # why the message itself could not be read
    excerpt: bytes | None = None  # the start of an unreadable message, kept with its rejection


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event bound for one endpoint; `id` is the stable `webhook-id`."""

    id: str
    endpoint_id: str
    url: str
    secrets: tuple[str, ...]
    payload: bytes
    attempts: int = 0  # attempts already made before this one
    retry_base: int = 0  # attempts made before its last replay: the retry budget starts here
    event_type: str | None = None
    lease_until: float | None = None  # time.time() after which another worker may claim it
    policy: EndpointPolicy = DEFAULT_POLICY
    enqueued_at: float | None = None  # unix time its row was committed (delivery latency)
    ordering_key: str | None = None  # set on a FIFO endpoint's deliveries: its queue


@dataclass(frozen=True, slots=True)
class HttpResult:
    """What one HTTP attempt produced, before any policy is applied."""

    status_code: int | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None
    retry_after: str | None = None
    response_excerpt: str | None = None
    duration_ms: float = 0.0
    # The headers sent (or tried), static header values replaced by SEALED_VALUE.
    request_headers: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict on one attempt."""

    kind: OutcomeKind
    error_kind: ErrorKind | None = None
    error: str | None = None
    retry_after_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One finished attempt and what follows from it, ready to be written."""

    delivery: Delivery
    result: HttpResult
    outcome: Outcome
    attempted_at: datetime
    attempt_number: int
    next_status: DeliveryStatus
    next_attempt_at: datetime | None

    @property
    def ends_queue_head(self) -> bool:
        """A FIFO delivery that is done (no attempt follows): its queue's next may go."""
        return self.delivery.ordering_key is not None and self.next_attempt_at is None


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event refused at intake, recorded with its reason."""

    webhook_id: str
    code: str
    message: str
    idempotency_key: str | None = None
    event_type: str | None = None
    payload: bytes | None = None
    task_id: str | None = None  # the Celery task that carried it, when known


@dataclass(slots=True)
class AcceptReport:
    """What intake did with a list of events."""

    accepted: list[str] = field(default_factory=list)  # delivery ids
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    # Delivery id -> Celery task id, for every row offered (inserted or a duplicate).
    task_of: dict[str, str | None] = field(default_factory=dict)

    def by_task(self) -> dict[str | None, AcceptReport]:
        """This report split per Celery task: what each message of a gathered group got.

        Duplicates found inside the list itself (one message handed over twice) are not
        attributed to a task.
        """
        parts: dict[str | None, AcceptReport] = {}
        for delivery_id, task_id in self.task_of.items():
            parts.setdefault(task_id, AcceptReport()).task_of[delivery_id] = task_id
        for delivery_id in self.accepted:
            parts.setdefault(self.task_of.get(delivery_id), AcceptReport()).accepted.append(
                delivery_id)
        for part in parts.values():
            part.duplicates = max(len(part.task_of) - len(part.accepted), 0)
        for rejection in self.rejected:
            parts.setdefault(rejection.task_id, AcceptReport()).rejected.append(rejection)
        return parts
