"""Storage contract: the same suite against LocalStore and S3Store (moto on loopback), plus the local
store's key checks and crash safety, commitments, gather and the fault-injecting store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bistro.config import ConfigError, StorageConfig
from bistro.storage import (
    BadCommitment,
    BadKey,
    Commitment,
    LocalStore,
    NotFound,
    PeerTimeout,
    StorageError,
    TooLarge,
    bucket_commitment,
    gather,
    open_store,
    parse_commitment,
)
from bistro.storage.local import TEMP_PREFIX
from tests.support.faulty import FaultyStore

MB = 1024 * 1024
BIG = os.urandom(50 * MB)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path):
    if request.param == "local":
        return LocalStore(tmp_path, "bucket")
    return request.getfixturevalue("s3_store")


# -- the contract, both stores -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 50 * MB])
def test_round_trip(store, size: int) -> None:
    data = BIG[:size]
    store.put("bistro/1/deltas/7/hk.safetensors", data)
    assert store.get("bistro/1/deltas/7/hk.safetensors") == data
    assert store.head("bistro/1/deltas/7/hk.safetensors").size == size


def test_overwrite_replaces_whole_object(store) -> None:
    store.put("k", b"first version, longer")
    store.put("k", b"second")
    assert store.get("k") == b"second"


def _seed(store, keys: list[str]) -> None:
    """Write many small objects. On S3 straight into the loopback server's memory (moto answers
    ~100 PUTs a second, too slow for 1,100); the listing under test still goes over HTTP."""
    if isinstance(store, LocalStore):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda k: store.put(k, k.encode()), keys))
        return
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for k in keys:
        backend.put_object(store.bucket, k, k.encode())


def test_list_more_than_1000_keys_sorted_with_prefix(store) -> None:
    keys = [f"p/{i:04d}" for i in range(1100)]
    _seed(store, keys[:-2])
    store.put(keys[-2], keys[-2].encode())
    store.put(keys[-1], keys[-1].encode())
    store.put("q/other", b"x")
    listed = store.list("p/")
    assert [o.key for o in listed] == keys
    assert all(o.size == 6 for o in listed)
    assert [o.key for o in store.list("p/10")] == keys[1000:]
    assert len(store.list()) == 1101
    assert store.list("nothing/") == []


def test_missing_key(store) -> None:
    with pytest.raises(NotFound):
        store.get("no/such/key")
    assert store.head("no/such/key") is None
    store.delete("no/such/key")  # not an error


def test_delete(store) -> None:
    store.put("a/b/c", b"1")
    store.put("a/d", b"2")
    store.delete("a/b/c")
    with pytest.raises(NotFound):
        store.get("a/b/c")
    assert [o.key for o in store.list("a/")] == ["a/d"]


def test_too_large(store) -> None:
    store.put("big", BIG[: 2 * MB])
    with pytest.raises(TooLarge) as e:
        store.get("big", max_bytes=MB)
    assert (e.value.size, e.value.max_bytes) == (2 * MB, MB)
    assert store.get("big", max_bytes=2 * MB) == BIG[: 2 * MB]


def test_head_time_is_utc_and_current(store) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)
    store.put("t", b"abc")
    info = store.head("t")
    assert info.last_modified.tzinfo is not None and info.last_modified.utcoffset() == timedelta(0)
    assert before <= info.last_modified <= datetime.now(UTC) + timedelta(seconds=2)
    assert store.list("t") == [info]


# -- local store ----------------------------------------------------------------------------------


BAD_KEYS = [
    "",
    "/etc/passwd",
    "../x",
    "a/../../x",
    "a//b",
    "a/./b",
    "a/",
    "a\\b",
    "a\x00b",
    ".",
    f"a/{TEMP_PREFIX}1",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_local_rejects_bad_keys(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "root", "b")
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.head(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(BadKey):
            call()
    assert not (tmp_path / "x").exists() and not (tmp_path / "root").exists()


def test_local_accepts_dotted_names_and_missing_bucket(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "b")
    assert store.list() == [] and store.head("x") is None
    with pytest.raises(NotFound):
        store.get("x")
    for key in ("a..b", "a/.hidden", "v1.2/x.safetensors"):
        store.put(key, key.encode())
        assert store.get(key) == key.encode()
    with pytest.raises(BadKey):
        LocalStore(tmp_path, "../escape")


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_local_too_large_reads_no_body(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "b")
    store.put("big", BIG[: 20 * MB])
    r0 = _rchar()
    with pytest.raises(TooLarge):
        store.get("big", max_bytes=MB)
    r1 = _rchar()
    store.get("big")
    r2 = _rchar()
    assert r1 - r0 < MB  # the refused read pulled (almost) nothing from disk
    assert r2 - r1 >= 20 * MB  # while a real read is visible in the same counter


WRITER = """
import sys
from bistro.storage.local import LocalStore
store = LocalStore(sys.argv[1], "b")
size = int(sys.argv[2])
store.put("obj", bytes([0]) * size)
print("ready", flush=True)
i = 1
while True:
    store.put("obj", bytes([i % 256]) * size)
    i += 1
"""


def test_local_planted_keys_are_the_owners_fault_and_never_hang(tmp_path: Path) -> None:
    """What a bucket's owner can plant at its key: each a StorageError (peer_error), at once."""
    store = LocalStore(tmp_path, "b")
    store.put("real", b"x")
    (store.dir / "loop").symlink_to("loop")  # a self-referencing symlink (ELOOP)
    (store.dir / "ping").symlink_to("pong")
    (store.dir / "pong").symlink_to("ping")
    os.mkfifo(store.dir / "fifo")  # opening it would block for a writer
    (store.dir / "dir").mkdir()
    t0 = time.monotonic()
    for key in ("loop", "ping", "fifo", "dir"):
        with pytest.raises(StorageError):
            store.get(key, max_bytes=10, deadline=time.monotonic() + 1)
    assert time.monotonic() - t0 < 1
    (store.dir / "out").symlink_to(tmp_path)  # out of the bucket: never followed
    with pytest.raises(NotFound):
        store.get("out")
    with pytest.raises(PeerTimeout):  # a deadline already past: not even opened
        store.get("real", deadline=time.monotonic() - 1)
    assert store.get("real", deadline=time.monotonic() + 1) == b"x"


@pytest.mark.slow
def test_local_killed_writer_leaves_no_partial_object(tmp_path: Path) -> None:
    size = 8 * MB
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(size)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        bucket = tmp_path / "buckets" / "b"
        deadline = time.monotonic() + 20
        while not any(p.name.startswith(TEMP_PREFIX) for p in bucket.iterdir()):  # catch it mid-write
            assert time.monotonic() < deadline, "writer never seen mid-write"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    store = LocalStore(tmp_path, "b")
    data = store.get("obj")
    assert len(data) == size and data.count(data[:1]) == size  # one whole version, not a mix
    assert [o.key for o in store.list()] == ["obj"]  # the stray temp file is not listed


# -- commitments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "commitment, parsed",
    [
        ("my-bucket", Commitment("name", "my-bucket")),
        ("s3://my-bucket", Commitment("s3", "my-bucket", "https://my-bucket.s3.amazonaws.com")),
        (
            "https://acc.r2.cloudflarestorage.com/my-bucket",
            Commitment("https", "my-bucket", "https://acc.r2.cloudflarestorage.com", "/my-bucket"),
        ),
        (
            "http://127.0.0.1:9000/my-bucket/",
            Commitment("https", "my-bucket", "http://127.0.0.1:9000", "/my-bucket"),
        ),
        ("https+get://pub-0123.r2.dev", Commitment("get", "", "https://pub-0123.r2.dev")),
        ("https+get://cdn.example.org/a/b/", Commitment("get", "", "https://cdn.example.org", "/a/b")),
        ("http+get://[::1]:8080/p", Commitment("get", "", "http://[::1]:8080", "/p")),
    ],
)
def test_parse_commitment(commitment: str, parsed) -> None:
    assert parse_commitment(commitment) == parsed


@pytest.mark.parametrize(
    "bad",
    ["", " b", "../b", "a/b", "ftp://x/b", "http://example.com/my-bucket", "https://host/a/b", "https://host/",
     "s3://My_Bucket", "s3://b/key", "https://user:pw@host/my-bucket", "x" * 129, "https://host:99999/bkt",
     "s3://dotted.bucket", "http+get://example.com", "https+get://h/../x", "https+get://h/?q", "r2://short/b",
     "r2://" + "A" * 86 + "/B_", "https://hôst/bkt", "gopher://h/b"],
)  # fmt: skip
def test_bad_commitments(bad: str) -> None:
    with pytest.raises(BadCommitment):
        parse_commitment(bad)


def test_open_store_and_own_commitment(tmp_path: Path) -> None:
    local = StorageConfig(bucket="mine")
    store = open_store("mine", local, root=tmp_path)
    assert isinstance(store, LocalStore) and store.dir == tmp_path / "buckets" / "mine"
    assert bucket_commitment(local) == "mine"
    with pytest.raises(ConfigError):
        open_store("mine", local)  # no root anywhere
    r2 = StorageConfig(backend="s3", bucket="mine", endpoint_url="https://acc.r2.cloudflarestorage.com/")
    with pytest.raises(ConfigError, match="public_url"):  # R2's S3 API: nobody could read it unsigned
        bucket_commitment(r2)
    minio = StorageConfig(backend="s3", bucket="mine", endpoint_url="https://minio.example.org:9000/")
    assert bucket_commitment(minio) == "https://minio.example.org:9000/mine"
    assert bucket_commitment(StorageConfig(backend="s3", bucket="mine")) == "s3://mine"
    with pytest.raises(BadCommitment):
        bucket_commitment(StorageConfig(backend="s3", bucket="mine", endpoint_url="http://10.0.0.1"))


# -- gather and faults ---------------------------------------------------------------------------


def test_gather_reports_each_item(tmp_path: Path) -> None:
    a, b = LocalStore(tmp_path, "a"), LocalStore(tmp_path, "b")
    a.put("k", b"small")
    b.put("k", b"x" * 2000)
    slow = FaultyStore(a, fail_rate=0.0, delay=5.0)
    broken = FaultyStore(a, fail_rate=1.0)
    items = [(a, "k"), (b, "k"), (a, "missing"), (slow, "k"), (broken, "k"), (b, "k")]
    t0 = time.monotonic()
    out = gather(items, max_bytes=1000, deadline=t0 + 0.5)
    assert time.monotonic() - t0 < 0.5 + 0.5  # the slow one is cut at the deadline, not after 5 s
    assert out[0] == b"small"
    assert [type(x) for x in out[1:]] == [TooLarge, NotFound, PeerTimeout, StorageError, TooLarge]
    assert gather([], max_bytes=1, deadline=time.monotonic() + 1) == []


def test_gather_one_deadline_for_all_items(tmp_path: Path) -> None:
    """The slow-peer case: 16 peers that sleep inside get() and a fast 17th. The fast one is not queued
    behind them, and the sleepers end at the shared deadline, not one timeout after another."""
    a = LocalStore(tmp_path, "a")
    a.put("k", b"fast")
    sleepers = [(FaultyStore(a, fail_rate=0.0, delay=30.0), "k") for _ in range(16)]
    t0 = time.monotonic()
    out = gather([*sleepers, (a, "k")], max_bytes=100, deadline=t0 + 1.0)
    assert time.monotonic() - t0 < 1.0 + 0.5
    assert out[-1] == b"fast" and all(isinstance(r, PeerTimeout) for r in out[:-1])


def test_faulty_store_is_seeded(tmp_path: Path) -> None:
    def pattern(seed: int) -> list[bool]:
        store = FaultyStore(LocalStore(tmp_path, "f"), fail_rate=0.3, seed=seed)
        out = []
        for i in range(200):
            try:
                store.head(f"k{i % 5}")
                out.append(True)
            except StorageError:
                out.append(False)
        return out

    assert pattern(1) == pattern(1)
    assert pattern(1) != pattern(2)
    assert 30 < pattern(1).count(False) < 90
    with pytest.raises(ValueError):
        FaultyStore(LocalStore(tmp_path, "f"), fail_rate=1.5)
