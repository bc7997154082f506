"""Which addresses a delivery may dial: public ones, plus explicitly allowed networks."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

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
