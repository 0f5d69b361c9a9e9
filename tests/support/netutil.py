"""Helpers for tests that run real miner and validator processes on a local network."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from bistro.config import build_settings
from bistro.localnet.network import LocalNet, Member, records  # noqa: F401 - tests import records from here

FAST = """
[train]
steps_per_window = {steps}
[mechanism]
ma_alpha = 0.5
"""


def make_net(tmp: Path, *, miners: int, validators: int = 1, block_time: float = 1.0, steps: int = 6,
             personas: str = "") -> LocalNet:  # fmt: skip
    """Wallets, chain, registrations and stake under `tmp`, processes not started."""
    config = tmp / "fast.toml"
    config.write_text(FAST.format(steps=steps))
    args = argparse.Namespace(
        miners=miners, validators=validators, windows=0, personas=personas, block_time=block_time,
        json=False, config=str(config),
    )  # fmt: skip
    settings = build_settings("tiny", config, {"dir": str(tmp / "net")})
    net = LocalNet(settings, args)
    net.prepare()
    return net


def start(net: LocalNet, m: Member, command: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = open(net.dir / "logs" / f"{m.name}.log", "a")
    m.process = subprocess.Popen(command or net.command(m), stdout=log, stderr=subprocess.STDOUT, env=env)
    return m.process


def wait_for(predicate, timeout: float, what: str, net: LocalNet):
    """Poll `predicate()` until it returns something truthy; fail with the logs' tails otherwise."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        for m in net.members:
            if m.process is not None and m.process.poll() not in (None, 0):
                raise AssertionError(f"{m.name} died:\n{tail(net, m)}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(tail(net, m) for m in net.members))


def tail(net: LocalNet, m: Member, n: int = 30) -> str:
    path = net.dir / "logs" / f"{m.name}.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return f"--- {m.name} ---\n" + "\n".join(lines[-n:])


def stop_all(net: LocalNet) -> None:
    net.stop()
