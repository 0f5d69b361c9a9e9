"""A short `bistro localnet` (the shared incentive network: honest miners and cheats) and its
summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import INCENTIVE_PERSONAS, INCENTIVE_WINDOWS, VALIDATORS

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("incentive_net")]  # one network, one worker


def test_short_localnet_summary(incentive_net: Path) -> None:
    run = incentive_net
    summary = json.loads((run / "summary.json").read_text())
    for key, kind in [("windows_completed", int), ("master_loss", list), ("uids", list),
                      ("honest_incentive_share", float), ("honest_paid_share", float),
                      ("wall_seconds", float)]:  # fmt: skip
        assert isinstance(summary[key], kind), key
    assert summary["windows_completed"] == INCENTIVE_WINDOWS
    assert summary["crashed"] == []
    losses = summary["master_loss"]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    by_persona: dict[str, list[dict]] = {}
    for u in summary["uids"]:
        assert set(u) >= {"uid", "hotkey", "persona", "incentive", "paid", "weight", "rejections"}
        assert all(isinstance(n, int) and n > 0 for n in u["rejections"].values())
        by_persona.setdefault(u["persona"], []).append(u)
    honest = by_persona["honest"]
    assert len(honest) == INCENTIVE_PERSONAS.count("honest")
    # Summed over the run: a window pays for the work in it, and an honest miner on a busy 2-core box
    # may miss the last window's deadline (then its final incentive is 0, and rightly so).
    history = summary["incentive_history"]

    def earned(u: dict) -> float:
        assert u["paid"] == pytest.approx(sum(h["incentive"].get(str(u["uid"]), 0.0) for h in history))
        return u["paid"]

    # Sampled (4 a window of 19): an honest uid is paid from its second positive draw, about 9
    # windows in, so in 12 windows one may not be paid yet; most are, and no cheat earns beside them.
    paid_honest = [earned(u) for u in honest if earned(u) > 0]
    assert len(paid_honest) >= len(honest) // 2, [earned(u) for u in honest]
    for persona in ("freeloader", "poison"):
        assert earned(by_persona[persona][0]) < min(paid_honest), persona
    assert summary["honest_paid_share"] >= 0.9
    validators = summary["validators"]
    assert len(validators) == VALIDATORS
    assert all(set(v) >= {"uid", "hotkey", "validator_trust"} for v in validators)
    network = json.loads((run / "network.json").read_text())
    assert {"netuid", "block_time", "blocks_per_window", "uids"} <= set(network)
    roles = sorted(u["role"] for u in network["uids"])
    assert roles == ["miner"] * len(INCENTIVE_PERSONAS) + ["validator"] * VALIDATORS
    for u in network["uids"]:
        assert {"uid", "hotkey", "persona", "role", "bucket", "bucket_dir"} <= set(u)
    assert (run / "master_loss.png").stat().st_size > 0 and (run / "incentive.png").stat().st_size > 0
    assert (run / "logs" / "validator-0.log").exists()


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
