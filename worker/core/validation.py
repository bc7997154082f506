"""Checks on what producers and operators hand us; pure, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import orjson

from worker.core.errors import InvalidEndpoint, InvalidEvent
from worker.core.models import (
    ENDPOINT_ID_MAX,
    EVENT_TYPE_MAX,
    IDEMPOTENCY_KEY_MAX,
    ORDERING_KEY_MAX,
    REJECTED_EXCERPT_BYTES,
)

ENDPOINT_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{ENDPOINT_ID_MAX - 1}}}")
MAX_URL_LENGTH = 2048


@dataclass(frozen=True, slots=True)
class ValidEvent:
    webhook_id: str
    payload: bytes  # the exact body, serialised once
    event_type: str | None
    idempotency_key: str | None
    ordering_key: str | None = None


def _optional_text(value: Any, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidEvent(f"invalid_{name}", f"{name} must be a non-empty string of <= {limit}")
    return value


def event_type_of(event_data: dict[str, Any]) -> str | None:
    """The event's type as producers spell it: `type` (Standard Webhooks) or `event`."""
    for key in ("type", "event"):
        value = event_data.get(key)
        if isinstance(value, str) and value:
            return value[:EVENT_TYPE_MAX]
    return None


def encode_payload(event_data: Any, max_bytes: int) -> bytes:
    """The exact JSON body for `event_data`; raises InvalidEvent when it cannot be sent."""
    if not isinstance(event_data, dict):
        raise InvalidEvent(
            "payload_not_object",
            f"event_data must be a JSON object (dict), not {type(event_data).__name__}",
        )
    try:
        body = orjson.dumps(event_data)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidEvent(
            "payload_not_json", f"event_data is not JSON-serialisable: {exc}"
        ) from exc
    if len(body) > max_bytes:
        raise InvalidEvent(
            "payload_too_large", f"event_data is {len(body)} bytes; the limit is {max_bytes}"
        )
    return body


def is_endpoint_id(value: object) -> TypeGuard[str]:
    """1-128 of letters, digits, '.', '_', ':', '-', starting with a letter or digit."""
    return isinstance(value, str) and ENDPOINT_ID_RE.fullmatch(value) is not None


def rejected_payload(event_data: Any, limit: int) -> bytes:
    """What to keep of a refused payload: its JSON if small enough, else a bounded prefix."""
    try:
        body = orjson.dumps(event_data)
    except (TypeError, ValueError):
        try:
            return repr(event_data)[:REJECTED_EXCERPT_BYTES].encode("utf-8", "replace")
        except RecursionError:
            return b"(nested too deeply to show)"
    return body if len(body) <= limit else body[:REJECTED_EXCERPT_BYTES]


def check_webhook_id(value: Any) -> str:
    if not is_endpoint_id(value):
        raise InvalidEvent(
            "invalid_webhook_id",
            f"webhook_id must be an endpoint id (letters, digits, . _ : -), not {value!r:.80}",
        )
    return value


def validate_event(
    webhook_id: Any,
    event_data: Any,
    *,
    max_payload_bytes: int,
    idempotency_key: Any = None,
    event_type: Any = None,
    ordering_key: Any = None,
) -> ValidEvent:
    """One event checked and serialised; raises InvalidEvent with a stable `code`."""
    endpoint_id = check_webhook_id(webhook_id)
    key = _optional_text(idempotency_key, "idempotency_key", IDEMPOTENCY_KEY_MAX)
    explicit_type = _optional_text(event_type, "event_type", EVENT_TYPE_MAX)
    queue = _optional_text(ordering_key, "ordering_key", ORDERING_KEY_MAX)
    body = encode_payload(event_data, max_payload_bytes)
    return ValidEvent(endpoint_id, body, explicit_type or event_type_of(event_data), key, queue)


def validate_endpoint_id(value: str) -> str:
    if not is_endpoint_id(value):
        raise InvalidEndpoint(
            f"endpoint id {value!r} must be 1-128 of letters, digits, '.', '_', ':', '-'"
        )
    return value


def validate_url(url: str, *, allow_http: bool = True) -> str:
    """An absolute http(s) URL with a host and no credentials; returns it unchanged."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise InvalidEndpoint(f"a URL must be a string of 1..{MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise InvalidEndpoint(f"URL {url!r} contains white space or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidEndpoint(f"URL {url!r} is malformed: {exc}") from exc
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        raise InvalidEndpoint(f"URL {url!r} must use {' or '.join(schemes)}")
    if not parts.hostname:
        raise InvalidEndpoint(f"URL {url!r} has no host")
    if "@" in parts.netloc:
        raise InvalidEndpoint(f"URL {url!r} must not carry credentials")
    if port == 0:
        raise InvalidEndpoint(f"URL {url!r} has port 0")
    if "#" in url:
        raise InvalidEndpoint(f"URL {url!r} must not have a fragment")
    return url


def validate_event_types(values: Any) -> tuple[str, ...]:
    if isinstance(values, str):
        raise InvalidEndpoint("event types must be a list of strings, not one string")
    if not values:
        return ()
    out = []
    for value in values:
        if not isinstance(value, str) or not value or len(value) > EVENT_TYPE_MAX:
            raise InvalidEndpoint(f"event type {value!r} must be a non-empty string")
        out.append(value)
    return tuple(dict.fromkeys(out))


# Headers an endpoint's static headers may not set: the signature and the framing are ours.
RESERVED_HEADERS = frozenset({
    "webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "content-length",
    "content-encoding", "transfer-encoding", "host", "connection", "user-agent", "te",
    "trailer", "upgrade", "keep-alive", "proxy-authorization", "expect",
})
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
MAX_HEADERS = 20
MAX_HEADER_VALUE = 4096


def validate_header(text: str) -> tuple[str, str]:
    """One `Name: value` static header; refuses injection and the reserved names."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not HEADER_NAME_RE.fullmatch(name):
        raise InvalidEndpoint(f"header {text!r:.80} must be 'Name: value' with a token name")
    if name.lower() in RESERVED_HEADERS or name.lower().startswith("webhook-"):
        raise InvalidEndpoint(f"header {name!r} is set by the worker and cannot be overridden")
    # Printable ASCII only: no CR/LF injection, and nothing a receiver might decode
    # differently (obs-text, C1 controls, U+2028).
    if len(value) > MAX_HEADER_VALUE or any(
            not (0x20 <= ord(ch) < 0x7F or ch == "\t") for ch in value):
        raise InvalidEndpoint(
            f"header {name!r} value must be at most {MAX_HEADER_VALUE} printable ASCII "
            "characters (no CR, LF or other control characters)")
    return name, value


def validate_headers(texts: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(texts, str):
        raise InvalidEndpoint("headers must be a list of 'Name: value' strings, not one string")
    headers = [validate_header(text) for text in texts or ()]
    if len(headers) > MAX_HEADERS:
        raise InvalidEndpoint(f"at most {MAX_HEADERS} static headers per endpoint")
    names = [name.lower() for name, _ in headers]
    if len(set(names)) != len(names):
        raise InvalidEndpoint("a static header is given twice")
    return tuple(headers)


def validate_rate(rate: float | None, burst: int | None) -> tuple[float | None, int]:
    """A per-endpoint rate limit: events per second (> 0, finite) and a burst of >= 1."""
    if rate is not None and not (0 < rate <= 1_000_000):
        raise InvalidEndpoint(f"rate limit must be above 0 and at most 1000000 per second, "
                              f"not {rate}")
    if burst is not None and not 1 <= burst <= 1_000_000:
        raise InvalidEndpoint(f"burst must be 1..1000000, not {burst}")
    return rate, burst or 1


def validate_max_in_flight(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= 100_000:
        raise InvalidEndpoint(f"max in flight must be 1..100000, not {value}")
    return value
