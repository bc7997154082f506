"""The network policy: which addresses a delivery may dial."""

from __future__ import annotations

import ipaddress
import platform
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest

from worker.core.netpolicy import (
    address_class,
    describe_refusal,
    embedded_ipv4,
    is_allowed,
    is_public,
    literal_address,
    refusal_for_url,
    refused_addresses,
)

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


# --- literal_address: every spelling of an IP literal ------------------------------------
#
# (host, the address it denotes). IPv4 rows agree with glibc's inet_aton unless listed in
# WHATWG_ONLY, which browsers also read as addresses (checked against glibc below).



def _fullwidth(text: str) -> str:
    """`text` with its ASCII digits as FULLWIDTH DIGIT characters (U+FF10..U+FF19)."""
    return "".join(chr(ord(c) - ord("0") + 0xFF10) if c in "0123456789" else c for c in text)


LOOPBACK_SPELLINGS = [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),  # decimal
    ("017700000001", "127.0.0.1"),  # octal
    ("0177.0.0.1", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),  # hex
    ("0X7F000001", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0x7F.0x0.0x0.0x1", "127.0.0.1"),
    ("0177.0x0.0.1", "127.0.0.1"),  # mixed
    ("127.0.0.01", "127.0.0.1"),
    ("00000000000177.0.0.1", "127.0.0.1"),
    ("0x000000007f.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),  # short forms
    ("127.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0177.1", "127.0.0.1"),
    ("127.65535", "127.0.255.255"),
    ("127.16777215", "127.255.255.255"),
    ("127.0.0.1.", "127.0.0.1"),  # trailing dot
    ("127.1.", "127.0.0.1"),
    ("0x7f000001.", "127.0.0.1"),
    (_fullwidth("127.0.0.1"), "127.0.0.1"),  # full-width digits (IDNA maps them)
    ("127。0。0。1", "127.0.0.1"),  # ideographic full stops
    ("①②⑦.0.0.1", "127.0.0.1"),
    ("%31%32%37.0.0.1", "127.0.0.1"),  # percent-escapes, as yarl leaves them
    ("::1", "::1"),
    ("[::1]", "::1"),
    ("0:0:0:0:0:0:0:1", "::1"),
    ("::ffff:127.0.0.1", "::ffff:7f00:1"),  # IPv4-mapped
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("::ffff:7f00:1", "::ffff:7f00:1"),
    ("::FFFF:7F00:1", "::ffff:7f00:1"),
    ("::127.0.0.1", "::7f00:1"),  # IPv4-compatible
    ("64:ff9b::127.0.0.1", "64:ff9b::7f00:1"),  # NAT64
    ("[2002:7f00:1::1]", "2002:7f00:1::1"),  # 6to4
]

PRIVATE_SPELLINGS = [
    ("10.0.0.1", "10.0.0.1"),
    ("10.1", "10.0.0.1"),
    ("10.0.1", "10.0.0.1"),
    ("167772161", "10.0.0.1"),
    ("012.0.0.1", "10.0.0.1"),
    ("0xa000001", "10.0.0.1"),
    ("0xa.0.0.1", "10.0.0.1"),
    ("192.168.1.1", "192.168.1.1"),
    ("3232235777", "192.168.1.1"),
    ("0xc0a80101", "192.168.1.1"),
    ("0300.0250.1.1", "192.168.1.1"),
    ("192.168.257", "192.168.1.1"),
    ("172.16.1", "172.16.0.1"),
    ("::ffff:10.0.0.1", "::ffff:a00:1"),
    ("[fd00::1]", "fd00::1"),
]

METADATA_SPELLINGS = [
    ("169.254.169.254", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("0xA9.0xFE.0xA9.0xFE", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("025177524776", "169.254.169.254"),
    ("169.254.43518", "169.254.169.254"),
    ("169.16689662", "169.254.169.254"),
    ("169.254.169.254.", "169.254.169.254"),
    ("[::ffff:169.254.169.254]", "::ffff:a9fe:a9fe"),
    ("::ffff:a9fe:a9fe", "::ffff:a9fe:a9fe"),
    ("64:ff9b::a9fe:a9fe", "64:ff9b::a9fe:a9fe"),
    ("2002:a9fe:a9fe::", "2002:a9fe:a9fe::"),
    ("[fd00:ec2::254]", "fd00:ec2::254"),  # the IPv6 metadata address of one cloud
]

UNSPECIFIED_SPELLINGS = [
    ("0.0.0.0", "0.0.0.0"),
    ("0", "0.0.0.0"),
    ("00", "0.0.0.0"),
    ("0x0", "0.0.0.0"),
    ("0.0", "0.0.0.0"),
    ("0x0.0x0.0x0.0x0", "0.0.0.0"),
    ("0.0.0.0.", "0.0.0.0"),
    ("::", "::"),
    ("[::]", "::"),
    ("::ffff:0.0.0.0", "::ffff:0.0.0.0"),
]

LINK_LOCAL_SPELLINGS = [
    ("fe80::1", "fe80::1"),
    ("[fe80::1%25eth0]", "fe80::1"),  # zone id as a URL spells it
    ("fe80::1%25eth0", "fe80::1"),  # ... as yarl's raw_host gives it
    ("fe80::1%eth0", "fe80::1"),
    ("[FE80::1%251]", "fe80::1"),
    ("169.254.0.1", "169.254.0.1"),
]

MULTICAST_SPELLINGS = [
    ("224.0.0.1", "224.0.0.1"),
    ("3758096385", "224.0.0.1"),
    ("0xe0000001", "224.0.0.1"),
    ("0340.0.0.1", "224.0.0.1"),
    ("239.255.255.250", "239.255.255.250"),
    ("ff02::1", "ff02::1"),
    ("[ff02::1%25eth0]", "ff02::1"),
    ("4294967295", "255.255.255.255"),  # broadcast
]

PUBLIC_SPELLINGS = [
    ("8.8.8.8", "8.8.8.8"),
    ("134744072", "8.8.8.8"),
    ("0x8080808", "8.8.8.8"),
    ("0x08080808", "8.8.8.8"),
    ("010.010.010.010", "8.8.8.8"),
    ("01002004010", "8.8.8.8"),
    ("0x8.0x8.0x8.0x8", "8.8.8.8"),
    ("8.8.2056", "8.8.8.8"),
    ("8.526344", "8.8.8.8"),
    ("8.8.8.8.", "8.8.8.8"),
    (_fullwidth("8.8.8.8"), "8.8.8.8"),
    ("1.1.1.1", "1.1.1.1"),
    ("16843009", "1.1.1.1"),
    ("[2606:4700:4700::1111]", "2606:4700:4700::1111"),
    ("::ffff:8.8.8.8", "::ffff:808:808"),
    ("64:ff9b::808:808", "64:ff9b::808:808"),
    ("2002:808:808::1", "2002:808:808::1"),
]

# Read as addresses by browsers (WHATWG URL), not by glibc; vetted as addresses all the same.
WHATWG_ONLY = [
    ("127.0.0.1.", "127.0.0.1"),
    ("127.1.", "127.0.0.1"),
    ("0x7f000001.", "127.0.0.1"),
    ("169.254.169.254.", "169.254.169.254"),
    ("0.0.0.0.", "0.0.0.0"),
    ("8.8.8.8.", "8.8.8.8"),
    ("0x", "0.0.0.0"),  # an empty hex number is 0
    ("0x.1", "0.0.0.1"),
    ("1.0x", "1.0.0.0"),
    ("127.", "0.0.0.127"),
    ("1.2.3.", "1.2.0.3"),
]

# Neither glibc nor a browser reads these as addresses: hostnames (looked up, then vetted).
NOT_LITERALS = [
    "example.com", "EXAMPLE.COM", "localhost", "partner.test", "1.example", "0x.example",
    "0x7f.example", "a.0x7f", "127.0.0.1.nip.io", "1e100.net", "cafe", "deadbeef", "0xg",
    "0x7g.0.0.1", "xn--nxasmq6b.com",
    # out of range: glibc refuses, so getaddrinfo looks the text up as a name
    "256.1.1.1", "1.256.1.1", "1.2.3.256", "4294967296", "0x100000000", "1.16777216",
    "1.2.65536", "99999999999", "0" * 20 + "40000000000",
    # not numbers: a non-octal digit after a leading 0, signs, exponents, non-ASCII digits
    "08.0.0.1", "09", "0128", "+1", "-1", "1e1", "١٢٧.0.0.1", "१२७.0.0.1",
    # wrong shape
    "1.2.3.4.5", "1..2", ".1.2.3", "", ".", "..", "127.0.0.1..", " 127.0.0.1", "127.0.0.1 ",
    "127.0.0.1\n", "127.0.0.1:80",
    # not IPv6 either
    "::g", "[::ffff:127.1]", "::ffff:0x7f.0.0.1", "[127.0.0.1", "1:2:3:4:5:6:7:8:9",
]

ALL_SPELLINGS = (
    LOOPBACK_SPELLINGS + PRIVATE_SPELLINGS + METADATA_SPELLINGS + UNSPECIFIED_SPELLINGS
    + LINK_LOCAL_SPELLINGS + MULTICAST_SPELLINGS + PUBLIC_SPELLINGS + WHATWG_ONLY
)
REFUSED_SPELLINGS = (
    LOOPBACK_SPELLINGS + PRIVATE_SPELLINGS + METADATA_SPELLINGS + UNSPECIFIED_SPELLINGS
    + LINK_LOCAL_SPELLINGS + MULTICAST_SPELLINGS
)


@pytest.mark.parametrize(("host", "expected"), ALL_SPELLINGS)
def test_literal_address_reads_every_spelling(host: str, expected: str) -> None:
    assert literal_address(host) == ip_address(expected)


@pytest.mark.parametrize("host", NOT_LITERALS)
def test_literal_address_is_none_for_hostnames_and_non_literals(host: str) -> None:
    assert literal_address(host) is None


@pytest.mark.parametrize(("host", "expected"), ALL_SPELLINGS)
def test_literal_address_is_case_insensitive(host: str, expected: str) -> None:
    assert literal_address(host.upper()) == ip_address(expected)
    assert literal_address(host.lower()) == ip_address(expected)


def test_literal_address_drops_the_zone_id() -> None:
    address = literal_address("[fe80::1%25eth0]")
    assert isinstance(address, IPv6Address)
    assert address.scope_id is None


def _glibc_ipv4(host: str) -> str | None:
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
_IPV4_ROWS = [(h, e) for h, e in ALL_SPELLINGS if ":" not in h and h.isascii() and "%" not in h]


@pytest.mark.skipif(not _GLIBC, reason="the truth table is glibc's inet_aton")
@pytest.mark.parametrize(("host", "expected"), _IPV4_ROWS)
def test_ipv4_spellings_agree_with_glibc_except_the_whatwg_extras(host: str,
                                                                  expected: str) -> None:
    glibc = _glibc_ipv4(host)
    if (host, expected) in WHATWG_ONLY:
        assert glibc is None
    else:
        assert glibc == expected
        numeric = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
        assert {info[4][0] for info in numeric} == {expected}


@pytest.mark.skipif(not _GLIBC, reason="the truth table is glibc's inet_aton")
@pytest.mark.parametrize("host", [h for h in NOT_LITERALS if h.isascii() and h.strip() == h])
def test_non_literals_are_not_numeric_hosts_to_glibc(host: str) -> None:
    with pytest.raises((socket.gaierror, UnicodeError)):
        socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)


# --- refusal_for_url ---------------------------------------------------------------------


@pytest.mark.parametrize(("host", "expected"), REFUSED_SPELLINGS)
def test_refusal_for_url_refuses_every_spelling_of_a_non_public_address(host: str,
                                                                       expected: str) -> None:
    url_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    reason = refusal_for_url(f"http://{url_host}:8080/hook")
    assert reason is not None
    assert str(ip_address(expected)) in reason
    assert "WEBHOOKS_ALLOWED_NETWORKS" in reason
    assert "\n" not in reason


@pytest.mark.parametrize(("host", "expected"), PUBLIC_SPELLINGS)
def test_refusal_for_url_accepts_every_spelling_of_a_public_address(host: str,
                                                                    expected: str) -> None:
    url_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    assert refusal_for_url(f"https://{url_host}/hook") is None


@pytest.mark.parametrize("host", ["example.com", "partner.test", "localhost", "1.example",
                                  "0x.example", "256.1.1.1", "4294967296"])
def test_refusal_for_url_leaves_hostnames_to_the_resolver(host: str) -> None:
    assert refusal_for_url(f"https://{host}/hook") is None


@pytest.mark.parametrize(("host", "expected"), LOOPBACK_SPELLINGS)
def test_refusal_for_url_accepts_a_literal_inside_an_allowed_network(host: str,
                                                                    expected: str) -> None:
    url_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{url_host}/hook"
    allowed = [ip_network("127.0.0.0/8"), ip_network("::1/128"), ip_network("::/96"),
               ip_network("64:ff9b::/96"), ip_network("2002::/16")]
    assert refusal_for_url(url, allowed) is None
    assert refusal_for_url(url, [ip_network("10.0.0.0/8")]) is not None


@pytest.mark.parametrize(("host", "expected"), METADATA_SPELLINGS)
def test_allowing_loopback_does_not_open_cloud_metadata(host: str, expected: str) -> None:
    url_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    reason = refusal_for_url(f"http://{url_host}/latest/meta-data/", LOOPBACK_V4)
    assert reason is not None
    assert "metadata" in reason


def test_refusal_for_url_says_what_the_host_is_and_how_to_allow_it() -> None:
    assert refusal_for_url("http://127.1/") == (
        "host '127.1' is 127.0.0.1, a non-public address (loopback); allow its network with "
        "WEBHOOKS_ALLOWED_NETWORKS to use it"
    )
    assert refusal_for_url("http://10.0.0.1:80/x") == (
        "host '10.0.0.1' is a non-public address (private); allow its network with "
        "WEBHOOKS_ALLOWED_NETWORKS to use it"
    )


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://0x7f.1/", "127.0.0.1, a non-public address (loopback)"),
    ("http://2852039166/", "(link-local, the cloud metadata service)"),
    ("http://0/", "0.0.0.0, a non-public address (unspecified)"),
    ("http://224.1/", "224.0.0.1, a non-public address (multicast)"),
    ("http://[::ffff:127.0.0.1]/", "(loopback, carries 127.0.0.1)"),
    ("http://[fe80::1%25eth0]/", "fe80::1, a non-public address (link-local)"),
    ("http://100.64.0.1/", "(shared, carrier-grade NAT)"),
    ("http://240.0.0.1/", "(reserved)"),
])
def test_refusal_for_url_names_the_class_of_address(url: str, fragment: str) -> None:
    assert fragment in (refusal_for_url(url) or "")


@pytest.mark.parametrize("url", [
    "http://user:pw@0x7f.1:8080/x?y=1",
    "HTTP://0X7F.1/",
    f"https://{_fullwidth('127.0.0.1')}/",
    "http://127。0。0。1/",
    "http://%31%32%37.0.0.1/",
    "http://127.0.0.1./",
])
def test_refusal_for_url_reads_the_host_as_yarl_does(url: str) -> None:
    assert refusal_for_url(url) is not None


@pytest.mark.parametrize("url", ["http://evil.example\\@127.0.0.1/", "http://[::1/",
                                 "http://127.0.0.1:99999/"])
def test_refusal_for_url_refuses_what_yarl_cannot_parse(url: str) -> None:
    reason = refusal_for_url(url)
    assert reason is not None
    assert reason.startswith("URL cannot be parsed")


def test_refusal_for_url_has_nothing_to_say_without_a_host() -> None:
    assert refusal_for_url("http:///hook") is None
    assert refusal_for_url("/hook") is None


def test_refusal_for_url_accepts_allowed_networks_as_any_iterable() -> None:
    nets = (ip_network(n) for n in ("192.168.0.0/16", "127.0.0.0/8"))
    assert refusal_for_url("http://2130706433/", nets) is None


# --- address_class, refused_addresses, describe_refusal ----------------------------------


@pytest.mark.parametrize(("address", "expected"), [
    ("8.8.8.8", "public"),
    ("2606:4700:4700::1111", "public"),
    ("127.0.0.1", "loopback"),
    ("127.255.0.1", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.31.0.1", "private"),
    ("192.168.0.1", "private"),
    ("169.254.169.254", "link-local, the cloud metadata service"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("100.64.0.1", "shared, carrier-grade NAT"),
    ("192.0.2.1", "documentation"),
    ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("fd12::1", "unique-local, private"),
    ("fd00:ec2::254", "unique-local, the cloud metadata service"),
    ("fec0::1", "site-local, deprecated"),
    ("::7f00:1", "IPv4-compatible, deprecated"),
    ("100::1", "discard-only"),
    ("64:ff9b:1::1", "NAT64 local-use"),
    ("192.0.0.1", "special-purpose"),
    ("::ffff:127.0.0.1", "loopback, carries 127.0.0.1"),
    ("::ffff:8.8.8.8", "public, carries 8.8.8.8"),
    ("64:ff9b::a00:1", "private, carries 10.0.0.1"),
    ("2002:a9fe:a9fe::", "link-local, the cloud metadata service, carries 169.254.169.254"),
])
def test_address_class_names_the_kind_of_address(address: str, expected: str) -> None:
    assert address_class(ip_address(address)) == expected


@pytest.mark.parametrize("address", PUBLIC)
def test_address_class_of_public_addresses_is_public(address: str) -> None:
    assert address_class(ip_address(address)).startswith("public")


@pytest.mark.parametrize("address", NOT_PUBLIC + IPV4_COMPATIBLE)
def test_address_class_of_non_public_addresses_is_never_public(address: str) -> None:
    assert not address_class(ip_address(address)).startswith("public")


def test_refused_addresses_keeps_order_drops_repeats_and_allowed() -> None:
    answer = ["8.8.8.8", "127.0.0.1", "10.0.0.1", "127.0.0.1", ip_address("10.0.0.1"), "::1"]
    assert refused_addresses(answer) == ("127.0.0.1", "10.0.0.1", "::1")
    assert refused_addresses(answer, LOOPBACK_V4) == ("10.0.0.1", "::1")
    assert refused_addresses(["8.8.8.8", "2606:4700:4700::1111"]) == ()
    assert refused_addresses([]) == ()


def test_refused_addresses_refuses_text_that_is_not_an_address() -> None:
    assert refused_addresses(["8.8.8.8", "not-an-ip", ""]) == ("not-an-ip", "")


def test_refused_addresses_honours_zone_ids() -> None:
    assert refused_addresses(["fe80::1%eth0"]) == ("fe80::1%eth0",)
    assert refused_addresses(["fe80::1%eth0"], [ip_network("fe80::/10")]) == ()


def test_describe_refusal_for_a_resolved_host_lists_every_refused_address() -> None:
    assert describe_refusal("partner.test", ["127.0.0.1"]) == (
        "host 'partner.test' resolves to 127.0.0.1, a non-public address (loopback); allow "
        "its network with WEBHOOKS_ALLOWED_NETWORKS to use it"
    )
    assert describe_refusal("partner.test", ["127.0.0.1", "169.254.169.254", "junk"]) == (
        "host 'partner.test' resolves to non-public addresses 127.0.0.1 (loopback), "
        "169.254.169.254 (link-local, the cloud metadata service), junk (not an IP address); "
        "allow their networks with WEBHOOKS_ALLOWED_NETWORKS to use them"
    )


def test_describe_refusal_for_a_literal_host_says_what_it_is() -> None:
    assert describe_refusal("0x7f.1", [ip_address("127.0.0.1")]).startswith(
        "host '0x7f.1' is 127.0.0.1, a non-public address (loopback);"
    )
    assert describe_refusal("::1", ["::1"]).startswith(
        "host '::1' is a non-public address (loopback);"
    )
