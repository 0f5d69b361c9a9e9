"""Reading another uid's bucket: plain, bounded HTTP(S) GETs that never carry our credentials.

A peer's server is hostile until its bytes verify. So this path uses no boto3 (whose reads cannot be
bounded by a deadline nor kept from signing with our keys), only `http.client`'s parser over a
socket we open and time ourselves:
- the host is resolved and every address checked first (`netguard`), then we connect to the
  checked address itself (no second lookup: DNS rebinding), with TLS keeping SNI and hostname checks;
- every connect, TLS handshake and recv waits at most the time left before the caller's deadline,
  so a read ends by the deadline whatever the peer does (slow first byte, trickle, hang);
- Content-Length is checked against `max_bytes` before the body, and the byte count while reading
  (lying lengths, chunked bodies without end, bodies without a length);
- no redirect is followed (3xx is the peer's error); header lines and count are bounded by
  `http.client` (64 KiB a line, 100 lines); any parse error is a `StorageError` whose reason holds
  no credentials;
- requests are unsigned, or (an `r2://` commitment) signed SigV4 with the read-only key the peer
  itself published: never with ours.
"""

from __future__ import annotations

import functools
import http.client
import io
import random
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TypeVar
from urllib.parse import urlsplit

from ..config import StorageConfig
from .base import NotFound, ObjectInfo, PeerTimeout, StorageError, Store, TooLarge
from .commitment import Commitment
from .link import PeerStalled
from .link import current as current_transfer
from .netguard import IPAddress, checked_addresses

DEFAULT_MAX_BYTES = 1 << 30
"""The size cap of a peer read whose caller names none: a peer's object is never unbounded."""
READ_CHUNK = 1 << 16
USER_AGENT = "bistro-peer-reader"
MIN_RATE = 1 << 20
"""Bytes/s a read without a deadline must average: it gets `storage.timeout` + max_bytes / MIN_RATE
(a 64 KiB LATEST.json ~30 s, a 1 GiB checkpoint ~17 min), so even then a trickle cannot hold it."""
BACKOFF_BASE = 0.25
"""Seconds before the first retry of a 5xx or dropped connection (doubled each time, jittered)."""

T = TypeVar("T")


class _Retry(StorageError):
    """A failure worth another attempt while time remains (5xx, 429, a dropped connection)."""


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose every recv waits at most the time left before `deadline`."""

    def __init__(self, sock: socket.socket, deadline: float, what: str) -> None:
        self.sock, self.deadline, self.what = sock, deadline, what

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout(f"{self.what}: not whole by the deadline")
        measured = current_transfer()  # the fetcher's: stall bound, our link, the peer's rate
        stall = measured is not None and measured.stall < left
        wait = left if measured is None else min(left, measured.recv_timeout())
        self.sock.settimeout(wait)
        try:
            n = self.sock.recv_into(b)
        except TimeoutError:
            if stall:
                raise PeerStalled(f"{self.what}: nothing for {wait:.1f} s") from None
            raise PeerTimeout(f"{self.what}: not whole by the deadline") from None
        if measured is not None:
            measured.got(n)
        return n


class _Conn:
    """What `http.client.HTTPResponse` needs of a socket: `makefile`."""

    def __init__(self, sock: socket.socket, deadline: float, what: str) -> None:
        self._raw = _DeadlineReader(sock, deadline, what)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self._raw, READ_CHUNK)


@dataclass
class _Target:
    """Where one request goes: the host name (for the check, SNI and Host), port, scheme, path."""

    host: str
    port: int
    tls: bool
    path: str
    host_header: str


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """The system's CAs, hostname checks on; built once (loading CAs costs), shared by threads."""
    return ssl.create_default_context()


def _connect(
    t: _Target, addrs: list[IPAddress], deadline: float, ctx: ssl.SSLContext | None, what: str
) -> socket.socket:
    last: BaseException | None = None
    for ip in addrs:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            sock = socket.create_connection((str(ip), t.port), timeout=left)
        except TimeoutError:
            raise PeerTimeout(f"{what}: no connection by the deadline") from None
        except OSError as e:
            last = e
            continue
        if not t.tls:
            return sock
        try:
            # one deadline for the whole handshake: CPython's do_handshake bounds it by the timeout
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
            return (ctx or _default_tls()).wrap_socket(sock, server_hostname=t.host)
        except TimeoutError:
            sock.close()
            raise PeerTimeout(f"{what}: TLS handshake not done by the deadline") from None
        except (ssl.SSLError, ssl.CertificateError, OSError) as e:
            sock.close()
            why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or ""
            raise StorageError(f"{what}: TLS: {type(e).__name__} {why}".rstrip()) from None
    if last is None:
        raise PeerTimeout(f"{what}: no connection by the deadline")
    raise _Retry(f"{what}: connect: {type(last).__name__}")


def _request(sock: socket.socket, method: str, t: _Target, headers: dict[str, str]) -> None:
    lines = [f"{method} {t.path} HTTP/1.1", f"Host: {t.host_header}", f"User-Agent: {USER_AGENT}"]
    lines += ["Accept-Encoding: identity", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))


def _read_body(resp: http.client.HTTPResponse, key: str, max_bytes: int, what: str) -> bytes:
    declared = resp.length  # None when chunked or unstated
    if declared is not None and declared > max_bytes:
        raise TooLarge(key, declared, max_bytes)
    measured = current_transfer()
    if measured is not None:
        measured.size = declared if declared is not None else max_bytes
    buf = bytearray()
    while True:
        chunk = resp.read(min(READ_CHUNK, max_bytes + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
        if len(buf) > max_bytes:  # no length, or chunked: cut at the first byte too many
            raise TooLarge(key, len(buf), max_bytes)
    if declared is not None and len(buf) != declared:
        raise StorageError(f"{what}: body {len(buf)} bytes, Content-Length said {declared}")
    return bytes(buf)


def _status_error(resp: http.client.HTTPResponse, what: str) -> StorageError:
    s = resp.status
    if 300 <= s < 400:
        return StorageError(f"{what}: HTTP {s} redirect (not followed)")
    if s == 429 or s >= 500:
        return _Retry(f"{what}: HTTP {s}")
    return StorageError(f"{what}: HTTP {s}")


class PeerStore(Store):
    """A peer's bucket, read-only, read over bounded HTTP(S); see the module docstring."""

    def __init__(
        self,
        c: Commitment,
        cfg: StorageConfig,
        *,
        allow_private: bool,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.c, self.cfg, self.allow_private = c, cfg, allow_private
        self.bucket = c.bucket or c.host
        self.ssl_context = ssl_context

    def __repr__(self) -> str:
        return f"PeerStore({self.c.kind}, {self.c.endpoint}{self.c.prefix})"

    # -- one request ----------------------------------------------------------------------------

    def _target(self, key: str) -> _Target:
        url = urlsplit(self.c.url(key))
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        default = (tls and port == 443) or (not tls and port == 80)
        host = url.hostname or ""
        shown = f"[{host}]" if ":" in host else host
        return _Target(host, port, tls, url.path, shown if default else f"{shown}:{port}")

    def _signed(self, method: str, t: _Target) -> dict[str, str]:
        """SigV4 headers with the peer's own published read-only key (r2://), else none."""
        if self.c.kind != "r2":
            return {}
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        scheme = "https" if t.tls else "http"
        req = AWSRequest(method=method, url=f"{scheme}://{t.host_header}{t.path}")
        req.headers["Host"] = t.host_header
        S3SigV4Auth(Credentials(self.c.key_id, self.c.secret), "s3", "auto").add_auth(req)
        return {k: v for k, v in req.headers.items() if k.lower() != "host"}

    def _exchange(
        self,
        method: str,
        key: str,
        deadline: float,
        read: Callable[[http.client.HTTPResponse], T],
        extra: dict[str, str] | None = None,
        ok: int = 200,
    ) -> T:
        """One request on a fresh connection to a checked address; `read` takes the `ok` response
        (200, or 206 for a range with `extra` {"Range": ...})."""
        what = f"{method.lower()} {self.bucket}/{key}"
        t = self._target(key)
        addrs = checked_addresses(
            t.host, t.port, deadline, allow_private=self.allow_private, plain_http=not t.tls
        )
        measured = current_transfer()  # a connect that hangs is a stall too
        connect_by = deadline if measured is None else min(deadline, time.monotonic() + measured.stall)
        sock = _connect(t, addrs, connect_by, self.ssl_context, what)
        try:
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
            _request(sock, method, t, {**self._signed(method, t), **(extra or {})})
            resp = http.client.HTTPResponse(_Conn(sock, deadline, what), method=method)  # type: ignore[arg-type]
            resp.begin()
            if resp.status == 404:
                raise NotFound(f"{self.bucket}/{key}")
            if resp.status != ok:
                raise _status_error(resp, what)
            return read(resp)
        except (PeerTimeout, NotFound, TooLarge, StorageError):
            raise
        except TimeoutError:
            raise PeerTimeout(f"{what}: not whole by the deadline") from None
        except (http.client.RemoteDisconnected, ConnectionError) as e:
            raise _Retry(f"{what}: {type(e).__name__}") from None
        except (http.client.HTTPException, ValueError, OSError, UnicodeError) as e:
            # the reason: the exception's type and the parser's short text, never request data
            raise StorageError(f"{what}: bad response: {type(e).__name__}: {str(e)[:80]}") from None
        finally:
            sock.close()

    def _attempts(self, deadline: float | None, cap: int, fn: Callable[[float], T]) -> T:
        """`fn(deadline)`, retried on `_Retry` while the deadline leaves room (backoff, jitter).
        No deadline: `storage.timeout` plus `cap` bytes at MIN_RATE, from now."""
        end = deadline if deadline is not None else time.monotonic() + self.cfg.timeout + cap / MIN_RATE
        for attempt in range(self.cfg.retries + 1):
            try:
                return fn(end)
            except _Retry as e:
                pause = random.uniform(0, BACKOFF_BASE * 2**attempt)
                if attempt == self.cfg.retries or time.monotonic() + pause >= end:
                    tail = f" (after {attempt} retries)" if attempt else ""
                    raise StorageError(f"{e}{tail}") from None
                measured = current_transfer()
                if measured is not None:  # the pause is not a slow transfer (a 5xx is peer_error)
                    measured.pausing = True
                time.sleep(pause)
                if measured is not None:  # and the next attempt is measured anew
                    measured.restart()
        raise AssertionError("unreachable")

    # -- the Store operations -------------------------------------------------------------------

    def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        """The object, bounded in size (`max_bytes`, else DEFAULT_MAX_BYTES) and time (`deadline`,
        else `storage.timeout` + max_bytes / MIN_RATE from now)."""
        cap = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        what = f"get {self.bucket}/{key}"
        return self._attempts(
            deadline,
            cap,
            lambda end: self._exchange("GET", key, end, lambda r: _read_body(r, key, cap, what)),
        )

    def get_range(self, key: str, start: int, length: int, *, deadline: float | None = None) -> bytes:
        """Bytes [start, start + length) by a `Range` request: the answer must be 206 with a
        `Content-Range` that starts at `start`, and at most `length` bytes (a server that ignores
        the range, or sends more, is a StorageError: the whole object is never read here)."""
        if start < 0 or length < 1:
            raise ValueError(f"bad range {start}+{length}")
        what = f"get {self.bucket}/{key} [{start}, {start + length})"

        def read(resp: http.client.HTTPResponse) -> bytes:
            got = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
            if got is None or int(got[1]) != start or int(got[2]) < start:
                raise StorageError(f"{what}: Content-Range {resp.headers.get('Content-Range', '')[:60]!r}")
            try:
                return _read_body(resp, key, length, what)
            except TooLarge:
                raise StorageError(f"{what}: more bytes than the range") from None

        extra = {"Range": f"bytes={start}-{start + length - 1}"}
        return self._attempts(
            deadline, length, lambda end: self._exchange("GET", key, end, read, extra=extra, ok=206)
        )

    def head(self, key: str, *, deadline: float | None = None) -> ObjectInfo | None:
        """Size and Last-Modified from a HEAD; a server that omits or garbles them: StorageError.
        (Validators need no HEAD: this is for tools like `bistro doctor`.)"""
        try:
            headers = self._attempts(
                deadline, 0, lambda end: self._exchange("HEAD", key, end, lambda r: r.headers)
            )
        except NotFound:
            return None
        try:
            size = int(headers.get("Content-Length", ""))
            when = parsedate_to_datetime(headers.get("Last-Modified", ""))
        except (TypeError, ValueError, IndexError):
            what = f"head {self.bucket}/{key}"
            raise StorageError(f"{what}: no usable Content-Length or Last-Modified") from None
        if size < 0:
            raise StorageError(f"head {self.bucket}/{key}: negative Content-Length")
        return ObjectInfo(key, size, when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC))

    def put(self, key: str, data: bytes) -> None:
        raise StorageError(f"put {self.bucket}/{key}: a peer's bucket is read-only")

    def delete(self, key: str) -> None:
        raise StorageError(f"delete {self.bucket}/{key}: a peer's bucket is read-only")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        raise StorageError(f"list {self.bucket}/{prefix}: peer buckets are read by key, not listed")
