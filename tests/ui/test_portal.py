"""worker.ui.portal: signing and checking partner links, with the clock as an argument."""

from __future__ import annotations

import base64

import pytest

from worker.core.sealing import KeyRing, generate_key
from worker.ui.portal import (
    MAX_EXPIRY_SECONDS,
    PortalLinkError,
    csrf_for_link,
    csrf_ok_for_link,
    parse_duration,
    portal_keys,
    sign_link,
    verify_link,
)

RING = KeyRing.parse(generate_key("k1"))
KEYS = portal_keys(None, RING)
NOW = 1_800_000_000


def test_a_link_verifies_to_its_endpoint_until_it_expires() -> None:
    token = sign_link(KEYS, "ep.one:x-1", NOW + 60)
    assert verify_link(KEYS, token, NOW) == ("ep.one:x-1", NOW + 60)
    assert verify_link(KEYS, token, NOW + 59.999)[0] == "ep.one:x-1"
    with pytest.raises(PortalLinkError, match="expired"):
        verify_link(KEYS, token, NOW + 60)
    with pytest.raises(PortalLinkError, match="expired"):
        verify_link(KEYS, token, NOW + 10**6)


def test_every_kind_of_tampering_is_refused() -> None:
    token = sign_link(KEYS, "ep-a", NOW + 3600)
    encoded, expires, mac = token.split(".")
    other = base64.urlsafe_b64encode(b"ep-b").rstrip(b"=").decode()
    for bad in (
        f"{other}.{expires}.{mac}",  # another endpoint under the same signature
        f"{encoded}.{int(expires) + 86400}.{mac}",  # a later expiry
        f"{encoded}.{expires}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
        f"{encoded}.{expires}.", f"{encoded}.{expires}", f"{encoded}..{mac}",
        f"{encoded}.-5.{mac}", f"{encoded}.{expires}.{mac}.x", "", "...",
        token.upper(),
    ):
        with pytest.raises(PortalLinkError):
            verify_link(KEYS, bad, NOW)


def test_a_link_of_another_key_is_refused_and_a_rotated_ring_still_opens_old_links() -> None:
    token = sign_link(KEYS, "ep-a", NOW + 3600)
    stranger = portal_keys(None, KeyRing.parse(generate_key("k2")))
    with pytest.raises(PortalLinkError, match="signature"):
        verify_link(stranger, token, NOW)
    rotated = portal_keys(None, RING.with_key(generate_key("k3")))
    assert verify_link(rotated, token, NOW)[0] == "ep-a"  # old key still in the ring
    assert sign_link(rotated, "ep-a", NOW + 3600) != token  # new links use the new key


def test_ui_secret_wins_over_the_ring_and_a_ring_or_secret_is_needed() -> None:
    by_secret = portal_keys("a portal secret", RING)
    assert by_secret != KEYS and len(by_secret) == 1
    token = sign_link(by_secret, "ep-a", NOW + 5)
    with pytest.raises(PortalLinkError):
        verify_link(KEYS, token, NOW)
    with pytest.raises(PortalLinkError, match="WEBHOOKS_UI_SECRET"):
        portal_keys(None, None)


def test_an_invalid_endpoint_id_cannot_be_signed() -> None:
    for bad in ("", "has space", "x" * 129, "-lead", "é"):
        with pytest.raises(PortalLinkError):
            sign_link(KEYS, bad, NOW + 5)


def test_csrf_of_a_link_is_its_own() -> None:
    one, two = sign_link(KEYS, "ep-a", NOW + 5), sign_link(KEYS, "ep-b", NOW + 5)
    assert csrf_ok_for_link(KEYS, one, csrf_for_link(KEYS, one))
    assert not csrf_ok_for_link(KEYS, one, csrf_for_link(KEYS, two))
    assert not csrf_ok_for_link(KEYS, one, None) and not csrf_ok_for_link(KEYS, one, "")


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
    (" 7d ", 604800), ("366d", MAX_EXPIRY_SECONDS),
])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "0s", "-1d", "1.5d", "367d", "60w", "7 d",
                                  "1y", "9999999d"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(PortalLinkError):
        parse_duration(text)
