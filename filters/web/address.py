"""Which network addresses the crawler may connect to.

The check runs where the connection happens (`filters/web/fetch.py` resolves a host, checks every
address it resolves to, then connects to the checked address) and again on every redirect hop. By
default only globally routable addresses are allowed. `allow_networks` opens named networks (the
demo and the tests open `127.0.0.1/32`). Cloud metadata endpoints and link-local networks are
refused even by a wide allowance such as `0.0.0.0/0`: they hand out instance credentials, so only an
entry that lies inside one of them (`169.254.169.254/32`) opens it.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Iterable, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

BLOCKED_ADDRESS = "blocked_address"
# IPv4 in the forms glibc's inet_aton accepts (decimal, hex, octal, short forms).
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)

# Link-local ranges and the metadata services of the large clouds. Some are global addresses
# (Azure's wire server) or sit in ranges a user may open for other reasons (fd00::/8, 100.64/10).
SENSITIVE_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16",      # IPv4 link-local; AWS, GCP, Azure, OCI metadata at 169.254.169.254
    "fe80::/10",           # IPv6 link-local
    "fd00:ec2::254/128",   # AWS metadata over IPv6
    "fd20:ce::254/128",    # GCP metadata over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "168.63.129.16/32",    # Azure wire server
))
# Names that resolve to a metadata service inside a cloud; refused like the addresses above
# whatever they resolve to, so an /etc/hosts entry or a search domain cannot sidestep the list.
METADATA_HOST_NAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "metadata.tencentyun.com", "metadata.azure.internal",
})


def canonical_address(address: IPAddress) -> IPAddress:
    """The IPv4 address behind an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`), else itself."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_sensitive(address: IPAddress) -> bool:
    return any(address.version == net.version and address in net for net in SENSITIVE_NETWORKS)


def _names_sensitive_network(network: IPNetwork) -> bool:
    return any(network.version == s.version and network.subnet_of(s) for s in SENSITIVE_NETWORKS)


def parse_networks(entries: Iterable[str], key: str = "download.allow_networks") -> tuple[IPNetwork, ...]:
    """`["127.0.0.1/32", "10.0.0.0/8"]` as networks; a bad entry raises ValueError naming `key`."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=True))
        except ValueError as err:
            raise ValueError(f"{key}: {entry!r} is not a network in CIDR form ({err})") from None
    return tuple(networks)


@dataclass(frozen=True)
class AddressPolicy:
    """Allowed networks on top of the default (global addresses only, no metadata endpoints)."""

    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_strings(cls, entries: Iterable[str]) -> "AddressPolicy":
        return cls(parse_networks(entries))

    def refusal(self, address: IPAddress, metadata_name: bool = False) -> str | None:
        """Why a connection to `address` is refused (a message), or None when it is allowed.

        `metadata_name`: the host name is a metadata service's; its addresses then count as
        sensitive whatever they are.
        """
        address = canonical_address(address)
        sensitive = metadata_name or _is_sensitive(address)
        for network in self.allow_networks:
            if address.version == network.version and address in network:
                if sensitive and not _names_sensitive_network(network):
                    continue  # a wide allowance does not open metadata endpoints
                return None
        if sensitive:
            return f"{address} is a link-local or cloud metadata address"
        if not address.is_global or address.is_multicast or address.is_reserved:
            return f"{address} is not a public address (allow it with download.allow_networks)"
        return None

    def opens_sensitive_network(self) -> bool:
        return any(_names_sensitive_network(network) for network in self.allow_networks)

    def is_metadata_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in METADATA_HOST_NAMES


def literal_address(host: str) -> IPAddress | None:
    """The address a host written as an address stands for, else None: IP literals (`127.0.0.1`,
    `[::1]`) and every other IPv4 form that resolvers accept through inet_aton (`2130706433`,
    `0x7f.1`, `0177.0.0.1`), so a check never sees a different host than the connection does."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None
