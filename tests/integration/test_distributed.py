"""`torchrun --nproc_per_node 2 -m bistro.cli miner …`: one miner trained data parallel on 2 CPU
processes (gloo), rank 0 alone talking to chain and buckets; its deltas pass the real validator,
itself on 2 processes (`torchrun … validator`: the scored uids' forward passes split over ranks)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from ..support.netutil import make_net, records, start, stop_all, tail, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.network(seconds=40)]


def test_torchrun_miner_on_two_processes(tmp_path: Path) -> None:
    net = make_net(tmp_path, miners=1, block_time=1.0, steps=6)
    validator, miner = net.members
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    command = net.command(miner)
    assert command[1:3] == ["-m", "bistro.cli"]
    command = [torchrun, "--standalone", "--nproc_per_node", "2", *command[1:]]
    validate = net.command(validator)
    validate = [torchrun, "--standalone", "--nproc_per_node", "2", *validate[1:]]
    try:
        start(net, validator, validate)
        start(net, miner, command)
        ok = lambda: [r for r in records(net) if r["uids"].get(str(miner.uid), {}).get("verdict") == "ok"]  # noqa: E731
        scored = wait_for(
            lambda: len(ok()) >= 2 and ok(), 240, "two valid deltas from the torchrun miner", net
        )
        mine = [r["uids"][str(miner.uid)] for r in scored]
        # Every accepted delta lowers the loss on the pages it trained on. A lone miner's score is the
        # raw own-minus-control margin, a few hundredths at 4 steps: positive over the windows, not
        # necessarily in each (a control page can be the easier one to teach).
        assert all(v["without_local"] > v["with_local"] for v in mine), tail(net, miner)
        assert sum(v["score"] for v in mine) > 0, (mine, tail(net, miner))
        log = (net.dir / "logs" / f"{miner.name}.log").read_text()
        assert "on 2 processes (gloo)" in log
        assert (
            "validator passes on 2 processes (gloo)"
            in (net.dir / "logs" / f"{validator.name}.log").read_text()
        )
    finally:
        stop_all(net)
