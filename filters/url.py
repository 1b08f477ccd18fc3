"""URL checks run on every input row before anything is fetched.

The address guard refuses URLs that point at the machine itself or at internal networks: a crawler
running on a cloud cluster must not be turned against metadata endpoints or private services by a
URL list. Host names are not resolved here (that would cost a DNS lookup per row); a name that
resolves to a private address is outside what this guard can see.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
# Hosts that glibc's inet_aton accepts as IPv4 (decimal `2130706433`, hex `0x7f.1`, octal, short
# forms): urllib passes them to the resolver, which turns them into addresses.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


def _host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_blocked_host(host: str) -> bool:
    """True for localhost names and IP literals in loopback, private, link-local or reserved ranges."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _host_address(host)
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return bool(
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
        or not address.is_global
    )


def url_reason(url: object, allow_private_networks: bool = False) -> str | None:
    """Why a URL cannot be fetched (`empty_url`, `malformed_url`, `unsupported_scheme`,
    `blocked_address`), or None when it may be downloaded."""
    if url is None or not isinstance(url, str) or not url.strip():
        return "empty_url"
    url = url.strip()
    if any(ch.isspace() for ch in url):
        return "malformed_url"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # raises ValueError on a bad port
    except ValueError:
        return "malformed_url"
    if not parts.scheme:
        return "malformed_url"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return "unsupported_scheme"
    if not host:
        return "malformed_url"
    if not allow_private_networks and is_blocked_host(host):
        return "blocked_address"
    return None
