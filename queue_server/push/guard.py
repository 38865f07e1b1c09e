"""Address checks for push deliveries (protection against SSRF).

An endpoint's host name is resolved once per delivery, every address it
resolves to is checked, and the connection is pinned to the first one, so a
name cannot pass the check with one address and connect to another.

Rules, in order:

1. Link-local addresses (169.254.0.0/16, fe80::/10), the cloud metadata
   addresses (169.254.169.254, fd00:ec2::254, 100.100.100.200) and the metadata
   host names (``metadata.google.internal`` and others) are always rejected,
   as are unspecified, multicast and broadcast addresses.
2. Globally routable addresses are allowed.
3. Every other address (loopback, private, shared CGNAT and reserved ranges)
   is allowed only inside a network the operator lists in
   ``QUEUE_PUSH_ALLOWED_NETWORKS``. It is also allowed when the endpoint's host
   name is listed in ``QUEUE_PUSH_ALLOWED_HOSTS`` (exact names, such as a
   Kubernetes Service's ``collector.ns.svc``).

The resolver is a constructor argument, so tests replace DNS with a table and
never connect to the addresses under test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_REJECTED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), why)
    for cidr, why in (
        ("169.254.169.254/32", "a cloud metadata address"),
        ("fd00:ec2::254/128", "a cloud metadata address"),
        ("100.100.100.200/32", "a cloud metadata address"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("0.0.0.0/8", "unspecified"),
        ("::/128", "unspecified"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
    )
)

#: Host names of cloud metadata services, rejected before any lookup.
METADATA_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
    }
)


class EndpointRejected(Exception):
    """An endpoint whose host is, or resolves to, an address deliveries may not reach."""


class ResolutionFailed(Exception):
    """An endpoint's host name could not be resolved."""


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]:
        """Return the IP addresses of ``host`` as strings; raise ``OSError`` when it has none."""
        ...


class SystemResolver:
    """Resolves names with the operating system's resolver (``getaddrinfo``)."""

    async def resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


class StaticResolver:
    """Resolves names from a fixed table (for tests and examples); unknown names fail."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self.table = {host.lower(): list(addresses) for host, addresses in table.items()}
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        addresses = self.table.get(host.lower())
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r} is not in the test resolver's table")
        return addresses


@dataclass(frozen=True, slots=True)
class PinnedEndpoint:
    """An endpoint URL and the one address its delivery connects to."""

    url: str
    scheme: str
    host: str
    port: int
    address: IPAddress

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def connect_url(self) -> str:
        """The endpoint URL with its host replaced by the pinned address."""
        parts = urlsplit(self.url)
        address = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        path = parts.path or "/"
        query = f"?{parts.query}" if parts.query else ""
        return f"{self.scheme}://{address}:{self.port}{path}{query}"


def parse_networks(entries: Iterable[str]) -> list[IPNetwork]:
    """Parse CIDRs such as ``10.0.0.0/8`` or single addresses; raise ``ValueError`` naming the bad one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not a CIDR network such as 10.0.0.0/8 or fd00::/8") from exc
    return networks


class EndpointGuard:
    """Checks endpoint addresses and resolves endpoints to one pinned, allowed address."""

    def __init__(
        self,
        *,
        allowed_networks: Sequence[IPNetwork] = (),
        allowed_hosts: Iterable[str] = (),
        resolver: Resolver | None = None,
    ) -> None:
        self.allowed_networks = list(allowed_networks)
        self.allowed_hosts = frozenset(normalize_host(host) for host in allowed_hosts)
        self.resolver: Resolver = resolver or SystemResolver()

    def rejection(self, address: IPAddress, *, host: str | None = None) -> str | None:
        """Return why deliveries may not connect to ``address``, or ``None`` when they may.

        ``host`` is the name the address was resolved from. A name in
        ``allowed_hosts`` may resolve to any address that is not always rejected.
        """
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for network, why in ALWAYS_REJECTED_NETWORKS:
            if address.version == network.version and address in network:
                return f"{why} and always rejected"
        if address.is_global:
            return None
        if host is not None and host in self.allowed_hosts:
            return None
        if any(address.version == n.version and address in n for n in self.allowed_networks):
            return None
        return (
            "not globally routable (loopback, private or reserved) and outside "
            "QUEUE_PUSH_ALLOWED_NETWORKS; add its network there, or its host name to "
            "QUEUE_PUSH_ALLOWED_HOSTS, to allow it"
        )

    async def pin(self, url: str) -> PinnedEndpoint:
        """Resolve ``url``'s host and return it pinned to its first address.

        Raises ``EndpointRejected`` when the host is a metadata name or any of
        its addresses is rejected, and ``ResolutionFailed`` when it does not resolve.
        """
        parts = urlsplit(url)
        host = normalize_host(parts.hostname or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if host in METADATA_HOSTNAMES:
            raise EndpointRejected(f"endpoint host {host!r} is a cloud metadata service and always rejected")

        literal = _ip_literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                found = await self.resolver.resolve(host, port)
            except OSError as exc:
                raise ResolutionFailed(f"endpoint host {host!r} could not be resolved: {exc}") from exc
            addresses = [ipaddress.ip_address(text.split("%", 1)[0]) for text in found]
            if not addresses:
                raise ResolutionFailed(f"endpoint host {host!r} resolved to no address")

        for address in addresses:
            why = self.rejection(address, host=None if literal is not None else host)
            if why is not None:
                via = "" if literal is not None else f" (resolved from {host!r})"
                raise EndpointRejected(f"endpoint address {str(address)!r}{via} is {why}")
        return PinnedEndpoint(url, parts.scheme, host, port, addresses[0])


def normalize_host(host: str) -> str:
    """Return a host name in the form the allowlist compares: lower case, no trailing dot."""
    return host.strip().rstrip(".").lower()


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
