"""worker.ui.auth: the operator token, session cookies and CSRF tokens, without I/O."""

from __future__ import annotations

import pytest

from worker.ui.auth import SESSION_SECONDS, UiAuth, is_loopback

TOKEN = "t" * 32


def test_token_and_bearer_are_checked_exactly() -> None:
    auth = UiAuth(TOKEN)
    assert auth.token_ok(TOKEN)
    assert not auth.token_ok(TOKEN + "x") and not auth.token_ok("") and not auth.token_ok(None)
    assert auth.bearer_ok(f"Bearer {TOKEN}") and auth.bearer_ok(f"bearer {TOKEN}")
    for header in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN[:-1]}"):
        assert not auth.bearer_ok(header), header


def test_a_short_token_is_refused() -> None:
    with pytest.raises(ValueError, match="16"):
        UiAuth("short")


def test_session_is_valid_until_it_expires_and_only_under_its_token() -> None:
    auth = UiAuth(TOKEN)
    cookie = auth.new_session(now=1_000_000.0)
    assert auth.session_ok(cookie, 1_000_000.0)
    assert auth.session_ok(cookie, 1_000_000.0 + SESSION_SECONDS - 1)
    assert not auth.session_ok(cookie, 1_000_000.0 + SESSION_SECONDS)
    assert not auth.session_ok(cookie, 999_000.0)  # issued in the future: not ours
    assert not UiAuth("u" * 32).session_ok(cookie, 1_000_000.0)  # a new token ends sessions


def test_a_tampered_session_is_refused() -> None:
    auth = UiAuth(TOKEN)
    cookie = auth.new_session(now=1_000_000.0)
    issued, nonce, mac = cookie.split(".")
    for bad in (f"{int(issued) + 1}.{nonce}.{mac}", f"{issued}.{nonce}x.{mac}",
                f"{issued}.{nonce}.{mac[:-2]}AA", f"{issued}.{nonce}", "", "a.b.c", None,
                f"x{issued}.{nonce}.{mac}"):
        assert not auth.session_ok(bad, 1_000_000.0), bad


def test_csrf_token_belongs_to_its_session() -> None:
    auth = UiAuth(TOKEN)
    one, two = auth.new_session(1.0), auth.new_session(1.0)
    assert one != two
    assert auth.csrf_ok(one, auth.csrf_for(one))
    assert not auth.csrf_ok(one, auth.csrf_for(two))
    assert not auth.csrf_ok(one, None) and not auth.csrf_ok(None, auth.csrf_for(one))
    assert not auth.csrf_ok(one, "")
    assert not UiAuth("u" * 32).csrf_ok(one, auth.csrf_for(one))


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("192.168.1.2", False),
    ("example.com", False), ("localhost.example.com", False), ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
