"""The 16-miner arm of `bistro bench learning --bandwidth` alone: 16 miners under the production
rules (a sample of 4 scored and merged a window, the re-encoded update followers apply) against
data-parallel training on all 16 miners' tokens, 12 windows of 5 steps (about 3.5 minutes on 2 idle
cores). `--bandwidth` runs it beside every other design; this prints `learning_efficiency_ddp_16`
without them.

    python scripts/learning_16.py [--mechanism.FIELD VALUE ...]
"""

from __future__ import annotations

import json
import sys
import time

from bistro.bench import learning
from bistro.config import build_settings


def main(argv: list[str]) -> None:
    overrides: dict[str, str] = {"train.threads": "1"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        overrides[flag.removeprefix("--")] = value
    settings = build_settings("tiny", None, overrides)
    started = time.time()
    arms = [a for a in learning.sixteen_arms() if a.label == learning.NEW_RULES]
    result = learning.learning(settings, learning.plan_16(False, 0), arms)
    arm = result["arms"][learning.NEW_RULES]
    print(json.dumps({
        "learning_efficiency_ddp_16": arm["learning_efficiency_ddp_final"],
        "learning_efficiency_ddp_16_readout": arm["learning_efficiency_ddp"],
        "held_out_loss": arm["curve"][-1],
        "ddp_held_out_loss": result["ddp"]["curve"][-1],
        "follower_bytes_per_window": arm["follower_bytes_per_window"],
        "merged_uids_per_window": arm["merged_uids_per_window"],
        "overrides": overrides,
        "wall_seconds": round(time.time() - started, 1),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
