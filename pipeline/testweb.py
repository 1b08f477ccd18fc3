"""A small web on 127.0.0.1 for the demo, the tests and the benchmarks, with faults on purpose.

Routes (NAME is a file under the served folder; any query string is ignored, so one image can be
reached under many distinct URLs):
  /img/NAME        the file                      /status/CODE     an empty reply with that status
  /truncated/NAME  the first half of the file    /notimage/N      an HTML page sent as image/jpeg
  /slow/NAME       the file after a delay        /loop/N          a redirect to itself, forever
  /noai/NAME       the file with `X-Robots-Tag: noai`
"""
from __future__ import annotations

import mimetypes
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit


def _make_handler(root: Path, slow_seconds: float):
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

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            route, _, rest = urlsplit(self.path).path.lstrip("/").partition("/")
            if route == "status":
                return self._send(int(rest or 500), b"", "text/plain")
            if route == "notimage":
                return self._send(200, b"<html><body>not an image</body></html>", "image/jpeg")
            if route == "loop":
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
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

        do_HEAD = do_GET

    return FaultyWebHandler


@contextmanager
def serve_web(root: str | Path, slow_seconds: float = 5.0, backlog: int = 1024) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 on a free port; yields the base URL (`http://127.0.0.1:PORT`).

    `backlog`: the listen queue. http.server's default of 5 overflows when a downloader opens
    a hundred connections at once; the kernel then drops connection attempts, the client retries
    after 1, 3, 7 s, and requests time out because of the test server, not the downloader.
    """
    root = Path(root).resolve()

    class Server(ThreadingHTTPServer):
        request_queue_size = backlog

    server = Server(("127.0.0.1", 0), _make_handler(root, slow_seconds))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
