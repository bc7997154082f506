"""AES-256-GCM sealing of endpoint credentials under keys from the environment.

A key ring is `kid:BASE64` items, comma-separated; the first key seals and every key opens,
so keys rotate by putting a new one first and dropping the old one once nothing uses it.
A token is `sealed1.<kid>.<urlsafe base64, unpadded, of nonce + ciphertext + tag>`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets as _secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.core.errors import KeyRingError, SealError

TOKEN_VERSION = "sealed1"
DEFAULT_SOURCE = "WEBHOOKS_SECRET_KEYS"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_HOW_TO_MAKE_ONE = "make one with `webhooks keys generate`"


@dataclass(frozen=True, repr=False)
class KeyRing:
    """Ordered (key id, 32-byte key) pairs: the first seals, all open. `source` names where the
    keys came from, for error messages."""

    keys: tuple[tuple[str, bytes], ...]
    source: str = DEFAULT_SOURCE

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyRingError(f"{self.source} holds no key: {_HOW_TO_MAKE_ONE}")
        seen: set[str] = set()
        for key_id, key in self.keys:
            _check_key_id(key_id, self.source)
            if key_id in seen:
                raise KeyRingError(
                    f"{self.source} lists key id {key_id!r} twice: give each key its own id"
                )
            seen.add(key_id)
            if not isinstance(key, bytes):
                raise KeyRingError(f"{self.source} key {key_id!r} is not bytes")
            if len(key) != KEY_BYTES:
                raise KeyRingError(f"{self.source} key {key_id!r} is {len(key)} bytes, "
                                   f"not {KEY_BYTES}: {_HOW_TO_MAKE_ONE}")

    @classmethod
    def parse(cls, text: str, source: str = DEFAULT_SOURCE) -> KeyRing:
        """The ring in `"kid:BASE64,kid2:BASE64"`; raises KeyRingError naming `source`."""
        if not isinstance(text, str):
            raise KeyRingError(f"{source} must be text of 'kid:BASE64' items")
        # A trailing comma or newline (as a key file ends) is not a missing key.
        items = [item.strip() for item in text.split(",")]
        if items and not items[-1]:
            items.pop()
        if not items:
            raise KeyRingError(f"{source} is empty: set it to 'kid:BASE64' items; "
                               f"{_HOW_TO_MAKE_ONE}")
        return cls(tuple(_parse_item(item, n, source) for n, item in enumerate(items, 1)),
                   source)

    def with_key(self, item: str) -> KeyRing:
        """A ring with the `kid:BASE64` item first, so it seals; the other keys still open."""
        return KeyRing((_parse_item(item.strip(), 1, self.source), *self.keys), self.source)

    @property
    def sealing_key_id(self) -> str:
        return self.keys[0][0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(key_id for key_id, _ in self.keys)

    def key(self, key_id: str) -> bytes | None:
        """The key with that id, or None."""
        return next((key for kid, key in self.keys if kid == key_id), None)

    def __repr__(self) -> str:
        # Key ids only: a repr ends up in logs and tracebacks.
        return f"KeyRing(key_ids={self.key_ids!r}, source={self.source!r})"


def generate_key(key_id: str | None = None) -> str:
    """One fresh `kid:BASE64` item; the id defaults to `k` + 8 random hex digits."""
    kid = f"k{_secrets.token_hex(4)}" if key_id is None else key_id
    _check_key_id(kid, "the key id")
    return f"{kid}:{base64.b64encode(_secrets.token_bytes(KEY_BYTES)).decode()}"


def seal(ring: KeyRing, plaintext: bytes, associated: bytes) -> str:
    """An ASCII token of `plaintext` under the ring's first key, bound to `associated` (the
    row's id): the token opens only with the same `associated`."""
    kid, key = ring.keys[0]
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext, _aad(kid, associated))
    encoded = base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")
    return f"{TOKEN_VERSION}.{kid}.{encoded}"


def open_sealed(ring: KeyRing, token: str, associated: bytes) -> bytes:
    """The plaintext of `token`; raises SealError when it is malformed or does not open."""
    kid, data = _split(token)
    key = ring.key(kid)
    if key is None:
        raise SealError(f"sealed with key {kid!r}, which is not in {ring.source} "
                        f"(it holds: {', '.join(ring.key_ids)})")
    try:
        return AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _aad(kid, associated))
    except InvalidTag:
        raise SealError(
            f"does not open with key {kid!r}: wrong key, or the row was altered"
        ) from None


def sealed_key_id(token: str) -> str:
    """The id of the key that sealed `token`; raises SealError when it is malformed."""
    return _split(token)[0]


def _aad(kid: str, associated: bytes) -> bytes:
    # The header is authenticated too, so a token relabelled to another id holding the same
    # key bytes does not open. The id holds no '.', so the split is unambiguous.
    return f"{TOKEN_VERSION}.{kid}.".encode("ascii") + associated


def _split(token: str) -> tuple[str, bytes]:
    """(key id, nonce + ciphertext + tag) of a well-formed token."""
    # Messages quote no part of a malformed token: it may be a plaintext secret stored by mistake.
    if not isinstance(token, str):
        raise SealError("a sealed token must be text")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION:
        raise SealError(f"not a sealed token: expected '{TOKEN_VERSION}.<key id>.<data>'")
    _, kid, encoded = parts
    if not KEY_ID_PATTERN.fullmatch(kid):
        raise SealError("malformed sealed token: its key id is not 1-32 of A-Z a-z 0-9 _ -")
    if not _BASE64URL.fullmatch(encoded) or len(encoded) % 4 == 1:
        raise SealError("malformed sealed token: its data is not unpadded urlsafe base64")
    data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    # Only the canonical spelling is accepted, so one sealed value has one token.
    if base64.urlsafe_b64encode(data).decode("ascii").rstrip("=") != encoded:
        raise SealError("malformed sealed token: its data is not canonical base64")
    if len(data) < NONCE_BYTES + TAG_BYTES:
        raise SealError("malformed sealed token: its data is too short to hold a nonce and tag")
    return kid, data


def _check_key_id(kid: object, source: str) -> None:
    if not isinstance(kid, str) or not KEY_ID_PATTERN.fullmatch(kid):
        # The bad id is not quoted: it may be key material pasted in the wrong place.
        raise KeyRingError(f"{source} has an invalid key id: use 1-32 of A-Z a-z 0-9 _ -")


def _parse_item(item: str, n: int, source: str) -> tuple[str, bytes]:
    where = f"{source} item {n}"
    if not item:
        raise KeyRingError(f"{where} is empty: remove the extra comma")
    kid, colon, encoded = item.partition(":")
    if not colon:
        raise KeyRingError(f"{where} has no ':': each item is 'kid:BASE64'; {_HOW_TO_MAKE_ONE}")
    kid, encoded = kid.strip(), encoded.strip()
    if not KEY_ID_PATTERN.fullmatch(kid):
        raise KeyRingError(
            f"{where} has an invalid key id: use 1-32 of A-Z a-z 0-9 _ - before the ':'"
        )
    if any(ch.isspace() for ch in encoded):
        raise KeyRingError(f"{source} key {kid!r} has spaces or line breaks in it: "
                           f"separate items with commas")
    if not _BASE64.fullmatch(encoded):
        raise KeyRingError(f"{source} key {kid!r} is not base64: {_HOW_TO_MAKE_ONE}")
    # Standard and urlsafe alphabets, padded or not: both spell the same bytes.
    standard = encoded.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise KeyRingError(f"{source} key {kid!r} is not base64: {_HOW_TO_MAKE_ONE}") from None
    if len(key) != KEY_BYTES:
        raise KeyRingError(f"{source} key {kid!r} is {len(key)} bytes, not {KEY_BYTES}: "
                           f"{_HOW_TO_MAKE_ONE}")
    return kid, key
