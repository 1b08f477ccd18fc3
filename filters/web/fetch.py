"""One image download from the hostile web: guarded at connect time, bounded in time and bytes.

What urllib (img2dataset's fetcher) cannot do, and this does:
- every hop (the first request and each redirect) resolves its host once, checks every address it
  resolves to against the `AddressPolicy`, and connects to the checked address itself, so a name
  that answers differently a second time (DNS rebinding) cannot slip past the check;
- host names are percent-decoded and IDNA-encoded before any check, IRIs percent-encoded;
- `timeout` bounds one connect or one read, `deadline` the whole download, checked before every
  read so a server dripping one byte at a time cannot hold a thread past it;
- the body is streamed and refused as soon as it passes `max_body_bytes` (a Content-Length above
  it is refused before reading); gzip and deflate bodies are inflated only up to that cap;
- the outcome is a reason code (`blocked_address`, `deadline_exceeded`, `too_large`, `http_404`...)
  with a flag saying whether a retry can help.

Host names are resolved by the system resolver (`socket.getaddrinfo`), whose own timeout
(resolv.conf `options timeout:N attempts:N`) bounds a lookup; `hosts` adds static entries first
(as curl's `--resolve`), which the policy checks like any resolved address.
"""
from __future__ import annotations

import email.utils
import http.client
import io
import ipaddress
import socket
import ssl
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping
from urllib.parse import quote, unquote, urljoin, urlsplit

import idna

from filters.web.address import (BLOCKED_ADDRESS, AddressPolicy, IPAddress, canonical_address,
                                  literal_address)

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_READ_CHUNK = 64 * 1024
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
# Reasons a later attempt can change: the network or an overloaded server. A deadline passed by a
# slow server, a 404, a refused address or an oversized body will be the same next time.
_TRANSIENT = {"timeout", "connection_error", "connection_refused", "incomplete_body", "http_429"}
BROWSER_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"

Resolver = Callable[[str, int], list]


class Refused(Exception):
    """Ends one download with a reason code and a message."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


@dataclass(frozen=True)
class FetchSettings:
    """The guard and the bounds of one download (`download.*` in the run config)."""

    policy: AddressPolicy = field(default_factory=AddressPolicy)
    timeout: float = 10.0                # one connect or one read
    deadline: float = 30.0               # the whole download: every hop, headers and body
    max_body_bytes: int = 16 * 1024 * 1024
    max_redirects: int = 10
    user_agent_token: str | None = None
    disallowed_header_directives: frozenset[str] = frozenset()
    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # static name -> addresses
    resolver: Resolver | None = None     # None: socket.getaddrinfo (tests pass their own)

    @property
    def user_agent(self) -> str:
        if not self.user_agent_token:
            return BROWSER_USER_AGENT
        return f"{BROWSER_USER_AGENT} (compatible; {self.user_agent_token}; +https://github.com/rom1504/img2dataset)"


@dataclass
class FetchResult:
    """The body, or why there is none; where the download ended and how many redirects it took."""

    url: str
    final_url: str | None = None
    redirects: int = 0
    body: bytes | None = None
    reason: str | None = None
    detail: str = ""
    status: int | None = None
    retry_after: float | None = None
    attempts: int = 1

    @property
    def transient(self) -> bool:
        return self.reason in _TRANSIENT or (self.reason or "").startswith("http_5")

    @property
    def error_message(self) -> str | None:
        return None if self.reason is None else f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str          # ASCII: percent-decoded, IDNA-encoded, lower case
    port: int
    request_path: str  # percent-encoded path and query
    url: str           # the URL as it is fetched

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def parse_target(url: str) -> _Target:
    """The URL as this fetcher requests it; `Refused` for what cannot be fetched."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
        raw_host = parts.hostname
    except ValueError as err:
        raise Refused("malformed_url", str(err)) from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise Refused("malformed_url", "no scheme")
    if scheme not in _DEFAULT_PORTS:
        raise Refused("unsupported_scheme", f"{scheme or 'no'} scheme")
    if not raw_host:
        raise Refused("malformed_url", "no host")
    try:
        host = unquote(raw_host, errors="strict").strip().lower().rstrip(".")
    except UnicodeDecodeError:
        raise Refused("malformed_url", f"host {raw_host!r} is not UTF-8 when decoded") from None
    address = literal_address(host)
    if address is not None:
        host = str(canonical_address(address))  # `2130706433`, `[::ffff:7f00:1]` -> 127.0.0.1
    elif not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as err:
            raise Refused("malformed_url", f"host {raw_host!r}: {err}") from None
    if not host or any(ch in host for ch in "/\\@%?#") or any(ch.isspace() for ch in host):
        raise Refused("malformed_url", f"host {raw_host!r}")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_QUERY_SAFE)
    netloc_host = f"[{host}]" if ":" in host else host
    netloc = netloc_host if port is None else f"{netloc_host}:{port}"
    return _Target(scheme, host, port or _DEFAULT_PORTS[scheme], path, f"{scheme}://{netloc}{path}")


class _Clock:
    """The per-read timeout and the whole-download deadline, as one wait per socket call."""

    def __init__(self, timeout: float, deadline: float):
        self.timeout = timeout
        self.ends = time.monotonic() + deadline

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    def next_wait(self) -> float:
        left = self.remaining()
        if left <= 0:
            raise Refused("deadline_exceeded", "the download's deadline passed")
        return min(self.timeout, left)

    def timed_out(self) -> Refused:
        if self.remaining() <= 0.001:
            return Refused("deadline_exceeded", "the download's deadline passed")
        return Refused("timeout", f"no data for {self.timeout:g} s")


class _BoundedReader(io.RawIOBase):
    """The socket as http.client reads it: every recv waits at most what the clock allows."""

    def __init__(self, sock: socket.socket, clock: _Clock):
        self.sock, self.clock = sock, clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(self.clock.next_wait())
        try:
            return self.sock.recv_into(buffer)
        except socket.timeout:
            raise self.clock.timed_out() from None

    def close(self) -> None:
        if not self.closed:
            self.sock.close()
        super().close()


class _BoundedSocket:
    """What http.client needs of a connected socket (sendall, makefile, close), under the clock.

    http.client closes the connection as soon as a response says it will close, while the
    response still reads its body: as with a real socket's makefile, the reader then owns the
    socket and closes it."""

    def __init__(self, sock: socket.socket, clock: _Clock):
        self.sock, self.clock = sock, clock
        self.reader: _BoundedReader | None = None

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.clock.next_wait())
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise self.clock.timed_out() from None

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        self.reader = _BoundedReader(self.sock, self.clock)
        return io.BufferedReader(self.reader, _READ_CHUNK)

    def close(self) -> None:
        if self.reader is None:
            self.sock.close()


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:  # one per process: loading the CA bundle costs milliseconds
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


_SSL_CONTEXT: ssl.SSLContext | None = None


def _resolve(target: _Target, settings: FetchSettings) -> list[IPAddress]:
    literal = literal_address(target.host)
    if literal is not None:
        return [literal]
    if target.host in settings.hosts:
        return [ipaddress.ip_address(a) for a in settings.hosts[target.host]]
    resolver = settings.resolver or (lambda host, port: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    try:
        infos = resolver(target.host, target.port)
    except (socket.gaierror, UnicodeError) as err:
        raise Refused("dns_error", f"{target.host}: {err}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise Refused("dns_error", f"{target.host}: no address")
    return addresses


def _connect(target: _Target, settings: FetchSettings, clock: _Clock) -> socket.socket:
    """Resolve once, check every address, connect to a checked one (no second lookup)."""
    addresses = _resolve(target, settings)
    metadata_name = settings.policy.is_metadata_host(target.host)
    for address in addresses:
        refusal = settings.policy.refusal(address, metadata_name=metadata_name)
        if refusal is not None:
            raise Refused(BLOCKED_ADDRESS, f"{target.host}: {refusal}")
    error: Refused | None = None
    for address in addresses:
        try:
            sock = socket.create_connection((str(address), target.port), timeout=clock.next_wait())
        except ConnectionRefusedError as err:
            error = Refused("connection_refused", f"{address}:{target.port}: {err}")
            continue
        except socket.timeout:
            error = clock.timed_out()
            continue
        except OSError as err:
            error = Refused("connection_error", f"{address}:{target.port}: {err}")
            continue
        if target.scheme == "https":
            try:
                sock.settimeout(clock.next_wait())
                sock = _ssl_context().wrap_socket(sock, server_hostname=target.host)
            except socket.timeout:
                sock.close()
                raise clock.timed_out() from None
            except (ssl.SSLError, OSError) as err:
                sock.close()
                raise Refused("tls_error", f"{target.host}: {err}") from None
        return sock
    assert error is not None
    raise error


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The body, streamed; refused as soon as it (or its inflated form) passes `limit` bytes."""
    declared = response.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > limit:
        raise Refused("too_large", f"Content-Length {declared} > {limit} bytes")
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
    elif encoding in ("", "identity"):
        inflater = None
    else:
        raise Refused("unsupported_encoding", f"Content-Encoding {encoding}")
    chunks: list[bytes] = []
    size = 0
    while True:
        data = response.read1(_READ_CHUNK)
        if not data:
            break
        if inflater is not None:
            try:
                data = inflater.decompress(data, limit - size + 1)
            except zlib.error as err:
                raise Refused("bad_encoding", f"{encoding}: {err}") from None
            if inflater.unconsumed_tail:
                raise Refused("too_large", f"inflated body over {limit} bytes")
        size += len(data)
        if size > limit:
            raise Refused("too_large", f"body over {limit} bytes")
        chunks.append(data)
    if response.length:  # http.client counts down a Content-Length; the server closed early
        raise Refused("incomplete_body", f"connection closed {response.length} bytes early")
    return b"".join(chunks)


def _request_once(target: _Target, settings: FetchSettings, clock: _Clock):
    sock = _connect(target, settings, clock)
    connection = http.client.HTTPConnection(target.host, target.port)
    connection.sock = _BoundedSocket(sock, clock)  # http.client uses it and never connects itself
    try:
        return connection, _send_request(connection, target, settings)
    except BaseException:
        connection.close()
        raise


def _send_request(connection: http.client.HTTPConnection, target: _Target,
                  settings: FetchSettings) -> http.client.HTTPResponse:
    connection.putrequest("GET", target.request_path, skip_host=True, skip_accept_encoding=True)
    connection.putheader("Host", target.host_header)
    connection.putheader("User-Agent", settings.user_agent)
    connection.putheader("Accept", "image/*,*/*;q=0.8")
    connection.putheader("Accept-Encoding", "identity")
    connection.putheader("Connection", "close")
    connection.endheaders()
    return connection.getresponse()


def robots_disallowed(headers, token: str | None, directives: frozenset[str]) -> bool:
    """Whether an `X-Robots-Tag` header (`noai`, or `filip-corpus: noai, noindex`) names one of
    `directives` for every user agent or for ours (img2dataset's reading of the header; its own
    function is not imported because that module pulls in its whole resizing stack)."""
    for value in headers.get_all("X-Robots-Tag") or []:
        agent, colon, listed = value.partition(":")
        if not colon:
            agent, listed = "", value
        if agent.strip() and agent.strip().lower() != token:
            continue
        if any(item.strip().lower() in directives for item in listed.split(",")):
            return True
    return False


def fetch(url: str, settings: FetchSettings) -> FetchResult:
    """One download attempt of `url`, following redirects, each hop guarded and the whole bounded."""
    result = FetchResult(url=url)
    clock = _Clock(settings.timeout, settings.deadline)
    seen: set[str] = set()
    try:
        target = parse_target(url)
        while True:
            result.final_url = target.url
            seen.add(target.url)
            connection, response = _request_once(target, settings, clock)
            try:
                result.status = response.status
                if response.status in REDIRECT_STATUSES and response.getheader("Location"):
                    location = response.getheader("Location")
                    next_target = parse_target(urljoin(target.url, location.strip()))
                    if next_target.url in seen:
                        raise Refused("redirect_loop", f"{next_target.url} again after "
                                                        f"{result.redirects} redirects")
                    result.redirects += 1
                    if result.redirects > settings.max_redirects:
                        raise Refused("too_many_redirects", f"more than {settings.max_redirects}")
                    target = next_target
                    continue
                if not 200 <= response.status < 300:
                    raise Refused(f"http_{response.status}", response.reason or "",
                                   _retry_after(response.getheader("Retry-After")))
                if robots_disallowed(response.headers, settings.user_agent_token,
                                  settings.disallowed_header_directives):
                    raise Refused("robots_optout", "X-Robots-Tag disallows this use")
                result.body = _read_body(response, settings.max_body_bytes)
                return result
            finally:
                response.close()
                connection.close()
    except Refused as refused:
        result.reason, result.detail, result.retry_after = refused.reason, refused.detail, refused.retry_after
    except socket.timeout:
        refused = clock.timed_out()
        result.reason, result.detail = refused.reason, refused.detail
    except (http.client.HTTPException, ConnectionError, ssl.SSLError, OSError) as err:
        result.reason, result.detail = "connection_error", f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - one server's oddity must not end the whole shard
        result.reason, result.detail = "download_error", f"{type(err).__name__}: {err}"[:500]
    return result


def fetch_with_retries(url: str, settings: FetchSettings, retries: int, max_retry_wait: float,
                       sleep: Callable[[float], None] = time.sleep) -> FetchResult:
    """`fetch`, again after a transient failure only (timeouts, connection errors, 429, 5xx), at
    most `retries` times. A Retry-After header is waited for when it is at most `max_retry_wait`
    seconds; a longer one ends the download (the thread is worth more than that row)."""
    for attempt in range(retries + 1):
        result = fetch(url, settings)
        result.attempts = attempt + 1
        if result.reason is None or not result.transient or attempt == retries:
            return result
        wait = result.retry_after if result.retry_after is not None else min(0.5 * 2 ** attempt, max_retry_wait)
        if wait > max_retry_wait:
            result.detail += f" (Retry-After {wait:g} s > download.max_retry_wait)"
            return result
        sleep(wait)
    return result
