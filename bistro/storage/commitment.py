"""What a node commits on chain for its bucket, parsed into one `Commitment` (formats: see
`bistro/storage/__init__.py`). Pure: no network, no credentials of ours."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import SplitResult, quote, urlsplit

from .local import BadKey, check_bucket_name

MAX_COMMITMENT = 128
"""Bytes a commitment may take on chain."""

R2_PACKED = 86
"""Characters of an r2:// token: base64url (no padding) of account id 16 B + key id 16 B + secret 32 B."""
R2_MAX_BUCKET = MAX_COMMITMENT - len("r2://") - R2_PACKED - len("/")
"""The longest bucket name an r2:// commitment can carry (36)."""
R2_ENDPOINT = "https://{account}.r2.cloudflarestorage.com"
"""R2's S3 API for an account: where r2:// reads go (signed with the committed read-only token)."""

_S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PATH_SEG = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%-]+$")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?$")


class BadCommitment(ValueError):
    """A bucket commitment that names no bucket we may read; the message says why (never a secret)."""


@dataclass(frozen=True)
class Commitment:
    """One parsed commitment. Objects are at `endpoint + prefix + "/" + key`."""

    kind: str
    """`name` (embedded only), `s3` (s3://bucket on AWS), `https` (an S3 API, path style),
    `get` (a plain public base URL), `r2` (R2 with a read-only token)."""
    bucket: str = ""
    """The bucket (empty for `get`, whose URL implies it)."""
    endpoint: str = ""
    """`scheme://host[:port]` requests go to (empty for a bare name: the reader's own setting)."""
    prefix: str = ""
    """The URL path before each key (`/bucket`, `/some/prefix` or empty)."""
    account: str = ""
    """r2: the 32-hex account id."""
    key_id: str = ""
    """r2: the peer's read-only access key id (32 hex)."""
    secret: str = field(default="", repr=False)
    """r2: that key's secret (64 hex): published by the peer on purpose, but kept out of reprs."""

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    def url(self, key: str) -> str:
        """The object's URL (the key percent-quoted, `/` kept)."""
        return f"{self.endpoint}{self.prefix}/{quote(key, safe='/-_.~')}"


def s3_bucket(name: str, what: str) -> str:
    """`name` if it is a valid S3 bucket name; BadCommitment naming `what` otherwise."""
    if not _S3_BUCKET_RE.match(name) or ".." in name:
        raise BadCommitment(f"{what}: {name!r} is not an S3 bucket name")
    return name


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback IP literal (127/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoint(url: SplitResult, what: str, *, tls_scheme: str, plain_scheme: str) -> str:
    """`scheme://host[:port]` of a split URL, with the http-only-on-loopback rule."""
    if url.scheme not in (tls_scheme, plain_scheme) or not url.hostname:
        raise BadCommitment(f"{what}: scheme must be {tls_scheme} (or {plain_scheme} on loopback)")
    if url.scheme == plain_scheme and not is_loopback_host(url.hostname):
        raise BadCommitment(f"{what}: plain http only on loopback")
    if url.query or url.fragment or url.username or url.password or "@" in url.netloc:
        raise BadCommitment(f"{what}: no query, fragment or credentials allowed")
    try:
        port = url.port
    except ValueError:
        raise BadCommitment(f"{what}: bad port") from None
    scheme = "https" if url.scheme == tls_scheme else "http"
    host = url.hostname
    if not _HOST_RE.match(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise BadCommitment(f"{what}: {host!r} is not a host name or IP address") from None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def _check_text(commitment: object) -> str:
    if not isinstance(commitment, str) or not commitment.strip():
        raise BadCommitment("empty commitment")
    if len(commitment.encode()) > MAX_COMMITMENT:
        raise BadCommitment(f"commitment longer than {MAX_COMMITMENT} bytes")
    if any(ord(ch) < 33 or ord(ch) > 126 for ch in commitment):
        raise BadCommitment(f"{commitment!r}: whitespace, control or non-ASCII characters")
    return commitment


def parse_commitment(commitment: str) -> Commitment:
    """The `Commitment` a string names; BadCommitment (with the reason) for anything else."""
    text = _check_text(commitment)
    if "://" not in text:
        try:
            return Commitment("name", bucket=check_bucket_name(text))
        except BadKey as e:
            raise BadCommitment(str(e)) from None
    scheme = text.split("://", 1)[0]
    if scheme == "s3":
        return _parse_s3(text)
    if scheme == "r2":
        return _parse_r2(text)
    if scheme in ("https+get", "http+get"):
        return _parse_get(text)
    return _parse_https(text)


def _parse_s3(text: str) -> Commitment:
    url = urlsplit(text)
    if url.path.strip("/") or url.query or url.fragment:
        raise BadCommitment(f"{text!r}: s3://bucket takes no path")
    bucket = s3_bucket(url.netloc, text)
    if "." in bucket:  # *.s3.amazonaws.com's certificate covers one label: a dotted name fails TLS
        raise BadCommitment(f"{text!r}: dotted bucket: commit https://s3.<region>.amazonaws.com/{bucket}")
    return Commitment("s3", bucket=bucket, endpoint=f"https://{bucket}.s3.amazonaws.com")


def _parse_https(text: str) -> Commitment:
    url = urlsplit(text)
    parts = url.path.strip("/").split("/")
    if len(parts) != 1 or not parts[0]:
        raise BadCommitment(f"{text!r}: want https://endpoint/bucket")
    return s3_api(f"{url.scheme}://{url.netloc}", parts[0])


def endpoint_of(url: str) -> str:
    """`https://host[:port]` (or `http://` on loopback) of an endpoint URL; BadCommitment else."""
    split = urlsplit(url.rstrip("/"))
    if split.path:
        raise BadCommitment(f"{url!r}: an endpoint takes no path")
    return _endpoint(split, repr(url), tls_scheme="https", plain_scheme="http")


def s3_api(endpoint_url: str, bucket: str) -> Commitment:
    """Bucket `bucket` on the S3 API at `endpoint_url`, read path style."""
    bucket = s3_bucket(bucket, f"{endpoint_url}/{bucket}")
    return Commitment("https", bucket=bucket, endpoint=endpoint_of(endpoint_url), prefix=f"/{bucket}")


def _parse_get(text: str) -> Commitment:
    url = urlsplit(text)
    endpoint = _endpoint(url, repr(text), tls_scheme="https+get", plain_scheme="http+get")
    segs = [s for s in url.path.split("/") if s]
    if any(s in (".", "..") or not _PATH_SEG.match(s) for s in segs):
        raise BadCommitment(f"{text!r}: bad path segment")
    return Commitment("get", endpoint=endpoint, prefix="".join(f"/{s}" for s in segs))


def _parse_r2(text: str) -> Commitment:
    packed, _, bucket = text[len("r2://") :].partition("/")
    if len(packed) != R2_PACKED or not re.fullmatch(r"[A-Za-z0-9_-]+", packed):
        raise BadCommitment(f"r2:// commitment: the token must be {R2_PACKED} base64url characters")
    try:
        raw = base64.urlsafe_b64decode(packed + "==")
    except (binascii.Error, ValueError):
        raise BadCommitment("r2:// commitment: the token is not base64url") from None
    if len(raw) != 64:
        raise BadCommitment("r2:// commitment: the token must hold 64 bytes")
    bucket = s3_bucket(bucket, "r2:// commitment")
    account, key_id, secret = raw[:16].hex(), raw[16:32].hex(), raw[32:].hex()
    endpoint = R2_ENDPOINT.format(account=account)
    return Commitment("r2", bucket, endpoint, f"/{bucket}", account, key_id, secret)


def pack_r2(account: str, key_id: str, secret: str, bucket: str) -> str:
    """The r2:// commitment for an R2 bucket and a read-only token (account id and key id 32 hex,
    secret 64 hex, as Cloudflare shows them); BadCommitment if they do not fit."""
    account, key_id, secret = account.lower(), key_id.lower(), secret.lower()
    if not (_HEX32.match(account) and _HEX32.match(key_id) and _HEX64.match(secret)):
        raise BadCommitment("r2: account id and access key id must be 32 hex, the secret 64 hex")
    s3_bucket(bucket, "r2")
    if len(bucket) > R2_MAX_BUCKET:
        raise BadCommitment(f"r2: bucket names up to {R2_MAX_BUCKET} characters fit in a commitment")
    raw = bytes.fromhex(account + key_id + secret)
    return f"r2://{base64.urlsafe_b64encode(raw).decode().rstrip('=')}/{bucket}"
