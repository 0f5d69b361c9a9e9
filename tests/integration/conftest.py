"""One local network serves many assertions: the incentive network (4 honest miners, a freeloader,
a poisoner and the four shaped copiers, one validator, `tiny`) runs once per test session, and
each test reads its run directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

INCENTIVE_PERSONAS = ["honest"] * 4 + [
    "freeloader", "poison", "shaped_copier", "shaped_copier_05", "rotating_copier", "shaped_finetune",
]  # fmt: skip
INCENTIVE_WINDOWS = 12


@pytest.fixture(scope="session")
def incentive_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the incentive network (summary.json, network.json, logs, windows.jsonl)."""
    run = tmp_path_factory.mktemp("incentive") / "net"
    out = subprocess.run(
        [sys.executable, "-m", "bistro.cli", "localnet", "--preset", "tiny",
         "--miners", str(len(INCENTIVE_PERSONAS)), "--validators", "1", "--windows", str(INCENTIVE_WINDOWS),
         "--block-time", "3", "--personas", ",".join(INCENTIVE_PERSONAS), "--dir", str(run), "--json"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run
