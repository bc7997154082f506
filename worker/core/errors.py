"""The error taxonomy: every failure the worker names has a class here."""

from __future__ import annotations


class WebhookError(Exception):
    """Base of every error raised by webhook-worker."""


class InvalidEvent(WebhookError, ValueError):
    """An event that can never be delivered as given (shape, size, encoding)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class InvalidEndpoint(WebhookError, ValueError):
    """An endpoint definition that cannot be accepted (URL, secret, id)."""


class InvalidSecret(InvalidEndpoint):
    """A signing secret that is not `whsec_` + base64 of at least 24 bytes."""


class InvalidSignature(WebhookError, ValueError):
    """A received webhook whose signature or timestamp does not check out."""


class EndpointNotFound(WebhookError, LookupError):
    """No endpoint has that id."""


class DestinationBlocked(WebhookError, OSError):
    """The address about to be dialled is not allowed by the network policy."""

    MARKER = "destination blocked by network policy"

    def __init__(self, address: str) -> None:
        super().__init__(f"{self.MARKER}: {address}")
        self.address = address


class StoreUnavailable(WebhookError):
    """The database could not take a write; the caller must keep the work."""


class EngineUnavailable(WebhookError):
    """The delivery engine of this process is not running or did not answer in time."""


class OutboxError(WebhookError):
    """The producer's database cannot take outbox deliveries: not the worker's database, not
    migrated to this code's schema, or a dialect the worker does not run on."""


# Failures that mean "not committed, keep the work and try again later".
NOT_COMMITTED = (StoreUnavailable, EngineUnavailable, TimeoutError, OSError)
# Work that fails this often for any other reason (a bug) is given up on, visibly.
MAX_UNEXPECTED_FAILURES = 3


class InvalidRateLimit(WebhookError, ValueError):
    """A rate limit that cannot be enforced: rate not a finite number > 0, or burst < 1."""


class KeyRingError(WebhookError, ValueError):
    """The keys that seal endpoint secrets are missing or malformed (see worker/core/sealing.py)."""


class SealError(WebhookError):
    """A sealed value that is malformed, or does not open with the keys at hand."""


class HostBlocked(DestinationBlocked):
    """A host that is, or resolves to, an address the network policy refuses; none is dialled."""

    def __init__(self, host: str, addresses: tuple[str, ...], reason: str) -> None:
        super().__init__(", ".join(addresses))
        self.args = (f"{self.MARKER}: {reason}",)
        # aiohttp's ClientConnectorError text shows the wrapped OSError's strerror only.
        self.strerror = self.args[0]
        self.host = host
        self.addresses = addresses
