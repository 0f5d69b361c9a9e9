"""`bistro localnet`'s flags reach every member (the network's own run: test_incentive_network.py)."""

from __future__ import annotations

import os
from pathlib import Path


def test_localnet_flags_reach_every_member(tmp_path: Path) -> None:
    """`bistro localnet --train.steps_per_window 2` must change what the miners do: the flag used to
    reach only the localnet process (a `small` miner trained its preset's 30 steps, 100 s a window)."""
    from bistro.cli import build_parser, settings_from_args
    from bistro.localnet.network import LocalNet, Member

    args = build_parser().parse_args(
        ["localnet", "--preset", "small", "--train.steps_per_window", "2", "--train.fsdp",
         "--mechanism.fault_penalty", "0.25", "--train.threads", "2", "--dir", str(tmp_path)]
    )  # fmt: skip
    net = LocalNet(settings_from_args(args), args)
    for role in ("miner", "validator"):
        member = Member(f"{role}-0", role, "honest", bucket="bistro-0123456789abcdef")
        cmd = net.command(member)
        flags = dict(zip(cmd, cmd[1:], strict=False))
        assert flags["--train.steps_per_window"] == "2" and flags["--mechanism.fault_penalty"] == "0.25"
        assert flags["--train.threads"] == str(net.threads(member))  # the network's choice, not the flag
        assert cmd.count("--train.threads") == 1 and flags["--preset"] == "small"
    assert flags["--dir"] != str(tmp_path)  # each member has a directory of its own


def test_validator_threads_sets_each_validators_torch_threads(tmp_path: Path) -> None:
    """A lone validator takes two threads on 2+ cores unless `--validator-threads` says otherwise;
    miners always take one."""
    from bistro.cli import build_parser, settings_from_args
    from bistro.localnet.network import LocalNet, Member

    validator = Member("validator-0", "validator", "validator", bucket="bistro-0123456789abcdef")
    miner = Member("miner-0", "miner", "honest", bucket="bistro-0123456789abcdef")
    for extra, expected in (([], 2), (["--validator-threads", "1"], 1), (["--validator-threads", "3"], 3)):
        args = build_parser().parse_args(["localnet", "--dir", str(tmp_path), *extra])
        net = LocalNet(settings_from_args(args), args)
        net.members = [validator, miner]
        assert net.threads(validator) == (expected if extra or (os.cpu_count() or 1) >= 2 else 1), extra
        assert net.threads(miner) == 1
        cmd = net.command(validator)
        assert cmd[cmd.index("--train.threads") + 1] == str(net.threads(validator))
