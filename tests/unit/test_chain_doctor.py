"""`bistro doctor` against the embedded chain, the loopback S3 server, and the SDK over its faked
substrate: it passes on a correct setup and names each fault, with its fix, on a broken one."""

from __future__ import annotations

import uuid
from pathlib import Path

import bittensor as bt
import pytest

from bistro.chain.local import LocalChain
from bistro.chain.subtensor import SubtensorChain
from bistro.cli import main as cli
from bistro.config import Settings, build_settings
from bistro.doctor import Doctor, report
from bistro.node import default_bucket
from bistro.wallet import open_wallet
from tests.support import bittensor_sdk

from .test_chain_subtensor import NETUID, metagraph_record, neurons_lite, raw_commitment


def flags(tmp: Path, **extra) -> dict:
    return {
        "dir": str(tmp),
        "chain.block_time": 0.05,
        "chain.weights_rate_limit": 0,
        "wallet.path": str(tmp / "wallets"),
        "wallet.name": "node",
        **extra,
    }


def settings_at(tmp: Path, **extra) -> Settings:
    return build_settings("tiny", None, flags(tmp, **extra))


def argv(tmp: Path, *more: str, **extra) -> list[str]:
    return ["doctor", *more, *[f"--{k}={v}" for k, v in flags(tmp, **extra).items()]]


def registered(settings: Settings, *, stake: float = 0.0, commit: str | None = "own") -> tuple:
    wallet = open_wallet(settings.wallet, create=True)
    chain = LocalChain(settings.home / "chain.sqlite", settings.chain)
    chain.register(wallet)
    if stake:
        chain.add_stake(wallet.hotkey.ss58_address, stake)
    if commit is not None:
        chain.commit(wallet, default_bucket(wallet.hotkey.ss58_address) if commit == "own" else commit)
    return wallet, chain


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_a_correct_local_validator_passes_through_the_cli(tmp_path: Path, capsys) -> None:
    registered(settings_at(tmp_path), stake=1000.0)
    assert cli(argv(tmp_path, "--role", "validator")) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "FAIL" not in out
    for name in ("wallet", "chain", "versions", "registration", "validator", "commitment",
                 "bucket writable", "bucket public read", "disk"):  # fmt: skip
        assert f"[ ok ] {name}:" in out
    assert "0.05 s a block" in out and "GiB free" in out


def test_each_fault_is_named_with_its_fix(tmp_path: Path, capsys) -> None:
    # a validator without stake, whose chain holds another bucket
    registered(settings_at(tmp_path), commit="someone-elses-bucket")
    assert cli(argv(tmp_path, "--role", "validator")) == 1
    out = capsys.readouterr().out
    assert "[FAIL] validator: stake 0, validator permit no" in out and "--stake" in out
    assert "[FAIL] commitment: the chain holds 'someone-elses-bucket'" in out
    assert "start with --bucket matching" in out and "[ ok ] registration" in out
    assert "2 check(s) failed" in out


def test_unregistered_and_missing_wallet_and_missing_chain(tmp_path: Path) -> None:
    settings = settings_at(tmp_path)
    checks = by_name(Doctor(settings).run())
    assert not checks["wallet"].ok and "bistro register" in checks["wallet"].fix
    assert not checks["chain"].ok and "no embedded chain" in checks["chain"].detail
    assert not checks["registration"].ok and "not run" in checks["registration"].detail
    registered(settings)  # creates wallet and chain
    other = settings_at(tmp_path, **{"wallet.name": "stranger"})
    open_wallet(other.wallet, create=True)
    checks = by_name(Doctor(other).run())
    assert checks["wallet"].ok and checks["chain"].ok
    assert (
        not checks["registration"].ok
        and "bistro register --wallet.name stranger" in checks["registration"].fix
    )
    assert not checks["commitment"].ok and "not run" in checks["commitment"].detail


@pytest.fixture
def s3_bucket(s3_server) -> str:
    from bistro.config import StorageConfig
    from bistro.storage.s3 import S3Store

    name = f"doctor-{uuid.uuid4().hex[:10]}"
    S3Store(name, StorageConfig(backend="s3", endpoint_url=s3_server.url)).create_bucket()
    return name


def test_s3_bucket_on_loopback(tmp_path: Path, s3_server, s3_bucket: str) -> None:
    s3 = {"storage.backend": "s3", "storage.endpoint_url": s3_server.url, "storage.bucket": s3_bucket}
    settings = settings_at(tmp_path, **s3)
    registered(settings, commit=f"{s3_server.url}/{s3_bucket}")
    found = by_name(Doctor(settings).run())  # a private bucket: validators would get 403
    assert [c.name for c in found.values() if not c.ok] == ["bucket public read"]
    assert (
        "403" in found["bucket public read"].detail and "put-bucket-policy" in found["bucket public read"].fix
    )
    from bistro.storage.s3 import S3Store, public_read_policy

    owner = S3Store(s3_bucket, settings.storage)
    owner.client.put_bucket_policy(Bucket=s3_bucket, Policy=public_read_policy(s3_bucket, listing=False))
    checks = Doctor(settings).run()
    assert all(c.ok for c in checks), report(checks)
    found = by_name(checks)
    assert "put, get and delete work" in found["bucket writable"].detail
    assert "without keys" in found["bucket public read"].detail
    # a bucket that does not exist: not writable, with what to do about it
    missing = settings_at(tmp_path, **{**s3, "storage.bucket": f"nope-{uuid.uuid4().hex[:8]}"})
    found = by_name(Doctor(missing).run())
    assert not found["bucket writable"].ok and "create the bucket" in found["bucket writable"].fix
    assert not found["commitment"].ok  # the chain holds the first bucket
    assert not found["bucket public read"].ok and "not run" in found["bucket public read"].detail


def test_against_the_sdk_over_its_faked_substrate(tmp_path: Path) -> None:
    # local buckets on a real network's chain: only a private deployment may read bare names
    settings = settings_at(
        tmp_path, **{"chain.network": "test", "chain.netuid": NETUID, "storage.allow_private_endpoints": True}
    )
    wallet = open_wallet(settings.wallet, create=True)
    hotkeys = [wallet.hotkey.ss58_address, *[f"//x{i}" for i in range(2)]]
    hotkeys[1:] = [bt.keyfiles.Keypair.create_from_uri(u).ss58_address for u in hotkeys[1:]]
    fake = bittensor_sdk.harness()["fake_substrate"].FakeSubstrate()
    graph, lite = metagraph_record(hotkeys=hotkeys), neurons_lite(hotkeys)
    fake.seed_runtime("SubnetInfoRuntimeApi", "get_metagraph", lambda p: graph)
    fake.seed_runtime("NeuronInfoRuntimeApi", "get_neurons_lite", lambda p: lite)
    fake.seed_map("SubtensorModule", "Uids", [(h, u) for u, h in enumerate(hotkeys)])
    bucket = default_bucket(hotkeys[0])
    fake.seed_map("Commitments", "CommitmentOf", [(hotkeys[0], raw_commitment(bucket.encode(), 400))])
    chain = SubtensorChain(settings.chain, client=bt.SyncClient("test", substrate=fake))
    try:
        checks = by_name(Doctor(settings, "validator", chain=chain).run())
    finally:
        chain.close()
    assert all(c.ok for c in checks.values()), report(list(checks.values()))
    assert "12 s a block" in checks["chain"].detail and "netuid 212 has 3 uids" in checks["chain"].detail
    assert checks["versions"].detail == f"bittensor SDK {bt.__version__}; runtime spec_version 300"
    assert checks["validator"].detail == "stake 1500.25, validator permit yes"
    assert checks["registration"].detail == "uid 0 on netuid 212"
