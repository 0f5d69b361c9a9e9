"""Buckets: our own (written with our keys), and peers' (read without them), fetched many at once.

Commitments (what a node writes on chain for its bucket; at most 128 bytes, ASCII, parsed into one
`Commitment`; anything else is `BadCommitment`, the committing uid's fault):

| form | read as | where |
|---|---|---|
| `name` | `<root>/buckets/name/` (local backend) or `storage.endpoint_url` (s3 backend) | embedded chain only |
| `s3://bucket` | unsigned `GET https://bucket.s3.amazonaws.com/{key}` | AWS, public-read bucket (no dots in the name) |
| `https://endpoint/bucket` | unsigned `GET https://endpoint/bucket/{key}` (path style) | any S3 API with public read (MinIO, a regional AWS endpoint) |
| `https+get://host[/prefix]` | unsigned `GET https://host/prefix/{key}` | a plain public URL: R2's `pub-….r2.dev`, an R2 custom domain, a CDN |
| `r2://TOKEN/bucket` | `GET https://ACCOUNT.r2.cloudflarestorage.com/bucket/{key}`, SigV4 with the peer's read-only key | R2 with a read-only API token |

`http://` and `http+get://` are accepted only to a loopback host. `TOKEN` is 86 characters:
base64url (no padding) of the raw bytes of the account id (32 hex = 16 B), the access key id
(32 hex = 16 B) and the secret (64 hex = 32 B), so an r2:// bucket name may be at most 36 characters.

Peer reads (`open_peer_store`) never carry our credentials: they are unsigned, or signed with the
read-only key the peer published. On a real network (`private_allowed(settings)` False) a host that
is, or resolves to, a loopback, private, link-local (169.254/16, fe80::/10), multicast, unspecified,
reserved or CGNAT address (IPv4-mapped and other embedded forms included) is `BadCommitment`, checked
on the address actually connected to; redirects are never followed; a bare name is `BadCommitment`.
`storage.allow_private_endpoints = true` (or the embedded chain) lifts the address rule for tests and
private deployments. Our own bucket (`open_store`) is read and written with our keys.

A validator's window, in short (every failure is a value, mapped by `bistro.verdicts.fetch_verdict`):

    allow = private_allowed(settings)
    store = open_peer_store(commitment, settings.storage, root=root, allow_private=allow)  # or BadCommitment
    results = fetch_ordered([(store, key), ...], max_bytes=limit, deadline=time.monotonic() + budget,
                            concurrency=8, link=Link(bytes_per_second))  # in the window's seeded order
    # each result: bytes, or NotFound, TooLarge, PeerTimeout (the peer's), Unfetched (our link),
    # StorageError, BadCommitment, ...

Setup: an AWS public-read bucket (validators read it unsigned)
1. Create the bucket (`aws s3api create-bucket --bucket BUCKET`, a name without dots).
2. Turn off "Block public access" for bucket policies only:
   `aws s3api put-public-access-block --bucket BUCKET --public-access-block-configuration
   BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=false,RestrictPublicBuckets=false`.
3. Allow anonymous GetObject: `python -c "from bistro.storage.s3 import public_read_policy;
   print(public_read_policy('BUCKET', listing=False))" > policy.json`, then
   `aws s3api put-bucket-policy --bucket BUCKET --policy file://policy.json`.
4. Run the miner with `--storage s3 --bucket BUCKET` and its write keys in `AWS_ACCESS_KEY_ID` /
   `AWS_SECRET_ACCESS_KEY`; it commits `s3://BUCKET`. Check: `curl -I https://BUCKET.s3.amazonaws.com/KEY`.

Setup: Cloudflare R2, public URL (plain HTTPS GETs)
1. Create the bucket in the dashboard (R2 > Create bucket), and an R2 API token with
   "Object Read & Write" on it for the miner: its access key id and secret go in `AWS_ACCESS_KEY_ID` /
   `AWS_SECRET_ACCESS_KEY`, with `--s3.endpoint_url https://ACCOUNT_ID.r2.cloudflarestorage.com
   --s3.region auto`.
2. Bucket > Settings > Public access: allow the r2.dev subdomain (or connect a custom domain) and copy
   its URL (`https://pub-<hash>.r2.dev`).
3. Run the miner with `--storage.public_url https://pub-<hash>.r2.dev`; it commits
   `https+get://pub-<hash>.r2.dev`. Check: `curl -I https://pub-<hash>.r2.dev/KEY`.
   (Cloudflare rate-limits r2.dev; a custom domain is the production choice.)

Setup: Cloudflare R2, read-only token (bucket stays private to the S3 API)
1. As above, the bucket and a read-write token for the miner.
2. R2 > Manage API tokens > Create: permission "Object Read only", applied to this bucket only.
   Note its Access Key ID (32 hex) and Secret Access Key (64 hex): both will be PUBLIC, on chain.
3. Run the miner with `--storage.read_key_id KEY_ID --storage.read_secret SECRET` (and the R2
   endpoint as above, or `--storage.r2_account ACCOUNT_ID`); it commits `r2://TOKEN/BUCKET`
   (bucket name at most 36 characters).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from ..config import ConfigError, Settings, StorageConfig
from .base import NotFound, ObjectInfo, PeerTimeout, StorageError, Store, TooLarge
from .commitment import (
    MAX_COMMITMENT,
    R2_ENDPOINT,
    R2_MAX_BUCKET,
    BadCommitment,
    Commitment,
    endpoint_of,
    is_loopback_host,
    pack_r2,
    parse_commitment,
    s3_api,
    s3_bucket,
)
from .fetch import Unfetched, fetch_ordered
from .gather import gather
from .link import Link
from .local import BadKey, LocalStore

__all__ = [
    "MAX_COMMITMENT", "R2_MAX_BUCKET", "BadCommitment", "BadKey", "Commitment", "LocalStore",
    "NotFound", "ObjectInfo", "PeerTimeout", "StorageError", "Store", "TooLarge", "bucket_commitment",
    "Link", "Unfetched", "fetch_ordered", "gather", "open_peer_store", "open_store", "parse_commitment", "private_allowed",
]  # fmt: skip

_R2_HOST = re.compile(r"^([0-9a-f]{32})\.r2\.cloudflarestorage\.com$")


def private_allowed(settings: Settings) -> bool:
    """Whether peer reads may go to loopback and private addresses: on the embedded chain, or when
    `storage.allow_private_endpoints` says so (tests, private deployments)."""
    return settings.chain.network == "embedded" or settings.storage.allow_private_endpoints


def _local(cfg: StorageConfig, root: str | Path | None, bucket: str) -> LocalStore:
    base = root or cfg.root
    if not base:
        raise ConfigError("storage.root: needed for local buckets (pass root= or set it)")
    return LocalStore(base, bucket)


def open_store(commitment: str, cfg: StorageConfig, *, root: str | Path | None = None) -> Store:
    """OUR OWN bucket, which `commitment` (or `cfg.bucket`'s form) names, read and written with our
    keys. Never for a peer's bucket: use `open_peer_store`. `root` (else `cfg.root`) holds local buckets."""
    from .s3 import S3Store

    c = parse_commitment(commitment)
    if c.kind == "s3":
        return S3Store(c.bucket, cfg, endpoint_url="")
    if c.kind == "https":
        return S3Store(c.bucket, cfg, endpoint_url=c.endpoint)
    if c.kind == "r2":
        return S3Store(c.bucket, cfg, endpoint_url=cfg.r2_endpoint.format(account=c.account))
    if c.kind == "get":
        raise BadCommitment("a public URL is where others read; name the bucket itself to write it")
    if cfg.backend == "s3":
        return S3Store(s3_bucket(c.bucket, commitment), cfg)
    return _local(cfg, root, c.bucket)


def _peer_commitment(c: Commitment, cfg: StorageConfig, allow_private: bool) -> Commitment:
    """Where a peer read for `c` goes, with the reader's own settings filled in."""
    if c.kind == "name":
        if not allow_private:
            raise BadCommitment(f"{c.bucket!r}: a bare bucket name is for the embedded chain only")
        if not cfg.endpoint_url:
            raise BadCommitment(f"{c.bucket!r}: a bare name and no storage.endpoint_url")
        return s3_api(cfg.endpoint_url, c.bucket)
    if c.kind == "r2" and cfg.r2_endpoint != R2_ENDPOINT:
        return replace(c, endpoint=endpoint_of(cfg.r2_endpoint.format(account=c.account)))
    return c


def open_peer_store(
    commitment: str, cfg: StorageConfig, *, root: str | Path | None = None, allow_private: bool
) -> Store:
    """A peer's bucket, read-only, read without our credentials (see the module docstring).
    Raises BadCommitment for a commitment we may not read; names are resolved and checked again at
    every read, on the address connected to."""
    from .netguard import check_ip, literal_ip
    from .peer import PeerStore

    c = parse_commitment(commitment)
    if c.kind == "name" and cfg.backend == "local":
        if not allow_private:
            raise BadCommitment(f"{c.bucket!r}: a bare bucket name is for the embedded chain only")
        return _local(cfg, root, c.bucket)
    c = _peer_commitment(c, cfg, allow_private)
    ip = literal_ip(c.host)
    plain = c.endpoint.startswith("http://")
    if ip is not None:
        check_ip(ip, c.host, allow_private=allow_private, plain_http=plain)
    elif not allow_private and (is_loopback_host(c.host) or c.host.endswith(".localhost")):
        raise BadCommitment(f"{c.host}: loopback")
    return PeerStore(c, cfg, allow_private=allow_private)


def _r2_account(cfg: StorageConfig) -> str:
    if cfg.r2_account:
        return cfg.r2_account
    m = _R2_HOST.match(urlsplit(cfg.endpoint_url).hostname or "")
    if m is None:
        raise ConfigError("storage.r2_account: needed for read_key_id (or an R2 endpoint_url)")
    return m.group(1)


def _public_url_commitment(url: str) -> str:
    url = url.rstrip("/")
    for plain, committed in (("https://", "https+get://"), ("http://", "http+get://")):
        if url.startswith(plain):
            return committed + url[len(plain) :]
    return url


def bucket_commitment(cfg: StorageConfig) -> str:
    """What a node commits on chain for its own bucket `cfg.bucket`: others read it with it.
    `storage.public_url` commits that URL (https+get://); `storage.read_key_id`/`read_secret` an
    r2:// token; otherwise the bucket (s3://, https://endpoint/bucket, or a bare local name)."""
    c = parse_commitment(cfg.bucket)
    if cfg.public_url:
        out = _public_url_commitment(cfg.public_url)
    elif cfg.read_key_id:
        out = pack_r2(_r2_account(cfg), cfg.read_key_id, cfg.read_secret, c.bucket)
    elif c.kind == "s3":
        out = f"s3://{c.bucket}"
    elif c.kind == "https":
        out = f"{c.endpoint}/{c.bucket}"
    elif c.kind in ("get", "r2"):
        out = cfg.bucket
    elif cfg.backend == "local":
        out = c.bucket
    elif cfg.endpoint_url:
        out = f"{cfg.endpoint_url.rstrip('/')}/{s3_bucket(c.bucket, cfg.bucket)}"
    else:
        out = f"s3://{s3_bucket(c.bucket, cfg.bucket)}"
    if out.startswith("https://") and parse_commitment(out).host.endswith(".r2.cloudflarestorage.com"):
        # validators read unsigned; R2's S3 API answers them 403: commit a way they can read
        raise ConfigError(
            "storage.public_url: R2 refuses unsigned reads; set storage.public_url (r2.dev or a custom"
            " domain) or storage.read_key_id and storage.read_secret (a read-only token)"
        )
    parse_commitment(out)  # an endpoint too long, or http off loopback, fails here, at home
    return out
