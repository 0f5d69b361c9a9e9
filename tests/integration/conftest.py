"""One local network serves many assertions: the incentive network (8 honest miners and 8 cheats,
the four shaped copiers among them, three validators scoring a sample, one behind a slow link of
its own, `tiny`) runs once per test session, and each test reads its run directory
(test_localnet.py, test_shaped_copies_network.py, test_sampled_network.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHEATS = [
    "freeloader", "noise", "copycat", "poison", "shaped_copier", "shaped_copier_05", "rotating_copier",
    "shaped_finetune",
]  # fmt: skip
INCENTIVE_PERSONAS = [p for cheat in CHEATS for p in ("honest", cheat)]
"""16 miners, 8 honest and 8 cheats (the four shaped copiers among them), mixed across the processes."""
INCENTIVE_WINDOWS = 12
VALIDATORS = 3
SLOW = 2
"""The validator with the slow link (the lowest stake: the other two publish and make consensus)."""
SAMPLE = 4
"""Uids scored a window: 4 of the 19 registered keeps a subnet's ratio of uids to scored slots."""
BLOCK_TIME = 3.0
BLOCKS_PER_WINDOW = 10  # tiny's
DELTA_BYTES = 47_916
"""A `tiny` lowrank delta on the wire (the codec's layout is fixed: every delta is this size)."""
LINK = round(SAMPLE * (16 / 19) * DELTA_BYTES / 3 / (BLOCKS_PER_WINDOW * BLOCK_TIME))
"""Bytes/s carrying a third of a window's sampled deltas (about 3.4 of the 4 drawn are miners) per
window: the link saves at most 64 KiB of credit while idle, more than a delta, so the rate is what
bounds it over a run, not the budget of one window."""


@pytest.fixture(scope="session")
def incentive_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the incentive network (summary.json, network.json, logs, windows.jsonl):
    16 miners four to a process, three validators scoring a sample of 4 a window, validator 2 behind
    a slow link of its own (`--validator-flags`), 12 windows of `tiny`."""
    run = tmp_path_factory.mktemp("incentive") / "net"
    out = subprocess.run(
        [sys.executable, "-m", "bistro.cli", "localnet", "--preset", "tiny",
         "--miners", str(len(INCENTIVE_PERSONAS)), "--validators", str(VALIDATORS),
         "--windows", str(INCENTIVE_WINDOWS), "--block-time", str(BLOCK_TIME), "--miners-per-process", "4",
         "--mechanism.max_uids_per_window", str(SAMPLE), "--personas", ",".join(INCENTIVE_PERSONAS),
         "--validator-flags", f"{SLOW}:--mechanism.link_bytes_per_second={LINK}", "--dir", str(run), "--json"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run
