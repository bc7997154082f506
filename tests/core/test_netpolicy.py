"""The network policy: which addresses a delivery may dial."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest

from worker.core.netpolicy import embedded_ipv4, is_allowed, is_public

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",  # mapped public v4
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]

NOT_PUBLIC = [
    # loopback
    "127.0.0.1", "127.255.255.254", "::1",
    # unspecified / "this network"
    "0.0.0.0", "0.1.2.3", "::",
    # RFC 1918
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.255", "192.168.0.1",
    "192.168.255.255",
    # link-local, including cloud metadata
    "169.254.169.254", "169.254.0.1", "fe80::1", "febf:ffff::1",
    # CGNAT 100.64.0.0/10
    "100.64.0.1", "100.127.255.254",
    # broadcast and multicast
    "255.255.255.255", "224.0.0.1", "239.255.255.250", "ff02::1", "ff0e::1",
    # reserved 240/4
    "240.0.0.1", "250.1.2.3",
    # documentation
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "2001:db8::1",
    # benchmarking, IETF protocol assignments
    "198.18.0.1", "198.19.255.255", "192.0.0.1",
    # ULA fc00::/7
    "fc00::1", "fd12:3456:789a::1",
    # IPv4-mapped private / loopback / metadata
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:192.168.1.1",
    # NAT64 carrying private v4, and the local-use NAT64 prefix
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::808:808",
    # 6to4 carrying private v4
    "2002:7f00:1::", "2002:a00:1::1", "2002:a9fe:a9fe::1",
    # Teredo (2001::/32)
    "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:53aa:64c:0:0:f5ff:fffe",
    # discard-only
    "100::1",
]

# IPv4-compatible IPv6 (::/96, deprecated by RFC 4291) is part of the IETF-reserved ::/8;
# it is not globally routable unicast, and ::127.0.0.1 / ::10.0.0.1 name private targets.
IPV4_COMPATIBLE = ["::7f00:1", "::a00:1", "::a9fe:a9fe"]


@pytest.mark.parametrize("address", PUBLIC)
def test_is_public_accepts_public_addresses(address: str) -> None:
    assert is_public(ip_address(address)) is True


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_is_public_rejects_non_public_addresses(address: str) -> None:
    assert is_public(ip_address(address)) is False


@pytest.mark.parametrize("address", IPV4_COMPATIBLE)
def test_is_public_rejects_ipv4_compatible_ipv6_addresses(address: str) -> None:
    assert is_public(ip_address(address)) is False


@pytest.mark.parametrize("address", PUBLIC)
def test_is_allowed_accepts_public_addresses_without_allowed_networks(address: str) -> None:
    assert is_allowed(address) is True
    assert is_allowed(ip_address(address)) is True


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_is_allowed_refuses_non_public_addresses_without_allowed_networks(address: str) -> None:
    assert is_allowed(address) is False
    assert is_allowed(ip_address(address)) is False


@pytest.mark.parametrize("address", ["fe80::1%eth0", "fe80::1%1", "ff02::1%lo"])
def test_is_allowed_refuses_scoped_link_local_and_multicast(address: str) -> None:
    assert is_allowed(address) is False


def test_is_allowed_accepts_scoped_address_inside_an_allowed_network() -> None:
    assert is_allowed("fe80::1%eth0", [ip_network("fe80::/10")]) is True


@pytest.mark.parametrize("address", ["not-an-ip", "", "256.0.0.1", "1.2.3", "example.com", "::g"])
def test_is_allowed_raises_value_error_for_text_that_is_not_an_address(address: str) -> None:
    with pytest.raises(ValueError):
        is_allowed(address)


# --- allowed networks --------------------------------------------------------------------

LOOPBACK_V4 = [ip_network("127.0.0.0/8")]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "::ffff:127.0.0.1"])
def test_allowed_v4_loopback_network_allows_loopback_and_its_mapped_form(address: str) -> None:
    assert is_allowed(address, LOOPBACK_V4) is True


@pytest.mark.parametrize("address", ["::1", "10.0.0.1", "::ffff:10.0.0.1", "169.254.169.254"])
def test_allowed_v4_loopback_network_allows_nothing_else_private(address: str) -> None:
    assert is_allowed(address, LOOPBACK_V4) is False


def test_allowed_v6_loopback_network_allows_only_v6_loopback() -> None:
    allowed = [ip_network("::1/128")]
    assert is_allowed("::1", allowed) is True
    assert is_allowed("127.0.0.1", allowed) is False
    assert is_allowed("fe80::1", allowed) is False
    assert is_allowed("::ffff:127.0.0.1", allowed) is False


def test_allowed_v4_network_does_not_allow_a_v6_address_with_the_same_bits() -> None:
    # fd00::a00:1 ends in the bits of 10.0.0.1 but is another address family
    allowed = [ip_network("10.0.0.0/8")]
    assert is_allowed("10.0.0.1", allowed) is True
    assert is_allowed("fd00::a00:1", allowed) is False
    assert is_allowed("64:ff9b::a00:1", allowed) is False  # NAT64 form is not widened


def test_allowed_v6_network_does_not_allow_a_v4_address() -> None:
    allowed = [ip_network("::/0")]
    assert is_allowed("10.0.0.1", allowed) is False
    assert is_allowed("fd00::1", allowed) is True


@pytest.mark.parametrize(
    ("network", "inside", "outside"),
    [
        ("10.0.0.0/8", "10.20.30.40", "172.16.0.1"),
        ("192.168.1.0/24", "192.168.1.200", "192.168.2.1"),
        ("169.254.169.254/32", "169.254.169.254", "169.254.169.253"),
        ("100.64.0.0/10", "100.100.100.100", "127.0.0.1"),
        ("fd00::/8", "fd00::5", "fc00::5"),
        ("fe80::/10", "fe80::abcd", "fd00::abcd"),
    ],
)
def test_allowed_network_opens_its_own_range_only(network: str, inside: str, outside: str) -> None:
    assert not is_public(ip_address(outside))
    allowed = [ip_network(network)]
    assert is_allowed(inside, allowed) is True
    assert is_allowed(outside, allowed) is False


def test_allowed_networks_do_not_block_public_addresses() -> None:
    assert is_allowed("8.8.8.8", [ip_network("10.0.0.0/8")]) is True


def test_allowed_networks_accepts_any_iterable_including_a_generator() -> None:
    nets = (ip_network(n) for n in ("192.168.0.0/16", "10.0.0.0/8"))
    assert is_allowed("10.1.1.1", nets) is True


def test_allowed_networks_mixing_families_each_applies_to_its_own() -> None:
    allowed = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]
    assert is_allowed("10.0.0.1", allowed) is True
    assert is_allowed("fd00::1", allowed) is True
    assert is_allowed("::ffff:10.0.0.1", allowed) is True
    assert is_allowed("192.168.0.1", allowed) is False


# --- embedded_ipv4 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::ffff:8.8.8.8", "8.8.8.8"),
        ("64:ff9b::7f00:1", "127.0.0.1"),
        ("64:ff9b::8.8.8.8", "8.8.8.8"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("2002:7f00:1::", "127.0.0.1"),
        ("2002:c0a8:101::42", "192.168.1.1"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # RFC 4380 example
    ],
)
def test_embedded_ipv4_extracts_mapped_nat64_6to4_and_teredo(address: str, expected: str) -> None:
    assert embedded_ipv4(IPv6Address(address)) == IPv4Address(expected)


@pytest.mark.parametrize("address", ["::1", "2606:4700:4700::1111", "fe80::1", "fd00::1",
                                     "64:ff9b:1::1", "2001:db8::1"])
def test_embedded_ipv4_is_none_for_addresses_without_an_ipv4(address: str) -> None:
    assert embedded_ipv4(IPv6Address(address)) is None


def test_embedded_ipv4_nat64_uses_the_last_32_bits() -> None:
    address = ipaddress.IPv6Address("64:ff9b::1.2.3.4")
    assert embedded_ipv4(address) == IPv4Address("1.2.3.4")
