"""A resolver that vets every address of a host before aiohttp may dial any of them.

A host whose DNS answer holds any refused address is refused as a whole, and the addresses
returned are exactly the ones vetted: aiohttp dials them without a second lookup, so a DNS
answer that changes between check and connect (rebinding) cannot slip through.

aiohttp's TCPConnector consults a resolver only for hosts that are not all digits and dots
and hold no ':' (see aiohttp.helpers.is_ip_address): canonical IPv4 and IPv6 literals are
dialled as written, other all-digit forms (127.1, 2130706433) are refused as invalid URLs.
Those never reach this class; the connector's socket factory and `refusal_for_url` cover them.
An exception raised here reaches `session.post()` as aiohttp.ClientConnectorDNSError whose
`os_error` (and `__cause__`) is the HostBlocked raised.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from worker.core.errors import HostBlocked
from worker.core.netpolicy import (
    IPAddress,
    IPNetwork,
    describe_refusal,
    literal_address,
    refused_addresses,
)

# What aiohttp's own resolvers put in `flags`: the host and port are numeric already.
_NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
# getaddrinfo's code for "a literal of the other family"; not every platform names it.
_EAI_ADDRFAMILY: int = getattr(socket, "EAI_ADDRFAMILY", socket.EAI_FAMILY)


class VettingResolver(AbstractResolver):
    """Resolves through `inner` (aiohttp's default if None) and refuses disallowed answers."""

    def __init__(
        self, allowed: Sequence[IPNetwork] = (), inner: AbstractResolver | None = None
    ) -> None:
        self._allowed = tuple(allowed)
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The addresses to dial for `host`; raises HostBlocked if any of them is refused."""
        literal = literal_address(host)
        if literal is not None:
            # An IP literal in any spelling is vetted as the address it denotes, not looked up.
            self._vet(host, [literal])
            return [_literal_result(host, literal, port, family)]
        if self._inner is None:
            # Created on first use: aiohttp's resolvers need the running loop.
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        self._vet(host, [result["host"] for result in results])
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()

    def _vet(self, host: str, addresses: Sequence[str | IPAddress]) -> None:
        refused = refused_addresses(addresses, self._allowed)
        if refused:
            raise HostBlocked(host, refused, describe_refusal(host, refused))


def _literal_result(
    host: str, address: IPAddress, port: int, family: socket.AddressFamily
) -> ResolveResult:
    address_family = _FAMILIES[address.version]
    if family not in (socket.AF_UNSPEC, address_family):
        raise socket.gaierror(_EAI_ADDRFAMILY, f"{host} is an IPv{address.version} address")
    return ResolveResult(
        hostname=host,
        host=str(address),
        port=port,
        family=address_family,
        proto=0,
        flags=_NUMERIC_FLAGS,
    )
