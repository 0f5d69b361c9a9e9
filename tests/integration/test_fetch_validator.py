"""The real `Validator` behind a slow link of its own (`mechanism.link_bytes_per_second`: one rate
limit shared by all of its peer reads) that fits about a third of the window's deltas in the fetch
budget: no honest uid is `timeout` or penalised; the ones our link did not reach are `unfetched`,
keep their moving average exactly and keep their weight. And a sample smaller than the network:
only the drawn uids are fetched and judged."""

from __future__ import annotations

import json

import pytest

from bistro import sample
from bistro.verdicts import PEER_FAULTS

from ..support.reliability_kit import FIRST, World, make_world, publish_master

MINERS = [f"m{i}" for i in range(6)]
BUDGET = 1.0
START = 0.5
"""Every uid's moving average before the window (as if earned in earlier windows)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, honest_blobs) -> World:
    world = make_world(tmp_path_factory.mktemp("slowlink"), MINERS)
    for name in MINERS:
        world.put(name, FIRST, honest_blobs.get(world, name, FIRST))
    return world


def validator_at(world: World, home: str, **flags):
    from bistro.config import replace
    from bistro.validator import Validator

    settings = replace(world.members["val"].settings, dir=str(world.dir / home), **flags)
    validator = Validator(settings)
    validator.fetch_budget = lambda: BUDGET  # the test world's windows last 0.1 s: a 1 s budget here
    return validator


def records(validator) -> list[dict]:
    lines = (validator.state_dir / "windows.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_our_slow_link_costs_no_honest_uid_anything(world: World) -> None:
    sizes = [world.path(name, FIRST).stat().st_size for name in MINERS]
    # a third of the deltas in the budget (the link saves at most 64 KiB of credit while idle)
    rate = max(sum(sizes) / 3 - (1 << 16), min(sizes) / 2) / BUDGET
    validator = validator_at(world, "slow-link", **{"mechanism.link_bytes_per_second": rate})
    uids = [world.members[n].uid for n in MINERS]
    validator.state.averages = dict.fromkeys(uids, START)
    validator.state.recent = {u: [START] for u in uids}  # and consistently positive when scored
    validator.evaluate(FIRST)
    got = records(validator)[-1]["uids"]
    assert set(uids) <= {int(u) for u in got}  # (the other validator, uploading nothing, is missing)
    verdicts = {uid: got[str(uid)]["verdict"] for uid in uids}
    print(f"delta sizes {sizes}, link {rate:.0f} B/s: {sorted(verdicts.items())}")
    assert not [u for u, v in verdicts.items() if v in PEER_FAULTS], verdicts
    unfetched = [u for u, v in verdicts.items() if v == "unfetched"]
    ok = [u for u, v in verdicts.items() if v == "ok"]
    assert 1 <= len(ok) <= 4 and len(unfetched) == len(uids) - len(ok), verdicts
    for uid in unfetched:  # not judged: the average is what it was, the weight is kept
        assert got[str(uid)]["moving_average"] == START
        assert got[str(uid)]["weight"] > 0.0
        assert validator.state.fault_streaks.get(uid, 0) == 0
    # Which ones: with a local bucket the link is charged after each whole read, so the threads
    # that charge first win, not strictly the first in the seeded order (over HTTP it is charged per
    # network read, in order: tests/unit/test_fetch.py). Here only the count is the contract.


def test_only_the_sample_is_fetched_and_judged(world: World) -> None:
    uids = [world.members[n].uid for n in MINERS]
    validator = validator_at(world, "sampled", **{"mechanism.max_uids_per_window": 3})
    validator.state.averages = dict.fromkeys(uids, START)
    publish_master(world, settings=validator.settings)  # a sample size is protocol: the network's
    try:
        validator.evaluate(FIRST)
    finally:
        publish_master(world)
    got = records(validator)[-1]["uids"]
    # drawn over every registered uid (the validators' own included: every validator draws the same)
    everyone = sorted(int(u) for u in world.chain.metagraph().uids)
    hashes = {w: validator.seed_hash(w) for w in sample.hash_windows(FIRST)}
    drawn = sample.scored_sample(validator.netuid, FIRST, hashes, everyone, 3)
    assert sorted(int(u) for u in got) == [u for u in drawn if u != validator.uid]
    for uid in set(uids) - set(drawn):  # not drawn: average and streak untouched, weight kept
        assert validator.state.averages[uid] == START
        assert validator.state.fault_streaks.get(uid, 0) == 0
