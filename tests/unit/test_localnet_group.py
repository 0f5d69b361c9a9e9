"""`bistro localnet --miners-per-process K` (`bistro miners`: K miners in one process, a thread
each) and `--validator-flags I:FLAGS` (node-local settings for one validator), without a network."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from bistro.cli import build_parser, settings_from_args
from bistro.config import ConfigError
from bistro.localnet.group import GroupMember, member_settings, parse_members, run_group
from bistro.localnet.network import LocalNet, validator_flags


def localnet(tmp_path: Path, *flags: str) -> LocalNet:
    args = build_parser().parse_args(["localnet", "--dir", str(tmp_path), *flags])
    return LocalNet(settings_from_args(args), args)


def test_members_parse_and_each_gets_its_own_directory_wallet_and_bucket(tmp_path: Path) -> None:
    members = parse_members("miner-0=honest, miner-1=shaped_copier@9101")
    assert members == [GroupMember("miner-0", "honest"), GroupMember("miner-1", "shaped_copier", 9101)]
    for bad in ("", "miner-0", "miner-0=nobody", "a=honest,a=noise"):
        with pytest.raises(ConfigError):
            parse_members(bad)
    base = settings_from_args(build_parser().parse_args(["miners", "--members", "x=honest", "--nodes-dir", "n",
                                                         "--bucket", "someone-elses"]))  # fmt: skip
    one = member_settings(base, str(tmp_path), members[1])
    assert one.dir == f"{tmp_path}/miner-1" and one.wallet.name == "miner-1"
    assert one.storage.bucket == ""  # derived from its own hotkey (node.default_bucket)
    assert one.metrics.port == 9101


def test_the_localnet_groups_miners_into_processes_with_every_flag_a_miner_gets(tmp_path: Path) -> None:
    net = localnet(tmp_path, "--miners", "5", "--miners-per-process", "2", "--personas", "honest,noise",
                   "--train.steps_per_window", "3")  # fmt: skip
    groups = net.groups()
    assert [[m.name for m in g] for g in groups] == [
        ["miner-0", "miner-1"],
        ["miner-2", "miner-3"],
        ["miner-4"],
    ]
    assert [m.log_name for m in net.members] == ["validator-0"] + ["miners-0"] * 2 + ["miners-1"] * 2 + [
        "miners-2"
    ]
    cmd = net.group_command(groups[0])
    single = net.command(groups[0][0])
    assert cmd[3] == "miners" and "--persona" not in cmd and "--wallet.name" not in cmd and "--dir" not in cmd
    flags = dict(zip(cmd, cmd[1:], strict=False))
    assert flags["--members"] == "miner-0=honest,miner-1=noise"
    assert flags["--nodes-dir"] == str(tmp_path.resolve() / "nodes")
    for flag in (
        "--train.steps_per_window",
        "--subtensor.chain_endpoint",
        "--storage.root",
        "--train.threads",
    ):
        assert flags[flag] == dict(zip(single, single[1:], strict=False))[flag]


def test_validator_flags_reach_one_validator_and_refuse_protocol_settings(tmp_path: Path) -> None:
    net = localnet(tmp_path, "--validators", "2", "--validator-flags",
                   "1:--mechanism.link_bytes_per_second=3000 --mechanism.fetch_seconds 5")  # fmt: skip
    v0, v1 = (m for m in net.members if m.role == "validator")
    assert "--mechanism.link_bytes_per_second" not in net.command(v0)
    cmd = net.command(v1)
    assert cmd[-4:] == ["--mechanism.link_bytes_per_second", "3000", "--mechanism.fetch_seconds", "5"]
    for protocol in ("--mechanism.max_uids_per_window=3", "--model.hidden_size=64", "--netuid=3"):
        with pytest.raises(SystemExit, match="protocol setting"):
            validator_flags([f"0:{protocol}"], 2)
    with pytest.raises(SystemExit, match="a validator"):
        validator_flags(["2:--mechanism.fetch_seconds=5"], 2)


class FakeMiner:
    def __init__(self, fail_after: float | None = None) -> None:
        self.stopping = threading.Event()
        self.fail_after, self.closed = fail_after, False

    def run(self, windows: int = 0) -> None:
        start = time.monotonic()
        while not self.stopping.is_set():
            if self.fail_after is not None and time.monotonic() - start > self.fail_after:
                raise RuntimeError("a bug")
            time.sleep(0.01)

    def close(self) -> None:
        self.closed = True


def test_one_miner_that_fails_ends_the_group_with_its_code() -> None:
    stop = threading.Event()
    miners = {"a": FakeMiner(), "b": FakeMiner(fail_after=0.05)}
    for m in miners.values():
        m.stopping = stop
    assert run_group(miners, stop) == 1  # type: ignore[arg-type]
    assert stop.is_set() and miners["b"].closed
    stop = threading.Event()
    quiet = {"a": FakeMiner()}
    quiet["a"].stopping = stop
    threading.Timer(0.05, stop.set).start()  # a signal: every loop finishes, the code is 0
    assert run_group(quiet, stop) == 0  # type: ignore[arg-type]
