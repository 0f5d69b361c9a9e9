"""`bistro bench mechanism --quick`: runs the real mechanism end to end and reports sane figures.

Behaviour, not timings: the run completes on the tiny preset, every headline key is there, the
centralized baseline learns, the mechanism's master moves, the default codec compresses, and the
real miner and validator windows did their work.
"""

from __future__ import annotations

import math

import pytest

from bistro.bench import mechanism
from bistro.config import build_settings

HEADLINE = (
    "learning_efficiency",
    "compression_ratio",
    "validator_overhead",
    "miner_duty_cycle",
    "scale_seconds_per_window_256",
    "scale_peak_memory_mb",
)


@pytest.fixture(scope="module")
def result() -> dict:
    return mechanism.run(build_settings("tiny", overrides={"train.threads": 1}), quick=True)


def test_headline_has_every_figure(result: dict) -> None:
    for key in HEADLINE:
        assert key in result["headline"], key
        assert math.isfinite(result["headline"][key]), key
    assert {"name", "value", "unit", "baseline", "ratio", "target", "ok"} <= set(result["rows"][0])


def test_learning_figures_are_sane(result: dict) -> None:
    learn = result["learning"]
    central = learn["centralized"]["curve"]
    assert central[-1] < central[0], "the centralized baseline must learn"
    for label, arm in learn["arms"].items():
        assert len(arm["curve"]) == learn["windows"] + 1, label
        assert arm["curve"][-1] < arm["curve"][0], f"{label}: the master never moved"
        assert arm["efficiency"] > 0 and math.isfinite(arm["efficiency"]), label
        assert arm["accepted_updates"] >= 1, label
    assert set(learn["held_out_pages"]).isdisjoint(
        p for w in range(learn["windows"]) for uid in range(learn["miners"]) for p in _local(uid, w)
    )
    assert 50 < result["headline"]["compression_ratio"] < 1000  # topk at 100x, header included


def _local(uid: int, window: int) -> list[int]:
    from bistro.data import Dataset
    from bistro.data.pages import local_pages

    settings = build_settings("tiny")
    return local_pages(settings.chain.netuid, uid, window, Dataset.open(settings).page_settings)


def test_validator_and_miner_parts_did_real_work(result: dict) -> None:
    over = result["validator_overhead"]
    assert over["uids"] >= 2 and over["overhead"] > 0 and over["score_s"] > 0
    duty = result["duty_cycle"]
    assert duty["windows"] >= 1
    assert 0 < duty["busy_fraction"] <= 1 and 0 < duty["wall_fraction"] <= duty["busy_fraction"]
    scale = result["scale"]
    assert scale["valid"] == scale["miners"] == scale["registered"] - 1  # every signed delta accepted
    assert scale["scored"] >= 1 and scale["seconds"] > 0 and scale["peak_rss_mb"] >= scale["rss_before_mb"]
    assert {"fetch", "drop_copies", "score", "propose_update"} <= set(scale["stages_s"])
