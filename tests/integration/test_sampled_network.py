"""A local network at the real ratio of uids to scored slots, scaled down for the suite: 16 miners
(8 honest, 8 of the demo's cheats, shaped and rotating copiers among them), four to a process
(`--miners-per-process`), three validators that score a sample of 4 uids a window of the 19
registered (`mechanism.max_uids_per_window`; the full size is 48 miners and 12 a window,
docs/performance.md "Real sizes"). Validators 0 and 1 read at full speed; validator 2 has a slow link of
its own (`--validator-flags 2:--mechanism.link_bytes_per_second=…`) that carries about a third of the
deltas its samples need. One run serves every test of this module.

Every uid is drawn and judged within the sample's 10-window bound, by both full-speed
validators alike; honest miners hold at least 95% of the run's pay; the two agree
(validator_trust ≥ 0.9 each); the master's held-out loss falls.
The slow validator never calls an honest uid `timeout`, never gives one a fault its full-speed
neighbour did not give in the same window (the miner's own fault, not our link's), leaves the rest
`unfetched`, and an `unfetched` uid's moving average is exactly what it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bistro.sample import MAX_GAP
from bistro.verdicts import PEER_FAULTS

pytestmark = [pytest.mark.slow, pytest.mark.network(seconds=400)]

CHEATS = [
    "freeloader",
    "noise",
    "copycat",
    "poison",
    "noisy_copier",
    "blender",
    "shaped_copier",
    "rotating_copier",
]
PERSONAS = [p for cheat in CHEATS for p in ("honest", cheat)]  # 16 miners, mixed across the processes
VALIDATORS = 3
SLOW = 2
"""The validator with the slow link (the lowest stake: the other two publish and make consensus)."""
SAMPLE = 4
WINDOWS = 12
BLOCK_TIME = 3.0
BLOCKS_PER_WINDOW = 10  # tiny's
DELTA_BYTES = 47_916
"""A `tiny` lowrank delta on the wire (the codec's layout is fixed: every delta is this size)."""
LINK = round(SAMPLE * (16 / 19) * DELTA_BYTES / 3 / (BLOCKS_PER_WINDOW * BLOCK_TIME))
"""Bytes/s carrying a third of a window's sampled deltas (about 3.4 of the 4 drawn are miners) per
window: the link saves at most 64 KiB of credit while idle, more than a delta, so the rate is what
bounds it over a run, not the budget of one window."""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sampled") / "net"
    out = subprocess.run(
        [sys.executable, "-m", "bistro.cli", "localnet", "--preset", "tiny", "--miners", str(len(PERSONAS)),
         "--validators", str(VALIDATORS), "--windows", str(WINDOWS), "--block-time", str(BLOCK_TIME),
         "--miners-per-process", "4", "--mechanism.max_uids_per_window", str(SAMPLE),
         "--personas", ",".join(PERSONAS), "--dir", str(run),
         "--validator-flags", f"{SLOW}:--mechanism.link_bytes_per_second={LINK}"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def records(run: Path, validator: int) -> list[dict]:
    path = run / "nodes" / f"validator-{validator}" / "validator" / "windows.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def miners(run: Path) -> dict[int, str]:
    """uid -> persona of every miner."""
    return {u["uid"]: u["persona"] for u in summary(run)["uids"]}


def test_every_uid_is_judged_within_the_bound_and_both_validators_draw_the_same(net: Path) -> None:
    uids = miners(net)
    fast = [records(net, v) for v in range(VALIDATORS) if v != SLOW]
    vuids = {v["uid"] for v in summary(net)["validators"]}
    for rs in fast:
        assert len(rs) >= WINDOWS - 1, [r["window"] for r in rs]
        windows = [r["window"] for r in rs]
        for r in rs:
            assert r["sampled"] <= SAMPLE and r["registered"] == len(uids) + VALIDATORS - 1
        for uid in uids:  # drawn (any verdict: judged) at least once in every MAX_GAP windows
            seen = [r["window"] for r in rs if str(uid) in r["uids"]]
            assert seen, uid
            gaps = [b - a for a, b in zip([windows[0] - 1, *seen], [*seen, windows[-1] + 1], strict=True)]
            assert max(gaps) <= MAX_GAP, (uid, seen)
    # both draw the same sample, each leaving out its own uid
    by_window = [{r["window"]: set(map(int, r["uids"])) for r in rs} for rs in fast]
    common = by_window[0].keys() & by_window[1].keys()
    assert len(common) >= WINDOWS - 2
    for w in common:
        assert by_window[0][w] - vuids == by_window[1][w] - vuids, w


def test_honest_miners_hold_the_pay_and_the_validators_agree(net: Path) -> None:
    s = summary(net)
    print({k: s[k] for k in ("honest_paid_share", "wall_seconds", "windows_completed")},
          [(u["persona"], round(u["paid_share"], 3)) for u in s["uids"]], s["validators"])  # fmt: skip
    assert s["crashed"] == []
    assert s["windows_completed"] == WINDOWS
    assert sum(u["paid"] for u in s["uids"]) > 0
    assert s["honest_paid_share"] >= 0.95
    for u in s["uids"]:
        if u["persona"] != "honest":
            assert u["paid_share"] < 0.02, u
    trust = {v["uid"]: v["validator_trust"] for v in s["validators"]}
    vuids = sorted(trust)
    for i in range(VALIDATORS):
        if i != SLOW:
            assert trust[vuids[i]] >= 0.9, trust


def test_the_master_loss_falls(net: Path) -> None:
    losses = summary(net)["master_loss"]
    print(
        f"master loss {losses[0]:.3f} -> {losses[-1]:.3f} ({(1 - losses[-1] / losses[0]) * 100:.1f}% lower)"
    )
    assert len(losses) >= WINDOWS // 2
    assert losses[-1] < 0.85 * losses[0], losses


def test_a_slow_link_of_our_own_costs_no_honest_uid_anything(net: Path) -> None:
    uids = miners(net)
    honest = {str(u) for u, p in uids.items() if p == "honest"}
    slow = records(net, SLOW)
    fast = {r["window"]: r["uids"] for r in records(net, 0)}
    fetched = unfetched = 0
    last_average: dict[str, float] = {}
    for r in slow:
        for uid, got in r["uids"].items():
            if int(uid) not in uids:
                continue  # another validator's uid: nothing to fetch
            verdict = got["verdict"]
            if verdict == "unfetched":
                unfetched += 1
                assert got["moving_average"] == last_average.get(uid, 0.0), (r["window"], uid)
            elif verdict != "missing":
                fetched += 1
            if uid in honest:
                assert verdict != "timeout", (r["window"], uid)
                if (
                    verdict in PEER_FAULTS and r["window"] in fast
                ):  # the miner's fault: seen at full speed too
                    assert fast[r["window"]][uid]["verdict"] == verdict, (r["window"], uid, verdict)
            last_average[uid] = got["moving_average"]
    print(f"slow validator: {fetched} fetched, {unfetched} unfetched (link {LINK} B/s)")
    assert unfetched > 0 and fetched > 0
    assert 0.15 <= fetched / (fetched + unfetched) <= 0.6
