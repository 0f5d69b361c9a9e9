"""The golden loss curve of `tiny`: the master's held-out loss over a few windows of the mechanism
(2 honest SimMiners, the default codec and merge, one validator), committed in
tests/assets/tiny_loss_curve.json beside the init hash.

Regenerate it on purpose, in the same commit as a change to the protocol (codec, merge, scoring,
pages, training) that moves it:

    python -m tests.support.golden --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PATH = Path(__file__).parent.parent / "assets" / "tiny_loss_curve.json"
WINDOWS, MINERS, STEPS = 3, 2, 2


def curve() -> dict:
    """The curve as the code computes it now (single-threaded, so the sums are in one order)."""
    import transformers

    from bistro.bench.common import Plan
    from bistro.bench.learning import Arm, bench_settings, held_out_pages, network
    from bistro.config import build_settings
    from bistro.data import Dataset

    torch.set_num_threads(1)
    settings = build_settings("tiny", None, {"train.threads": 1})
    plan = Plan(miners=MINERS, windows=WINDOWS, steps=STEPS, held_out=2)
    dataset = Dataset.open(settings)
    s = bench_settings(settings, plan)
    held = dataset.sequences(held_out_pages(s, dataset, plan))
    net = network(s, dataset, plan, held, Arm("golden"))
    return {
        "preset": "tiny", "windows": WINDOWS, "miners": MINERS, "steps_per_window": STEPS,
        "codec": s.mechanism.codec, "merge": s.mechanism.merge,
        "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
        "curve": [round(x, 6) for x in net["curve"]],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help=f"write {PATH}")
    result = curve()
    print(json.dumps(result, indent=1))
    if parser.parse_args().write:
        PATH.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
