"""One pooled aiohttp session that POSTs signed payloads, and nothing else."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType

import aiohttp
from aiohappyeyeballs import AddrInfoType
from yarl import URL

from worker.core.errors import DestinationBlocked, InvalidSecret
from worker.core.models import SEALED_VALUE, Delivery, ErrorKind, HttpResult
from worker.core.netpolicy import IPNetwork, is_allowed, refusal_for_url
from worker.core.signing import SigningKeys, parse_signing_keys, signed_headers
from worker.delivery.resolver import VettingResolver
from worker.settings import Settings

USER_AGENT = "webhook-worker/0.1"
# Past the excerpt, drain at most this much so the connection can be reused.
DRAIN_LIMIT = 64 * 1024
# Read size while draining a response body.
READ_CHUNK = 16 * 1024
# Connections beyond the in-flight bound, for sockets still closing.
SPARE_CONNECTIONS = 16
# Decoded signing keys kept per process (one entry per distinct secret list).
KEY_CACHE_SIZE = 10_000
# An error text longer than this is cut before it is recorded.
ERROR_TEXT_LIMIT = 500
# How long resolved addresses and idle connections are kept.
DNS_CACHE_SECONDS = 60
KEEPALIVE_SECONDS = 30


@dataclass(frozen=True, slots=True)
class SenderConfig:
    max_in_flight: int
    connect_timeout: float
    request_timeout: float
    response_excerpt_bytes: int
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, s: Settings) -> SenderConfig:
        return cls(s.max_in_flight, s.connect_timeout, s.request_timeout,
                   s.response_excerpt_bytes, s.allowed_networks)


def guarded_socket_factory(allowed: Sequence[IPNetwork]) -> object:
    """A socket factory for TCPConnector that refuses disallowed addresses at connect time."""

    def factory(addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, address = addr_info
        host = str(address[0])
        if not is_allowed(host, allowed):
            raise DestinationBlocked(host)
        return socket.socket(family=family, type=type_, proto=proto)

    return factory


def _is_blocked(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, DestinationBlocked) or DestinationBlocked.MARKER in str(seen):
            return True
        if isinstance(seen, aiohttp.ClientConnectorError):
            seen = seen.os_error
        else:
            seen = seen.__cause__ or seen.__context__
    return False


class Sender:
    """Signs and POSTs one delivery per call; owns the session and its connection pool."""

    def __init__(self, config: SenderConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._keys: dict[tuple[str, ...], SigningKeys] = {}
        # URL -> why it is not dialled at all (unparseable, or a forbidden literal host)
        self._refusals: dict[str, HttpResult | None] = {}

    async def __aenter__(self) -> Sender:
        self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def open(self) -> None:
        """Create the session; must run inside the loop that will use it."""
        if self._session is not None:
            return
        s = self.config
        # The scheduler bounds concurrency (globally and per endpoint) before a request
        # starts, so the connector never makes a request wait for a connection: a wait
        # there would count against the request's own timeouts.
        connector = aiohttp.TCPConnector(
            limit=s.max_in_flight + SPARE_CONNECTIONS,
            limit_per_host=0,
            ttl_dns_cache=DNS_CACHE_SECONDS,
            keepalive_timeout=KEEPALIVE_SECONDS,
            # The resolver refuses a name with any forbidden address and hands over only
            # vetted ones, which are what is dialled; the socket factory checks again.
            resolver=VettingResolver(s.allowed_networks),
            socket_factory=guarded_socket_factory(s.allowed_networks),  # type: ignore[arg-type]
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=s.request_timeout, sock_connect=s.connect_timeout),
            headers={"user-agent": USER_AGENT},
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("accept-encoding",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _signing_keys(self, secrets: tuple[str, ...]) -> SigningKeys:
        keys = self._keys.get(secrets)
        if keys is None:
            keys = parse_signing_keys(secrets)
            if len(self._keys) > KEY_CACHE_SIZE:
                self._keys.clear()
            self._keys[secrets] = keys
        return keys

    def _refusal(self, url: str) -> HttpResult | None:
        if url not in self._refusals:
            if len(self._refusals) > KEY_CACHE_SIZE:
                self._refusals.clear()
            self._refusals[url] = self._check_url(url)
        return self._refusals[url]

    def _check_url(self, url: str) -> HttpResult | None:
        try:
            URL(url).explicit_port  # noqa: B018 - parsing is the check
        except (ValueError, TypeError) as exc:
            return HttpResult(error_kind=ErrorKind.INVALID_URL, error=f"invalid URL: {exc}")
        refusal = refusal_for_url(url, self.config.allowed_networks)
        return None if refusal is None else HttpResult(error_kind=ErrorKind.BLOCKED,
                                                        error=refusal)

    async def send(self, delivery: Delivery) -> HttpResult:
        """One attempt: sign afresh, POST, read a bounded excerpt. Never raises for I/O."""
        if self._session is None:
            raise RuntimeError("Sender.open() was not called")
        started = time.perf_counter()

        def elapsed() -> float:
            return (time.perf_counter() - started) * 1000.0

        policy = delivery.policy
        if policy.credential_error is not None:
            return HttpResult(error_kind=ErrorKind.CREDENTIALS, error=policy.credential_error)
        try:
            keys = self._signing_keys(delivery.secrets)
        except InvalidSecret as exc:
            return HttpResult(error_kind=ErrorKind.INVALID_SECRET, error=f"endpoint secret: {exc}")
        if not keys.hmac and not keys.ed25519:
            return HttpResult(error_kind=ErrorKind.INVALID_SECRET,
                              error="endpoint has no signing secret; nothing is sent unsigned")
        refusal = self._refusal(delivery.url)
        if refusal is not None:
            return refusal
        headers = dict(policy.headers)
        signed = signed_headers(keys, delivery.id, int(time.time()), delivery.payload)
        headers.update(signed)
        # What the attempt record keeps: the signed headers as sent, static values sealed.
        static = {name.lower() for name, _ in policy.headers}
        sent = (*((name, SEALED_VALUE) for name, _ in policy.headers), *signed.items(),
                *((("user-agent", USER_AGENT),) if "user-agent" not in static else ()))
        result = await self._post(delivery, headers, elapsed)
        return replace(result, request_headers=sent)

    async def _post(self, delivery: Delivery, headers: dict[str, str],
                    elapsed: Callable[[], float]) -> HttpResult:
        policy, session = delivery.policy, self._session
        assert session is not None
        try:
            async with session.post(
                delivery.url, data=delivery.payload, headers=headers, allow_redirects=False,
                ssl=policy.verify_tls,  # False only by the per-endpoint test-only opt-out
            ) as response:
                excerpt = await self._read_excerpt(response)
                return HttpResult(
                    status_code=response.status,
                    retry_after=response.headers.get("retry-after"),
                    response_excerpt=excerpt,
                    duration_ms=elapsed(),
                )
        except TimeoutError as exc:
            return HttpResult(error_kind=ErrorKind.TIMEOUT, error=_describe(exc, "timed out"),
                              duration_ms=elapsed())
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            return HttpResult(error_kind=ErrorKind.INVALID_URL, error=f"invalid URL: {exc}",
                              duration_ms=elapsed())
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            return HttpResult(error_kind=ErrorKind.TLS, error=_describe(exc), duration_ms=elapsed())
        except aiohttp.ClientConnectorDNSError as exc:
            # The vetting resolver refuses a name that resolves to a forbidden address.
            kind = ErrorKind.BLOCKED if _is_blocked(exc) else ErrorKind.DNS
            return HttpResult(error_kind=kind, error=_describe(exc), duration_ms=elapsed())
        except aiohttp.ClientConnectorError as exc:
            kind = ErrorKind.BLOCKED if _is_blocked(exc) else ErrorKind.CONNECT
            return HttpResult(error_kind=kind, error=_describe(exc), duration_ms=elapsed())
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            kind = ErrorKind.BLOCKED if _is_blocked(exc) else ErrorKind.PROTOCOL
            return HttpResult(error_kind=kind, error=_describe(exc), duration_ms=elapsed())

    async def _read_excerpt(self, response: aiohttp.ClientResponse) -> str | None:
        limit = self.config.response_excerpt_bytes
        kept = bytearray()
        drained = 0
        while drained < limit + DRAIN_LIMIT:
            chunk = await response.content.read(min(READ_CHUNK, limit + DRAIN_LIMIT - drained))
            if not chunk:
                break
            if len(kept) < limit:
                kept += chunk[: limit - len(kept)]
            drained += len(chunk)
        if not response.content.at_eof():
            response.close()  # too long to drain: drop the connection rather than read on
        return kept.decode("utf-8", "replace") if kept else None


def _describe(exc: BaseException, default: str = "") -> str:
    text = str(exc) or default or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:ERROR_TEXT_LIMIT]
