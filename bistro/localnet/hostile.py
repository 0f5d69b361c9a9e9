"""A hostile peer's storage server: a real HTTP server on 127.0.0.1, port 0, that answers each
request the way its path's first segment names (`GET /<behaviour>/<key>`), and records every request
(method, path, headers) so callers can see what a validator sent.

Commit `http+get://127.0.0.1:PORT/<behaviour>` (or `http://127.0.0.1:PORT/<behaviour>` as an S3
path-style bucket) to point a uid at one behaviour. The object served for a key is `server.body`,
or what `source(key)` returns; a key `source` does not have is answered by `missing` (404 by
default). Used by the tests' corpus (`tests/support/hostile_server.py`) and, inside a real miner process, by
the `hostile:<behaviour>` personas (`bistro/localnet/personas.py`), which serve their own signed deltas so.
Research and test tooling: nothing in a validator or an honest miner starts it.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

Behaviour = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: tests print what they assert
        pass

    def _serve(self) -> None:
        seen = self.server.requests
        seen.append((self.command, self.path, dict(self.headers.items())))
        if len(seen) > self.server.keep_requests:  # bounded: a persona's server runs for hours
            del seen[0]
        name, _, key = self.path.lstrip("/").partition("/")
        behaviour = BEHAVIOURS.get(name.replace("-", "_"), not_found)
        self.object = self.server.object_for(unquote(key.split("?", 1)[0]))
        try:
            (behaviour if self.object is not None else self.server.missing)(self)
        except OSError:  # the reader hung up on us: exactly what a bounded reader should do
            pass
        self.close_connection = True

    do_GET = do_HEAD = _serve

    # -- helpers for behaviours -----------------------------------------------------------------

    def raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def head_lines(self, status: str, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers), "Connection: close"]
        self.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def body(self) -> bytes:
        """The object at the requested key (behaviours run only when there is one)."""
        return self.object or b""

    def wait(self, seconds: float) -> None:
        """Sleep, but end early when the server stops (so tests do not leave sleepers behind)."""
        self.server.stopping.wait(seconds)

    @property
    def get(self) -> bool:
        return self.command == "GET"


def _length_headers(h: Handler, length: int, last_modified: bool = True) -> list[tuple[str, str]]:
    out = [("Content-Type", "application/octet-stream"), ("Content-Length", str(length))]
    if last_modified:
        out.append(("Last-Modified", formatdate(time.time(), usegmt=True)))
    return out


# -- the behaviours ----------------------------------------------------------------------------


def honest(h: Handler) -> None:
    h.head_lines("200 OK", _length_headers(h, len(h.body())))
    if h.get:
        h.raw(h.body())


def not_found(h: Handler) -> None:
    h.head_lines("404 Not Found", [("Content-Length", "0")])


def no_last_modified(h: Handler) -> None:
    h.head_lines("200 OK", _length_headers(h, len(h.body()), last_modified=False))
    if h.get:
        h.raw(h.body())


def length_longer(h: Handler) -> None:
    """Content-Length promises 100 bytes more than the body, then the connection closes."""
    h.head_lines("200 OK", _length_headers(h, len(h.body()) + 100))
    h.raw(h.body())


def length_shorter(h: Handler) -> None:
    """Content-Length says 10 bytes fewer than the body that follows."""
    h.head_lines("200 OK", _length_headers(h, len(h.body()) - 10))
    h.raw(h.body())


def content_range_star(h: Handler) -> None:
    """A 206 nobody asked for, of unknown total size (`bytes 0-9/*`)."""
    h.head_lines("206 Partial Content", [("Content-Range", "bytes 0-9/*"), ("Content-Length", "10")])
    h.raw(h.body()[:10])


def status_500(h: Handler) -> None:
    h.head_lines("500 Internal Server Error", [("Content-Length", "0")])


def status_503(h: Handler) -> None:
    h.head_lines("503 Slow Down", [("Content-Length", "0"), ("Retry-After", "1")])


def slow_first_byte(h: Handler) -> None:
    h.wait(30)
    honest(h)


def trickle(h: Handler) -> None:
    """Headers at once, then the body one byte every 0.5 s."""
    h.head_lines("200 OK", _length_headers(h, len(h.body())))
    for i in range(len(h.body())):
        if h.server.stopping.is_set():
            return
        h.raw(h.body()[i : i + 1])
        h.wait(0.5)


def hang_after_headers(h: Handler) -> None:
    h.head_lines("200 OK", _length_headers(h, len(h.body())))
    h.wait(30)


def redirect_loopback(h: Handler) -> None:
    port = h.server.server_address[1]
    h.head_lines("302 Found", [("Location", f"http://127.0.0.1:{port}/honest/key"), ("Content-Length", "0")])


def redirect_metadata(h: Handler) -> None:
    where = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    h.head_lines("301 Moved Permanently", [("Location", where), ("Content-Length", "0")])


def many_headers(h: Handler) -> None:
    """10,000 header lines."""
    h.head_lines("200 OK", [*_length_headers(h, 2), *((f"X-Junk-{i}", "x") for i in range(10_000))])
    h.raw(b"hi")


def huge_header(h: Handler) -> None:
    """One header line of 1 MB."""
    h.head_lines("200 OK", [*_length_headers(h, 2), ("X-Huge", "x" * (1 << 20))])
    h.raw(b"hi")


def reset_mid_body(h: Handler) -> None:
    """Half the body, then a TCP reset (SO_LINGER 0)."""
    h.head_lines("200 OK", _length_headers(h, len(h.body())))
    h.raw(h.body()[: len(h.body()) // 2])
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.connection.close()


def endless_chunked(h: Handler) -> None:
    """A chunked body that never ends, as fast as the reader takes it."""
    h.head_lines("200 OK", [("Transfer-Encoding", "chunked")])
    chunk = b"4000\r\n" + b"z" * 0x4000 + b"\r\n"
    while not h.server.stopping.is_set():
        h.raw(chunk)


def no_length_huge(h: Handler) -> None:
    """No Content-Length: the body runs until close, far past any limit."""
    h.head_lines("200 OK", [("Content-Type", "application/octet-stream")])
    block = b"q" * (1 << 16)
    for _ in range(1 << 10):  # 64 MiB at most
        if h.server.stopping.is_set():
            return
        h.raw(block)


def huge_declared(h: Handler) -> None:
    """Claims 10 GB; the reader must refuse before reading a byte of it."""
    h.head_lines("200 OK", [("Content-Length", str(10**10))])
    h.wait(30)


def garbage_status(h: Handler) -> None:
    h.raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


BEHAVIOURS: dict[str, Behaviour] = {
    f.__name__: f
    for f in (
        honest, not_found, no_last_modified, length_longer, length_shorter, content_range_star,
        status_500, status_503, slow_first_byte, trickle, hang_after_headers, redirect_loopback,
        redirect_metadata, many_headers, huge_header, reset_mid_body, endless_chunked,
        no_length_huge, huge_declared, garbage_status,
    )
}  # fmt: skip


class HostileServer(ThreadingHTTPServer):
    """The server, in a daemon thread; `stop()` ends it and wakes every sleeping behaviour.
    With `tls`, each connection is wrapped (in its own thread) and the SNI names seen are kept."""

    daemon_threads = True
    request_queue_size = 256  # 64 sybils connecting at once must not hit the listen backlog

    def __init__(
        self,
        body: bytes = b"",
        tls: ssl.SSLContext | None = None,
        *,
        source: Callable[[str], bytes | None] | None = None,
        missing: Behaviour | None = None,
        keep_requests: int = 10_000,
    ) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.body, self.tls, self.source = body, tls, source
        self.missing: Behaviour = missing or not_found
        """What a key `source` does not have gets (a 404; a persona may answer 5xx instead)."""
        self.sni: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        """The last `keep_requests` requests seen: (method, path, headers)."""
        self.keep_requests = keep_requests
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if self.tls is not None:
            request.settimeout(5)
            request = self.tls.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up on a handshake or a body: expected here, not worth a traceback

    def object_for(self, key: str) -> bytes | None:
        """The object served at `key`: `body` for every key, or what `source` has."""
        return self.body if self.source is None else self.source(key)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
