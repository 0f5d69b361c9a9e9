"""End to end: two miners and one validator as real processes on the embedded chain.

The master's loss falls, both miners earn weight, a validator killed with SIGKILL resumes from its
state without scoring a window twice, and a miner that stops drops to zero weight.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from bistro.localnet.network import Observer
from bistro.model import sequence_losses

from ..support.netutil import make_net, records, start, stop_all, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timed]


def both_ok(rec: dict, uids: list[int]) -> bool:
    return all(rec["uids"].get(str(u), {}).get("verdict") == "ok" for u in uids)


def test_two_miners_one_validator(tmp_path: Path) -> None:
    net = make_net(tmp_path, miners=2, block_time=1.0, steps=6)
    validator, m1, m2 = net.members
    uids = [m1.uid, m2.uid]
    try:
        for m in net.members:
            start(net, m)
        wait_for(lambda: sum(both_ok(r, uids) for r in records(net)) >= 2, 150, "two scored windows", net)

        # kill -9 the validator mid-run, restart it: it resumes from its state file
        validator.process.send_signal(signal.SIGKILL)
        validator.process.wait()
        before = records(net)
        start(net, validator)
        wait_for(lambda: len(records(net)) >= len(before) + 2, 90, "windows after restart", net)
        windows = [r["window"] for r in records(net)]
        assert windows == sorted(set(windows)), f"a window was scored twice: {windows}"
        log = (net.dir / "logs" / f"{validator.name}.log").read_text()
        assert "resumed" in log

        last = wait_for(
            lambda: next((r for r in reversed(records(net)) if both_ok(r, uids)), None), 60, "a window", net
        )
        assert last["uids"][str(m1.uid)]["weight"] > 0 and last["uids"][str(m2.uid)]["weight"] > 0
        assert last["uids"][str(m1.uid)]["score"] > 0 and last["uids"][str(m2.uid)]["score"] > 0

        # stop one miner: it drops to zero weight
        m2.process.send_signal(signal.SIGTERM)
        m2.process.wait(timeout=60)
        net.members.remove(m2)  # stopped on purpose
        stopped_at = len(records(net))
        # the first record, three windows after the stop, in which m1 delivered on time: a busy box can
        # make an honest miner miss a window, and a window it missed pays it nothing
        final = wait_for(
            lambda: (r := records(net)) and len(r) >= stopped_at + 3 and both_ok(r[-1], [m1.uid]) and r[-1],
            120,
            "windows after the stop",
            net,
        )
        assert final["uids"][str(m2.uid)]["weight"] == 0.0
        assert final["uids"][str(m1.uid)]["weight"] == pytest.approx(1.0)

        observer = Observer(net)
        initial = float(sequence_losses(observer.model, observer.sequences, 32).mean())  # θ_0: the seed
        observer.update()
        final = observer.losses[max(observer.losses)]
        assert final < initial - 0.3, (initial, observer.losses)
    finally:
        stop_all(net)
