"""S3Store behaviour that needs a misbehaving network: a real loopback HTTP proxy in front of moto
that can answer 503/403 or count bytes, and a server that accepts and never answers."""

from __future__ import annotations

import http.client
import logging
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from bistro.config import StorageConfig
from bistro.storage import StorageError, TooLarge
from bistro.storage.s3 import S3Store, public_read_policy

MB = 1024 * 1024
ERROR_XML = b"<?xml version='1.0'?><Error><Code>%s</Code><Message>injected</Message></Error>"


class Proxy:
    """Forwards HTTP to `upstream`, after answering the first requests with the statuses in `fail`.
    Records each request and counts response-body bytes it managed to send back."""

    def __init__(self, upstream: str, fail: list[int] | None = None) -> None:
        self.upstream = urlsplit(upstream)
        self.fail = list(fail or [])
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.sent = 0
        self.aborted = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, dict(self.headers)))
                    status = proxy.fail.pop(0) if proxy.fail else None
                if status is not None:
                    err = ERROR_XML % (b"SlowDown" if status == 503 else b"AccessDenied")
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                up.request(self.command, self.path, body=body, headers=headers)
                resp = up.getresponse()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.end_headers()
                try:
                    while chunk := resp.read(256 * 1024):
                        self.wfile.write(chunk)
                        with proxy.lock:
                            proxy.sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    with proxy.lock:
                        proxy.aborted += 1
                    self.close_connection = True
                finally:
                    up.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler


@pytest.fixture
def proxied(s3_store, s3_cfg):
    """(direct store, a function that opens the same bucket through a fresh Proxy)."""
    proxies: list[Proxy] = []

    def through(fail=None, **cfg_changes) -> tuple[S3Store, Proxy]:
        proxy = Proxy(s3_cfg.endpoint_url, fail)
        proxies.append(proxy)
        cfg = replace_storage(s3_cfg, **cfg_changes)
        return S3Store(s3_store.bucket, cfg, endpoint_url=proxy.url), proxy

    yield s3_store, through
    for p in proxies:
        p.close()


def replace_storage(cfg: StorageConfig, **changes) -> StorageConfig:
    return StorageConfig(**{**cfg.__dict__, **changes})


def test_retries_503_then_succeeds(proxied, caplog) -> None:
    direct, through = proxied
    direct.put("k", b"payload")
    store, proxy = through(fail=[503, 503], retries=3)
    with caplog.at_level(logging.WARNING, logger="bistro.storage.s3"):
        assert store.get("k") == b"payload"
    assert len(proxy.requests) == 3
    assert "retry 1/3 get" in caplog.text and "503 SlowDown" in caplog.text


def test_gives_up_after_retries(proxied) -> None:
    direct, through = proxied
    store, proxy = through(fail=[503] * 10, retries=2)
    with pytest.raises(StorageError, match="503"):
        store.put("k", b"x")
    assert len(proxy.requests) == 3  # the first try and two retries, no more
    assert direct.head("k") is None


def test_no_retry_on_403(proxied) -> None:
    direct, through = proxied
    direct.put("k", b"x")
    store, proxy = through(fail=[403], retries=3)
    with pytest.raises(StorageError, match="403"):
        store.get("k")
    assert len(proxy.requests) == 1


def test_too_large_does_not_read_the_body(proxied) -> None:
    direct, through = proxied
    size = 48 * MB
    direct.put("big", os.urandom(size))
    store, proxy = through()
    with pytest.raises(TooLarge):
        store.get("big", max_bytes=MB)
    # the proxy finds out the client hung up once its socket buffers fill
    store2, proxy2 = through()
    assert len(store2.get("big")) == size
    assert proxy2.sent >= size and proxy2.aborted == 0
    deadline = threading.Event()
    for _ in range(100):
        if proxy.aborted:
            break
        deadline.wait(0.05)
    assert proxy.aborted == 1 and proxy.sent < size // 2


def test_multipart_and_ranged(proxied) -> None:
    _, through = proxied
    data = os.urandom(20 * MB)
    store, proxy = through(multipart_threshold=5 * MB)
    store.put("mp", data)
    calls = [(m, "partNumber=" in p, "uploads" in p, "uploadId=" in p) for m, p, _ in proxy.requests]
    assert calls.count(("PUT", True, False, True)) == 3  # 8 MiB parts
    assert calls[0] == ("POST", False, True, False) and calls[-1] == ("POST", False, False, True)
    proxy.requests.clear()
    assert store.get("mp") == data
    ranged = [h["Range"] for m, _, h in proxy.requests if m == "GET" and "Range" in h]
    # the first 5 MiB come with the size, the other 15 MiB in two parallel ranges
    assert len(proxy.requests) == 3 and ranged[0] == f"bytes=0-{5 * MB - 1}"


def test_anonymous_reads_are_unsigned(proxied) -> None:
    direct, through = proxied
    direct.put("pub", b"public")
    store, proxy = through()
    anon = S3Store(store.bucket, store.cfg, anonymous=True, endpoint_url=store.endpoint_url)
    with pytest.raises(StorageError, match="403"):
        anon.get("pub")  # private until the owner sets the documented policy
    direct.client.put_bucket_policy(Bucket=direct.bucket, Policy=public_read_policy(direct.bucket))
    proxy.requests.clear()
    assert anon.get("pub") == b"public"
    assert [o.key for o in anon.list()] == ["pub"]
    with pytest.raises(StorageError, match="403"):
        anon.put("pub", b"defaced")  # the policy grants no write
    assert all("Authorization" not in h for _, _, h in proxy.requests)
    proxy.requests.clear()
    assert store.get("pub") == b"public"
    assert "Authorization" in proxy.requests[0][2]


def test_hanging_server_times_out(s3_cfg) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(
        target=lambda: [held.append(listener.accept()[0]) for _ in range(10)], daemon=True
    ).start()
    cfg = replace_storage(s3_cfg, timeout=0.3, retries=1)
    store = S3Store("hang-bucket", cfg, endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    result: list[BaseException] = []

    def call() -> None:
        try:
            store.get("k")
        except StorageError as e:
            result.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(30)
    listener.close()
    assert not t.is_alive(), "get did not time out"
    assert result and "Timeout" in str(result[0]) and "after 1 retries" in str(result[0])
    assert len(held) == 2  # one try, one retry


@pytest.mark.slow
def test_server_as_a_process(s3_server, s3_cfg) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bistro.localnet.s3server", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        store = S3Store("proc-bucket", replace_storage(s3_cfg, endpoint_url=url))
        store.create_bucket()
        store.put("a", b"over there")
        assert store.get("a") == b"over there"
    finally:
        proc.terminate()
    assert proc.wait(10) == 0
