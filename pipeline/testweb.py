"""A small web on 127.0.0.1 for the demo, the tests and the benchmarks, with faults on purpose.

Routes (NAME is a file under the served folder; any query string is ignored, so one image can be
reached under many distinct URLs):
  /img/NAME        the file                      /status/CODE     an empty reply with that status
  /truncated/NAME  the first half of the file    /notimage/N      an HTML page sent as image/jpeg
  /slow/NAME       the file after a delay        /loop/N          a redirect to itself, forever
  /noai/NAME       the file with `X-Robots-Tag: noai`
The hostile part, for the download guard's tests and benchmark:
  /redirect?to=URL     a 302 to URL                /chain/N/NAME   N redirects, then /img/NAME
  /drip/N              headers, then one byte every 0.25 s for N bytes
  /stream/MB           MB megabytes of zeros without a Content-Length
  /declared/MB         the same with its Content-Length
  /gzipbomb/MB         MB megabytes of zeros, gzip-compressed (about MB kilobytes on the wire)
  /retry/ID/SECONDS/NAME  a 503 with `Retry-After: SECONDS` the first time ID is asked, then the file
  /empty/N             a 200 with an empty body
`requests`, when given, gets (path, time.monotonic()) of every request, for counting retries.
"""
from __future__ import annotations

import gzip
import mimetypes
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

_MB = 1024 * 1024


def png_declaring(width: int, height: int) -> bytes:
    """A complete, tiny PNG whose header declares width x height RGB pixels: a pixel bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(4096)))
            + chunk(b"IEND", b""))


@lru_cache(maxsize=4)
def _gzip_zeros(megabytes: int) -> bytes:
    return gzip.compress(bytes(megabytes * _MB), compresslevel=9)


def _make_handler(root: Path, slow_seconds: float, requests: list | None):
    asked: set[str] = set()
    asked_lock = threading.Lock()

    class FaultyWebHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes, content_type: str = "image/jpeg",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout on /slow): expected

        def _file(self, name: str) -> bytes | None:
            path = (root / unquote(name)).resolve()
            if root not in path.parents or not path.is_file():
                return None
            return path.read_bytes()

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _stream(self, total: int, declared: bool, pause: float = 0.0, chunk: int = 64 * 1024) -> None:
            """`total` zero bytes in `chunk`s, until the client hangs up."""
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if declared:
                self.send_header("Content-Length", str(total))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            block = bytes(chunk)
            try:
                for sent in range(0, total, chunk):
                    self.wfile.write(block[: min(chunk, total - sent)])
                    self.wfile.flush()
                    if pause:
                        time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the downloader gave up: what the guard is for

        def _hostile(self, route: str, rest: str) -> bool:
            """Serve one of the hostile routes; False when `route` is not one."""
            parts = rest.split("/")
            if route == "redirect":
                self._redirect(parse_qs(urlsplit(self.path).query)["to"][0])
            elif route == "chain":
                hops, name = int(parts[0]), "/".join(parts[1:])
                self._redirect(f"/chain/{hops - 1}/{name}" if hops > 1 else f"/img/{name}")
            elif route == "drip":
                self._stream(int(parts[0]), declared=True, pause=0.25, chunk=1)
            elif route in ("stream", "declared"):
                self._stream(int(parts[0]) * _MB, declared=route == "declared")
            elif route == "gzipbomb":
                self._send(200, _gzip_zeros(int(parts[0])), "image/jpeg", {"Content-Encoding": "gzip"})
            elif route == "retry":
                with asked_lock:
                    first = parts[0] not in asked
                    asked.add(parts[0])
                if first:
                    self._send(503, b"", "text/plain", {"Retry-After": parts[1]})
                else:
                    self._serve_file("img", "/".join(parts[2:]))
            elif route == "empty":
                self._send(200, b"", "image/jpeg")
            else:
                return False
            return True

        def _serve_file(self, route: str, rest: str) -> None:
            data = self._file(rest)
            if data is None:
                return self._send(404, b"", "text/plain")
            ctype = mimetypes.guess_type(rest)[0] or "application/octet-stream"
            if route == "img":
                return self._send(200, data, ctype)
            if route == "truncated":
                return self._send(200, data[: len(data) // 2], ctype)
            if route == "noai":
                return self._send(200, data, ctype, {"X-Robots-Tag": "noai"})
            if route == "slow":
                time.sleep(slow_seconds)
                return self._send(200, data, ctype)
            return self._send(404, b"", "text/plain")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if requests is not None:
                requests.append((self.path, time.monotonic()))
            route, _, rest = urlsplit(self.path).path.lstrip("/").partition("/")
            if self._hostile(route, rest):
                return None
            if route == "status":
                return self._send(int(rest or 500), b"", "text/plain")
            if route == "notimage":
                return self._send(200, b"<html><body>not an image</body></html>", "image/jpeg")
            if route == "loop":
                return self._redirect(self.path)
            return self._serve_file(route, rest)

        do_HEAD = do_GET

    return FaultyWebHandler


@contextmanager
def serve_web(root: str | Path, slow_seconds: float = 5.0, backlog: int = 1024,
              requests: list | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `root` on 127.0.0.1 on a free port; yields the base URL (`http://127.0.0.1:PORT`).

    `backlog`: the listen queue. http.server's default of 5 overflows when a downloader opens
    a hundred connections at once; the kernel then drops connection attempts, the client retries
    after 1, 3, 7 s, and requests time out because of the test server, not the downloader.
    """
    root = Path(root).resolve()

    class Server(ThreadingHTTPServer):
        request_queue_size = backlog

    server = Server((host, 0), _make_handler(root, slow_seconds, requests))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
