"""Buckets: open one from what a node committed on chain, fetch many at once.

A commitment is one of
- a bare bucket name: a directory under `<root>/buckets/` with the local backend, or an S3 bucket at
  `storage.endpoint_url` with the s3 backend;
- `s3://bucket`: a bucket on AWS S3;
- `https://endpoint/bucket` (or `http://` on loopback): a bucket on that S3 API (R2, MinIO, moto).
A malformed one raises `BadCommitment`, which validators count as the committing uid's fault.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from ..config import ConfigError, StorageConfig
from .base import NotFound, ObjectInfo, StorageError, Store, TooLarge
from .gather import gather
from .local import BadKey, LocalStore, check_bucket_name

__all__ = [
    "BadCommitment", "BadKey", "LocalStore", "NotFound", "ObjectInfo", "StorageError", "Store",
    "TooLarge", "bucket_commitment", "gather", "open_store", "parse_commitment",
]  # fmt: skip

MAX_COMMITMENT = 128
"""Bytes a commitment may take on chain."""

_S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class BadCommitment(ValueError):
    """A bucket commitment that names no reachable bucket; the message says why."""


def _s3_bucket(name: str, commitment: str) -> str:
    if not _S3_BUCKET_RE.match(name) or ".." in name:
        raise BadCommitment(f"{commitment!r}: {name!r} is not an S3 bucket name")
    return name


def parse_commitment(commitment: str) -> tuple[str, str | None, bool]:
    """(bucket, endpoint or None, is_s3) for a commitment. `s3://b` is AWS: endpoint None."""
    if not isinstance(commitment, str) or not commitment.strip():
        raise BadCommitment("empty commitment")
    if len(commitment.encode()) > MAX_COMMITMENT:
        raise BadCommitment(f"commitment longer than {MAX_COMMITMENT} bytes")
    if commitment != commitment.strip() or any(ord(ch) < 32 for ch in commitment):
        raise BadCommitment(f"{commitment!r}: whitespace or control characters")
    if "://" not in commitment:
        try:
            return check_bucket_name(commitment), None, False
        except BadKey as e:
            raise BadCommitment(str(e)) from None
    url = urlsplit(commitment)
    if url.scheme == "s3":
        if url.path.strip("/") or url.query or url.fragment:
            raise BadCommitment(f"{commitment!r}: s3://bucket takes no path")
        return _s3_bucket(url.netloc, commitment), None, True
    if url.scheme not in ("https", "http") or not url.hostname:
        raise BadCommitment(f"{commitment!r}: scheme must be s3, https (or http on loopback)")
    if url.scheme == "http" and url.hostname not in _LOOPBACK:
        raise BadCommitment(f"{commitment!r}: plain http only on loopback")
    if url.query or url.fragment or url.username or url.password:
        raise BadCommitment(f"{commitment!r}: no query, fragment or credentials allowed")
    parts = url.path.strip("/").split("/")
    if len(parts) != 1 or not parts[0]:
        raise BadCommitment(f"{commitment!r}: want https://endpoint/bucket")
    try:
        url.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise BadCommitment(f"{commitment!r}: bad port") from None
    return _s3_bucket(parts[0], commitment), f"{url.scheme}://{url.netloc}", True


def open_store(commitment: str, cfg: StorageConfig, *, root: str | Path | None = None) -> Store:
    """The store a commitment names. `root` (else `cfg.root`) holds local buckets."""
    bucket, endpoint, is_s3 = parse_commitment(commitment)
    if is_s3:
        from .s3 import S3Store

        return S3Store(bucket, cfg, endpoint_url=endpoint or "")
    if cfg.backend == "s3":
        from .s3 import S3Store

        return S3Store(_s3_bucket(bucket, commitment), cfg)
    base = root or cfg.root
    if not base:
        raise ConfigError("storage.root: needed for local buckets (pass root= or set it)")
    return LocalStore(base, bucket)


def bucket_commitment(cfg: StorageConfig) -> str:
    """What a node commits on chain for its own bucket `cfg.bucket`: others open it with it."""
    bucket, endpoint, is_s3 = parse_commitment(cfg.bucket)
    if is_s3:
        out = f"{endpoint}/{bucket}" if endpoint else f"s3://{bucket}"
    elif cfg.backend == "local":
        out = bucket
    elif cfg.endpoint_url:
        out = f"{cfg.endpoint_url.rstrip('/')}/{_s3_bucket(bucket, cfg.bucket)}"
    else:
        out = f"s3://{_s3_bucket(bucket, cfg.bucket)}"
    parse_commitment(out)  # an endpoint too long, or http off loopback, fails here, at home
    return out
