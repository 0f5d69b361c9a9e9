"""Issue 7: a short `bistro localnet` (3 honest and 2 adversarial miners) and its summary.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WINDOWS = 6


def test_short_localnet_summary(tmp_path: Path) -> None:
    config = tmp_path / "fast.toml"
    config.write_text("[train]\nsteps_per_window = 6\n")
    run = tmp_path / "net"
    out = subprocess.run(
        [sys.executable, "-m", "bistro.cli", "localnet", "--miners", "5", "--validators", "1",
         "--windows", str(WINDOWS), "--block-time", "1", "--personas", "honest,honest,honest,freeloader,poison",
         "--dir", str(run), "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    for key, kind in [("windows_completed", int), ("master_loss", list), ("uids", list),
                      ("honest_incentive_share", float), ("wall_seconds", float)]:  # fmt: skip
        assert isinstance(summary[key], kind), key
    assert summary["windows_completed"] == WINDOWS
    assert summary["crashed"] == []
    losses = summary["master_loss"]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    by_persona: dict[str, list[dict]] = {}
    for u in summary["uids"]:
        assert set(u) >= {"uid", "hotkey", "persona", "incentive", "weight", "rejections"}
        assert all(isinstance(n, int) and n > 0 for n in u["rejections"].values())
        by_persona.setdefault(u["persona"], []).append(u)
    honest = by_persona["honest"]
    assert len(honest) == 3
    lowest_honest = min(u["incentive"] for u in honest)
    assert lowest_honest > 0
    for persona in ("freeloader", "poison"):
        assert by_persona[persona][0]["incentive"] < lowest_honest, persona
    assert summary["honest_incentive_share"] >= 0.9
    network = json.loads((run / "network.json").read_text())
    assert {"netuid", "block_time", "blocks_per_window", "uids"} <= set(network)
    roles = sorted(u["role"] for u in network["uids"])
    assert roles == ["miner"] * 5 + ["validator"]
    for u in network["uids"]:
        assert {"uid", "hotkey", "persona", "role", "bucket", "bucket_dir"} <= set(u)
    assert (run / "master_loss.png").stat().st_size > 0 and (run / "incentive.png").stat().st_size > 0
    assert (run / "logs" / "validator-0.log").exists()
