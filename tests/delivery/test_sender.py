"""Sender against real loopback servers; aioresponses only for exceptions a server can't make."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

import worker.delivery.sender as sender_module
from worker.core.models import ErrorKind, HttpResult
from worker.core.signing import generate_secret
from worker.delivery.sender import Sender, SenderConfig

pytestmark = pytest.mark.timeout(20)

PAYLOAD = '{"type":"order.paid","name":"café ☕","n":[1,2,3]}'.encode()


# -- a safety net: nothing in this module may dial a non-loopback address ----------------------


@pytest.fixture(autouse=True)
def outside_connects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Refuse (and record) any socket connect to a non-loopback address.

    If the sender's network policy ever failed, tests would see a refusal instead of reaching
    the internet (e.g. 169.254.169.254) — and could assert that nothing was even tried.
    """
    attempted: list[object] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def is_loopback(address: object) -> bool:
        try:
            host = address[0] if isinstance(address, tuple) else None  # type: ignore[index]
            return host is not None and ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def connect(self: socket.socket, address: object) -> None:
        if not is_loopback(address):
            attempted.append(address)
            raise ConnectionRefusedError(f"test guard: refusing to dial {address!r}")
        real_connect(self, address)  # type: ignore[arg-type]

    def connect_ex(self: socket.socket, address: object) -> int:
        if not is_loopback(address):
            attempted.append(address)
            raise ConnectionRefusedError(f"test guard: refusing to dial {address!r}")
        return real_connect_ex(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempted


def test_guard_refuses_outside_addresses(outside_connects):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(
        ConnectionRefusedError
    ):
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: refused by the guard, never dialled
    assert outside_connects == [("192.0.2.1", 9)]


@pytest.fixture
def settings(make_settings):
    return make_settings()


@pytest.fixture
async def sender(settings):
    async with Sender(SenderConfig.from_settings(settings)) as s:
        yield s


@pytest.fixture
async def tcp_listener():
    """A raw TCP listener on 127.0.0.1 that counts accepted connections (and closes them)."""
    state = SimpleNamespace(accepted=0, port=0)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.accepted += 1
        writer.close()

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.port = srv.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        srv.close()
        await asyncio.wait_for(srv.wait_closed(), 5)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# -- signing -----------------------------------------------------------------------------------


async def test_signed_request_verifies_with_standardwebhooks(server, sender, make_delivery):
    secret = generate_secret()
    delivery = make_delivery(server.url(), secrets=(secret,), payload=PAYLOAD)

    result = await sender.send(delivery)

    assert result.status_code == 200
    assert result.error_kind is None
    [seen] = server.requests
    assert seen.method == "POST"
    assert seen.path == "/hook"
    assert seen.body == PAYLOAD  # the exact bytes that were signed
    headers = lower(seen.headers)
    assert headers["webhook-id"] == delivery.id
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == sender_module.USER_AGENT
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 10
    assert Webhook(secret).verify(seen.body, headers) == {
        "type": "order.paid", "name": "café ☕", "n": [1, 2, 3]
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(seen.body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(seen.body + b" ", headers)


async def test_two_secrets_give_two_signatures_each_verifiable(server, sender, make_delivery):
    new, old = generate_secret(), generate_secret()
    delivery = make_delivery(server.url(), secrets=(new, old), payload=PAYLOAD)

    result = await sender.send(delivery)

    assert result.status_code == 200
    [seen] = server.requests
    headers = lower(seen.headers)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(sig.startswith("v1,") for sig in signatures)
    assert signatures[0] != signatures[1]
    for secret, signature in ((new, signatures[0]), (old, signatures[1])):
        # Each signature on its own verifies with its own secret.
        Webhook(secret).verify(seen.body, {**headers, "webhook-signature": signature})
        Webhook(secret).verify(seen.body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(seen.body, headers)


async def test_each_attempt_is_signed_with_a_fresh_timestamp(
    server, sender, make_delivery, monkeypatch
):
    now = int(time.time())
    clock = iter([now - 120, now - 60])
    monkeypatch.setattr(
        sender_module, "time",
        SimpleNamespace(time=lambda: next(clock), perf_counter=time.perf_counter),
    )
    secret = generate_secret()
    delivery = make_delivery(server.url(), secrets=(secret,))

    first = await sender.send(delivery)
    second = await sender.send(delivery)

    assert first.status_code == second.status_code == 200
    assert len(server.requests) == 2
    stamps = [lower(r.headers)["webhook-timestamp"] for r in server.requests]
    assert stamps == [str(now - 120), str(now - 60)]
    signatures = [lower(r.headers)["webhook-signature"] for r in server.requests]
    assert signatures[0] != signatures[1]
    for seen in server.requests:
        headers = lower(seen.headers)
        assert headers["webhook-id"] == delivery.id  # same id on every attempt
        Webhook(secret).verify(seen.body, headers)


async def test_real_clock_timestamp_is_current_on_each_send(server, sender, make_delivery):
    delivery = make_delivery(server.url())
    for _ in range(2):
        before = int(time.time())
        await sender.send(delivery)
        after = int(time.time())
        assert before <= int(lower(server.requests[-1].headers)["webhook-timestamp"]) <= after


# -- statuses, redirects, response excerpt -----------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299, 400, 401, 404, 410, 422, 429, 500,
                                    502, 503])
async def test_status_is_returned_as_is(server, sender, make_delivery, status):
    async def reply(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=status, text="" if status == 204 else f"status {status}")

    server.default = reply

    result = await sender.send(make_delivery(server.url()))

    assert isinstance(result, HttpResult)
    assert result.status_code == status
    assert result.error_kind is None
    assert result.error is None
    assert result.duration_ms > 0
    if status != 204:
        assert result.response_excerpt == f"status {status}"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_not_followed(server, sender, make_delivery, status):
    async def redirect(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": server.url("/target")})

    server.on("/hook", redirect)

    result = await sender.send(make_delivery(server.url("/hook")))

    assert result.status_code == status
    await asyncio.sleep(0.05)
    assert len(server.hits("/hook")) == 1
    assert server.hits("/target") == []


async def test_retry_after_header_is_captured(server, sender, make_delivery):
    async def busy(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=503, headers={"Retry-After": "120"}, text="busy")

    server.default = busy

    result = await sender.send(make_delivery(server.url()))

    assert result.status_code == 503
    assert result.retry_after == "120"
    assert result.response_excerpt == "busy"


async def test_no_retry_after_header_gives_none(server, sender, make_delivery):
    result = await sender.send(make_delivery(server.url()))
    assert result.retry_after is None


async def test_huge_response_body_is_cut_to_the_excerpt_limit(server, make_settings,
                                                              make_delivery):
    limit = 100
    big = b"x" * (1024 * 1024)

    async def huge(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=200, body=big)

    server.default = huge
    config = SenderConfig.from_settings(make_settings(response_excerpt_bytes=limit))
    async with Sender(config) as sender:
        started = time.monotonic()
        result = await sender.send(make_delivery(server.url()))
        elapsed = time.monotonic() - started
        # The pool recovers after dropping the long response's connection.
        again = await sender.send(make_delivery(server.url()))

    assert result.status_code == 200
    assert result.error_kind is None
    assert result.response_excerpt is not None
    assert 0 < len(result.response_excerpt.encode()) <= limit
    assert result.response_excerpt == "x" * limit
    assert elapsed < 2.0
    assert again.status_code == 200


async def test_excerpt_is_bounded_in_bytes_with_multibyte_text(server, make_settings,
                                                                make_delivery):
    limit = 11

    async def text(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=400, body=("é" * 5000).encode())

    server.default = text
    config = SenderConfig.from_settings(make_settings(response_excerpt_bytes=limit))
    async with Sender(config) as sender:
        result = await sender.send(make_delivery(server.url()))

    assert result.status_code == 400
    assert result.response_excerpt is not None
    assert len(result.response_excerpt) <= limit
    assert result.response_excerpt.startswith("é" * 5)


async def test_zero_excerpt_limit_keeps_no_body(server, make_settings, make_delivery):
    config = SenderConfig.from_settings(make_settings(response_excerpt_bytes=0))
    async with Sender(config) as sender:
        result = await sender.send(make_delivery(server.url()))
    assert result.status_code == 200
    assert result.response_excerpt is None


async def test_connections_are_reused_across_sequential_sends(server, sender, make_delivery):
    for _ in range(20):
        result = await sender.send(make_delivery(server.url()))
        assert result.status_code == 200
    assert len(server.requests) == 20
    assert len(server.peers) <= 2


async def test_connection_is_reused_after_a_body_longer_than_the_excerpt(
    server, make_settings, make_delivery
):
    async def medium(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=500, body=b"e" * 10_000)  # drained, not dropped

    server.default = medium
    config = SenderConfig.from_settings(make_settings(response_excerpt_bytes=64))
    async with Sender(config) as sender:
        for _ in range(5):
            result = await sender.send(make_delivery(server.url()))
            assert result.status_code == 500
            assert result.response_excerpt == "e" * 64
    assert len(server.requests) == 5
    assert len(server.peers) <= 2


# -- timeouts and connection errors ------------------------------------------------------------


async def test_waiting_for_a_pooled_connection_is_not_a_connect_timeout(
    server, make_settings, make_delivery
):
    """More concurrent sends to one host than per_endpoint_limit queue for a connection.

    The endpoint answers every request within 0.6 s, far inside request_timeout; queueing for
    a pool slot is not a failure to connect. Every delivery must be sent and succeed.
    """

    async def steady(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(0.6)
        return web.Response(text="ok")

    server.default = steady
    settings = make_settings(per_endpoint_limit=2, connect_timeout=0.3, request_timeout=3.0)
    async with Sender(SenderConfig.from_settings(settings)) as sender:
        results = await asyncio.wait_for(
            asyncio.gather(*(sender.send(make_delivery(server.url())) for _ in range(4))), 10
        )

    assert [r.error_kind for r in results] == [None] * 4, [r.error for r in results]
    assert [r.status_code for r in results] == [200] * 4
    assert len(server.requests) == 4


async def test_slow_server_times_out_within_request_timeout(server, make_settings, make_delivery):
    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.Response(text="too late")

    server.default = slow
    config = SenderConfig.from_settings(make_settings(request_timeout=0.5))
    async with Sender(config) as sender:
        started = time.monotonic()
        result = await sender.send(make_delivery(server.url()))
        elapsed = time.monotonic() - started

    assert result.error_kind is ErrorKind.TIMEOUT
    assert result.status_code is None
    assert result.error
    assert 0.4 <= elapsed < 2.0
    assert 400 <= result.duration_ms < 2000
    assert len(server.requests) == 1


async def test_slowly_trickled_body_times_out(server, make_settings, make_delivery):
    async def trickle(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = 1000
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x")
            await asyncio.sleep(0.1)
        return response

    server.default = trickle
    config = SenderConfig.from_settings(make_settings(request_timeout=0.5))
    async with Sender(config) as sender:
        started = time.monotonic()
        result = await sender.send(make_delivery(server.url()))
        elapsed = time.monotonic() - started

    assert result.error_kind is ErrorKind.TIMEOUT
    assert elapsed < 2.0


async def test_connection_refused_is_connect_error(sender, make_delivery, closed_port):
    result = await sender.send(make_delivery(f"http://127.0.0.1:{closed_port}/hook"))

    assert result.error_kind is ErrorKind.CONNECT
    assert result.status_code is None
    assert result.error
    assert result.duration_ms < 2000


async def test_server_closing_the_connection_is_protocol_error(sender, make_delivery,
                                                               tcp_listener):
    result = await sender.send(make_delivery(f"http://127.0.0.1:{tcp_listener.port}/hook"))

    assert result.error_kind is ErrorKind.PROTOCOL
    assert result.status_code is None
    assert tcp_listener.accepted >= 1


# -- network policy ----------------------------------------------------------------------------


async def test_loopback_blocked_when_not_allowed(server, make_settings, make_delivery):
    config = SenderConfig.from_settings(make_settings(allowed_networks=""))
    async with Sender(config) as sender:
        result = await sender.send(make_delivery(server.url()))

    assert result.error_kind is ErrorKind.BLOCKED
    assert result.status_code is None
    assert "blocked" in (result.error or "").lower() or result.error
    await asyncio.sleep(0.05)
    assert server.requests == []


async def test_blocked_destination_is_never_dialled(make_settings, make_delivery, tcp_listener):
    config = SenderConfig.from_settings(make_settings(allowed_networks=""))
    async with Sender(config) as sender:
        result = await sender.send(make_delivery(f"http://127.0.0.1:{tcp_listener.port}/"))

    assert result.error_kind is ErrorKind.BLOCKED
    await asyncio.sleep(0.05)
    assert tcp_listener.accepted == 0


async def test_other_allowed_network_does_not_open_loopback(server, make_settings,
                                                            make_delivery):
    config = SenderConfig.from_settings(make_settings(allowed_networks="10.0.0.0/8"))
    async with Sender(config) as sender:
        result = await sender.send(make_delivery(server.url()))
    assert result.error_kind is ErrorKind.BLOCKED
    assert server.requests == []


async def test_localhost_name_resolving_to_loopback_is_blocked(server, make_settings,
                                                               make_delivery):
    config = SenderConfig.from_settings(make_settings(allowed_networks=""))
    async with Sender(config) as sender:
        result = await sender.send(make_delivery(f"http://localhost:{server.port}/hook"))

    assert result.error_kind is ErrorKind.BLOCKED
    await asyncio.sleep(0.05)
    assert server.requests == []


async def test_localhost_name_allowed_when_loopback_allowed(server, sender, make_delivery):
    # localhost may resolve to ::1 first; the server listens on 127.0.0.1 only, and both
    # loopback networks are allowed, so the attempt must end up there.
    result = await sender.send(make_delivery(f"http://localhost:{server.port}/hook"))
    assert result.status_code == 200
    assert len(server.requests) == 1


async def test_ipv6_loopback_blocked_when_not_allowed(server6, make_settings, make_delivery):
    config = SenderConfig.from_settings(make_settings(allowed_networks=""))
    async with Sender(config) as sender:
        result = await sender.send(make_delivery(server6.url()))

    assert result.error_kind is ErrorKind.BLOCKED
    await asyncio.sleep(0.05)
    assert server6.requests == []


async def test_ipv6_loopback_reached_when_allowed(server6, sender, make_delivery):
    result = await sender.send(make_delivery(server6.url()))
    assert result.status_code == 200
    assert len(server6.requests) == 1


async def test_ipv4_mapped_ipv6_loopback_blocked_when_not_allowed(
    server, make_settings, make_delivery
):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support for an IPv4-mapped address")
    config = SenderConfig.from_settings(make_settings(allowed_networks=""))
    async with Sender(config) as sender:
        result = await sender.send(make_delivery(f"http://[::ffff:127.0.0.1]:{server.port}/h"))
    assert result.error_kind is ErrorKind.BLOCKED
    await asyncio.sleep(0.05)
    assert server.requests == []


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.169.254:80/",
    "https://169.254.169.254/",
    "http://10.1.2.3:8080/hook",
    "http://192.168.0.1/",
    "http://0.0.0.0:9/",
    "http://[fe80::1]/",
])
async def test_private_and_metadata_addresses_are_blocked_before_connecting(
    make_settings, make_delivery, outside_connects, url
):
    config = SenderConfig.from_settings(make_settings())  # loopback allowed, nothing else
    async with Sender(config) as sender:
        started = time.monotonic()
        result = await sender.send(make_delivery(url))
        elapsed = time.monotonic() - started

    assert result.error_kind is ErrorKind.BLOCKED
    assert result.status_code is None
    assert elapsed < 0.5
    assert result.duration_ms < 500
    assert outside_connects == []  # not even attempted


# -- bad input: errors, never exceptions -------------------------------------------------------


@pytest.mark.parametrize("secrets", [
    ("not-a-secret",),
    ("whsec_###",),
    ("whsec_c2hvcnQ=",),  # valid base64, too short a key
])
async def test_invalid_secret_is_an_error_not_an_exception(server, sender, make_delivery,
                                                           secrets):
    result = await sender.send(make_delivery(server.url(), secrets=secrets))

    assert result.status_code is None
    assert result.error_kind is not None
    assert "secret" in (result.error or "")
    assert server.requests == []


async def test_one_bad_secret_among_good_ones_sends_nothing(server, sender, make_delivery):
    result = await sender.send(
        make_delivery(server.url(), secrets=(generate_secret(), "whsec_broken!"))
    )
    assert result.error_kind is not None
    assert server.requests == []


async def test_no_secret_is_never_sent_unsigned(server, sender, make_delivery):
    """A delivery without any secret must not reach the endpoint with no signature."""
    result = await sender.send(make_delivery(server.url(), secrets=()))

    assert server.requests == [], (
        "sent with webhook-signature="
        f"{lower(server.requests[0].headers).get('webhook-signature')!r}"
    )
    assert result.status_code is None
    assert result.error_kind is not None


@pytest.mark.parametrize("make_url", [
    lambda port: "not a url",
    lambda port: "",
    lambda port: "http:///no-host",
    lambda port: "http://127.0.0.1:99999/hook",
    lambda port: f"ftp://127.0.0.1:{port}/hook",
], ids=["spaces", "empty", "no-host", "bad-port", "ftp-scheme"])
async def test_invalid_url_is_invalid_url_error(server, sender, make_delivery, make_url):
    result = await sender.send(make_delivery(make_url(server.port)))

    assert result.status_code is None
    assert result.error_kind is ErrorKind.INVALID_URL, result
    assert server.requests == []


async def test_send_before_open_is_a_programming_error(settings, make_delivery):
    with pytest.raises(RuntimeError):
        await Sender(SenderConfig.from_settings(settings)).send(make_delivery())


async def test_open_is_idempotent_and_close_reopens(server, settings, make_delivery):
    sender = Sender(SenderConfig.from_settings(settings))
    sender.open()
    sender.open()
    try:
        assert (await sender.send(make_delivery(server.url()))).status_code == 200
    finally:
        await sender.close()
    await sender.close()
    async with sender:
        assert (await sender.send(make_delivery(server.url()))).status_code == 200


async def test_concurrent_sends_all_arrive(server, sender, make_delivery):
    deliveries = [make_delivery(server.url()) for _ in range(50)]
    results = await asyncio.wait_for(
        asyncio.gather(*(sender.send(d) for d in deliveries)), 10
    )
    assert all(r.status_code == 200 for r in results)
    ids = sorted(lower(r.headers)["webhook-id"] for r in server.requests)
    assert ids == sorted(d.id for d in deliveries)


# -- exceptions a real server can't produce on demand (aioresponses) ---------------------------

MOCK_URL = "https://hooks.example.test/hook"  # never resolved: aioresponses intercepts


def _conn_key() -> object:
    from aiohttp.client_reqrep import ConnectionKey

    return ConnectionKey("hooks.example.test", 443, True, True, None, None, None)


@pytest.mark.parametrize("make_exc, kind", [
    (lambda: aiohttp.ServerDisconnectedError(), ErrorKind.PROTOCOL),
    (lambda: aiohttp.ClientPayloadError("truncated"), ErrorKind.PROTOCOL),
    (lambda: aiohttp.ClientOSError(104, "Connection reset by peer"), ErrorKind.PROTOCOL),
    (lambda: ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), ErrorKind.TLS),
    (lambda: aiohttp.ClientConnectorCertificateError(
        _conn_key(), ssl.SSLCertVerificationError(1, "certificate verify failed")),
     ErrorKind.TLS),
    (lambda: aiohttp.ClientConnectorSSLError(_conn_key(), ssl.SSLError(1, "handshake")),
     ErrorKind.TLS),
    (lambda: aiohttp.ClientConnectorDNSError(_conn_key(), OSError(-2, "Name not known")),
     ErrorKind.DNS),
    (lambda: aiohttp.ConnectionTimeoutError("connect timed out"), ErrorKind.TIMEOUT),
    (lambda: TimeoutError(), ErrorKind.TIMEOUT),
], ids=["server-disconnected", "payload", "reset", "ssl-error", "cert", "ssl-connector", "dns",
        "connect-timeout", "timeout"])
async def test_transport_exceptions_map_to_error_kinds(sender, make_delivery, make_exc, kind):
    with aioresponses() as mocked:
        mocked.post(MOCK_URL, exception=make_exc())
        result = await sender.send(make_delivery(MOCK_URL))

    assert result.error_kind is kind
    assert result.status_code is None
    assert result.error and len(result.error) <= 500


# -- issue 9: v1a signatures, static headers, TLS opt-out, sealed-credential errors, literals --


async def test_v1a_alone_and_beside_v1_verify(server, sender, make_delivery):
    """Ed25519 (`v1a`) verifies with the public key, by cryptography directly and by ours;
    with both schemes, each entry verifies with its own key."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from worker.core.signing import generate_signing_key, verify

    signing_key, public_key = generate_signing_key()
    hmac_secret = generate_secret()
    for secrets in [(signing_key,), (hmac_secret, signing_key)]:
        result = await sender.send(make_delivery(server.url(), secrets=secrets, payload=PAYLOAD))
        assert result.status_code == 200
    alone, both = server.requests
    for seen in (alone, both):
        headers = lower(seen.headers)
        entries = headers["webhook-signature"].split(" ")
        (v1a,) = [e for e in entries if e.startswith("v1a,")]
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + seen.body
        raw = base64.b64decode(public_key.removeprefix("whpk_"))
        Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(v1a[4:]), signed)
        verify(public_key, headers, seen.body)
    assert lower(alone.headers)["webhook-signature"].count(",") == 1  # v1a only
    both_headers = lower(both.headers)
    assert Webhook(hmac_secret).verify(both.body, both_headers)
    assert both_headers["webhook-signature"].startswith("v1,")


async def test_static_headers_are_sent_and_cannot_replace_the_signature(
        server, sender, make_delivery):
    from dataclasses import replace

    from worker.core.models import EndpointPolicy

    secret = generate_secret()
    delivery = replace(
        make_delivery(server.url(), secrets=(secret,), payload=PAYLOAD),
        # Validation refuses these names at `endpoints add`; the sender still puts its own last.
        policy=EndpointPolicy(headers=(("X-Api-Key", "k-123"), ("webhook-signature", "v1,x"))))
    assert (await sender.send(delivery)).status_code == 200
    [seen] = server.requests
    headers = lower(seen.headers)
    assert headers["x-api-key"] == "k-123"
    assert Webhook(secret).verify(seen.body, headers)


@pytest.fixture
async def tls_server(tmp_path):
    """A real HTTPS server on 127.0.0.1 with a self-signed certificate."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    hits: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield SimpleNamespace(url=f"https://127.0.0.1:{port}/hook", hits=hits)
    await runner.cleanup()


async def test_tls_is_verified_unless_the_endpoint_opts_out(tls_server, sender, make_delivery):
    from dataclasses import replace

    from worker.core.models import EndpointPolicy

    verified = await sender.send(make_delivery(tls_server.url))
    assert verified.error_kind is ErrorKind.TLS
    assert tls_server.hits == []
    insecure = replace(make_delivery(tls_server.url), policy=EndpointPolicy(verify_tls=False))
    assert (await sender.send(insecure)).status_code == 200
    assert len(tls_server.hits) == 1
    # The opt-out is per endpoint: the next verified one is refused again.
    assert (await sender.send(make_delivery(tls_server.url))).error_kind is ErrorKind.TLS


async def test_unsealable_credentials_are_a_retryable_error_not_a_crash(
        server, sender, make_delivery):
    from dataclasses import replace

    from worker.core.models import EndpointPolicy
    from worker.core.outcome import classify

    problem = "sealed with key 'k1', which is not in WEBHOOKS_SECRET_KEYS (it holds: k2)"
    delivery = replace(make_delivery(server.url(), secrets=()),
                       policy=EndpointPolicy(credential_error=problem))
    result = await sender.send(delivery)
    assert (result.error_kind, result.error) == (ErrorKind.CREDENTIALS, problem)
    assert classify(result).kind.value == "retry"
    assert server.requests == []


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.1", "017700000001",
                                  "127.0.0.1.", "[::ffff:127.0.0.1]", "169.254.169.254",
                                  "0x7f000001", "10.1", "[::1]"])
async def test_literal_non_public_hosts_are_blocked_not_invalid(
        host, make_settings, make_delivery, outside_connects):
    async with Sender(SenderConfig.from_settings(make_settings(allowed_networks=()))) as s:
        result = await s.send(make_delivery(f"http://{host}:9/hook"))
    assert result.error_kind is ErrorKind.BLOCKED, result
    assert "non-public" in (result.error or "")
    assert outside_connects == []
