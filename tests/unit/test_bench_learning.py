"""`bistro bench learning --quick`: the three arms run through the production code and report sane
figures (behaviour, not timings), and the read-out rule does what docs/performance.md says."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bistro.bench import learning
from bistro.config import build_settings

HEADLINE = (
    "learning_efficiency",
    "learning_efficiency_ddp",
    "tokens_efficiency",
    "compression_ratio",
    "baseline_last_quarter_fraction",
    "learning_readout_window",
    "learning_readout_window_ddp",
)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("home")
    settings = build_settings("tiny", overrides={"train.threads": 1, "dir": str(home)})
    return learning.run(settings, quick=True)


def test_headline_has_every_figure(result: dict) -> None:
    head = result["headline"]
    for key in HEADLINE:
        assert key in head, key
        assert head[key] is not None and math.isfinite(head[key]), key
    assert 100 < head["compression_ratio"] < 1000
    assert 0 <= head["baseline_last_quarter_fraction"] <= 1
    assert head["learning_batch_size"] == result["learning"]["batch_size"] > 0
    ddp_tokens = head["baseline_ddp_tokens_efficiency"]  # None only if ddp never reached that loss
    assert ddp_tokens is None or ddp_tokens > 0


def test_default_plan_steps_the_miners_together_on_one_preset_batch() -> None:
    settings = build_settings("tiny")
    plan = learning.plan_for(settings, quick=False)
    s = learning.bench_settings(settings, plan)
    assert plan.miners * s.train.batch_size == settings.train.batch_size
    assert plan.windows >= 40 and s.train.warmup_steps <= plan.steps


def test_every_arm_learns_on_the_same_held_out_pages(result: dict) -> None:
    learn = result["learning"]
    windows = learn["windows"]
    for name in ("sequential", "ddp"):
        curve = learn[name]["curve"]
        assert len(curve) == windows + 1
        assert curve[-1] < curve[0] - 0.1, f"the {name} baseline must learn"
    net = learn["arms"]["default"]
    assert len(net["curve"]) == windows + 1
    assert net["curve"][0] == learn["sequential"]["curve"][0] == learn["ddp"]["curve"][0]  # same model
    assert net["curve"][-1] < net["curve"][0], "the master never moved"
    assert 0 < net["learning_efficiency"] and math.isfinite(net["learning_efficiency_ddp"])
    assert 0 <= net["refused_good_updates"] <= net["refused_updates"] <= windows
    assert Path(learn["png"]).stat().st_size > 1000


def test_readout_window_is_where_the_baseline_still_learns() -> None:
    flat_after_4 = [8.0, 6.0, 5.0, 4.5, 4.2] + [4.2] * 12  # stops learning at window 4
    w = learning.readout_window(flat_after_4)
    assert learning.last_quarter_fraction(flat_after_4, w) >= learning.STILL_LEARNS
    assert w < 8, "read where the baseline still learns, not after it flattened"
    still = [8.0 - 0.1 * i for i in range(17)]  # learns to the end
    assert learning.readout_window(still) == 16
    assert learning.last_quarter_fraction(still, 16) == pytest.approx(0.25)


def test_efficiencies_on_known_curves() -> None:
    base = [8.0, 7.0, 6.0, 5.0, 4.0]
    net = [8.0, 7.5, 7.0, 6.5, 6.0]
    assert learning.efficiency(net, base, 4) == pytest.approx(0.5)
    assert learning.tokens_efficiency(net, base, 4) == pytest.approx(0.5)  # base hit 6.0 at window 2
    assert learning.tokens_efficiency([8.0, 3.0], [8.0, 7.0], 1) is None  # baseline never got there


def test_the_sampled_arm_scores_and_merges_only_the_validators_sample() -> None:
    from bistro import sample
    from bistro.bench.common import Plan, block_hash

    settings = build_settings("tiny", overrides={"train.threads": 1, "mechanism.max_uids_per_window": 2})
    uids = list(range(6))
    drawn = [learning.scored_uids(settings, w, uids) for w in range(12)]
    for w, got in enumerate(drawn):  # the validator's draw, on the bench's stand-in seed hashes
        hashes = {x: block_hash(x) for x in sample.hash_windows(w)}
        assert got == sample.scored_sample(settings.chain.netuid, w, hashes, uids, 2) and len(got) >= 2
    assert set().union(*drawn[:10]) == set(uids)  # every uid within 10 windows
    assert learning.scored_uids(settings, 0, [0, 1]) == [0, 1]

    plan = Plan(miners=4, windows=2, steps=1, held_out=1, batch_size=2)
    sampled = {"mechanism.max_uids_per_window": 1}
    result = learning.learning(settings, plan, [learning.Arm("sampled", overrides=sampled)])
    arm = result["arms"]["sampled"]
    assert arm["scored_uids_per_window"] == 1 and arm["merged_uids_per_window"] <= 1
