"""Standard Webhooks signing of "id.timestamp.body".

`v1,<base64 HMAC-SHA256>` under a `whsec_` secret, and `v1a,<base64 Ed25519 signature>` under
a `whsk_` signing key, checked with its `whpk_` public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature as BadEd25519Signature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from worker.core.errors import InvalidSecret, InvalidSignature

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
SIGNING_KEY_PREFIX = "whsk_"
PUBLIC_KEY_PREFIX = "whpk_"
ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64


def generate_secret(num_bytes: int = 32) -> str:
    """A fresh `whsec_` secret with `num_bytes` random bytes."""
    if not MIN_SECRET_BYTES <= num_bytes <= MAX_SECRET_BYTES:
        raise InvalidSecret(f"secret size must be {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes")
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(num_bytes)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key inside a `whsec_` secret; raises InvalidSecret when malformed."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret("a secret must start with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidSecret("a secret must be 'whsec_' followed by base64") from exc
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise InvalidSecret(
            f"a secret must hold {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes, not {len(key)}"
        )
    return key


def generate_signing_key() -> tuple[str, str]:
    """A fresh Ed25519 pair: (`whsk_` signing key, `whpk_` public key)."""
    key = Ed25519PrivateKey.generate()
    return _encode_private(key), _encode_public(key.public_key())


def signing_private_key(whsk: str) -> Ed25519PrivateKey:
    """The Ed25519 key inside a `whsk_` key; raises InvalidSecret when malformed.

    The base64 holds the 32-byte seed (as generated here), or the 64-byte seed + public key
    that NaCl-style libraries export; in the latter the public half must match the seed.
    """
    raw = _decode_prefixed(whsk, SIGNING_KEY_PREFIX, "signing key")
    if len(raw) not in (ED25519_KEY_BYTES, 2 * ED25519_KEY_BYTES):
        raise InvalidSecret(
            f"a 'whsk_' signing key must hold {ED25519_KEY_BYTES} bytes (seed) or "
            f"{2 * ED25519_KEY_BYTES} (seed + public key), not {len(raw)}"
        )
    key = Ed25519PrivateKey.from_private_bytes(raw[:ED25519_KEY_BYTES])
    public = raw[ED25519_KEY_BYTES:]
    if public and not hmac.compare_digest(public, key.public_key().public_bytes_raw()):
        raise InvalidSecret("a 64-byte 'whsk_' signing key's second half is not its public key")
    return key


def signing_public_key(whpk: str) -> Ed25519PublicKey:
    """The Ed25519 key inside a `whpk_` public key; raises InvalidSecret when malformed."""
    raw = _decode_prefixed(whpk, PUBLIC_KEY_PREFIX, "public key")
    if len(raw) != ED25519_KEY_BYTES:
        raise InvalidSecret(
            f"a 'whpk_' public key must hold {ED25519_KEY_BYTES} bytes, not {len(raw)}"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_of(whsk: str) -> str:
    """The `whpk_` public key that checks signatures made with a `whsk_` key."""
    return _encode_public(signing_private_key(whsk).public_key())


def signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    """The exact bytes both schemes sign: `id.timestamp.body`."""
    return b"%s.%d.%s" % (msg_id.encode(), timestamp, body)


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,` signature over the exact bytes sent."""
    digest = hmac.new(key, signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_v1a(private_key: Ed25519PrivateKey, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1a,` (Ed25519) signature over the exact bytes sent."""
    signature = private_key.sign(signed_content(msg_id, timestamp, body))
    return "v1a," + base64.b64encode(signature).decode()


@dataclass(frozen=True, repr=False)
class SigningKeys:
    """An endpoint's parsed signing keys: HMAC keys sign `v1`, Ed25519 keys sign `v1a`."""

    hmac: tuple[bytes, ...] = ()
    ed25519: tuple[Ed25519PrivateKey, ...] = ()

    def __repr__(self) -> str:
        # Counts only: a repr ends up in logs and tracebacks.
        return f"SigningKeys(hmac={len(self.hmac)} keys, ed25519={len(self.ed25519)} keys)"


def parse_signing_keys(secrets: Iterable[str]) -> SigningKeys:
    """The keys in `whsec_` (v1) and `whsk_` (v1a) secrets, in their given order.

    Raises InvalidSecret for anything else, a `whpk_` public key included.
    """
    hmac_keys: list[bytes] = []
    ed25519_keys: list[Ed25519PrivateKey] = []
    for secret in secrets:
        if isinstance(secret, str) and secret.startswith(SECRET_PREFIX):
            hmac_keys.append(secret_key(secret))
        elif isinstance(secret, str) and secret.startswith(SIGNING_KEY_PREFIX):
            ed25519_keys.append(signing_private_key(secret))
        elif isinstance(secret, str) and secret.startswith(PUBLIC_KEY_PREFIX):
            raise InvalidSecret("a 'whpk_' public key cannot sign: give its 'whsk_' signing key")
        else:
            raise InvalidSecret("a signing secret must start with 'whsec_' (v1) or 'whsk_' (v1a)")
    return SigningKeys(tuple(hmac_keys), tuple(ed25519_keys))


def signature_header(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """Space-separated signatures, one per active key (key rotation)."""
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


def signature_header_for(keys: SigningKeys, msg_id: str, timestamp: int, body: bytes) -> str:
    """Space-separated signatures: one `v1` per HMAC key, then one `v1a` per Ed25519 key."""
    return " ".join([
        *(sign(key, msg_id, timestamp, body) for key in keys.hmac),
        *(sign_v1a(key, msg_id, timestamp, body) for key in keys.ed25519),
    ])


def webhook_headers(
    keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt signed with HMAC keys (`v1`)."""
    return _headers(msg_id, timestamp, signature_header(keys, msg_id, timestamp, body))


def signed_headers(
    keys: SigningKeys, msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt, signed with `v1` and/or `v1a` keys."""
    return _headers(msg_id, timestamp, signature_header_for(keys, msg_id, timestamp, body))


def _headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, tolerance: float = 300.0,
    now: float | None = None,
) -> None:
    """Check a received webhook as a receiver would; raises InvalidSignature when it fails.

    `secret` is a `whsec_` secret (checks the `v1` entries) or a `whpk_` public key (checks the
    `v1a` entries); a malformed one raises InvalidSecret.
    """
    key: bytes | Ed25519PublicKey
    if isinstance(secret, str) and secret.startswith(PUBLIC_KEY_PREFIX):
        key = signing_public_key(secret)
    elif isinstance(secret, str) and secret.startswith(SIGNING_KEY_PREFIX):
        # A receiver should only ever hold the public half.
        raise InvalidSecret("verify with the 'whpk_' public key; a 'whsk_' key is for signing")
    else:
        key = secret_key(secret)
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        offered = lowered["webhook-signature"].split(" ")
    except (KeyError, ValueError) as exc:
        raise InvalidSignature(f"missing or malformed webhook headers: {exc}") from exc
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise InvalidSignature(f"timestamp {timestamp} is outside the ±{tolerance:.0f}s window")
    if isinstance(key, Ed25519PublicKey):
        content = signed_content(msg_id, timestamp, body)
        if not any(_ed25519_matches(key, content, entry) for entry in offered):
            raise InvalidSignature("no v1a signature matches")
        return
    expected = sign(key, msg_id, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in offered):
        raise InvalidSignature("no signature matches")


def _ed25519_matches(public_key: Ed25519PublicKey, content: bytes, entry: str) -> bool:
    version, _, encoded = entry.partition(",")
    if version != "v1a":
        return False
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(signature) != ED25519_SIGNATURE_BYTES:
        return False
    try:
        public_key.verify(signature, content)
    except BadEd25519Signature:
        return False
    return True


def _decode_prefixed(text: str, prefix: str, what: str) -> bytes:
    if not isinstance(text, str) or not text.startswith(prefix):
        raise InvalidSecret(f"a {what} must start with {prefix!r}")
    try:
        return base64.b64decode(text[len(prefix) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidSecret(f"a {what} must be {prefix!r} followed by base64") from exc


def _encode_private(key: Ed25519PrivateKey) -> str:
    return SIGNING_KEY_PREFIX + base64.b64encode(key.private_bytes_raw()).decode()


def _encode_public(key: Ed25519PublicKey) -> str:
    return PUBLIC_KEY_PREFIX + base64.b64encode(key.public_bytes_raw()).decode()
