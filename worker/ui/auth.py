"""Who may use the UI: one operator token, a signed session cookie, CSRF tokens. No I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets

SESSION_COOKIE = "webhooks_ui"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
# How long a login lasts.
SESSION_SECONDS = 12 * 3600


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_token() -> str:
    """A random operator token (for a loopback UI started without WEBHOOKS_UI_TOKEN)."""
    return secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost, or 0.0.0.0-like: may be anything


class UiAuth:
    """The operator token and what is derived from it.

    The session cookie is `<issued>.<nonce>.<mac>`: stateless, so it survives a restart with
    the same token and dies with a new one. The CSRF token is a MAC of the session, so a page
    of another site can neither read nor make one (double-submit with a signed value).
    """

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the UI token must be at least 16 characters")
        self._token = token.encode()
        self._key = hmac.new(self._token, b"webhooks-ui session key v1", hashlib.sha256).digest()

    def _mac(self, purpose: str, value: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}|{value}".encode(), hashlib.sha256).digest())

    def token_ok(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self._token)

    def bearer_ok(self, authorization: str | None) -> bool:
        """An `Authorization: Bearer <token>` header carrying the token."""
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def new_session(self, now: float) -> str:
        body = f"{int(now)}.{secrets.token_urlsafe(12)}"
        return f"{body}.{self._mac('session', body)}"

    def session_ok(self, cookie: str | None, now: float) -> bool:
        if not cookie or cookie.count(".") != 2:
            return False
        body, _, mac = cookie.rpartition(".")
        issued = body.split(".", 1)[0]
        if not issued.isdigit() or not hmac.compare_digest(mac, self._mac("session", body)):
            return False
        return 0 <= now - int(issued) < SESSION_SECONDS

    def csrf_for(self, session: str) -> str:
        return self._mac("csrf", session)

    def csrf_ok(self, session: str | None, offered: str | None) -> bool:
        if not session or not offered:
            return False
        return hmac.compare_digest(offered, self.csrf_for(session))
