"""Time-ordered identifiers (ULID layout, Crockford base32)."""

from __future__ import annotations

import hashlib
import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, index = divmod(value, 32)
        chars.append(_ALPHABET[index])
    return "".join(reversed(chars))


def new_id(prefix: str, *, now_ms: int | None = None, entropy: bytes | None = None) -> str:
    """`prefix_` + 26 characters: 48 bits of milliseconds then 80 random bits."""
    millis = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = int.from_bytes(entropy if entropy is not None else os.urandom(10), "big")
    return f"{prefix}_{_base32(millis, 10)}{_base32(rand, 16)}"


def derived_id(prefix: str, *parts: str) -> str:
    """A deterministic id for the same parts: a broker redelivery maps to the same rows."""
    encoded = b"".join(b"%d:%s" % (len(p.encode()), p.encode()) for p in parts)
    digest = hashlib.blake2b(encoded, digest_size=16).digest()
    return f"{prefix}_{_base32(int.from_bytes(digest, 'big'), 26)}"
