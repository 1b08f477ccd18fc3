"""The fetcher against a hostile web on 127.0.0.1, and a refused listener on 127.0.0.2 that must
never see a connection, whatever way a URL finds to point at it."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from filters.web.address import AddressPolicy
from filters.web.fetch import FetchSettings, fetch, fetch_with_retries, parse_target
from pipeline.testweb import serve_web

ALLOWED = AddressPolicy.from_strings(["127.0.0.1/32"])


class CountingListener:
    """A TCP listener that counts the connections it accepts (and answers none of them)."""

    def __init__(self, host: str):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def refused_listener():
    listener = CountingListener("127.0.0.2")
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetchweb")
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(1000) + b"\xff\xd9")
    (root / "ünïcode bild.jpg").write_bytes(b"unicode file")
    requests: list = []
    with serve_web(root, slow_seconds=2.0, requests=requests) as base:
        yield base, requests


def _resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in table[host]]
    return resolve


def test_refused_target_gets_no_connection(web, refused_listener) -> None:
    base, _ = web
    port = refused_listener.port
    names = {"evil.example": ["127.0.0.2"], "mixed.example": ["127.0.0.1", "127.0.0.2"],
             "images.example": ["127.0.0.1"], "metadata.google.internal": ["127.0.0.1"]}
    settings = FetchSettings(policy=ALLOWED, timeout=2, deadline=5, resolver=_resolver(names))
    web_port = base.rsplit(":", 1)[1]
    refused_urls = {
        "direct": f"http://127.0.0.2:{port}/a.jpg",
        "redirect from an allowed host": f"{base}/redirect?to=http://127.0.0.2:{port}/a.jpg",
        "name resolving to it": f"http://evil.example:{port}/a.jpg",
        "name resolving to it and to an allowed address": f"http://mixed.example:{port}/a.jpg",
        "percent-encoded": f"http://%31%32%37.0.0.2:{port}/a.jpg",
        "decimal": f"http://2130706434:{port}/a.jpg",
        "hex": f"http://0x7f000002:{port}/a.jpg",
        "octal": f"http://0177.0.0.2:{port}/a.jpg",
        "IPv4-mapped IPv6": f"http://[::ffff:127.0.0.2]:{port}/a.jpg",
        "redirect through a name": f"http://images.example:{web_port}/redirect?to=http://evil.example:{port}/",
        "metadata name on an allowed address": f"http://metadata.google.internal:{web_port}/img/a.jpg",
    }
    for case, url in refused_urls.items():
        result = fetch(url, settings)
        assert result.reason == "blocked_address", (case, result)
        assert result.body is None
    assert refused_listener.accepted == 0
    # The listener does count: a plain connection to it is seen.
    socket.create_connection(("127.0.0.2", port), timeout=2).close()
    deadline = time.monotonic() + 3
    while refused_listener.accepted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused_listener.accepted == 1


def test_redirect_hops_recorded_and_name_connects_to_checked_address(web) -> None:
    base, _ = web
    web_port = base.rsplit(":", 1)[1]
    settings = FetchSettings(policy=ALLOWED, resolver=_resolver({"images.example": ["127.0.0.1"]}))
    result = fetch(f"http://images.example:{web_port}/chain/3/a.jpg", settings)
    assert result.reason is None and result.body.startswith(b"\xff\xd8")
    assert result.redirects == 3
    assert result.final_url == f"http://images.example:{web_port}/img/a.jpg"


def test_unknown_name_is_a_dns_error(web) -> None:
    settings = FetchSettings(policy=ALLOWED, resolver=_resolver({}))
    assert fetch("http://nowhere.example/a.jpg", settings).reason == "dns_error"


def test_iri_is_percent_encoded(web) -> None:
    base, _ = web
    result = fetch(f"{base}/img/ünïcode bild.jpg", FetchSettings(policy=ALLOWED))
    assert result.reason is None and result.body == b"unicode file"
    assert parse_target("http://bücher.example/ä b.jpg").url == "http://xn--bcher-kva.example/%C3%A4%20b.jpg"


@pytest.mark.parametrize("route,settings,reason", [
    ("/drip/100000", {"timeout": 1, "deadline": 1.5}, "deadline_exceeded"),
    ("/slow/a.jpg", {"timeout": 0.5, "deadline": 10}, "timeout"),
    ("/stream/2000", {"max_body_bytes": 1 << 20}, "too_large"),    # 2 GB, no Content-Length
    ("/declared/2000", {"max_body_bytes": 1 << 20}, "too_large"),  # refused from its header
    ("/gzipbomb/200", {"max_body_bytes": 1 << 20}, "too_large"),   # 200 KB inflating to 200 MB
    ("/loop/1", {}, "redirect_loop"),
    ("/chain/12/a.jpg", {"max_redirects": 10}, "too_many_redirects"),
    ("/status/404", {}, "http_404"),
    ("/noai/a.jpg", {"disallowed_header_directives": frozenset({"noai"})}, "robots_optout"),
])
def test_bounds_and_failures_have_their_reasons(web, route, settings, reason) -> None:
    base, _ = web
    started = time.monotonic()
    result = fetch(base + route, FetchSettings(policy=ALLOWED, **settings))
    assert result.reason == reason, result
    assert result.body is None
    # Not a speed check: a missing bound shows up as minutes (2 GB, 7 h of drip), not seconds.
    assert time.monotonic() - started < 30


def test_inflated_body_within_the_cap_is_returned(web) -> None:
    base, _ = web
    result = fetch(base + "/gzipbomb/1", FetchSettings(policy=ALLOWED, max_body_bytes=2 << 20))
    assert result.reason is None and result.body == bytes(1 << 20)


def test_empty_body_is_returned_empty(web) -> None:
    base, _ = web
    result = fetch(base + "/empty/1", FetchSettings(policy=ALLOWED))
    assert result.reason is None and result.body == b""


def _asked(requests: list, path: str) -> list[float]:
    return [when for asked, when in requests if asked == path]


def test_permanent_failure_is_not_retried(web) -> None:
    base, requests = web
    result = fetch_with_retries(base + "/status/404?r=once", FetchSettings(policy=ALLOWED), 3, 10)
    assert (result.reason, result.attempts) == ("http_404", 1)
    assert len(_asked(requests, "/status/404?r=once")) == 1


def test_server_error_is_retried(web) -> None:
    base, requests = web
    waits: list[float] = []
    result = fetch_with_retries(base + "/status/500?r=3", FetchSettings(policy=ALLOWED), 2, 10,
                                sleep=waits.append)
    assert (result.reason, result.attempts) == ("http_500", 3)
    assert len(_asked(requests, "/status/500?r=3")) == 3
    assert waits == [0.5, 1.0]  # backoff without a Retry-After


def test_retry_after_is_honoured(web) -> None:
    base, requests = web
    path = "/retry/honoured/1/a.jpg"
    result = fetch_with_retries(base + path, FetchSettings(policy=ALLOWED), 2, 10)
    assert result.reason is None and result.attempts == 2
    first, second = _asked(requests, path)
    assert second - first >= 0.95


def test_retry_after_beyond_the_cap_ends_the_download(web) -> None:
    base, requests = web
    path = "/retry/toolong/3600/a.jpg"
    result = fetch_with_retries(base + path, FetchSettings(policy=ALLOWED), 2, 10)
    assert (result.reason, result.attempts, result.retry_after) == ("http_503", 1, 3600.0)
    assert len(_asked(requests, path)) == 1


def test_https_certificate_is_verified(tmp_path) -> None:
    """A self-signed server: the TLS handshake fails as `tls_error`, nothing is read."""
    import shutil
    import ssl
    import subprocess
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("openssl") is None:
        pytest.skip("openssl not found to make a certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-days", "1", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"image")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        result = fetch(f"https://127.0.0.1:{server.server_address[1]}/a.jpg",
                       FetchSettings(policy=ALLOWED, timeout=3, deadline=5))
    finally:
        server.shutdown()
        server.server_close()
    assert result.reason == "tls_error" and "CERTIFICATE_VERIFY_FAILED" in result.detail


def test_a_server_that_does_not_speak_http_is_a_failure_not_a_crash() -> None:
    """Garbage instead of a status line, and a header line past http.client's limit."""
    replies = [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n"]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(5)

    def answer() -> None:
        for reply in replies:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(reply)
            conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/a.jpg"
    try:
        results = [fetch(url, FetchSettings(policy=ALLOWED, timeout=3, deadline=5)) for _ in replies]
    finally:
        thread.join(timeout=5)
        server.close()
    assert [r.reason for r in results] == ["connection_error", "connection_error"], results
