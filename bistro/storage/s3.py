"""A bucket on any S3 API (AWS S3, Cloudflare R2, MinIO, a loopback moto server) through boto3.

Credentials come from boto3's standard chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
`AWS_PROFILE`, `~/.aws/credentials`, instance roles), then from a `.env` file in the working
directory. When there are none, or `anonymous=True`, requests go unsigned.

What this adds to a bare boto3 client, and why:
- Our own retry loop (exponential backoff, full jitter, `storage.retries`) on throttling, 5xx,
  connection errors and timeouts, logged at WARNING; botocore's retries are off so the count is
  ours. A 4xx that cannot succeed (400, 403, 404) is not retried; 404 is `NotFound`.
- `get(max_bytes=…)` checks the response's Content-Length before reading the body, so an oversized
  object costs one aborted response, not its bytes in memory (`TooLarge`).
- Above `storage.multipart_threshold`: multipart upload and parallel ranged download, parts in
  `storage.max_workers` threads sharing one connection pool of that size.
- One client per (endpoint, region, signing, settings), shared by every store that uses it.
- Request checksums only where S3 requires them (`when_required`): several S3-compatible servers
  reject botocore's default trailing CRC32, and deltas carry their own signed content hash.
No object ACLs are set: new AWS buckets reject ACLs (Object Ownership "bucket owner enforced").

Public read for a miner's bucket (AWS): turn off "Block public access" for bucket policies and set

    {"Version": "2012-10-17",
     "Statement": [
       {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
        "Resource": "arn:aws:s3:::BUCKET/*"},
       {"Effect": "Allow", "Principal": "*", "Action": "s3:ListBucket",
        "Resource": "arn:aws:s3:::BUCKET"}]}

(the second statement only if validators should list the bucket; `public_read_policy(bucket)` writes
this JSON, for `aws s3api put-bucket-policy --bucket BUCKET --policy file://policy.json`). Writing stays with the owner:
the miner's own credentials (an IAM user or role with s3:PutObject/s3:DeleteObject on the bucket).
Never give the public s3:PutObject.

Cloudflare R2: endpoint `https://<account_id>.r2.cloudflarestorage.com`, region `auto`, keys from an
R2 API token in `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (the miner's own, read-write). R2's S3
API refuses unsigned reads, so do not commit the bare endpoint: publish a public URL
(`storage.public_url`, r2.dev or a custom domain) or a read-only token (`storage.read_key_id` /
`read_secret`), and `bucket_commitment` commits that (steps: `bistro/storage/__init__.py`).
MinIO: its URL as the endpoint, path style.

This module is for a node's OWN bucket. Peers' buckets are read by `peer.py` (bounded, unsigned or
signed with the peer's published read key), never with these clients and our credentials.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bce
from botocore import UNSIGNED
from botocore.config import Config
from dotenv import dotenv_values

from ..config import StorageConfig
from .base import NotFound, ObjectInfo, StorageError, Store, TooLarge, check_deadline

log = logging.getLogger("bistro.storage.s3")

T = TypeVar("T")

MIN_PART = 8 * 1024 * 1024
"""Smallest multipart part (S3's own floor is 5 MiB); fewer, larger parts cost fewer requests."""
MAX_PARTS = 10_000
BACKOFF_BASE = 0.25
"""Seconds before the first retry (then doubled each time, with full jitter)."""
BACKOFF_CAP = 20.0

_RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
}  # fmt: skip
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_TRANSIENT = (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, OSError)


def is_loopback_or_ip(endpoint: str | None) -> bool:
    """True for localhost and literal IP endpoints, which have no per-bucket DNS: path style."""
    host = urlsplit(endpoint).hostname if endpoint else None
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _classify(e: BaseException) -> tuple[str, str]:
    """(what to do, short reason): `notfound`, `retry` or `fail`. Reasons never hold credentials."""
    if isinstance(e, bce.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        reason = f"{status} {code}".strip() if code != str(status) else code
        if code in _NOT_FOUND_CODES or status == 404:
            return "notfound", reason
        if status >= 500 or status == 429 or code in _RETRY_CODES:
            return "retry", reason
        return "fail", reason
    if isinstance(e, _TRANSIENT):
        return "retry", f"{type(e).__name__}: {e}"
    return "fail", f"{type(e).__name__}: {e}"


def retrying(what: str, retries: int, fn: Callable[[], T], deadline: float | None = None) -> T:
    """`fn()`, retried on transient failures. NotFound for 404; StorageError when it gives up;
    PeerTimeout when `deadline` (absolute, monotonic) passes before an attempt or a backoff ends."""
    for attempt in range(retries + 1):
        check_deadline(deadline, what)
        try:
            return fn()
        except (bce.BotoCoreError, bce.ClientError, OSError) as e:
            kind, reason = _classify(e)
            if kind == "notfound":
                raise NotFound(f"{what}: {reason}") from None
            if kind == "fail" or attempt == retries:
                raise StorageError(
                    f"{what}: {reason}" + (f" (after {attempt} retries)" if attempt else "")
                ) from None
            log.warning("retry %d/%d %s: %s", attempt + 1, retries, what, reason)
            pause = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
            left = check_deadline(deadline, what)
            time.sleep(pause if left is None else min(pause, left))
    raise AssertionError("unreachable")


_session_lock = threading.Lock()


@functools.cache
def _session() -> boto3.session.Session:
    # `.env` in the working directory fills in AWS keys the environment does not set (never overrides)
    env = {k: v for k, v in dotenv_values(".env").items() if v} if os.path.isfile(".env") else {}
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    if "AWS_ACCESS_KEY_ID" in os.environ or "AWS_ACCESS_KEY_ID" not in env:
        return boto3.session.Session(region_name=env.get("AWS_DEFAULT_REGION"))
    a, s, t = (env.get(k) for k in keys)
    return boto3.session.Session(a, s, t, region_name=env.get("AWS_DEFAULT_REGION"))


@functools.cache
def _has_credentials() -> bool:
    # cached: without credentials botocore probes the instance metadata service, about a second
    with _session_lock:
        return _session().get_credentials() is not None


@functools.cache
def _client(
    endpoint: str | None, region: str, unsigned: bool, path_style: bool, timeout: float, pool: int
) -> Any:
    extra: dict[str, Any] = {"signature_version": UNSIGNED} if unsigned else {}
    config = Config(
        region_name=region,
        retries={"total_max_attempts": 1, "mode": "standard"},  # the retry loop is ours
        max_pool_connections=pool,
        connect_timeout=timeout,
        read_timeout=timeout,
        s3={"addressing_style": "path" if path_style else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        **extra,
    )
    with _session_lock:  # sessions are not thread-safe; clients are
        return _session().client("s3", endpoint_url=endpoint, config=config)


def _total_size(r: dict[str, Any], what: str) -> int:
    """The whole object's size from a (ranged) GetObject response: `bytes 0-99/1234` -> 1234.
    A size the server does not state (`bytes 0-9/*`) or garbles is a StorageError."""
    content_range = r.get("ContentRange")
    try:
        if content_range:
            size = int(content_range.rsplit("/", 1)[1])
        else:
            size = int(r["ContentLength"])
    except (KeyError, ValueError, IndexError):
        raise StorageError(f"{what}: no usable size (Content-Range {content_range!r})") from None
    if size < 0:
        raise StorageError(f"{what}: negative size")
    return size


def public_read_policy(bucket: str, *, listing: bool = True) -> str:
    """The bucket policy (JSON) that lets anyone read `bucket`, and list it when `listing`.
    Apply it with the owner's credentials; it grants no write."""
    statements = [
        {
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{bucket}/*",
        }
    ]
    if listing:
        statements.append(
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:ListBucket",
                "Resource": f"arn:aws:s3:::{bucket}",
            }
        )
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def part_size(size: int) -> int:
    """Bytes per part for an object of `size` bytes (≥ MIN_PART, ≤ MAX_PARTS parts)."""
    return max(MIN_PART, math.ceil(size / MAX_PARTS))


class S3Store(Store):
    """One bucket on an S3 API."""

    def __init__(
        self, bucket: str, cfg: StorageConfig, *, anonymous: bool = False, endpoint_url: str | None = None
    ) -> None:
        self.bucket = bucket
        self.cfg = cfg
        self.endpoint_url = (endpoint_url if endpoint_url is not None else cfg.endpoint_url) or None
        self.anonymous = anonymous or not _has_credentials()
        self.region = region = cfg.region or _session().region_name or "us-east-1"
        path_style = cfg.path_style or is_loopback_or_ip(self.endpoint_url)
        self.client = _client(
            self.endpoint_url, region, self.anonymous, path_style, cfg.timeout, cfg.max_workers
        )

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, endpoint={self.endpoint_url or 'aws'!r})"

    def _retry(self, op: str, key: str, fn: Callable[[], T]) -> T:
        return retrying(f"{op} {self.bucket}/{key}", self.cfg.retries, fn)

    # -- put ------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.cfg.multipart_threshold:
            self._put_multipart(key, data)
            return
        self._retry("put", key, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def _put_multipart(self, key: str, data: bytes) -> None:
        c, b = self.client, self.bucket
        upload_id = self._retry("put", key, lambda: c.create_multipart_upload(Bucket=b, Key=key))["UploadId"]
        step = part_size(len(data))
        view = memoryview(data)

        def upload(n: int) -> dict[str, Any]:
            body = bytes(view[n * step : (n + 1) * step])
            r = self._retry(
                f"put part {n + 1}",
                key,
                lambda: c.upload_part(Bucket=b, Key=key, UploadId=upload_id, PartNumber=n + 1, Body=body),
            )
            return {"PartNumber": n + 1, "ETag": r["ETag"]}

        try:
            with ThreadPoolExecutor(self.cfg.max_workers, thread_name_prefix="s3-put") as pool:
                parts = list(pool.map(upload, range(math.ceil(len(data) / step))))
            done = {"Parts": parts}
            self._retry(
                "put",
                key,
                lambda: c.complete_multipart_upload(
                    Bucket=b, Key=key, UploadId=upload_id, MultipartUpload=done
                ),
            )
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (bce.BotoCoreError, bce.ClientError) as e:
            # the upload already failed loudly; a lifecycle rule reaps what abort could not
            log.warning("abort multipart %s/%s: %s", self.bucket, key, _classify(e)[1])

    # -- get ------------------------------------------------------------------------------------

    def get(self, key: str, *, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        """Our own bucket's object (signed with our keys): peers are read through `peer.py`.
        `deadline` is checked between attempts; one attempt is bounded by `storage.timeout`."""
        what = f"get {self.bucket}/{key}"
        return retrying(what, self.cfg.retries, lambda: self._get_once(key, max_bytes), deadline)

    def _get_once(self, key: str, max_bytes: int | None) -> bytes:
        # 1. ask for the first `multipart_threshold` bytes: small objects come whole, large ones
        #    tell their total size in Content-Range, and the body is not touched before the size check
        first = self.cfg.multipart_threshold
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{first - 1}")
        except bce.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 416:
                raise
            r = self.client.get_object(Bucket=self.bucket, Key=key)  # an empty object has no range
        body = r["Body"]
        try:
            size = _total_size(r, f"get {self.bucket}/{key}")
        except StorageError:
            body.close()
            raise
        if max_bytes is not None and size > max_bytes:
            body.close()  # drops the connection instead of draining the body
            raise TooLarge(key, size, max_bytes)
        if size <= first:
            with body:
                data = body.read()
            if len(data) != size:
                raise StorageError(f"get {self.bucket}/{key}: {len(data)} of {size} bytes")
            return data
        # 2. the rest in parallel ranges, pinned to the same version by its ETag
        return self._get_ranged(key, body, first, size, r["ETag"])

    def _get_ranged(self, key: str, head: Any, first: int, size: int, etag: str) -> bytes:
        """Bytes [0, first) from the open response `head`, the rest in ranges, all in parallel."""
        step = part_size(size)
        ranges = [(lo, min(size, lo + step)) for lo in range(first, size, step)]
        out = bytearray(size)

        def read_head() -> None:
            with head:
                chunk = head.read()
            if len(chunk) != first:
                raise StorageError(f"get {self.bucket}/{key}: short first range")
            out[:first] = chunk

        def fetch(lo: int, hi: int) -> None:
            rng = f"bytes={lo}-{hi - 1}"

            def one() -> bytes:
                r = self.client.get_object(Bucket=self.bucket, Key=key, Range=rng, IfMatch=etag)
                with r["Body"] as body:
                    return body.read()

            chunk = self._retry(f"get {rng}", key, one)
            if len(chunk) != hi - lo:
                raise StorageError(f"get {self.bucket}/{key}: short range {rng}")
            out[lo:hi] = chunk

        with ThreadPoolExecutor(self.cfg.max_workers, thread_name_prefix="s3-get") as pool:
            jobs = [pool.submit(read_head)] + [pool.submit(fetch, lo, hi) for lo, hi in ranges]
            for job in jobs:
                job.result()
        return bytes(out)

    # -- the rest -------------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self._retry("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except NotFound:
            return None
        try:
            return ObjectInfo(key, int(r["ContentLength"]), r["LastModified"].astimezone(UTC))
        except (KeyError, TypeError, ValueError, AttributeError):
            # a server that omits Last-Modified (or sends garbage) answered nonsense: its fault
            raise StorageError(f"head {self.bucket}/{key}: no Content-Length or Last-Modified") from None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = self._retry("list", prefix, lambda kw=kw: self.client.list_objects_v2(**kw))
            for o in page.get("Contents", []):
                out.append(ObjectInfo(o["Key"], int(o["Size"]), o["LastModified"].astimezone(UTC)))
            if not page.get("IsTruncated"):
                break
            kw = {**kw, "ContinuationToken": page["NextContinuationToken"]}
        out.sort(key=lambda o: o.key)
        return out

    def delete(self, key: str) -> None:
        try:
            self._retry("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
        except NotFound:
            pass

    def create_bucket(self, *, public_read: bool = False) -> None:
        """Create the bucket (tests, localnet, first run against MinIO); an existing one is fine.
        `public_read` also applies `public_read_policy(bucket, listing=False)`: peers read a bucket
        unsigned (`open_peer_store`), so a localnet on an S3 server needs it."""
        kw: dict[str, Any] = {"Bucket": self.bucket}
        if self.region not in ("us-east-1", "auto"):
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._retry("create bucket", "", lambda: self.client.create_bucket(**kw))
        except StorageError as e:
            if "BucketAlreadyOwnedByYou" not in str(e) and "BucketAlreadyExists" not in str(e):
                raise
        if public_read:
            policy = public_read_policy(self.bucket, listing=False)
            self._retry(
                "put bucket policy",
                "",
                lambda: self.client.put_bucket_policy(Bucket=self.bucket, Policy=policy),
            )
