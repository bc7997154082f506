"""Partner portal links: signed, expiring, one endpoint each. Pure functions, no I/O; the
clock is an argument.

A link's token is `<endpoint id, base64url>.<expiry, unix seconds>.<HMAC-SHA256, base64url>`
over both, under a key derived from WEBHOOKS_UI_SECRET or, unset, from each key of the
sealing key ring (so a link outlives a key rotation while the old key stays in the ring).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence

from worker.core.errors import WebhookError
from worker.core.sealing import KeyRing
from worker.core.validation import is_endpoint_id

# The longest a link may live.
MAX_EXPIRY_SECONDS = 366 * 86400
_DURATION = re.compile(r"([0-9]{1,6})([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class PortalLinkError(WebhookError):
    """A portal link that is malformed, tampered with, or expired."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def portal_keys(ui_secret: str | None, ring: KeyRing | None) -> tuple[bytes, ...]:
    """The keys links are signed with (the first) and checked against (all)."""
    if ui_secret:
        return (hashlib.sha256(b"webhooks portal link v1|" + ui_secret.encode()).digest(),)
    if ring is None:
        raise PortalLinkError("no key to sign portal links with: set WEBHOOKS_UI_SECRET or "
                              "WEBHOOKS_SECRET_KEYS")
    return tuple(hmac.new(key, b"webhooks portal link v1", hashlib.sha256).digest()
                 for _, key in ring.keys)


def _mac(key: bytes, endpoint_b64: str, expires: int) -> str:
    return _b64(hmac.new(key, f"portal|{endpoint_b64}|{expires}".encode(),
                         hashlib.sha256).digest())


def sign_link(keys: Sequence[bytes], endpoint_id: str, expires_at: int) -> str:
    """The token of a link to `endpoint_id`'s deliveries, valid until `expires_at`."""
    if not is_endpoint_id(endpoint_id):
        raise PortalLinkError(f"endpoint id {endpoint_id!r} is not valid")
    encoded = _b64(endpoint_id.encode())
    return f"{encoded}.{expires_at}.{_mac(keys[0], encoded, expires_at)}"


def verify_link(keys: Sequence[bytes], token: str, now: float) -> tuple[str, int]:
    """The endpoint id and expiry of a valid, unexpired token; PortalLinkError otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 12:
        raise PortalLinkError("malformed portal link")
    encoded, expires_text, mac = parts
    expires = int(expires_text)
    if not any(hmac.compare_digest(mac, _mac(key, encoded, expires)) for key in keys):
        raise PortalLinkError("portal link signature does not match")
    try:
        endpoint_id = _unb64(encoded).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise PortalLinkError("malformed portal link") from None
    if not is_endpoint_id(endpoint_id):
        raise PortalLinkError("malformed portal link")
    if now >= expires:
        raise PortalLinkError("portal link has expired")
    return endpoint_id, expires


def csrf_for_link(keys: Sequence[bytes], token: str) -> str:
    """The CSRF token of a portal page's form: only a page served for this link has it."""
    return _b64(hmac.new(keys[0], f"portal-csrf|{token}".encode(), hashlib.sha256).digest())


def csrf_ok_for_link(keys: Sequence[bytes], token: str, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(str(offered), csrf_for_link(keys, token))


def parse_duration(text: str) -> int:
    """Seconds in `30m`, `12h`, `7d`, `2w` (1 s .. MAX_EXPIRY_SECONDS)."""
    found = _DURATION.fullmatch(text.strip())
    if not found:
        raise PortalLinkError(f"--expires {text!r} is not a duration such as 30m, 12h, 7d, 2w")
    seconds = int(found[1]) * _UNIT[found[2]]
    if not 1 <= seconds <= MAX_EXPIRY_SECONDS:
        raise PortalLinkError(f"--expires must be between 1s and {MAX_EXPIRY_SECONDS // 86400}d, "
                              f"not {text!r}")
    return seconds
