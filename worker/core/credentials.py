"""An endpoint's credentials (signing secrets with their end, static headers), sealed as one.

The sealed token is bound to its endpoint id, so a token copied onto another row does not open.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from worker.core.errors import SealError
from worker.core.sealing import KeyRing, open_sealed, seal

# Old secrets kept signing beside the newest one; rotating past it drops the oldest.
MAX_RETIRING_SECRETS = 3


@dataclass(frozen=True, slots=True)
class Credentials:
    secrets: tuple[str, ...]  # newest first
    secrets_until: tuple[datetime | None, ...]  # per secret: when it stops signing
    headers: tuple[tuple[str, str], ...] = ()


def seal_credentials(keys: KeyRing, endpoint_id: str, creds: Credentials) -> str:
    body = {
        "secrets": [{"value": s, "until": u.isoformat() if u else None}
                    for s, u in zip(creds.secrets, creds.secrets_until, strict=True)],
        "headers": [list(h) for h in creds.headers],
    }
    return seal(keys, orjson.dumps(body), endpoint_id.encode())


def open_credentials(keys: KeyRing, endpoint_id: str, token: str) -> Credentials:
    """The credentials in `token`; raises SealError when it does not open or is malformed."""
    raw = open_sealed(keys, token, endpoint_id.encode())
    try:
        body: Any = orjson.loads(raw)
        secrets = tuple(str(item["value"]) for item in body["secrets"])
        until = tuple(_when(item["until"]) for item in body["secrets"])
        headers = tuple((str(k), str(v)) for k, v in body.get("headers", ()))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SealError(f"credentials of endpoint {endpoint_id!r} are malformed") from exc
    return Credentials(secrets, until, headers)


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    when = datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def rotated(creds: Credentials, new_secret: str, *, now: datetime, overlap_until: datetime | None
            ) -> Credentials:
    """`new_secret` first; the others keep signing until `overlap_until` (None: not at all).

    Secrets whose overlap has ended are dropped, and at most MAX_RETIRING_SECRETS old ones stay.
    """
    kept: list[tuple[str, datetime | None]] = []
    if overlap_until is not None:
        for secret, until in zip(creds.secrets, creds.secrets_until, strict=True):
            end = overlap_until if until is None else min(until, overlap_until)
            if end > now and secret != new_secret:
                kept.append((secret, end))
    kept = kept[:MAX_RETIRING_SECRETS]
    return Credentials((new_secret, *(s for s, _ in kept)), (None, *(u for _, u in kept)),
                       creds.headers)


def fresh(secrets: Sequence[str], headers: Sequence[tuple[str, str]] = ()) -> Credentials:
    return Credentials(tuple(secrets), (None,) * len(secrets), tuple(headers))
