"""The incentive network, run once for this module: 4 honest miners, a freeloader, a poisoner and the
four shaped copiers, one validator scoring every uid, 12 windows of `tiny`. Its summary.json, and the
shaped copiers' contract: each earns under 1% of the run's pay, honest miners at least 95%, no
honest uid is ever judged a copy. (The same copiers under sampled scoring: test_sampled_network.py
and docs/mechanism.md "Known gaps".)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timed(seconds=490)]

INCENTIVE_PERSONAS = ["honest"] * 4 + [
    "freeloader", "poison", "shaped_copier", "shaped_copier_05", "rotating_copier", "shaped_finetune",
]  # fmt: skip
INCENTIVE_WINDOWS = 12


@pytest.fixture(scope="module")
def incentive_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the incentive network (summary.json, network.json, logs, windows.jsonl)."""
    run = tmp_path_factory.mktemp("incentive") / "net"
    out = subprocess.run(
        [sys.executable, "-m", "bistro.cli", "localnet", "--preset", "tiny",
         "--miners", str(len(INCENTIVE_PERSONAS)), "--validators", "1", "--windows", str(INCENTIVE_WINDOWS),
         "--block-time", "3", "--validator-threads", "1", "--personas", ",".join(INCENTIVE_PERSONAS),
         "--dir", str(run), "--json"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run


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

    lowest_honest = min(earned(u) for u in honest)
    assert lowest_honest > 0
    for persona in ("freeloader", "poison"):
        assert earned(by_persona[persona][0]) < lowest_honest, persona
    assert summary["honest_paid_share"] >= 0.9
    (validator,) = summary["validators"]
    assert set(validator) >= {"uid", "hotkey", "validator_trust"}
    assert validator["validator_trust"] > 0.9  # a lone validator agrees with itself
    network = json.loads((run / "network.json").read_text())
    assert {"netuid", "block_time", "blocks_per_window", "uids"} <= set(network)
    roles = sorted(u["role"] for u in network["uids"])
    assert roles == ["miner"] * len(INCENTIVE_PERSONAS) + ["validator"]
    for u in network["uids"]:
        assert {"uid", "hotkey", "persona", "role", "bucket", "bucket_dir"} <= set(u)
    assert (run / "master_loss.png").stat().st_size > 0 and (run / "incentive.png").stat().st_size > 0
    assert (run / "logs" / "validator-0.log").exists()


COPIERS = ("shaped_copier", "shaped_copier_05", "rotating_copier", "shaped_finetune")


def check_copiers_run(run) -> dict:
    """The figures of a local network of 4 honest miners and the four shaped copiers, and its
    contract: every copier under 1% of the run's pay, honest miners at least 95%, no honest uid ever
    judged a copy (docs/mechanism.md "Shaped copies" quotes three such runs)."""
    import json

    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in
               (run / "nodes/validator-0/validator/windows.jsonl").read_text().splitlines()]  # fmt: skip
    by_persona: dict[str, list[dict]] = {}
    for u in summary["uids"]:
        by_persona.setdefault(u["persona"], []).append(u)
    honest = {str(u["uid"]) for u in by_persona["honest"]}
    copy_verdicts = sum(r["uids"].get(uid, {}).get("verdict") == "copy" for r in records for uid in honest)
    figures = {
        "honest_paid_share": summary["honest_paid_share"],
        **{p: by_persona[p][0]["paid_share"] for p in COPIERS},
        "honest_copy_verdicts": copy_verdicts,
        "windows": summary["windows_completed"],
    }
    assert summary["crashed"] == [], summary["crashed"]
    assert summary["honest_paid_share"] >= 0.95, figures
    for p in COPIERS:
        assert by_persona[p][0]["paid_share"] < 0.01, (p, figures)
    assert copy_verdicts == 0, figures
    return figures


def test_shaped_copiers_beside_honest_miners_earn_under_one_percent_each(incentive_net) -> None:
    """The shared incentive network: 4 honest miners, the four shaped copiers (and a freeloader and
    a poisoner), 12 windows of `tiny`."""
    print(check_copiers_run(incentive_net))
