"""VettingResolver: a fake DNS answer in, vetted addresses out; end to end against loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from worker.core.errors import DestinationBlocked, HostBlocked
from worker.core.netpolicy import IPNetwork
from worker.delivery.resolver import VettingResolver

pytestmark = pytest.mark.timeout(20)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


class FakeDns(AbstractResolver):
    """Answers from a table instead of DNS; `later` answers every lookup after the first."""

    def __init__(self, table: dict[str, list[str]],
                 later: dict[str, list[str]] | None = None) -> None:
        self.table = table
        self.later = later or {}
        self.lookups: list[str] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        first = host not in self.lookups
        self.lookups.append(host)
        addresses = self.table.get(host) if first else self.later.get(host, self.table.get(host))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(hostname=host, host=address, port=port,
                          family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                          proto=0, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
            for address in addresses
        ]

    async def close(self) -> None:
        self.closed = True


# --- resolve(): a hostname's whole answer is vetted ------------------------------------------


async def test_answer_mixing_public_and_loopback_is_refused_as_a_whole() -> None:
    resolver = VettingResolver(inner=FakeDns({"partner.test": ["8.8.8.8", "127.0.0.1"]}))
    with pytest.raises(HostBlocked) as caught:
        await resolver.resolve("partner.test", 443, socket.AF_UNSPEC)

    blocked = caught.value
    assert isinstance(blocked, DestinationBlocked)
    assert isinstance(blocked, OSError)
    assert blocked.host == "partner.test"
    assert blocked.addresses == ("127.0.0.1",)
    assert str(blocked) == (
        "destination blocked by network policy: host 'partner.test' resolves to 127.0.0.1, "
        "a non-public address (loopback); allow its network with WEBHOOKS_ALLOWED_NETWORKS "
        "to use it"
    )
    assert blocked.strerror == str(blocked)


async def test_every_refused_address_is_named() -> None:
    answer = ["8.8.8.8", "10.0.0.1", "169.254.169.254", "2606:4700:4700::1111", "::1"]
    resolver = VettingResolver(inner=FakeDns({"partner.test": answer}))
    with pytest.raises(HostBlocked) as caught:
        await resolver.resolve("partner.test", 443, socket.AF_UNSPEC)
    assert caught.value.addresses == ("10.0.0.1", "169.254.169.254", "::1")
    assert "cloud metadata" in str(caught.value)


async def test_all_public_answer_is_returned_unchanged() -> None:
    inner = FakeDns({"partner.test": ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]})
    expected = await inner.resolve("partner.test", 443, socket.AF_UNSPEC)
    resolver = VettingResolver(inner=inner)

    assert await resolver.resolve("partner.test", 443, socket.AF_UNSPEC) == expected


async def test_answer_inside_an_allowed_network_is_returned() -> None:
    inner = FakeDns({"partner.test": ["127.0.0.1", "8.8.8.8"]})
    resolver = VettingResolver(LOOPBACK, inner)
    results = await resolver.resolve("partner.test", 80, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["127.0.0.1", "8.8.8.8"]


async def test_allowing_one_network_does_not_allow_the_rest_of_the_answer() -> None:
    resolver = VettingResolver(LOOPBACK, FakeDns({"partner.test": ["127.0.0.1", "10.0.0.1"]}))
    with pytest.raises(HostBlocked) as caught:
        await resolver.resolve("partner.test", 80, socket.AF_UNSPEC)
    assert caught.value.addresses == ("10.0.0.1",)


@pytest.mark.parametrize("answer", [["::ffff:127.0.0.1"], ["64:ff9b::a9fe:a9fe"],
                                    ["fe80::1%eth0"], ["0.0.0.0"], ["224.0.0.1"]])
async def test_disguised_and_scoped_answers_are_refused(answer: list[str]) -> None:
    resolver = VettingResolver(inner=FakeDns({"partner.test": answer}))
    with pytest.raises(HostBlocked):
        await resolver.resolve("partner.test", 80, socket.AF_UNSPEC)


async def test_scoped_answer_inside_an_allowed_network_is_returned() -> None:
    inner = FakeDns({"partner.test": ["fe80::1%eth0"]})
    resolver = VettingResolver([ipaddress.ip_network("fe80::/10")], inner)
    results = await resolver.resolve("partner.test", 80, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["fe80::1%eth0"]


async def test_answer_that_is_not_an_address_is_refused() -> None:
    resolver = VettingResolver(inner=FakeDns({"partner.test": ["8.8.8.8", "not-an-address"]}))
    with pytest.raises(HostBlocked) as caught:
        await resolver.resolve("partner.test", 80, socket.AF_UNSPEC)
    assert caught.value.addresses == ("not-an-address",)


async def test_lookup_failures_of_the_inner_resolver_pass_through() -> None:
    resolver = VettingResolver(inner=FakeDns({}))
    with pytest.raises(socket.gaierror):
        await resolver.resolve("nowhere.test", 80, socket.AF_UNSPEC)


# --- resolve(): literals are vetted without DNS ------------------------------------------


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0x7f.1", "127.1", "0177.0.0.1",
                                  "127.0.0.1.", "%31%32%37.0.0.1", "127.0.0.1"])
async def test_loopback_literal_is_refused_without_a_lookup(host: str) -> None:
    inner = FakeDns({})
    with pytest.raises(HostBlocked) as caught:
        await VettingResolver(inner=inner).resolve(host, 80, socket.AF_UNSPEC)
    assert caught.value.addresses == ("127.0.0.1",)
    assert f"host {host!r} is" in str(caught.value)
    assert inner.lookups == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0x7f.1", "127.1", "127.0.0.1."])
async def test_loopback_literal_inside_an_allowed_network_resolves_to_its_address(
    host: str,
) -> None:
    inner = FakeDns({})
    results = await VettingResolver(LOOPBACK, inner).resolve(host, 8080, socket.AF_UNSPEC)
    assert results == [ResolveResult(
        hostname=host, host="127.0.0.1", port=8080, family=socket.AF_INET, proto=0,
        flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
    )]
    assert inner.lookups == []


@pytest.mark.parametrize("host", ["2852039166", "0xa9fea9fe", "0251.0376.0251.0376",
                                  "169.254.43518"])
async def test_metadata_literal_is_refused_even_with_loopback_allowed(host: str) -> None:
    with pytest.raises(HostBlocked) as caught:
        await VettingResolver(LOOPBACK, FakeDns({})).resolve(host, 80, socket.AF_UNSPEC)
    assert caught.value.addresses == ("169.254.169.254",)


async def test_public_literal_in_decimal_resolves_to_its_address() -> None:
    results = await VettingResolver(inner=FakeDns({})).resolve("134744072", 443,
                                                                  socket.AF_UNSPEC)
    assert [(r["host"], r["family"]) for r in results] == [("8.8.8.8", socket.AF_INET)]


@pytest.mark.parametrize("host", ["::ffff:127.0.0.1", "[::1]", "fe80::1%25eth0"])
async def test_ipv6_literals_are_vetted(host: str) -> None:
    with pytest.raises(HostBlocked):
        await VettingResolver(inner=FakeDns({})).resolve(host, 80, socket.AF_UNSPEC)


async def test_allowed_ipv6_literal_resolves_to_its_address() -> None:
    allowed = [ipaddress.ip_network("::1/128")]
    results = await VettingResolver(allowed, FakeDns({})).resolve("[::1]", 80, socket.AF_UNSPEC)
    assert [(r["host"], r["family"]) for r in results] == [("::1", socket.AF_INET6)]


@pytest.mark.parametrize(("host", "family"), [("8.8.8.8", socket.AF_INET6),
                                              ("2606:4700:4700::1111", socket.AF_INET)])
async def test_literal_of_the_other_family_fails_like_getaddrinfo(
    host: str, family: socket.AddressFamily
) -> None:
    with pytest.raises(socket.gaierror):
        await VettingResolver(inner=FakeDns({})).resolve(host, 80, family)


@pytest.mark.parametrize("host", ["1.example", "0x.example", "256.1.1.1"])
async def test_names_that_only_look_numeric_are_looked_up(host: str) -> None:
    inner = FakeDns({host: ["8.8.8.8"]})
    results = await VettingResolver(inner=inner).resolve(host, 80, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["8.8.8.8"]
    assert inner.lookups == [host]


# --- the default inner resolver, close() ---------------------------------------------------


async def test_default_inner_resolver_vets_localhost() -> None:
    resolver = VettingResolver()
    try:
        with pytest.raises(HostBlocked):
            await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
        allowed = VettingResolver([*LOOPBACK, ipaddress.ip_network("::1/128")])
        results = await allowed.resolve("localhost", 80, socket.AF_UNSPEC)
        assert results
        assert all(ipaddress.ip_address(r["host"]).is_loopback for r in results)
        await allowed.close()
    finally:
        await resolver.close()


async def test_close_closes_the_inner_resolver() -> None:
    inner = FakeDns({})
    await VettingResolver(inner=inner).close()
    assert inner.closed is True


async def test_close_without_a_lookup_is_harmless() -> None:
    await VettingResolver().close()


# --- end to end: a real session, a real loopback server -------------------------------------


class Dials:
    """A socket factory for TCPConnector that records each address dialled.

    It refuses (never dials) any non-loopback address, so a policy failure here shows up
    as a refusal instead of a connection to the outside world.
    """

    def __init__(self) -> None:
        self.addresses: list[tuple[Any, ...]] = []

    def __call__(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, address = addr_info
        self.addresses.append(tuple(address))
        if not ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback:
            raise ConnectionRefusedError(f"test guard: refusing to dial {address!r}")
        return socket.socket(family=family, type=type_, proto=proto)

    @property
    def hosts(self) -> list[str]:
        return [str(address[0]) for address in self.addresses]


SessionFactory = Callable[..., aiohttp.ClientSession]


@pytest.fixture
def dials() -> Dials:
    return Dials()


@pytest.fixture
async def session_with(dials: Dials) -> AsyncIterator[SessionFactory]:
    """`session_with(allowed, inner, **connector_kwargs)`: sessions closed at teardown."""
    sessions: list[aiohttp.ClientSession] = []

    def make(allowed: Sequence[IPNetwork], inner: AbstractResolver,
             **connector_kwargs: Any) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(resolver=VettingResolver(allowed, inner),
                                         socket_factory=dials, **connector_kwargs)
        session = aiohttp.ClientSession(connector=connector,
                                        timeout=aiohttp.ClientTimeout(total=5))
        sessions.append(session)
        return session

    try:
        yield make
    finally:
        for session in sessions:
            await session.close()


async def test_hostname_resolving_to_loopback_is_refused_before_dialling(
    server: Any, session_with: SessionFactory, dials: Dials
) -> None:
    session = session_with((), FakeDns({"partner.test": ["127.0.0.1"]}))
    with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
        await session.post(f"http://partner.test:{server.port}/hook", data=b"{}")

    # What the sender sees: a DNS-kind error wrapping the refusal, not a connect error.
    error = caught.value
    assert isinstance(error.os_error, HostBlocked)
    assert error.__cause__ is error.os_error
    assert DestinationBlocked.MARKER in str(error)
    assert "partner.test" in str(error)
    await asyncio.sleep(0.05)
    assert dials.addresses == []
    assert server.requests == []


async def test_hostname_resolving_to_allowed_loopback_is_delivered_to_the_vetted_address(
    server: Any, session_with: SessionFactory, dials: Dials
) -> None:
    inner = FakeDns({"partner.test": ["127.0.0.1"]})
    session = session_with(LOOPBACK, inner)
    async with session.post(f"http://partner.test:{server.port}/hook", data=b"{}") as response:
        assert response.status == 200

    assert inner.lookups == ["partner.test"]
    assert dials.addresses == [("127.0.0.1", server.port)]
    assert len(server.requests) == 1
    assert server.requests[0].headers["Host"] == f"partner.test:{server.port}"


@pytest.mark.parametrize("allowed", [(), LOOPBACK])
async def test_mixed_answer_is_never_dialled_at_all(
    server: Any, session_with: SessionFactory, dials: Dials, allowed: tuple[IPNetwork, ...]
) -> None:
    # Public + loopback without allowed networks; allowed loopback + private with them.
    answer = ["8.8.8.8", "127.0.0.1"] if not allowed else ["127.0.0.1", "10.0.0.1"]
    session = session_with(allowed, FakeDns({"partner.test": answer}))
    with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
        await session.post(f"http://partner.test:{server.port}/hook", data=b"{}")
    assert isinstance(caught.value.os_error, HostBlocked)
    await asyncio.sleep(0.05)
    assert dials.addresses == []
    assert server.requests == []


async def test_rebinding_answer_is_vetted_again_and_refused(
    server: Any, session_with: SessionFactory, dials: Dials
) -> None:
    # First lookup: the allowed loopback address; every later one: the metadata address.
    inner = FakeDns({"partner.test": ["127.0.0.1"]}, later={"partner.test": ["169.254.169.254"]})
    session = session_with(LOOPBACK, inner, use_dns_cache=False, force_close=True)
    url = f"http://partner.test:{server.port}/hook"

    async with session.post(url, data=b"{}") as response:
        assert response.status == 200
    with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
        await session.post(url, data=b"{}")

    assert isinstance(caught.value.os_error, HostBlocked)
    assert caught.value.os_error.addresses == ("169.254.169.254",)
    assert inner.lookups == ["partner.test", "partner.test"]
    assert dials.hosts == ["127.0.0.1"]  # one lookup per connection, its vetted address dialled
    assert len(server.requests) == 1


async def test_hex_literal_host_is_refused_without_allowed_networks(
    server: Any, session_with: SessionFactory, dials: Dials
) -> None:
    inner = FakeDns({})
    session = session_with((), inner)
    with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
        await session.post(f"http://0x7f000001:{server.port}/hook", data=b"{}")
    assert isinstance(caught.value.os_error, HostBlocked)
    assert inner.lookups == []
    assert dials.addresses == []
    assert server.requests == []


async def test_hex_literal_host_is_delivered_to_its_address_when_allowed(
    server: Any, session_with: SessionFactory, dials: Dials
) -> None:
    inner = FakeDns({})
    session = session_with(LOOPBACK, inner)
    async with session.post(f"http://0x7f.1:{server.port}/hook", data=b"{}") as response:
        assert response.status == 200
    assert inner.lookups == []
    assert dials.addresses == [("127.0.0.1", server.port)]
    assert len(server.requests) == 1


@pytest.mark.parametrize("allowed", [(), LOOPBACK])
async def test_all_digit_literal_host_never_reaches_the_resolver(
    server: Any, session_with: SessionFactory, dials: Dials, allowed: tuple[IPNetwork, ...]
) -> None:
    # aiohttp (3.13+) refuses all-digit-and-dot hosts other than a canonical dotted quad
    # as invalid URLs before consulting any resolver, allowed network or not. If that ever
    # changes, these hosts reach VettingResolver, whose own tests above cover them.
    session = session_with(allowed, FakeDns({}))
    with pytest.raises(aiohttp.InvalidUrlClientError):
        await session.post(f"http://2130706433:{server.port}/hook", data=b"{}")
    assert dials.addresses == []
    assert server.requests == []
