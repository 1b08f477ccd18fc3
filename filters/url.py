"""URL checks run on every input row before anything is fetched.

This is an early, cheap refusal of what is visibly unfetchable: no URL, a scheme other than http(s),
a malformed host, or a host written as an address the policy refuses (any numeric form the
resolver would accept, percent-encoded or not). It is not the address guard: host names are not
resolved here, and redirects are not seen. The guard runs at connect time, on every hop, in
`filters/web/fetch.py`.
"""
from __future__ import annotations

import ipaddress

from filters.web.address import BLOCKED_ADDRESS, AddressPolicy, IPAddress, literal_address
from filters.web.fetch import Refused, parse_target

_LOOPBACK = ipaddress.ip_address("127.0.0.1")


def host_address(host: str) -> IPAddress | None:
    """The address a host stands for without DNS: an address in any written form, or `localhost`
    (which resolvers answer themselves). None for other names."""
    if host == "localhost" or host.endswith(".localhost"):
        return _LOOPBACK
    return literal_address(host)


def url_reason(url: object, policy: AddressPolicy | None = None) -> str | None:
    """Why a URL cannot be fetched (`empty_url`, `malformed_url`, `unsupported_scheme`,
    `blocked_address`), or None when it goes on to the download (and its guard)."""
    if url is None or not isinstance(url, str) or not url.strip():
        return "empty_url"
    try:
        target = parse_target(url)
    except Refused as refused:
        return refused.reason
    policy = policy or AddressPolicy()
    metadata_name = policy.is_metadata_host(target.host)
    address = host_address(target.host)
    if address is not None and policy.refusal(address, metadata_name=metadata_name):
        return BLOCKED_ADDRESS
    if address is None and metadata_name and not policy.opens_sensitive_network():
        return BLOCKED_ADDRESS
    return None
