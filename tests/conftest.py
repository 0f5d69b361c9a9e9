"""Shared fixtures: a real S3 endpoint on loopback (moto's server mode), fresh buckets on it, and
honest deltas trained once per session."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bistro.config import StorageConfig

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on two cores: one torch thread each, since two OpenMP
    # threads per process on a shared core wait on each other and run many times slower.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the modules for `make test` (xdist, `--dist loadfile --no-loadscope-reorder`, a module at
    a time on one worker, in this order): the modules marked `timed`, whose assertions count wall-clock
    windows and which run alone (`_network_turn`), spread through the unit tests; then the modules
    marked `network`, the longest first, so that the long ones start while the short ones can still
    fill the other worker."""
    modules: dict[object, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.module, []).append(item)
    timed, network, rest = [], [], []
    for module_items in modules.values():
        first = module_items[0]
        if first.get_closest_marker("timed"):
            timed.append(module_items)
        elif marker := first.get_closest_marker("network"):
            network.append((-marker.kwargs.get("seconds", 0), len(network), module_items))
        else:
            rest.append(module_items)
    ordered: list[list[pytest.Item]] = []
    step = -(-len(rest) // max(len(timed), 1))  # a timed module, then its share of the others
    for i, module_items in enumerate(timed):
        ordered += [module_items, *rest[i * step : (i + 1) * step]]
    ordered += rest[len(timed) * step :] + [m for *_, m in sorted(network, key=lambda n: n[:2])]
    items[:] = [item for module_items in ordered for item in module_items]


def _lock_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every xdist worker of this run shares (the workers' base temps are its children)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, mode)
        yield


@pytest.fixture(scope="module", autouse=True)
def _network_turn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A `timed` module runs alone: the other xdist worker waits until it ends. Its local network's
    validator must score each window and publish the master before the next one starts; a unit test
    or another network beside it on 2 cores makes the scoring run past the window, and then every
    miner misses the next one. It holds `turn.lock` exclusively, every other module holds it shared
    (from before its own module fixtures); `gate.lock` gives the timed module its turn as soon as the
    modules that hold the lock now end, however many follow them."""
    root = _lock_dir(tmp_path_factory)
    if request.node.get_closest_marker("timed"):
        with _flock(root / "gate.lock", fcntl.LOCK_EX), _flock(root / "turn.lock", fcntl.LOCK_EX):
            yield
        return
    with _flock(root / "gate.lock", fcntl.LOCK_EX):
        pass
    with _flock(root / "turn.lock", fcntl.LOCK_SH):
        yield


TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def honest_blobs():
    """Honest deltas trained once per session and shared by the reliability, security and metrics
    modules (tests/support/reliability_kit.py HonestBlobs)."""
    from .support.reliability_kit import HonestBlobs

    return HonestBlobs()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    """A moto S3 server on 127.0.0.1 for the whole session, with test credentials in the env."""
    from bistro.localnet.s3server import start_s3_server
    from bistro.storage import s3

    saved = {k: os.environ.get(k) for k in [*TEST_AWS_ENV, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ.update(TEST_AWS_ENV)
    for cached in (s3._session, s3._has_credentials, s3._client):  # forget any credential-less session
        cached.cache_clear()
    server = start_s3_server()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for cached in (s3._session, s3._has_credentials, s3._client):
        cached.cache_clear()


@pytest.fixture
def s3_cfg(s3_server) -> StorageConfig:
    """Storage settings that point at the loopback S3 server, with short timeouts."""
    return StorageConfig(backend="s3", endpoint_url=s3_server.url, timeout=10.0, retries=2)


@pytest.fixture
def s3_store(s3_cfg: StorageConfig) -> Iterator[object]:
    """An S3Store on a fresh, empty bucket; its objects are deleted afterwards (moto keeps them in RAM)."""
    from bistro.storage.s3 import S3Store

    store = S3Store(f"test-{uuid.uuid4().hex[:12]}", s3_cfg)
    store.create_bucket()
    yield store
    keys = [{"Key": o.key} for o in store.list()]
    for i in range(0, len(keys), 1000):
        store.client.delete_objects(Bucket=store.bucket, Delete={"Objects": keys[i : i + 1000]})
