"""Which addresses a delivery may dial: public ones, plus explicitly allowed networks."""

from __future__ import annotations

import ipaddress
import unicodedata
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, Teredo), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def is_public(address: IPAddress) -> bool:
    """True for globally routable unicast addresses only."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            return is_public(inner)
        # ::/8 holds the deprecated IPv4-compatible block; fec0::/10 is old site-local.
        if address in _NAT64_LOCAL or address.is_reserved or address.is_site_local:
            return False
    return address.is_global and not address.is_multicast


def is_allowed(address: str | IPAddress, allowed: Iterable[IPNetwork] = ()) -> bool:
    """May a delivery connect to `address`? Allowed networks win over the public-only rule."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates: tuple[IPAddress, ...] = (ip, ip.ipv4_mapped)
    else:
        candidates = (ip,)
    for network in allowed:
        if any(c.version == network.version and c in network for c in candidates):
            return True
    return is_public(ip)


# --- literal addresses in every spelling -------------------------------------------------
#
# A URL host is an IPv4 literal when the resolver (glibc inet_aton, which getaddrinfo uses for
# numeric hosts) or a browser (the WHATWG URL standard) reads it as one. Both accept 1 to 4
# dot-separated parts, each decimal, 0-prefixed octal or 0x-prefixed hex; all but the last
# part are one byte, the last fills the remaining bytes (so 127.1 is 127.0.0.1 and
# 2130706433 is 127.0.0.1). Out-of-range parts (256.1.1.1, 4294967296), non-octal digits after
# a leading 0 (08.0.0.1) and non-ASCII digits make both refuse a literal: glibc then looks the
# text up as a name, so it is a hostname here too, and its DNS answer is what gets vetted.
# Where the two differ we take the union, since a literal is vetted without DNS:
# WHATWG also accepts one trailing dot (127.0.0.1.) and an empty hex part (0x.1 is 0.0.0.1),
# and maps full-width digits and ideographic dots (as yarl's IDNA step does) and decodes
# percent-escapes before parsing.

# Ideographic and full-width full stops: IDNA (UTS 46) maps them to "." before parsing.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_DECIMAL = frozenset("0123456789")
_OCTAL = frozenset("01234567")
_HEX = frozenset("0123456789abcdef")
# A decimal part this long is above 2**32 - 1 anyway; the bound also keeps int() cheap.
_MAX_DECIMAL_DIGITS = 10


def _ipv4_part(part: str) -> int | None:
    """One lower-cased part as inet_aton / WHATWG read it, or None if it is not a number."""
    if part.startswith("0x"):
        digits = part[2:]
        if not set(digits) <= _HEX:
            return None
        return int(digits, 16) if digits else 0
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8) if set(part) <= _OCTAL else None
    if part and set(part) <= _DECIMAL and len(part) <= _MAX_DECIMAL_DIGITS:
        return int(part)
    return None


def _ipv4_literal(text: str) -> ipaddress.IPv4Address | None:
    if text.endswith("."):
        text = text[:-1]
    parts = text.split(".")
    if len(parts) > 4:
        return None
    numbers: list[int] = []
    for part in parts:
        number = _ipv4_part(part)
        if number is None:
            return None
        numbers.append(number)
    *head, last = numbers
    if any(n > 0xFF for n in head) or last >= 1 << (8 * (5 - len(numbers))):
        return None
    value = last
    for position, number in enumerate(head):
        value |= number << (8 * (3 - position))
    return ipaddress.IPv4Address(value)


def literal_address(host: str) -> IPAddress | None:
    """The IP address `host` spells in any form a resolver or browser accepts, else None.

    Accepts a URL host as yarl or urllib give it (brackets, a `%25` zone id, percent-escapes).
    The zone id of a scoped IPv6 address is dropped: the policy is about the address.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
    text = unquote(host) if "%" in host else host
    text = unicodedata.normalize("NFKC", text).translate(_DOTS).lower()
    return _ipv4_literal(text) if text.isascii() else None


# --- saying why ----------------------------------------------------------------------------

_CLASSES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), label)
    for network, label in (
        ("0.0.0.0/8", "unspecified"),  # Linux dials 0.0.0.0 as this host
        ("127.0.0.0/8", "loopback"),
        ("169.254.169.254/32", "link-local, the cloud metadata service"),
        ("169.254.0.0/16", "link-local"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "shared, carrier-grade NAT"),
        ("255.255.255.255/32", "broadcast"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("192.0.2.0/24", "documentation"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("198.18.0.0/15", "benchmarking"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible, deprecated"),
        ("64:ff9b:1::/48", "NAT64 local-use"),  # inside ::/8, so before it
        ("::/8", "reserved"),
        ("100::/64", "discard-only"),
        ("fd00:ec2::254/128", "unique-local, the cloud metadata service"),
        ("fc00::/7", "unique-local, private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local, deprecated"),
        ("ff00::/8", "multicast"),
        ("2001:db8::/32", "documentation"),
    )
)


def address_class(address: IPAddress) -> str:
    """A short name for the kind of address: 'public', 'loopback', 'private', 'link-local', ..."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            return f"{address_class(inner)}, carries {inner}"
    for network, label in _CLASSES:
        if address.version == network.version and address in network:
            return label
    return "public" if is_public(address) else "special-purpose"


def _parse(address: str | IPAddress) -> IPAddress | None:
    if not isinstance(address, str):
        return address
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None


def refused_addresses(
    addresses: Iterable[str | IPAddress], allowed: Iterable[IPNetwork] = ()
) -> tuple[str, ...]:
    """The addresses `is_allowed` refuses, as text, first occurrence only.

    Text that is no IP address at all is refused too: it cannot be vetted.
    """
    networks = tuple(allowed)
    refused: dict[str, None] = {}
    for address in addresses:
        ip = _parse(address)
        if ip is None or not is_allowed(ip, networks):
            refused[str(address)] = None
    return tuple(refused)


def describe_refusal(host: str, refused: Sequence[str | IPAddress]) -> str:
    """One line: which addresses of `host` are refused, of what kind, and how to allow them."""
    literal = literal_address(host)
    names = []
    for address in refused:
        ip = _parse(address)
        kind = address_class(ip) if ip is not None else "not an IP address"
        names.append((str(address), kind))
    if literal is not None and len(names) == 1:
        text, kind = names[0]
        what = f"host {host!r} is" + ("" if text == host else f" {text},")
        return (f"{what} a non-public address ({kind}); allow its network with "
                f"WEBHOOKS_ALLOWED_NETWORKS to use it")
    if len(names) == 1:
        text, kind = names[0]
        return (f"host {host!r} resolves to {text}, a non-public address ({kind}); allow its "
                f"network with WEBHOOKS_ALLOWED_NETWORKS to use it")
    listed = ", ".join(f"{text} ({kind})" for text, kind in names)
    return (f"host {host!r} resolves to non-public addresses {listed}; allow their networks "
            f"with WEBHOOKS_ALLOWED_NETWORKS to use them")


def refusal_for_url(url: str, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why the policy refuses `url`'s literal-address host, or None (hostname or allowed).

    The host is taken as yarl (hence aiohttp) parses it; a URL yarl cannot parse is refused,
    since what it would dial cannot be known. A URL without a host is validate_url's business.
    """
    try:
        host = URL(url).raw_host
    except (TypeError, ValueError) as exc:
        return f"URL cannot be parsed, so its host cannot be checked: {exc}"
    if host is None:
        return None
    address = literal_address(host)
    if address is None:
        return None
    refused = refused_addresses([address], allowed)
    return describe_refusal(host, refused) if refused else None
