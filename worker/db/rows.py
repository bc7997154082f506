"""What the record modules share: the clock they stamp rows with, rows to models, errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from worker.core.credentials import open_credentials
from worker.core.errors import SealError
from worker.core.models import Endpoint, EndpointPolicy, Ordering
from worker.core.sealing import KeyRing

# What a database that is away (or refusing) raises.
UNAVAILABLE = (OperationalError, DBAPIError, OSError)


def utcnow() -> datetime:
    return datetime.now(UTC)


def row_dict(row: Any) -> dict[str, Any]:
    """A result row as a plain dict, by column label."""
    return {str(k): v for k, v in row._mapping.items()}


def endpoint_from_row(row: Any, keys: KeyRing) -> Endpoint:
    """The endpoint of `row`, its credentials unsealed.

    Credentials that do not open (a key missing from the ring) leave the endpoint without
    secrets and say why in its policy: its deliveries then fail visibly and retry, and the
    worker keeps running for every other endpoint.
    """
    problem = None
    try:
        creds = open_credentials(keys, row.id, row.credentials)
        secrets, until, headers = creds.secrets, creds.secrets_until, creds.headers
    except SealError as exc:
        problem, secrets, until, headers = str(exc), (), (), ()
    policy = EndpointPolicy(
        headers=headers, verify_tls=bool(row.verify_tls), max_in_flight=row.max_in_flight,
        rate_limit=row.rate_limit, rate_burst=row.rate_burst or 1, credential_error=problem,
    )
    return Endpoint(
        id=row.id,
        url=row.url,
        secrets=secrets,
        event_types=tuple(row.event_types or ()),
        enabled=bool(row.enabled),
        disabled_reason=row.disabled_reason,
        description=row.description,
        created_at=row.created_at,
        secrets_until=until,
        policy=policy,
        failure_streak=row.failure_streak or 0,
        failing_since=row.failing_since,
        circuit_open_until=row.circuit_open_until,
        ordering=Ordering(getattr(row, "ordering", None) or Ordering.NONE),
    )
