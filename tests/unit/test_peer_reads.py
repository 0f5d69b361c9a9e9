"""Peer reads against hostile servers: every server behaviour gets its named verdict by the deadline,
64 trickling sybils do not delay an honest peer, peer requests never carry our credentials, the SSRF
rules hold on the address actually connected to, and the AWS public-read and R2 read-token paths
work against the loopback S3 server."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator

import bittensor_core
import pytest
import torch

from bistro.config import ConfigError, StorageConfig, build_settings
from bistro.delta.signed import pack_signed, unpack_signed
from bistro.storage import (
    R2_MAX_BUCKET,
    BadCommitment,
    LocalStore,
    NotFound,
    PeerTimeout,
    StorageError,
    bucket_commitment,
    gather,
    netguard,
    open_peer_store,
    parse_commitment,
    private_allowed,
)
from bistro.storage.commitment import pack_r2
from bistro.storage.peer import PeerStore
from bistro.storage.s3 import S3Store
from bistro.verdicts import V, fetch_verdict

from ..support.hostile_server import BEHAVIOURS, HostileServer, tls_contexts

ALICE = bittensor_core.Keypair.create_from_uri("//Alice")
BLOB = pack_signed({"w": torch.arange(512, dtype=torch.float32)}, {"kind": "delta"}, ALICE)
MAX_BYTES = 64 * 1024
KEY = "bistro/212/deltas/7/5Alice.safetensors"
DEADLINE = 1.5
SLACK = 0.6
"""Seconds a verdict may come after the deadline (thread wake-up and scheduling on a busy CI box)."""
OUR_KEY_ID = "AKIAOURVALIDATORKEY0"

ACCOUNT, READ_KEY, READ_SECRET = "0123456789abcdef" * 2, "fedcba9876543210" * 2, "ab" * 32


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer(BLOB)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def our_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own (fake) AWS keys are in the environment: no peer request may carry them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OUR_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "our-very-secret-key")


def verdict(result: bytes | BaseException) -> V:
    """What the validator's rule makes of one fetch outcome: bytes go through the signed check."""
    if isinstance(result, BaseException):
        return fetch_verdict(result)
    try:
        unpack_signed(result, signer=ALICE.ss58_address, max_bytes=MAX_BYTES)
    except Exception as e:  # noqa: BLE001 -- mapped by the one rule, as the validator does
        return fetch_verdict(e)
    return V.ok


def assert_no_our_credentials(server: HostileServer) -> None:
    assert server.requests, "the server saw no request"
    for _, _, headers in server.requests:
        text = repr(headers)
        assert OUR_KEY_ID not in text and "our-very-secret-key" not in text


# -- every behaviour, its verdict, its time ----------------------------------------------------

EXPECTED = {
    "honest": V.ok,
    "not_found": V.missing,
    "no_last_modified": V.ok,  # a GET needs no Last-Modified, and the validator no longer HEADs
    "length_longer": V.peer_error,
    "length_shorter": V.bad_tensors,  # the blob cut at the lying length fails the signed check
    "content_range_star": V.peer_error,
    "status_500": V.peer_error,
    "status_503": V.peer_error,
    "slow_first_byte": V.timeout,
    "trickle": V.timeout,
    "hang_after_headers": V.timeout,
    "redirect_loopback": V.peer_error,
    "redirect_metadata": V.peer_error,
    "many_headers": V.peer_error,
    "huge_header": V.peer_error,
    "reset_mid_body": V.peer_error,
    "endless_chunked": V.too_large,
    "no_length_huge": V.too_large,
    "huge_declared": V.too_large,
    "garbage_status": V.peer_error,
}


def test_every_behaviour_has_an_expected_verdict() -> None:
    assert set(EXPECTED) == set(BEHAVIOURS)


@pytest.mark.parametrize("style", ["http+get", "s3-path"])
@pytest.mark.parametrize("behaviour", sorted(EXPECTED))
def test_hostile_behaviour_gets_its_verdict(hostile: HostileServer, behaviour: str, style: str) -> None:
    name = behaviour.replace("_", "-")
    commitment = f"http+get://127.0.0.1:{hostile.server_address[1]}/{name}"
    if style == "s3-path":
        commitment = f"{hostile.url}/{name}"
    store = open_peer_store(commitment, StorageConfig(retries=2), allow_private=True)
    t0 = time.monotonic()
    [result] = gather([(store, KEY)], max_bytes=MAX_BYTES, deadline=t0 + DEADLINE)
    took = time.monotonic() - t0
    assert verdict(result) == EXPECTED[behaviour], result
    assert took < DEADLINE + SLACK
    if behaviour.startswith("redirect"):
        assert [p for _, p, _ in hostile.requests] == [f"/{name}/{KEY}"]  # nothing followed
    if behaviour == "huge_declared":
        assert took < DEADLINE / 2  # refused on the header, not after waiting for the body
    assert_no_our_credentials(hostile)


def test_head_without_last_modified_is_the_peers_error(hostile: HostileServer) -> None:
    cfg = StorageConfig()
    store = open_peer_store(
        f"http+get://127.0.0.1:{hostile.server_address[1]}/no-last-modified", cfg, allow_private=True
    )
    with pytest.raises(StorageError, match="Last-Modified"):
        store.head(KEY)
    info = open_peer_store(f"{hostile.url}/honest", cfg, allow_private=True).head(KEY)
    assert info is not None and info.size == len(BLOB)
    # our own-bucket S3 client, pointed at the same server, no longer raises KeyError either
    with pytest.raises(StorageError, match="Last-Modified"):
        S3Store("no-last-modified", StorageConfig(endpoint_url=hostile.url, retries=0), anonymous=True).head(
            KEY
        )
    with pytest.raises(StorageError, match="size"):
        S3Store("content-range-star", StorageConfig(endpoint_url=hostile.url, retries=0), anonymous=True).get(
            KEY
        )


def test_a_read_without_deadline_is_still_bounded(hostile: HostileServer) -> None:
    """No deadline given (a master download): storage.timeout + max_bytes at 1 MiB/s, not forever."""
    store = open_peer_store(f"{hostile.url}/trickle", StorageConfig(timeout=1.0), allow_private=True)
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout):
        store.get(KEY, max_bytes=MAX_BYTES)
    assert time.monotonic() - t0 < 1.0 + MAX_BYTES / (1 << 20) + SLACK


def test_peer_store_is_read_only(hostile: HostileServer) -> None:
    store = open_peer_store(f"{hostile.url}/honest", StorageConfig(), allow_private=True)
    for op in (lambda: store.put(KEY, b"x"), lambda: store.delete(KEY), lambda: store.list()):
        with pytest.raises(StorageError):
            op()
    assert hostile.requests == []


# -- the deadline: 64 trickling sybils and one honest peer --------------------------------------


def test_64_trickling_sybils_cost_the_deadline_only() -> None:
    sybils = [HostileServer(BLOB) for _ in range(64)]
    honest = HostileServer(BLOB)
    try:
        cfg = StorageConfig()
        items = [(open_peer_store(f"{s.url}/trickle", cfg, allow_private=True), KEY) for s in sybils]
        items.insert(17, (open_peer_store(f"{honest.url}/honest", cfg, allow_private=True), KEY))
        deadline_s = 3.0
        t0 = time.monotonic()
        out = gather(items, max_bytes=MAX_BYTES, deadline=t0 + deadline_s)
        wall = time.monotonic() - t0
        print(f"64 trickling sybils + 1 honest: gather returned in {wall:.2f} s (deadline {deadline_s} s)")
        assert out[17] == BLOB
        assert all(isinstance(r, PeerTimeout) for i, r in enumerate(out) if i != 17)
        assert wall < deadline_s + 1.0
        time.sleep(0.5)  # the reads are bounded themselves: no thread keeps reading after the deadline
        assert not [t for t in threading.enumerate() if t.name.startswith("gather-")]
    finally:
        for s in [*sybils, honest]:
            s.stop()


# -- SSRF: where a peer read may go --------------------------------------------------------------


@pytest.mark.parametrize(
    "address, refused",
    [
        ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.1.1", "private"),
        ("172.16.0.9", "private"), ("169.254.169.254", "link-local"), ("100.100.0.1", "CGNAT"),
        ("0.0.0.0", "unspecified"), ("224.0.0.251", "multicast"), ("240.0.0.1", "reserved"),
        ("::1", "loopback"), ("fe80::1", "link-local"), ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"), ("2002:a00:1::", "private"), ("ff02::1", "multicast"),
        ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("104.18.0.1", None),
    ],
)  # fmt: skip
def test_address_rules(address: str, refused: str | None) -> None:
    import ipaddress

    why = netguard.refusal(ipaddress.ip_address(address))
    assert (why is None) if refused is None else (why is not None and refused in why), why


@pytest.mark.parametrize(
    "commitment",
    ["https://127.0.0.1/bkt", "https://[::1]:9000/bkt", "https://169.254.169.254/bkt", "https://10.0.0.8/bkt",
     "https+get://localhost", "https+get://[::ffff:7f00:1]", "https+get://foo.localhost/x", "my-bucket"],
)  # fmt: skip
def test_private_commitments_refused_on_a_real_network(commitment: str) -> None:
    with pytest.raises(BadCommitment):
        open_peer_store(commitment, StorageConfig(backend="s3"), allow_private=False)


def test_plain_http_never_leaves_loopback() -> None:
    for bad in ("http://10.0.0.1/bkt", "http+get://example.com", "http://[fe80::1]/bkt"):
        with pytest.raises(BadCommitment):
            open_peer_store(bad, StorageConfig(), allow_private=True)


def test_loopback_server_refused_without_the_setting(hostile: HostileServer) -> None:
    with pytest.raises(BadCommitment):
        open_peer_store(f"{hostile.url}/honest", StorageConfig(), allow_private=False)
    assert hostile.requests == []


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """The resolver answers `answers` for those names (what a peer's DNS server could answer)."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kw):  # noqa: ANN001, ANN202 -- socket's own signature
        if host in answers:
            asked.append(host)
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in answers[host]]  # fmt: skip
        return real(host, port, *args, **kw)

    monkeypatch.setattr(netguard.socket, "getaddrinfo", getaddrinfo)
    return asked


def test_names_resolving_to_private_addresses_are_refused_at_read(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = hostile.server_address[1]
    _fake_dns(monkeypatch, {"evil.example": ["10.9.8.7"], "mixed.example": ["93.184.216.34", "127.0.0.1"]})
    for host in ("evil.example", "mixed.example"):
        store = open_peer_store(f"https+get://{host}:{port}/honest", StorageConfig(), allow_private=False)
        [result] = gather([(store, KEY)], max_bytes=MAX_BYTES, deadline=time.monotonic() + DEADLINE)
        assert verdict(result) == V.bad_commitment, result
    assert hostile.requests == []


def test_reader_connects_to_the_address_it_checked(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One lookup per read, in our check; the connection goes to that address (http.client never
    resolves again: it is handed the connected socket)."""
    port = hostile.server_address[1]
    asked = _fake_dns(monkeypatch, {"localhost": ["127.0.0.1"]})
    store = open_peer_store(f"http+get://localhost:{port}/honest", StorageConfig(), allow_private=True)
    for n in (1, 2):
        assert store.get(KEY, max_bytes=MAX_BYTES, deadline=time.monotonic() + DEADLINE) == BLOB
        assert asked == ["localhost"] * n
    assert hostile.requests[-1][2]["Host"] == f"localhost:{port}"


def test_tls_keeps_sni_and_hostname_checks(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    server_ctx, client_ctx = tls_contexts("bucket.example", tmp_path)
    server = HostileServer(BLOB, tls=server_ctx)
    port = server.server_address[1]
    _fake_dns(monkeypatch, {"bucket.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})

    def read(host: str, ctx: ssl.SSLContext | None) -> bytes | BaseException:
        store = PeerStore(parse_commitment(f"https+get://{host}:{port}/honest"), StorageConfig(),
                          allow_private=True, ssl_context=ctx)  # fmt: skip
        return gather([(store, KEY)], max_bytes=MAX_BYTES, deadline=time.monotonic() + 3)[0]

    try:
        assert read("bucket.example", client_ctx) == BLOB  # to 127.0.0.1, with the name's SNI
        assert server.sni == ["bucket.example"] and server.requests[-1][2]["Host"] == f"bucket.example:{port}"
        wrong_name = read("other.example", client_ctx)  # a certificate for another name
        assert verdict(wrong_name) == V.peer_error and "TLS" in str(wrong_name)
        untrusted = read("bucket.example", None)  # the system's CAs do not know the test CA
        assert verdict(untrusted) == V.peer_error and "TLS" in str(untrusted)
        assert len(server.requests) == 1  # no request went out over a connection that failed its checks
    finally:
        server.stop()


def test_tls_handshake_that_never_answers_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts the TCP connection, never speaks TLS
    try:
        port = listener.getsockname()[1]
        store = open_peer_store(f"https://127.0.0.1:{port}/bkt", StorageConfig(), allow_private=True)
        t0 = time.monotonic()
        [result] = gather([(store, KEY)], max_bytes=MAX_BYTES, deadline=t0 + DEADLINE)
        assert verdict(result) == V.timeout and time.monotonic() - t0 < DEADLINE + SLACK
    finally:
        listener.close()


# -- public reads through the loopback S3 server, and R2's read-only token -----------------------


def test_aws_style_public_read_bucket_unsigned(s3_store, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_store.put(KEY, BLOB)
    cfg = StorageConfig(backend="s3", endpoint_url=s3_store.endpoint_url)
    peer = open_peer_store(f"{s3_store.endpoint_url}/{s3_store.bucket}", cfg, allow_private=True)
    [before] = gather([(peer, KEY)], max_bytes=MAX_BYTES, deadline=time.monotonic() + 5)
    assert verdict(before) == V.peer_error and "403" in str(before)  # private until the policy is set
    s3_store.create_bucket(public_read=True)  # the documented policy: GetObject for anyone
    [after] = gather([(peer, KEY)], max_bytes=MAX_BYTES, deadline=time.monotonic() + 5)
    assert after == BLOB and verdict(after) == V.ok


def _moto_auth(url: str, count: str) -> None:
    req = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 -- our loopback moto server
        r.read()


@pytest.fixture
def r2_like(s3_server, s3_store) -> Iterator[tuple[S3Store, StorageConfig]]:
    """The loopback S3 server checking SigV4, with an IAM user holding a read-only key in R2's
    format (32-hex id, 64-hex secret) allowed s3:GetObject on `s3_store`'s bucket."""
    import boto3
    from moto.iam.models import iam_backends

    iam = boto3.client("iam", endpoint_url=s3_server.url, region_name="us-east-1")
    user = f"r2-reader-{s3_store.bucket}"
    iam.create_user(UserName=user)
    arn = f"arn:aws:s3:::{s3_store.bucket}/*"
    policy = f'{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"{arn}"}}]}}'
    iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=policy)
    iam.create_access_key(UserName=user)
    # R2 key ids are 32 hex and secrets 64 hex; moto mints AWS-shaped ones, so give this one R2's shape
    backend = next(iter(iam_backends.values()))["aws"]
    key = backend.users[user].access_keys[0]
    key.access_key_id, key.secret_access_key = READ_KEY, READ_SECRET
    s3_store.put(KEY, BLOB)
    cfg = StorageConfig(backend="s3", r2_endpoint=s3_server.url, retries=0)
    _moto_auth(s3_server.url, "0")
    try:
        yield s3_store, cfg
    finally:
        _moto_auth(s3_server.url, "inf")


def test_r2_read_token_signs_with_the_peers_key(r2_like) -> None:
    store, cfg = r2_like
    commitment = pack_r2(ACCOUNT, READ_KEY, READ_SECRET, store.bucket)
    peer = open_peer_store(commitment, cfg, allow_private=True)
    assert peer.get(KEY, max_bytes=MAX_BYTES, deadline=time.monotonic() + 5) == BLOB
    wrong = pack_r2(ACCOUNT, READ_KEY, "cd" * 32, store.bucket)
    [bad] = gather([(open_peer_store(wrong, cfg, allow_private=True), KEY)], max_bytes=MAX_BYTES,
                   deadline=time.monotonic() + 5)  # fmt: skip
    assert verdict(bad) == V.peer_error and "403" in str(bad)  # moto checked the signature
    unsigned = open_peer_store(f"{cfg.r2_endpoint}/{store.bucket}", cfg, allow_private=True)
    with pytest.raises(StorageError, match="403"):
        unsigned.get(KEY, deadline=time.monotonic() + 5)


def test_r2_requests_carry_the_peers_key_not_ours(hostile: HostileServer) -> None:
    cfg = StorageConfig(r2_endpoint=hostile.url)
    peer = open_peer_store(pack_r2(ACCOUNT, READ_KEY, READ_SECRET, "honest"), cfg, allow_private=True)
    assert peer.get(KEY, max_bytes=MAX_BYTES, deadline=time.monotonic() + 5) == BLOB
    [(_, path, headers)] = hostile.requests
    assert path == f"/honest/{KEY}"
    assert headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={READ_KEY}/")
    assert_no_our_credentials(hostile)
    for style in (f"{hostile.url}/honest", f"http+get://127.0.0.1:{hostile.server_address[1]}/honest"):
        open_peer_store(style, cfg, allow_private=True).get(KEY, deadline=time.monotonic() + 5)
        assert "Authorization" not in hostile.requests[-1][2]  # public reads go unsigned
    assert_no_our_credentials(hostile)


# -- commitments a miner publishes ---------------------------------------------------------------


def test_r2_token_commitment_fits_and_round_trips() -> None:
    bucket = "b" * R2_MAX_BUCKET
    commitment = pack_r2(ACCOUNT.upper(), READ_KEY, READ_SECRET, bucket)
    assert len(commitment.encode()) <= 128 and R2_MAX_BUCKET == 36
    c = parse_commitment(commitment)
    assert (c.kind, c.account, c.key_id, c.secret, c.bucket) == ("r2", ACCOUNT, READ_KEY, READ_SECRET, bucket)
    assert c.endpoint == f"https://{ACCOUNT}.r2.cloudflarestorage.com" and READ_SECRET not in repr(c)
    with pytest.raises(BadCommitment):
        pack_r2(ACCOUNT, READ_KEY, READ_SECRET, "b" * (R2_MAX_BUCKET + 1))
    with pytest.raises(BadCommitment):
        pack_r2(ACCOUNT, "AKIA0123", READ_SECRET, bucket)


def test_bucket_commitment_for_each_public_read_style() -> None:
    r2 = f"https://{ACCOUNT}.r2.cloudflarestorage.com"
    assert bucket_commitment(StorageConfig(backend="s3", bucket="mine")) == "s3://mine"
    token = bucket_commitment(
        StorageConfig(
            backend="s3", bucket="mine", endpoint_url=r2, read_key_id=READ_KEY, read_secret=READ_SECRET
        )
    )
    assert token == pack_r2(ACCOUNT, READ_KEY, READ_SECRET, "mine")
    url = StorageConfig(backend="s3", bucket="mine", endpoint_url=r2, public_url="https://pub-abc.r2.dev/")
    assert bucket_commitment(url) == "https+get://pub-abc.r2.dev"
    with pytest.raises(ConfigError):  # a token without a way to know the account
        bucket_commitment(
            StorageConfig(backend="s3", bucket="mine", read_key_id=READ_KEY, read_secret=READ_SECRET)
        )
    with pytest.raises(ConfigError):
        StorageConfig(read_key_id=READ_KEY)  # a key id without its secret


def test_private_allowed_follows_the_chain_and_the_setting(tmp_path) -> None:
    embedded = build_settings()
    real = build_settings(overrides={"subtensor.network": "finney"})
    opted_in = build_settings(
        overrides={"subtensor.network": "finney", "storage.allow_private_endpoints": "true"}
    )
    assert (private_allowed(embedded), private_allowed(real), private_allowed(opted_in)) == (
        True,
        False,
        True,
    )
    local = StorageConfig(root=str(tmp_path))
    store = open_peer_store("my-bucket", local, allow_private=private_allowed(embedded))
    assert isinstance(store, LocalStore) and store.dir == tmp_path / "buckets" / "my-bucket"
    for cfg in (local, StorageConfig(backend="s3", endpoint_url="http://127.0.0.1:9")):
        with pytest.raises(BadCommitment):  # a bare name would open it on OUR endpoint, with OUR keys
            open_peer_store("my-bucket", cfg, allow_private=private_allowed(real))


# -- byte ranges: the slices of unsampled deltas ---------------------------------------------------


def test_range_reads_through_the_loopback_s3_server(s3_store) -> None:
    """A slice is two `Range` reads of a public-read object (moto answers 206 as S3 and R2 do)."""
    s3_store.put(KEY, BLOB)
    s3_store.create_bucket(public_read=True)
    cfg = StorageConfig(backend="s3", endpoint_url=s3_store.endpoint_url)
    peer = open_peer_store(f"{s3_store.endpoint_url}/{s3_store.bucket}", cfg, allow_private=True)
    deadline = time.monotonic() + 5
    assert peer.get_range(KEY, 0, 64, deadline=deadline) == BLOB[:64]
    assert peer.get_range(KEY, 100, 300, deadline=deadline) == BLOB[100:400]
    assert peer.get_range(KEY, len(BLOB) - 10, 64, deadline=deadline) == BLOB[-10:]  # cut at its end
    with pytest.raises(StorageError, match="416"):  # a range past the object's end
        peer.get_range(KEY, len(BLOB) + 10, 64, deadline=deadline)


def test_range_reads_refuse_whole_objects_and_every_hostile_server_by_the_deadline(
    hostile: HostileServer,
) -> None:
    """A server that ignores the range (200: the whole object) is refused before its body is read;
    every hostile behaviour ends in an error by the deadline, never a hang or a crash."""
    store = open_peer_store(f"{hostile.url}/honest", StorageConfig(retries=0), allow_private=True)
    with pytest.raises(StorageError, match="HTTP 200"):
        store.get_range(KEY, 0, 64, deadline=time.monotonic() + DEADLINE)
    assert hostile.requests[-1][2]["Range"] == "bytes=0-63"
    results: dict[str, BaseException | bytes] = {}

    def read(name: str) -> None:
        peer = open_peer_store(f"{hostile.url}/{name.replace('_', '-')}", StorageConfig(retries=1),
                               allow_private=True)  # fmt: skip
        try:
            results[name] = peer.get_range(KEY, 0, 64, deadline=t0 + DEADLINE)
        except Exception as e:  # noqa: BLE001 -- what each read ended in is the assertion
            results[name] = e

    t0 = time.monotonic()
    threads = [threading.Thread(target=read, args=(name,)) for name in BEHAVIOURS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + SLACK + 1)
    assert time.monotonic() - t0 < DEADLINE + SLACK
    assert set(results) == set(BEHAVIOURS)
    for name, result in results.items():  # an error, or at most the bytes asked for (a short 206)
        ok = isinstance(result, bytes) and len(result) <= 64
        assert ok or isinstance(result, StorageError | PeerTimeout | NotFound), (name, result)
