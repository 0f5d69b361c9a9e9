"""`bistro bench mechanism --quick`: runs the real mechanism end to end and reports sane figures.

Behaviour, not timings: the run completes on the tiny preset, every headline key is there, and the
real miner and validator windows did their work. The learning arms are `bistro bench learning`
(tests/unit/test_bench_learning.py).
"""

from __future__ import annotations

import math

import pytest

from bistro.bench import mechanism
from bistro.config import build_settings

pytestmark = pytest.mark.slow  # a whole quick bench: minutes, not the inner loop

HEADLINE = (
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


def test_validator_and_miner_parts_did_real_work(result: dict) -> None:
    over = result["validator_overhead"]
    assert over["uids"] >= 2 and over["overhead"] > 0 and over["score_s"] > 0
    # The baseline runs exactly the sequences Evaluator.score runs (control pages included).
    assert over["score_rows"] == over["bare_rows"] > 0
    duty = result["duty_cycle"]
    assert duty["windows"] >= 1
    assert 0 < duty["busy_fraction"] <= 1 and 0 < duty["wall_fraction"] <= duty["busy_fraction"]
    scale = result["scale"]
    assert scale["valid"] == scale["miners"] == scale["registered"] - 1  # every signed delta accepted
    assert scale["scored"] >= 1 and scale["seconds"] > 0 and scale["peak_rss_mb"] >= scale["rss_before_mb"]
    assert {"fetch", "drop_copies", "score", "propose_update"} <= set(scale["stages_s"])
